"""The train step: one jitted function, generic over which parameters are trained.

A loss function `loss_fn(trainable, frozen, batch) -> (loss_sum, n_tokens)` (calm_jax.losses)
says how the two parameter trees make a prediction. For the composition, trainable = Θ_C and
frozen = {"anchor", "augments"}; for plain LM training, trainable = all weights and frozen = {}.
`jax.value_and_grad` runs over `trainable` only, so the frozen trees get no gradients,
no optimizer state, and are never returned (nor copied: they are plain jit inputs).

Gradient accumulation is a `lax.scan` over micro-batches inside the step rather than
`optax.MultiSteps`: the loss is a sum over target tokens divided once by their total
count, so k micro-batches give exactly the gradient of the one big batch (MultiSteps
averages per-micro-batch means, which weights tokens unequally when micro-batches hold
different numbers of targets), there is one optimizer update per call, and the optimizer
state carries no extra gradient-sized buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from calm_jax.losses import LossFn


def make_optimizer(lr: float, steps: int, warmup: int = 0, weight_decay: float = 0.0, clip: float = 1.0,
                   end_lr_ratio: float = 0.0, b2: float = 0.999,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """AdamW with linear warmup to `lr`, cosine decay to `end_lr_ratio * lr` at `steps`, global-norm clipping.
    schedule: another lr schedule instead (the optimizer state is the same either way)."""
    schedule = schedule if schedule is not None else lr_schedule(lr, steps, warmup, end_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, b2=b2, weight_decay=weight_decay))


def lr_schedule(lr: float, steps: int, warmup: int = 0, end_lr_ratio: float = 0.0) -> optax.Schedule:
    """lr * (t + 1) / warmup for the first `warmup` steps (so step 0 already learns), then cosine."""
    cosine = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=end_lr_ratio)
    if warmup <= 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, max(warmup - 1, 1)), cosine], [warmup])


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where each step input lives (pytrees of `jax.sharding.Sharding`); see calm_jax.sharding."""

    trainable: Any
    opt_state: Any
    frozen: Any
    batch: Any
    replicated: Any


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, grad_accum: int = 1,
                    shardings: StepShardings | None = None):
    """Returns step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics), jitted.

    `trainable` and `opt_state` are donated: do not use the arrays passed in after the call.
    The batch's leading dimension B is split into `grad_accum` micro-batches of B/k rows.
    metrics: {"loss" (mean over target tokens), "tokens" (target tokens), "grad_norm" (before clipping)}.
    """
    def grads_of(trainable, frozen, batch):
        (loss_sum, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch)
        return loss_sum, n, grads

    def step(trainable, opt_state, frozen, batch):
        if grad_accum == 1:
            loss_sum, n, grads = grads_of(trainable, frozen, batch)
        else:
            def split(x):
                b = x.shape[0]
                # Rows i, i+k, i+2k, ... form micro-batch i, so each device's contiguous shard
                # of the batch feeds every micro-batch and no rows move between devices.
                return jnp.swapaxes(x.reshape(b // grad_accum, grad_accum, *x.shape[1:]), 0, 1)

            def body(carry, micro):
                loss_sum, n, grads = grads_of(trainable, frozen, micro)
                return jax.tree.map(jnp.add, carry, (loss_sum, n, grads)), None

            split_batch = jax.tree.map(split, batch)
            sums = jax.eval_shape(grads_of, trainable, frozen, jax.tree.map(lambda x: x[0], split_batch))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums)
            (loss_sum, n, grads), _ = jax.lax.scan(body, zeros, split_batch)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss_sum / denom, "tokens": n, "grad_norm": optax.global_norm(grads)}
        return trainable, opt_state, metrics

    def check(batch):
        b = jax.tree.leaves(batch)[0].shape[0]
        if b % grad_accum:
            raise ValueError(f"batch size {b} is not divisible by grad_accum {grad_accum}")

    if shardings is None:
        jitted = jax.jit(step, donate_argnums=(0, 1))
    else:
        s = shardings
        jitted = jax.jit(step, donate_argnums=(0, 1),
                         in_shardings=(s.trainable, s.opt_state, s.frozen, s.batch),
                         out_shardings=(s.trainable, s.opt_state, s.replicated))

    def run(trainable, opt_state, frozen, batch):
        check(batch)
        return jitted(trainable, opt_state, frozen, batch)

    run.jitted = jitted  # for lowering / cost analysis
    return run


def make_eval_step(loss_fn: LossFn, shardings: StepShardings | None = None):
    """Returns eval(trainable, frozen, batch) -> (loss_sum, n_tokens), jitted."""
    if shardings is None:
        return jax.jit(loss_fn)
    s = shardings
    return jax.jit(loss_fn, in_shardings=(s.trainable, s.frozen, s.batch), out_shardings=s.replicated)
