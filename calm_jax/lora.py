"""LoRA (Hu et al. 2021) on a frozen decoder: the paper's "LoRA on m_B" baseline (Table 5).

Chosen dense kernels W (d_in x d_out) of every layer become W + (alpha / r) A @ B, with
A (d_in x r) drawn from a small normal and B (r x d_out) zero, so the adapted model starts
exactly as the base. Biases, norms, embeddings and the head stay as they are.

Plain parameter trees, mirroring the base tree down to the adapted kernels:

    lora = {"layers_0": {"attn": {"q": {"a": d_in x r, "b": r x d_out}, ...}, "mlp": {...}}, ...}

`LoRALM` has the interface of `calm_jax.model.PlainLM` (so `calm_jax.decoding.generate`
decodes it) with params {"base": ..., "lora": ...}; the merged kernels are formed inside
`apply`. Train with calm_jax.trainer: trainable = the LoRA tree, frozen = the base tree,
`losses.lm_loss(LoRALM(...).apply, join_lora)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.config import ModelConfig
from calm_jax.model import LMOutput, accum_dtype, forward, init_cache, param_shapes

# Adaptable kernels: name -> the sub-module of a decoder layer that holds it.
TARGETS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "up": "mlp", "gate": "mlp", "down": "mlp"}


@functools.lru_cache(maxsize=16)
def _shapes(cfg: ModelConfig):
    return param_shapes(cfg)


def resolve_targets(cfg: ModelConfig, targets: Sequence[str] | None = None) -> tuple[str, ...]:
    """The kernels to adapt, in TARGETS order. None: every TARGETS kernel the model has
    (a plain MLP has no "gate"). Unknown names, or kernels this model lacks, raise ValueError."""
    layer = _shapes(cfg)["layers_0"]
    present = tuple(t for t, block in TARGETS.items() if t in layer[block])
    if targets is None:
        return present
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {', '.join(TARGETS)}")
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; targets: {', '.join(TARGETS)}")
        if t not in present:
            raise ValueError(f"LoRA target {t!r} is not a kernel of this {cfg.family} model "
                             f"(its {TARGETS[t]} has {', '.join(sorted(layer[TARGETS[t]]))})")
    return tuple(t for t in TARGETS if t in targets)


def _kernel_shapes(cfg: ModelConfig, targets: tuple[str, ...]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """{(layer, block, target): (d_in, d_out)} of every adapted kernel."""
    shapes = _shapes(cfg)
    return {(f"layers_{i}", TARGETS[t], t): tuple(shapes[f"layers_{i}"][TARGETS[t]][t]["kernel"].shape)
            for i in range(cfg.num_layers) for t in targets}


def max_rank(cfg: ModelConfig, targets: Sequence[str] | None = None) -> int:
    """The largest useful rank: the smallest dimension of any adapted kernel."""
    return min(min(s) for s in _kernel_shapes(cfg, resolve_targets(cfg, targets)).values())


def _positive_int(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, found {rank!r}")
    return int(rank)


def check_rank(cfg: ModelConfig, rank, targets: Sequence[str] | None = None) -> int:
    """`rank` as an int; raises ValueError unless 1 <= rank <= max_rank (a higher rank adds
    parameters without adding expressiveness)."""
    rank = _positive_int(rank)
    limit = max_rank(cfg, targets)
    if rank > limit:
        raise ValueError(f"LoRA rank must be in 1..{limit} (the smallest dimension of an adapted kernel of this "
                         f"{cfg.family} model), found {rank}")
    return rank


def param_count(cfg: ModelConfig, rank: int, targets: Sequence[str] | None = None) -> int:
    """Trainable LoRA parameters at `rank`: rank * sum of (d_in + d_out) over the adapted kernels."""
    rank = check_rank(cfg, rank, targets)
    return rank * sum(d_in + d_out for d_in, d_out in _kernel_shapes(cfg, resolve_targets(cfg, targets)).values())


def rank_for_budget(cfg: ModelConfig, budget: int, targets: Sequence[str] | None = None) -> int:
    """The rank (1..max_rank) whose parameter count is closest to `budget` (the smaller on a tie)."""
    if budget < 1:
        raise ValueError(f"LoRA parameter budget must be >= 1, found {budget}")
    per_rank = param_count(cfg, 1, targets)
    low = min(max(budget // per_rank, 1), max_rank(cfg, targets))
    high = min(low + 1, max_rank(cfg, targets))
    return min((low, high), key=lambda r: (abs(r * per_rank - budget), r))


def init_lora(cfg: ModelConfig, rank: int, rng: jax.Array, targets: Sequence[str] | None = None,
              a_std: float = 0.02) -> dict:
    """A fresh LoRA tree: every A ~ normal(a_std), every B = 0 (module docstring)."""
    targets = resolve_targets(cfg, targets)
    rank = check_rank(cfg, rank, targets)
    dtype = jnp.dtype(cfg.param_dtype)
    tree: dict = {}
    for n, ((layer, block, t), (d_in, d_out)) in enumerate(sorted(_kernel_shapes(cfg, targets).items())):
        a = a_std * jax.random.normal(jax.random.fold_in(rng, n), (d_in, rank), jnp.float32)
        tree.setdefault(layer, {}).setdefault(block, {})[t] = {"a": a.astype(dtype),
                                                               "b": jnp.zeros((rank, d_out), dtype)}
    return tree


def merge(base, lora, scale: float):
    """The base tree with every adapted kernel replaced by W + scale * A @ B (nothing else copied)."""
    merged = dict(base)
    for layer, blocks in lora.items():
        merged[layer] = dict(base[layer])
        for block, kernels in blocks.items():
            merged[layer][block] = dict(base[layer][block])
            for t, ab in kernels.items():
                dense = base[layer][block][t]
                acc = accum_dtype(ab["a"].dtype)
                delta = scale * (ab["a"].astype(acc) @ ab["b"].astype(acc))
                merged[layer][block][t] = {**dense, "kernel": (dense["kernel"] + delta).astype(dense["kernel"].dtype)}
    return merged


def join_lora(lora, base):
    """LoRALM parameters from the trainable LoRA tree and the frozen base tree (losses.lm_loss's join)."""
    return {"base": base, "lora": lora}


@dataclasses.dataclass(frozen=True)
class LoRALM:
    """A base LM with LoRA factors, behind the interface of `calm_jax.model.PlainLM`.

    params = {"base": the base tree, "lora": a tree from `init_lora` at this rank (any targets)}.
    alpha: the scale is alpha / rank; default alpha = rank (scale 1). Stored as a float, so
      LoRALM(cfg, 4) == LoRALM(cfg, 4, 4.0).
    A frozen dataclass like PlainLM: hashable, equal when (cfg, rank, alpha) are (a static jit
    argument).
    """

    cfg: ModelConfig
    rank: int
    alpha: float | None = None

    def __post_init__(self):
        rank = _positive_int(self.rank)
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "alpha", float(rank if self.alpha is None else self.alpha))

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def apply(self, params, tokens_BxT, mask_BxT=None, cache=None, *, segments_BxT=None) -> LMOutput:
        base = jax.lax.stop_gradient(params["base"])
        return forward(self.cfg, merge(base, params["lora"], self.scale), tokens_BxT, mask_BxT, cache=cache,
                       segments_BxT=segments_BxT)

    def init_cache(self, batch: int, length: int):
        return init_cache(self.cfg, batch, length)
