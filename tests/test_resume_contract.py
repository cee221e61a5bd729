"""Resuming is a contract (calm_jax.checkpoint.history): other data or another schedule is refused
in one line naming what differs, unless --resume-new-data / --extend-steps ask for it, which is
said and recorded; the lr never jumps. Negative settings are refused with the reason; --help
shows the defaults and the EOS convention of the losses."""

import json
import random

import numpy as np
import pytest

from calm_jax import trainer
from calm_jax.checkpoint import history
from tests.test_train_cli import _write_jsonl, compose_argv, hf_dirs  # noqa: F401 (a fixture)
from train import compose


def _error(capsys, argv):
    assert compose.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def _lrs(run):
    return {r["step"]: r["lr"] for r in trainer.read_metrics(str(run)) if "loss" in r}


def test_resume_refuses_other_data_or_schedule_unless_asked_and_records_it(hf_dirs, tmp_path, capsys,  # noqa: F811
                                                                           monkeypatch):
    records = [json.loads(ln) for ln in open(hf_dirs["train"])]
    shuffled = _write_jsonl(tmp_path / "shuffled.jsonl", random.Random(1).sample(records, len(records)))
    doubled = _write_jsonl(tmp_path / "doubled.jsonl", records + records)
    smaller = _write_jsonl(tmp_path / "smaller.jsonl", records[:5])
    plotted = []
    plot = trainer.plot_losses
    monkeypatch.setattr(trainer, "plot_losses", lambda m, png: plotted.append(len(trainer.read_metrics(
        str(tmp_path / "run")))) or plot(m, png))
    run = tmp_path / "run"
    argv = compose_argv(hf_dirs, run, "--lr", "0.003", "--eval-data", hf_dirs["eval"], "--eval-every", "2")
    assert compose.main([*argv, "--steps", "4"]) == 0
    assert plotted == [3, 6, 6]  # loss.png redrawn at each evaluation (steps 2 and 4: 2 + 1 lines each), and at the end
    capsys.readouterr()
    for data in (shuffled, doubled, smaller):
        err = _error(capsys, compose_argv({**hf_dirs, "train": data}, run, "--resume"))
        assert f"cannot resume at step 4: the data differs: {data} (" in err
        assert "(give --resume-new-data to continue on it)" in err
    err = _error(capsys, [*argv, "--resume", "--steps", "8"])
    assert ("cannot resume at step 4: the schedule differs: steps: trained with 4, given 8 "
            "(give --extend-steps to train on to step 8)") in err
    err = _error(capsys, [*argv, "--resume", "--lr", "0.01"])
    assert "cannot resume with other settings: lr: trained with 0.003, given 0.01" in err
    assert trainer.read_metrics(str(run))[-1]["step"] == 4  # nothing refused changed the run

    assert compose.main([*argv, "--resume", "--steps", "8", "--extend-steps"]) == 0
    printed = capsys.readouterr().out
    assert "extending the schedule from 4 to 8 steps at step 4: extended: cosine from lr 0.0003 at step 4" in printed
    lrs = _lrs(run)
    assert max(lrs[s] for s in range(5, 9)) <= lrs[4] + 1e-12  # no jump: the finished run trains on at its end lr
    assert compose.main([*compose_argv({**hf_dirs, "train": smaller}, run), "--resume", "--resume-new-data",
                         "--steps", "10", "--extend-steps"]) == 0
    printed = capsys.readouterr().out
    assert f"continuing at step 8 on new data: {smaller} (" in printed and "5 examples" in printed
    # --resume alone takes the run's settings (steps 10, its data check now the smaller file's).
    assert compose.main(compose_argv({**hf_dirs, "train": smaller}, run, "--resume")) == 0
    assert "already trained for 10 steps" in capsys.readouterr().out
    meta = history.latest_meta(str(run))
    assert [(s["from_step"], s["to_step"], s["data"]["examples"]) for s in meta["history"]] == [
        (0, 4, 32), (4, 8, 32), (8, 10, 5)]


def test_an_extension_mid_decay_starts_at_the_lr_reached():
    cfg = trainer.TrainConfig(steps=60, warmup=6, lr=1e-3, end_lr_ratio=0.1)
    fp = {"path": "d.jsonl", "bytes": 1, "sha256": "a", "examples": 3}
    meta = {"train_config": {**vars(cfg)}, "history": [{"from_step": 0, "to_step": 60,
                                                        "schedule": history.first_schedule(cfg), "data": fp}]}
    old = history.schedule_fn(meta["history"])
    longer = cfg.replace(steps=100)
    with pytest.raises(Exception, match="give --extend-steps to train on to step 100"):
        history.resume_history("run", meta, longer, fp, 30, say=lambda *_: None)
    new, _ = history.resume_history("run", meta, longer, fp, 30, extend_steps=True, say=lambda *_: None)
    lr = history.schedule_fn(new)
    steps = np.arange(0, 100)
    lrs = np.array([float(lr(s)) for s in steps])
    assert np.allclose(lrs[:31], [float(old(s)) for s in range(31)])  # the steps already run: unchanged
    assert np.all(np.diff(lrs[6:]) <= 1e-12)  # decays from the peak to the end, no jump anywhere
    assert float(lr(100)) == pytest.approx(1e-4)
    # Resumed inside the warmup: the warmup ends where planned, the cosine runs to the new total.
    early, _ = history.resume_history("run", meta, longer, fp, 3, extend_steps=True, say=lambda *_: None)
    assert early[-1]["schedule"]["rule"] == "warmup_cosine" and early[-1]["schedule"]["steps"] == 100


def test_negative_settings_are_refused_with_the_reason_and_help_shows_defaults(capsys):
    required = ["--anchor", "a", "--augment", "b", "--data", "d", "--out", "o"]
    for flag, value, reason in (("--lr", "-1e-3", "lr must be >= 0, got -0.001"),
                                ("--warmup", "-5", "warmup must be >= 0, got -5"),
                                ("--steps", "0", "steps must be >= 1, got 0")):
        with pytest.raises(SystemExit, match=f"bad training settings: {reason}"):
            compose.read_config([*required, flag, value])
    assert compose.read_config([*required, "--lr", "0"]).config.train.lr == 0  # lr 0 stays allowed
    text = " ".join(compose.build_parser().format_help().split())
    for shown in ("--lr LR (default: 0.001)", "--batch-size BATCH_SIZE global batch size (default: 8)",
                  "--remat {none,full,dots}", "(default: none)", "--pack several examples per row",
                  "--frozen-dtype {float32,bfloat16} storage dtype of the frozen models (default: float32)",
                  "count the EOS appended to each target", "eval.loglik scores the target alone, without that EOS",
                  "--extend-steps", "--resume-new-data"):
        assert shown in text
    assert compose.read_config(required).config.train == trainer.TrainConfig()  # flags still default to "not given"
