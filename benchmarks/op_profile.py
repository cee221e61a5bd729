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
