"""Checkpoints: base-model fingerprints, keep-last-k, atomic saves, exact resume after SIGKILL."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import checkpoint as ckpt
from calm_jax import sharding
from calm_jax.composition import CompositionOptions, init_theta
from tests.test_train_cli import compose_argv, hf_dirs  # noqa: F401 (a fixture)
from tests.test_train_step import ANCHOR, AUG, tiny_composition
from train import compose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_content_hash_is_deterministic_and_sees_every_weight():
    ccfg, theta, frozen = tiny_composition()
    anchor = jax.device_put(frozen["anchor"])
    h = ckpt.content_hash(anchor)
    assert len(h) == 16 and h == ckpt.content_hash(jax.tree.map(np.asarray, anchor))
    # Independent of where the weights live and of bf16 storage.
    mesh = sharding.make_mesh("data=4,model=2")
    assert ckpt.content_hash(jax.device_put(anchor, sharding.param_shardings(mesh, anchor))) == h
    assert ckpt.content_hash(jax.tree.map(lambda x: x.astype(jnp.bfloat16), anchor)) == h
    # Any single weight, anywhere, changes it; so does swapping two values.
    last = anchor["layers_1"]["mlp"]["down"]["kernel"]
    assert ckpt.content_hash({**anchor, "layers_1": {**anchor["layers_1"], "mlp": {
        **anchor["layers_1"]["mlp"], "down": {"kernel": last.at[-1, -1].add(0.01)}}}}) != h
    emb = anchor["embed"]["embedding"]
    swapped = emb.at[0, 0].set(emb[0, 1]).at[0, 1].set(emb[0, 0])
    assert ckpt.content_hash({**anchor, "embed": {"embedding": swapped}}) != h
    # The fingerprint names the architecture, not the storage dtype.
    fp = ckpt.fingerprint(ANCHOR, anchor)
    assert fp == ckpt.fingerprint(ANCHOR.replace(param_dtype="bfloat16"), anchor)
    assert fp["config"]["hidden_size"] == 32 and "param_dtype" not in fp["config"]


def test_checkpoints_refuse_other_base_models(tmp_path):
    ccfg, theta, frozen = tiny_composition()
    bases = {"anchor": ckpt.fingerprint(ANCHOR, frozen["anchor"]),
             "augment_0": ckpt.fingerprint(AUG, frozen["augments"][0])}
    ckpt.Checkpoints(str(tmp_path), bases).close()
    ckpt.Checkpoints(str(tmp_path), bases).close()  # the same models: fine
    other = {**bases, "augment_0": ckpt.fingerprint(AUG.replace(num_layers=3), frozen["augments"][0])}
    with pytest.raises(ckpt.BaseModelMismatch, match=r"augment_0 config differs \(num_layers: trained with 4, "
                                                     r"given 3\)"):
        ckpt.Checkpoints(str(tmp_path), other)
    with pytest.raises(ckpt.BaseModelMismatch, match=r"trained with models \['anchor', 'augment_0'\], given "
                                                     r"\['anchor'\]"):
        ckpt.Checkpoints(str(tmp_path), {"anchor": bases["anchor"]})
    with pytest.raises(ckpt.BaseModelMismatch, match="anchor has the same config but different weights"):
        ckpt.Checkpoints(str(tmp_path), {**bases, "anchor": ckpt.fingerprint(ANCHOR, theta)})


def test_storage_dtype_does_not_change_identity_or_says_what_differs(tmp_path):
    _, _, frozen = tiny_composition()
    aug = jax.device_put(frozen["augments"][0])
    as_dtype = lambda dtype: jax.tree.map(lambda x: x.astype(dtype), aug)  # noqa: E731
    trained = {"augment_0": ckpt.fingerprint(AUG, aug)}
    for dtype in (jnp.bfloat16, jnp.float16):
        ckpt.check_bases(trained, {"augment_0": ckpt.fingerprint(AUG, as_dtype(dtype))}, "run")
    # fp16 -> bf16 rounds differently from fp32 -> bf16, and bf16 weights cannot give fp16's
    # rounding back: the two stored dtypes cannot be compared, and the error says that.
    with pytest.raises(ckpt.BaseModelMismatch, match="augment_0 has the same config, but its weights are stored in "
                                                     "float16 here and were bfloat16 in training"):
        ckpt.check_bases({"augment_0": ckpt.fingerprint(AUG, as_dtype(jnp.bfloat16))},
                         {"augment_0": ckpt.fingerprint(AUG, as_dtype(jnp.float16))}, "run")
    # Other weights in the same dtype are still just other weights.
    with pytest.raises(ckpt.BaseModelMismatch, match="augment_0 has the same config but different weights"):
        ckpt.check_bases(trained, {"augment_0": ckpt.fingerprint(AUG, jax.tree.map(lambda x: x + 0.01, aug))}, "run")


def _composition_run(run_dir, ccfg, frozen):
    """A run directory as train.compose leaves it: bases.json, composition.json, one checkpoint of Θ_C."""
    theta = init_theta(ccfg, jax.random.key(0))
    c = ckpt.Checkpoints(str(run_dir), {"anchor": ckpt.fingerprint(ANCHOR, frozen["anchor"]),
                                        "augment_0": ckpt.fingerprint(AUG, frozen["augments"][0])})
    c.save(1, {"trainable": theta}, {})
    c.close()
    ckpt.save_composition_config(str(run_dir), ccfg)
    return theta


def test_composition_options_round_trip_through_composition_json(tmp_path):
    ccfg, _, frozen = tiny_composition()
    everything = CompositionOptions(**{name: True for name in CompositionOptions.names()})
    ccfg = dataclasses.replace(ccfg, options=everything)
    theta = _composition_run(tmp_path, ccfg, frozen)
    saved = json.loads((tmp_path / "composition.json").read_text())
    assert saved == {"connections": [[[3, 1]]], "num_heads": 4, "options": everything.to_dict(), "dtype": "float32"}
    loaded, loaded_theta = ckpt.load_theta(str(tmp_path), ANCHOR, [AUG])
    assert loaded == ccfg and loaded.options == everything
    assert jax.tree.structure(loaded_theta) == jax.tree.structure(theta)
    ckpt.save_composition_config(str(tmp_path), ccfg)  # resuming with the same wiring: fine
    with pytest.raises(ckpt.BaseModelMismatch, match=r"composition\.json holds a composition wired differently: "
                                                     r"options\.gate: trained with True, given False$"):
        ckpt.save_composition_config(str(tmp_path), dataclasses.replace(
            ccfg, options=dataclasses.replace(everything, gate=False)))


def test_composition_json_of_the_old_flat_layout_still_reads(tmp_path):
    """Runs saved before CompositionOptions hold the options as top-level fields (and, older
    still, without the options added since): they load, resume, and say what differs."""
    ccfg, _, frozen = tiny_composition()
    ccfg = dataclasses.replace(ccfg, options=CompositionOptions(query_norm=True, gate=True))
    _composition_run(tmp_path, ccfg, frozen)
    path = tmp_path / "composition.json"
    path.write_text(json.dumps({"connections": [[[3, 1]]], "num_heads": 4, "query_norm": True,
                                "zero_init_out": False, "gate": True, "dtype": "float32"}))  # no cross_rope yet
    assert ckpt.load_theta(str(tmp_path), ANCHOR, [AUG])[0] == ccfg
    ckpt.save_composition_config(str(tmp_path), ccfg)
    with pytest.raises(ckpt.BaseModelMismatch, match=r"options\.query_norm: trained with True, given False$"):
        ckpt.save_composition_config(str(tmp_path), dataclasses.replace(ccfg, options=CompositionOptions(gate=True)))
    assert "options" not in json.loads(path.read_text())  # checked, never rewritten
    # An option this version does not know is named, not ignored.
    path.write_text(json.dumps({"connections": [[[3, 1]]], "num_heads": 4, "dtype": "float32",
                                "options": {"gate": True, "fancy_norm": True}}))
    for read in (lambda: ckpt.load_theta(str(tmp_path), ANCHOR, [AUG]),
                 lambda: ckpt.save_composition_config(str(tmp_path), ccfg)):
        with pytest.raises(ckpt.CheckpointError, match=r"composition\.json: unknown option 'fancy_norm'; the options "
                                                       r"are query_norm, zero_init_out, gate, cross_rope"):
            read()


def _state(step, n=8):
    return {"x": jnp.full((n,), step, jnp.float32), "step": jnp.int32(step)}


def test_keep_last_k_and_restore(tmp_path):
    c = ckpt.Checkpoints(str(tmp_path), {}, keep=2)
    for step in (1, 2, 3):
        c.save(step, _state(step), {"data_position": [0, step]})
    c.wait()
    assert c.manager.all_steps() == [2, 3] and c.latest_step() == 3
    state, meta = c.restore(ckpt.abstract(_state(0)))
    assert float(state["x"][0]) == 3.0 and meta["data_position"] == [0, 3]
    state, _ = c.restore(ckpt.abstract(_state(0)), step=2)
    assert float(state["x"][0]) == 2.0
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint for step 1 \(has \[2, 3\]\)"):
        c.restore(ckpt.abstract(_state(0)), step=1)
    c.close()
    with pytest.raises(ckpt.CheckpointError, match="has no checkpoint"):
        ckpt.Checkpoints(str(tmp_path / "empty"), {}).restore(ckpt.abstract(_state(0)))


_BIG = 32 * 1024 * 1024  # floats: a save slow enough to be killed in the middle


def test_a_killed_save_never_becomes_the_latest(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_checkpoint", str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved 1"
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.time() + 120
    while not any(".orbax-checkpoint-tmp" in name for name in os.listdir(ckpt_dir)):
        assert time.time() < deadline and proc.poll() is None, "no save of step 2 started"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = os.listdir(ckpt_dir)
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in left), left  # killed mid-save
    c = ckpt.Checkpoints(str(tmp_path), {})
    assert c.latest_step() == 1 and c.manager.all_steps() == [1]
    state, _ = c.restore(ckpt.abstract(_state(0, _BIG)))
    assert float(state["x"][-1]) == 1.0
    c.close()


def test_resume_after_sigkill_repeats_the_uninterrupted_losses(hf_dirs, tmp_path):  # noqa: F811
    args = ["--steps", "60", "--save-every", "5", "--lr", "0.003", "--warmup", "5", "--mesh", "data=2",
            "--seed", "3"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "train.compose", *compose_argv(hf_dirs, killed, *args)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").is_dir():
        assert time.time() < deadline and proc.poll() is None, "the run to kill ended before its step-10 checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ckpt.Checkpoints(str(killed), ckpt.read_bases(str(killed))).latest_step()
    assert 10 <= done < 60  # killed mid-run
    assert compose.main(compose_argv(hf_dirs, killed, *args, "--resume")) == 0
    reference = tmp_path / "reference"
    assert compose.main(compose_argv(hf_dirs, reference, *args)) == 0  # uninterrupted

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]
    assert losses(killed) == losses(reference)  # bitwise, every step
    assert [s for s, _ in losses(killed)] == list(range(1, 61))


if __name__ == "__main__":
    # test_a_killed_save_never_becomes_the_latest: one complete save, then saves until killed.
    c = ckpt.Checkpoints(sys.argv[1], {})
    c.save(1, _state(1, _BIG), {})
    c.wait()
    print("saved 1", flush=True)
    for step in range(2, 100):
        c.save(step, _state(step, _BIG), {})
        c.wait()
