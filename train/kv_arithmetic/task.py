"""The key-value arithmetic task (paper §4.1) as a calm_jax.experiment Task.

Files of a study (under OUT/data/): m_A's KV-Substitution over all keys (with random task
markers), m_B's Numeric-Arithmetic (never a key; with context noise), D_C over the
held-in keys only (KV-Arithmetic, with the preset's share of KV-Substitution and
Numeric-Arithmetic), and four eval sets: KV-Substitution, Numeric-Arithmetic,
KV-Arithmetic over all keys and over held-out keys only. Its sweep: the held-in key
fraction, with eval expressions the base models were trained on dropped.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from calm_jax import data as data_lib
from calm_jax.data import write_jsonl
from calm_jax.experiment.task import Data, SweepPoint, Task

from . import data as kv_data
from .presets import PRESETS

# Accuracy %, paper Table 1; its one KV-Arithmetic figure stands beside both of ours.
PAPER_TABLE1 = {
    "m_A": {"kv_substitution": 98.1, "numeric_arithmetic": 4.2, "kv_arithmetic": 0.7, "kv_arithmetic_heldout": 0.7},
    "m_B": {"kv_substitution": 0.0, "numeric_arithmetic": 73.7, "kv_arithmetic": 0.0, "kv_arithmetic_heldout": 0.0},
    "calm": {"kv_substitution": 92.9, "numeric_arithmetic": 72.0, "kv_arithmetic": 84.3,
             "kv_arithmetic_heldout": 84.3},
}
SWEEP_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
VANILLA_VALUES_SEED = 12  # the vanilla m_A's other key -> value mapping


def fraction_name(fraction: float) -> str:
    return f"held_in_{100 * fraction:g}pct"


def m_A_records(kv, exprs) -> list[dict]:
    """m_A's training data: KV-Substitution of `exprs` under `kv`'s mapping (with the task's random markers)."""
    return kv_data.with_random_markers(kv.records(exprs, "kv_substitution"), kv.config, seed=1)


def seq_len(tok, records) -> int:
    """The longest encoded example (with EOS), rounded up to a multiple of 8."""
    return -(-max(len(data_lib.encode(tok, r, append_eos=True)[0]) for r in records) // 8) * 8


def base_expressions(kv, preset) -> list:
    """Every expression m_A or m_B is trained on, in the order build_data draws them."""
    return kv.train_expressions(max(preset.train_A.examples, preset.train_B.examples))


def unseen_eval_sets(kv, base_exprs: set) -> tuple[dict, dict]:
    """KV-Arithmetic records of `kv`'s eval sets without the expressions in `base_exprs`.

    Returns ({set: records}, {set: expressions dropped}) for KVTask.sweep_sets.
    """
    sets, dropped = {}, {}
    for name, exprs in (("kv_arithmetic", kv.eval_all), ("kv_arithmetic_heldout", kv.eval_heldout)):
        kept = [e for e in exprs if e not in base_exprs]
        sets[name], dropped[name] = kv.records(kept, "kv_arithmetic"), len(exprs) - len(kept)
        if not kept:
            raise ValueError(f"every {name} evaluation expression of held_in_fraction={kv.config.held_in_fraction} "
                             "was in the base models' training data; raise n_kv or n_eval")
    return sets, dropped


class KVTask(Task):
    name = "kv_arithmetic"
    title = "key-value arithmetic"
    eval_sets = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic", "kv_arithmetic_heldout")
    set_names = {"kv_substitution": "KV-Substitution", "numeric_arithmetic": "Numeric-Arithmetic",
                 "kv_arithmetic": "KV-Arithmetic (all keys)", "kv_arithmetic_heldout": "KV-Arithmetic (held-out keys)"}
    paper = PAPER_TABLE1
    anchor_set = "numeric_arithmetic"
    sweep_sets = ("kv_arithmetic_heldout", "kv_arithmetic")
    sweep_axis = "held-in keys"
    table_note = ("The paper reports one KV-Arithmetic figure, on expressions not in D_C (\"generalisation to keys "
                  "outside the 20%\"); it is shown beside both of our KV-Arithmetic rows. Ours: exact match of greedy "
                  "generation; `held-out keys` = expressions made only of keys that never occur in D_C.\n")
    sweep_note = ("Exact match of greedy generation (accuracy %), iterative CALM; same base models, composition and "
                  "training stage at every fraction. n: evaluation expressions left after dropping those the base "
                  "models were trained on (each fraction draws its own held-out set).\n")

    def presets(self) -> dict:
        return PRESETS

    def tokenizer(self):
        return kv_data.make_tokenizer()

    def build_data(self, preset, out: str, write: bool = True) -> Data:
        cfg = preset.task
        kv = kv_data.make_kv_data(cfg)
        tok = self.tokenizer()
        train_exprs = base_expressions(kv, preset)
        dc_exprs = kv.train_expressions(preset.train_C.examples, held_in_only=True)
        n_sub = round(cfg.dc_substitution * len(dc_exprs))
        n_num = n_sub + round(cfg.dc_numeric * len(dc_exprs))
        files = {
            "m_A": m_A_records(kv, train_exprs[:preset.train_A.examples]),
            "m_B": kv_data.with_context_noise(kv.records(train_exprs[:preset.train_B.examples], "numeric_arithmetic"),
                                              cfg, seed=2),
            "calm": (kv.records(dc_exprs[:n_sub], "kv_substitution")
                     + kv.records(dc_exprs[n_sub:n_num], "numeric_arithmetic")
                     + kv.records(dc_exprs[n_num:], "kv_arithmetic")),
            "eval_kv_substitution": kv.records(kv.eval_all, "kv_substitution"),
            "eval_numeric_arithmetic": kv.records(kv.eval_all, "numeric_arithmetic"),
            "eval_kv_arithmetic": kv.records(kv.eval_all, "kv_arithmetic"),
            "eval_kv_arithmetic_heldout": kv.records(kv.eval_heldout, "kv_arithmetic"),
        }
        paths = {name: os.path.join(out, "data", f"{name}.jsonl") for name in files}
        if write:
            for name, records in files.items():
                write_jsonl(paths[name], records)
        seq_lens = {name: seq_len(tok, files[name]) for name in ("m_A", "m_B", "calm")}
        info = {"held_in_keys": len(kv.held_in), "held_out_keys": len(kv.held_out)}
        return Data(paths, seq_lens, info, state=kv)

    def data_summary(self, data: Data) -> str:
        kv = data.state
        return (f"D_KV: {len(kv.keys)} keys ({len(kv.held_in)} held-in for D_C, {len(kv.held_out)} held-out); "
                f"eval: {len(kv.eval_all)} expressions over all keys, {len(kv.eval_heldout)} over held-out keys; "
                f"sequence lengths {data.seq_lens}")

    def plot_subtitle(self, preset, data: Data) -> str:
        return f"N_KV={preset.task.n_kv}, {len(data.state.held_in)} held-in keys"

    def vanilla_m_A_records(self, preset, data: Data) -> tuple[list[dict], str]:
        """m_A's expressions, substituted under another key -> value mapping (VANILLA_VALUES_SEED)."""
        kv = data.state
        values = tuple(int(v) for v in np.random.default_rng(VANILLA_VALUES_SEED).permutation(kv.values))
        records = m_A_records(dataclasses.replace(kv, values=values),
                              base_expressions(kv, preset)[:preset.train_A.examples])
        same = sum(a == b for a, b in zip(values, kv.values))
        return records, (f"KV-Substitution under another mapping ({same} of {len(values)} keys keep their value; "
                         f"seed {VANILLA_VALUES_SEED})")

    def sweep_points(self, preset) -> list[SweepPoint]:
        return [SweepPoint(fraction_name(f), f, dataclasses.replace(preset, task=preset.task.replace(
            held_in_fraction=f))) for f in SWEEP_FRACTIONS]

    def sweep_data(self, study, point: SweepPoint, out: str):
        data = self.build_data(point.preset, out)
        kv = data.state
        if (kv.keys, kv.values) != (study.data.state.keys, study.data.state.values):
            raise ValueError(f"held_in_fraction={point.value} changes D_KV's keys or values: the base models do not "
                             "belong to this fraction's data")
        eval_sets, dropped = unseen_eval_sets(kv, set(base_expressions(study.data.state, study.preset)))
        for name, records in eval_sets.items():  # what was evaluated, in place of build_data's unfiltered sets
            write_jsonl(data.paths[f"eval_{name}"], records)
        # build_data writes a whole study; the base-model files here are not what the base models saw.
        for name in ("m_A", "m_B", "eval_kv_substitution", "eval_numeric_arithmetic"):
            os.remove(data.paths[name])
        print(f"held-in {100 * point.value:g}%: {len(kv.held_in)} held-in keys, {len(kv.held_out)} held-out; "
              "evaluation " + ", ".join(f"{s} {len(r)} ({dropped[s]} dropped: in the base models' data)"
                                        for s, r in eval_sets.items()))
        info = {"held_in_fraction": point.value, "held_in_keys": len(kv.held_in), "held_out_keys": len(kv.held_out),
                "eval_dropped": dropped}
        return data, eval_sets, info

    def sweep_config(self, study) -> dict:
        return {"fractions": list(SWEEP_FRACTIONS),
                "base_model_expressions": len(set(base_expressions(study.data.state, study.preset)))}

    def sweep_label(self, row: dict) -> str:
        return f"{100 * row['held_in_fraction']:g}% ({row['held_in_keys']})"


TASK = KVTask()
