"""The tokenizer check: CALM needs the anchor and every augmenting model to share one vocabulary."""

from __future__ import annotations

from typing import Sequence

from calm_jax.composition.config import CompositionError


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
