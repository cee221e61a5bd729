"""The composed model m_A⊕B: its decoding cache, the forward pass and the LM wrapper `ComposedLM`.

See the package docstring (calm_jax.composition) for the iterative and encoder decoding modes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from calm_jax import masks
from calm_jax.composition.config import CompositionConfig, CompositionError
from calm_jax.composition.cross_attention import CrossAttention, connection_module
from calm_jax.model import KVCache, LMOutput, forward, init_cache


@struct.dataclass
class ComposedCache:
    """Everything a composed model carries between decoding steps.

    anchor: the anchor's KVCache. augments: one KVCache per augmenting model; its
    valid_BxS also marks which cross-attention slots are filled (the same tokens go
    through the augmenting model and into its cross k/v), so no copy is kept here.
    cross_k, cross_v: per augmenting model, per connection, k/v_BxHxSxK of f_proj of the
    tapped augmenting state, per slot; written once per token, never recomputed.
    augments_done: static; True once the encoder-mode prefill has run.
    """

    anchor: KVCache
    augments: tuple
    cross_k: tuple
    cross_v: tuple
    augments_done: bool = struct.field(pytree_node=False, default=False)


def _augment_layers(pairs) -> tuple[int, ...]:
    return tuple(sorted({i for i, _ in pairs}))


def init_composed_cache(ccfg: CompositionConfig, batch: int, length: int) -> ComposedCache:
    """An empty cache of `length` slots for the anchor, every augmenting model and every connection."""
    augments = []
    for aug, pairs in zip(ccfg.augments, ccfg.connections):
        c = init_cache(aug, batch, length)
        last = max(_augment_layers(pairs))
        # Layers after the last tap never run (logits=False), so their slots need no memory.
        # Distinct arrays, not one repeated: a donated cache must not hold a buffer twice.
        def empty():
            return tuple(jnp.zeros((batch, aug.num_kv_heads, 0, aug.head_dim), c.k[0].dtype)
                         for _ in range(aug.num_layers - last - 1))
        augments.append(c.replace(k=c.k[:last + 1] + empty(), v=c.v[:last + 1] + empty()))
    kv = tuple(tuple(jnp.zeros((batch, ccfg.num_heads, length, ccfg.head_dim), ccfg.dtype) for _ in pairs)
               for pairs in ccfg.connections)
    return ComposedCache(anchor=init_cache(ccfg.anchor, batch, length), augments=tuple(augments),
                         cross_k=kv, cross_v=jax.tree.map(jnp.copy, kv))


def composed_forward(ccfg: CompositionConfig, params, tokens_BxT, mask_BxT=None, cache: ComposedCache | None = None,
                     encoder_mode: bool = False, augment_mask_BxT=None, remat: str = "none",
                     logits: bool = True, segments_BxT=None) -> LMOutput:
    """The composed model m_A⊕B on tokens_BxT; returns LMOutput(logits_BxTxV, {}, cache).

    params: {"theta": Θ_C, "anchor": anchor params, "augments": (augment params, ...)}.
      Gradients flow only into theta: the frozen trees and the augmenting states are
      under stop_gradient.
    mask_BxT: True for real tokens (default all); left or right padding.
    augment_mask_BxT: the slots the augmenting models see (default mask_BxT); a subset of
      mask_BxT. Without a cache, the prompt's mask here gives encoder-mode semantics.
    cache: a ComposedCache from `init_composed_cache`; tokens are written at its index. See
      the package docstring for iterative vs `encoder_mode` decoding.
    remat: the anchor layers' rematerialisation in a backward pass (model.REMAT_POLICIES).
      Only the anchor needs one: the augmenting models are under stop_gradient, so autodiff
      keeps nothing of theirs (nor of anchor layers before the first connection).
    logits: False returns the anchor's last-layer stream as taps[N_B - 1] instead of logits
      (model.head_logits makes them), for a loss that computes logits in chunks.
    segments_BxT: packed rows (see model.forward): every model's self-attention and the
      cross-attention stay within a segment, positions restart at each. Not with a cache.
    """
    if mask_BxT is None:
        mask_BxT = jnp.ones(tokens_BxT.shape, bool)
    mask_BxT = mask_BxT.astype(bool)
    aug_mask_BxT = mask_BxT if augment_mask_BxT is None else augment_mask_BxT.astype(bool) & mask_BxT
    theta = params["theta"]
    frozen_anchor = jax.lax.stop_gradient(params["anchor"])
    frozen_augments = jax.lax.stop_gradient(tuple(params["augments"]))
    if len(frozen_augments) != len(ccfg.augments):
        raise CompositionError(f"params['augments'] holds {len(frozen_augments)} parameter trees for "
                               f"{len(ccfg.augments)} augmenting models")
    for m, pairs in enumerate(ccfg.connections):
        have = theta.get(f"augment_{m}", {})
        missing = [f"augment_{m}/conn_{c}" for c in range(len(pairs)) if f"conn_{c}" not in have]
        if missing:
            raise CompositionError(f"Θ_C has no parameters for {missing[0]}: it was made for a different composition "
                                   f"(this one has {len(pairs)} connection(s) for augmenting model {m})")

    t = tokens_BxT.shape[1]
    run_augments = cache is None or not (encoder_mode and cache.augments_done)
    q_slot_T = jnp.arange(t) if cache is None else cache.anchor.index + jnp.arange(t)

    if segments_BxT is not None and cache is not None:
        raise CompositionError("packed rows (segments_BxT) are for training and scoring, not with a cache")

    def positions(mask, model_cache):  # as `forward` computes them; given to it explicitly
        if segments_BxT is not None:
            return masks.positions_from_segments(segments_BxT)
        return masks.positions_from_mask(mask, None if model_cache is None else
                                         model_cache.valid_BxS.sum(-1).astype(jnp.int32))

    anchor_pos_BxT = positions(mask_BxT, None if cache is None else cache.anchor)
    new_aug_caches, new_k, new_v, terms = [], [], [], {}
    for m, (aug, pairs) in enumerate(zip(ccfg.augments, ccfg.connections)):
        module = connection_module(ccfg)
        conn_params = [theta[f"augment_{m}"][f"conn_{c}"] for c in range(len(pairs))]
        if run_augments:
            aug_pos_BxT = positions(aug_mask_BxT, None if cache is None else cache.augments[m])
            out = forward(aug, frozen_augments[m], tokens_BxT, aug_mask_BxT, aug_pos_BxT,
                          cache=None if cache is None else cache.augments[m],
                          taps=_augment_layers(pairs), logits=False, segments_BxT=segments_BxT)
            kv = [module.apply({"params": p}, jax.lax.stop_gradient(out.taps[i]), aug_pos_BxT,
                               method=CrossAttention.keys_values)
                  for p, (i, _) in zip(conn_params, pairs)]
            aug_cache = out.cache
        else:
            kv, aug_cache = None, cache.augments[m]
        if cache is None:
            k_slot_S, kv_valid_BxS = jnp.arange(t), aug_mask_BxT
        else:
            k_slot_S, kv_valid_BxS = jnp.arange(cache.anchor.length), aug_cache.valid_BxS
            if kv is None:
                kv = list(zip(cache.cross_k[m], cache.cross_v[m]))
            else:
                kv = [tuple(jax.lax.dynamic_update_slice_in_dim(old, x.astype(old.dtype), cache.anchor.index, 2)
                            for old, x in zip(olds, new))
                      for olds, new in zip(zip(cache.cross_k[m], cache.cross_v[m]), kv)]
            new_aug_caches.append(aug_cache)
            new_k.append(tuple(k for k, _ in kv))
            new_v.append(tuple(v for _, v in kv))
        seg = {} if segments_BxT is None else {"q_seg_BxT": segments_BxT, "k_seg_BxS": segments_BxT}
        mask_BxTxS = masks.attention_mask(q_slot_T, k_slot_S, kv_valid_BxS, **seg)
        for p, (_, j), (k_BxHxSxK, v_BxHxSxK) in zip(conn_params, pairs, kv):
            terms.setdefault(j, []).append((module, p, k_BxHxSxK, v_BxHxSxK, mask_BxTxS))

    def hook(j):
        def add_cross(h_BxTxD):
            return h_BxTxD + sum(module.apply({"params": p}, h_BxTxD, k, v, mask, anchor_pos_BxT,
                                              method=CrossAttention.attend)
                                 for module, p, k, v, mask in terms[j])
        return add_cross

    last = ccfg.anchor.num_layers - 1
    out = forward(ccfg.anchor, frozen_anchor, tokens_BxT, mask_BxT, anchor_pos_BxT,
                  cache=None if cache is None else cache.anchor, hooks={j: hook(j) for j in terms},
                  taps=() if logits else (last,), logits=logits, remat=remat, segments_BxT=segments_BxT)
    new_cache = None
    if cache is not None:
        new_cache = ComposedCache(anchor=out.cache, augments=tuple(new_aug_caches), cross_k=tuple(new_k),
                                  cross_v=tuple(new_v), augments_done=cache.augments_done or encoder_mode)
    return LMOutput(logits_BxTxV=out.logits_BxTxV, taps=out.taps, cache=new_cache)


@dataclasses.dataclass(frozen=True)
class ComposedLM:
    """A composition behind the interface of `calm_jax.model.PlainLM`.

    - `apply(params, tokens_BxT, mask_BxT=None, cache=None) -> LMOutput`, with
      params = {"theta": Θ_C, "anchor": ..., "augments": (...)}
    - `init_cache(batch, length) -> ComposedCache`
    - `vocab_size` (the anchor's: the logits' width), `max_positions` (the smallest of all the
      models': all see the same positions)
    - `num_tokens`: the ids every model's embedding table has (the smallest vocab_size), which
      `calm_jax.decoding` never generates beyond even without a tokenizer (with one: its ids)
    encoder_mode: decode with the augmenting models seeing only the prefill (package docstring).
    A frozen dataclass: hashable, equal when ccfg and encoder_mode are, so it is a static jit
    argument and equal models share compiled code.
    """

    ccfg: CompositionConfig
    encoder_mode: bool = False

    def __post_init__(self):
        object.__setattr__(self, "encoder_mode", bool(self.encoder_mode))

    @property
    def vocab_size(self) -> int:
        return self.ccfg.anchor.vocab_size

    @property
    def max_positions(self) -> int:
        return min(c.max_positions for c in (self.ccfg.anchor, *self.ccfg.augments))

    @property
    def num_tokens(self) -> int:
        return min(c.vocab_size for c in (self.ccfg.anchor, *self.ccfg.augments))

    def apply(self, params, tokens_BxT, mask_BxT=None, cache=None, *, augment_mask_BxT=None,
              segments_BxT=None) -> LMOutput:
        return composed_forward(self.ccfg, params, tokens_BxT, mask_BxT, cache, self.encoder_mode, augment_mask_BxT,
                                segments_BxT=segments_BxT)

    def init_cache(self, batch: int, length: int) -> ComposedCache:
        return init_composed_cache(self.ccfg, batch, length)
