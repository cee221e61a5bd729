"""The format of an export (Θ_C of one checkpoint alone, to share), and reading one back checked:

  EXPORT_DIR/theta.safetensors  every Θ_C tensor, named by `theta_tensor_names`
  EXPORT_DIR/composition.json   {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
                                "composition", "bases", "step", "theta": {..., "sha256"}, ...}
calm_jax.checkpoint.export writes it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from calm_jax import records
from calm_jax.checkpoint.wiring import COMPOSITION_FILE, composition_layout
from calm_jax.loading import CheckpointError


EXPORT_FORMAT = "calm_jax.composition-export"
EXPORT_VERSION = 1
THETA_FILE = "theta.safetensors"


def theta_tensor_names(theta) -> dict[str, Any]:
    """{name: leaf} of a Θ_C tree, each name its tree path joined with "/"
    ("augment_0/conn_1/q/kernel"): the tensor names of an export's theta.safetensors."""
    return {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(theta).items()}


def file_sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_export(path: str) -> dict | None:
    """The composition.json record of an export directory; None for anything else (a run
    directory, a missing one). A directory with theta.safetensors whose composition.json is
    missing, unreadable or of another format raises CheckpointError."""
    record_path = os.path.join(path, COMPOSITION_FILE)
    has_theta = os.path.isfile(os.path.join(path, THETA_FILE))
    if not os.path.isfile(record_path):
        if has_theta:
            raise CheckpointError(f"{path} has {THETA_FILE} but no {COMPOSITION_FILE}: not a complete export")
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
    record["composition"] = composition_layout(record["composition"], record_path)
    return record


def read_theta(path: str, export: dict, shapes, device):
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
    digest = file_sha256(file)
    if digest != export["theta"].get("sha256"):
        raise CheckpointError(f"{file} is corrupt or was replaced: its sha256 is {digest}, "
                              f"{os.path.join(path, COMPOSITION_FILE)} records {export['theta'].get('sha256')}")
    flat = {tuple(name.split("/")): jax.device_put(a, device) for name, a in arrays.items()}
    return traverse_util.unflatten_dict(flat)
