"""Generate continuations for a JSONL file of {"prompt": ...} records.

    python -m eval.generate --model DIR --prompts FILE.jsonl --out FILE.jsonl
    python -m eval.generate --anchor DIR --augment DIR [--augment DIR ...] [--composition RUN_DIR]
        [--encoder-mode] --prompts FILE.jsonl --out FILE.jsonl
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop TOKEN ...]
        [--skip-invalid]

Each output line is the input record plus "generation" (text), "tokens", "num_generated"
and "stopped" (ended on a stop token).
"""

from __future__ import annotations

import argparse
import sys

from calm_jax.data import write_jsonl
from . import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.split("\n")[0])
    common.add_model_flags(parser)
    common.add_generation_flags(parser)
    parser.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl")
    common.add_data_flags(parser)
    args = parser.parse_args(argv)
    common.check_outputs((args.out, False))  # before any model loads: nothing generated is thrown away
    with common.precision(args):
        loaded, records, gens, seconds = common.generate_for(args, args.prompts, need_target=False)
    write_jsonl(args.out, [{**r, "generation": g.text, "tokens": g.tokens, "num_generated": g.num_generated,
                                   "stopped": g.stopped} for r, g in zip(records, gens)])
    total = sum(g.num_generated for g in gens)
    print(f"{loaded.label}: {len(gens)} prompts, {total} tokens in {seconds:.1f}s (compilation included) "
          f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
