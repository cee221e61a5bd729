"""Training checkpoints: the trained parameters, optimizer state, step, RNG and data position.

Layout of a run directory:
  RUN_DIR/bases.json          which frozen models the run belongs to (configs + content hashes)
  RUN_DIR/composition.json    how Θ_C is wired (train.compose runs: connections, heads, options)
  RUN_DIR/checkpoints/<step>/ orbax checkpoints ("state": arrays, "meta": JSON)
The frozen models are never written; a checkpoint is only restored against base models
whose fingerprint matches bases.json (both JSON records: calm_jax.records). Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a save killed midway is never the latest.

An export (`export_composition`, `python -m train.export`) is Θ_C of one checkpoint alone,
to share: EXPORT_DIR/theta.safetensors, EXPORT_DIR/composition.json (the wiring, each base
model's fingerprint as bases.json holds it, the step, what it was trained on) and a README.md.
`load_composition`, `composition_step` and `check_wiring` take an export wherever they take
a run directory, with the same refusal of other base models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from calm_jax import records
from calm_jax.config import ModelConfig
from calm_jax.data import atomic_directory
from calm_jax.loading import CheckpointError

# Config fields that say how a model is stored or computed, not which model it is.
_STORAGE_FIELDS = ("dtype", "param_dtype")
_MIX = np.uint32(2654435761)  # Knuth's multiplicative hash constant


class BaseModelMismatch(CheckpointError):
    """A run resumed or loaded against frozen models other than the ones it was trained with."""


_ROUNDINGS = (jnp.bfloat16, jnp.float16)  # the order of the sums _checksums gives per tensor


def _checksums(tree):
    # Integer sums wrap mod 2**32 exactly in any order, so the result does not depend on
    # how the weights are sharded. Values are rounded to bf16 first, so a model stored in
    # bf16 matches its fp32 original; a second pair of sums over fp16-rounded values lets a
    # model stored in fp16 match its fp32 original too (rounding fp16 to bf16 is not the
    # same as rounding fp32 to bf16, so the bf16 sums cannot).
    def one(x_N):
        weight = None
        sums = []
        for dtype in _ROUNDINGS:
            bits = jax.lax.bitcast_convert_type(x_N.astype(dtype), jnp.uint16).astype(jnp.uint32).ravel()
            weight = jnp.arange(bits.size, dtype=jnp.uint32) * _MIX + np.uint32(1) if weight is None else weight
            sums += [jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)]
        return jnp.stack(sums)
    return jax.tree.map(one, tree)


_checksums_jit = jax.jit(_checksums)


def _content_hashes(params) -> dict:
    """{rounding dtype name: hash}; see content_hash."""
    sums = [np.asarray(s.addressable_data(0)) for s in jax.tree.leaves(_checksums_jit(params))]
    out = {}
    for k, dtype in enumerate(_ROUNDINGS):
        h = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            h.update(f"{jax.tree_util.keystr(path)}:{tuple(np.shape(leaf))};".encode())
        for s in sums:
            h.update(s[2 * k:2 * k + 2].tobytes())
        out[jnp.dtype(dtype).name] = h.hexdigest()[:16]
    return out


def content_hash(params, rounding: str = "bfloat16") -> str:
    """A deterministic hash of a parameter tree's names, shapes and values rounded to `rounding`
    ("bfloat16" or "float16").

    One pass over the weights on their own devices; only four integers per tensor leave them.
    """
    return _content_hashes(params)[rounding]


def _storage_dtype(params) -> str | None:
    dtypes = {jnp.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    return dtypes.pop() if len(dtypes) == 1 else None


def fingerprint(cfg: ModelConfig, params) -> dict:
    """{"config": the architecture fields of `cfg`, "hash": content_hash(params) (bf16-rounded),
    "hash_float16": the fp16-rounded one, "param_dtype": how the weights are stored}; JSON-ready.

    Two fingerprints are the same models if their configs and either hash agree: storage in
    fp32, bf16 or (against fp32) fp16 does not change the identity; the storage dtype only
    explains a mismatch.
    """
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _STORAGE_FIELDS}
    hashes = _content_hashes(params)
    return json.loads(json.dumps({"config": config, "hash": hashes["bfloat16"], "hash_float16": hashes["float16"],
                                  "param_dtype": _storage_dtype(params)}))


def _same_weights(saved: dict, given: dict) -> bool:
    if saved["hash"] == given["hash"]:
        return True
    # bases.json files written before the fp16 hash existed have none.
    return saved.get("hash_float16") is not None and saved.get("hash_float16") == given.get("hash_float16")


def check_bases(saved: Mapping[str, dict], given: Mapping[str, dict], where: str) -> None:
    """Raises BaseModelMismatch naming every difference between two {name: fingerprint} maps."""
    problems = []
    if list(saved) != list(given):
        problems.append(f"the run was trained with models {list(saved)}, given {list(given)}")
    for name in saved:
        if name not in given:
            continue
        diffs = records.diff(saved[name]["config"], given[name]["config"], was="trained with", now="given")
        if diffs:
            problems.append(f"{name} config differs ({'; '.join(diffs)})")
        elif not _same_weights(saved[name], given[name]):
            was, now = saved[name].get("param_dtype"), given[name].get("param_dtype")
            if was and now and was != now:
                problems.append(f"{name} has the same config, but its weights are stored in {now} here and were "
                                f"{was} in training, and the content hashes cannot compare these two dtypes; "
                                f"load it with {was} weights to check it")
            else:
                problems.append(f"{name} has the same config but different weights "
                                f"(content hash {given[name]['hash']}, trained with {saved[name]['hash']})")
    if problems:
        raise BaseModelMismatch(f"{where} belongs to other base models:\n  " + "\n  ".join(problems))


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


# --- compositions ---------------------------------------------------------------------

_COMPOSITION_FILE = "composition.json"


def composition_bases(anchor, augments) -> dict:
    """{"anchor": fingerprint, "augment_0": ..., ...} of Pretrained-like models (.config, .params)."""
    out = {"anchor": fingerprint(anchor.config, anchor.params)}
    out.update({f"augment_{k}": fingerprint(a.config, a.params) for k, a in enumerate(augments)})
    return out


def _composition_record(ccfg) -> dict:
    """composition.json: {"connections", "num_heads", "options": {name: value}, "dtype"}."""
    return {"connections": [[list(p) for p in pairs] for pairs in ccfg.connections], "num_heads": ccfg.num_heads,
            "options": ccfg.options.to_dict(), "dtype": ccfg.dtype}


def _composition_layout(saved: dict, path: str) -> dict:
    """A saved composition.json in the current layout, every option present (missing ones at
    their defaults). Runs saved before CompositionOptions hold the options as top-level
    fields; an option name this version does not know raises CheckpointError."""
    from calm_jax.composition import CompositionError, CompositionOptions

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
    path = os.path.join(run_dir, _COMPOSITION_FILE)
    records.check_or_write(path, _composition_record(ccfg), what="a composition wired differently",
                           error=BaseModelMismatch, was="trained with", now="given",
                           upgrade=lambda saved: _composition_layout(saved, path), write=jax.process_index() == 0)


def _manager(run_dir: str):
    return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(create=False), item_names=("state", "meta"))


def composition_steps(run_dir: str) -> list[int]:
    """The checkpoint steps kept in a `train.compose` run directory, in order (an export: its
    one step). Reads no weights. Raises CheckpointError when there is none."""
    export = _read_export(run_dir)
    if export is not None:
        return [export["step"]]
    if not os.path.isfile(os.path.join(run_dir, _COMPOSITION_FILE)):
        raise CheckpointError(f"{run_dir} is not a train.compose run directory nor an export "
                              f"(no {_COMPOSITION_FILE})")
    steps = []
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        manager = _manager(run_dir)
        steps = sorted(manager.all_steps())
        manager.close()
    if not steps:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    return steps


def composition_step(run_dir: str, step: int | None = None) -> int:
    """The checkpoint step `load_composition` reads from a `train.compose` run directory or an
    export: `step`, checked to exist, or the latest (an export holds one step). Reads no
    weights. Raises CheckpointError."""
    export = _read_export(run_dir)
    if export is not None:
        if step is not None and step != export["step"]:
            raise CheckpointError(f"{run_dir} is an export of step {export['step']} only; it has no step {step}")
        return export["step"]
    steps = composition_steps(run_dir)
    if step is not None and step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint for step {step} (has {steps})")
    return steps[-1] if step is None else step


def _saved(run_dir: str) -> tuple[dict, dict, dict | None]:
    """(composition record, {name: fingerprint} of its base models, the export record or None
    for a run directory) of a run directory or an export. Reads no weights."""
    export = _read_export(run_dir)
    if export is not None:
        return export["composition"], {name: b["fingerprint"] for name, b in export["bases"].items()}, export
    path = os.path.join(run_dir, _COMPOSITION_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} is not a train.compose run directory nor an export "
                              f"(no {_COMPOSITION_FILE})")
    return _composition_layout(records.read(path, CheckpointError), path), read_bases(run_dir), None


def check_wiring(run_dir: str, ccfg) -> None:
    """Raises BaseModelMismatch naming every field (connections, heads, options, dtype) in which
    the composition of a run directory or export is wired differently from `ccfg`. Reads no
    weights; CheckpointError if `run_dir` is neither."""
    record = _saved(run_dir)[0]
    diffs = records.diff(record, records.jsonable(_composition_record(ccfg)), was="trained with", now="given")
    if diffs:
        raise BaseModelMismatch(f"{run_dir} holds a composition wired differently: {'; '.join(diffs)}")


def load_composition(run_dir: str, anchor, augments, step: int | None = None):
    """(CompositionConfig, Θ_C) of a trained `train.compose` run, or of its export
    (`export_composition`), for evaluation, generation or further training.

    anchor, augments: the frozen models, each a `Pretrained` (config and params: the configs
      and the content hashes are checked) or a bare ModelConfig (only the config is checked).
    step: which checkpoint (default: the latest; an export has one). Raises BaseModelMismatch
      on other models, CheckpointError on a missing, truncated or corrupt Θ_C.
    """
    from calm_jax import composition as comp

    step = composition_step(run_dir, step)
    record, saved, export = _saved(run_dir)
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
        return ccfg, _read_theta(run_dir, export, theta_shapes, device)
    manager = _manager(run_dir)
    # Only Θ_C is read; the optimizer state stays on disk.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"trainable": theta_shapes}, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args({"trainable": theta_shapes}))))
    manager.close()
    return ccfg, restored["state"]["trainable"]


# --- exports: Θ_C alone, to share -------------------------------------------------------

EXPORT_FORMAT = "calm_jax.composition-export"
EXPORT_VERSION = 1
THETA_FILE = "theta.safetensors"


def theta_tensor_names(theta) -> dict[str, Any]:
    """{name: leaf} of a Θ_C tree, each name its tree path joined with "/"
    ("augment_0/conn_1/q/kernel"): the tensor names of an export's theta.safetensors."""
    return {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(theta).items()}


def _sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _read_export(path: str) -> dict | None:
    """The composition.json record of an export directory; None for anything else (a run
    directory, a missing one). A directory with theta.safetensors whose composition.json is
    missing, unreadable or of another format raises CheckpointError."""
    record_path = os.path.join(path, _COMPOSITION_FILE)
    has_theta = os.path.isfile(os.path.join(path, THETA_FILE))
    if not os.path.isfile(record_path):
        if has_theta:
            raise CheckpointError(f"{path} has {THETA_FILE} but no {_COMPOSITION_FILE}: not a complete export")
        return None
    record = records.read(record_path, CheckpointError)
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        if has_theta:
            raise CheckpointError(f"{record_path} is not the composition.json of an export "
                                  f"(no \"format\": \"{EXPORT_FORMAT}\")")
        return None
    if record.get("format_version") != EXPORT_VERSION:
        raise CheckpointError(f"{record_path}: export format version {record.get('format_version')!r}; this "
                              f"version of calm_jax reads version {EXPORT_VERSION}")
    missing = [k for k in ("composition", "bases", "step", "theta") if k not in record]
    if missing:
        raise CheckpointError(f"{record_path} has no {', '.join(repr(k) for k in missing)}")
    if not has_theta:
        raise CheckpointError(f"{path} is an export without its {THETA_FILE}")
    record["composition"] = _composition_layout(record["composition"], record_path)
    return record


def _read_theta(path: str, export: dict, shapes, device):
    """Θ_C from an export's theta.safetensors, every tensor checked against the composition's
    Θ_C (names, shapes, dtypes) and the file against the sha256 composition.json records."""
    file = os.path.join(path, THETA_FILE)
    expected = theta_tensor_names(shapes)
    arrays = {}
    try:
        with safe_open(file, framework="np") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            if missing:
                raise CheckpointError(f"{file} has no tensor {missing[0]}"
                                      + (f" (and {len(missing) - 1} more are missing)" if len(missing) > 1 else "")
                                      + "; this composition's Θ_C needs it")
            extra = sorted(names - set(expected))
            if extra:
                raise CheckpointError(f"{file}: tensor {extra[0]} is not a parameter of this composition's Θ_C")
            for name, want in expected.items():
                got = f.get_slice(name)
                shape, dtype = tuple(got.get_shape()), got.get_dtype()
                if shape != tuple(want.shape):
                    raise CheckpointError(f"{file}: tensor {name} has shape {shape}, Θ_C needs {tuple(want.shape)}")
                arrays[name] = f.get_tensor(name)
                if arrays[name].dtype != want.dtype:
                    raise CheckpointError(f"{file}: tensor {name} is {dtype} ({arrays[name].dtype}), "
                                          f"Θ_C is {jnp.dtype(want.dtype).name}")
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot read {file}: it is truncated or not a safetensors file ({e})") from e
    digest = _sha256(file)
    if digest != export["theta"].get("sha256"):
        raise CheckpointError(f"{file} is corrupt or was replaced: its sha256 is {digest}, "
                              f"{os.path.join(path, _COMPOSITION_FILE)} records {export['theta'].get('sha256')}")
    flat = {tuple(name.split("/")): jax.device_put(a, device) for name, a in arrays.items()}
    return traverse_util.unflatten_dict(flat)


def _config_of(name: str, fp: dict, where: str) -> ModelConfig:
    """The ModelConfig a bases.json fingerprint records (storage dtypes at their defaults)."""
    try:
        return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fp["config"].items()})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: the config of {name} cannot be read by this version: {e}") from e


def _checkpoint_meta(run_dir: str, step: int) -> dict:
    manager = _manager(run_dir)
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


def _refuse_out_dir(out_dir: str, force: bool) -> None:
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if not os.listdir(out_dir):
        return
    try:
        is_export = _read_export(out_dir) is not None
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
    if _read_export(run_dir) is not None:
        raise CheckpointError(f"{run_dir} is an export already; copy the directory to share it")
    step = composition_step(run_dir, step)
    _refuse_out_dir(out_dir, force)
    bases = read_bases(run_dir)
    names = ["anchor"] + [f"augment_{k}" for k in range(len(bases) - 1)]
    if sorted(bases) != sorted(names):
        raise CheckpointError(f"{run_dir}/bases.json names {sorted(bases)}, not a composition's models")
    cfgs = [_config_of(name, bases[name], f"{run_dir}/bases.json") for name in names]
    _, theta = load_composition(run_dir, cfgs[0], cfgs[1:], step)
    record = _saved(run_dir)[0]
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
        export["theta"]["sha256"] = _sha256(os.path.join(tmp, THETA_FILE))
        records.write_record(os.path.join(tmp, _COMPOSITION_FILE), export)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_export_readme(export, out_dir))
    return export


def _export_readme(export: dict, out_dir: str) -> str:
    from calm_jax.composition import CompositionOptions

    names = list(export["bases"])
    comp_rec, theta, training = export["composition"], export["theta"], export["training"]
    dirs = [export["bases"][n]["trained_with"] or f"{n.upper()}_DIR" for n in names]
    rows = []
    for name, path in zip(names, dirs):
        fp = export["bases"][name]["fingerprint"]
        c = fp["config"]
        rows.append(f"| {name} | `{path}` | {c['family']} | {c['num_layers']} | {c['hidden_size']} | "
                    f"{c['vocab_size']} | `{fp['hash']}` |")
    conns = [f"augment {k}: " + ", ".join(f"layer {i} -> anchor layer {j}" for i, j in pairs)
             for k, pairs in enumerate(comp_rec["connections"])]
    enabled = [k for k, v in comp_rec["options"].items() if v]
    spec = ",".join(f"{k}:{i}-{j}" for k, pairs in enumerate(comp_rec["connections"]) for i, j in pairs)
    model_flags = f"--anchor {dirs[0]} " + " ".join(f"--augment {d}" for d in dirs[1:])
    wiring_flags = (f'--connections "{spec}" --num-heads {comp_rec["num_heads"]}'
                    + "".join(f" --{k.replace('_', '-')}" for k in enabled if k in CompositionOptions.names()))
    tc = training.get("train_config", {})
    lines = [
        "# Θ_C of a CALM composition",
        "",
        f"The trained cross-attention (Θ_C) joining a frozen anchor and {len(names) - 1} frozen augmenting "
        f"model(s), exported by `python -m train.export` from `{export['source']['run_dir']}` at step "
        f"{export['step']}. The base models are not in this directory: load your own copies. They are checked "
        "against the fingerprints in `composition.json` (config and content hash); other models are refused.",
        "",
        "| | trained with | family | layers | hidden | vocab | content hash (bf16) |",
        "|---|---|---|---:|---:|---:|---|",
        *rows,
        "",
        "Connections: " + "; ".join(conns) + f". Cross-attention heads: {comp_rec['num_heads']}. "
        f"Options: {', '.join(enabled) or 'none (as in the paper)'}.",
        "",
        f"`theta.safetensors`: {theta['tensors']} tensors, {theta['parameters']:,} parameters, {theta['dtype']}, "
        f"{theta['bytes']:,} bytes of weights; sha256 `{theta['sha256']}`.",
        "",
        "## Training",
        "",
    ]
    if training:
        facts = [f"{export['step']} steps" + (f" (of {tc['steps']} planned)" if tc.get("steps") else "")]
        if tc:
            facts.append(f"batch {tc.get('batch_size')} x {tc.get('seq_len')} tokens, lr {tc.get('lr')}, "
                         f"warmup {tc.get('warmup')}, seed {tc.get('seed')}")
        if "data" in training:
            facts.append(f"data `{training['data']}`" + (f" ({training['train_examples']:,} examples)"
                                                         if "train_examples" in training else ""))
        if "target_tokens" in training:
            facts.append(f"{training['target_tokens']:,} target tokens trained on; last train loss "
                         f"{training['last_loss']:.4f}")
        if "eval_loss" in training:
            facts.append(f"eval loss {training['eval_loss']:.4f} at step {training['eval_step']}"
                         + (f" on `{training['eval_data']}`" if training.get("eval_data") else ""))
        if training.get("init_from"):
            facts.append(f"Θ_C initialised from `{training['init_from']}`")
        lines += [f"- {fact}" for fact in facts]
    else:
        lines.append("The run recorded no training metadata.")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import calm_jax",
        "from calm_jax import checkpoint",
        "",
        f'anchor = calm_jax.load_pretrained("{dirs[0]}")',
        "augments = [" + ", ".join(f'calm_jax.load_pretrained("{d}")' for d in dirs[1:]) + "]",
        f'ccfg, theta = checkpoint.load_composition("{out_dir}", anchor, augments)',
        "lm = calm_jax.ComposedLM(ccfg)",
        'params = {"theta": theta, "anchor": anchor.params, "augments": tuple(a.params for a in augments)}',
        "```",
        "",
        "```bash",
        f"python -m eval.exact_match {model_flags} --composition {out_dir} --data test.jsonl --out results/",
        f"python -m eval.generate {model_flags} --composition {out_dir} --prompts prompts.jsonl --out gen.jsonl",
        f"python -m eval.loglik {model_flags} --composition {out_dir} --data test.jsonl",
        "# train further, starting from this Θ_C (the wiring flags must be these):",
        f"python -m train.compose {model_flags} {wiring_flags} --init-from {out_dir} --data more.jsonl "
        "--out runs/next",
        "```",
        "",
        "The directories above are the ones it was trained with; give your copies of the same models.",
        "",
    ]
    return "\n".join(lines)
