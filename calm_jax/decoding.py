"""Generation for a plain LM or a composition: one jitted decode loop over the model's cache.

The loop only knows the model interface of `calm_jax.model.PlainLM` (`apply(params,
tokens_BxT, mask_BxT, cache) -> LMOutput`, `init_cache`, `vocab_size`, `max_positions`), so
a composed model decodes through the same code: its `apply` advances the anchor's cache,
each augmenting model's cache and the cross-attention keys/values itself (iterative
decoding), or keeps the augmenting states of the prompt (encoder mode).

Prompts are left-padded to a bucketed length, so every row's last prompt token sits in the
same slot and one prefill pass serves the batch; one `jax.lax.while_loop` then feeds one
token per step. The compiled function depends only on (model, batch, prompt bucket,
max_new_tokens, sampling, num_tokens): prompt lengths within a bucket reuse it.

Only real ids are ever generated. The logits are the model's (a composition's: the
anchor's), vocab_size wide, but an embedding table is often padded beyond its tokenizer
(Qwen2.5: 151,936 or 152,064 rows for 151,665 ids), and a composition's models may pad
theirs differently. `decode` masks (-inf, before the argmax or the sampling filters) the
logits of ids >= `num_tokens`: by default the ids every model's table has (`model.num_tokens`
where the model defines it, a composition's smallest vocab_size; else `model.vocab_size`,
so nothing is masked); `generate` lowers it to the tokenizer's ids when given one. When
nothing is masked no mask op is traced: a model whose vocab_size is its tokenizer's decodes
exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from calm_jax import data as data_lib
from calm_jax.composition.vocab import num_token_ids

MIN_BUCKET = 8


class GenerationError(ValueError):
    """A generation request that cannot be served (bad prompt, stop token or length)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 means greedy (argmax); top_k 0 and
    top_p 1 switch those filters off. Hashable: it is a static argument of the decode loop."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's result. `tokens` are the generated ids, ending with the stop token when one
    was produced (`stopped`); `text` is their detokenization without the stop token (None
    without a tokenizer); `num_generated == len(tokens)`."""

    tokens: list[int]
    text: str | None
    num_generated: int
    stopped: bool


@struct.dataclass
class DecodeOutput:
    tokens_BxM: jax.Array  # generated ids; -1 after a row has stopped
    num_B: jax.Array  # tokens generated per row, stop token included
    stopped_B: jax.Array  # the row ended on a stop token


@struct.dataclass
class _State:
    step: jax.Array  # scalar: tokens generated so far (same for every row still running)
    tokens_BxM: jax.Array
    num_B: jax.Array
    done_B: jax.Array
    stopped_B: jax.Array
    context: Any  # the model's cache, or (tokens_BxL, mask_BxL) when decoding without one
    rng: jax.Array


def model_num_tokens(model) -> int:
    """The ids `model` may be fed and may generate: `model.num_tokens` where it defines one (a
    composition: the smallest vocab_size of its models), else `model.vocab_size`."""
    return int(getattr(model, "num_tokens", model.vocab_size))


def mask_padded(logits_BxV, num_tokens: int | None) -> jax.Array:
    """`logits_BxV` with the ids >= num_tokens (a padded embedding table's rows beyond the
    tokenizer) at -inf, so argmax and sampling never choose them. None, or num_tokens >= the
    width: `logits_BxV` itself, untouched (no op is traced)."""
    width = logits_BxV.shape[-1]
    if num_tokens is None or num_tokens >= width:
        return logits_BxV
    ids_BxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxV.shape, logits_BxV.ndim - 1)
    return jnp.where(ids_BxV < num_tokens, logits_BxV, jnp.asarray(-jnp.inf, logits_BxV.dtype))


def select_token(logits_BxV, sampling: Sampling, rng, num_tokens: int | None = None) -> jax.Array:
    """The next token per row (int32), greedy or sampled with temperature/top-k/top-p.

    num_tokens: only ids < num_tokens can be chosen (`mask_padded`, applied first: top-k and
    top-p then filter the real ids); None = every id of the logits.
    """
    logits_BxV = mask_padded(logits_BxV, num_tokens)
    if sampling.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, min(sampling.top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
        # strictly before it is still below top_p (so the most likely token always stays).
        keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < sampling.top_p
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _record(state: _State, token_B, stop_ids_Z) -> _State:
    running_B = ~state.done_B
    is_stop_B = (token_B[:, None] == stop_ids_Z[None, :]).any(-1)
    tokens_BxM = state.tokens_BxM.at[:, state.step].set(jnp.where(running_B, token_B, -1))
    return state.replace(step=state.step + 1, tokens_BxM=tokens_BxM, num_B=state.num_B + running_B,
                         done_B=state.done_B | is_stop_B, stopped_B=state.stopped_B | (running_B & is_stop_B))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "use_cache", "num_tokens"))
def decode(model, params, tokens_BxP, mask_BxP, stop_ids_Z, rng, *, max_new_tokens: int,
           sampling: Sampling = Sampling(), use_cache: bool = True, num_tokens: int | None = None) -> DecodeOutput:
    """Generates up to `max_new_tokens` per row, all inside one compiled function.

    model: a static argument, so hashable: models that compare equal (PlainLM, ComposedLM,
      LoRALM of equal configs) share the compiled function.
    tokens_BxP/mask_BxP: left-padded prompts (every row's last slot is a real token).
    stop_ids_Z: int32 ids that end a row (kept as its last token); Z may be 0.
    rng: a PRNG key (unused when greedy).
    use_cache=False re-runs the full forward over a fixed (P + max_new_tokens) buffer every
      step: the no-cache baseline for benchmarks, equal to cached decoding for a plain LM
      or an iterative composition.
    num_tokens: a static int; only ids < num_tokens are generated (the logits of the rest are
      masked to -inf: a padded embedding table's rows beyond the tokenizer). None: the ids every
      model's table has (`model_num_tokens`: a plain model's vocab_size, so nothing is masked);
      never more than those. `generate` passes the tokenizer's ids.
    """
    limit = model_num_tokens(model) if num_tokens is None else min(int(num_tokens), model_num_tokens(model))
    if limit < 1:
        raise GenerationError(f"num_tokens must be >= 1, got {num_tokens}")
    select = functools.partial(select_token, sampling=sampling, num_tokens=limit)
    b, p = tokens_BxP.shape
    n = max_new_tokens
    mask_BxP = mask_BxP.astype(bool)
    if use_cache:
        # The last generated token is never fed back, hence n - 1 slots after the prompt.
        out = model.apply(params, tokens_BxP, mask_BxP, cache=model.init_cache(b, p + n - 1))
        context, logits_BxV = out.cache, out.logits_BxTxV[:, -1]
    else:
        buf_BxL = jnp.concatenate([tokens_BxP, jnp.zeros((b, n), tokens_BxP.dtype)], axis=1)
        bmask_BxL = jnp.concatenate([mask_BxP, jnp.zeros((b, n), bool)], axis=1)
        context = (buf_BxL, bmask_BxL)
        logits_BxV = model.apply(params, buf_BxL, bmask_BxL).logits_BxTxV[:, p - 1]
    rng, key = jax.random.split(rng)
    state = _State(step=jnp.zeros((), jnp.int32), tokens_BxM=jnp.full((b, n), -1, jnp.int32),
                   num_B=jnp.zeros((b,), jnp.int32), done_B=jnp.zeros((b,), bool),
                   stopped_B=jnp.zeros((b,), bool), context=context, rng=rng)
    state = _record(state, select(logits_BxV, rng=key), stop_ids_Z)

    def cond(s: _State):
        return (s.step < n) & ~jnp.all(s.done_B)

    def body(s: _State):
        last_B = s.tokens_BxM[:, s.step - 1]
        # Finished rows feed padding: their caches stop gaining valid slots.
        feed_B = jnp.where(s.done_B, 0, last_B)
        if use_cache:
            out = model.apply(params, feed_B[:, None], ~s.done_B[:, None], cache=s.context)
            context, logits_BxV = out.cache, out.logits_BxTxV[:, -1]
        else:
            buf_BxL, bmask_BxL = s.context
            slot = p + s.step - 1
            buf_BxL = jax.lax.dynamic_update_slice_in_dim(buf_BxL, feed_B[:, None].astype(buf_BxL.dtype), slot, axis=1)
            bmask_BxL = jax.lax.dynamic_update_slice_in_dim(bmask_BxL, ~s.done_B[:, None], slot, axis=1)
            logits_BxTxV = model.apply(params, buf_BxL, bmask_BxL).logits_BxTxV
            context = (buf_BxL, bmask_BxL)
            logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, slot, axis=1, keepdims=False)
        rng, key = jax.random.split(s.rng)
        return _record(s.replace(context=context, rng=rng), select(logits_BxV, rng=key), stop_ids_Z)

    state = jax.lax.while_loop(cond, body, state)
    return DecodeOutput(tokens_BxM=state.tokens_BxM, num_B=state.num_B, stopped_B=state.stopped_B)


def resolve_stop_ids(stop: Sequence[str | int], vocab_size: int, tokenizer=None,
                     stop_at_eos: bool = True) -> list[int]:
    """Stop tokens as ids: ints are checked against the vocabulary size; strings must be one
    token of the tokenizer's vocabulary. Adds the tokenizer's EOS when `stop_at_eos`."""
    ids = []
    for s in stop:
        if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            if not 0 <= s < vocab_size:
                raise GenerationError(f"stop token id {s} is out of range for a vocabulary of {vocab_size}")
            ids.append(int(s))
        elif isinstance(s, str):
            if tokenizer is None:
                raise GenerationError(f"stop token {s!r} is a string but there is no tokenizer to look it up")
            vocab = tokenizer.get_vocab()
            enc = tokenizer.encode(s, add_special_tokens=False) if s else []
            if s in vocab:
                ids.append(int(vocab[s]))
            elif len(enc) == 1:
                ids.append(int(enc[0]))
            else:
                raise GenerationError(f"stop token {s!r} is not a token of the vocabulary "
                                      f"(it encodes to {len(enc)} tokens: {enc[:8]})")
            if ids[-1] >= vocab_size:
                raise GenerationError(f"stop token {s!r} has id {ids[-1]}, beyond the model's vocabulary "
                                      f"of {vocab_size}")
        else:
            raise GenerationError(f"stop token {s!r} must be a token string or an int id")
    if stop_at_eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids `generate` feeds for a text prompt (with the tokenizer's BOS, if it adds one)."""
    return data_lib.encode(tokenizer, {"prompt": prompt, "target": ""})[0]


def as_generated(tokenizer, text: str) -> str:
    """`text` as `generate` would render a generation of it: without the tokenizer's special
    tokens (task markers, BOS, ...), which it decodes with skip_special_tokens.

    Removed from the text instead of round-tripping it through token ids, so a character
    outside the vocabulary stays (a round trip would drop it as an unknown token).
    """
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    for s in sorted(specials | set(tokenizer.all_special_tokens), key=len, reverse=True):
        text = text.replace(s, "")
    return text


def prompt_token_ids(prompts, tokenizer, max_new_tokens: int, max_positions: int, names=None,
                     num_tokens: int | None = None) -> list[list[int]]:
    """The token ids `generate` decodes from, checked to fit: GenerationError names the prompt
    (`names[i]`, default "prompt i") that is empty, leaves no room for max_new_tokens or (with
    `num_tokens`) holds an id outside 0..num_tokens-1 (one some model's embedding table lacks)."""
    out = []
    for i, prompt in enumerate(prompts):
        name = names[i] if names is not None else f"prompt {i}"
        if isinstance(prompt, str):
            if tokenizer is None:
                raise GenerationError(f"{name} is text but no tokenizer was given")
            if not prompt:
                raise GenerationError(f"{name} is empty")
            ids = prompt_ids(tokenizer, prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError(f"{name} is empty (no tokens)")
        if num_tokens is not None and not 0 <= min(ids) <= max(ids) < num_tokens:
            bad = next(t for t in ids if not 0 <= t < num_tokens)
            raise GenerationError(f"{name} has token id {bad}, out of range for a vocabulary of {num_tokens}")
        if len(ids) + max_new_tokens > max_positions:
            raise GenerationError(
                f"{name} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that needs "
                f"{len(ids) + max_new_tokens} positions, more than the model's maximum of {max_positions}")
        out.append(ids)
    return out


def generate(model, params, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int,
             tokenizer=None, stop: Sequence[str | int] = (), stop_at_eos: bool = True,
             sampling: Sampling = Sampling(), seed: int = 0, batch_size: int | None = None,
             names: Sequence[str] | None = None) -> list[Generation]:
    """Generates a continuation for each prompt (text, or a list of token ids).

    model: a `PlainLM` or a composed model (same interface); params: its parameter tree.
    stop: stop tokens as token strings or ids (EOS is added when the tokenizer has one and
      `stop_at_eos`). Rows are decoded `batch_size` at a time (default: all together); the
      last batch is filled with copies so the compiled shape never changes.
    Sampling is reproducible for a given seed, batch size and prompt order.
    names: what errors call each prompt (e.g. "FILE: line N"; default "prompt I", 0-based).
    Only ids < num_tokens are generated, num_tokens = the tokenizer's ids (`num_token_ids`) when
    one is given, at most the ids every model's table has (`model_num_tokens`): the padded
    rows of the (anchor's) logits are masked (`decode`). Prompt ids and stop ids must be below
    it too.
    """
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise GenerationError("no prompts given")
    num_tokens = model_num_tokens(model)
    if tokenizer is not None:
        num_tokens = min(num_tokens, num_token_ids(tokenizer))
    ids = prompt_token_ids(prompts, tokenizer, max_new_tokens, model.max_positions, names, num_tokens)
    stop_ids = resolve_stop_ids(stop, num_tokens, tokenizer, stop_at_eos)
    # Padded with -1 (never generated) to a multiple of 8, so the stop list rarely changes the compiled shape.
    width = max(8, -(-len(stop_ids) // 8) * 8)
    stop_ids_Z = jnp.asarray(stop_ids + [-1] * (width - len(stop_ids)), jnp.int32)
    batch_size = batch_size or len(ids)
    rng = jax.random.key(seed)
    results = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
        length = data_lib.bucket_length(max(map(len, rows)), MIN_BUCKET)
        tokens_BxP, mask_BxP = data_lib.pad_batch(rows, length, left=True)
        out = jax.device_get(decode(model, params, tokens_BxP, mask_BxP, stop_ids_Z,
                                    jax.random.fold_in(rng, start), max_new_tokens=max_new_tokens, sampling=sampling,
                                    # None when nothing is masked: one compiled function with or without a tokenizer
                                    num_tokens=num_tokens if num_tokens < model.vocab_size else None))
        for r in range(len(chunk)):
            toks = [int(t) for t in out.tokens_BxM[r, :int(out.num_B[r])]]
            stopped = bool(out.stopped_B[r])
            text = None
            if tokenizer is not None:
                text = tokenizer.decode(toks[:-1] if stopped else toks, skip_special_tokens=True)
            results.append(Generation(tokens=toks, text=text, num_generated=len(toks), stopped=stopped))
    return results
