"""Export a trained composition's Θ_C alone, to share: no frozen weights, no optimizer state.

    python -m train.export --run RUN_DIR --out DIR [--step N] [--force]

Writes DIR/theta.safetensors (Θ_C's tensors, named by their tree paths joined with "/",
in the dtype they were trained in), DIR/composition.json (the wiring, each base model's
fingerprint exactly as RUN_DIR/bases.json records it and the path it was trained with, the
step, the run's training settings, data and losses) and DIR/README.md (what it composes and
how to load it). Load it wherever a run directory is taken: `calm_jax.load_composition(ANCHOR,
[AUGMENT], DIR)`, the eval scripts' `--composition DIR`,
`train.compose --init-from DIR`; other base models are refused as they are for the run.

DIR is written whole or not at all (a temporary directory renamed into place). A non-empty
DIR is refused, unless it holds an earlier export and --force is given: then it is
replaced. Nothing else is ever overwritten.
"""

from __future__ import annotations

import argparse
import sys

from calm_jax import checkpoint
from calm_jax.loading import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", metavar="RUN_DIR", required=True, help="a train.compose run directory")
    p.add_argument("--out", metavar="DIR", required=True, help="the export directory to write")
    p.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in DIR")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    try:
        record = checkpoint.export_composition(args.run, args.out, step=args.step, force=args.force)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    theta = record["theta"]
    print(f"exported Θ_C of {args.run} at step {record['step']} to {args.out}: {theta['tensors']} tensors, "
          f"{theta['parameters']:,} parameters ({theta['dtype']}, {theta['bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
