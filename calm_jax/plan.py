"""Ahead-of-time plan of the composed train step: memory per device and FLOPs, before any weights exist.

`compile_step` builds the real train step (`calm_jax.train_step.make_train_step` with
`StepShardings` from `calm_jax.sharding`, the placement `calm_jax.trainer.train` uses) on
abstract inputs — `jax.ShapeDtypeStruct`s carrying their `NamedSharding` for the frozen
models, Θ_C (fp32), its AdamW state (`jax.eval_shape` of the optimizer's init) and the
batch — and lowers and compiles it. Nothing is allocated, so an 8B anchor plans on a
laptop. `plan` reads the compiled executable's own memory analysis, counts the FLOPs the
step must do (`step_flops`), and searches for the largest per-device micro-batch that fits.

Per device, from XLA's `memory_analysis()` of the partitioned program:
  argument  every input shard on one device (frozen weights + Θ_C + optimizer state + batch)
  output    Θ_C, optimizer state and metrics returned
  alias     outputs written into donated inputs (Θ_C and optimizer state: counted once)
  temp      everything else the step holds at once (activations, gradients, gathered weights)
  total     argument + output - alias + temp
plus any input jit dropped as unused (still on the device): the bytes the step needs.
The figures are those of the backend that compiled the program — simulated CPU devices
when run through `python -m train.plan` — so a GPU's fusion and buffer assignment can
differ; the planner states what it compiled on.

The devices must exist before JAX starts: `python -m train.plan` sets
`--xla_force_host_platform_device_count` before importing JAX; this module only uses the
devices it finds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from calm_jax import composition as comp_lib
from calm_jax import losses
from calm_jax import model as model_lib
from calm_jax import sharding as shard_lib
from calm_jax import train_step as ts
from calm_jax.config import ModelConfig

# calm_jax.trainer (TrainConfig) is imported where it is used: it brings orbax, and the FLOP
# count here is imported by benchmarks that run with a machine's bare JAX.

GiB = 2 ** 30


class PlanError(ValueError):
    """A plan that cannot be made as asked (bad sizes, too few devices, an option this checkout lacks)."""


# ---------------------------------------------------------------------------------------------
# Sizes

_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | int) -> int:
    """"80GiB" / "80 GB" / "1.5TiB" / "123456" -> bytes. GB is 10^9, GiB 2^30; a bare number is bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise PlanError(f"cannot read memory size {text!r}: expected a number with an optional unit "
                            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GiB")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise PlanError(f"memory size {text!r} must be positive")
    return int(value)


def gib(n: float) -> float:
    return n / GiB


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the figure >= 1 ("12.34 GiB", "3.10 MiB")."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------
# FLOPs (also used by benchmarks/bench_train_step.py)

def layer_flops(cfg: ModelConfig, t: int) -> tuple[float, float]:
    """Forward FLOPs per token of one layer: (matmuls, attention scores + weighted sum)."""
    d, h, g, k, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    matmul = 2 * (d * h * k + 2 * d * g * k + h * k * d + (3 if cfg.mlp == "gated" else 2) * d * f)
    return matmul, 2 * 2 * t * h * k


def step_flops(ccfg: comp_lib.CompositionConfig, b: int, t: int) -> dict:
    """FLOPs the step must do for a batch of b rows of t tokens, counted from the shapes.

    anchor: forward of every layer and the head, plus the backward to activations of the
      layers after the first connected one and of the head (1x a matmul's forward; 2x for
      attention). Its weights get no gradients, the layers below the first connection no
      backward at all.
    augmenting models: forward up to their last tapped layer.
    Θ_C: forward + backward (weight and input gradients: 3x), except that f_proj's input
      (a frozen augmenting state) needs no gradient (2x).
    Recomputation under rematerialisation is not counted: this is what the step must do,
    not what a given program does (XLA's own count, in `plan`, includes it).
    """
    a = ccfg.anchor
    mm, att = layer_flops(a, t)
    head = 2 * a.hidden_size * a.vocab_size
    first = min(j for pairs in ccfg.connections for _, j in pairs)
    anchor = a.num_layers * (mm + att) + head + (a.num_layers - 1 - first) * (mm + 2 * att) + head
    augment = 0
    theta = 0
    for aug, pairs in zip(ccfg.augments, ccfg.connections):
        amm, aatt = layer_flops(aug, t)
        augment += (max(i for i, _ in pairs) + 1) * (amm + aatt)
        dh, hk = a.hidden_size, ccfg.num_heads * ccfg.head_dim
        proj = 2 * aug.hidden_size * dh
        rest = 2 * (3 * dh * hk + hk * dh) + 2 * 2 * t * hk
        theta += len(pairs) * (2 * proj + 3 * rest)
    return {k: v * b * t for k, v in (("anchor", anchor), ("augment", augment), ("theta", theta))}


# ---------------------------------------------------------------------------------------------
# The loss and settings train.compose uses

def composed_loss(ccfg: comp_lib.CompositionConfig, remat: str = "none", loss_chunk: int = 0) -> losses.LossFn:
    """The loss train.compose trains with (`losses.composed_loss`), its settings checked as PlanError."""
    if remat not in model_lib.REMAT_POLICIES:
        raise PlanError(f"unknown remat policy {remat!r}; choose from {', '.join(model_lib.REMAT_POLICIES)}")
    if loss_chunk < 0:
        raise PlanError(f"loss chunk must be >= 0 (0: the plain loss), got {loss_chunk}")
    return losses.composed_loss(ccfg, remat=remat, loss_chunk=loss_chunk)


def train_config(**values):
    """calm_jax.trainer.TrainConfig(**values), a bad value as PlanError."""
    from calm_jax.trainer import TrainConfig

    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as e:
        raise PlanError(f"bad training settings: {e}") from None


# ---------------------------------------------------------------------------------------------
# Abstract inputs and the compiled step

@dataclasses.dataclass(frozen=True)
class Setup:
    """One train step to compile: the composition, the mesh and the step's settings."""

    ccfg: comp_lib.CompositionConfig
    mesh: Any  # jax.sharding.Mesh
    batch_size: int  # global, before splitting into grad_accum micro-batches
    seq_len: int
    grad_accum: int = 1
    remat: str = "none"
    loss_chunk: int = 0
    fsdp: bool = True

    @property
    def data(self) -> int:
        return self.mesh.shape["data"]

    @property
    def micro_batch_per_device(self) -> int:
        """Rows each device of a data shard holds in one micro-batch."""
        return self.batch_size // self.grad_accum // self.data

    def with_micro_batch(self, m: int) -> "Setup":
        return dataclasses.replace(self, batch_size=m * self.data * self.grad_accum)

    def check(self) -> None:
        if self.batch_size < 1 or self.seq_len < 2:
            raise PlanError(f"batch size must be >= 1 and sequence length >= 2, got {self.batch_size} x {self.seq_len}")
        if self.batch_size % self.grad_accum:
            raise PlanError(f"batch size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.batch_size // self.grad_accum % self.data:
            raise shard_lib.MeshError(f"micro-batch size {self.batch_size // self.grad_accum} (batch_size / "
                                      f"grad_accum) is not divisible by the mesh's data axis ({self.data})")
        longest = comp_lib.ComposedLM(self.ccfg).max_positions
        if self.seq_len > longest:
            raise PlanError(f"sequence length {self.seq_len} is longer than the models' position limit ({longest})")


def make_mesh(spec: str | None, devices: int) -> Any:
    """The ("data", "model") mesh of `spec` over exactly `devices` of this process's devices."""
    have = jax.devices()
    if devices > len(have):
        raise PlanError(f"{devices} devices asked for, but JAX sees {len(have)} ({have[0].platform}); "
                        "run through `python -m train.plan`, which simulates them")
    mesh = shard_lib.make_mesh(spec, have[:devices])
    if mesh.devices.size != devices:
        raise shard_lib.MeshError(f"mesh {spec!r} uses {mesh.devices.size} devices (data={mesh.shape['data']} x "
                                  f"model={mesh.shape['model']}), but --devices is {devices}")
    return mesh


def _abstract(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def per_device_bytes(tree) -> int:
    """Bytes of the largest per-device share of a tree of sharded arrays or ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class StepInputs:
    """Everything `make_train_step` needs, abstract: the four step arguments and their shardings."""

    theta: Any
    opt_state: Any
    frozen: Any
    batch: Any
    shardings: ts.StepShardings
    optimizer: Any
    loss_fn: losses.LossFn
    train_config: Any  # calm_jax.trainer.TrainConfig

    def args(self):
        return self.theta, self.opt_state, self.frozen, self.batch


def step_inputs(setup: Setup) -> StepInputs:
    """Abstract step inputs placed as `calm_jax.trainer.train` places them (same shardings, same optimizer)."""
    setup.check()
    ccfg, mesh = setup.ccfg, setup.mesh
    cfg = train_config(batch_size=setup.batch_size, seq_len=setup.seq_len, grad_accum=setup.grad_accum,
                       fsdp=setup.fsdp, remat=setup.remat, loss_chunk=setup.loss_chunk)
    optimizer = ts.make_optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.clip, cfg.end_lr_ratio, cfg.b2)
    theta = jax.eval_shape(lambda: comp_lib.init_theta(ccfg, jax.random.key(0)))
    frozen = {"anchor": model_lib.param_shapes(ccfg.anchor),
              "augments": tuple(model_lib.param_shapes(a) for a in ccfg.augments)}
    opt_state = jax.eval_shape(optimizer.init, theta)
    t_sh = shard_lib.param_shardings(mesh, theta, fsdp=cfg.fsdp)
    o_sh = shard_lib.param_shardings(mesh, opt_state, fsdp=cfg.fsdp)
    f_sh = shard_lib.param_shardings(mesh, frozen, fsdp=cfg.fsdp)
    b_sh = shard_lib.batch_sharding(mesh)
    shardings = ts.StepShardings(t_sh, o_sh, f_sh, b_sh, shard_lib.replicated(mesh))
    shape = (setup.batch_size, setup.seq_len)
    batch = {"tokens_BxT": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=b_sh),
             "mask_BxT": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=b_sh),
             "target_BxT": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=b_sh)}
    return StepInputs(_abstract(theta, t_sh), _abstract(opt_state, o_sh), _abstract(frozen, f_sh), batch, shardings,
                      optimizer, composed_loss(ccfg, setup.remat, setup.loss_chunk), cfg)


def make_step(inputs: StepInputs, grad_accum: int):
    """The train step train.compose runs, for these inputs (`run.jitted` is the jitted function)."""
    return ts.make_train_step(inputs.loss_fn, inputs.optimizer, grad_accum, inputs.shardings)


def memory(compiled) -> dict:
    """Per-device bytes from a compiled executable's memory analysis; total = argument + output - alias + temp."""
    m = compiled.memory_analysis()
    if m is None:
        raise PlanError("this backend gives no memory analysis for compiled programs")
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of the compiled (per-device, partitioned) program, where the backend gives one."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops is not None else None


# Two XLA:CPU defaults make a CPU compile a poor model of an accelerator's memory, so the
# planner turns them off (the program computes the same values; tests/test_plan.py runs it):
# - the concurrency-optimised scheduler lengthens temporaries' live ranges so independent
#   operations can run on separate threads: for an 8B anchor it held every layer's float32
#   copy of its bf16 weights at once (+0.8 GiB per layer in a forward pass alone);
# - "cse_barrier_expander" removes the optimisation barriers that keep rematerialisation's
#   recomputation apart from the forward pass, and CSE then merges the two again, undoing
#   remat: Llama-3.1-8B + 3.2-1B, remat "full", 1 x 2048 tokens on one device needed
#   98 GiB with it and 54 GiB without it (JAX's own residuals: 8.2 GiB, vs 82 GiB unrematted).
CPU_COMPILER_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False,
                        "xla_disable_hlo_passes": "cse_barrier_expander"}


def compile_lowered(lowered) -> tuple[Any, dict]:
    """Compiles with `CPU_COMPILER_OPTIONS` on CPU (where this XLA knows them); returns (compiled, options used)."""
    if jax.devices()[0].platform == "cpu":
        try:
            return lowered.compile(compiler_options=CPU_COMPILER_OPTIONS), dict(CPU_COMPILER_OPTIONS)
        except Exception as e:  # an XLA without the option: "No such compile option"
            if "compile option" not in str(e):
                raise
    return lowered.compile(), {}


@dataclasses.dataclass
class CompiledStep:
    setup: Setup
    inputs: StepInputs
    compiled: Any
    lower_seconds: float
    compile_seconds: float
    compiler_options: dict

    @property
    def memory(self) -> dict:
        return memory(self.compiled)


def compile_step(setup: Setup, inputs: StepInputs | None = None) -> CompiledStep:
    """Lowers and compiles the real train step on abstract inputs; times the two separately.

    `.compiled` is an executable: called with real arrays placed as the inputs say, it runs the step.
    """
    inputs = inputs or step_inputs(setup)
    step = make_step(inputs, setup.grad_accum)
    t0 = time.perf_counter()
    lowered = step.jitted.lower(*inputs.args())
    t1 = time.perf_counter()
    compiled, options = compile_lowered(lowered)
    t2 = time.perf_counter()
    return CompiledStep(setup, inputs, compiled, t1 - t0, t2 - t1, options)


def residual_bytes(setup: Setup) -> int | None:
    """Bytes the loss keeps for its backward pass (JAX's own list, before any compiler) for one device's
    micro-batch, unsharded, not counting inputs (weights, Θ_C, the batch). None if it cannot be read.

    Backend-independent: what rematerialisation saves, whatever compiles the step (see
    CPU_COMPILER_OPTIONS for what XLA:CPU does to it by default).
    """
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    m = setup.micro_batch_per_device
    one = dataclasses.replace(setup, batch_size=m * setup.grad_accum * setup.data)
    inputs = step_inputs(one)
    strip = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    batch = {k: jax.ShapeDtypeStruct((m, setup.seq_len), v.dtype) for k, v in inputs.batch.items()}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            print_saved_residuals(inputs.loss_fn, strip(inputs.theta), strip(inputs.frozen), batch)
    except Exception:  # the printout is for people; its format is not an API
        return None
    total = 0
    for line in out.getvalue().splitlines():
        found = re.match(r"\s*(\w+)\[([\d,\s]*)\]\s+(.*)", line)
        if not found:
            continue
        dtype, dims, what = found.groups()
        if "from the argument" in what or "stop_gradient" in what:  # an input, held anyway
            continue
        try:
            itemsize = _HLO_ITEMSIZE.get(dtype) or jnp.dtype(dtype).itemsize
        except TypeError:
            return None
        total += math.prod(int(d) for d in dims.split(",") if d.strip()) * itemsize
    return total


_HLO_ITEMSIZE = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "i32": 4, "s32": 4, "u32": 4, "i64": 8, "s64": 8, "u64": 8,
                 "i8": 1, "s8": 1, "u8": 1, "i16": 2,
                 "bool": 1, "pred": 1, "s16": 2, "u16": 2}


# ---------------------------------------------------------------------------------------------
# The plan

SEARCHES = ("extrapolate", "bisect", "none")


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
    log = log or (lambda _: None)
    limit = int(device_memory * usable_fraction)
    first = compile_step(setup)
    probes: dict[int, dict] = {}

    def record(c: CompiledStep) -> dict:
        m = c.setup.micro_batch_per_device
        mem = c.memory
        needed = mem["total"] + max(0, _input_bytes(c.inputs) - mem["argument"])
        probes[m] = {"micro_batch_per_device": m, "per_device_bytes": needed, "temp_bytes": mem["temp"],
                     "fits": needed <= limit, "lower_seconds": round(c.lower_seconds, 3),
                     "compile_seconds": round(c.compile_seconds, 3)}
        log(f"compiled micro-batch {m} per device: {fmt_bytes(needed)} per device "
            f"({'fits' if probes[m]['fits'] else 'does not fit'}; trace+lower {c.lower_seconds:.1f} s, "
            f"compile {c.compile_seconds:.1f} s)")
        return probes[m]

    def probe(m: int) -> dict:
        if m not in probes:
            record(compile_step(setup.with_micro_batch(m)))
        return probes[m]

    record(first)
    m0 = setup.micro_batch_per_device
    best, method = None, None
    if search == "bisect":
        lo, hi = (m0, None) if probes[m0]["fits"] else (0, m0)
        while hi is None:  # grow until a size does not fit
            nxt = min(2 * lo, max_micro_batch)
            if nxt == lo:
                break
            hi = None if probe(nxt)["fits"] else nxt
            lo = nxt if hi is None else lo
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if probe(mid)["fits"]:
                    lo = mid
                else:
                    hi = mid
        best = lo
        method = "bisection, every probe compiled"
    elif search == "extrapolate" and m0 == 1 and not probes[1]["fits"]:
        best, method = 0, "one row per device does not fit"
        extrapolation = None
    elif search == "extrapolate":
        m1 = 2 * m0 if probes[m0]["fits"] else m0 // 2  # the second point on the side that helps
        (m0, p0), (m1, p1) = sorted([(m0, probes[m0]), (m1, probe(m1))], key=lambda x: x[0])
        xla_slope = (p1["per_device_bytes"] - p0["per_device_bytes"]) / (m1 - m0)
        # At small micro-batches XLA's peak can sit where the activations are not yet the
        # largest part, and grow faster later; what the backward keeps per row is a floor.
        r0, r1 = (residual_bytes(setup.with_micro_batch(m)) for m in (m0, m1))
        residual_slope = (r1 - r0) / (m1 - m0) if r0 is not None and r1 is not None else 0.0
        slope = max(xla_slope, residual_slope)
        known = sorted(probes)

        def bracket():
            fit = [m for m in probes if probes[m]["fits"]]
            over = [m for m in probes if not probes[m]["fits"]]
            return max(fit, default=0), min(over, default=None)

        lo, hi = bracket()
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
            probe(cand)
            lo, hi = bracket()
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
    if search != "none" and best is not None and best >= 1:
        chosen = probes[best]
    else:
        chosen = None

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
    out = {
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
        if search == "extrapolate" and extrapolation:
            out["extrapolation"] = extrapolation
    return out


def _input_bytes(inputs: StepInputs) -> int:
    return sum(per_device_bytes(x) for x in inputs.args())


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# Reporting

def format_report(p: dict) -> str:
    """The plan as a few lines for a terminal."""
    d = p["per_device"]
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"composition: {p.get('describe', '')}".rstrip(),
        f"mesh {mesh} on {p['backend']}; batch {p['batch_size']} x {p['seq_len']} "
        f"(grad_accum {p['grad_accum']}, micro-batch {p['micro_batch_per_device']} per device); "
        f"remat {p['remat']}, loss chunk {p['loss_chunk'] or 'off'}; frozen {p['frozen_dtype']}, "
        f"compute {p['compute_dtype']}",
        "per device:",
        f"  frozen weights          {fmt_bytes(d['frozen_weights']):>12}",
        f"  Θ_C + optimizer state   {fmt_bytes(d['theta_and_optimizer']):>12} "
        f"(Θ_C {fmt_bytes(d['theta'])}, AdamW {fmt_bytes(d['optimizer'])})",
        f"  batch                   {fmt_bytes(d['batch']):>12}",
        f"  XLA arguments           {fmt_bytes(d['argument']):>12}",
        f"  XLA outputs             {fmt_bytes(d['output']):>12}",
        f"  XLA donated (alias)     {fmt_bytes(d['alias']):>12}",
        f"  XLA temporaries         {fmt_bytes(d['temp']):>12}",
        f"  XLA total               {fmt_bytes(d['total']):>12}  (arguments + outputs - donated + temporaries)",
        f"  inputs XLA dropped      {fmt_bytes(d['unused_inputs']):>12}  (never read, resident all the same)",
        f"  total                   {fmt_bytes(d['needed']):>12}",
        f"fits {fmt_bytes(p['usable_bytes'])} per device: {'yes' if p['fits'] else 'NO'} "
        f"({'headroom' if p['fits'] else 'over by'} {fmt_bytes(abs(p['headroom_bytes']))})",
        f"FLOPs per step: {p['flops_per_step']:.4g} (anchor {p['flops_by_part']['anchor']:.3g}, augmenting "
        f"{p['flops_by_part']['augment']:.3g}, Θ_C {p['flops_by_part']['theta']:.3g}); per device "
        f"{p['flops_per_device']:.4g}, XLA's count per device "
        + (f"{p['xla_flops_per_device']:.4g}" if p["xla_flops_per_device"] is not None else "n/a"),
    ]
    if "max_micro_batch_per_device" in p:
        m = p["max_micro_batch_per_device"]
        lines.append(f"largest micro-batch per device that fits: {m} (global batch {p['max_batch_size']}"
                     + (f", {fmt_bytes(p['max_batch_per_device_bytes'])} per device" if m else "")
                     + f"); {p['max_batch_method']}")
    if p.get("residual_bytes_per_device") is not None:
        lines.append(f"kept for the backward pass (JAX's residuals, one device's rows, before XLA): "
                     f"{fmt_bytes(p['residual_bytes_per_device'])}")
    lines.append(f"trace+lower {p['lower_seconds']:.1f} s, compile {p['compile_seconds']:.1f} s"
                 + (f" (XLA options {p['compiler_options']})" if p.get("compiler_options") else ""))
    return "\n".join(lines)


def command_line(argv: Sequence[str], module: str = "train.plan") -> str:
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def markdown_table(records: Sequence[dict]) -> str:
    """The README's "What fits where" table from plan records (JSON lines of `python -m train.plan --json`).

    A searched record shows the largest batch that fits (or, if none does, the batch it was
    asked for); per-device GiB is XLA's figure (total), residuals JAX's (see residual_bytes).
    """
    rows = ["| pair | devices | mesh | batch (rows per device) | remat | per-device GiB | "
            "of which kept for backward (JAX) | fits |",
            "|---|---:|---|---:|---|---:|---:|---|"]
    for r in records:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        best = r.get("max_micro_batch_per_device")
        if best:
            batch, rows_per, total, resid, fits = (r["max_batch_size"], best, r["max_batch_per_device_bytes"],
                                                   r.get("max_batch_residual_bytes"), True)
        else:
            batch, rows_per, total, resid, fits = (r["batch_size"], r["micro_batch_per_device"],
                                                   r["per_device_bytes"], r.get("residual_bytes_per_device"),
                                                   r["fits"])
        note = "" if best or "max_micro_batch_per_device" not in r else " (largest that fits: none)"
        rows.append(f"| {r.get('pair', '?')} | {r['devices']} | {mesh} | {batch} ({rows_per}){note} | {r['remat']} | "
                    f"{gib(total):.1f} | {'n/a' if resid is None else f'{gib(resid):.1f}'} | "
                    f"{'yes' if fits else 'no'} |")
    return "\n".join(rows)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
