"""Ahead-of-time compile time of the composed train step and of one decode step, against anchor depth.

    .venv/bin/python benchmarks/bench_compile.py [--layers 16,32,48] [--remat none,full] [--real] [--no-decode]

The model's layer loop is a Python loop (taps and hooks at any layer), so the program, and
the time to compile it, grows with depth: this is the number to watch for a regression.
Anchor: Llama-style, hidden 128 (4 heads x 32, MLP 352, vocab 512) with --layers layers;
augmenting: 24 layers, hidden 64 (2 heads x 32, MLP 176); the paper's connections (6,
every 4th augmenting layer). Batch 8 x 128, one device, abstract inputs (nothing is
allocated). Per result, one JSON line with trace+lower seconds and compile seconds apart:
  train_step   the step train.compose runs (calm_jax.plan.compile_step's program, jax's
               default compile options), AdamW on Θ_C, per --remat policy
  decode_step  one cached token through the composed model (ComposedLM.apply with a
               ComposedCache of 128 slots, cache donated), as inside the decode loop
--real adds one real-size train step: Qwen2.5-7B's widths at 42 layers (Gemma-2-9B's depth;
Gemma-2 itself is not supported) + Qwen2.5-Coder-1.5B, bf16 frozen, 1 x 2048 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from calm_jax import plan as plan_lib  # noqa: E402
from calm_jax import sharding  # noqa: E402
from calm_jax.composition import ComposedLM, CompositionConfig, init_composed_cache  # noqa: E402
from calm_jax.config import ModelConfig  # noqa: E402
from calm_jax.loading import load_config  # noqa: E402
from calm_jax.model import param_shapes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGMENT = ModelConfig(family="llama", vocab_size=512, hidden_size=64, num_layers=24, num_heads=2, num_kv_heads=2,
                      head_dim=32, intermediate_size=176, max_positions=512)


def anchor(layers: int) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=512, hidden_size=128, num_layers=layers, num_heads=4,
                       num_kv_heads=4, head_dim=32, intermediate_size=352, max_positions=512)


def time_train_step(ccfg, batch: int, seq: int, remat: str) -> dict:
    setup = plan_lib.Setup(ccfg, sharding.make_mesh(None, jax.devices()[:1]), batch, seq, remat=remat)
    inputs = plan_lib.step_inputs(setup)
    step = plan_lib.make_step(inputs, 1)
    t0 = time.perf_counter()
    lowered = step.jitted.lower(*inputs.args())
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_seconds": round(t1 - t0, 3), "compile_seconds": round(t2 - t1, 3)}


def time_decode_step(ccfg, batch: int, length: int) -> dict:
    lm = ComposedLM(ccfg)
    one = sharding.make_mesh(None, jax.devices()[:1])
    params = {"theta": plan_lib.step_inputs(plan_lib.Setup(ccfg, one, batch, 2)).theta,
              "anchor": param_shapes(ccfg.anchor), "augments": tuple(param_shapes(a) for a in ccfg.augments)}
    cache = jax.eval_shape(lambda: init_composed_cache(ccfg, batch, length))
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, 1), jnp.bool_)

    def one(params, token, mask, cache):
        out = lm.apply(params, token, mask, cache)
        return out.logits_BxTxV[:, -1], out.cache

    t0 = time.perf_counter()
    lowered = jax.jit(one, donate_argnums=(3,)).lower(params, token, mask, cache)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_seconds": round(t1 - t0, 3), "compile_seconds": round(t2 - t1, 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="16,32,48", help="anchor depths")
    p.add_argument("--remat", default="none,full", help="train-step remat policies")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--no-decode", dest="decode", action="store_false")
    p.add_argument("--real", action="store_true", help="also one real-size train step (about 20-60 s here)")
    args = p.parse_args()
    device = jax.devices()[0]
    common = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "batch": args.batch, "seq": args.seq,
              "command": " ".join(["python", "benchmarks/bench_compile.py", *sys.argv[1:]])}
    for layers in map(int, args.layers.split(",")):
        ccfg = CompositionConfig(anchor(layers), (AUGMENT,))
        shape = {"anchor_layers": layers, "anchor_hidden": 128, "augment_layers": AUGMENT.num_layers,
                 "connections": len(ccfg.connections[0])}
        for remat in args.remat.split(","):
            print(json.dumps({"bench": "compile_train_step", **common, **shape, "remat": remat,
                              **time_train_step(ccfg, args.batch, args.seq, remat)}), flush=True)
        if args.decode:
            print(json.dumps({"bench": "compile_decode_step", **common, **shape, "cache_slots": args.seq,
                              **time_decode_step(ccfg, args.batch, args.seq)}), flush=True)
    if args.real:
        big = load_config(os.path.join(ROOT, "configs", "qwen2.5-7b"), param_dtype="bfloat16").replace(num_layers=42)
        small = load_config(os.path.join(ROOT, "configs", "qwen2.5-coder-1.5b"), param_dtype="bfloat16")
        ccfg = CompositionConfig(big, (small.replace(vocab_size=big.vocab_size),))
        print(json.dumps({"bench": "compile_train_step_real_size", **common, "batch": 1, "seq": 2048,
                          "anchor_layers": 42, "anchor_hidden": big.hidden_size, "augment": "qwen2.5-coder-1.5b",
                          "connections": len(ccfg.connections[0]), "remat": "none",
                          **time_train_step(ccfg, 1, 2048, "none")}), flush=True)


if __name__ == "__main__":
    main()
