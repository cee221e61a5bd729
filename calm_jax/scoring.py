"""Log-likelihood of targets given prompts, for any model with the PlainLM interface.

Records are tokenized by `data.encode`, sorted by length, right-padded to a few bucket
lengths (powers of two) and a fixed batch size, so one jitted function serves every batch
of a bucket. Padding never changes a score: the mask hides padding from every real token,
and only target tokens are summed.

Probabilities are normalised over the tokenizer's ids only (`num_token_ids`: max id + 1):
an embedding table padded beyond its tokenizer (Qwen2.5: 151,936 or 152,064 rows for
151,665 ids; a composition's anchor, whose logits these are) has logits for ids no text can
hold, and they are left out of the softmax, as `calm_jax.decoding` never generates them. A
model whose vocab_size is its tokenizer's is scored exactly as before (no op is added); a
plain model with a padded table scores a little higher than a full-width softmax (e.g. HF's
logits through log_softmax) would give.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import data
from calm_jax.composition.vocab import num_token_ids
from calm_jax.model import accum_dtype

MIN_BUCKET = 16


def bucket_length(n: int, max_positions: int) -> int:
    """The padded length for an n-token sequence: the next power of two >= MIN_BUCKET, capped."""
    return data.bucket_length(n, MIN_BUCKET, max_positions)


@functools.partial(jax.jit, static_argnums=3)
def _target_logprobs(logits_BxTxV, tokens_BxT, flags_BxT, num_tokens: int | None = None):
    """Per row: the summed log-probability of flagged tokens, each predicted from the slot before,
    normalised over ids < num_tokens (the logits of the rest dropped; None or >= the width: all)."""
    if num_tokens is not None and num_tokens < logits_BxTxV.shape[-1]:
        logits_BxTxV = logits_BxTxV[..., :num_tokens]
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(accum_dtype(logits_BxTxV.dtype)), axis=-1)
    logp_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(flags_BxT[:, 1:], logp_BxT, 0.0).sum(-1)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _score(lm, params, tokens_BxT, mask_BxT, flags_BxT, num_tokens: int | None = None):
    """Per row: the summed log-probability of the flagged tokens under `lm`, over ids < num_tokens.
    `lm` and num_tokens are static arguments: equal models share the compiled function, once
    per (batch, bucket) shape."""
    return _target_logprobs(lm.apply(params, tokens_BxT, mask_BxT).logits_BxTxV, tokens_BxT, flags_BxT, num_tokens)


def encode_records(tokenizer, records: Sequence[dict], max_positions: int,
                   num_tokens: int | None = None) -> list[tuple[list[int], list[bool]]]:
    """Token ids and target flags per record, checked to be scorable (and, with num_tokens, every
    id below it: a tokenizer id the model's embedding table lacks is a DataError). Every record
    that is not is named in one DataError (see `data.keep_valid`)."""
    encoded, problems = _encode(tokenizer, records, max_positions, num_tokens)
    data.keep_valid(_path(records), [e for e in encoded if e is not None], problems, skip=False)
    return encoded


def scorable(tokenizer, records: Sequence[dict], max_positions: int, num_tokens: int | None = None,
             skip_invalid: bool = False, log=data.log_to_stderr) -> list[dict]:
    """The records `encode_records` accepts: all of them, or a DataError naming every one it
    refuses; with `skip_invalid`, the others, and one `log` line counting those left out."""
    encoded, problems = _encode(tokenizer, records, max_positions, num_tokens)
    bad = {id(r) for r, e in zip(records, encoded) if e is None}
    return data.keep_valid(_path(records), [r for r in records if id(r) not in bad], problems, skip_invalid, log)


def _path(records) -> str:
    return records[0].path if records and isinstance(records[0], data.Record) else "records"


def _encode(tokenizer, records, max_positions, num_tokens):
    """(per record: (ids, flags), or None where it cannot be scored; [(line or name, why)])."""
    encoded, problems = [], []
    for n, record in enumerate(records):
        at = record.line if isinstance(record, data.Record) else data.where(record, n)
        ids, flags = data.encode(tokenizer, record)
        problem = None
        if flags and flags[0]:
            if "text" not in record:
                problem = ("the prompt has no tokens (and the tokenizer adds no BOS), so the first target token "
                           "has no context to be scored from")
            flags = [False] + flags[1:]  # a text's first token has nothing to be predicted from
        if len(ids) > max_positions:
            problem = f" has {len(ids)} tokens, more than the model's {max_positions} positions"
        elif num_tokens is not None and ids and max(ids) >= num_tokens:
            problem = f" has token id {max(ids)}, out of the model's vocabulary of {num_tokens}"
        if problem:
            problems.append((at, problem))
        encoded.append(None if problem else (ids, flags))
    return encoded, problems


def loglik(lm, params, tokenizer, records: Sequence[dict], batch_size: int = 8) -> list[tuple[float, int]]:
    """Scores `{"prompt", "target"}` (or `{"text"}`) records.

    lm: any hashable object with `apply(params, tokens_BxT, mask_BxT) -> LMOutput` and
      `max_positions` (a `PlainLM` or a composed model); a static jit argument.
    Returns, in record order, (summed log-probability of the target tokens, number of target
    tokens) per record. Each log-probability is normalised over the tokenizer's ids only
    (`num_token_ids(tokenizer)`): the logits of a padded table's rows beyond them are left out
    of the softmax (see the module docstring). Record ids must have a row in every model's
    table (`lm.num_tokens` or `lm.vocab_size`, where `lm` has one).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_tokens = num_token_ids(tokenizer)
    model_tokens = getattr(lm, "num_tokens", getattr(lm, "vocab_size", None))
    encoded = encode_records(tokenizer, records, lm.max_positions,
                             model_tokens if model_tokens is not None and model_tokens < num_tokens else None)
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
        sums_B = np.asarray(_score(lm, params, tokens_BxT, mask_BxT, flags_BxT, num_tokens))
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
