"""The planner (calm_jax.plan, python -m train.plan) against measurement, and its CLI.

A plan compiles the train step on abstract inputs; here the same step runs with real
arrays on the 8 simulated devices of the test process, and the plan must equal the
compiled executable's own memory analysis, its argument bytes must be the arrays that are
actually alive during the run (within 10%), and our FLOP count XLA's (within 25%: XLA also
counts the elementwise work, a large share at these tiny widths).
"""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax import composition as comp_lib
from calm_jax import plan as plan_lib
from calm_jax import sharding
from calm_jax.config import ModelConfig, to_hf_config
from calm_jax.loading import load_config
from calm_jax.model import init_params
from train.plan import parse_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ANCHOR = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=128, max_positions=128)
AUGMENT = ModelConfig(family="llama", vocab_size=256, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=2,
                      head_dim=16, intermediate_size=64, max_positions=128, tie_embeddings=True)


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    """config.json files only: the planner needs no weights."""
    root = tmp_path_factory.mktemp("plan")
    dirs = {}
    for name, cfg in (("anchor", ANCHOR), ("augment", AUGMENT)):
        os.makedirs(root / name)
        with open(root / name / "config.json", "w") as f:
            json.dump(to_hf_config(cfg), f)
        dirs[name] = str(root / name)
    dirs["empty"] = str(root / "empty")
    os.makedirs(dirs["empty"])
    return dirs


def live_bytes_per_device(exclude_ids) -> dict:
    """Bytes of the live arrays (not in `exclude_ids`) on each device, from their shardings."""
    per_device = collections.Counter()
    for x in jax.live_arrays():
        if id(x) in exclude_ids or x.is_deleted():
            continue
        nbytes = int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for d in x.sharding.device_set:
            per_device[d] += nbytes
    return per_device


@pytest.mark.parametrize("remat, loss_chunk", [("none", 0), ("full", 8)])
def test_plan_equals_measured_run(config_dirs, remat, loss_chunk):
    configs = [load_config(config_dirs[k], param_dtype="bfloat16") for k in ("anchor", "augment")]
    # Into anchor layer 0, so that layer 1 is differentiated (and rematerialised).
    ccfg = comp_lib.CompositionConfig(configs[0], (configs[1],), connections=(((3, 0),),))
    mesh = sharding.make_mesh("data=4,model=2", jax.devices()[:8])
    setup = plan_lib.Setup(ccfg, mesh, batch_size=8, seq_len=32, remat=remat, loss_chunk=loss_chunk)
    p = plan_lib.plan(setup, 2 ** 30, search="none")
    d = p["per_device"]
    assert d["total"] == d["argument"] + d["output"] - d["alias"] + d["temp"]
    assert p["fits"] and p["per_device_bytes"] == d["total"] + d["unused_inputs"]
    # Our own accounting of the inputs is XLA's argument size, plus what jit dropped as never
    # read: here the augmenting model's final norm (its logits are never made).
    assert d["frozen_weights"] + d["theta_and_optimizer"] + d["batch"] == d["argument"] + d["unused_inputs"]
    assert d["unused_inputs"] == AUGMENT.hidden_size * 2  # one bf16 vector
    assert d["alias"] == d["theta_and_optimizer"]  # Θ_C and its optimizer state are donated, counted once

    # The same step with real arrays, placed as calm_jax.trainer.train places them.
    before = {id(x) for x in jax.live_arrays()}
    inputs = plan_lib.step_inputs(setup)
    s = inputs.shardings
    frozen = sharding.place({"anchor": init_params(ccfg.anchor, jax.random.key(1)),
                             "augments": (init_params(ccfg.augments[0], jax.random.key(2)),)}, s.frozen)
    theta = jax.jit(lambda t: t, out_shardings=s.trainable)(comp_lib.init_theta(ccfg, jax.random.key(0)))
    opt_state = jax.jit(inputs.optimizer.init, out_shardings=s.opt_state)(theta)
    rng = np.random.default_rng(0)
    batch = sharding.put_batch(mesh, {"tokens_BxT": rng.integers(0, ANCHOR.vocab_size, (8, 32)).astype(np.int32),
                                      "mask_BxT": np.ones((8, 32), bool), "target_BxT": np.ones((8, 32), bool)})
    assert plan_lib.per_device_bytes(frozen) == d["frozen_weights"]
    step = plan_lib.make_step(inputs, 1)
    executable, _ = plan_lib.compile_lowered(step.jitted.lower(theta, opt_state, frozen, batch))
    measured = plan_lib.memory(executable)
    assert measured == {k: d[k] for k in measured}, (measured, d)

    theta, opt_state, metrics = executable(theta, opt_state, frozen, batch)
    jax.block_until_ready((theta, opt_state, metrics))
    assert np.isfinite(float(metrics["loss"]))
    live = live_bytes_per_device(before)
    assert set(live) == set(mesh.devices.flat)
    worst = max(live.values())
    print(f"plan: argument {d['argument']} B, total {p['per_device_bytes']} B per device; compiled with real "
          f"arrays: {measured}; live after the step: {worst} B on the fullest device")
    assert abs(worst - d["argument"]) <= 0.1 * d["argument"], (dict(live), d["argument"])

    # What the backward keeps, before any compiler: rematerialisation keeps less.
    assert p["residual_bytes_per_device"] > 0
    if remat != "none":
        assert p["residual_bytes_per_device"] < plan_lib.residual_bytes(dataclasses.replace(setup, remat="none"))

    xla = p["xla_flops_per_device"]
    if remat == "none" and xla is not None:
        assert 0.8 <= xla / p["flops_per_device"] <= 1.25, (xla, p["flops_per_device"])


def _cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # the CLI sets the device count itself
    return subprocess.run([sys.executable, "-m", "train.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_json_and_largest_batch(config_dirs):
    done = _cli("--anchor", config_dirs["anchor"], "--augment", config_dirs["augment"], "--devices", "2",
                "--mesh", "data=2", "--batch-size", "2", "--seq-len", "64", "--device-memory", "3MiB", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["devices"] == 2 and out["mesh"] == {"data": 2, "model": 1}
    assert out["per_device_bytes"] > 0 and out["fits"] is True and out["flops_per_step"] > 0
    # The largest micro-batch: extrapolated, then bracketed by compiles: it fits, the next does not.
    m = out["max_micro_batch_per_device"]
    probes = {p["micro_batch_per_device"]: p for p in out["probes"]}
    assert m >= 3 and probes[m]["fits"] and not probes[m + 1]["fits"] and out["max_batch_size"] == 2 * m


@pytest.mark.parametrize("args, message", [
    (["--augment", "AUG", "--anchor", "EMPTY", "--devices", "2"], "has no config.json"),
    (["--devices", "8", "--mesh", "data=4,model=4"], "needs 16 devices"),
    (["--devices", "8", "--mesh", "data=2,model=2"], "uses 4 devices"),
    (["--devices", "2", "--device-memory", "80 gigs"], "cannot read memory size '80 gigs'"),
])
def test_cli_errors_are_one_line(config_dirs, args, message):
    base = {"--anchor": config_dirs["anchor"], "--augment": config_dirs["augment"], "--batch-size": "8",
            "--seq-len": "16"}
    args = [{"AUG": config_dirs["augment"], "EMPTY": config_dirs["empty"]}.get(a, a) for a in args]
    argv = [x for k, v in base.items() if k not in args for x in (k, v)] + args
    done = _cli(*argv)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2 ** 30
    assert parse_bytes("80 GB") == 80 * 10 ** 9
    assert parse_bytes("1.5MiB") == 3 * 2 ** 19
    assert parse_bytes("4096") == 4096
    for bad in ("", "GiB", "-1GiB", "80 gigs", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
