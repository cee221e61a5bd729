"""Writing an export: Θ_C of one checkpoint of a `train.compose` run alone, with its wiring,
its base models' fingerprints and a README, to share (`python -m train.export`).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from calm_jax import records
from calm_jax.checkpoint.export_format import (EXPORT_FORMAT, EXPORT_VERSION, THETA_FILE, file_sha256, read_export,
                                               theta_tensor_names)
from calm_jax.checkpoint.export_readme import readme_text
from calm_jax.checkpoint.history import recorded
from calm_jax.checkpoint.load import composition_step, load_theta, saved_composition
from calm_jax.checkpoint.runs import open_manager, read_bases
from calm_jax.checkpoint.wiring import COMPOSITION_FILE
from calm_jax.config import ModelConfig
from calm_jax.data import atomic_directory
from calm_jax.loading import CheckpointError


def _config_of(name: str, fp: dict, where: str) -> ModelConfig:
    """The ModelConfig a bases.json fingerprint records (storage dtypes at their defaults)."""
    try:
        return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fp["config"].items()})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: the config of {name} cannot be read by this version: {e}") from e


def _checkpoint_meta(run_dir: str, step: int) -> dict:
    manager = open_manager(run_dir)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()
    return dict(meta or {})


def _training_summary(run_dir: str, step: int, meta: dict) -> dict:
    """What the run's records say of its training up to `step`: the checkpoint's metadata
    (TrainConfig, data file and size, position in the data) and metrics.jsonl's totals."""
    out = {k: meta[k] for k in ("train_config", "data", "train_examples", "eval_data", "data_position", "init_from")
           if k in meta}
    # Every segment's data and schedule, not only the last invocation's settings.
    out["history"] = _history_up_to(meta, step)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            lines = [json.loads(ln) for ln in f if ln.strip()]
        steps = [r for r in lines if "loss" in r and r.get("step", 0) <= step]
        evals = [r for r in lines if "eval_loss" in r and r.get("step", 0) <= step]
        if steps:
            out.update(target_tokens=int(sum(r.get("tokens", 0) for r in steps)), last_loss=steps[-1]["loss"])
        if evals:
            out.update(eval_loss=evals[-1]["eval_loss"], eval_step=evals[-1]["step"])
    return out


def _history_up_to(meta: dict, step: int) -> list[dict]:
    """The run's recorded history (checkpoint.history) up to `step`: its segments, the last ending at `step`."""
    segments = [dict(seg) for seg in recorded(meta, meta.get("train_config", {})) if seg["from_step"] <= step]
    if segments:
        segments[-1]["to_step"] = step
    return segments


def _shareable_modes(directory: str) -> None:
    """Modes as the umask gives new files and directories: tempfile.mkdtemp makes its directory
    0700, and an export is to be read by others where the umask lets them."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, dirs, files in os.walk(directory):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _refuse_out_dir(out_dir: str, force: bool) -> None:
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if not os.listdir(out_dir):
        return
    try:
        is_export = read_export(out_dir) is not None
    except CheckpointError:
        is_export = os.path.isfile(os.path.join(out_dir, THETA_FILE))
    if not is_export:
        raise CheckpointError(f"{out_dir} is not empty and is not an export: nothing is written there "
                              f"(--force replaces only an earlier export)")
    if not force:
        raise CheckpointError(f"{out_dir} already holds an export; give --force to replace it")


def export_composition(run_dir: str, out_dir: str, step: int | None = None, force: bool = False) -> dict:
    """Writes Θ_C of `run_dir`'s checkpoint `step` (default: the latest) to `out_dir`, alone:

      theta.safetensors  every Θ_C tensor, named by `theta_tensor_names`, in the dtype it was
                         trained in (the composition's dtype), bit for bit
      composition.json   {"format", "format_version", "composition": the wiring as the run's
                         composition.json holds it, "bases": {name: {"fingerprint": as the
                         run's bases.json holds it, "trained_with": the path it was trained
                         with, or None}}, "step", "theta": {file, dtype, parameters, bytes,
                         sha256, tensors}, "source": {run_dir, step}, "training": the run's
                         recorded settings, data and losses}
      README.md          what it composes and how to load it

    Written to a temporary directory beside `out_dir`, then renamed into place. A non-empty
    `out_dir` is refused unless it holds an earlier export and `force` is given (then that
    export is replaced); no other directory is ever overwritten. Returns composition.json's
    record. No base-model weights are read or written.
    """
    if read_export(run_dir) is not None:
        raise CheckpointError(f"{run_dir} is an export already; copy the directory to share it")
    step = composition_step(run_dir, step)
    _refuse_out_dir(out_dir, force)
    bases = read_bases(run_dir)
    names = ["anchor"] + [f"augment_{k}" for k in range(len(bases) - 1)]
    if sorted(bases) != sorted(names):
        raise CheckpointError(f"{run_dir}/bases.json names {sorted(bases)}, not a composition's models")
    cfgs = [_config_of(name, bases[name], f"{run_dir}/bases.json") for name in names]
    _, theta = load_theta(run_dir, cfgs[0], cfgs[1:], step)
    record = saved_composition(run_dir)[0]
    meta = _checkpoint_meta(run_dir, step)
    trained_with = [meta.get("anchor"), *(meta.get("augments") or [None] * (len(names) - 1))]
    tensors = {name: np.asarray(jax.device_get(x)) for name, x in theta_tensor_names(theta).items()}
    dtypes = sorted({a.dtype.name for a in tensors.values()})
    export = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
        "composition": record,
        "bases": {name: {"fingerprint": bases[name], "trained_with": path} for name, path in zip(names, trained_with)},
        "step": step,
        "theta": {"file": THETA_FILE, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
                  "parameters": int(sum(a.size for a in tensors.values())),
                  "bytes": int(sum(a.nbytes for a in tensors.values())), "tensors": len(tensors)},
        "source": {"run_dir": os.path.abspath(run_dir), "step": step},
        "training": _training_summary(run_dir, step, meta),
    }
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, THETA_FILE), metadata={"format": "calm_jax.theta", "step": str(step)})
        export["theta"]["sha256"] = file_sha256(os.path.join(tmp, THETA_FILE))
        records.write_record(os.path.join(tmp, COMPOSITION_FILE), export)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(readme_text(export, out_dir))
        _shareable_modes(tmp)
    return export
