"""From a run's predictions: how often the composed model copies m_A's substitution exactly, and
how often its result is right given an exact copy (KV-Arithmetic, all keys and held-out keys).

    python results/kv_arithmetic/diagnostics/copy_rate.py runs/kv_arithmetic [more run dirs]
"""
import json
import os
import sys

for run in sys.argv[1:]:
    for task in ("kv_arithmetic", "kv_arithmetic_heldout"):
        path = os.path.join(run, "predictions", f"calm-{task}.jsonl")
        rows = [json.loads(line) for line in open(path)]
        copied = [r for r in rows if r["prediction"].split("=")[0] == r["target"].replace("[NUM]", "").split("=")[0]]
        right = sum(r["correct"] for r in copied)
        print(f"{run} {task}: n={len(rows)} exact copy {100 * len(copied) / len(rows):.1f}%, "
              f"result right given the copy {100 * right / max(1, len(copied)):.1f}%, "
              f"exact match {100 * sum(r['correct'] for r in rows) / len(rows):.1f}%")
