"""Settings changed as "FIELD=VALUE" or "PART.FIELD=VALUE" on a frozen config dataclass: the studies'
`--set` (a preset) and `train.compose`'s `--set`, --config file and flags (its ComposeConfig).

PART is a field of the config that is itself a dataclass (a preset's `train_C`, `options`,
`seeds`; ComposeConfig's `train`, `options`). VALUE is a Python literal; a bare word is taken as
a string.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Mapping, Sequence


class OverrideError(ValueError):
    """An override that names no field, or is not FIELD=VALUE."""


def parse(item: str) -> tuple[str, Any]:
    """"FIELD=VALUE" -> (FIELD, the literal VALUE). Raises OverrideError."""
    key, sep, text = item.partition("=")
    if not sep:
        raise OverrideError(f"override {item!r} is not FIELD=VALUE")
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text


def _target(config, key: str, item: str):
    part, _, field = key.rpartition(".")
    if part and not dataclasses.is_dataclass(getattr(config, part, None)):
        parts = [f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))]
        raise OverrideError(f"override {item!r}: {part!r} is not one of {', '.join(parts)}")
    target = getattr(config, part) if part else config
    names = {f.name for f in dataclasses.fields(target)}
    if field not in names:
        raise OverrideError(f"override {item!r}: {type(target).__name__} has no field {field!r}; "
                            f"fields: {', '.join(sorted(names))}")
    return part, field


def replace_fields(config, changes: Mapping[str, Any]):
    """`config` with {"FIELD" or "PART.FIELD": value} applied at once: one `dataclasses.replace`
    per part, so a dataclass that checks its fields together sees all its new values together.
    Raises OverrideError on an unknown field; the dataclasses' own checks raise what they raise."""
    by_part: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        part, field = _target(config, key, f"{key}={value!r}")
        by_part.setdefault(part, {})[field] = value
    top = by_part.pop("", {})
    parts = {part: dataclasses.replace(getattr(config, part), **fields) for part, fields in by_part.items()}
    return dataclasses.replace(config, **top, **parts)


def apply_overrides(config, overrides: Sequence[str] = ()):
    """`config` with "FIELD=VALUE" or "PART.FIELD=VALUE" overrides applied, one after the other.
    Raises ValueError (OverrideError for a bad override) naming it."""
    for item in overrides:
        key, value = parse(item)
        part, field = _target(config, key, item)
        if part:
            config = dataclasses.replace(config, **{part: dataclasses.replace(getattr(config, part), **{field: value})})
        else:
            config = dataclasses.replace(config, **{field: value})
    return config
