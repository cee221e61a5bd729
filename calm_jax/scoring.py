"""Log-likelihood of targets given prompts, for any model with the PlainLM interface.

Records are tokenized by `data.encode`, sorted by length, right-padded to a few bucket
lengths (powers of two) and a fixed batch size, so one jitted function serves every batch
of a bucket. Padding never changes a score: the mask hides padding from every real token,
and only target tokens are summed.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import data
from calm_jax.model import accum_dtype

MIN_BUCKET = 16


def bucket_length(n: int, max_positions: int) -> int:
    """The padded length for an n-token sequence: the next power of two >= MIN_BUCKET, capped."""
    return data.bucket_length(n, MIN_BUCKET, max_positions)


@jax.jit
def _target_logprobs(logits_BxTxV, tokens_BxT, flags_BxT):
    """Per row: the summed log-probability of flagged tokens, each predicted from the slot before."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(accum_dtype(logits_BxTxV.dtype)), axis=-1)
    logp_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(flags_BxT[:, 1:], logp_BxT, 0.0).sum(-1)


@functools.partial(jax.jit, static_argnums=0)
def _score(lm, params, tokens_BxT, mask_BxT, flags_BxT):
    """Per row: the summed log-probability of the flagged tokens under `lm`. `lm` is a static
    argument: equal models share the compiled function, once per (batch, bucket) shape."""
    return _target_logprobs(lm.apply(params, tokens_BxT, mask_BxT).logits_BxTxV, tokens_BxT, flags_BxT)


def encode_records(tokenizer, records: Sequence[dict], max_positions: int) -> list[tuple[list[int], list[bool]]]:
    """Token ids and target flags per record, checked to be scorable."""
    encoded = []
    for n, record in enumerate(records):
        ids, flags = data.encode(tokenizer, record)
        if flags and flags[0]:
            if "text" not in record:
                raise data.DataError(f"{data.where(record, n)}: the prompt has no tokens (and the tokenizer adds "
                                     "no BOS), so the first target token has no context to be scored from")
            flags = [False] + flags[1:]  # a text's first token has nothing to be predicted from
        if len(ids) > max_positions:
            raise data.DataError(f"{data.where(record, n)} has {len(ids)} tokens, more than the model's "
                                 f"{max_positions} positions")
        encoded.append((ids, flags))
    return encoded


def loglik(lm, params, tokenizer, records: Sequence[dict], batch_size: int = 8) -> list[tuple[float, int]]:
    """Scores `{"prompt", "target"}` (or `{"text"}`) records.

    lm: any hashable object with `apply(params, tokens_BxT, mask_BxT) -> LMOutput` and
      `max_positions` (a `PlainLM` or a composed model); a static jit argument.
    Returns, in record order, (summed log-probability of the target tokens, number of target
    tokens) per record.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_records(tokenizer, records, lm.max_positions)
    order = sorted(range(len(encoded)), key=lambda r: len(encoded[r][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seqs = [encoded[r][0] for r in rows]
        flags = [encoded[r][1] for r in rows]
        # Short last batches get empty rows, so every batch of a bucket has the same shape.
        seqs += [[]] * (batch_size - len(rows))
        flags += [[]] * (batch_size - len(rows))
        length = bucket_length(max(len(s) for s in seqs), lm.max_positions)
        tokens_BxT, mask_BxT, flags_BxT = data.pad_batch(seqs, length, flags=flags)
        sums_B = np.asarray(_score(lm, params, tokens_BxT, mask_BxT, flags_BxT))
        for i, r in enumerate(rows):
            results[r] = (float(sums_B[i]), int(sum(encoded[r][1])))
    return results


def summarize(scores: Sequence[tuple[float, int]]) -> dict:
    """Totals over records: mean log-likelihood per target token and perplexity."""
    total = sum(s for s, _ in scores)
    tokens = sum(n for _, n in scores)
    per_token = total / tokens if tokens else float("nan")
    return dict(records=len(scores), target_tokens=tokens, loglik=total, loglik_per_token=per_token,
                perplexity=math.exp(-per_token) if tokens else float("nan"))
