"""What a key-value run's predictions say beyond exact match.

    python -m train.kv_arithmetic.analyze copy-rate RUN_DIR [RUN_DIR ...]
    python -m train.kv_arithmetic.analyze held-in-split RUN_DIR/ablations
    python -m train.kv_arithmetic.analyze curve RUN_DIR [--sets kv_arithmetic_heldout,...]

copy-rate: on KV-Arithmetic (all keys, held-out keys), how often the composed model's
  scratchpad copies m_A's substitution exactly, and how often its result is right given an
  exact copy (the two things CALM must do in the scratchpad format).
held-in-split: per trained row of an ablation run, KV-Arithmetic (all keys) accuracy split by
  how many of the expression's keys occur in D_C: whether a row's score comes from keys it
  saw in D_C or from reading m_A.
curve: CALM scored at every kept checkpoint of RUN_DIR/calm (a run trained with
  --set train_C.save_every=N): how the held-out accuracy moves during Θ_C training.
  Written to RUN_DIR/curve/curve.json, with each step's predictions as
  RUN_DIR/curve/step<N>-<set>.jsonl (the last step's are Table 1's).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from calm_jax import checkpoint, composition, evaluation
from calm_jax.data import read_jsonl, write_json, write_jsonl
from calm_jax.loading import load_pretrained

from .task import TASK

_KEYS = re.compile("[a-z]+")


def copy_rate(run: str) -> dict:
    """{eval set: {"n", "copied", "right_given_copy", "exact_match"}} (fractions) of RUN's CALM."""
    out = {}
    for name in ("kv_arithmetic", "kv_arithmetic_heldout"):
        rows = read_jsonl(os.path.join(run, "predictions", f"calm-{name}.jsonl"))
        copied = [r for r in rows if r["prediction"].split("=")[0] == r["target"].replace("[NUM]", "").split("=")[0]]
        out[name] = {"n": len(rows), "copied": len(copied) / len(rows),
                     "right_given_copy": sum(r["correct"] for r in copied) / max(1, len(copied)),
                     "exact_match": sum(r["correct"] for r in rows) / len(rows)}
    return out


def held_in_split(ablations: str) -> tuple[int, dict]:
    """(keys in D_C, {row: {keys of the expression in D_C: (right, total)}}) of an ablation run."""
    held_in = set()  # the keys of D_C's KV-Arithmetic prompts
    for r in read_jsonl(os.path.join(ablations, "data", "calm.jsonl")):
        if r["prompt"].startswith("[KVA]"):
            held_in.update(_KEYS.findall(r["prompt"][len("[KVA]"):]))
    suffix = "-kv_arithmetic.jsonl"
    rows = sorted(f[:-len(suffix)] for f in os.listdir(os.path.join(ablations, "predictions")) if f.endswith(suffix))
    split = {}
    for row in rows:
        counts: dict[int, tuple[int, int]] = {}
        for r in read_jsonl(os.path.join(ablations, "predictions", f"{row}{suffix}")):
            n = sum(k in held_in for k in _KEYS.findall(r["prompt"][len("[KVA]"):]))
            right, total = counts.get(n, (0, 0))
            counts[n] = (right + r["correct"], total + 1)
        split[row] = dict(sorted(counts.items()))
    return len(held_in), split


def curve(run: str, sets=("kv_arithmetic_heldout",), batch_size: int = 256) -> dict:
    """{step: {eval set: exact match}} of RUN's Θ_C at each of its kept checkpoints."""
    calm = os.path.join(run, "calm")
    steps = checkpoint.composition_steps(calm)
    m_A, m_B = load_pretrained(os.path.join(run, "m_A")), load_pretrained(os.path.join(run, "m_B"))
    tok = TASK.tokenizer()
    records = {name: read_jsonl(os.path.join(run, "data", f"eval_{name}.jsonl")) for name in sets}
    max_new_tokens = TASK.max_new_tokens(tok, records)
    out = {}
    for step in steps:
        ccfg, theta = checkpoint.load_theta(calm, m_B, [m_A], step=step)
        params = {"theta": theta, "anchor": m_B.params, "augments": (m_A.params,)}
        out[step] = {}
        for name, recs in records.items():
            scored = evaluation.generate_and_score(composition.ComposedLM(ccfg), params, tok, recs,
                                                   max_new_tokens=max_new_tokens, batch_size=min(batch_size, len(recs)))
            out[step][name] = scored.exact_match
            write_jsonl(os.path.join(run, "curve", f"step{step}-{name}.jsonl"), scored.rows)
        print(f"step {step}: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in out[step].items()), flush=True)
    write_json(os.path.join(run, "curve", "curve.json"), {str(k): v for k, v in out.items()})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.kv_arithmetic.analyze", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("copy-rate", help="CALM's exact copies of m_A's substitution").add_argument("runs", nargs="+")
    sub.add_parser("held-in-split", help="ablation rows' accuracy by keys in D_C").add_argument("ablations")
    c = sub.add_parser("curve", help="CALM's accuracy at each kept Θ_C checkpoint")
    c.add_argument("run")
    c.add_argument("--sets", default="kv_arithmetic_heldout", help="comma-separated eval sets")
    args = parser.parse_args(argv)
    if args.what == "curve":
        curve(args.run, tuple(args.sets.split(",")))
    elif args.what == "copy-rate":
        for run in args.runs:
            for name, s in copy_rate(run).items():
                print(f"{run} {name}: n={s['n']} exact copy {100 * s['copied']:.1f}%, result right given the copy "
                      f"{100 * s['right_given_copy']:.1f}%, exact match {100 * s['exact_match']:.1f}%")
    else:
        keys, split = held_in_split(args.ablations)
        print(f"{keys} keys in D_C")
        for row, counts in split.items():
            print(f"{row:>14}: " + ", ".join(f"{n} keys in D_C {right}/{total}" for n, (right, total) in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
