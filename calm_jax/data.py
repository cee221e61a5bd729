"""Examples -> token arrays: the one place text is tokenized for training and scoring.

Records are JSONL lines of `{"prompt": str, "target": str}` (loss/score on the target
only) or `{"text": str}` (loss on everything). For training, a file is tokenized once
into fixed-length arrays (`load_dataset`) and read in a seeded order that is a pure
function of (seed, position) (`batch_at`), so resuming needs only the saved position.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np


class DataError(ValueError):
    """A data file or record that cannot be used."""


class Record(dict):
    """A JSONL record that remembers where it was read (`path`, 1-based `line`), for error messages."""

    path: str = ""
    line: int = 0


def where(record: dict, index: int, kind: str = "record") -> str:
    """How an error names a record: "FILE: line N" for one read by `read_jsonl`, else "KIND INDEX"
    (a 0-based index into the caller's list)."""
    if isinstance(record, Record):
        return f"{record.path}: line {record.line}"
    return f"{kind} {index}"


MAX_NAMED = 20  # bad lines an error message names one by one; the rest are counted


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_jsonl(path: str, require: tuple[str, ...] | None = None, *, skip_invalid: bool = False,
               log: Callable[[str], None] = log_to_stderr) -> list[dict]:
    """The records of a JSONL file (as `Record`s); other fields are kept.

    require: string fields every record must have (default: "prompt" and "target", or "text").
    Read as UTF-8 (a leading byte-order mark is skipped). Every bad line (not UTF-8, not JSON, a
    field missing or not a string) is found before anything is returned: all of them are named
    in one DataError (the first MAX_NAMED, with the total count), or, with `skip_invalid`, left
    out and counted in one `log` line.
    """
    records, problems = _read_records(path, require)
    return keep_valid(path, records, problems, skip_invalid, log)


def _read_records(path: str, require: tuple[str, ...] | None) -> tuple[list, list]:
    """(the good records, [(line, message)] of the bad ones) of a JSONL file."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    records, problems = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append((n, f", byte {e.start + 1}: not UTF-8 (0x{raw[e.start]:02x})"))
                continue
            if not line.strip():
                continue
            message, rec = _check_record(line, require)
            if message:
                problems.append((n, message))
                continue
            record = Record(rec)
            record.path, record.line = path, n
            records.append(record)
    if not records and not problems:
        raise DataError(f"{path} has no records")
    return records, problems


def _check_record(line: str, require: tuple[str, ...] | None) -> tuple[str | None, dict | None]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e})", None
    if require is None:
        ok = isinstance(rec, dict) and ({"prompt", "target"} <= rec.keys() or "text" in rec)
        want = '{"prompt", "target"} or {"text"}'
        fields = ("text",) if ok and "text" in rec else ("prompt", "target")
    else:
        ok = isinstance(rec, dict) and all(k in rec for k in require)
        want = f"a JSON object with string field(s) {', '.join(require)}"
        fields = require
    if not ok:
        return f"expected {want}, found {line.strip()[:80]}", None
    for k in fields:
        if not isinstance(rec[k], str):
            return (f"field {k!r} must be a string, found {type(rec[k]).__name__} "
                    f"{json.dumps(rec[k])[:40]}"), None
    return None, rec


def keep_valid(path: str, items: list, problems: list[tuple[int | str, str]], skip: bool,
               log: Callable[[str], None] = log_to_stderr, what: str = "invalid",
               flag: str = "--skip-invalid") -> list:
    """`items` (the good records of the file `path`) when there are no `problems`: [(line, message)]
    (or (name, message) for records not read from a file). Otherwise, with `skip`: `items` and
    one `log` line counting and naming the records left out; without: a DataError naming every
    problem as "FILE: line N: message" (the first MAX_NAMED, and how many more)."""
    if not problems:
        return items
    total = len(items) + len(problems)
    problems = sorted(problems, key=lambda p: (isinstance(p[0], str), p[0]))
    more = len(problems) - MAX_NAMED
    if skip:
        named = ", ".join(str(n) for n, _ in problems[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")
        log(f"{path}: left out {len(problems)} {what} of {total} records ({flag}): "
            + (f"line{'s' * (len(problems) > 1)} " if isinstance(problems[0][0], int) else "") + named)
        if not items:
            raise DataError(f"{path}: all {total} records are {what}; nothing is left")
        return items
    lines = [(f"{path}: line {at}" if isinstance(at, int) else at) + ("" if message[:1] in ", " else ": ") + message
             for at, message in problems[:MAX_NAMED]]
    if len(problems) == 1:
        raise DataError(lines[0])
    raise DataError(f"{path}: {len(problems)} of {total} records are {what} ({flag} leaves them out):\n  "
                    + "\n  ".join(lines + ([f"... and {more} more"] if more > 0 else [])))


def check_writable(path: str, directory: bool = False, what: str = "--out") -> None:
    """Makes sure `path` can be written, before any work whose result goes there: a file (not a
    directory) or, with `directory`, a directory (not a file). Nothing is created: the nearest
    directory that exists (`path`'s own, or the one its missing directories would be made in) is
    probed by creating and removing a file in it. Raises DataError saying what `path` is and why
    it cannot be written."""
    if directory != os.path.isdir(path) and os.path.exists(path):
        raise DataError(f"{what} {path} is {'a file; give a directory' if directory else 'a directory; give a file'}")
    folder = os.path.abspath(path if directory else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"{folder} is a file, not a directory")
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
        if not directory and os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")  # a rename over it would work: refused, as protected
    except OSError as e:
        raise DataError(f"{what} {path} cannot be written ({e.strerror or e}"
                        + (f": {e.filename}" if e.filename else "") + "); nothing was run") from e


def write_text(path: str, text: str) -> None:
    """Writes `path` whole or not at all (a temporary file renamed over it): an interrupted
    run never leaves a half-written file, nor loses what a file held before."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a fresh temporary directory beside `path` to write into; when the block ends
    without an error it is renamed to `path` (an existing `path` replaced whole), on an error
    it is removed: a directory is written whole or not at all."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".writing-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            os.rename(path, os.path.join(old, "old"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept), written whole or not at all."""
    write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def write_json(path: str, content) -> None:
    """`content` as indented JSON, written whole or not at all."""
    write_text(path, json.dumps(content, indent=1))


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


def bucket_length(n: int, minimum: int, cap: int | None = None) -> int:
    """A padded length for an n-token sequence: the next power of two >= `minimum`, at most `cap`.

    Few distinct lengths means few compilations of the jitted callers.
    """
    length = max(minimum, 1 << (n - 1).bit_length())
    return length if cap is None else min(length, cap)


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


class Position(NamedTuple):
    """Where the training stream stands: `index` examples of epoch `epoch` consumed."""

    epoch: int
    index: int


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A tokenized JSONL file, every example padded (right) to `seq_len`.

    tokens_NxT (int32), mask_NxT (True on real tokens), target_NxT (True where the token
    is scored: the target of a prompt/target record, every token of a text record).
    """

    path: str
    tokens_NxT: np.ndarray
    mask_NxT: np.ndarray
    target_NxT: np.ndarray

    def __len__(self) -> int:
        return self.tokens_NxT.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens_NxT.shape[1]


def load_dataset(path: str, tokenizer, seq_len: int, append_eos: bool = True, *, skip_invalid: bool = False,
                 truncate: bool = False, log: Callable[[str], None] = log_to_stderr) -> Dataset:
    """Reads and tokenizes a JSONL file (see `encode`).

    Every problem of the file (a bad line, see `read_jsonl`; an example longer than seq_len; one
    with no target token to learn from) is named in one DataError, unless:
      truncate: an example longer than seq_len is cut to its first seq_len tokens (its EOS, if
        appended, goes with the cut); one `log` line counts them;
      skip_invalid: the bad lines, the examples left with no target token and (without
        `truncate`) the overlong ones are left out; one `log` line counts them.
    """
    records, problems = _read_records(path, None)
    total = len(records) + len(problems)
    seqs, flags, cut = [], [], []
    for rec in records:
        ids, target = encode(tokenizer, rec, append_eos)
        long = len(ids) > seq_len
        if long and not truncate:
            problems.append((rec.line, f" has {len(ids)} tokens, more than the sequence length {seq_len} "
                                       "(--truncate cuts it)"))
            continue
        if long:
            cut.append(rec.line)
            ids, target = ids[:seq_len], target[:seq_len]
        if not any(target[1:]):
            problems.append((rec.line, " has no target token to learn from ("
                                       + ("all cut away by --truncate)" if long else "empty target?)")))
            continue
        seqs.append(ids)
        flags.append(target)
    keep_valid(path, seqs, problems, skip_invalid, log)
    if cut:
        log(f"{path}: cut {len(cut)} of {total} examples to the sequence length {seq_len} "
            f"(--truncate): line{'s' * (len(cut) > 1)} {', '.join(map(str, cut[:MAX_NAMED]))}"
            + (f" and {len(cut) - MAX_NAMED} more" if len(cut) > MAX_NAMED else ""))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    tokens, mask, target = pad_batch(seqs, seq_len, pad_id=pad_id, flags=flags)
    return Dataset(path, tokens, mask, target)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of examples for one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(ds: Dataset, position: Position, batch_size: int, seed: int) -> tuple[dict, Position]:
    """The training batch starting at `position`, and the position after it.

    Examples are drawn from a stream of seeded epoch permutations; a batch may run across
    an epoch boundary. Nothing else is remembered, so a run resumed from a saved position
    sees exactly the batches an uninterrupted run would.
    Returns {"tokens_BxT", "mask_BxT", "target_BxT"} as numpy arrays.
    """
    epoch, index = position
    rows = []
    while len(rows) < batch_size:
        take = epoch_order(len(ds), seed, epoch)[index:index + batch_size - len(rows)]
        rows.extend(take)
        index += len(take)
        if index == len(ds):
            epoch, index = epoch + 1, 0
    rows = np.asarray(rows)
    return _rows(ds, rows), Position(epoch, index)


def packed_batch_at(ds: Dataset, position: Position, batch_size: int, seed: int) -> tuple[dict, Position]:
    """`batch_at` with packed rows: examples from the same stream, taken in order, each laid
    in the first of the `batch_size` rows (of ds.seq_len slots) with room for it, after what
    that row holds; the first example that fits no row starts the next batch.

    Returns `batch_at`'s arrays plus "segment_BxT" (int32: 1, 2, ... per example along each
    row, 0 on padding: the models' attention and the loss stay within a segment) and the
    position after the last packed example; a function of the position only, as batch_at.
    """
    epoch, index = position
    t = ds.seq_len
    tokens = np.zeros((batch_size, t), ds.tokens_NxT.dtype)
    mask, target = np.zeros((batch_size, t), bool), np.zeros((batch_size, t), bool)
    segment = np.zeros((batch_size, t), np.int32)
    used, segs = np.zeros(batch_size, int), np.zeros(batch_size, int)
    order = epoch_order(len(ds), seed, epoch)
    while True:
        i = order[index]
        n = int(ds.mask_NxT[i].sum())  # right-padded: the example is its first n slots
        room = np.flatnonzero(used + n <= t)
        if not len(room):
            break
        r = room[0]
        segs[r] += 1
        sl = slice(used[r], used[r] + n)
        tokens[r, sl], mask[r, sl], target[r, sl] = ds.tokens_NxT[i, :n], True, ds.target_NxT[i, :n]
        segment[r, sl] = segs[r]
        used[r] += n
        index += 1
        if index == len(ds):
            epoch, index = epoch + 1, 0
            order = epoch_order(len(ds), seed, epoch)
    return ({"tokens_BxT": tokens, "mask_BxT": mask, "target_BxT": target, "segment_BxT": segment},
            Position(epoch, index))


def eval_batches(ds: Dataset, batch_size: int) -> Iterator[dict]:
    """The whole file in order; the last batch is filled with empty rows (nothing scored)."""
    for start in range(0, len(ds), batch_size):
        rows = np.arange(start, start + batch_size)
        batch = _rows(ds, np.minimum(rows, len(ds) - 1))
        batch["mask_BxT"][rows >= len(ds)] = False
        batch["target_BxT"][rows >= len(ds)] = False
        yield batch


def _rows(ds: Dataset, rows: np.ndarray) -> dict:
    return {"tokens_BxT": ds.tokens_NxT[rows], "mask_BxT": ds.mask_NxT[rows], "target_BxT": ds.target_NxT[rows]}
