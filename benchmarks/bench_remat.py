"""Memory of the composed train step by remat policy and loss chunking, compiled ahead of time.

    .venv/bin/python benchmarks/bench_remat.py [--only peer|1b]

Nothing is allocated: the step is lowered with abstract inputs (jax.ShapeDtypeStruct) and
compiled for this machine's CPU, and XLA's own memory analysis of the executable is
reported (temporaries = what the step holds besides its inputs and outputs: the saved
activations, the logits and their softmax copies). One JSON line per (shape, policy, loss
chunk), with the step's FLOPs (our count, and XLA's). Two more lines per shape check what
autodiff stores for frozen computation: a deeper augmenting model, and the first connected
anchor layer moved up, at remat "none".

Compiled with calm_jax.plan.CPU_COMPILER_OPTIONS: XLA:CPU's defaults (the concurrency-optimised
schedule, and CSE across remat's barriers) run the recomputation with the forward pass and
hide most of what remat saves (peer shape, the anchor alone: 324 -> 285 MiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_train_step import step_flops  # noqa: E402
from calm_jax import plan  # noqa: E402
from calm_jax import train_step as ts  # noqa: E402
from calm_jax.composition import CompositionConfig, init_theta  # noqa: E402
from calm_jax.losses import composed_loss  # noqa: E402
from calm_jax.config import ModelConfig  # noqa: E402
from calm_jax.model import param_shapes  # noqa: E402

PEER_ANCHOR = ModelConfig(family="llama", vocab_size=512, hidden_size=512, num_layers=8, num_heads=8,
                          num_kv_heads=8, head_dim=64, intermediate_size=1408, max_positions=512)
PEER_AUGMENT = ModelConfig(family="llama", vocab_size=512, hidden_size=256, num_layers=8, num_heads=4,
                           num_kv_heads=4, head_dim=64, intermediate_size=704, max_positions=512)
# ~0.95B anchor (Llama-style, 32k vocabulary) and a ~0.3B augmenting model.
ANCHOR_1B = ModelConfig(family="llama", vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16,
                        num_kv_heads=16, head_dim=128, intermediate_size=5632, max_positions=4096)
AUGMENT_03B = ModelConfig(family="llama", vocab_size=32000, hidden_size=1024, num_layers=16, num_heads=8,
                          num_kv_heads=8, head_dim=128, intermediate_size=2816, max_positions=4096)
SHAPES = {"peer": (PEER_ANCHOR, PEER_AUGMENT, 8, 128), "1b": (ANCHOR_1B, AUGMENT_03B, 1, 2048)}


def compiled_step(ccfg: CompositionConfig, b: int, t: int, remat: str, loss_chunk: int):
    opt = ts.make_optimizer(1e-3, 1000, 10)
    theta = jax.eval_shape(lambda: init_theta(ccfg, jax.random.key(0)))
    state = jax.eval_shape(opt.init, theta)
    frozen = {"anchor": param_shapes(ccfg.anchor), "augments": tuple(param_shapes(a) for a in ccfg.augments)}
    batch = {"tokens_BxT": jax.ShapeDtypeStruct((b, t), jnp.int32), "mask_BxT": jax.ShapeDtypeStruct((b, t), bool),
             "target_BxT": jax.ShapeDtypeStruct((b, t), bool)}
    step = ts.make_train_step(composed_loss(ccfg, remat, loss_chunk), opt)
    start = time.perf_counter()
    compiled, _ = plan.compile_lowered(step.jitted.lower(theta, state, frozen, batch))
    return compiled, time.perf_counter() - start


def report(name: str, ccfg: CompositionConfig, b: int, t: int, remat: str, loss_chunk: int, **extra) -> dict:
    compiled, seconds = compiled_step(ccfg, b, t, remat, loss_chunk)
    mem = compiled.memory_analysis()
    row = {"bench": "train_step_memory", "shape": name, "batch": b, "seq": t, "remat": remat,
           "loss_chunk": loss_chunk, **extra, "connections": [list(map(list, c)) for c in ccfg.connections],
           "temporaries_mib": round(mem.temp_size_in_bytes / 2 ** 20, 1),
           "arguments_mib": round(mem.argument_size_in_bytes / 2 ** 20, 1),
           "outputs_mib": round(mem.output_size_in_bytes / 2 ** 20, 1),
           "flops": sum(step_flops(ccfg, b, t).values()), "xla_flops": plan.xla_flops(compiled),
           "compile_seconds": round(seconds, 1)}
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=sorted(SHAPES))
    args = p.parse_args()
    for name, (anchor, augment, b, t) in SHAPES.items():
        if args.only and name != args.only:
            continue
        ccfg = CompositionConfig(anchor, (augment,))
        for remat in ("none", "dots", "full"):
            for chunk in (0, 128 if t <= 128 else 512):
                report(name, ccfg, b, t, remat, chunk)
        # Frozen computation under stop_gradient: autodiff keeps nothing of it, so a twice
        # deeper augmenting model (same connections) should not add temporaries beyond its
        # forward's transient ones, while moving the first connection up the anchor should
        # remove the saved activations of the layers below it.
        deeper = dataclasses.replace(ccfg, augments=(augment.replace(num_layers=2 * augment.num_layers),))
        report(name, deeper, b, t, "none", 0, variant="augmenting model twice as deep")
        last = anchor.num_layers - 1
        top = dataclasses.replace(ccfg, connections=(((ccfg.connections[0][-1][0], last),),))
        report(name, top, b, t, "none", 0, variant="one connection, into the last anchor layer")


if __name__ == "__main__":
    main()
