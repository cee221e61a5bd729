"""Loading a trained composition: the steps, the wiring and Θ_C of a `train.compose` run
directory or of an export, refused unless given the base models it was trained with.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from calm_jax import composition as comp
from calm_jax import records
from calm_jax.checkpoint.export_format import read_export, read_theta
from calm_jax.checkpoint.fingerprints import BaseModelMismatch, check_bases, fingerprint
from calm_jax.checkpoint.runs import open_manager, read_bases
from calm_jax.checkpoint.wiring import COMPOSITION_FILE, composition_layout, composition_record
from calm_jax.config import ModelConfig
from calm_jax.loading import CheckpointError


def composition_steps(run_dir: str) -> list[int]:
    """The checkpoint steps kept in a `train.compose` run directory, in order (an export: its
    one step). Reads no weights. Raises CheckpointError when there is none."""
    export = read_export(run_dir)
    if export is not None:
        return [export["step"]]
    if not os.path.isfile(os.path.join(run_dir, COMPOSITION_FILE)):
        raise CheckpointError(f"{run_dir} is not a train.compose run directory nor an export "
                              f"(no {COMPOSITION_FILE})")
    steps = []
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        manager = open_manager(run_dir)
        steps = sorted(manager.all_steps())
        manager.close()
    if not steps:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    return steps


def composition_step(run_dir: str, step: int | None = None) -> int:
    """The checkpoint step `load_theta` reads from a `train.compose` run directory or an
    export: `step`, checked to exist, or the latest (an export holds one step). Reads no
    weights. Raises CheckpointError."""
    export = read_export(run_dir)
    if export is not None:
        if step is not None and step != export["step"]:
            raise CheckpointError(f"{run_dir} is an export of step {export['step']} only; it has no step {step}")
        return export["step"]
    steps = composition_steps(run_dir)
    if step is not None and step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint for step {step} (has {steps})")
    return steps[-1] if step is None else step


def saved_composition(run_dir: str) -> tuple[dict, dict, dict | None]:
    """(composition record, {name: fingerprint} of its base models, the export record or None
    for a run directory) of a run directory or an export. Reads no weights."""
    export = read_export(run_dir)
    if export is not None:
        return export["composition"], {name: b["fingerprint"] for name, b in export["bases"].items()}, export
    path = os.path.join(run_dir, COMPOSITION_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} is not a train.compose run directory nor an export "
                              f"(no {COMPOSITION_FILE})")
    return composition_layout(records.read(path, CheckpointError), path), read_bases(run_dir), None


def check_wiring(run_dir: str, ccfg) -> None:
    """Raises BaseModelMismatch naming every field (connections, heads, options, dtype) in which
    the composition of a run directory or export is wired differently from `ccfg`. Reads no
    weights; CheckpointError if `run_dir` is neither."""
    record = saved_composition(run_dir)[0]
    diffs = records.diff(record, records.jsonable(composition_record(ccfg)), was="trained with", now="given")
    if diffs:
        raise BaseModelMismatch(f"{run_dir} holds a composition wired differently: {'; '.join(diffs)}")


def load_theta(run_dir: str, anchor, augments, step: int | None = None):
    """(CompositionConfig, Θ_C) of a trained `train.compose` run, or of its export
    (`export_composition`), for evaluation, generation or further training.

    anchor, augments: the frozen models, each a `Pretrained` (config and params: the configs
      and the content hashes are checked) or a bare ModelConfig (only the config is checked).
    step: which checkpoint (default: the latest; an export has one). Raises BaseModelMismatch
      on other models, CheckpointError on a missing, truncated or corrupt Θ_C.
    """
    step = composition_step(run_dir, step)
    record, saved, export = saved_composition(run_dir)
    models = [anchor, *augments]
    given = {}
    for name, m in zip(["anchor"] + [f"augment_{k}" for k in range(len(augments))], models):
        if isinstance(m, ModelConfig):
            given[name] = {"config": fingerprint(m, {})["config"], "hash": saved.get(name, {}).get("hash")}
        else:
            given[name] = fingerprint(m.config, m.params)
    check_bases(saved, given, f"composition {run_dir}")
    cfgs = [m if isinstance(m, ModelConfig) else m.config for m in models]
    ccfg = comp.CompositionConfig(anchor=cfgs[0], augments=tuple(cfgs[1:]),
                                  connections=tuple(tuple(map(tuple, p)) for p in record["connections"]),
                                  options=comp.CompositionOptions(**record["options"]),
                                  **{k: record[k] for k in ("num_heads", "dtype") if k in record})
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    theta_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                jax.eval_shape(lambda: comp.init_theta(ccfg, jax.random.key(0))))
    if export is not None:
        return ccfg, read_theta(run_dir, export, theta_shapes, device)
    manager = open_manager(run_dir)
    # Only Θ_C is read; the optimizer state stays on disk.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"trainable": theta_shapes}, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args({"trainable": theta_shapes}))))
    manager.close()
    return ccfg, restored["state"]["trainable"]
