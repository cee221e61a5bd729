"""Examples -> token arrays: the one place text is tokenized for training and scoring.

Records are JSONL lines of `{"prompt": str, "target": str}` (loss/score on the target
only) or `{"text": str}` (loss on everything).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np


class DataError(ValueError):
    """A data file or record that cannot be used."""


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not ({"prompt", "target"} <= rec.keys() or "text" in rec):
                raise DataError(f'{path}:{n}: expected {{"prompt", "target"}} or {{"text"}}, found {rec!r:.80}')
            records.append(rec)
    if not records:
        raise DataError(f"{path} has no records")
    return records


def encode(tokenizer, record: dict, append_eos: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and a per-token "is target" flag for one record.

    Prompt and target are tokenized separately and concatenated, so the boundary is exact
    whatever the tokenizer merges. The prompt gets the tokenizer's special tokens (e.g. BOS);
    `append_eos` ends the target with EOS (for training models that must learn to stop).
    """
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        target = [True] * len(ids)
    else:
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        tgt = tokenizer(record["target"], add_special_tokens=False)["input_ids"]
        ids, target = prompt + tgt, [False] * len(prompt) + [True] * len(tgt)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise DataError("append_eos needs a tokenizer with an EOS token")
        ids, target = ids + [tokenizer.eos_token_id], target + [True]
    return ids, target


def pad_batch(seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0, left: bool = False,
              flags: Iterable[Sequence[bool]] | None = None):
    """Pads token lists to `length`.

    Returns tokens_BxT (int32), mask_BxT (True on real tokens) and, if `flags` is given,
    flags_BxT (the per-token flags, False on padding). Raises if a sequence is too long.
    """
    b = len(seqs)
    tokens = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    out_flags = np.zeros((b, length), bool)
    flags = list(flags) if flags is not None else None
    for r, seq in enumerate(seqs):
        n = len(seq)
        if n > length:
            raise DataError(f"sequence {r} has {n} tokens, more than the length {length}")
        sl = slice(length - n, length) if left else slice(0, n)
        tokens[r, sl] = seq
        mask[r, sl] = True
        if flags is not None:
            out_flags[r, sl] = flags[r]
    return (tokens, mask, out_flags) if flags is not None else (tokens, mask)
