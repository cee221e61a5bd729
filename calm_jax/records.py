"""JSON records that say what a directory holds, written once and checked on every reuse.

A run directory (or any trained artefact) keeps a small JSON record of what made it: the
base models (checkpoint's bases.json), how Θ_C is wired (composition.json), a recipe. The
first use writes it; every later use must ask for the same thing, or it is refused with
every field that differs named:

    check_or_write(path, record, what="another recipe")
    # -> RecordMismatch: "RUN/recipe.json holds another recipe: lr: made with 0.001, asked for 0.003"
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping


class RecordMismatch(ValueError):
    """A saved record that differs from the one asked for."""


def jsonable(record: Any) -> Any:
    """`record` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(record))


def diff(saved: Mapping, given: Mapping, *, was: str = "made with", now: str = "asked for",
         prefix: str = "") -> list[str]:
    """"FIELD: {was} X, {now} Y" for every field whose value differs, in sorted order.

    Mappings on both sides are compared field by field, their fields named with dots
    ("options.gate"); any other value (a list, a number, ...) is compared whole. A field
    absent on one side counts as None there, so a field added later with the value None does
    not differ from a record that predates it.
    """
    out = []
    for key in sorted(set(saved) | set(given), key=str):
        a, b = saved.get(key), given.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff(a, b, was=was, now=now, prefix=f"{name}.")
        elif a != b:
            out.append(f"{name}: {was} {a!r}, {now} {b!r}")
    return out


def write_record(path: str, record: Any) -> None:
    """`record` as indented JSON at `path`, whole or not at all: written to a temporary file
    beside it, then renamed over it (parent directories are made)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: str, error: type[Exception] = RecordMismatch) -> Any:
    """The record at `path`; a file that is not JSON raises `error` naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise error(f"{path} is not a readable JSON record ({e})") from None


def check_or_write(path: str, record: Mapping, *, what: str = "a different record",
                   error: type[Exception] = RecordMismatch,
                   mismatch: Callable[[list[str]], Exception] | None = None,
                   was: str = "made with", now: str = "asked for",
                   upgrade: Callable[[Any], Any] | None = None,
                   check: Callable[[Any, Any], None] | None = None,
                   write: bool = True) -> None:
    """Writes `record` (JSON) to `path` if there is none; else checks that the saved one is the same.

    Absent: written atomically (a temporary file renamed over `path`, parent directories made)
      when `write` (False on all but one process of a multi-process run, which then only check).
    Present: the saved record, passed through `upgrade` (an older layout -> the current one;
      the file is left as it is) first, is compared with `record` as JSON reads it back:
      - by `check(saved, record)`, which raises on a difference, when given;
      - else field by field (`diff`, with the words `was` and `now`): any difference raises
        `mismatch(diffs)` when given, else `error(f"{path} holds {what}: {'; '.join(diffs)}")`.
    """
    record = jsonable(record)
    if not os.path.isfile(path):
        if write:
            write_record(path, record)
        return
    saved = read(path, error)
    if upgrade is not None:
        saved = upgrade(saved)
    if check is not None:
        check(saved, record)
        return
    if not isinstance(saved, Mapping):
        raise error(f"{path} holds {what}: a JSON {type(saved).__name__}, not an object")
    diffs = diff(saved, record, was=was, now=now)
    if diffs:
        raise mismatch(diffs) if mismatch is not None else error(f"{path} holds {what}: {'; '.join(diffs)}")
