"""The losses: next-token cross-entropy and the loss functions the trainer trains with.

A loss function `loss_fn(trainable, frozen, batch) -> (loss_sum, n_tokens)` (`LossFn`) says
how the two parameter trees make a prediction; calm_jax.train_step differentiates it with
respect to `trainable` only. For the composition, trainable = Θ_C and frozen =
{"anchor", "augments"} (`composed_loss`, `encoder_mode_loss`, or `lm_loss` with
`join_composition`); for plain LM training, trainable = all weights and frozen = {}
(`lm_loss(PlainLM(cfg).apply)`). The loss is a sum over target tokens, divided by their count
by the caller, so micro-batches add up exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from calm_jax.composition import CompositionConfig, composed_forward
from calm_jax.model import accum_dtype, head_logits

Batch = dict  # {"tokens_BxT": int32, "mask_BxT": bool, "target_BxT": bool[, "segment_BxT": int32 (packed rows)]}
LossFn = Callable[[Any, Any, Batch], tuple[jax.Array, jax.Array]]


def predicted(target_BxT, segments_BxT=None):
    """w_Bx(T-1): token t+1 is scored at position t: it is a target and, in a packed row, of
    the same segment as t (an example's first token is never predicted from the one before)."""
    w_BxT = target_BxT[:, 1:].astype(bool)
    if segments_BxT is not None:
        w_BxT &= segments_BxT[:, 1:] == segments_BxT[:, :-1]
    return w_BxT


def next_token_loss(logits_BxTxV, tokens_BxT, target_BxT, segments_BxT=None):
    """Summed cross-entropy of predicting token t+1 at position t, where token t+1 is a target
    (`predicted`). Log-softmax in at least fp32. Returns (loss_sum, n_tokens), scalars of that dtype.
    """
    return _nll_sums(logits_BxTxV[:, :-1], tokens_BxT[:, 1:], predicted(target_BxT, segments_BxT))


def _nll_sums(logits_BxTxV, next_BxT, w_BxT):
    """(sum of -log p(next) weighted by w, sum of w) with the log-softmax in at least fp32."""
    dtype = accum_dtype(logits_BxTxV.dtype)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(dtype), axis=-1)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, next_BxT[..., None], axis=-1)[..., 0]
    w_BxT = w_BxT.astype(dtype)
    return jnp.sum(nll_BxT * w_BxT), jnp.sum(w_BxT)


def chunked_next_token_loss(head: Callable[[jax.Array], jax.Array], h_BxTxD, tokens_BxT, target_BxT,
                            chunk: int, segments_BxT=None):
    """`next_token_loss(head(h_BxTxD), ...)` without ever holding the B x T x V logits.

    head: h_BxCxD -> logits_BxCxV (e.g. the final norm and LM head). The logits are made
    `chunk` positions at a time inside a `lax.map`, and remade in the backward pass
    (`jax.checkpoint`): at most B x chunk x V of them exist at once, against B x T x V (with
    its softmax copies) for the plain loss, which dominates memory at a 128k vocabulary.
    """
    h_BxTxD, next_BxT, w_BxT = h_BxTxD[:, :-1], tokens_BxT[:, 1:], predicted(target_BxT, segments_BxT)
    b, t = next_BxT.shape
    pad = -t % chunk
    if pad:  # padded positions carry weight 0
        h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
        next_BxT, w_BxT = jnp.pad(next_BxT, ((0, 0), (0, pad))), jnp.pad(w_BxT, ((0, 0), (0, pad)))

    def chunks(x_BxT):  # -> x_QxBxC: Q chunks of C positions
        return jnp.swapaxes(x_BxT.reshape(b, -1, chunk, *x_BxT.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(xs):
        h_BxCxD, next_BxC, w_BxC = xs
        return _nll_sums(head(h_BxCxD), next_BxC, w_BxC)

    loss_Q, n_Q = jax.lax.map(one, (chunks(h_BxTxD), chunks(next_BxT), chunks(w_BxT)))
    return jnp.sum(loss_Q), jnp.sum(n_Q)


def lm_loss(apply: Callable, join: Callable[[Any, Any], Any] | None = None) -> LossFn:
    """A loss_fn for anything with the LM interface `apply(params, tokens_BxT, mask_BxT) -> LMOutput`.

    join(trainable, frozen) -> params builds `apply`'s parameters (default: trainable alone).
    """
    def loss_fn(trainable, frozen, batch):
        params = trainable if join is None else join(trainable, frozen)
        segments = batch.get("segment_BxT")
        packed = {} if segments is None else {"segments_BxT": segments}
        out = apply(params, batch["tokens_BxT"], batch["mask_BxT"], **packed)
        return next_token_loss(out.logits_BxTxV, batch["tokens_BxT"], batch["target_BxT"], segments)
    return loss_fn


def join_composition(theta, frozen):
    """Composition parameters from Θ_C and the frozen {"anchor", "augments"} trees."""
    return {"theta": theta, **frozen}


def composed_loss(ccfg: CompositionConfig, remat: str = "none", loss_chunk: int = 0) -> LossFn:
    """The loss_fn train.compose trains Θ_C with: loss_fn(theta, frozen, batch)
    -> (loss_sum, n_tokens), frozen = {"anchor", "augments"}.

    remat: see `composed_forward`. loss_chunk: 0 for the plain loss over the B x T x V logits;
    N > 0 makes the logits N positions at a time (`chunked_next_token_loss`). The loss and
    Θ_C's gradients are the same either way.
    """
    if loss_chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0, got {loss_chunk}")

    def loss_fn(theta, frozen, batch):
        params = {"theta": theta, **frozen}
        tokens_BxT, mask_BxT, target_BxT = batch["tokens_BxT"], batch["mask_BxT"], batch["target_BxT"]
        segments = batch.get("segment_BxT")
        out = composed_forward(ccfg, params, tokens_BxT, mask_BxT, remat=remat, logits=not loss_chunk,
                               segments_BxT=segments)
        if not loss_chunk:
            return next_token_loss(out.logits_BxTxV, tokens_BxT, target_BxT, segments)
        anchor = jax.lax.stop_gradient(frozen["anchor"])
        return chunked_next_token_loss(lambda h: head_logits(ccfg.anchor, anchor, h),
                                       out.taps[ccfg.anchor.num_layers - 1], tokens_BxT, target_BxT, loss_chunk,
                                       segments)
    return loss_fn


def encoder_mode_loss(ccfg: CompositionConfig) -> LossFn:
    """The loss_fn for training Θ_C with the augmenting models seeing only the prompt.

    loss_fn(theta, frozen, batch) -> (loss_sum, n_tokens), frozen = {"anchor", "augments"}:
    `composed_forward` with `augment_mask_BxT` = the real tokens that are not targets, so
    training sees exactly what encoder-mode decoding (`ComposedLM(ccfg, encoder_mode=True)`)
    computes for a prompt and its continuation. Rows with no prompt (text records) get no
    augmenting states at all.
    """
    def loss_fn(theta, frozen, batch):
        mask_BxT = batch["mask_BxT"].astype(bool)
        prompt_BxT = mask_BxT & ~batch["target_BxT"].astype(bool)
        segments = batch.get("segment_BxT")
        out = composed_forward(ccfg, {"theta": theta, **frozen}, batch["tokens_BxT"], mask_BxT,
                               augment_mask_BxT=prompt_BxT, segments_BxT=segments)
        return next_token_loss(out.logits_BxTxV, batch["tokens_BxT"], batch["target_BxT"], segments)
    return loss_fn
