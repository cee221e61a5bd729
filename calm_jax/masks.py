"""Attention masks, shared by self-attention and the composition's cross-attention.

Tokens live in *slots* (their index in the sequence or the KV cache) and have *positions*
(what RoPE sees; with left padding these differ). Causality is by slot; padding by a
per-slot validity flag; sliding windows by position.
"""

from __future__ import annotations

import jax.numpy as jnp

# Finite, so a row with nothing to attend to gives a uniform softmax instead of NaN;
# callers that need zeros there (cross-attention) zero such rows explicitly.
NEG_INF = -1e30


def attention_mask(q_slot_T, k_slot_S, k_valid_BxS, q_pos_BxT=None, k_pos_BxS=None, window=None):
    """Boolean mask_BxTxS: query t may attend key s.

    True where key s is valid, not later than query t (by slot), and, with a window,
    fewer than `window` positions back.
    """
    allowed_BxTxS = (k_slot_S[None, None, :] <= q_slot_T[None, :, None]) & k_valid_BxS[:, None, :]
    if window is not None:
        allowed_BxTxS &= (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
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
