"""Attention masks, shared by self-attention and the composition's cross-attention.

Tokens live in *slots* (their index in the sequence or the KV cache) and have *positions*
(what RoPE sees; with left padding these differ). Causality is by slot; padding by a
per-slot validity flag; sliding windows by position. A packed row holds several examples,
each a *segment* (an id per slot): attention stays within a segment, positions restart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a row with nothing to attend to gives a uniform softmax instead of NaN;
# callers that need zeros there (cross-attention) zero such rows explicitly.
NEG_INF = -1e30


def attention_mask(q_slot_T, k_slot_S, k_valid_BxS, q_pos_BxT=None, k_pos_BxS=None, window=None,
                   q_seg_BxT=None, k_seg_BxS=None):
    """Boolean mask_BxTxS: query t may attend key s.

    True where key s is valid, not later than query t (by slot), with a window fewer than
    `window` positions back, and with segments (packed rows) in the query's segment.
    """
    allowed_BxTxS = (k_slot_S[None, None, :] <= q_slot_T[None, :, None]) & k_valid_BxS[:, None, :]
    if window is not None:
        allowed_BxTxS &= (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
    if q_seg_BxT is not None:
        allowed_BxTxS &= q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
    return allowed_BxTxS


def positions_from_mask(mask_BxT, offset_B=None):
    """RoPE positions for a (possibly left-padded) batch: the count of valid tokens before.

    `offset_B` is the number of valid tokens already in the cache. Padding slots get the
    position of the next real token (their value never matters: nothing attends to them).
    """
    pos_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - mask_BxT.astype(jnp.int32)
    if offset_B is not None:
        pos_BxT = pos_BxT + offset_B[:, None]
    return pos_BxT


def positions_from_segments(segments_BxT):
    """RoPE positions for packed rows: each slot's index within its segment (segments are
    runs of equal ids, in order along the row; padding is segment 0)."""
    seg_BxT = jnp.asarray(segments_BxT)
    t = seg_BxT.shape[-1]
    slot_BxT = jnp.broadcast_to(jnp.arange(t), seg_BxT.shape)
    starts_BxT = jnp.concatenate([jnp.ones_like(seg_BxT[:, :1], bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
    start_slot_BxT = jax.lax.cummax(jnp.where(starts_BxT, slot_BxT, 0), axis=1)
    return (slot_BxT - start_slot_BxT).astype(jnp.int32)
