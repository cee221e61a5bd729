"""composition.json of a `train.compose` run: how Θ_C is wired (connections, heads, options,
dtype), written once and checked when the run is resumed; the layout of older runs is read
in the current one.
"""

from __future__ import annotations

import os

import jax

from calm_jax import records
from calm_jax.checkpoint.fingerprints import BaseModelMismatch
from calm_jax.composition import CompositionError, CompositionOptions
from calm_jax.loading import CheckpointError


COMPOSITION_FILE = "composition.json"


def composition_record(ccfg) -> dict:
    """composition.json: {"connections", "num_heads", "options": {name: value}, "dtype"}."""
    return {"connections": [[list(p) for p in pairs] for pairs in ccfg.connections], "num_heads": ccfg.num_heads,
            "options": ccfg.options.to_dict(), "dtype": ccfg.dtype}


def composition_layout(saved: dict, path: str) -> dict:
    """A saved composition.json in the current layout, every option present (missing ones at
    their defaults). Runs saved before CompositionOptions hold the options as top-level
    fields; an option name this version does not know raises CheckpointError."""
    saved = dict(saved)
    if "options" not in saved:  # the old flat layout
        saved["options"] = {k: saved.pop(k) for k in CompositionOptions.names() if k in saved}
    if not isinstance(saved["options"], dict):
        raise CheckpointError(f"{path}: 'options' must be a JSON object, found {saved['options']!r}")
    try:
        saved["options"] = CompositionOptions.from_dict(saved["options"], where=path).to_dict()
    except CompositionError as e:
        raise CheckpointError(str(e)) from None
    return saved


def save_composition_config(run_dir: str, ccfg) -> None:
    """Writes how Θ_C is wired (connections, heads, options, dtype) next to the checkpoints.

    If the run directory has one already (a resumed run), it must be the same: raises
    BaseModelMismatch naming the fields that differ.
    """
    path = os.path.join(run_dir, COMPOSITION_FILE)
    records.check_or_write(path, composition_record(ccfg), what="a composition wired differently",
                           error=BaseModelMismatch, was="trained with", now="given",
                           upgrade=lambda saved: composition_layout(saved, path), write=jax.process_index() == 0)
