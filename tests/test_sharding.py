"""Meshes and parameter specs; the sharded step equals one device; two jax.distributed processes equal one."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from calm_jax import checkpoint as ckpt
from calm_jax import data as data_lib
from calm_jax import sharding
from calm_jax import train_step as ts
from calm_jax import trainer
from tests import numerics
from tests.test_train_step import COMPOSED_LOSS64, OPT, STEP64, copy, random_batch, tiny_composition

# "Same numbers on 1 or N devices" is an identity: the steps below run in float64 and are
# compared to float64 reordering (tests/numerics.py), subprocesses included (JAX_ENABLE_X64).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_and_make_mesh():
    assert sharding.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert sharding.parse_mesh("model=2") == {"data": 1, "model": 2}
    assert dict(sharding.make_mesh("data=4,model=2").shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh("data=-1,model=2").shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh(None).shape) == {"data": jax.device_count(), "model": 1}
    assert sharding.make_mesh("data=2").devices.size == 2  # fewer devices than there are: the first ones


@pytest.mark.parametrize("spec, message", [
    ("data=4,modle=2", "expected comma-separated 'data=N' / 'model=N', found 'modle=2'"),
    ("data:4", "found 'data:4'"),
    ("data=four", "data size 'four' is not an integer"),
    ("data=0", "data size must be positive"),
    ("data=2,data=2", "axis 'data' given twice"),
    ("data=-1,model=-1", "at most one axis may be -1"),
])
def test_bad_mesh_spec(spec, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.make_mesh(spec)


def test_mesh_larger_than_devices():
    with pytest.raises(sharding.MeshError, match=r"needs 16 devices \(data=8 x model=2\), but only 8 are available"):
        sharding.make_mesh("data=8,model=2")
    with pytest.raises(sharding.MeshError, match="8 devices are not divisible by 3"):
        sharding.make_mesh("data=-1,model=3")


def test_rule_table_specs_and_fallback():
    mesh = sharding.make_mesh("data=4,model=2")
    ccfg, theta, frozen = tiny_composition()
    tree = {"theta": theta, **frozen}
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, tree))
    conn = specs["theta"]["augment_0"]["conn_0"]
    assert conn["proj"]["kernel"] == P("data", "model")  # 16 x 32: f_proj, FSDP + TP
    assert conn["q"]["kernel"] == P("data", "model") and conn["o"]["kernel"] == P("model", "data")
    assert conn["proj"]["bias"] == P()
    anchor = specs["anchor"]
    assert anchor["layers_0"]["mlp"]["down"]["kernel"] == P("model", "data")  # 48 x 32
    assert anchor["embed"]["embedding"] == P("model", "data")
    assert anchor["layers_0"]["ln1"]["scale"] == P()
    assert specs["augments"][0]["layers_1"]["attn"]["k"]["kernel"] == P("data", "model")  # 16 x 8
    # A dimension a mesh axis does not divide is replicated on that axis only.
    assert sharding.spec_for("a/q/kernel", (6, 4), mesh) == P(None, "model")
    assert sharding.spec_for("a/q/kernel", (8, 3), mesh) == P("data", None)
    assert sharding.spec_for("a/q/kernel", (8, 4), mesh, fsdp=False) == P(None, "model")
    # Optimizer state leaves carry their parameter's path, so they follow the same rules.
    opt_specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, jax.eval_shape(OPT.init, theta)))
    assert opt_specs[1][0].mu["augment_0"]["conn_0"]["o"]["kernel"] == P("model", "data")
    assert opt_specs[1][0].count == P()


def _sharded_steps(mesh_spec, n_steps=2):
    mesh = sharding.make_mesh(mesh_spec)
    ccfg, theta, frozen = tiny_composition(float64=True)
    t_sh = sharding.param_shardings(mesh, theta)
    o_sh = sharding.param_shardings(mesh, jax.eval_shape(OPT.init, theta))
    f_sh = sharding.param_shardings(mesh, frozen)
    shardings = ts.StepShardings(t_sh, o_sh, f_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh))
    step = ts.make_train_step(COMPOSED_LOSS64, OPT, shardings=shardings)
    theta = jax.device_put(copy(theta), t_sh)
    state = jax.jit(OPT.init, out_shardings=o_sh)(theta)
    frozen = jax.device_put(frozen, f_sh)
    losses = []
    for i in range(n_steps):
        theta, state, m = step(theta, state, frozen, sharding.put_batch(mesh, random_batch(seed=i)))
        losses.append(np.asarray(m["loss"]))
    return losses, theta


@pytest.fixture(scope="module")
def one_device():
    with numerics.float64():
        ccfg, theta, frozen = tiny_composition(float64=True)
        theta, state, losses = copy(theta), OPT.init(theta), []
        for i in range(2):
            theta, state, m = STEP64(theta, state, frozen, random_batch(seed=i))
            losses.append(np.asarray(m["loss"]))
        return np.array(losses), jax.device_get(theta)


@pytest.mark.parametrize("mesh_spec", ["data=4,model=2", "data=8,model=1"])
@numerics.float64()
def test_sharded_step_equals_one_device(one_device, mesh_spec):
    losses, theta = _sharded_steps(mesh_spec)
    numerics.assert_identity(np.array(losses), one_device[0])
    assert len(theta["augment_0"]["conn_0"]["q"]["kernel"].sharding.device_set) == 8
    numerics.assert_trees_identity(jax.device_get(theta), one_device[1])


def test_put_batch_rejects_indivisible_batch():
    with pytest.raises(sharding.MeshError, match=r"batch size 6 is not divisible by the mesh's data axis \(4\)"):
        sharding.put_batch(sharding.make_mesh("data=4,model=2"), random_batch(b=6))


# --- two processes ----------------------------------------------------------------------

_TRAIN = trainer.TrainConfig(steps=3, batch_size=8, seq_len=12, lr=1e-2, warmup=1, save_every=3, eval_every=0,
                             mesh="data=2,model=2", progress=False)


def _train(run_dir):
    """A 3-step trainer run of the tiny composition on a data=2,model=2 mesh (float64)."""
    ccfg, theta, frozen = tiny_composition(float64=True)
    b = random_batch(b=16, seed=3)
    ds = data_lib.Dataset("random", b["tokens_BxT"], b["mask_BxT"], b["target_BxT"])
    bases = {"anchor": ckpt.fingerprint(ccfg.anchor, frozen["anchor"]),
             "augment_0": ckpt.fingerprint(ccfg.augments[0], frozen["augments"][0])}
    return trainer.train(run_dir, _TRAIN, COMPOSED_LOSS64, theta, frozen, ds, bases=bases)


def _restored_theta(run_dir):
    ccfg, theta, frozen = tiny_composition(float64=True)
    opt = ts.make_optimizer(_TRAIN.lr, _TRAIN.steps, _TRAIN.warmup, _TRAIN.weight_decay, _TRAIN.clip,
                            _TRAIN.end_lr_ratio)
    state = {"trainable": theta, "opt_state": opt.init(theta), "step": np.int32(0),
             "rng": jax.random.key_data(jax.random.key(0))}
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored, meta = ckpt.Checkpoints(run_dir, ckpt.read_bases(run_dir)).restore(
        ckpt.abstract(state, jax.tree.map(lambda _: dev, state)))
    return jax.device_get(restored["trainable"]), meta


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@numerics.float64()
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": ROOT,
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
               "JAX_ENABLE_X64": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_sharding", str(tmp_path / "multi")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    single = _train(str(tmp_path / "single"))  # meanwhile: the same run in this one process
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    assert "processes=2 devices=4" in out
    multi_losses = [r["loss"] for r in trainer.read_metrics(str(tmp_path / "multi")) if "loss" in r]
    # The metrics file holds Python floats (float64 here), so the identity survives JSON.
    numerics.assert_identity(np.array(multi_losses), np.array([loss for _, loss in single.losses]))
    theta_multi, meta = _restored_theta(str(tmp_path / "multi"))
    assert meta["step"] == 3
    numerics.assert_trees_identity(theta_multi, jax.device_get(single.trainable))


if __name__ == "__main__":
    # One process of test_two_processes_equal_one.
    sharding.maybe_initialize_distributed()
    print(f"processes={jax.process_count()} devices={jax.device_count()}", flush=True)
    _train(sys.argv[1])
    print(json.dumps({"process": jax.process_index(), "done": True}), flush=True)
