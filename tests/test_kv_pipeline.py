"""The key-value arithmetic pipeline (`python -m train.kv_arithmetic`) end to end at the tiny preset.

Plumbing only: every stage runs, every output is written in the promised shape, base
models are saved in HF format and reused. No accuracy is asserted (the tiny models train
for 3 steps).
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from calm_jax.data import read_jsonl, write_jsonl
from calm_jax.experiment import stages, study
from train.kv_arithmetic import data as kv_task
from train.kv_arithmetic.__main__ import main
from train.kv_arithmetic.presets import PRESETS
from train.kv_arithmetic.task import TASK


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kv") / "run")
    # Every Θ_C checkpoint kept, for the curve test (it changes no weight: not in the recipe).
    table = study.run_table1(TASK, "tiny", out, overrides=["train_C.save_every=1"])
    return out, table


def test_table1_json(run_dir):
    out, table = run_dir
    with open(os.path.join(out, "table1.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(table))
    for model in ("m_A", "m_B", "calm"):
        assert set(saved[model]) == {"kv_substitution", "numeric_arithmetic", "kv_arithmetic",
                                     "kv_arithmetic_heldout"}
        assert all(0.0 <= v <= 1.0 for v in saved[model].values())
    assert set(saved["seconds"]) == {"data", "m_A", "m_B", "calm", "eval", "total"}
    assert saved["config"]["preset"] == "tiny"
    assert saved["config"]["task"]["n_kv"] == 40


def test_markdown_and_plot(run_dir):
    out, _ = run_dir
    md = open(os.path.join(out, "table1.md")).read()
    for paper_figure in ("98.1", "73.7", "84.3"):
        assert paper_figure in md
    assert "held-out keys" in md
    with open(os.path.join(out, "table1.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_predictions_match_accuracy(run_dir):
    out, table = run_dir
    for model in ("m_A", "m_B", "calm"):
        for task in TASK.eval_sets:
            preds = read_jsonl(os.path.join(out, "predictions", f"{model}-{task}.jsonl"))
            assert len(preds) == 16
            assert np.mean([p["correct"] for p in preds]) == pytest.approx(table[model][task])


def test_dc_uses_only_held_in_keys(run_dir):
    out, _ = run_dir
    kv = kv_task.make_kv_data(PRESETS["tiny"].task)
    held_in = {kv.keys[i] for i in kv.held_in}
    dc = read_jsonl(os.path.join(out, "data", "calm.jsonl"))
    kva_records = [r for r in dc if r["prompt"].startswith("[KVA]")]
    assert kva_records and all(r["prompt"].startswith(("[KVA]", "[NUM]")) for r in dc)  # tiny mixes in [NUM]
    for rec in kva_records:
        assert set(re.split(r"[-+*]", rec["prompt"][len("[KVA]"):-1])) <= held_in
    heldout = read_jsonl(os.path.join(out, "data", "eval_kv_arithmetic_heldout.jsonl"))
    for rec in heldout:
        assert not set(re.split(r"[-+*]", rec["prompt"][len("[KVA]"):-1])) & held_in


def test_base_models_saved_and_reused(run_dir, capsys):
    from transformers import AutoConfig

    out, table = run_dir
    preset = PRESETS["tiny"]
    seq = table["config"]["seq_lens"]
    for name in ("m_A", "m_B"):
        hf = AutoConfig.from_pretrained(os.path.join(out, name))
        assert hf.model_type == "llama"
        assert os.path.isfile(os.path.join(out, name, "tokenizer.json"))
    before = os.path.getmtime(os.path.join(out, "m_A", "model.safetensors"))
    tok = kv_task.make_tokenizer()
    again = stages.train_base("m_A", preset.m_A, preset.train_A, seq["m_A"], tok,
                              os.path.join(out, "data", "m_A.jsonl"), out, seed=1, max_positions=4 * max(seq.values()))
    assert os.path.getmtime(os.path.join(out, "m_A", "model.safetensors")) == before
    assert again.config.num_layers == preset.m_A.layers
    assert "skipping training" in capsys.readouterr().out


def test_reuse_refuses_another_recipe(run_dir, tmp_path):
    """A rerun with other data or settings into the same directory raises instead of reusing
    the old models or Θ_C; the error names the directory and what differs."""
    out, table = run_dir
    preset = PRESETS["tiny"]
    tok = kv_task.make_tokenizer()
    seq = table["config"]["seq_lens"]
    positions = 4 * max(seq.values())
    for name in ("m_A", "m_B", "calm"):
        assert os.path.isfile(os.path.join(out, name, stages.RECIPE_FILE))

    def base(name, stage=None, data=None):
        return stages.train_base(name, getattr(preset, name), stage or getattr(preset, f"train_{name[-1]}"), seq[name],
                              tok, data or os.path.join(out, "data", f"{name}.jsonl"), out,
                              seed={"m_A": 1, "m_B": 2}[name], max_positions=positions)

    longer = dataclasses.replace(preset.train_A, steps=preset.train_A.steps + 1)
    expected = r"m_A was trained from another recipe.*train\.steps: made with 3, asked for 4"
    with pytest.raises(ValueError, match=expected):
        base("m_A", stage=longer)
    other_data = str(tmp_path / "m_A.jsonl")
    write_jsonl(other_data, read_jsonl(os.path.join(out, "data", "m_A.jsonl"))[1:])
    with pytest.raises(ValueError, match="data_sha256"):
        base("m_A", data=other_data)
    m_A, m_B = base("m_A"), base("m_B")  # the same recipe is reused
    faster = dataclasses.replace(preset.train_C, lr=2 * preset.train_C.lr)
    with pytest.raises(ValueError, match=r"calm was trained from another recipe.*train\.lr"):
        stages.train_composition(os.path.join(out, "calm"), stages.composition_wiring(preset), faster,
                              seq["calm"], tok, os.path.join(out, "data", "calm.jsonl"), m_A, m_B, seed=3)


def test_build_data_mixes_dc_tasks_and_marks_m_A_prompts(tmp_path):
    """dc_substitution / dc_numeric split D_C by task (Numeric-Arithmetic examples carry no key);
    random_marker gives some of m_A's substitution prompts another task marker."""
    base = PRESETS["tiny"]
    preset = dataclasses.replace(base, task=base.task.replace(random_marker=0.5, dc_substitution=0.25,
                                                              dc_numeric=0.25))
    data = TASK.build_data(preset, str(tmp_path))
    kv, paths = data.state, data.paths
    held_in = {kv.keys[i] for i in kv.held_in}
    dc = read_jsonl(paths["calm"])
    counts = {m: sum(r["prompt"].startswith(m) for r in dc) for m in kv_task.MARKERS.values()}
    assert counts == {"[SUB]": 8, "[NUM]": 8, "[KVA]": 16}
    for rec in dc:
        body = re.split(r"[-+*]", rec["prompt"][5:-1])
        if rec["prompt"].startswith("[NUM]"):
            assert all(t.isdigit() for t in body)
        else:
            assert set(body) <= held_in
    m_A = read_jsonl(paths["m_A"])
    markers = {r["prompt"][:5] for r in m_A}
    assert markers == set(kv_task.MARKERS.values())  # 64 prompts, half re-marked
    assert all(r["target"].startswith("[NUM]") and "=" not in r["target"] for r in m_A)  # substitution only


def test_preset_overrides():
    p = study.get_preset(TASK, "tiny", ["task.n_kv=30", "connections=((1, 1),)", "train_C.lr=0.01", "m_B.family=gpt2",
                                        "options.gate=True", "seeds.theta=4"])
    assert (p.task.n_kv, p.connections, p.train_C.lr, p.m_B.family) == (30, ((1, 1),), 0.01, "gpt2")
    assert (p.options.gate, p.seeds.theta, p.seeds.m_A) == (True, 4, 1)
    assert p.train_A == study.get_preset(TASK, "tiny").train_A
    for bad, match in [("foo=1", "Preset has no field 'foo'"), ("task.bar=1", "KVTaskConfig has no field 'bar'"),
                       ("xx.y=1", "'xx' is not one of task, m_A"), ("task.n_kv", "not FIELD=VALUE"),
                       ("options.glu=1", "CompositionOptions has no field 'glu'")]:
        with pytest.raises(ValueError, match=match):
            study.get_preset(TASK, "tiny", [bad])
    with pytest.raises(ValueError, match="unknown preset"):
        study.get_preset(TASK, "huge")


def test_paper_format_preset_is_the_default_without_the_scratchpad():
    """The paper_format preset changes the output format and the connections, nothing else: its
    KV-Arithmetic targets are the result alone, its KV-Substitution targets carry no marker."""
    default, paper = PRESETS["default"], PRESETS["paper_format"]
    assert paper.task == default.task.replace(scratchpad=False)
    assert paper.connections == ((0, 0), (1, 1), (1, 2), (1, 3)) != default.connections
    assert dataclasses.replace(paper, task=default.task, connections=default.connections) == default
    kv = kv_task.make_kv_data(paper.task.replace(n_eval=20))
    expr = kv.eval_all[0]
    sub, kva = kv.record(expr, "kv_substitution"), kv.record(expr, "kv_arithmetic")
    assert sub["target"] == kv.numeric_text(expr) and kva["target"] == kv.result_text(expr)
    assert kva["prompt"].startswith("[KVA]") and "[NUM]" not in sub["target"] + kva["target"]


def test_seeds_runs_table1_per_data_seed(tmp_path, capsys):
    """--seeds runs the whole pipeline once per data seed (task.seed) and reports every run with
    mean, min and max."""
    out = str(tmp_path / "seeds")
    assert main(["--preset", "tiny", "--seeds", "0,1", "--workers", "1", "--out", out]) == 0
    with open(os.path.join(out, "seeds.json")) as f:
        seeds = json.load(f)
    assert list(seeds["runs"]) == ["seed0", "seed1"]
    for name, seed in (("seed0", 0), ("seed1", 1)):
        with open(os.path.join(out, name, "table1.json")) as f:
            assert seeds["runs"][name] == json.load(f)
        assert seeds["runs"][name]["config"]["task"]["seed"] == seed
    # Different data seeds draw different keys.
    assert read_jsonl(os.path.join(out, "seed0", "data", "calm.jsonl")) != \
        read_jsonl(os.path.join(out, "seed1", "data", "calm.jsonl"))
    for model in ("m_A", "m_B", "calm"):
        for s in TASK.eval_sets:
            values = [seeds["runs"][r][model][s] for r in ("seed0", "seed1")]
            assert seeds["summary"][model][s] == {"mean": pytest.approx(sum(values) / 2), "min": min(values),
                                                  "max": max(values)}
    md = open(os.path.join(out, "seeds.md")).read()
    assert "| seed1 | CALM |" in md and "| **mean** | CALM |" in md
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--seeds", "0,0", "--out", out])
    assert "distinct" in capsys.readouterr().err


def test_train_seeds_vary_every_stage_seed(tmp_path, monkeypatch, capsys):
    """--seeds S,.. --train-seeds T,..: one run per (data seed, training seed), training seed T
    seeding m_A, m_B and Θ_C with 3T+1, 3T+2, 3T+3 (T = 0 is the preset's default)."""
    from calm_jax.experiment.spec import Seeds

    seen = {}

    def fake_table1(task, preset_name, out, overrides=()):
        preset = study.get_preset(task, preset_name, overrides)
        seen[os.path.basename(out)] = (preset.task.seed, preset.seeds)
        return {"config": {}, **{m: {s: float(len(seen)) for s in task.eval_sets} for m in ("m_A", "m_B", "calm")}}

    monkeypatch.setattr(study, "run_table1", fake_table1)
    out = str(tmp_path / "seeds")
    assert main(["--preset", "tiny", "--seeds", "0,2", "--train-seeds", "0,1", "--workers", "1", "--out", out]) == 0
    assert seen == {"data0-train0": (0, Seeds()), "data0-train1": (0, Seeds(4, 5, 6)),
                    "data2-train0": (2, Seeds()), "data2-train1": (2, Seeds(4, 5, 6))}
    with open(os.path.join(out, "seeds.json")) as f:
        seeds = json.load(f)
    assert list(seeds["runs"]) == list(seen) and seeds["config"]["train_seeds"] == [0, 1]
    assert seeds["summary"]["calm"][TASK.eval_sets[0]] == {"mean": 2.5, "min": 1.0, "max": 4.0}
    for bad, match in ((["--train-seeds", "0"], "goes with --seeds"),
                       (["--seeds", "0", "--train-seeds", "1,1"], "distinct"),
                       (["--seeds", "0", "--train-seeds", "-1"], "distinct seeds >= 0"),
                       (["--seeds", "0", "--train-seeds", "1", "--set", "seeds.theta=4"], "drop --set seeds.*")):
        with pytest.raises(SystemExit):
            main(["--preset", "tiny", "--out", out, *bad])
        assert match in capsys.readouterr().err


def test_copy_rate_agrees_with_the_table(run_dir):
    from train.kv_arithmetic import analyze

    out, table = run_dir
    rates = analyze.copy_rate(out)
    for name in ("kv_arithmetic", "kv_arithmetic_heldout"):
        assert rates[name]["n"] == 16
        assert rates[name]["exact_match"] == pytest.approx(table["calm"][name])
        assert 0.0 <= rates[name]["copied"] <= 1.0
        # A correct answer is a correct copy followed by a correct result.
        assert rates[name]["copied"] * rates[name]["right_given_copy"] == pytest.approx(rates[name]["exact_match"])


def test_stage_save_every_keeps_every_checkpoint():
    stage = PRESETS["tiny"].train_C
    assert (stage.train_config(8, 0).save_every, stage.train_config(8, 0).keep) == (0, 1)
    for steps, every, kept in ((3, 1, 3), (10, 4, 3), (8, 4, 2)):  # checkpoints at every N-th step and the last
        tcfg = dataclasses.replace(stage, steps=steps, save_every=every).train_config(8, 0)
        assert (tcfg.save_every, tcfg.keep) == (every, kept)
    with pytest.raises(ValueError, match="save_every"):
        dataclasses.replace(stage, save_every=-1).train_config(8, 0)


def test_curve_scores_every_kept_checkpoint(run_dir):
    """The run kept with train_C.save_every=1: the curve has one point per step, and its last
    step's predictions are Table 1's, text for text."""
    from train.kv_arithmetic import analyze

    out, table = run_dir
    sets = ("kv_arithmetic_heldout", "kv_arithmetic")
    points = analyze.curve(out, sets)
    assert sorted(points) == [1, 2, 3]
    with open(os.path.join(out, "curve", "curve.json")) as f:
        assert json.load(f) == {str(k): v for k, v in points.items()}
    for name in sets:
        assert points[3][name] == table["calm"][name]
        assert (read_jsonl(os.path.join(out, "curve", f"step3-{name}.jsonl"))
                == read_jsonl(os.path.join(out, "predictions", f"calm-{name}.jsonl")))


def test_base_seeds_trains_and_scores_one_model_per_seed(tmp_path, capsys):
    from train.kv_arithmetic import base_seeds

    out, jsonl = str(tmp_path / "m_A"), str(tmp_path / "m_A.jsonl")
    assert base_seeds.main(["m_A", "--preset", "tiny", "--data-seeds", "0,1", "--seeds", "5", "--out", out,
                            "--jsonl", jsonl, "--set", "train_A.steps=2"]) == 0
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["data_seed"], r["seed"], r["steps"]) for r in rows] == [(0, 5, 2), (1, 5, 2)]
    assert all(0.0 <= r["kv_substitution"] <= 1.0 for r in rows)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")] == rows
    for r in rows:  # trained where it says, with that seed (the recipe records it)
        with open(os.path.join(out, f"data{r['data_seed']}-seed5", "m_A", stages.RECIPE_FILE)) as f:
            assert json.load(f)["train"]["seed"] == 5
    with pytest.raises(SystemExit):
        base_seeds.main(["m_A", "--preset", "tiny", "--data-seeds", "0", "--seeds", "5", "--out", out,
                         "--set", "seeds.m_A=3"])
