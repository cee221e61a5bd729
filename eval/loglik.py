"""Scores a JSONL file of {"prompt", "target"} records with a model directory.

    python -m eval.loglik --model DIR --data FILE.jsonl [--out FILE.jsonl] [--batch-size N] [--skip-invalid]
    python -m eval.loglik --anchor DIR --augment DIR [...] [--composition RUN_DIR] --data FILE.jsonl ...

Prints one JSON line: records, target tokens, total and per-token log-likelihood, perplexity.
--out writes each record back with its "loglik" (summed over target tokens) and "n_tokens".

EOS: a score here counts the target's own tokens only, no EOS after it (calm_jax.scoring). The
training and eval loss of train.compose counts an EOS appended to every target
(TrainConfig.append_eos, on by default), so its per-token loss is over one more token per
record than these scores, and the two are not the same number.
"""

from __future__ import annotations

import argparse
import json
import sys

from calm_jax import data, scoring
from . import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.loglik", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n")[-1].strip())
    common.add_model_flags(parser)  # --model DIR, or --anchor/--augment/--composition; --dtype
    parser.add_argument("--data", required=True, help='JSONL file of {"prompt", "target"} records')
    parser.add_argument("--out", help="JSONL file to write per-record scores to")
    parser.add_argument("--batch-size", type=int, default=8)
    common.add_data_flags(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.encoder_mode:  # scoring has no prompt/continuation split for the augmenting models
        parser.error("--encoder-mode is a decoding ablation; eval.loglik scores iterative compositions only")
    try:
        with common.precision(args):  # --dtype float64: JAX's 64-bit mode, before any array
            if args.out:  # before any model loads: no scores computed for a file that cannot be written
                data.check_writable(args.out)
            records = data.read_jsonl(args.data, skip_invalid=args.skip_invalid)
            checked = common.check(args)
            # Named (or, with --skip-invalid, left out) before weights load.
            records = scoring.scorable(checked.tokenizer, records, checked.max_positions,
                                       skip_invalid=args.skip_invalid)
            loaded = common.build_model(args, checked)
            scores = scoring.loglik(loaded.model, loaded.params, loaded.tokenizer, records, args.batch_size)
    except common.USER_ERRORS as e:
        print(f"eval.loglik: error: {e}", file=sys.stderr)
        return 2
    summary = scoring.summarize(scores)
    print(json.dumps(summary))  # first: the scores are on the screen whatever happens to --out
    if args.out:
        try:
            data.write_jsonl(args.out, [{**record, "loglik": total, "n_tokens": n}
                                        for record, (total, n) in zip(records, scores)])
        except OSError as e:
            print(f"eval.loglik: error: cannot write {args.out}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
