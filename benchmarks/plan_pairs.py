"""Plans for real anchor / augmenting pairs from their public config.json values (configs/): what fits where.

    .venv/bin/python benchmarks/plan_pairs.py [--out benchmarks/results/plan.jsonl] [--only NAME]
    .venv/bin/python benchmarks/plan_pairs.py --table            # the README table from the file

Runs `python -m train.plan --json` once per entry of PLANS (bf16 frozen weights, 2048
tokens, 80 GiB per device, the loss in 512-position chunks), one process each, and writes
one JSON line per plan (each carries the command that made it) to --out. Each entry
compiles 1 to 4 times (8B-scale compiles take 15-30 s here). --table prints the
markdown table of train.plan.markdown_table from the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from calm_jax.data import DataError, read_jsonl  # noqa: E402
from train.plan import markdown_table  # noqa: E402

QWEN = ["--anchor", "configs/qwen2.5-7b", "--augment", "configs/qwen2.5-coder-1.5b", "--match-vocab",
        "--name", "Qwen2.5-7B + Qwen2.5-Coder-1.5B"]
LLAMA = ["--anchor", "configs/llama-3.1-8b", "--augment", "configs/llama-3.2-1b",
         "--name", "Llama-3.1-8B + Llama-3.2-1B"]
COMMON = ["--seq-len", "2048", "--frozen-dtype", "bfloat16", "--loss-chunk", "512", "--device-memory", "80GiB"]

# (name, flags). "none" is compiled once at one row per device (it does not fit there, or
# nothing smaller would); "full" is searched: two compiles, a linear fit, the prediction compiled.
PLANS = [
    ("llama-1-none", LLAMA + ["--devices", "1", "--batch-size", "1", "--remat", "none", "--search", "none"]),
    ("llama-1-full", LLAMA + ["--devices", "1", "--batch-size", "1", "--remat", "full"]),
    ("llama-8-full", LLAMA + ["--devices", "8", "--mesh", "data=8", "--batch-size", "8", "--remat", "full"]),
    ("qwen-1-none", QWEN + ["--devices", "1", "--batch-size", "1", "--remat", "none", "--search", "none"]),
    ("qwen-1-full", QWEN + ["--devices", "1", "--batch-size", "1", "--remat", "full"]),
    ("qwen-8-none", QWEN + ["--devices", "8", "--mesh", "data=8", "--batch-size", "8", "--remat", "none",
                            "--search", "none"]),
    ("qwen-8-full", QWEN + ["--devices", "8", "--mesh", "data=8", "--batch-size", "8", "--remat", "full"]),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "plan.jsonl"))
    p.add_argument("--only", action="append", help="run only these PLANS names (the file's other lines are kept)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = p.parse_args()
    try:  # the records of earlier runs
        earlier = read_jsonl(args.out, require=("plan",)) if args.table or os.path.isfile(args.out) else []
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.table:
        print(markdown_table(earlier))
        return 0
    records = {r["plan"]: r for r in earlier}
    for name, flags in PLANS:
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "train.plan", *flags, *COMMON, "--json"], cwd=ROOT,
                              capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        if done.returncode:
            print(f"{name}: failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        record = {"plan": name, **json.loads(done.stdout), "wall_seconds": round(time.perf_counter() - t, 1)}
        records[name] = record
        print(f"{name}: {record['per_device_bytes'] / 2 ** 30:.2f} GiB per device at micro-batch "
              f"{record['micro_batch_per_device']}, fits {record['fits']}; largest micro-batch that fits: "
              f"{record.get('max_micro_batch_per_device', 'not searched')} ({record['wall_seconds']} s)", flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        order = [n for n, _ in PLANS]
        with open(args.out, "w") as f:
            for r in sorted(records.values(), key=lambda r: order.index(r["plan"]) if r["plan"] in order else 99):
                f.write(json.dumps(r) + "\n")
    print(markdown_table(read_jsonl(args.out, require=("plan",))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
