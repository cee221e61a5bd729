"""Training checkpoints: the trained parameters, optimizer state, step, RNG and data position.

Layout of a run directory:
  RUN_DIR/bases.json          which frozen models the run belongs to (configs + content hashes)
  RUN_DIR/composition.json    how Θ_C is wired (train.compose runs: connections, heads, options)
  RUN_DIR/checkpoints/<step>/ orbax checkpoints ("state": arrays, "meta": JSON)
The frozen models are never written; a checkpoint is only restored against base models
whose fingerprint matches bases.json (both JSON records: calm_jax.records). Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a save killed midway is never the latest.
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

from calm_jax import records
from calm_jax.config import ModelConfig
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


def composition_step(run_dir: str, step: int | None = None) -> int:
    """The checkpoint step `load_composition` reads from a `train.compose` run: `step`, checked
    to exist, or the latest. Reads no weights. Raises CheckpointError."""
    if not os.path.isfile(os.path.join(run_dir, _COMPOSITION_FILE)):
        raise CheckpointError(f"{run_dir} is not a train.compose run directory (no {_COMPOSITION_FILE})")
    steps = []
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        manager = _manager(run_dir)
        steps = sorted(manager.all_steps())
        manager.close()
    if not steps:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    if step is not None and step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint for step {step} (has {steps})")
    return steps[-1] if step is None else step


def load_composition(run_dir: str, anchor, augments, step: int | None = None):
    """(CompositionConfig, Θ_C) of a trained `train.compose` run, for evaluation or generation.

    anchor, augments: the frozen models, each a `Pretrained` (config and params: the configs
      and the content hashes are checked) or a bare ModelConfig (only the config is checked).
    step: which checkpoint (default: the latest). Raises BaseModelMismatch on other models.
    """
    from calm_jax import composition as comp

    step = composition_step(run_dir, step)
    path = os.path.join(run_dir, _COMPOSITION_FILE)
    record = _composition_layout(records.read(path, CheckpointError), path)
    models = [anchor, *augments]
    saved = read_bases(run_dir)
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
    manager = _manager(run_dir)
    # Only Θ_C is read; the optimizer state stays on disk.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"trainable": theta_shapes}, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args({"trainable": theta_shapes}))))
    manager.close()
    return ccfg, restored["state"]["trainable"]
