"""The tokenizer checks: CALM needs the anchor and every augmenting model to share one
tokenizer (`check_vocabularies`), whose every id each model's embedding table has
(`check_tokenizer_fits`; the tables may be padded differently)."""

from __future__ import annotations

from typing import Sequence

from calm_jax.composition.config import CompositionError
from calm_jax.config import ModelConfig


def check_vocabularies(anchor_tokenizer, augment_tokenizers: Sequence) -> None:
    """Raises CompositionError unless every augmenting tokenizer has the anchor's vocabulary.

    Compares the full token -> id maps (`get_vocab()`), not just their sizes, and names the
    first (lowest id) token that differs.
    """
    ref = anchor_tokenizer.get_vocab()
    ref_by_id = {i: t for t, i in ref.items()}
    for k, tok in enumerate(augment_tokenizers):
        other = tok.get_vocab()
        if other == ref:
            continue
        other_by_id = {i: t for t, i in other.items()}
        for i in sorted(set(ref_by_id) | set(other_by_id)):
            if ref_by_id.get(i) != other_by_id.get(i):
                raise CompositionError(
                    f"augmenting model {k}'s tokenizer differs from the anchor's at id {i}: anchor has "
                    f"{ref_by_id.get(i)!r}, augmenting model {k} has {other_by_id.get(i)!r} (vocab sizes "
                    f"{len(ref)} and {len(other)}); CALM needs one shared vocabulary")


def num_token_ids(tokenizer) -> int:
    """The ids `tokenizer` can produce: its largest id + 1, over its whole vocabulary (special
    and added tokens included); `len(tokenizer)` for a tokenizer without gaps in its ids."""
    return max(tokenizer.get_vocab().values()) + 1


def check_tokenizer_fits(tokenizer, anchor: ModelConfig, augments: Sequence[ModelConfig],
                         dirs: Sequence[str | None] | None = None) -> int:
    """Raises CompositionError unless every id of `tokenizer` has a row in every model's
    embedding table (id < the model's vocab_size); returns `num_token_ids(tokenizer)`.

    The models may pad their tables differently (Qwen2.5-0.5B and -Coder-1.5B: 151,936 rows,
    Qwen2.5-7B: 152,064, one tokenizer of 151,665 ids): `CompositionConfig` accepts any
    vocab_size, and this is the check that replaces an equality of sizes, wherever the
    tokenizer is known (`train.compose`, `eval.common.build_model`). The logits are the
    anchor's, all vocab_size of them; decoding and scoring mask its rows >= the tokenizer's
    ids (`calm_jax.decoding`, `calm_jax.scoring`), so no model is ever fed an id it lacks.
    dirs: the models' directories, anchor first, to name them in the message (None: unknown).
    The message names the model, its vocab_size and the first tokenizer id out of its range.
    """
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    dirs = list(dirs) if dirs is not None else []
    for k, cfg in enumerate((anchor, *augments)):
        if n <= cfg.vocab_size:
            continue
        first = min(i for i in vocab.values() if i >= cfg.vocab_size)
        token = next(t for t, i in vocab.items() if i == first)
        who = "the anchor" if k == 0 else f"augmenting model {k - 1}"
        if k < len(dirs) and dirs[k] is not None:
            who += f" ({dirs[k]})"
        raise CompositionError(
            f"{who} has vocab_size {cfg.vocab_size}, but the tokenizer has {n} token ids: token id {first} "
            f"({token!r}) is out of its embedding table (ids 0..{cfg.vocab_size - 1}); every model of a "
            f"composition needs a row for every id of the shared tokenizer")
    return n
