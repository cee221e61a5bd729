"""Exact-match accuracy (and optionally chrF/BLEU) of generations for {"prompt", "target"} records.

    python -m eval.exact_match (--model DIR | --anchor DIR --augment DIR ... [--composition RUN_DIR]
        [--encoder-mode]) --data FILE.jsonl --out DIR [--metrics chrf,bleu] [generation flags]

Records may carry a "task" field: scores are given per task and over "all". Exact match
compares `calm_jax.metrics.normalize_answer` of prediction and target (NFKC, whitespace
trimmed and collapsed; case kept). Writes to DIR:
  predictions-LABEL.jsonl   each record with its "prediction" and "correct"
  results.json              {label: {"scores": {task: {n, exact_match, chrf?, bleu?}}, ...}}
  results.md                one row per label, so runs of a plain model, a composition and
                            its encoder mode into the same DIR sit side by side
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from calm_jax import metrics
from eval import common


def markdown_table(results: dict) -> str:
    """Rows: labels; columns: task x metric (exact match as %, chrF/BLEU as 0..100)."""
    columns = []
    for entry in results.values():
        for task, scores in entry["scores"].items():
            for name in scores:
                if name != "n" and (task, name) not in columns:
                    columns.append((task, name))
    columns.sort(key=lambda c: (c[0] == "all", c[0], c[1] != "exact_match", c[1]))
    head = "| model | " + " | ".join(f"{t} {'EM %' if m == 'exact_match' else m}" for t, m in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for label, entry in results.items():
        cells = []
        for task, name in columns:
            value = entry["scores"].get(task, {}).get(name)
            cells.append("" if value is None else f"{100 * value:.1f}" if name == "exact_match" else f"{value:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.exact_match", description=__doc__.split("\n")[0])
    common.add_model_flags(parser)
    common.add_generation_flags(parser, max_new_tokens=32)
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help='{"prompt", "target"[, "task"]} records')
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--metrics", default="", help="extra corpus metrics, comma-separated: chrf,bleu")
    args = parser.parse_args(argv)
    extra = [m for m in args.metrics.split(",") if m]
    unknown = sorted(set(extra) - set(metrics.METRICS))
    if unknown:
        raise SystemExit(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(metrics.METRICS)}")
    loaded, records, gens, seconds = common.generate_for(args, args.data, need_target=True)

    preds = [g.text for g in gens]
    targets = [r["target"] for r in records]
    scores = metrics.summarize([r.get("task") for r in records], preds, targets, extra)
    os.makedirs(args.out, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", loaded.label)
    common.write_jsonl(os.path.join(args.out, f"predictions-{safe}.jsonl"),
                       [{**r, "prediction": p, "correct": metrics.exact_match(p, r["target"])}
                        for r, p in zip(records, preds)])
    results_path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
    results[loaded.label] = {"scores": scores, "data": args.data, "encoder_mode": bool(args.encoder_mode),
                             "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                             "seconds": round(seconds, 2)}
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
    table = markdown_table(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"{loaded.label}: {len(records)} records in {seconds:.1f}s (compilation included) -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
