"""Weight fingerprints: which frozen base models a run belongs to, and the check that refuses others.

A fingerprint is a model's architecture config and content hashes of its weights, rounded to
bf16 and to fp16, so that fp32, bf16 and fp16 copies of one model agree. A run directory
records its base models' fingerprints in bases.json, an export in its composition.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

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
    def one(x):
        weight = None
        sums = []
        for dtype in _ROUNDINGS:
            bits = jax.lax.bitcast_convert_type(x.astype(dtype), jnp.uint16).astype(jnp.uint32).ravel()
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


def composition_bases(anchor, augments) -> dict:
    """{"anchor": fingerprint, "augment_0": ..., ...} of Pretrained-like models (.config, .params)."""
    out = {"anchor": fingerprint(anchor.config, anchor.params)}
    out.update({f"augment_{k}": fingerprint(a.config, a.params) for k, a in enumerate(augments)})
    return out
