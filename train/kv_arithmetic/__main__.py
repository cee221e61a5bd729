"""Key-value arithmetic (paper §4.1, Table 1) end to end; what `make demo` runs.

    python -m train.kv_arithmetic [--preset default|paper_format|tiny|paper] [--out runs/kv_arithmetic] [--fresh]
                                  [--set FIELD=VALUE ...] [--ablations [--rows R,R,...]] [--sweep] [--seeds 0,1,2 [--train-seeds 0,1]] [--workers N]

Stages, each with a progress bar and its time (calm_jax.experiment.study.run_table1):
  data   D_KV, the three datasets, D_C (train.kv_arithmetic.task), as JSONL under OUT/data/
  m_A    a small Llama-style LM trained on KV-Substitution over all keys   -> OUT/m_A (HF format)
  m_B    a larger one trained on Numeric-Arithmetic only (never sees keys) -> OUT/m_B (HF format)
  calm   Θ_C trained on D_C (held-in keys only), both models frozen        -> OUT/calm
  eval   greedy generation of m_A, m_B and CALM on KV-Substitution, Numeric-Arithmetic,
         KV-Arithmetic (all keys) and KV-Arithmetic (held-out keys only), exact match
Results: OUT/table1.json, table1.md, table1.png. Trained models and Θ_C are kept: a rerun
reuses them after checking their recipe.json, and refuses other data or settings.
--ablations: the Table 5 rows (or only those --rows names, with m_A, m_B and calm) into
OUT/ablations; --sweep: Θ_C per held-in key fraction into
OUT/sweep; --seeds: Table 1 once per data seed into OUT/seed<S>, with mean/min/max in
OUT/seeds.json; with --train-seeds, once per data seed and training seed T (stage seeds
3T+1, 3T+2, 3T+3; T = 0 is the default) into OUT/data<S>-train<T>. These run their jobs
side by side, one worker process per CPU core.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from calm_jax import trainer
from calm_jax.experiment import study
from .task import TASK


def _seed_list(parser, flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"{flag} takes comma-separated integers, found {text!r}")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        parser.error(f"{flag} needs distinct seeds >= 0, found {text!r}")
    return seeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.kv_arithmetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", choices=tuple(TASK.presets()))
    parser.add_argument("--out", default=os.path.join("runs", "kv_arithmetic"), metavar="DIR")
    parser.add_argument("--fresh", action="store_true", help="delete DIR first (retrain everything)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="change the preset, e.g. train_B.steps=2250, connections='((1,3),)', "
                             "options.gate=True, seeds.theta=4 or task.seed=1 (repeatable); use a fresh --out")
    parser.add_argument("--ablations", action="store_true", help="the ablations (Table 5) into DIR/ablations")
    parser.add_argument("--rows", metavar="R,R,...",
                        help="with --ablations: only these rows (m_A, m_B and calm are always run), e.g. "
                             "random_m_A,vanilla_m_A,encoder_m_A,lora_m_B,finetune_m_B")
    parser.add_argument("--sweep", action="store_true", help="the held-in key fraction sweep into DIR/sweep")
    parser.add_argument("--seeds", metavar="S,S,...",
                        help="Table 1 once per data seed (task.seed) into DIR/seed<S>, summarised in DIR/seeds.json")
    parser.add_argument("--train-seeds", metavar="T,T,...",
                        help="with --seeds: each data seed once per training seed T (the seeds of m_A, m_B and "
                             "Θ_C are 3T+1, 3T+2, 3T+3; T = 0 is the default 1, 2, 3) into DIR/data<S>-train<T>")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="with --ablations/--sweep/--seeds: jobs run at once, each in its own process pinned to "
                             "its own CPU cores (default: one per core on CPU, 1 on an accelerator)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, found {args.workers}")
    seeds = _seed_list(parser, "--seeds", args.seeds)
    train_seeds = _seed_list(parser, "--train-seeds", args.train_seeds)
    if train_seeds is not None and seeds is None:
        parser.error("--train-seeds goes with --seeds")
    if train_seeds is not None and any(o.startswith("seeds.") for o in args.overrides):
        parser.error("--train-seeds sets the stage seeds: drop --set seeds.*")
    rows = None
    if args.rows is not None:
        if not args.ablations:
            parser.error("--rows goes with --ablations")
        try:
            rows = study.ablation_rows([r for r in args.rows.split(",") if r])
        except ValueError as e:
            parser.error(str(e))
    if seeds is not None:
        if args.ablations or args.sweep:
            parser.error("--seeds runs Table 1 per seed; run --ablations or --sweep separately")
    try:
        study.get_preset(TASK, args.preset, args.overrides)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    try:
        _run(args, seeds, train_seeds, rows)
    except KeyboardInterrupt as e:  # calm_jax.trainer.Interrupted, workers.Interrupted, or a second Ctrl-C
        again = shlex.join(["python", "-m", "train.kv_arithmetic",
                            *[a for a in (sys.argv[1:] if argv is None else argv) if a != "--fresh"]])
        kept = (f"after step {e.step}, saved in {e.run_dir}" if isinstance(e, trainer.Interrupted)
                else str(e) if isinstance(e, study.workers_lib.Interrupted)
                else "at once; the stages finished and the checkpoints saved are kept")
        print(f"interrupted (Ctrl-C): {kept}; continue with: {again}", file=sys.stderr)
        return 130
    return 0


def _run(args, seeds, train_seeds, rows) -> None:
    if seeds is not None:
        study.run_seeds(TASK, args.preset, args.out, seeds, args.overrides, args.workers, train_seeds)
    elif args.ablations or args.sweep:
        if args.ablations:
            study.run_ablations(TASK, args.preset, args.out, args.overrides, args.workers, rows)
        if args.sweep:
            study.run_sweep(TASK, args.preset, args.out, args.overrides, args.workers)
    else:
        study.run_table1(TASK, args.preset, args.out, overrides=args.overrides)


if __name__ == "__main__":
    sys.exit(main())
