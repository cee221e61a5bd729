"""Exact-match accuracy (and optionally chrF/BLEU) of generations for {"prompt", "target"} records.

    python -m eval.exact_match (--model DIR | --anchor DIR --augment DIR ... [--composition RUN_DIR]
        [--encoder-mode]) --data FILE.jsonl --out DIR [--metrics chrf,bleu] [--skip-invalid] [generation flags]

Records may carry a "task" field: scores are given per task and over "all". Scored by
calm_jax.evaluation.score, the path the experiments use too: targets are compared as
generations are rendered (the tokenizer's special tokens, e.g. the key-value task's
markers, removed), by `calm_jax.metrics.normalize_answer` of prediction and target (NFKC,
whitespace trimmed and collapsed; case kept). Writes to DIR:
  predictions-LABEL.jsonl   each record with its "prediction" and "correct"
  results.json              {label: {"scores": {task: {n, exact_match, chrf?, bleu?}},
                            "source": what was evaluated (eval.common.describe), "data", ...}}
  results.md                one row per label, so runs of a plain model, compositions and
                            their encoder mode into the same DIR sit side by side
A rerun of the same row replaces it; a different model, data file or generation setting
under a label DIR already has is refused (give it another --label).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import sys

from calm_jax import evaluation, metrics
from calm_jax.data import write_jsonl, write_text
from . import common


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


def _read_results(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_row(results: dict, label: str, identity: dict, results_path: str) -> None:
    """Refuses (SystemExit) to replace a row of `results` made by another model, data file or
    generation setting, or to share a predictions file name with another row."""
    old = results.get(label)
    if old is not None:
        diffs = []
        for key, new in identity.items():
            was = old.get(key)
            if isinstance(was, dict) and isinstance(new, dict):
                diffs += [f"{key}.{k}: {was.get(k)!r} there, {new.get(k)!r} here"
                          for k in sorted(set(was) | set(new)) if was.get(k) != new.get(k)]
            elif was != new:
                diffs.append(f"{key}: {'not recorded' if was is None else repr(was)} there, {new!r} here")
        if diffs:
            raise SystemExit(f"error: {results_path} already has a row {label!r} from something else "
                             f"({'; '.join(diffs)}); give this one another --label, or another --out")
    clash = [other for other in results if other != label and _safe(other) == _safe(label)]
    if clash:
        raise SystemExit(f"error: label {label!r} would write the predictions file of row {clash[0]!r} in "
                         f"{results_path}; give another --label")


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
    common.add_data_flags(parser)
    args = parser.parse_args(argv)
    extra = [m for m in args.metrics.split(",") if m]
    unknown = sorted(set(extra) - set(metrics.METRICS))
    if unknown:
        raise SystemExit(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(metrics.METRICS)}")
    results_path = os.path.join(args.out, "results.json")
    # As asked for (max_new_tokens None: the default, fitted to the model), so a row can be
    # checked before any model loads.
    # batch_size too: sampled generations depend on it.
    generation = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                                                "no_eos_stop", "batch_size")}
    identity = {}

    def claim_row(label, source):
        identity.update(json.loads(json.dumps({"source": source, "data": os.path.abspath(args.data),
                                               "generation": generation})))
        check_row(_read_results(results_path), label, identity, results_path)

    common.check_outputs((args.out, True))  # before any model loads: nothing generated is thrown away

    def claim_files(label, source):
        claim_row(label, source)
        common.check_outputs((os.path.join(args.out, f"predictions-{_safe(label)}.jsonl"), False),
                             (results_path, False), (os.path.join(args.out, "results.md"), False))

    with common.precision(args):
        loaded, records, gens, seconds = common.generate_for(args, args.data, need_target=True,
                                                             before_loading=claim_files)

    rows, scores = evaluation.score(loaded.tokenizer, records, [g.text for g in gens], extra)
    os.makedirs(args.out, exist_ok=True)
    # Held while the directory's files are read and rewritten: runs into one --out at once
    # each add their row instead of the last writer's file winning.
    with open(os.path.join(args.out, ".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = _read_results(results_path)
        check_row(results, loaded.label, identity, results_path)  # another process may have written it meanwhile
        write_jsonl(os.path.join(args.out, f"predictions-{_safe(loaded.label)}.jsonl"), rows)
        results[loaded.label] = {"scores": scores, **identity, "encoder_mode": bool(args.encoder_mode),
                                 "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                 "seconds": round(seconds, 2)}
        write_text(results_path, json.dumps(results, indent=2))
        table = markdown_table(results)
        write_text(os.path.join(args.out, "results.md"), table)
    print(table)
    print(f"{loaded.label}: {len(records)} records in {seconds:.1f}s (compilation included) -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
