"""Composed train step at the peer shapes of BENCHMARKS.md: tokens/s, FLOPs vs measured matmul limit, memory.

    .venv/bin/python benchmarks/bench_train_step.py [--reps 5] [--batch 8] [--seq 128]

Prints JSON lines: the matmul reference, the step (tokens/s, FLOPs, fraction of the limit),
a breakdown (composed forward, each frozen model's forward alone) to show where the time
goes, the step's op time by group from XLA's profiler (`benchmarks/op_profile.py`: weight
matmuls, attention, cache writes, layout copies, other), and memory: the compiled step's own temporaries (activations) next to the frozen
weights' size, and the bytes of all live arrays (frozen weights held once: live = frozen +
Θ_C and its optimizer state + batch), with peak RSS for context. All timings from one run:
warm-up first, median of --reps, block_until_ready.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from calm_jax import losses  # noqa: E402
from calm_jax import train_step as ts  # noqa: E402
from calm_jax.composition import ComposedLM, CompositionConfig, init_theta, param_count  # noqa: E402
from calm_jax.config import ModelConfig  # noqa: E402
from calm_jax.model import forward, init_params  # noqa: E402
from calm_jax.plan import layer_flops, step_flops  # noqa: E402  (the FLOP count the planner reports too)

import op_profile  # noqa: E402  (benchmarks/op_profile.py)

# Peer shapes. The augmenting MLP width is not given there: 704 keeps the anchor's ratio (2.75).
ANCHOR = ModelConfig(family="llama", vocab_size=512, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                     head_dim=64, intermediate_size=1408, max_positions=512)
AUGMENT = ModelConfig(family="llama", vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4,
                      head_dim=64, intermediate_size=704, max_positions=512)
CCFG = CompositionConfig(ANCHOR, (AUGMENT,))  # every 4th augmenting layer: (3, 3), (7, 7)


def timed(fn, reps):
    return timed_together({"fn": fn}, reps)["fn"]


def timed_together(fns: dict, reps: int) -> dict:
    """Median seconds of each function, their repetitions interleaved so that all of them see
    the same load on a shared machine (their ratio is what we report)."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm up
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts_) for name, ts_ in times.items()}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    b, t = args.batch, args.seq
    device = jax.devices()[0]
    common = {"device": device.device_kind, "platform": device.platform, "batch": b, "seq": t}

    n = 2048
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda u: u @ u)

    rss_start = rss_mib()
    frozen = {"anchor": init_params(ANCHOR, jax.random.key(1)), "augments": (init_params(AUGMENT, jax.random.key(2)),)}
    frozen = jax.block_until_ready(frozen)
    frozen_mib = sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2 ** 20
    rss_frozen = rss_mib()
    theta = init_theta(CCFG, jax.random.key(0))
    opt = ts.make_optimizer(1e-3, 1000, 10)
    state = opt.init(theta)
    loss_fn = losses.lm_loss(ComposedLM(CCFG).apply, losses.join_composition)
    step = ts.make_train_step(loss_fn, opt)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, ANCHOR.vocab_size, (b, t)).astype(np.int32)
    batch = {"tokens_BxT": jnp.asarray(tokens), "mask_BxT": jnp.ones((b, t), bool),
             "target_BxT": jnp.ones((b, t), bool)}

    carry = {"theta": theta, "state": state}

    def run_step():
        carry["theta"], carry["state"], m = step(carry["theta"], carry["state"], frozen, batch)
        return m["loss"]

    shapes_fn, shapes_flops, _ = op_profile.weight_matmuls(ANCHOR, frozen["anchor"], b * t)
    both = timed_together({"matmul": lambda: mm(x), "step": run_step, "shapes": shapes_fn}, args.reps)
    mm_s, step_s = both["matmul"], both["step"]
    del x, shapes_fn  # (the probe's input would count as a live array below)
    matmul_flops_s = 2 * n ** 3 / mm_s
    print(json.dumps({"bench": "matmul_2048_fp32", **common, "seconds": mm_s, "gflops_s": matmul_flops_s / 1e9}),
          flush=True)
    print(json.dumps({"bench": "matmul_layer_shapes_fp32", **common, "rows": b * t, "seconds": both["shapes"],
                      "gflops_s": shapes_flops / both["shapes"] / 1e9,
                      "fraction_of_2048_rate": shapes_flops / both["shapes"] / matmul_flops_s,
                      "note": "every layer's forward weight matmuls alone, at the step's rows"}), flush=True)
    flops = step_flops(CCFG, b, t)
    total = sum(flops.values())
    compiled = step.jitted.lower(carry["theta"], carry["state"], frozen, batch).compile()
    xla = compiled.cost_analysis()
    xla_flops = (xla[0] if isinstance(xla, list) else xla).get("flops")
    limit_s = total / matmul_flops_s
    print(json.dumps({"bench": "composed_train_step", **common, "seconds": step_s, "tokens_per_s": b * t / step_s,
                      "flops": total, "flops_by_part": flops, "xla_flops": xla_flops,
                      "theta_params": param_count(theta), "connections": [list(map(list, c)) for c in CCFG.connections],
                      "achieved_gflops_s": total / step_s / 1e9, "limit_seconds": limit_s,
                      "fraction_of_limit": limit_s / step_s, "target": 0.8}), flush=True)

    # Where the time goes: the forward passes the step contains, each timed alone.
    params = losses.join_composition(carry["theta"], frozen)
    composed = jax.jit(lambda p, tok: ComposedLM(CCFG).apply(p, tok).logits_BxTxV)
    anchor = jax.jit(lambda p, tok: forward(ANCHOR, p, tok).logits_BxTxV)
    augment = jax.jit(lambda p, tok: forward(AUGMENT, p, tok, taps=(7,), logits=False).taps[7])
    loss_only = jax.jit(loss_fn)
    parts = {"composed_forward": timed(lambda: composed(params, batch["tokens_BxT"]), args.reps),
             "composed_loss": timed(lambda: loss_only(carry["theta"], frozen, batch), args.reps),
             "anchor_forward": timed(lambda: anchor(frozen["anchor"], batch["tokens_BxT"]), args.reps),
             "augment_forward": timed(lambda: augment(frozen["augments"][0], batch["tokens_BxT"]), args.reps)}
    a_mm, a_att = layer_flops(ANCHOR, t)
    anchor_fwd_flops = b * t * (ANCHOR.num_layers * (a_mm + a_att) + 2 * ANCHOR.hidden_size * ANCHOR.vocab_size)
    print(json.dumps({"bench": "composed_train_step_breakdown", **common, "seconds": parts,
                      "step_seconds": step_s, "backward_and_update_seconds": step_s - parts["composed_loss"],
                      "anchor_forward_fraction_of_limit": anchor_fwd_flops / matmul_flops_s / parts["anchor_forward"]}),
          flush=True)

    # Memory: what the compiled step holds besides its inputs, and every array alive now.
    theta_mib = sum(x.nbytes for x in jax.tree.leaves((carry["theta"], carry["state"]))) / 2 ** 20
    mem = compiled.memory_analysis()
    live_mib = sum(x.nbytes for x in jax.live_arrays()) / 2 ** 20
    batch_mib = sum(x.nbytes for x in jax.tree.leaves(batch)) / 2 ** 20
    print(json.dumps({"bench": "composed_train_step_memory", **common, "frozen_weights_mib": frozen_mib,
                      "theta_and_optimizer_mib": theta_mib,
                      "step_arguments_mib": mem.argument_size_in_bytes / 2 ** 20,
                      "step_donated_mib": mem.alias_size_in_bytes / 2 ** 20,
                      "step_temporaries_mib": mem.temp_size_in_bytes / 2 ** 20,
                      "live_arrays_mib": live_mib,
                      "live_minus_frozen_theta_batch_mib": live_mib - frozen_mib - theta_mib - batch_mib,
                      "rss_start_mib": rss_start, "rss_after_frozen_mib": rss_frozen, "peak_rss_mib": peak_rss_mib()}),
          flush=True)

    # After the memory line: the profiler's own allocations stay out of peak_rss_mib.
    ops = op_profile.breakdown(run_step, compiled.as_text())
    total_op_s = sum(ops["op_s"].values())
    print(json.dumps({"bench": "composed_train_step_ops", **common, "wall_seconds": ops["wall_s"],
                      "op_seconds": ops["op_s"], "share": {g: v / total_op_s for g, v in ops["op_s"].items()},
                      "ops": ops["ops"], "note": "op time summed over XLA's threads; one profiled step"}), flush=True)


if __name__ == "__main__":
    main()
