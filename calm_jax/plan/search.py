"""The plan: compile the step, report what it needs per device, and search for the largest micro-batch that fits.

Three searches for the largest per-device micro-batch (`SEARCHES`): `_extrapolate` (two
compiles, a linear fit, the prediction compiled and bracketed), `_bisect` (every probe
compiled) and "none" (only the setup asked for).
"""

from __future__ import annotations

import math
from typing import Callable

import jax

from calm_jax import composition as comp_lib
from calm_jax import model as model_lib
from calm_jax.plan.compiled import (CompiledStep, PlanError, Setup, StepInputs, compile_step, per_device_bytes,
                                    residual_bytes, xla_flops)
from calm_jax.plan.flops import step_flops

SEARCHES = ("extrapolate", "bisect", "none")


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the figure >= 1 ("12.34 GiB", "3.10 MiB")."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


class _Probes(dict):
    """The compiles of one search, by per-device micro-batch: {m: what it needs, whether it fits}."""

    def __init__(self, setup: Setup, limit: int, log: Callable[[str], None]):
        super().__init__()
        self.setup, self.limit, self.log = setup, limit, log

    def record(self, c: CompiledStep) -> dict:
        m = c.setup.micro_batch_per_device
        mem = c.memory
        needed = mem["total"] + max(0, _input_bytes(c.inputs) - mem["argument"])
        self[m] = {"micro_batch_per_device": m, "per_device_bytes": needed, "temp_bytes": mem["temp"],
                   "fits": needed <= self.limit, "lower_seconds": round(c.lower_seconds, 3),
                   "compile_seconds": round(c.compile_seconds, 3)}
        self.log(f"compiled micro-batch {m} per device: {fmt_bytes(needed)} per device "
                 f"({'fits' if self[m]['fits'] else 'does not fit'}; trace+lower {c.lower_seconds:.1f} s, "
                 f"compile {c.compile_seconds:.1f} s)")
        return self[m]

    def probe(self, m: int) -> dict:
        if m not in self:
            self.record(compile_step(self.setup.with_micro_batch(m)))
        return self[m]

    def bracket(self) -> tuple[int, int | None]:
        """(largest that fits or 0, smallest that does not or None)."""
        fit = [m for m in self if self[m]["fits"]]
        over = [m for m in self if not self[m]["fits"]]
        return max(fit, default=0), min(over, default=None)


def _bisect(probes: _Probes, m0: int, max_micro_batch: int) -> tuple[int, str]:
    """The "bisect" search (see `plan`): returns (largest that fits, how it was found)."""
    lo, hi = (m0, None) if probes[m0]["fits"] else (0, m0)
    while hi is None:  # grow until a size does not fit
        nxt = min(2 * lo, max_micro_batch)
        if nxt == lo:
            break
        hi = None if probes.probe(nxt)["fits"] else nxt
        lo = nxt if hi is None else lo
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probes.probe(mid)["fits"]:
                lo = mid
            else:
                hi = mid
    return lo, "bisection, every probe compiled"


def _extrapolate(probes: _Probes, m0: int, max_micro_batch: int, max_probes: int) -> tuple[int, str, dict]:
    """The "extrapolate" search (see `plan`); the second compile is at half the first micro-batch where
    the first does not fit. Returns (largest that fits, how it was found, the fit's figures)."""
    setup, limit = probes.setup, probes.limit
    m1 = 2 * m0 if probes[m0]["fits"] else m0 // 2  # the second point on the side that helps
    (m0, p0), (m1, p1) = sorted([(m0, probes[m0]), (m1, probes.probe(m1))], key=lambda x: x[0])
    xla_slope = (p1["per_device_bytes"] - p0["per_device_bytes"]) / (m1 - m0)
    # At small micro-batches XLA's peak can sit where the activations are not yet the
    # largest part, and grow faster later; what the backward keeps per row is a floor.
    r0, r1 = (residual_bytes(setup.with_micro_batch(m)) for m in (m0, m1))
    residual_slope = (r1 - r0) / (m1 - m0) if r0 is not None and r1 is not None else 0.0
    slope = max(xla_slope, residual_slope)
    known = sorted(probes)
    lo, hi = probes.bracket()
    predicted = None
    while len(probes) < max_probes and (hi is None or hi - lo > 1):
        if hi is None:  # extrapolate from the largest fitting probe
            base = probes[lo]["per_device_bytes"]
            below = [m for m in probes if m < lo]
            if below:  # the growth seen last, if steeper
                b = max(below)
                slope = max(slope, (base - probes[b]["per_device_bytes"]) / (lo - b))
            cand = lo + max(1, int((limit - base) // slope)) if slope > 0 else 2 * lo
            cand = min(cand, max_micro_batch)
            if cand <= lo:
                break
        else:  # interpolate inside the bracket, bisecting when that does not move
            a, b = probes[lo]["per_device_bytes"] if lo else 0, probes[hi]["per_device_bytes"]
            cand = lo + int((limit - a) * (hi - lo) // max(b - a, 1)) if lo else hi // 2
            cand = min(max(cand, lo + 1), hi - 1)
            if cand in probes:
                cand = (lo + hi) // 2
        predicted = predicted or cand
        probes.probe(cand)
        lo, hi = probes.bracket()
    best = lo
    done = hi is not None and hi == best + 1
    method = (f"from micro-batches {m0} and {m1} per device ({fmt_bytes(p0['per_device_bytes'])}, "
              f"{fmt_bytes(p1['per_device_bytes'])}; {fmt_bytes(slope)} per row, the larger of XLA's "
              f"{fmt_bytes(xla_slope)} and the backward's {fmt_bytes(residual_slope)}), extrapolated, then "
              f"bracketed by compiling: {', '.join(str(m) for m in sorted(probes) if m not in known)}; "
              + (f"{best} fits, {hi} does not" if done else
                 f"{best} fits" + (f", {hi} does not (between them not compiled)" if hi else
                                   ", larger not compiled")))
    extrapolation = {"xla_bytes_per_row": xla_slope, "residual_bytes_per_row": residual_slope,
                     "bytes_per_row": slope, "first_prediction": predicted}
    return best, method, extrapolation


def plan(setup: Setup, device_memory: int, search: str = "extrapolate", usable_fraction: float = 1.0,
         max_micro_batch: int = 4096, log: Callable[[str], None] | None = None, residuals: bool = True,
         max_probes: int = 8) -> dict:
    """Compiles the step for `setup` and returns the plan as a JSON-ready dict (see `calm_jax.plan`).

    device_memory: bytes per device; the step fits if its total is at most device_memory *
      usable_fraction (the rest left to the runtime).
    search: how the largest per-device micro-batch that fits is found —
      "extrapolate": compile a second micro-batch (twice the first); per row, take the larger
        of the two compiles' growth and of the backward's residuals' growth (a trace, no
        compile); extrapolate to the limit, compile there, and close the bracket [largest
        that fits, smallest that does not] by interpolation (bisection where that stalls),
        every answer compiled;
      "bisect": double until it does not fit, then bisect, every probe compiled;
      "none": only the setup asked for.
    max_probes: at most this many compiles in a search (the answer says if the bracket is left open).
    residuals: also report `residual_bytes` (a trace of the loss, no compile).
    """
    if search not in SEARCHES:
        raise PlanError(f"search {search!r}: expected one of {', '.join(SEARCHES)}")
    if not 0 < usable_fraction <= 1:
        raise PlanError(f"usable fraction must be in (0, 1], got {usable_fraction}")
    limit = int(device_memory * usable_fraction)
    first = compile_step(setup)
    probes = _Probes(setup, limit, log or (lambda _: None))
    probes.record(first)
    m0 = setup.micro_batch_per_device
    best, method, extrapolation = None, None, None
    if search == "bisect":
        best, method = _bisect(probes, m0, max_micro_batch)
    elif search == "extrapolate" and m0 == 1 and not probes[1]["fits"]:
        best, method = 0, "one row per device does not fit"
    elif search == "extrapolate":
        best, method, extrapolation = _extrapolate(probes, m0, max_micro_batch, max_probes)
    chosen = probes[best] if search != "none" and best is not None and best >= 1 else None

    out = _summary(setup, first, device_memory, limit)
    if residuals:
        out["residual_bytes_per_device"] = residual_bytes(setup)
        if chosen is not None:
            out["max_batch_residual_bytes"] = residual_bytes(setup.with_micro_batch(best))
    if search != "none":
        out["max_micro_batch_per_device"] = best
        out["max_batch_size"] = (best or 0) * setup.data * setup.grad_accum
        out["max_batch_method"] = method
        out["max_batch_per_device_bytes"] = chosen["per_device_bytes"] if chosen else None
        out["probes"] = [probes[m] for m in sorted(probes)]
        if extrapolation:
            out["extrapolation"] = extrapolation
    return out


def _summary(setup: Setup, first: CompiledStep, device_memory: int, limit: int) -> dict:
    """The setup asked for: what it needs per device (by part), its FLOPs and settings."""
    mem = first.memory
    inputs = first.inputs
    frozen_b = per_device_bytes(inputs.frozen)
    theta_b = per_device_bytes(inputs.theta)
    opt_b = per_device_bytes(inputs.opt_state)
    batch_b = per_device_bytes(inputs.batch)
    ccfg = setup.ccfg
    flops = step_flops(ccfg, setup.batch_size, setup.seq_len)
    ours = float(sum(flops.values()))
    xla = xla_flops(first.compiled)
    n = setup.mesh.devices.size
    # jit drops inputs the program never reads (e.g. an augmenting model's final norm) from
    # its arguments; they are on the device all the same.
    unused = max(0, frozen_b + theta_b + opt_b + batch_b - mem["argument"])
    needed = mem["total"] + unused
    return {
        "per_device_bytes": needed,
        "fits": needed <= limit,
        "flops_per_step": ours,
        "device_memory_bytes": device_memory,
        "usable_bytes": limit,
        "headroom_bytes": limit - needed,
        "per_device": {"frozen_weights": frozen_b, "theta": theta_b, "optimizer": opt_b,
                       "theta_and_optimizer": theta_b + opt_b, "batch": batch_b, **mem, "unused_inputs": unused,
                       "needed": needed},
        "flops_by_part": flops,
        "flops_per_device": ours / n,
        "xla_flops_per_device": xla,
        "devices": n,
        "mesh": dict(setup.mesh.shape),
        "backend": f"{jax.devices()[0].platform} ({n} {'simulated ' if jax.devices()[0].platform == 'cpu' else ''}"
                   f"device{'s' if n > 1 else ''}), jax {jax.__version__}",
        "batch_size": setup.batch_size,
        "seq_len": setup.seq_len,
        "grad_accum": setup.grad_accum,
        "micro_batch_per_device": setup.micro_batch_per_device,
        "remat": setup.remat,
        "loss_chunk": setup.loss_chunk,
        "fsdp": setup.fsdp,
        "frozen_dtype": ccfg.anchor.param_dtype,
        "compute_dtype": ccfg.anchor.dtype,
        "theta_params": comp_lib.param_count(jax.eval_shape(lambda: comp_lib.init_theta(ccfg, jax.random.key(0)))),
        "frozen_params": [_count(model_lib.param_shapes(c)) for c in (ccfg.anchor, *ccfg.augments)],
        "connections": [[list(p) for p in pairs] for pairs in ccfg.connections],
        "lower_seconds": round(first.lower_seconds, 3),
        "compile_seconds": round(first.compile_seconds, 3),
        "compiler_options": first.compiler_options,
    }


def _input_bytes(inputs: StepInputs) -> int:
    return sum(per_device_bytes(x) for x in inputs.args())


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
