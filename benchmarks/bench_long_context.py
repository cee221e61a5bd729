"""Memory of attention at long context: the composed train step at T = 8192, compiled ahead of time.

    .venv/bin/python benchmarks/bench_long_context.py [--seq 8192] [--batch 1]

Nothing is allocated: as in bench_remat.py, the step is lowered with abstract inputs and
compiled for this machine's CPU, and XLA's memory analysis of the executable is reported.
Each shape twice: "all queries" (every attention's scores and probabilities B x H x T x S at
once, the path below model.Q_CHUNK_FROM queries) and "query chunks" (model.Q_CHUNK queries
at a time, each chunk recomputed in the backward pass: what any T >= Q_CHUNK_FROM gets).
Shapes: the peer pair of shared/BENCHMARKS.md (anchor hidden 512, 8 layers, 8 heads;
augmenting model hidden 256, 8 layers, 4 heads), positions raised to T. One JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_remat import PEER_ANCHOR, PEER_AUGMENT, compiled_step  # noqa: E402
from calm_jax import model  # noqa: E402
from calm_jax.composition import CompositionConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    b, t = args.batch, args.seq
    ccfg = CompositionConfig(PEER_ANCHOR.replace(max_positions=t), (PEER_AUGMENT.replace(max_positions=t),))
    chunk_from = model.Q_CHUNK_FROM
    rows = []
    for remat, loss_chunk in (("none", 512), ("full", 512)):
        for name, threshold in (("all queries", t + 1), ("query chunks", chunk_from)):
            model.Q_CHUNK_FROM = threshold
            try:
                compiled, seconds = compiled_step(ccfg, b, t, remat, loss_chunk)
            finally:
                model.Q_CHUNK_FROM = chunk_from
            mem = compiled.memory_analysis()
            row = {"bench": "long_context_memory", "attention": name, "q_chunk": model.Q_CHUNK if threshold <= t else t,
                   "batch": b, "seq": t, "remat": remat, "loss_chunk": loss_chunk,
                   "temporaries_mib": round(mem.temp_size_in_bytes / 2 ** 20, 1),
                   "arguments_mib": round(mem.argument_size_in_bytes / 2 ** 20, 1),
                   "compile_seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        before, after = rows[-2]["temporaries_mib"], rows[-1]["temporaries_mib"]
        print(json.dumps({"bench": "long_context_memory", "remat": remat, "temporaries_ratio": round(before / after, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
