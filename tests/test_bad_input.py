"""Nothing silent, nothing lost: bad input a new user meets is named whole, before any work, and
never costs the results of work already done (data files, config.json types, outputs, pass@k
problems, dtypes)."""

import json
import os

import pytest

from calm_jax import data
from calm_jax.config import ConfigError
from eval import exact_match, generate, loglik
from eval import pass_at_k as pass_cli
from tests.test_decoding import char_tokenizer, random_params, tiny_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from calm_jax.loading import Pretrained, save_pretrained

    path = str(tmp_path_factory.mktemp("m") / "model")
    cfg = tiny_config(hidden=16, layers=1)
    save_pretrained(Pretrained(cfg, random_params(cfg, 1), char_tokenizer()), path)
    return path


def _lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return str(path)


GOOD = {"prompt": "ab", "target": "c"}


def test_every_bad_line_is_named_at_once_and_skip_invalid_counts_them(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [GOOD, b"{oops", GOOD, {"prompt": "x"}, GOOD, {"prompt": "x", "target": 3}])
    with pytest.raises(data.DataError) as e:
        data.read_jsonl(path)
    message = str(e.value)
    assert message.startswith(f"{path}: 3 of 6 records are invalid (--skip-invalid leaves them out):")
    for n in (2, 4, 6):
        assert f"{path}: line {n}: " in message
    said = []
    records = data.read_jsonl(path, skip_invalid=True, log=said.append)
    assert [r.line for r in records] == [1, 3, 5]
    assert said == [f"{path}: left out 3 invalid of 6 records (--skip-invalid): lines 2, 4, 6"]
    # Past the cap, the rest are counted.
    many = _lines(tmp_path / "many.jsonl", [b"{"] * 25)
    with pytest.raises(data.DataError, match=r"25 of 25 records are invalid[\s\S]*line 20: [^\n]*\n  \.\.\. and 5 more$"):
        data.read_jsonl(many)


def test_bom_is_read_and_non_utf8_is_named_by_line_and_byte(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert data.read_jsonl(str(bom)) == [GOOD]
    bad = _lines(tmp_path / "latin1.jsonl", [GOOD, GOOD, b'{"prompt": "caf\xe9", "target": "x"}'])
    with pytest.raises(data.DataError, match=rf"^{bad}: line 3, byte 16: not UTF-8 \(0xe9\)$"):
        data.read_jsonl(bad)


def test_load_dataset_names_every_overlong_example_and_truncates_or_skips(tmp_path):
    tok = char_tokenizer()
    long = {"prompt": "a" * 12, "target": "bb"}
    path = _lines(tmp_path / "t.jsonl", [GOOD, long, GOOD, long, b"nope"])
    with pytest.raises(data.DataError) as e:
        data.load_dataset(path, tok, seq_len=8)
    assert f"{path}: 3 of 5 records are invalid" in str(e.value)
    assert f"{path}: line 2 has 16 tokens, more than the sequence length 8" in str(e.value)
    assert f"{path}: line 4 has 16 tokens" in str(e.value) and f"{path}: line 5: not valid JSON" in str(e.value)
    said = []
    ds = data.load_dataset(path, tok, seq_len=8, skip_invalid=True, log=said.append)
    assert len(ds) == 2 and said == [f"{path}: left out 3 invalid of 5 records (--skip-invalid): lines 2, 4, 5"]
    said = []
    ds = data.load_dataset(path, tok, seq_len=8, truncate=True, skip_invalid=True, log=said.append)
    # Cut to 8 tokens the long ones lose their whole target: left out too, and said so.
    assert len(ds) == 2 and said[0].startswith(f"{path}: left out 3 invalid of 5 records")
    assert said[1] == f"{path}: cut 2 of 5 examples to the sequence length 8 (--truncate): lines 2, 4"
    ok = _lines(tmp_path / "ok.jsonl", [GOOD, {"prompt": "a", "target": "b" * 12}])
    said = []
    ds = data.load_dataset(ok, tok, seq_len=8, truncate=True, log=said.append)
    assert len(ds) == 2 and ds.mask_NxT[1].all() and said == [f"{ok}: cut 1 of 2 examples to the sequence length "
                                                              "8 (--truncate): line 2"]


def _edit(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


@pytest.mark.parametrize("changes, message", [
    (dict(num_hidden_layers="4"), "field 'num_hidden_layers' must be an integer, found str '4'"),
    (dict(rope_parameters=None, rope_theta=[10000]), "field 'rope_theta' must be a number, found list [10000]"),
    (dict(rope_parameters={"rope_type": "linear", "factor": "2"}),
     "field 'rope_parameters.factor' must be a number, found str '2'"),
    (dict(tie_word_embeddings="false"), "field 'tie_word_embeddings' must be true or false, found str 'false'"),
])
def test_config_fields_are_type_checked_as_config_errors(model, tmp_path, capsys, changes, message):
    from calm_jax.loading import load_config
    from train import plan

    bad = _edit(model, tmp_path / "bad", **changes)
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == f"{bad}/config.json: {message}"
    prompts = _lines(tmp_path / "p.jsonl", [{"prompt": "ab"}])
    with pytest.raises(SystemExit, match="^error: " + __import__("re").escape(f"{bad}/config.json: {message}")):
        generate.main(["--model", bad, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl")])
    if "num_hidden_layers" in changes:  # train.plan reads it through the same reader (in a fresh process)
        assert plan.main(["--anchor", bad, "--augment", model, "--devices", "1", "--batch-size", "1",
                          "--seq-len", "8", "--search", "none"]) == 2
        assert f"error: {bad}/config.json: {message}" in capsys.readouterr().err


def test_a_config_transformers_refuses_is_not_called_a_tokenizer_problem(model, tmp_path):
    from calm_jax.loading import load_tokenizer

    bad = _edit(model, tmp_path / "bad", bos_token_id="x")  # not read by us; transformers' config refuses it
    with pytest.raises(ConfigError) as e:
        load_tokenizer(bad)
    assert str(e.value).startswith(f"{bad}/config.json: transformers cannot read it: ")
    assert "bos_token_id" in str(e.value) and "tokenizer" not in str(e.value)


def test_outputs_are_checked_before_any_model_loads(model, tmp_path, monkeypatch):
    from calm_jax import loaded as loaded_lib

    monkeypatch.setattr(loaded_lib, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded first"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    prompts = _lines(tmp_path / "p.jsonl", [GOOD])
    out = str(blocker / "sub" / "out.jsonl")
    with pytest.raises(SystemExit, match=rf"^error: --out {out} cannot be written \(.*a-file is a file, not a "
                                         r"directory\); nothing was run"):
        generate.main(["--model", model, "--prompts", prompts, "--out", out])
    with pytest.raises(SystemExit, match=r"^error: --out .*a-file is a file; give a directory"):
        exact_match.main(["--model", model, "--data", prompts, "--out", str(blocker)])
    with pytest.raises(SystemExit, match=r"^error: --out .*/sub cannot be written"):
        pass_cli.main(["--problems", prompts, "--samples", prompts, "--out", str(blocker / "sub"), "--k", "1"])
    assert loglik.main(["--model", model, "--data", prompts, "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "sub").exists()


def test_eval_scripts_skip_invalid_records(model, tmp_path, capsys):
    records = [GOOD, {"prompt": "a" * 70, "target": "b"}, b"{", {"prompt": "cd", "target": "e"}]
    path = _lines(tmp_path / "d.jsonl", records)
    assert loglik.main(["--model", model, "--data", path]) == 2
    err = capsys.readouterr().err
    assert "line 2 has 72 tokens, more than the model's 64 positions" not in err  # the bad JSON comes first
    assert f"{path}: line 3: not valid JSON" in err
    out = tmp_path / "scores.jsonl"
    assert loglik.main(["--model", model, "--data", path, "--skip-invalid", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{path}: left out 1 invalid of 4 records (--skip-invalid): line 3" in err
    assert f"{path}: left out 1 invalid of 3 records (--skip-invalid): line 2" in err
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["ab", "cd"]
    # Generation: every prompt that leaves no room is named at once; --skip-invalid generates for the rest.
    long = _lines(tmp_path / "long.jsonl", [{"prompt": "a" * 70}, {"prompt": "ab"}, {"prompt": "b" * 70}])
    with pytest.raises(SystemExit, match=r"2 of 3 records are invalid[\s\S]*line 1 has 71 tokens[\s\S]*line 3 has"):
        generate.main(["--model", model, "--prompts", long, "--out", str(tmp_path / "g.jsonl"),
                       "--max-new-tokens", "2"])
    assert generate.main(["--model", model, "--prompts", long, "--out", str(tmp_path / "g.jsonl"),
                          "--max-new-tokens", "2", "--skip-invalid"]) == 0
    assert [json.loads(x)["prompt"] for x in (tmp_path / "g.jsonl").read_text().splitlines()] == ["ab"]


def test_float64_turns_on_64_bit_mode_and_the_library_refuses_it_without(model, tmp_path, capsys):
    import jax

    from calm_jax import load_model

    assert not jax.config.jax_enable_x64
    with pytest.raises(ConfigError, match="dtype float64 needs JAX's 64-bit mode, which is off"):
        load_model(model, dtype="float64")
    path = _lines(tmp_path / "d.jsonl", [GOOD])
    assert loglik.main(["--model", model, "--data", path, "--dtype", "float64"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 1
    assert not jax.config.jax_enable_x64  # for the run only


PROBLEMS = [
    {"task_id": "ok", "prompt": "def f(a):\n", "tests": "def check(f):\n    assert f(1) == 1\n", "entry_point": "f"},
    {"task_id": "syntax", "prompt": "def f(a):\n", "tests": "def check(f):\n    assert f(1) == = 1\n",
     "entry_point": "f"},
    {"task_id": "canon", "prompt": "def f(a):\n", "tests": "def check(f):\n    assert f(1) == 2\n",
     "entry_point": "f", "canonical_solution": "    return a\n"},
]


def test_pass_at_k_leaves_broken_problems_out(tmp_path, capsys):
    problems = _lines(tmp_path / "problems.jsonl", PROBLEMS)
    samples = _lines(tmp_path / "samples.jsonl", [{"problem_index": i, "completion": c} for i in range(3)
                                                  for c in ("    return a\n", "    return 0\n")])
    out = tmp_path / "out"
    assert pass_cli.main(["--problems", problems, "--samples", samples, "--k", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "problem 'syntax' (" in captured.err and "its tests do not compile: SyntaxError" in captured.err
    assert "its canonical_solution does not pass its tests (failed: AssertionError)" in captured.err
    assert captured.out.startswith("pass@1 0.5000  (over 1 problems; 2 broken left out)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@k"] == {"1": 0.5} and summary["broken_problems"] == 2 and summary["scored_problems"] == 1
    assert [b["task_id"] for b in summary["broken"]] == ["syntax", "canon"]
    rows = [json.loads(x) for x in (out / "problems.jsonl").read_text().splitlines()]
    assert rows[1]["pass@k"] is None and rows[1]["broken"].startswith("its tests do not compile")
    assert sum(summary["status"].values()) == 2  # the broken problems' samples were not run


def test_loglik_help_states_the_eos_convention_and_readme_names_humaneval_field(capsys):
    with pytest.raises(SystemExit):
        loglik.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "no EOS after it" in text and "TrainConfig.append_eos" in text
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    assert "(HumanEval's layout)" not in readme and "HumanEval's `test` is named `tests` here" in readme
