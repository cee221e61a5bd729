"""What a key-value run's predictions say beyond exact match.

    python -m train.kv_arithmetic.analyze copy-rate RUN_DIR [RUN_DIR ...]
    python -m train.kv_arithmetic.analyze held-in-split RUN_DIR/ablations

copy-rate: on KV-Arithmetic (all keys, held-out keys), how often the composed model's
  scratchpad copies m_A's substitution exactly, and how often its result is right given an
  exact copy (the two things CALM must do in the scratchpad format).
held-in-split: per trained row of an ablation run, KV-Arithmetic (all keys) accuracy split by
  how many of the expression's keys occur in D_C: whether a row's score comes from keys it
  saw in D_C or from reading m_A.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from calm_jax.data import read_jsonl

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.kv_arithmetic.analyze", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("copy-rate", help="CALM's exact copies of m_A's substitution").add_argument("runs", nargs="+")
    sub.add_parser("held-in-split", help="ablation rows' accuracy by keys in D_C").add_argument("ablations")
    args = parser.parse_args(argv)
    if args.what == "copy-rate":
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
