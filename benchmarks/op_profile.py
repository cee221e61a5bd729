"""Where a compiled function's time goes, op by op: XLA's own profile, grouped by what each op does.

`breakdown(run, hlo_text)` runs `run()` once under `jax.profiler.trace` (a Perfetto JSON trace),
reads the duration of every executed op (XLA:CPU's thunks, named as the instructions of the
compiled HLO), looks up each instruction's `op_name` in `hlo_text` (the compiled module,
`jax.jit(f).lower(...).compile().as_text()`), and sums the time per group:

  weight matmuls   a dot_general with a weight (q/k/v/o, MLP, head, f_proj, cross q/k/v/o)
  attention        the score and probability einsums and the softmax around them
  cache writes     dynamic_update_slice (KV and cross-attention caches, the token buffer)
  layout copies    transposes and copies XLA inserted (a whole-cache transpose shows here)
  other            norms, RoPE, residual adds, embedding lookup, sampling, loop bookkeeping

Times are op time summed over XLA's threads (ops run side by side on a 2-core machine), so
the groups' shares are what counts; `wall_s` is the same run's wall time.

`weight_matmuls(cfg, params, rows)` is the matching ceiling: a model's weight matmuls alone,
at the row count a step gives them, for the rate XLA's dot reaches at those shapes.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp

GROUPS = ("weight matmuls", "attention", "cache writes", "layout copies", "other")
_WEIGHTS = re.compile(r"/(q|k|v|o|up|gate|down|lm_head|proj|embed)/dot_general")
_ATTENTION = re.compile(r"btgrk|bgrts|bgsk|/attn/|CrossAttention|attend")


def group(op_name: str, instruction: str) -> str:
    """The group of one compiled instruction, from its op_name metadata (and its own name)."""
    if _WEIGHTS.search(op_name):
        return "weight matmuls"
    if "dynamic_update_slice" in op_name or "dynamic-update-slice" in instruction:
        return "cache writes"
    if instruction.startswith(("transpose", "copy")):
        return "layout copies"
    if _ATTENTION.search(op_name):
        return "attention"
    return "other"


def op_names(hlo_text: str) -> dict:
    """instruction name -> op_name metadata, for every instruction of the compiled module."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text):
        out[m.group(1)] = m.group(2)
    return out


def breakdown(run, hlo_text: str) -> dict:
    """{"wall_s", "op_s": {group: seconds}, "ops": count} of one call of `run` (already compiled)."""
    names = op_names(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(run())
        wall = time.perf_counter() - start
        files = glob.glob(os.path.join(d, "**", "*.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {d}")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    op_s, count = collections.Counter(), 0
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in names:  # executor spans, Python frames: not ops
            continue
        op_s[group(names[name], name)] += e["dur"] / 1e6
        count += 1
    return {"wall_s": wall, "op_s": {g: op_s.get(g, 0.0) for g in GROUPS}, "ops": count}


def weight_matmuls(cfg, params, rows: int, head: bool = False):
    """(fn, FLOPs, weight bytes): every layer's weight matmuls of a Llama-style `cfg` (q, k, v, o,
    gate, up, down; then the head when `head`) on `rows` rows, chained with nothing else between
    them (no attention, no norms): the shapes a forward pass gives XLA's dot."""
    names = ("q", "k", "v", "o", "gate", "up", "down")
    weights = [params[f"layers_{i}"]["mlp" if n in ("gate", "up", "down") else "attn"][n]["kernel"]
               for i in range(cfg.num_layers) for n in names] + ([params["lm_head"]["kernel"]] if head else [])

    @jax.jit
    def chain(weights, h_RxD):
        for layer in range(cfg.num_layers):
            q, k, v, o, gate, up, down = weights[7 * layer:7 * layer + 7]
            kv_Rx1 = jnp.sum(h_RxD @ k, -1, keepdims=True) + jnp.sum(h_RxD @ v, -1, keepdims=True)  # k, v kept live
            h_RxD = h_RxD + (h_RxD @ q) @ o + 1e-3 * kv_Rx1
            h_RxD = h_RxD + (jax.nn.silu(h_RxD @ gate) * (h_RxD @ up)) @ down
        return h_RxD @ weights[-1] if head else h_RxD

    h_RxD = jnp.ones((rows, cfg.hidden_size), jnp.float32)
    flops = 2 * rows * sum(w.size for w in weights)
    return (lambda: chain(weights, h_RxD)), flops, sum(w.size * w.dtype.itemsize for w in weights)
