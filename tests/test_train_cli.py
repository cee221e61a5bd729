"""`python -m train.compose` end to end on tiny HF models, and its bad-input errors."""

import dataclasses
import json
import os
import random
import shutil

import numpy as np
import pytest

from calm_jax import checkpoint as ckpt
from calm_jax.composition import CompositionOptions, param_count
from calm_jax.loading import load_pretrained
from tests.hf_models import make_tokenizer, save_hf_model
from train import compose


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Tiny anchor and augmenting HF models sharing one tokenizer, and train/eval JSONL files."""
    root = tmp_path_factory.mktemp("compose")
    tok = make_tokenizer()
    dirs = {}
    for name, spec, seed in (("anchor", "llama", 0), ("augment", "llama_tied_headdim", 1),
                             ("other", "llama_tied_headdim", 2)):
        dirs[name] = str(root / name)
        save_hf_model(spec, dirs[name], seed)
        tok.save_pretrained(dirs[name])
    rng = random.Random(0)
    keys = ["".join(rng.choice("abcdef") for _ in range(3)) for _ in range(40)]
    dirs["train"] = _write_jsonl(root / "train.jsonl", [{"prompt": k + "=", "target": k[::-1]} for k in keys[:32]])
    dirs["eval"] = _write_jsonl(root / "eval.jsonl", [{"text": k + "=" + k[::-1]} for k in keys[32:]])
    return dirs


def compose_argv(d, out, *extra):
    return ["--anchor", d["anchor"], "--augment", d["augment"], "--data", d["train"], "--out", str(out),
            "--seq-len", "16", "--batch-size", "8", "--no-progress", *extra]


def test_cli_end_to_end(hf_dirs, tmp_path, capsys):
    config = _write_jsonl(tmp_path / "c.json", [])
    with open(config, "w") as f:
        json.dump({"steps": 4, "lr": 0.003, "warmup": 1, "save_every": 100, "eval_every": 3, "seed": 5}, f)
    out = tmp_path / "run"
    # The flag overrides the config file's steps; remat and the chunked loss go through to the step.
    rc = compose.main(compose_argv(hf_dirs, out, "--config", config, "--steps", "6", "--eval-data", hf_dirs["eval"],
                                   "--mesh", "data=4,model=2", "--connections", "0:1-0,0:2-2", "--remat", "full",
                                   "--loss-chunk", "5"))
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "augment 0: layer 1 -> anchor layer 0" in printed.out and "layer 2 -> anchor layer 2" in printed.out
    assert "memory: remat full, loss in chunks of 5 positions" in printed.out
    records = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval_tokens"] > 0 for r in evals)
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert os.path.getsize(out / "loss.png") > 1000
    assert sorted(os.listdir(out / "checkpoints")) == ["6"]  # save_every 100: only the final one
    anchor, augment = load_pretrained(hf_dirs["anchor"]), load_pretrained(hf_dirs["augment"])
    ccfg, theta = ckpt.load_theta(str(out), anchor, [augment])
    assert ccfg.connections == (((1, 0), (2, 2)),)
    assert f"Θ_C parameters: {param_count(theta):,}" in printed.out
    # Resuming a finished run trains nothing more and keeps its metrics...
    assert compose.main(compose_argv(hf_dirs, out, "--config", config, "--steps", "6", "--resume",
                                     "--connections", "0:1-0,0:2-2")) == 0
    assert len([ln for ln in open(out / "metrics.jsonl")]) == len(records)
    # ... and resuming with other connections is refused.
    err = _error(capsys, compose_argv(hf_dirs, out, "--config", config, "--resume"))
    assert "wired differently: connections: trained with [[[1, 0], [2, 2]]], given [[[2, 2]]]" in err


def test_composition_option_flags_are_made_from_the_options(tmp_path):
    """One flag per CompositionOptions field, its help the field's doc; flags and --config keys
    both reach the composition's options; train.plan offers the same flags."""
    from train import plan

    actions = {a.dest: a for a in compose.build_parser()._actions}
    for f in dataclasses.fields(CompositionOptions):
        assert actions[f.name].option_strings == [compose.option_flag(f.name)]
        assert actions[f.name].help == f"{f.metadata['help']} (not in the paper) (default: off)"
    assert compose.option_flag("zero_init_out") == "--zero-init-out"
    required = ["--anchor", "a", "--augment", "b", "--data", "d", "--out", "o"]
    assert compose.read_config(required).config.options == CompositionOptions()
    assert compose.read_config([*required, "--gate", "--cross-rope"]).config.options == CompositionOptions(
        gate=True, cross_rope=True)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"query_norm": True, "zero-init-out": True}))
    assert compose.read_config([*required, "--config", str(config), "--gate"]).config.options == \
        CompositionOptions(query_norm=True, zero_init_out=True, gate=True)
    # --set reaches any field, over the file and under the named flags.
    resolved = compose.read_config([*required, "--config", str(config), "--set", "options.query_norm=False",
                                    "--set", "train.b2=0.98", "--set", "train.steps=7", "--steps", "9"])
    assert (resolved.config.options.query_norm, resolved.config.train.b2, resolved.config.train.steps) == \
        (False, 0.98, 9)
    assert {"options.query_norm", "train.b2", "train.steps", "anchor"} <= resolved.given
    with pytest.raises(SystemExit, match="TrainConfig has no field 'b3'"):
        compose.read_config([*required, "--set", "train.b3=0.9"])
    plan_flags = {s for a in plan.build_parser()._actions for s in a.option_strings}
    assert {compose.option_flag(name) for name in CompositionOptions.names()} <= plan_flags


def _error(capsys, argv):
    rc = compose.main(argv)
    assert rc == 2
    return capsys.readouterr().err


def test_cli_bad_inputs(hf_dirs, tmp_path, capsys):
    d = hf_dirs
    err = _error(capsys, compose_argv({**d, "train": str(tmp_path / "nope.jsonl")}, tmp_path / "r1", "--steps", "1"))
    assert "data file not found:" in err and "nope.jsonl" in err
    err = _error(capsys, compose_argv(d, tmp_path / "r2", "--mesh", "data=8,model=2"))
    assert "needs 16 devices" in err and "only 8 are available" in err
    err = _error(capsys, compose_argv(d, tmp_path / "r3", "--mesh", "dta=2"))
    assert "bad mesh spec 'dta=2'" in err
    err = _error(capsys, compose_argv(d, tmp_path / "r4", "--connections", "0:5-1"))
    assert "layer 5 out of range for augmenting model 0" in err
    err = _error(capsys, compose_argv({**d, "anchor": str(tmp_path / "missing")}, tmp_path / "r5"))
    assert "model directory not found" in err
    err = _error(capsys, compose_argv(d, tmp_path / "r6", "--seq-len", "4"))
    assert "more than the sequence length 4" in err
    with pytest.raises(SystemExit, match="missing required --augment"):
        compose.main(["--anchor", d["anchor"], "--data", d["train"], "--out", str(tmp_path / "r7")])
    with pytest.raises(SystemExit, match=r"--connections '0:3': expected"):
        compose.main(compose_argv(d, tmp_path / "r8", "--connections", "0:3"))
    with pytest.raises(SystemExit, match="batch_size 8 is not divisible by grad_accum 3"):
        compose.main(compose_argv(d, tmp_path / "r9", "--grad-accum", "3"))
    bad_config = _write_jsonl(tmp_path / "bad.json", [{"stepz": 3}])
    with pytest.raises(SystemExit, match=r"unknown keys \['stepz'\]"):
        compose.main(compose_argv(d, tmp_path / "r10", "--config", bad_config))


def test_cli_refuses_to_overwrite_or_to_resume_against_other_models(hf_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert compose.main(compose_argv(hf_dirs, out, "--steps", "1")) == 0
    capsys.readouterr()
    err = _error(capsys, compose_argv(hf_dirs, out, "--steps", "2"))
    assert "already has checkpoints (latest: step 1)" in err and "--resume" in err
    err = _error(capsys, compose_argv({**hf_dirs, "augment": hf_dirs["other"]}, out, "--steps", "2", "--resume"))
    assert "belongs to other base models" in err
    assert "augment_0 has the same config but different weights" in err
    with pytest.raises(ckpt.BaseModelMismatch, match="augment_0 has the same config but different weights"):
        ckpt.load_theta(str(out), load_pretrained(hf_dirs["anchor"]), [load_pretrained(hf_dirs["other"])])
    # The same models stored in bf16 are the same models.
    ckpt.load_theta(str(out), load_pretrained(hf_dirs["anchor"], param_dtype="bfloat16"),
                          [load_pretrained(hf_dirs["augment"], param_dtype="bfloat16")])
    # So are they in float16, as eval's --dtype float16 loads them.
    ckpt.load_theta(str(out), load_pretrained(hf_dirs["anchor"], dtype="float16"),
                          [load_pretrained(hf_dirs["augment"], dtype="float16")])


def test_cli_checks_data_and_connections_before_loading_weights(hf_dirs, tmp_path, capsys, monkeypatch):
    from calm_jax import loaded

    # calm_jax.loaded is the one place a command line loads weights.
    monkeypatch.setattr(loaded, "load_pretrained", lambda *a, **k: pytest.fail("weights loaded before the checks"))
    numeric = _write_jsonl(tmp_path / "numeric.jsonl", [{"prompt": "ab=", "target": "ba"},
                                                        {"prompt": "64-28=", "target": 36}])
    err = _error(capsys, compose_argv({**hf_dirs, "train": numeric}, tmp_path / "r1"))
    assert "numeric.jsonl: line 2: field 'target' must be a string, found int 36" in err
    err = _error(capsys, compose_argv(hf_dirs, tmp_path / "r2", "--connections", "0:5-1"))
    assert "layer 5 out of range for augmenting model 0" in err
    err = _error(capsys, compose_argv(hf_dirs, tmp_path / "r3", "--seq-len", "4"))
    assert "train.jsonl: line 1 has 9 tokens, more than the sequence length 4" in err  # lines count from 1
    # An --out that cannot be made is named before anything else (here: under a file).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = _error(capsys, compose_argv(hf_dirs, blocker / "run"))
    assert f"--out {blocker / 'run'} cannot be written" in err and "nothing was run" in err


def test_cli_skip_invalid_and_truncate_count_what_they_change(hf_dirs, tmp_path, capsys):
    records = [json.loads(line) for line in open(hf_dirs["train"])][:8]
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", records[:6] + [{"prompt": "ab="}, {**records[6], "target": "x" * 40}])
    assert compose.main(compose_argv({**hf_dirs, "train": mixed}, tmp_path / "r1", "--steps", "1", "--warmup", "0",
                                     "--skip-invalid")) == 0
    out = capsys.readouterr().out
    assert "left out 2 invalid of 8 records (--skip-invalid): lines 7, 8" in out
    assert compose.main(compose_argv({**hf_dirs, "train": mixed}, tmp_path / "r2", "--steps", "1", "--warmup", "0",
                                     "--skip-invalid", "--truncate")) == 0
    out = capsys.readouterr().out
    assert "left out 1 invalid of 8 records (--skip-invalid): line 7" in out and "cut 1 of 8 examples to the sequence length 16 (--truncate): line 8" in out


def test_cli_defaults_fit_small_models_and_resume_says_so(hf_dirs, tmp_path, capsys, monkeypatch):
    """A 64-position anchor and 3 steps: the default --seq-len (128) and --warmup (100) do not fit,
    so others are used and said; the progress bar's rate leaves out the compiling first step."""
    from calm_jax import trainer

    small = tmp_path / "anchor64"
    shutil.copytree(hf_dirs["anchor"], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    bars = []
    progress = trainer._progress
    monkeypatch.setattr(trainer, "_progress", lambda cfg, start: bars.append(progress(cfg, start)) or bars[-1])
    out = tmp_path / "run"
    argv = ["--anchor", str(small), "--augment", hf_dirs["augment"], "--data", hf_dirs["train"], "--out", str(out),
            "--batch-size", "8"]
    assert compose.main([*argv, "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "--seq-len not given: using 64, the models' position limit, not the default 128" in printed
    assert "--warmup not given: using 0 (a tenth of --steps), not the default 100" in printed
    lrs = [r["lr"] for r in trainer.read_metrics(str(out)) if "loss" in r]
    assert lrs[0] == pytest.approx(1e-3)  # the first step already at the full (default) learning rate
    assert (bars[0].n, bars[0].initial) == (3, 1)  # rate and ETA are counted from step 1 on
    assert compose.main([*argv, "--steps", "4", "--resume", "--extend-steps"]) == 0
    assert f"{out}: resuming from step 3 (of 4)" in capsys.readouterr().out
    assert (bars[1].n, bars[1].initial) == (4, 4)
    with pytest.raises(SystemExit, match="warmup 5 is more than steps 3, so no step would run at the full"):
        compose.main([*argv, "--steps", "3", "--warmup", "5"])


def test_packed_training_resumes_exactly(hf_dirs, tmp_path, monkeypatch):
    """--pack: a run stopped after its step-3 checkpoint and resumed gives the uninterrupted
    run's loss at every step, bit for bit (the packed stream is a function of the saved
    position), and its rows hold several examples each."""
    from calm_jax import data as data_lib
    from calm_jax import trainer

    args = ["--steps", "6", "--save-every", "3", "--lr", "0.003", "--warmup", "1", "--seed", "2", "--pack",
            "--seq-len", "32", "--batch-size", "8"]
    reference = tmp_path / "reference"
    assert compose.main(compose_argv(hf_dirs, reference, *args)) == 0
    packed, calls = data_lib.packed_batch_at, []

    def stop_after_three(ds, position, batch_size, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped")
        batch, after = packed(ds, position, batch_size, seed)
        calls.append(int(batch["segment_BxT"].max(axis=1).sum()))  # examples in the batch
        return batch, after

    monkeypatch.setattr(data_lib, "packed_batch_at", stop_after_three)
    stopped = tmp_path / "stopped"
    assert compose.main(compose_argv(hf_dirs, stopped, *args)) == 130  # stopped at once: one line, no traceback
    assert min(calls) > 16  # eight rows of 32 slots hold more than one example each (7-8 tokens)
    monkeypatch.setattr(data_lib, "packed_batch_at", packed)
    assert compose.main(compose_argv(hf_dirs, stopped, *args, "--resume")) == 0

    def losses(run):
        return [(r["step"], r["loss"]) for r in trainer.read_metrics(str(run)) if "loss" in r]
    assert [s for s, _ in losses(stopped)] == list(range(1, 7))
    assert losses(stopped) == losses(reference)
