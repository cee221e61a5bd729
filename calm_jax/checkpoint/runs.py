"""The orbax checkpoints of a training run directory, tied to its base models.

  RUN_DIR/bases.json          which frozen models the run belongs to (their fingerprints)
  RUN_DIR/checkpoints/<step>/ orbax checkpoints ("state": arrays, "meta": JSON)
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
save killed midway is never the latest.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from calm_jax import records
from calm_jax.checkpoint.fingerprints import BaseModelMismatch, check_bases
from calm_jax.loading import CheckpointError


class Checkpoints:
    """The checkpoints of one run directory, tied to its base models.

    bases: {name: fingerprint(...)} of the frozen models (e.g. "anchor", "augment_0"); {}
      for plain LM training. The first use writes RUN_DIR/bases.json; later uses must match.
    keep: how many recent checkpoints to keep.
    """

    def __init__(self, run_dir: str, bases: Mapping[str, dict], keep: int = 3, async_save: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        records.check_or_write(os.path.join(self.run_dir, "bases.json"), dict(bases), error=BaseModelMismatch,
                               check=lambda saved, given: check_bases(saved, given, f"run directory {self.run_dir}"),
                               write=jax.process_index() == 0)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.join(self.run_dir, "checkpoints"), options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(dict(meta))))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step` (default: the latest complete one).

        abstract_state: the state's tree of jax.ShapeDtypeStruct, with `.sharding` where
        the arrays should go.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.run_dir} has no checkpoint")
        if step not in self.manager.all_steps():
            raise CheckpointError(f"{self.run_dir} has no checkpoint for step {step} "
                                  f"(has {sorted(self.manager.all_steps())})")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def meta(self, step: int) -> dict:
        """The metadata (JSON) of checkpoint `step`, with no array read."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for `tree`'s leaves (with the given shardings, if any)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def read_bases(run_dir: str) -> dict:
    path = os.path.join(run_dir, "bases.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} is not a training run directory (no bases.json)")
    return records.read(path, CheckpointError)


def open_manager(run_dir: str):
    """The orbax manager of a run directory's existing checkpoints/, to read them (creates nothing)."""
    return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(create=False), item_names=("state", "meta"))
