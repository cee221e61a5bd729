"""Θ_C as a shareable artifact: python -m train.export, and loading an export wherever a run
directory is taken (calm_jax.load_composition, checkpoint.load_theta, the eval scripts, train.compose
--init-from)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import calm_jax
from calm_jax import checkpoint as ckpt
from calm_jax import decoding, scoring
from calm_jax.loading import CheckpointError, load_pretrained
from eval import exact_match, loglik
from tests.test_train_cli import compose_argv, hf_dirs  # noqa: F401 (a fixture)
from train import compose, export

WIRING = ["--connections", "0:1-0,0:2-2", "--gate"]


@pytest.fixture(scope="module")
def trained(hf_dirs, tmp_path_factory):  # noqa: F811
    """A tiny composition trained 3 steps by train.compose (checkpoints 2 and 3), and its export."""
    root = tmp_path_factory.mktemp("export")
    run, out = root / "run", root / "export"
    assert compose.main(compose_argv(hf_dirs, run, "--steps", "3", "--save-every", "2", "--lr", "0.003",
                                     "--warmup", "1", "--eval-data", hf_dirs["eval"], *WIRING)) == 0
    assert export.main(["--run", str(run), "--out", str(out)]) == 0
    return {"run": str(run), "export": str(out), "root": root}


def _models(hf_dirs, augment="augment"):  # noqa: F811
    return load_pretrained(hf_dirs["anchor"]), [load_pretrained(hf_dirs[augment])]


def test_export_holds_theta_alone_and_loads_bit_for_bit(hf_dirs, trained):  # noqa: F811
    out = trained["export"]
    assert sorted(os.listdir(out)) == ["README.md", "composition.json", "theta.safetensors"]
    anchor, augments = _models(hf_dirs)
    ccfg, theta = ckpt.load_theta(trained["run"], anchor, augments)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(theta))
    size = os.path.getsize(os.path.join(out, "theta.safetensors"))
    assert 0 <= size - nbytes < 4096  # Θ_C and a header: no frozen weight, no optimizer state
    tensors = load_file(os.path.join(out, "theta.safetensors"))
    assert set(tensors) == set(ckpt.theta_tensor_names(theta)) and "augment_0/conn_1/gate" in str(sorted(tensors))
    assert {t.dtype for t in tensors.values()} == {np.dtype("float32")}  # as trained

    record = json.loads(open(os.path.join(out, "composition.json")).read())
    run_bases = json.loads(open(os.path.join(trained["run"], "bases.json")).read())
    assert {k: b["fingerprint"] for k, b in record["bases"].items()} == run_bases
    assert [b["trained_with"] for b in record["bases"].values()] == [hf_dirs["anchor"], hf_dirs["augment"]]
    assert record["composition"] == json.loads(open(os.path.join(trained["run"], "composition.json")).read())
    assert record["step"] == 3 and record["theta"]["bytes"] == nbytes
    training = record["training"]
    assert training["train_config"]["steps"] == 3 and training["train_examples"] == 32
    assert training["data"] == hf_dirs["train"] and training["target_tokens"] > 0 and "eval_loss" in training
    readme = open(os.path.join(out, "README.md")).read()
    assert f'calm_jax.load_composition("{hf_dirs["anchor"]}", ["{hf_dirs["augment"]}"], "{out}")' in readme
    assert f"--composition {out}" in readme and f"--init-from {out}" in readme
    assert '--connections "0:1-0,0:2-2"' in readme and "--gate" in readme and "32 examples" in readme

    assert ckpt.composition_step(out) == ckpt.composition_step(trained["run"]) == 3
    ccfg_x, theta_x = ckpt.load_theta(out, anchor, augments)
    assert ccfg_x == ccfg
    assert jax.tree.structure(theta_x) == jax.tree.structure(theta)
    for a, b in zip(jax.tree.leaves(theta_x), jax.tree.leaves(theta)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="is an export of step 3 only; it has no step 2"):
        ckpt.load_theta(out, anchor, augments, step=2)


def test_eval_scripts_score_an_export_as_its_run_directory(hf_dirs, trained, tmp_path):  # noqa: F811
    records = [json.loads(line) for line in open(hf_dirs["train"])][:6]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = ["--anchor", hf_dirs["anchor"], "--augment", hf_dirs["augment"]]
    outs = {}
    for name in ("run", "export"):
        em = tmp_path / f"em-{name}"
        assert exact_match.main([*flags, "--composition", trained[name], "--data", str(data), "--out", str(em),
                                 "--label", "calm", "--max-new-tokens", "4"]) == 0
        scores = tmp_path / f"ll-{name}.jsonl"
        assert loglik.main([*flags, "--composition", trained[name], "--data", str(data), "--out", str(scores)]) == 0
        results = json.loads((em / "results.json").read_text())["calm"]
        assert results["source"]["step"] == 3
        outs[name] = (results["scores"], (em / "predictions-calm.jsonl").read_text(), scores.read_text())
    assert outs["export"] == outs["run"]  # the same generations, exact-match scores and log-likelihoods
    # Other base models are refused, naming what differs.
    with pytest.raises(SystemExit, match="belongs to other base models:\n  augment_0 has the same config but "
                                         "different weights"):
        exact_match.main(["--anchor", hf_dirs["anchor"], "--augment", hf_dirs["other"], "--composition",
                          trained["export"], "--data", str(data), "--out", str(tmp_path / "em-other")])


def test_load_composition_is_the_export_readme_and_the_eval_path(hf_dirs, trained, tmp_path):  # noqa: F811
    """calm_jax.load_composition, as the export's README shows it: the same Θ_C bit for bit as
    checkpoint.load_theta, generation and log-likelihoods equal to the library functions' on the
    same model, its wiring checked against a Wiring asked for; bad input refused before weights."""
    anchor, augments = _models(hf_dirs)
    _, theta = ckpt.load_theta(trained["export"], anchor, augments)
    lm = calm_jax.load_composition(hf_dirs["anchor"], [hf_dirs["augment"]], trained["export"])
    assert lm.step == 3 and lm.composition.options.gate
    for x, y in zip(jax.tree.leaves(lm.params["theta"]), jax.tree.leaves(theta)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    prompts = [r["prompt"] for r in map(json.loads, open(hf_dirs["train"]))][:3]
    gens = lm.generate(prompts, max_new_tokens=4)
    direct = decoding.generate(lm.model, lm.params, prompts, max_new_tokens=4, tokenizer=lm.tokenizer)
    assert [g.tokens for g in gens] == [g.tokens for g in direct]
    records = [{"prompt": p, "target": "abc"} for p in prompts]
    assert lm.loglik(records) == scoring.loglik(lm.model, lm.params, lm.tokenizer, records)
    # The plain model, same interface.
    plain = calm_jax.load_model(hf_dirs["anchor"])
    assert plain.composition is None and len(plain.generate(prompts[:1], max_new_tokens=2)) == 1
    # A wiring asked for must be the trained one; a fresh Θ_C takes the paper's layers by default.
    with pytest.raises(ckpt.BaseModelMismatch, match="wired differently"):
        calm_jax.load_composition(hf_dirs["anchor"], [hf_dirs["augment"]], trained["export"],
                                  wiring=calm_jax.Wiring())
    fresh = calm_jax.load_composition(hf_dirs["anchor"], [hf_dirs["augment"]], theta_seed=1)
    assert fresh.theta_dir is None and fresh.composition.connections == (calm_jax.default_connections(
        fresh.composition.augments[0].num_layers, fresh.composition.anchor.num_layers),)
    # An augmenting model without tokenizer files is refused (its vocabulary cannot be checked),
    # before any weight is read.
    bare = tmp_path / "bare"
    shutil.copytree(hf_dirs["augment"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    with pytest.raises(CheckpointError, match="bare has no tokenizer files, so its vocabulary cannot be checked"):
        calm_jax.check_composition(hf_dirs["anchor"], [str(bare)])


def test_an_export_refuses_other_base_models(hf_dirs, trained):  # noqa: F811
    anchor, other = _models(hf_dirs, "other")
    with pytest.raises(ckpt.BaseModelMismatch, match="augment_0 has the same config but different weights"):
        ckpt.load_theta(trained["export"], anchor, other)
    with pytest.raises(ckpt.BaseModelMismatch, match="augment_0 config differs"):
        ckpt.load_theta(trained["export"], anchor, [anchor])
    # The same models in bf16 are the same models.
    ckpt.load_theta(trained["export"], load_pretrained(hf_dirs["anchor"], param_dtype="bfloat16"),
                          [load_pretrained(hf_dirs["augment"], param_dtype="bfloat16")])


def test_a_damaged_export_is_refused_naming_the_file_and_tensor(hf_dirs, trained, tmp_path):  # noqa: F811
    anchor, augments = _models(hf_dirs)

    def damaged(name, damage):
        path = tmp_path / name
        shutil.copytree(trained["export"], path)
        damage(str(path / "theta.safetensors"))
        return str(path)

    def truncate(file):
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) - 100)

    def drop_tensor(file):
        tensors = load_file(file)
        tensors.pop("augment_0/conn_1/q/kernel")
        save_file(tensors, file)

    def flip_a_byte(file):
        with open(file, "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))

    for name, damage, message in [
            ("truncated", truncate, r"truncated or not a safetensors file"),
            ("missing", drop_tensor, r"has no tensor augment_0/conn_1/q/kernel"),
            ("flipped", flip_a_byte, r"is corrupt or was replaced: its sha256 is")]:
        path = damaged(name, damage)
        with pytest.raises(CheckpointError, match=message) as e:
            ckpt.load_theta(path, anchor, augments)
        assert os.path.join(path, "theta.safetensors") in str(e.value)
    gone = tmp_path / "no-theta"
    shutil.copytree(trained["export"], gone)
    os.remove(gone / "theta.safetensors")
    with pytest.raises(CheckpointError, match="is an export without its theta.safetensors"):
        ckpt.load_theta(str(gone), anchor, augments)


def test_export_directory_policy(trained, capsys):
    root, run = trained["root"], trained["run"]
    stranger = root / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):  # never overwritten, --force or not
        assert export.main(["--run", run, "--out", str(stranger), *force]) == 2
        assert "is not empty and is not an export" in capsys.readouterr().err
    assert (stranger / "notes.txt").read_text() == "mine"
    again = root / "again"
    assert export.main(["--run", run, "--out", str(again), "--step", "2"]) == 0
    assert ckpt.composition_step(str(again)) == 2
    assert export.main(["--run", run, "--out", str(again)]) == 2
    assert "already holds an export; give --force to replace it" in capsys.readouterr().err
    (again / "stray").write_text("x")
    assert export.main(["--run", run, "--out", str(again), "--force"]) == 0
    assert sorted(os.listdir(again)) == ["README.md", "composition.json", "theta.safetensors"]
    assert ckpt.composition_step(str(again)) == 3
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no temporary directory left
    assert export.main(["--run", run, "--out", str(root / "x"), "--step", "1"]) == 2
    assert "has no checkpoint for step 1 (has [2, 3])" in capsys.readouterr().err
    assert export.main(["--run", trained["export"], "--out", str(root / "y")]) == 2
    assert "is an export already" in capsys.readouterr().err


def test_train_compose_init_from_an_export(hf_dirs, trained, tmp_path, capsys):  # noqa: F811
    # lr 0: the one step changes nothing, so the new run's Θ_C is the export's.
    run = tmp_path / "continued"
    assert compose.main(compose_argv(hf_dirs, run, "--steps", "1", "--lr", "0", *WIRING,
                                     "--init-from", trained["export"])) == 0
    assert f"Θ_C initialised from {trained['export']} (step 3)" in capsys.readouterr().out
    anchor, augments = _models(hf_dirs)
    _, started = ckpt.load_theta(trained["export"], anchor, augments)
    _, now = ckpt.load_theta(str(run), anchor, augments)
    for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(started)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another wiring is refused before any weights load; other base models once they have.
    rc = compose.main(compose_argv(hf_dirs, tmp_path / "r1", "--steps", "1", "--connections", "0:1-0,0:2-2",
                                   "--init-from", trained["export"]))
    assert rc == 2 and "holds a composition wired differently: options.gate: trained with True, given False" \
        in capsys.readouterr().err
    rc = compose.main(compose_argv({**hf_dirs, "augment": hf_dirs["other"]}, tmp_path / "r2", "--steps", "1",
                                   *WIRING, "--init-from", trained["run"]))
    assert rc == 2 and "belongs to other base models" in capsys.readouterr().err


def test_export_is_readable_per_the_umask_and_its_readme_states_every_segment(hf_dirs, tmp_path):  # noqa: F811
    """A run of 2 steps (warmup 1) extended to 4 on a copy of its data: the export's README lists
    both segments' schedules, not only the last invocation's; its modes are the umask's, not
    tempfile's 0700."""
    run, out = tmp_path / "run", tmp_path / "export"
    assert compose.main(compose_argv(hf_dirs, run, "--steps", "2", "--lr", "0.003", "--warmup", "1")) == 0
    moved = str(shutil.copy(hf_dirs["train"], tmp_path / "moved.jsonl"))  # same content elsewhere: the same data
    assert compose.main(compose_argv({**hf_dirs, "train": moved}, run, "--steps", "4", "--resume",
                                     "--extend-steps")) == 0
    old = os.umask(0o022)
    try:
        assert export.main(["--run", str(run), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)} == {
        "README.md": 0o644, "composition.json": 0o644, "theta.safetensors": 0o644}
    history = json.loads((out / "composition.json").read_text())["training"]["history"]
    assert [(s["from_step"], s["to_step"], s["schedule"]["rule"]) for s in history] == [
        (0, 2, "warmup_cosine"), (2, 4, "cosine_from")]
    readme = (out / "README.md").read_text()
    assert "steps 0 → 2: lr 0.003, warmup 1, cosine to 0.0003 at step 2" in readme
    assert "steps 2 → 4: extended: cosine from lr 0.0003 at step 2 to 0.0003 at step 4" in readme
