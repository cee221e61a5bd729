"""Device mesh, parameter PartitionSpecs from one table of rules, batch placement, multi-host.

The mesh has two axes: "data" (the batch, and FSDP over weights) and "model" (tensor
parallelism over attention heads, MLP width and vocabulary). A parameter's spec comes
from the first rule whose regex matches its path ("anchor/layers_3/attn/q/kernel"); a
mesh axis that does not divide its dimension is dropped (that dimension is replicated).
Optimizer-state leaves carry their parameter's path inside, so the same rules place them.

Multi-host launch: start the same command once per host (or per process) with
  JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=P JAX_PROCESS_ID=p  (or --coordinator,
  --num-processes, --process-id); on Cloud TPU / SLURM the variables are detected.
Every process computes the same global batch order and feeds only its own rows.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")

# (regex on the parameter path, spec). Kernels are (in, out); embeddings (vocab, hidden).
# Composition: f_proj is (D_A, D_B); f_cross uses q/k/v/o like self-attention.
RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)embed/embedding$", P("model", "data")),
    (r"(^|/)pos_embed/embedding$", P(None, "data")),
    (r"(^|/)(q|k|v|gate|up|proj)/kernel$", P("data", "model")),
    (r"(^|/)(q|k|v|gate|up)/bias$", P("model")),
    (r"(^|/)(o|down)/kernel$", P("model", "data")),
    (r"(^|/)lm_head/kernel$", P("data", "model")),
)


class MeshError(ValueError):
    """A mesh specification that cannot be built on the available devices."""


def parse_mesh(spec: str | None) -> dict[str, int]:
    """"data=4,model=2" -> {"data": 4, "model": 2}. Missing axes are 1; one axis may be -1 (the rest)."""
    sizes = {"data": -1, "model": 1} if not spec else {"data": 1, "model": 1}
    seen = set()
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise MeshError(f"bad mesh spec {spec!r}: expected comma-separated 'data=N' / 'model=N', found {part!r}")
        if name in seen:
            raise MeshError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"bad mesh spec {spec!r}: {name} size {value!r} is not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise MeshError(f"bad mesh spec {spec!r}: {name} size must be positive (or -1 for the rest)")
    if list(sizes.values()).count(-1) > 1:
        raise MeshError(f"bad mesh spec {spec!r}: at most one axis may be -1")
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh from a spec like "data=4,model=2" (default: all devices on data).

    Single-process, a mesh smaller than the device count uses the first devices; with
    several processes the mesh must cover all devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh(spec)
    if -1 in sizes.values():
        fixed = int(np.prod([v for v in sizes.values() if v != -1]))
        if len(devices) % fixed:
            raise MeshError(f"mesh {spec!r}: {len(devices)} devices are not divisible by {fixed}")
        sizes = {k: (len(devices) // fixed if v == -1 else v) for k, v in sizes.items()}
    n = sizes["data"] * sizes["model"]
    if n > len(devices):
        raise MeshError(f"mesh {spec!r} needs {n} devices (data={sizes['data']} x model={sizes['model']}), "
                        f"but only {len(devices)} are available")
    if n < len(devices) and jax.process_count() > 1:
        raise MeshError(f"mesh {spec!r} uses {n} of {len(devices)} devices; with {jax.process_count()} "
                        "processes it must use all of them")
    return Mesh(np.asarray(devices[:n]).reshape(sizes["data"], sizes["model"]), AXES)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=RULES, fsdp: bool = True) -> P:
    """The PartitionSpec of one array: first matching rule, minus axes that do not divide."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    if len(spec) > len(shape):
        return P()
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis == "data" and not fsdp:
            axis = None
        if axis is not None and dim % mesh.shape[axis]:
            axis = None
        out.append(axis)
    return P(*out)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_shardings(mesh: Mesh, tree: Any, rules=RULES, fsdp: bool = True) -> Any:
    """A NamedSharding for every array (or ShapeDtypeStruct) leaf of `tree`, by the rules."""
    def one(path, leaf):
        return NamedSharding(mesh, spec_for(_path_str(path), tuple(np.shape(leaf)), mesh, rules, fsdp))
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over "data", the rest replicated."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(tree: Any, shardings: Any) -> Any:
    """Puts each leaf on its sharding: no copy where it is there already.

    With several processes each leaf must hold the same value on every process (e.g. a
    model loaded by each of them); each process fills only its own devices.
    """
    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
    return jax.tree.map(one, tree, shardings)


def put_batch(mesh: Mesh, batch: dict) -> dict:
    """Places a global numpy batch on the mesh, each process supplying only its own rows."""
    sharding = batch_sharding(mesh)

    def one(x):
        if x.shape[0] % mesh.shape["data"]:
            raise MeshError(f"batch size {x.shape[0]} is not divisible by the mesh's data axis "
                            f"({mesh.shape['data']})")
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        index_map = sharding.addressable_devices_indices_map(x.shape)
        starts = [idx[0].start or 0 for idx in index_map.values()]
        stops = [idx[0].stop if idx[0].stop is not None else x.shape[0] for idx in index_map.values()]
        return jax.make_array_from_process_local_data(sharding, x[min(starts):max(stops)], x.shape)
    return jax.tree.map(one, batch)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when a multi-process launch is asked for.

    Asked for by the arguments or by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID. Must run before anything touches a device. Returns whether it did.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None:
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise MeshError("a multi-process launch needs the coordinator address, the number of processes and "
                        f"this process's id (got {coordinator!r}, {num_processes!r}, {process_id!r})")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
