"""The FLOPs a composed train step must do, counted from the shapes (the planner's count; benchmarks use it too)."""

from __future__ import annotations

from calm_jax.composition import CompositionConfig
from calm_jax.config import ModelConfig


def layer_flops(cfg: ModelConfig, t: int) -> tuple[float, float]:
    """Forward FLOPs per token of one layer: (matmuls, attention scores + weighted sum)."""
    d, h, g, k, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    matmul = 2 * (d * h * k + 2 * d * g * k + h * k * d + (3 if cfg.mlp == "gated" else 2) * d * f)
    return matmul, 2 * 2 * t * h * k


def step_flops(ccfg: CompositionConfig, b: int, t: int) -> dict:
    """FLOPs the step must do for a batch of b rows of t tokens, counted from the shapes.

    anchor: forward of every layer and the head, plus the backward to activations of the
      layers after the first connected one and of the head (1x a matmul's forward; 2x for
      attention). Its weights get no gradients, the layers below the first connection no
      backward at all.
    augmenting models: forward up to their last tapped layer.
    Θ_C: forward + backward (weight and input gradients: 3x), except that f_proj's input
      (a frozen augmenting state) needs no gradient (2x).
    Recomputation under rematerialisation is not counted: this is what the step must do,
    not what a given program does (XLA's own count, in `plan`, includes it).
    """
    a = ccfg.anchor
    mm, att = layer_flops(a, t)
    head = 2 * a.hidden_size * a.vocab_size
    first = min(j for pairs in ccfg.connections for _, j in pairs)
    anchor = a.num_layers * (mm + att) + head + (a.num_layers - 1 - first) * (mm + 2 * att) + head
    augment = 0
    theta = 0
    for aug, pairs in zip(ccfg.augments, ccfg.connections):
        amm, aatt = layer_flops(aug, t)
        augment += (max(i for i, _ in pairs) + 1) * (amm + aatt)
        dh, hk = a.hidden_size, ccfg.num_heads * ccfg.head_dim
        proj = 2 * aug.hidden_size * dh
        rest = 2 * (3 * dh * hk + hk * dh) + 2 * 2 * t * hk
        theta += len(pairs) * (2 * proj + 3 * rest)
    return {k: v * b * t for k, v in (("anchor", anchor), ("augment", augment), ("theta", theta))}
