"""The study skeleton's own pieces (calm_jax.experiment), apart from any task's pipeline
(tests/test_kv_pipeline.py and test_kv_ablations.py run it end to end on the key-value task)."""

import dataclasses

import pytest

from calm_jax.composition import CompositionOptions
from calm_jax.experiment import report, spec, study
from calm_jax.experiment.task import Data, Task
from calm_jax.overrides import apply_overrides


def test_ablation_rows_iterate_the_composition_options():
    names = tuple(f.name for f in dataclasses.fields(CompositionOptions))
    assert study.ABLATIONS[-len(names):] == names
    assert sorted(study._COST_ORDER) == sorted(study.ABLATIONS)


def test_apply_overrides_reaches_every_part():
    base = spec.Preset(task=None, m_A=spec.ModelSize(8, 1, 1, 8), m_B=spec.ModelSize(8, 1, 1, 8),
                       train_A=spec.Stage(1, 1, 1, 1e-3, 0), train_B=spec.Stage(1, 1, 1, 1e-3, 0),
                       train_C=spec.Stage(1, 1, 1, 1e-3, 0), connections=None)
    p = apply_overrides(base, ["seeds.theta=7", "options.cross_rope=True", "eval_batch=4", "m_B.family=gpt2"])
    assert (p.seeds.theta, p.options.cross_rope, p.eval_batch, p.m_B.family) == (7, True, 4, "gpt2")
    assert (p.seeds.m_A, p.options.gate) == (1, False)
    assert spec.label("tiny", ["a=1", "b=2"]) == "tiny with a=1 b=2"


def test_spread_is_mean_min_max_per_model_and_set():
    tables = {f"seed{i}": {m: {"x": v} for m in report.MODELS} for i, v in enumerate((0.5, 0.75, 1.0))}
    got = report.spread(tables)
    assert got["calm"]["x"] == {"mean": 0.75, "min": 0.5, "max": 1.0}


class _Toy(Task):
    name, title, eval_sets, set_names = "toy", "toy", ("a",), {"a": "A"}

    def presets(self):
        return {}

    def tokenizer(self):
        return None

    def build_data(self, preset, out, write=True):
        return Data({}, {"m_A": 8}, {"keys": 3})

    def vanilla_m_A_records(self, preset, data):
        return [], ""


def test_tasks_are_equal_by_class_across_processes():
    """Worker processes rebuild a study from a pickled Task: equal and equally hashed, so each
    worker sets up once."""
    import pickle

    toy = _Toy()
    again = pickle.loads(pickle.dumps(toy))
    assert again == toy and hash(again) == hash(toy) and again is not toy
    assert study._Setup(toy, "p", "o", "s", ()) == study._Setup(again, "p", "o", "s", ())
    with pytest.raises(NotImplementedError, match="toy task has no sweep"):
        toy.sweep_points(None)
