"""From an ablation run's predictions: KV-Arithmetic (all keys) accuracy of every trained row, split
by how many of the expression's keys are in D_C (0, 1 or 2). Shows whether a row's score comes
from keys it saw in D_C or from reading m_A.

    python results/kv_arithmetic/diagnostics/held_in_split.py runs/kv_arithmetic/ablations
"""
import json
import os
import re
import sys

run = sys.argv[1]
held_in = set()  # the keys of D_C's KV-Arithmetic prompts
for line in open(os.path.join(run, "data", "calm.jsonl")):
    prompt = json.loads(line)["prompt"]
    if prompt.startswith("[KVA]"):
        held_in.update(re.findall("[a-z]+", prompt[len("[KVA]"):]))
print(f"{len(held_in)} keys in D_C")
rows = sorted(f[:-len("-kv_arithmetic.jsonl")] for f in os.listdir(os.path.join(run, "predictions"))
              if f.endswith("-kv_arithmetic.jsonl"))
for row in rows:
    counts = {}
    for line in open(os.path.join(run, "predictions", f"{row}-kv_arithmetic.jsonl")):
        r = json.loads(line)
        n = sum(k in held_in for k in re.findall("[a-z]+", r["prompt"][len("[KVA]"):]))
        right, total = counts.get(n, (0, 0))
        counts[n] = (right + r["correct"], total + 1)
    split = ", ".join(f"{n} keys in D_C {right}/{total}" for n, (right, total) in sorted(counts.items()))
    print(f"{row:>14}: {split}")
