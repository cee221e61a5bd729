"""Scores a JSONL file of {"prompt", "target"} records with a model directory.

    python -m eval.loglik --model DIR --data FILE.jsonl [--out FILE.jsonl] [--batch-size N]
    python -m eval.loglik --anchor DIR --augment DIR [...] [--composition RUN_DIR] --data FILE.jsonl ...

Prints one JSON line: records, target tokens, total and per-token log-likelihood, perplexity.
--out writes each record back with its "loglik" (summed over target tokens) and "n_tokens".
"""

from __future__ import annotations

import argparse
import json
import sys

from calm_jax import data, scoring
from . import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.loglik", description=__doc__.split("\n")[0])
    common.add_model_flags(parser)  # --model DIR, or --anchor/--augment/--composition; --dtype
    parser.add_argument("--data", required=True, help='JSONL file of {"prompt", "target"} records')
    parser.add_argument("--out", help="JSONL file to write per-record scores to")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.encoder_mode:  # scoring has no prompt/continuation split for the augmenting models
        parser.error("--encoder-mode is a decoding ablation; eval.loglik scores iterative compositions only")
    try:
        records = data.read_jsonl(args.data)
        checked = common.check(args)
        scoring.encode_records(checked.tokenizer, records, checked.max_positions)  # named before weights load
        loaded = common.build_model(args, checked)
        scores = scoring.loglik(loaded.model, loaded.params, loaded.tokenizer, records, args.batch_size)
    except common.USER_ERRORS as e:
        print(f"eval.loglik: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            for record, (total, n) in zip(records, scores):
                f.write(json.dumps({**record, "loglik": total, "n_tokens": n}) + "\n")
    print(json.dumps(scoring.summarize(scores)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
