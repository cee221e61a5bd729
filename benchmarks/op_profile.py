"""Where a compiled function's time goes, op by op: XLA's own profile, grouped by what each op does.

`breakdown(run, hlo_text)` runs `run()` once under `jax.profiler.trace` (a Perfetto JSON trace),
reads the duration of every executed op (XLA:CPU's thunks, named as the instructions of the
compiled HLO), looks up each instruction's `op_name` in `hlo_text` (the compiled module,
`jax.jit(f).lower(...).compile().as_text()`), and sums the time per group:

  weight matmuls   a matmul with a weight (q/k/v/o, MLP, head, f_proj, cross q/k/v/o), with
                   what XLA fused into it
  attention        the score and probability einsums, the softmax, RoPE and q/k norms
  cache writes     dynamic_update_slice (KV and cross-attention caches, the token buffer)
  layout copies    transposes and copies XLA inserted (a whole-cache transpose shows here)
  other            layer norms, residual adds, embedding lookup, sampling, loop bookkeeping

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
# By the op_name's scope: a weight's matmul, alone or fused with what consumes it.
_WEIGHTS = re.compile(r"/(q|k|v|o|up|gate|down|lm_head|proj)/|[Ee]mbed\.attend")
_ATTENTION = re.compile(r"/attn/|CrossAttention")
# Control flow: their spans hold (part of) their bodies' ops, which are counted themselves.
_CONTROL = ("while", "conditional", "call")


def group(op_name: str, instruction: str) -> str:
    """The group of one compiled instruction, from its own name and its op_name metadata."""
    if instruction.startswith(("transpose", "copy")):
        return "layout copies"
    if "dynamic_update_slice" in op_name or "dynamic-update-slice" in instruction:
        return "cache writes"
    if _WEIGHTS.search(op_name):
        return "weight matmuls"
    if _ATTENTION.search(op_name):  # scores, softmax, weighted sum; RoPE and q/k norms of attention too
        return "attention"
    return "other"


def instructions(hlo_text: str) -> tuple[str, dict]:
    """(module name, {instruction name: (opcode, op_name or "")}) of a compiled module's text."""
    module = re.search(r"^HloModule ([\w.\-]+)", hlo_text, re.M)
    if module is None:
        raise ValueError("not the text of an HLO module (no 'HloModule' line)")
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(([^\n]*)", hlo_text, re.M):
        op_name = re.search(r'op_name="([^"]*)"', m.group(3))
        out[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    return module.group(1), out


def breakdown(run, hlo_text: str) -> dict:
    """{"wall_s", "op_s": {group: seconds}, "ops": count} of one call of `run` (already compiled),
    counting only the ops of the module `hlo_text` (its events carry its name)."""
    module, names = instructions(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(run())
            wall = time.perf_counter() - start
        files = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {d}")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # An op that finishes on another thread has an "end: NAME" event at its completion.
    spans, open_ = [], collections.defaultdict(list)
    for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]):
        args, name = e.get("args", {}), e.get("name", "")
        if args.get("hlo_module") == module and name in names:
            spans.append([name, e["ts"], e["ts"] + e["dur"]])
            open_[name].append(spans[-1])
        elif name.startswith("end: ") and open_.get(name[5:]):
            span = open_[name[5:]].pop()
            span[2] = max(span[2], e["ts"] + e["dur"])
    op_s, count = collections.Counter(), 0
    for name, begin, finish in spans:
        opcode, op_name = names[name]
        if opcode in _CONTROL:
            continue
        op_s[group(op_name, name)] += (finish - begin) / 1e6
        count += 1
    if not count:
        raise RuntimeError(f"no profiler event matched an instruction of {module}: the trace's naming has changed")
    return {"wall_s": wall, "op_s": {g: op_s.get(g, 0.0) for g in GROUPS}, "ops": count}

def weight_matmuls(cfg, params, rows: int, head: bool = False):
    """(fn, FLOPs, weight bytes): every layer's weight matmuls of a Llama-style `cfg` (q, k, v, o,
    gate, up, down; then the head when `head`) on `rows` rows, chained with nothing else between
    them (no attention, no norms): the shapes a forward pass gives XLA's dot."""
    names = ("q", "k", "v", "o", "gate", "up", "down")
    weights = [params[f"layers_{i}"]["mlp" if n in ("gate", "up", "down") else "attn"][n]["kernel"]
               for i in range(cfg.num_layers) for n in names] + ([params["lm_head"]["kernel"]] if head else [])

    @jax.jit
    def chain(weights, h_BxD):
        for layer in range(cfg.num_layers):
            q, k, v, o, gate, up, down = weights[7 * layer:7 * layer + 7]
            kv_Bx1 = jnp.sum(h_BxD @ k, -1, keepdims=True) + jnp.sum(h_BxD @ v, -1, keepdims=True)  # k, v kept live
            h_BxD = h_BxD + (h_BxD @ q) @ o + 1e-3 * kv_Bx1
            h_BxD = h_BxD + (jax.nn.silu(h_BxD @ gate) * (h_BxD @ up)) @ down
        return h_BxD @ weights[-1] if head else h_BxD

    h_BxD = jnp.ones((rows, cfg.hidden_size), jnp.float32)
    flops = 2 * rows * sum(w.size for w in weights)
    return (lambda: chain(weights, h_BxD)), flops, sum(w.size * w.dtype.itemsize for w in weights)
