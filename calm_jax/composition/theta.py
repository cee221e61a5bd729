"""Θ_C, the composition's only trainable parameters: initialisation, size and a summary."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from calm_jax.composition.config import CompositionConfig
from calm_jax.composition.cross_attention import connection_module


def init_theta(ccfg: CompositionConfig, rng: jax.Array) -> dict:
    """Fresh Θ_C: {"augment_k": {"conn_c": {proj, q, k, v, o[, query_norm][, gate]}}} (plain dicts)."""
    theta = {}
    module = connection_module(ccfg)
    for k, (aug, pairs) in enumerate(zip(ccfg.augments, ccfg.connections)):
        h_a = jnp.zeros((1, 1, aug.hidden_size), ccfg.dtype)
        h_b = jnp.zeros((1, 1, ccfg.anchor.hidden_size), ccfg.dtype)
        theta[f"augment_{k}"] = {
            f"conn_{c}": module.init(jax.random.fold_in(rng, 1000 * k + c), h_a, h_b, jnp.ones((1, 1, 1), bool),
                                     jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))["params"]
            for c in range(len(pairs))}
    return theta


def param_count(theta) -> int:
    """Number of scalars in Θ_C (or any pytree of arrays)."""
    return sum(int(x.size) for x in jax.tree.leaves(theta))


def describe(ccfg: CompositionConfig, theta) -> str:
    """A few lines for CLIs: the models, each connection, the options and Θ_C's size."""
    a = ccfg.anchor
    lines = [f"anchor: {a.family}, {a.num_layers} layers, hidden {a.hidden_size}; cross-attention "
             f"{ccfg.num_heads} heads x {ccfg.head_dim}"]
    for k, (aug, pairs) in enumerate(zip(ccfg.augments, ccfg.connections)):
        lines.append(f"augment {k}: {aug.family}, {aug.num_layers} layers, hidden {aug.hidden_size}")
        lines += [f"  augment {k}: layer {i} -> anchor layer {j}" for i, j in pairs]
    lines.append(f"options: {', '.join(ccfg.options.enabled()) or 'none (as in the paper)'}")
    lines.append(f"Θ_C parameters: {param_count(theta):,}")
    return "\n".join(lines)
