"""Ctrl-C: train.compose finishes the step, saves it, exits 130 naming the step and the resume
command, and the resume redoes no step; a second Ctrl-C stops at once; a study's worker pool
passes Ctrl-C on to its workers and keeps the finished jobs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from calm_jax import trainer
from calm_jax.experiment import workers
from tests.test_train_cli import compose_argv, hf_dirs  # noqa: F401 (a fixture)
from train import compose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(run):
    return [(r["step"], r["loss"]) for r in trainer.read_metrics(str(run)) if "loss" in r]


def test_ctrl_c_saves_the_step_reached_and_resume_redoes_none(hf_dirs, tmp_path):  # noqa: F811
    args = ["--steps", "100", "--save-every", "0", "--eval-every", "0", "--lr", "0.003", "--warmup", "5",
            "--mesh", "data=1", "--seed", "4"]
    run = tmp_path / "run"
    argv = compose_argv(hf_dirs, run, *args)
    proc = subprocess.Popen([sys.executable, "-m", "train.compose", *argv], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "the run ended before its first metrics line"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    step = int(line.split("after step ")[1].split(",")[0])
    print(f"interrupted at step {step}")
    assert 1 <= step < 100
    assert line == (f"interrupted (Ctrl-C) after step {step}, saved as a checkpoint in {run}; continue with: "
                    f"python -m train.compose {' '.join(argv)} --resume")
    assert sorted(os.listdir(run / "checkpoints")) == [str(step)]
    assert [s for s, _ in _losses(run)] == list(range(1, step + 1))  # every step it finished is recorded
    assert os.path.getsize(run / "loss.png") > 1000  # the curve so far
    assert compose.main([*argv, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert compose.main(compose_argv(hf_dirs, reference, *args)) == 0
    assert _losses(run) == _losses(reference)  # bitwise: no step redone, none skipped


def test_a_second_ctrl_c_stops_at_once(capsys):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    stop = trainer._StopOnSigint(print)
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        with stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert stop.requested  # the first only asks the loop to stop after its step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert "finishing this step and saving a checkpoint" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # given back


def _setup():
    return None


def _job(flag_dir, _context, name):
    """"quick" waits until "slow" has started, then ends; "slow" runs until interrupted."""
    if name == "slow":
        open(os.path.join(flag_dir, "slow-started"), "w").close()
        time.sleep(120)
        return "slow finished"
    while not os.path.exists(os.path.join(flag_dir, "slow-started")):
        time.sleep(0.01)
    return "quick finished"


def test_a_worker_pool_passes_ctrl_c_on_and_keeps_finished_jobs(tmp_path):
    import functools

    done = {}

    def on_done(name, result):
        done[name] = result
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once the quick job is kept

    before = signal.getsignal(signal.SIGINT)
    start = time.time()
    with pytest.raises(workers.Interrupted) as caught:
        workers.run_jobs("jobs", ["quick", "slow"], functools.partial(_job, str(tmp_path)), _setup, 2,
                         workers.Timer(), on_done, str(tmp_path / "logs"))
    assert time.time() - start < 60  # the slow job was stopped, not waited for
    assert done == {"quick": "quick finished"}
    assert (caught.value.finished, caught.value.stopped) == (["quick"], ["slow"])
    assert str(caught.value) == "jobs: 1 job(s) finished and kept, slow stopped (their training saved at the step " \
                                "reached)"
    assert signal.getsignal(signal.SIGINT) is before

