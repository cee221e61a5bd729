"""Decoding new tokens/s: anchor alone, composition (iterative and encoder mode), no-cache baseline.

Peer shapes of shared/BENCHMARKS.md, random weights: anchor Llama-style hidden 512, 8 layers,
8 heads, gated MLP 1408, vocab 512; augmenting Llama-style hidden 256, 8 layers, 4 heads,
gated MLP 704, vocab 512; the paper's default connections (augmenting layers 3, 7 -> anchor
layers 3, 7), cross-attention heads = anchor heads. Batch 8, prompt 32, 96 new tokens, greedy,
fp32. Every variant is `calm_jax.decoding.decode` (one jitted while_loop, prefill included
in the time); no stop tokens, so all 96 steps run. Variants are interleaved (one rep of each
per round) so machine noise hits all alike; median of the rounds after a compile warm-up.

The no-cache baseline re-runs the full forward over a fixed prompt + new-token buffer
(128 slots) at every step. A no-cache decoder that grows its input instead would process
(32 + 96/2) / 128 = 0.625 of those tokens on average, so the `cache_speedup_growing`
line scales the measured gain by 0.625: a conservative bound for that kind of baseline.

Roofline (the `roofline` lines): what one decode step must read and compute, from the
shapes, against rates measured in the same rounds. Bytes: every frozen weight and Θ_C the
variant uses (the input embedding table only for the rows it looks up), and every cache
(self-attention k/v of each layer run, cross-attention k/v of each connection) at its attended
length; over `read_gb_s`, a jitted sum over a 1 GiB array (far larger than the caches and
weights). FLOPs: each layer's matmuls and attention at that length, the head, Θ_C; over
`matmul_gflops_s`, a 2048x2048 fp32 matmul. The step's limit is the larger of the two
times, summed over the new tokens' steps (the prefill counted as the prompt's tokens' FLOPs);
each variant's `fraction_of_roofline` is that limit over its measured time.

The weight matmuls' own ceiling (`matmul_ceiling` lines): every weight matmul of one anchor
decode step (q, k, v, o, gate, up, down of each layer, then the head) on `batch` rows, chained
in one jitted function with nothing else, timed in the same rounds; `weights_gb_s` is the
weight bytes it reads over its time. That is what XLA's dot reaches on skinny (batch-row)
matmuls on this machine, against `read_gb_s` for a plain reduction. Each variant's
`fraction_of_matmul_ceiling` is the anchor-step ceiling times its steps over its measured time
(the anchor's weights only, so a composed variant's figure is a lower bound).

Breakdown (`breakdown` lines; `--no-breakdown` skips it): one more decode of each cached
variant under XLA's profiler, its op time grouped by what each op does (weight matmuls,
attention, cache writes, layout copies, other; `benchmarks/op_profile.py`), in ms per
generated step and as shares.

    python benchmarks/bench_decode.py [--reps 5] [--batch 8] [--prompt 32] [--new 96] [--augments 1]
        [--skip-nocache]   (the no-cache baseline takes minutes per rep on 2 CPU cores) [--no-breakdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from calm_jax import composition as comp  # noqa: E402
from calm_jax import decoding  # noqa: E402
from calm_jax.config import ModelConfig  # noqa: E402
from calm_jax.model import PlainLM, init_params  # noqa: E402
from calm_jax.plan import layer_flops  # noqa: E402

import op_profile  # noqa: E402  (benchmarks/op_profile.py)

ANCHOR = ModelConfig(family="llama", vocab_size=512, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                     head_dim=64, intermediate_size=1408, max_positions=512)
AUGMENT = ModelConfig(family="llama", vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4,
                      head_dim=64, intermediate_size=704, max_positions=512)


F32 = 4  # bytes


def _model_step(cfg: ModelConfig, b: int, length: int, layers: int, head: bool) -> tuple[float, float]:
    """(bytes, FLOPs) of one token per row through `layers` layers (and the head) attending `length` slots."""
    d, g, k = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    mm, att = layer_flops(cfg, length)
    per_layer_weights = (mm / 2) * F32  # every matmul weight read once (2 FLOPs per weight and row)
    cache = 2 * length * b * g * k * F32  # k and v
    weights = layers * per_layer_weights + b * d * F32 + (d * cfg.vocab_size * F32 if head else 0)
    flops = b * (layers * (mm + att) + (2 * d * cfg.vocab_size if head else 0))
    return weights + layers * cache, flops


def step_cost(variant: str, ccfg, b: int, length: int, prompt: int) -> tuple[float, float]:
    """(bytes read, FLOPs) of the decode step that attends `length` slots."""
    a = ccfg.anchor
    nbytes, flops = _model_step(a, b, length, a.num_layers, head=True)
    if variant == "anchor":
        return nbytes, flops
    hk = ccfg.num_heads * ccfg.head_dim
    for aug, pairs in zip(ccfg.augments, ccfg.connections):
        keys = prompt if variant == "composed_encoder" else length  # encoder mode: m_A saw the prompt only
        if variant != "composed_encoder":
            ab, af = _model_step(aug, b, length, max(i for i, _ in pairs) + 1, head=False)
            nbytes, flops = nbytes + ab, flops + af
        # Per connection: q and o for the anchor token; the new augmenting state's projection and
        # its k, v (iterative only); cross k/v of every attended augmenting slot.
        qo = 2 * a.hidden_size * hk
        kv_new = aug.hidden_size * a.hidden_size + 2 * a.hidden_size * hk
        new = variant != "composed_encoder"
        nbytes += len(pairs) * F32 * (qo + (kv_new if new else 0) + 2 * keys * b * hk)
        flops += len(pairs) * b * 2 * (qo + (kv_new if new else 0) + 2 * keys * hk)
    return nbytes, flops


def roofline_s(variant: str, ccfg, b: int, prompt: int, new: int, read_b_s: float, flops_s: float) -> dict:
    """The decode's lower bound: prefill FLOPs, then each cached step's max(bytes / bw, FLOPs / rate)."""
    prefill_flops = sum(step_cost(variant, ccfg, b, t, prompt)[1] for t in range(1, prompt + 1))  # causal
    total_bytes = total_flops = 0.0
    limit = prefill_flops / flops_s
    for step in range(1, new):  # the last new token is never fed back
        nbytes, flops = step_cost(variant, ccfg, b, prompt + step, prompt)
        total_bytes, total_flops = total_bytes + nbytes, total_flops + flops
        limit += max(nbytes / read_b_s, flops / flops_s)
    return {"roofline_s": limit, "bytes_per_step": total_bytes / (new - 1), "flops_per_step": total_flops / (new - 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--augments", type=int, default=1, help="number of augmenting models (peer shape: 1)")
    parser.add_argument("--skip-nocache", action="store_true", help="leave out the (slow) no-cache baseline")
    parser.add_argument("--no-breakdown", action="store_true", help="leave out the profiled op breakdown")
    args = parser.parse_args()

    ccfg = comp.CompositionConfig(anchor=ANCHOR, augments=(AUGMENT,) * args.augments)
    anchor_params = init_params(ANCHOR, jax.random.key(0))
    composed_params = {"theta": comp.init_theta(ccfg, jax.random.key(1)), "anchor": anchor_params,
                       "augments": tuple(init_params(AUGMENT, jax.random.key(2 + k)) for k in range(args.augments))}
    tokens = np.random.default_rng(0).integers(3, 512, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    no_stop = jnp.full((8,), -1, jnp.int32)

    variants = {
        "anchor": (PlainLM(ANCHOR), anchor_params, True),
        "composed_iterative": (comp.ComposedLM(ccfg), composed_params, True),
        "composed_encoder": (comp.ComposedLM(ccfg, encoder_mode=True), composed_params, True),
        "composed_iterative_nocache": (comp.ComposedLM(ccfg), composed_params, False),
    }
    if args.skip_nocache:
        del variants["composed_iterative_nocache"]

    def run(name):
        model, params, cache = variants[name]
        out = decoding.decode(model, params, tokens, mask, no_stop, jax.random.key(0), max_new_tokens=args.new,
                              use_cache=cache)
        jax.block_until_ready(out)
        return out

    outputs = {}
    for name in variants:  # warm-up: compile
        start = time.perf_counter()
        outputs[name] = run(name)
        print(f"# compiled and ran {name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        assert int(outputs[name].num_B.min()) == args.new, "every row must decode all new tokens"
    if "composed_iterative_nocache" in outputs:  # the same computation as the cached iterative loop
        assert np.array_equal(outputs["composed_iterative"].tokens_BxM,
                              outputs["composed_iterative_nocache"].tokens_BxM)

    # The machine's rates, measured in the same rounds as the variants.
    big = jnp.ones((2 ** 28,), jnp.float32)  # 1 GiB
    read = jax.jit(jnp.sum)
    mat = jax.random.normal(jax.random.key(0), (2048, 2048))
    matmul = jax.jit(lambda x: x @ x)
    step_matmuls, _, weight_bytes = op_profile.weight_matmuls(ANCHOR, anchor_params, args.batch, head=True)
    probes = {"read_1gib": lambda: read(big), "matmul_2048": lambda: matmul(mat), "step_matmuls": step_matmuls}
    for probe in probes.values():
        jax.block_until_ready(probe())
    times = {name: [] for name in (*variants, *probes)}
    for _ in range(args.reps):
        for name in variants:
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
        for name, probe in probes.items():
            start = time.perf_counter()
            jax.block_until_ready(probe())
            times[name].append(time.perf_counter() - start)

    new_tokens = args.batch * args.new
    shape = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new, augments=args.augments,
                 device=jax.devices()[0].platform, reps=args.reps)
    median = {name: statistics.median(t) for name, t in times.items()}
    read_b_s = big.size * F32 / median.pop("read_1gib")
    flops_s = 2 * 2048 ** 3 / median.pop("matmul_2048")
    ceiling_step_s = median.pop("step_matmuls")
    print(json.dumps({"bench": "decode", "rates": "measured", "read_gb_s": round(read_b_s / 1e9, 2),
                      "matmul_gflops_s": round(flops_s / 1e9, 2), **shape}))
    print(json.dumps({"bench": "decode", "matmul_ceiling": "anchor step's weight matmuls alone",
                      "ms_per_step": round(1e3 * ceiling_step_s, 3), "weight_mb": round(weight_bytes / 1e6, 1),
                      "weights_gb_s": round(weight_bytes / ceiling_step_s / 1e9, 2),
                      "fraction_of_read_bandwidth": round(weight_bytes / ceiling_step_s / read_b_s, 3), **shape}))
    for name, t in median.items():
        line = {"bench": "decode", "variant": name, "new_tokens_per_s": round(new_tokens / t, 1),
                "median_s": round(t, 4), "min_s": round(min(times[name]), 4), **shape}
        if name != "composed_iterative_nocache":
            roof = roofline_s(name, ccfg, args.batch, args.prompt, args.new, read_b_s, flops_s)
            line.update(roofline_s=round(roof["roofline_s"], 4), fraction_of_roofline=round(roof["roofline_s"] / t, 3),
                        mb_per_step=round(roof["bytes_per_step"] / 1e6, 1),
                        gflop_per_step=round(roof["flops_per_step"] / 1e9, 3),
                        # new x the step's matmuls: the prefill (weight-bound too) and the new - 1 fed-back steps
                        fraction_of_matmul_ceiling=round(args.new * ceiling_step_s / t, 3))
        print(json.dumps(line))
    ratios = {
        "composed_iterative_over_anchor": (median["anchor"] / median["composed_iterative"], 0.65),
        "composed_encoder_over_anchor": (median["anchor"] / median["composed_encoder"], None),
    }
    if "composed_iterative_nocache" in median:
        gain = median["composed_iterative_nocache"] / median["composed_iterative"]
        ratios.update(cache_speedup=(gain, 10.0), cache_speedup_growing=(0.625 * gain, 10.0))
    for name, (value, target) in ratios.items():
        line = {"bench": "decode", "ratio": name, "value": round(value, 3), **shape}
        if target is not None:
            line.update(target=target, met=bool(value >= target))
        print(json.dumps(line))
    if not args.no_breakdown:
        for name, (model, params, cache) in variants.items():
            if not cache:
                continue
            hlo = decoding.decode.lower(model, params, tokens, mask, no_stop, jax.random.key(0), max_new_tokens=args.new,
                                        use_cache=cache).compile().as_text()
            b = op_profile.breakdown(lambda: run(name), hlo)
            total = sum(b["op_s"].values())
            print(json.dumps({"bench": "decode", "breakdown": name, "wall_ms_per_step": round(1e3 * b["wall_s"] / args.new, 3),
                              "op_ms_per_step": {g: round(1e3 * v / args.new, 3) for g, v in b["op_s"].items()},
                              "share": {g: round(v / total, 3) for g, v in b["op_s"].items()}, "ops": b["ops"],
                              "note": "op time summed over XLA's threads; one profiled run; per step = over new_tokens steps, "
                                      "the prefill included", **shape}))


if __name__ == "__main__":
    main()
