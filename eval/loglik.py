"""Scores a JSONL file of {"prompt", "target"} records with a model directory.

    python -m eval.loglik --model DIR --data FILE.jsonl [--out FILE.jsonl] [--batch-size N]

Prints one JSON line: records, target tokens, total and per-token log-likelihood, perplexity.
--out writes each record back with its "loglik" (summed over target tokens) and "n_tokens".
"""

from __future__ import annotations

import argparse
import json
import sys

from calm_jax import data, loading, model, scoring


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.loglik", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--data", required=True, help='JSONL file of {"prompt", "target"} records')
    parser.add_argument("--out", help="JSONL file to write per-record scores to")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        records = data.read_jsonl(args.data)
        pretrained = loading.load_pretrained(args.model, dtype=args.dtype)
        if pretrained.tokenizer is None:
            raise loading.CheckpointError(f"{args.model} has no tokenizer files (tokenizer.json, ...)")
        scores = scoring.loglik(model.PlainLM(pretrained.config), pretrained.params, pretrained.tokenizer,
                                records, args.batch_size)
    except (data.DataError, loading.CheckpointError) as e:
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
