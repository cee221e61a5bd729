"""calm_jax.metrics.pass_at_k against the exact formula, and python -m eval.pass_at_k end to end."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from calm_jax.metrics import mean_pass_at_k, pass_at_k
from eval import pass_at_k as cli


def exact(n, c, k) -> float:
    """1 - C(n-c, k) / C(n, k) in exact arithmetic (math.comb is 0 when k > n - c)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_matches_the_combinatorial_formula():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(exact(n, c, k), rel=1e-12, abs=1e-15), (n, c, k)


def test_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c = 7 < k: every 8 of the 10 hold a passing sample
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1) and pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(np.int64(5), np.int32(2), 1) == pytest.approx(0.4)


def test_large_n_is_finite_and_accurate():
    with pytest.raises(OverflowError):  # why the product form: the binomials overflow float
        float(math.comb(2000, 1000))
    for n, c, k in ((1000, 1, 1), (1000, 10, 100), (1000, 500, 500), (1000, 3, 997), (1000, 999, 1),
                    (2000, 7, 1000), (2000, 1, 1999)):
        got = pass_at_k(n, c, k)
        assert math.isfinite(got) and got == pytest.approx(exact(n, c, k), rel=1e-9, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4), (0, 0, 1), (2.0, 1, 1),
                                     (True, 1, 1), ("3", 1, 1), (3, 1, None)])
def test_refuses_bad_counts(n, c, k):
    with pytest.raises(ValueError, match=rf"0 <= c <= n and 1 <= k <= n, got n={n!r}, c={c!r}, k={k!r}"):
        pass_at_k(n, c, k)


def test_mean_over_problems():
    assert mean_pass_at_k([(2, 1), (4, 0), (3, 3)], 1) == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k(iter([(3, 1)]), 2) == pytest.approx(exact(3, 1, 2))
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], 1)
    with pytest.raises(ValueError, match="n=1, c=0, k=2"):
        mean_pass_at_k([(3, 1), (1, 0)], 2)


# The command line with --samples, on HumanEval-like problems.
PROBLEMS = [
    {"task_id": "add", "prompt": "def add(a, b):\n", "tests": "def check(f):\n    assert f(1, 2) == 3\n",
     "entry_point": "add"},
    {"task_id": "neg", "prompt": "def neg(a):\n", "tests": "def check(f):\n    assert f(2) == -2\n",
     "entry_point": "neg"},
    {"prompt": "def sq(x):\n", "tests": "assert sq(3) == 9\n"},  # no task id, no entry point
]
SAMPLES = [
    {"task_id": "add", "completion": "    return a + b\n", "id": "a0"},
    {"task_id": "add", "completion": "    return a - b\n", "id": "a1"},
    {"problem_index": 0, "task_id": "add", "completion": "    return b + a\n", "id": "a2"},
    {"task_id": "neg", "completion": "    while True:\n        pass\n", "id": "n0"},
    {"problem_index": 1, "completion": "    return a\n", "id": "n1"},
    {"problem_index": 2, "completion": "    return x * x\n", "id": "s0"},
    {"problem_index": 2, "completion": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
     "id": "s1"},
]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return _write(tmp_path / "problems.jsonl", PROBLEMS), _write(tmp_path / "samples.jsonl", SAMPLES)


def test_cli_with_samples(files, tmp_path, capsys):
    problems, samples = files
    out = tmp_path / "out"
    assert cli.main(["--problems", problems, "--samples", samples, "--k", "2,1", "--timeout", "1.5",
                     "--workers", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [s["id"] for s in SAMPLES]  # order and fields kept
    assert [r["problem_index"] for r in rows] == [0, 0, 0, 1, 1, 2, 2]
    assert [r["result"]["status"] for r in rows] == ["passed", "failed", "passed", "timed_out", "failed", "passed",
                                                     "crashed"]
    assert rows[3]["task_id"] == rows[4]["task_id"] == "neg" and "task_id" not in rows[5]
    assert rows[6]["result"]["signal"] == "SIGKILL" and "AssertionError" in rows[1]["result"]["output"]
    per_problem = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    # add: 2 of 3 pass (pass@1 2/3; pass@2 1, as n - c = 1 < 2); neg: 0 of 2; sq: 1 of 2 (pass@1 1/2, pass@2 1).
    assert per_problem == [
        {"problem_index": 0, "task_id": "add", "n": 3, "c": 2, "pass@k": {"1": pytest.approx(2 / 3), "2": 1.0}},
        {"problem_index": 1, "task_id": "neg", "n": 2, "c": 0, "pass@k": {"1": 0.0, "2": 0.0}},
        {"problem_index": 2, "n": 2, "c": 1, "pass@k": {"1": 0.5, "2": 1.0}}]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@k"] == {"1": pytest.approx((2 / 3 + 0 + 0.5) / 3), "2": pytest.approx(2 / 3)}
    assert summary["status"] == {"passed": 3, "failed": 2, "timed_out": 1, "crashed": 1}
    assert (summary["problems"], summary["samples"]) == (3, 7)
    settings = summary["settings"]
    assert settings["k"] == [1, 2] and settings["sandbox"]["timeout"] == 1.5 and settings["model"] is None
    assert settings["samples"] == samples and settings["problems"] == problems
    assert capsys.readouterr().out.strip() == "pass@1 0.3889  pass@2 0.6667"


def test_cli_refuses_k_above_n(files, tmp_path):
    problems, samples = files
    with pytest.raises(SystemExit, match=r"^error: problem 'neg' \(.*problems.jsonl: line 2\) has n=2 samples, "
                                         r"fewer than k=3"):
        cli.main(["--problems", problems, "--samples", samples, "--k", "1,3", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which, records, message", [
    ("problems", [PROBLEMS[0], "{not json"], r"problems.jsonl: line 2: not valid JSON"),
    ("problems", [{"prompt": "def f():\n"}], r"problems.jsonl: line 1: expected a JSON object with string "
                                             r"field\(s\) prompt, tests"),
    ("problems", [{**PROBLEMS[0], "entry_point": "add)"}], r"problems.jsonl: line 1: field 'entry_point' must be a "
                                                           r"Python identifier"),
    ("problems", [PROBLEMS[0], PROBLEMS[0]], r"problems.jsonl: line 2: task_id 'add' already used at .*line 1"),
    ("samples", [SAMPLES[0], "[1, 2"], r"samples.jsonl: line 2: not valid JSON"),
    ("samples", [SAMPLES[0], {"task_id": "add"}], r"samples.jsonl: line 2: expected a JSON object with string "
                                                  r"field\(s\) completion"),
    ("samples", [SAMPLES[0], SAMPLES[1], {"task_id": "nope", "completion": ""}],
     r"samples.jsonl: line 3: task_id 'nope' is not the task_id of any problem in .*problems.jsonl"),
    ("samples", [{"completion": ""}], r"samples.jsonl: line 1: a sample needs a 'task_id' or a 'problem_index'"),
    ("samples", [{"problem_index": 3, "completion": ""}], r"samples.jsonl: line 1: problem_index must be an integer "
                                                          r"from 0 to 2"),
    ("samples", [{"problem_index": 1, "task_id": "add", "completion": ""}],
     r"samples.jsonl: line 1: task_id 'add' is problem 0, not problem_index 1"),
])
def test_cli_bad_input(files, tmp_path, which, records, message):
    problems, samples = files
    _write(tmp_path / f"{which}.jsonl", records)
    with pytest.raises(SystemExit, match=rf"^error: [^\n]*{message}"):
        cli.main(["--problems", problems, "--samples", samples, "--out", str(tmp_path / "out"), "--k", "1"])


@pytest.mark.parametrize("flags, message", [
    ([], "give either --samples FILE.jsonl, or a model"),
    (["--model", "M"], "give either --samples FILE.jsonl, or a model"),
    (["--n", "2"], "--n applies only when generating"),
    (["--k", "1,x"], "--k must be comma-separated positive integers, got '1,x'"),
    (["--k", "0"], "--k must be comma-separated positive integers"),
    (["--timeout", "0"], "--timeout must be > 0"),
])
def test_cli_bad_flags(files, tmp_path, flags, message):
    problems, samples = files
    base = ["--problems", problems, "--out", str(tmp_path / "out")] + ([] if flags == [] else ["--samples", samples])
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        cli.main(base + flags)


def test_cli_generates_n_samples_per_problem(files, tmp_path):
    """The --model path on a tiny random model: n generations per problem, run and counted."""
    from calm_jax.loading import Pretrained, save_pretrained
    from tests.test_decoding import char_tokenizer, random_params, tiny_config

    cfg = tiny_config(hidden=16, layers=1)
    save_pretrained(Pretrained(cfg, random_params(cfg, 1), char_tokenizer()), str(tmp_path / "model"))
    problems, _ = files
    args = ["--problems", problems, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--k", "1,2"]
    with pytest.raises(SystemExit, match="^error: --n 1 samples per problem, fewer than k=2"):
        cli.main(args + ["--n", "1"])
    assert cli.main(args + ["--temperature", "1.0", "--max-new-tokens", "3", "--seed", "1"]) == 0  # n: the largest k
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["problem_index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert all(isinstance(r["completion"], str) and 1 <= r["num_generated"] <= 3 for r in rows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["samples"] == 6 and sum(summary["status"].values()) == 6
    assert summary["settings"]["generation"]["n"] == 2 and summary["settings"]["model"]["label"] == "model:model"
