"""Ahead-of-time plan of the composed train step: memory per device and FLOPs, before any weights exist.

The real train step is compiled on abstract inputs (nothing is allocated, so an 8B anchor
plans on a laptop); the plan reads the compiled executable's own memory analysis, counts the
FLOPs the step must do, and searches for the largest per-device micro-batch that fits.
The figures are those of the backend that compiled the program — simulated CPU devices
when run through `python -m train.plan` — so a GPU's fusion and buffer assignment can
differ; the planner states what it compiled on.

The devices must exist before JAX starts: `python -m train.plan` sets
`--xla_force_host_platform_device_count` before importing JAX; this package only uses the
devices it finds.

Modules, by job:
  flops     layer_flops, step_flops: the FLOPs a step must do, from the shapes (benchmarks use it too)
  compiled  Setup, step_inputs, compile_step, memory, xla_flops, residual_bytes, PlanError: what a
            step needs per device, from its ahead-of-time compile
  search    plan (and its searches for the largest micro-batch that fits), fmt_bytes
The report `python -m train.plan` prints, and the README's table of plans, are in train/plan.py.
"""

from calm_jax.plan.compiled import (CPU_COMPILER_OPTIONS, CompiledStep, PlanError, Setup, StepInputs, compile_lowered,
                                    compile_step, make_step, memory, per_device_bytes, residual_bytes, step_inputs,
                                    xla_flops)
from calm_jax.plan.flops import layer_flops, step_flops
from calm_jax.plan.search import SEARCHES, fmt_bytes, plan

__all__ = [
    "CPU_COMPILER_OPTIONS", "CompiledStep", "PlanError", "SEARCHES", "Setup", "StepInputs", "compile_lowered",
    "compile_step", "fmt_bytes", "layer_flops", "make_step", "memory", "per_device_bytes", "plan", "residual_bytes",
    "step_flops", "step_inputs", "xla_flops",
]
