"""What one train step needs per device, read from its ahead-of-time compile on abstract inputs.

`compile_step` builds the real train step (`calm_jax.train_step.make_train_step` with
`StepShardings` from `calm_jax.sharding`, the placement `calm_jax.trainer.train` uses) on
abstract inputs — `jax.ShapeDtypeStruct`s carrying their `NamedSharding` for the frozen
models, Θ_C (fp32), its AdamW state (`jax.eval_shape` of the optimizer's init) and the
batch — and lowers and compiles it. Nothing is allocated, so an 8B anchor plans on a laptop.

Per device, from XLA's `memory_analysis()` of the partitioned program (`memory`):
  argument  every input shard on one device (frozen weights + Θ_C + optimizer state + batch)
  output    Θ_C, optimizer state and metrics returned
  alias     outputs written into donated inputs (Θ_C and optimizer state: counted once)
  temp      everything else the step holds at once (activations, gradients, gathered weights)
  total     argument + output - alias + temp
`residual_bytes` is what the loss keeps for its backward pass, by JAX's own list (a trace,
no compile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals

from calm_jax import composition as comp_lib
from calm_jax import losses
from calm_jax import model as model_lib
from calm_jax import sharding as shard_lib
from calm_jax import train_step as ts

# calm_jax.trainer (TrainConfig) is imported where it is used: it brings orbax, and the FLOP
# count of this package (calm_jax.plan.flops) is imported by benchmarks that run with a
# machine's bare JAX.


class PlanError(ValueError):
    """A plan that cannot be made as asked (bad sizes, an option this checkout lacks)."""


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

    def train_config(self):
        """The calm_jax.trainer.TrainConfig of these settings; its own checks (remat policy, loss
        chunk) raise its ValueError."""
        from calm_jax.trainer import TrainConfig

        return TrainConfig(batch_size=self.batch_size, seq_len=self.seq_len, grad_accum=self.grad_accum,
                           fsdp=self.fsdp, remat=self.remat, loss_chunk=self.loss_chunk)


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
    cfg = setup.train_config()
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
                      optimizer, losses.composed_loss(ccfg, setup.remat, setup.loss_chunk), cfg)


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


_HLO_ITEMSIZE = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "i32": 4, "s32": 4, "u32": 4, "i64": 8, "s64": 8, "u64": 8,
                 "i8": 1, "s8": 1, "u8": 1, "i16": 2,
                 "bool": 1, "pred": 1, "s16": 2, "u16": 2}


def residual_bytes(setup: Setup) -> int | None:
    """Bytes the loss keeps for its backward pass (JAX's own list, before any compiler) for one device's
    micro-batch, unsharded, not counting inputs (weights, Θ_C, the batch). None if it cannot be read.

    Backend-independent: what rematerialisation saves, whatever compiles the step (see
    CPU_COMPILER_OPTIONS for what XLA:CPU does to it by default).
    """
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
