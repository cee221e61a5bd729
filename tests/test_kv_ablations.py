"""Ablations and held-in fraction sweep (`train.kv_ablations`) end to end at the tiny preset.

Plumbing only: every row and sweep point runs and is written in the promised shape, the
base models are shared, the sweep never evaluates on expressions the base models were
trained on. No accuracy is asserted (the tiny models train for 3 steps).
"""

import json
import os
import re

import numpy as np
import pytest

from calm_jax import lora
from calm_jax.data import read_jsonl
from calm_jax.experiment import stages, study, workers
from train.kv_arithmetic import data as kv_task
from train.kv_arithmetic import task as kvt
from train.kv_arithmetic.__main__ import main
from train.kv_arithmetic.presets import PRESETS
from train.kv_arithmetic.task import TASK


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kv_ablations") / "run")
    study.run_ablations(TASK, "tiny", out, workers=1)  # one row after the other, in this process
    study.run_sweep(TASK, "tiny", out, workers=2)  # reuses the base models the ablations trained; 2 worker processes
    return out


def _load(path):
    with open(path) as f:
        return json.load(f)


def _body(prompt):
    return re.sub(r"^\[[A-Z]+\]|=$", "", prompt)


def test_ablations_json_has_every_row_and_task(out):
    table = _load(os.path.join(out, "ablations", "ablations.json"))
    for row in study.ABLATIONS:
        assert set(table[row]) == set(TASK.eval_sets), row
        assert all(0.0 <= v <= 1.0 for v in table[row].values())
        assert table["seconds"][row] >= 0 and table["notes"][row]
    counts = table["trainable_params"]
    assert set(counts) == set(study.ABLATIONS)
    assert counts["m_A"] == counts["m_B"] == 0
    theta = counts["calm"]
    assert counts["random_m_A"] == counts["vanilla_m_A"] == counts["encoder_m_A"] == theta > 0
    assert counts["query_norm"] > theta and counts["gate"] == theta + 2  # one gate scalar per connection
    m_B = PRESETS["tiny"].m_B
    m_B_cfg = m_B.config(len(kv_task.make_tokenizer()), max_positions=64)
    per_rank = lora.param_count(m_B_cfg, 1)
    assert counts["lora_m_B"] % per_rank == 0 and abs(counts["lora_m_B"] - theta) <= per_rank / 2
    assert counts["finetune_m_B"] > counts["lora_m_B"]
    assert table["config"]["preset"] == "tiny" and table["config"]["eval_sizes"]["kv_arithmetic"] == 16
    assert "total" in table["seconds"]


def test_ablations_markdown_and_plot(out):
    md = open(os.path.join(out, "ablations", "ablations.md")).read()
    for row in study.ABLATIONS:
        assert f"| {row} |" in md
    for task in TASK.eval_sets:
        assert TASK.set_names[task] in md
    assert "Forgetting" in md and "encoder mode" in md
    with open(os.path.join(out, "ablations", "ablations.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ablation_predictions_match_accuracy(out):
    table = _load(os.path.join(out, "ablations", "ablations.json"))
    for row in study.ABLATIONS:
        for task in TASK.eval_sets:
            preds = read_jsonl(os.path.join(out, "ablations", "predictions", f"{row}-{task}.jsonl"))
            assert len(preds) == 16
            assert np.mean([p["correct"] for p in preds]) == pytest.approx(table[row][task])


def test_base_models_shared_and_vanilla_m_A_uses_another_mapping(out):
    for sub in ("ablations", "sweep"):
        assert not os.path.exists(os.path.join(out, sub, "m_A")) and not os.path.exists(os.path.join(out, sub, "m_B"))
    assert os.path.isfile(os.path.join(out, "ablations", "vanilla_m_A_base", "config.json"))
    assert _load(os.path.join(out, "ablations", "vanilla_m_A_base", "config.json")) == \
        _load(os.path.join(out, "m_A", "config.json"))
    original = read_jsonl(os.path.join(out, "ablations", "data", "m_A.jsonl"))
    vanilla = read_jsonl(os.path.join(out, "ablations", "data", "vanilla_m_A.jsonl"))
    assert [r["prompt"] for r in vanilla] == [r["prompt"] for r in original]
    assert np.mean([a["target"] != b["target"] for a, b in zip(vanilla, original)]) > 0.5


def test_sweep_outputs(out):
    sweep = _load(os.path.join(out, "sweep", "sweep.json"))
    assert [p["held_in_fraction"] for p in sweep["points"]] == list(kvt.SWEEP_FRACTIONS)
    assert [p["held_in_keys"] for p in sweep["points"]] == [2, 4, 8, 20]  # of 40 keys
    for p in sweep["points"]:
        for task in TASK.sweep_sets:
            assert 0.0 <= p[task] <= 1.0
            assert p["eval_sizes"][task] + p["eval_dropped"][task] == 16
        assert p["dc_examples"] == PRESETS["tiny"].train_C.examples
    md = open(os.path.join(out, "sweep", "sweep.md")).read()
    assert all(f"| {pct}% (" in md for pct in (5, 10, 20, 50))
    with open(os.path.join(out, "sweep", "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_eval_sets_exclude_base_training_data(out):
    preset = PRESETS["tiny"]
    kv = kv_task.make_kv_data(preset.task)
    base = {kv.key_text(e) for e in kv.train_expressions(max(preset.train_A.examples, preset.train_B.examples))}
    # The base models' training files hold exactly these expressions.
    assert {_body(r["prompt"]) for r in read_jsonl(os.path.join(out, "sweep", "data", "m_A.jsonl"))} <= base
    sweep = _load(os.path.join(out, "sweep", "sweep.json"))
    for p in sweep["points"]:
        name = kvt.fraction_name(p["held_in_fraction"])
        held_in = {kv.keys[i] for i in kv_task.make_kv_data(preset.task.replace(
            held_in_fraction=p["held_in_fraction"])).held_in}
        dc = {_body(r["prompt"]) for r in read_jsonl(os.path.join(out, "sweep", name, "data", "calm.jsonl"))}
        for task in TASK.sweep_sets:
            records = read_jsonl(os.path.join(out, "sweep", name, "data", f"eval_{task}.jsonl"))
            preds = read_jsonl(os.path.join(out, "sweep", name, "predictions", f"calm-{name}-{task}.jsonl"))
            assert len(records) == len(preds) == p["eval_sizes"][task]
            bodies = {_body(r["prompt"]) for r in records}
            assert not bodies & base and not bodies & dc, (name, task)
            if task == "kv_arithmetic_heldout":
                assert all(not set(re.split(r"[-+*]", b)) & held_in for b in bodies)


def test_unseen_eval_sets_drops_base_expressions():
    kv = kv_task.make_kv_data(PRESETS["tiny"].task.replace(held_in_fraction=0.5))
    base = set(kv.eval_heldout[:5]) | {kv.eval_all[0]}
    sets, dropped = kvt.unseen_eval_sets(kv, base)
    assert dropped == {"kv_arithmetic": 1, "kv_arithmetic_heldout": 5}
    assert sets["kv_arithmetic_heldout"] == kv.records(kv.eval_heldout[5:], "kv_arithmetic")
    with pytest.raises(ValueError, match="every kv_arithmetic_heldout evaluation expression"):
        kvt.unseen_eval_sets(kv, set(kv.eval_heldout))


def test_calm_row_and_sweep_point_reuse_the_main_theta(out):
    # The calm row and the sweep's 20% point are Table 1's Θ_C, trained once, in OUT/calm.
    assert os.path.isdir(os.path.join(out, "calm", "checkpoints"))
    assert not os.path.exists(os.path.join(out, "ablations", "calm"))
    sweep = _load(os.path.join(out, "sweep", "sweep.json"))
    dirs = {p["held_in_fraction"]: p["theta_dir"] for p in sweep["points"]}
    assert dirs == {f: "calm" if f == 0.2 else os.path.join("sweep", kvt.fraction_name(f), "calm")
                    for f in kvt.SWEEP_FRACTIONS}
    assert not os.path.exists(os.path.join(out, "sweep", kvt.fraction_name(0.2), "calm"))
    assert sweep["config"]["workers"] == 2
    for f in kvt.SWEEP_FRACTIONS:  # each worker job's output went to its own log
        log = open(os.path.join(out, "sweep", "logs", f"{kvt.fraction_name(f)}.log")).read()
        assert f"== {kvt.fraction_name(f)}" in log


def _no_such_row(context, name):
    raise KeyError(name)


def test_failed_worker_job_names_the_job_and_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"ablations job 'no_such_row' failed: KeyError.*no_such_row\.log"):
        workers.run_jobs("ablations", ["no_such_row"], _no_such_row, dict, 2, stages.Timer(), lambda *a: None,
                         str(tmp_path / "logs"))


def test_workers_checked():
    with pytest.raises(ValueError, match="workers asked for, but this process may use only"):
        workers.core_sets(len(workers.usable_cores()) + 1)
    with pytest.raises(SystemExit):
        main(["--ablations", "--workers", "0"])


def test_held_in_split_covers_every_row_and_expression(out):
    from train.kv_arithmetic import analyze

    keys, split = analyze.held_in_split(os.path.join(out, "ablations"))
    assert keys == 8  # 20% of the tiny preset's 40 keys
    assert set(split) == set(study.ABLATIONS)
    table = _load(os.path.join(out, "ablations", "ablations.json"))
    for row, counts in split.items():
        assert set(counts) <= {0, 1, 2} and sum(t for _, t in counts.values()) == 16
        assert sum(r for r, _ in counts.values()) / 16 == pytest.approx(table[row]["kv_arithmetic"])
