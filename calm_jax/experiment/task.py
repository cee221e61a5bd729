"""The interface a CALM experiment implements: its data, tokenizer, evaluation sets and report text.

A study (calm_jax.experiment.study) asks its Task for everything task-specific and does the
rest itself: training both base models, Θ_C and the ablation rows, generate-and-score
evaluation (calm_jax.evaluation), reports, worker processes and seeds.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass
class Data:
    """A study's files, as `Task.build_data` wrote them.

    paths: JSONL files of {"prompt", "target"} records: "m_A", "m_B" (the base models'
      training data), "calm" (D_C) and "eval_<set>" for each of the task's eval_sets.
    seq_lens: training sequence length per training file ("m_A", "m_B", "calm").
    info: facts for the reports (e.g. key counts), JSON-serialisable.
    state: the task's own objects, for its other hooks (e.g. the key-value mapping).
    """

    paths: dict[str, str]
    seq_lens: dict[str, int]
    info: dict
    state: Any = None


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point of a task's sweep: its name (a directory name), value and preset."""

    name: str
    value: Any
    preset: Any


class Task(abc.ABC):
    """What an experiment supplies. Subclasses set the class attributes and implement the methods.

    eval_sets: evaluation set names, in table order; `set_names` gives each a display name.
    paper: the paper's Table 1 figures (%), {model ("m_A", "m_B", "calm"): {eval set: %}}.
    anchor_set: the eval set of the anchor's own skill (the "forgetting" line of the ablations).
    sweep_sets: the eval sets of the sweep (with `sweep_points`).
    """

    name: str
    title: str
    eval_sets: tuple[str, ...]
    set_names: Mapping[str, str]
    paper: Mapping[str, Mapping[str, float]] = {}
    anchor_set: str = ""
    sweep_sets: tuple[str, ...] = ()
    table_note: str = ""
    sweep_note: str = ""

    def __eq__(self, other):  # a task is its class: equal in every process (calm_jax.experiment.workers)
        return type(self) is type(other)

    def __hash__(self):
        return hash((type(self).__module__, type(self).__qualname__))

    @abc.abstractmethod
    def presets(self) -> dict:
        """{name: calm_jax.experiment.spec.Preset}; the first is the default."""

    @abc.abstractmethod
    def tokenizer(self):
        """The tokenizer both models share."""

    @abc.abstractmethod
    def build_data(self, preset, out: str, write: bool = True) -> Data:
        """Every JSONL file of a study under OUT/data/ (write=False: only the paths, lengths and
        state: another process wrote the files)."""

    @abc.abstractmethod
    def vanilla_m_A_records(self, preset, data: Data) -> list[dict]:
        """Training data of the "vanilla m_A" ablation: a model of m_A's size and recipe that
        knows the task's format but not m_A's knowledge."""

    def data_summary(self, data: Data) -> str:
        """One line printed after the data stage."""
        return f"data: {', '.join(f'{k} {v}' for k, v in data.info.items())}; sequence lengths {data.seq_lens}"

    def plot_subtitle(self, preset, data: Data) -> str:
        """What Table 1's figure title says of the data."""
        return ", ".join(f"{k} {v}" for k, v in data.info.items())

    def describe(self, preset, data: Data) -> dict:
        """The preset and data facts for the reports' "config"."""
        fields = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
        config = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()}
        config["connections"] = ([list(p) for p in preset.connections] if preset.connections else "paper default")
        return {**config, **data.info, "seq_lens": data.seq_lens}

    def max_new_tokens(self, tokenizer, eval_sets: Mapping[str, Sequence[dict]]) -> int:
        """Generation length: one token more than the longest target of any eval set."""
        return max(len(tokenizer(r["target"], add_special_tokens=False)["input_ids"])
                   for recs in eval_sets.values() for r in recs) + 1

    # The sweep (optional): Θ_C trained on the D_C of several variants of the preset.
    def sweep_points(self, preset) -> list[SweepPoint]:
        raise NotImplementedError(f"the {self.name} task has no sweep")

    def sweep_data(self, study, point: SweepPoint, out: str) -> tuple[Data, dict, dict]:
        """(the point's Data under OUT, its eval sets {set: records}, facts for its report row)."""
        raise NotImplementedError(f"the {self.name} task has no sweep")

    def sweep_config(self, study) -> dict:
        """Facts of the whole sweep for sweep.json's "config"."""
        return {}

    def sweep_label(self, point_row: dict) -> str:
        """The first cell of the point's row in sweep.md."""
        return str(point_row["name"])

    sweep_axis: str = "point"
