"""One base model of the key-value experiment trained and scored alone, per data seed and model seed.

    python -m train.kv_arithmetic.base_seeds m_A|m_B --data-seeds 0,1 --seeds 4,10 --out DIR
        [--preset default] [--set FIELD=VALUE ...] [--jsonl FILE]

For each (data seed, model seed): the preset's data with task.seed = the data seed, the model
trained as Table 1 trains it (stages.train_base, into DIR/data<S>-seed<M>/), then scored on
its own eval set (m_A: KV-Substitution, m_B: Numeric-Arithmetic). One JSON line per model on
stdout and appended to --jsonl. What issue-style seed checks of a base-model stage use: how
often a stage's recipe misses its target over seeds, and whether a change fixes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from calm_jax import evaluation
from calm_jax.data import read_jsonl
from calm_jax.experiment import study
from calm_jax.experiment.stages import train_base
from calm_jax.model import PlainLM

from .__main__ import _seed_list
from .task import TASK

EVAL_SET = {"m_A": "kv_substitution", "m_B": "numeric_arithmetic"}


def train_and_score(which: str, data_seed: int, seed: int, out: str, overrides=(), preset_name: str = "default") -> dict:
    preset = study.get_preset(TASK, preset_name, [f"task.seed={data_seed}", *overrides])
    tok = TASK.tokenizer()
    start = time.perf_counter()
    data = TASK.build_data(preset, out)
    size, stage = (preset.m_A, preset.train_A) if which == "m_A" else (preset.m_B, preset.train_B)
    m = train_base(which, size, stage, data.seq_lens[which], tok, data.paths[which], out, seed=seed,
                   max_positions=study.max_positions(data))
    seconds = time.perf_counter() - start
    name = EVAL_SET[which]
    records = read_jsonl(data.paths[f"eval_{name}"])
    scored = evaluation.generate_and_score(PlainLM(m.config), m.params, tok, records,
                                           max_new_tokens=TASK.max_new_tokens(tok, {name: records}),
                                           batch_size=min(preset.eval_batch, len(records)))
    return {"model": which, "preset": preset_name, "data_seed": data_seed, "seed": seed, "overrides": list(overrides),
            "steps": stage.steps, "lr": stage.lr, name: scored.exact_match, "train_seconds": round(seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.kv_arithmetic.base_seeds",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(EVAL_SET))
    parser.add_argument("--data-seeds", required=True, metavar="S,S,...")
    parser.add_argument("--seeds", required=True, metavar="M,M,...", help="the model's initialisation/data-order seeds")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides")
    parser.add_argument("--jsonl", metavar="FILE", help="also append each line here")
    args = parser.parse_args(argv)
    data_seeds = _seed_list(parser, "--data-seeds", args.data_seeds)
    seeds = _seed_list(parser, "--seeds", args.seeds)
    if any(o.split("=")[0].strip() in ("task.seed", "seeds.m_A", "seeds.m_B") for o in args.overrides):
        parser.error("--data-seeds and --seeds set task.seed and the model's seed: drop them from --set")
    for s in data_seeds:
        for m in seeds:
            row = train_and_score(args.model, s, m, os.path.join(args.out, f"data{s}-seed{m}"), args.overrides,
                                  args.preset)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
