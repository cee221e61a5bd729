"""Memory for compute in the composed train step: remat policies and the chunked loss change
nothing but memory (and FLOPs)."""

import jax
import jax.numpy as jnp
import pytest

from calm_jax import plan
from calm_jax import train_step as ts
from calm_jax.composition import CompositionConfig, init_theta
from calm_jax.config import ModelConfig
from calm_jax.losses import composed_loss
from calm_jax.model import REMAT_POLICIES, param_shapes
from calm_jax.trainer import TrainConfig
from tests import numerics
from tests.test_train_step import random_batch, tiny_composition


@numerics.float64()
def test_remat_and_loss_chunks_give_the_same_loss_and_gradients():
    # Identities (same maths, other order or recomputed): float64, tests/numerics.py.
    ccfg, theta, frozen = tiny_composition(float64=True)
    batch = random_batch()  # 12 slots: 11 predicted positions, so chunks of 5 and 4 need padding
    grad = jax.jit(jax.value_and_grad(composed_loss(ccfg), has_aux=True))
    (want, n), want_g = grad(theta, frozen, batch)
    assert float(n) == batch["target_BxT"][:, 1:].sum()
    for remat in REMAT_POLICIES:
        for chunk in (0, 4, 5, 11, 32):
            (loss, got_n), g = jax.jit(jax.value_and_grad(composed_loss(ccfg, remat, chunk), has_aux=True))(
                theta, frozen, batch)
            assert float(got_n) == float(n), (remat, chunk)
            numerics.assert_identity(loss, want, err_msg=f"remat={remat} chunk={chunk}")
            numerics.assert_trees_identity(g, want_g)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown remat policy 'some'; choose from none, full, dots"):
        TrainConfig(remat="some")
    with pytest.raises(ValueError, match="loss_chunk must be >= 0, got -1"):
        TrainConfig(loss_chunk=-1)
    with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
        composed_loss(tiny_composition()[0], loss_chunk=-1)


# A small model with a large vocabulary, where the B x T x V logits dominate the step.
ANCHOR = ModelConfig(family="llama", vocab_size=32000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                     head_dim=16, intermediate_size=128, max_positions=256)
AUG = ANCHOR.replace(hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=2, intermediate_size=64)


def _compiled(ccfg, remat, chunk, b=8, t=128):
    opt = ts.make_optimizer(1e-3, 100, 10)
    theta = jax.eval_shape(lambda: init_theta(ccfg, jax.random.key(0)))
    frozen = {"anchor": param_shapes(ccfg.anchor), "augments": tuple(param_shapes(a) for a in ccfg.augments)}
    batch = {"tokens_BxT": jax.ShapeDtypeStruct((b, t), jnp.int32), "mask_BxT": jax.ShapeDtypeStruct((b, t), bool),
             "target_BxT": jax.ShapeDtypeStruct((b, t), bool)}
    step = ts.make_train_step(composed_loss(ccfg, remat, chunk), opt)
    # plan.CPU_COMPILER_OPTIONS: XLA:CPU's defaults merge the recomputation back into the forward.
    return plan.compile_lowered(step.jitted.lower(theta, jax.eval_shape(opt.init, theta), frozen, batch))[0]


def test_chunked_loss_never_holds_the_logits():
    """Compiled ahead of time (nothing allocated): the plain loss holds the B x T x V logits
    (and their softmax); in chunks of 16 positions the step's temporaries shrink by at least
    one copy of them. Measured: 505 -> 55 MiB, logits 124 MiB."""
    ccfg = CompositionConfig(ANCHOR, (AUG,))
    logits_bytes = 8 * 127 * ANCHOR.vocab_size * 4
    plain = _compiled(ccfg, "none", 0).memory_analysis().temp_size_in_bytes
    chunked = _compiled(ccfg, "none", 16).memory_analysis().temp_size_in_bytes
    assert chunked + logits_bytes <= plain, (plain / 2 ** 20, chunked / 2 ** 20)


PEER_ANCHOR = ModelConfig(family="llama", vocab_size=512, hidden_size=512, num_layers=8, num_heads=8,
                          num_kv_heads=8, head_dim=64, intermediate_size=1408, max_positions=512)
PEER_AUGMENT = PEER_ANCHOR.replace(hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=704)


def test_remat_trades_activations_for_recomputation_at_the_peer_shape():
    """BENCHMARKS.md's peer shapes, batch 8 x 128, compiled ahead of time. Without remat the
    step keeps each anchor layer's activations above the first connection (layers 3-7, ~35 MiB
    each); "full" keeps only each layer's input and recomputes the rest, "dots" keeps the
    weight matmuls' outputs. Measured: temporaries 237 / 145 / 98 MiB (none / dots / full),
    XLA's FLOPs +0.6% / +19%. Compiled with plan.CPU_COMPILER_OPTIONS."""
    ccfg = CompositionConfig(PEER_ANCHOR, (PEER_AUGMENT,))
    compiled = {r: _compiled(ccfg, r, 0) for r in REMAT_POLICIES}
    temp = {r: c.memory_analysis().temp_size_in_bytes for r, c in compiled.items()}
    assert temp["full"] < 0.75 * temp["none"] and temp["full"] < temp["dots"] < temp["none"], temp
    assert plan.xla_flops(compiled["full"]) > 1.1 * plan.xla_flops(compiled["none"])  # the anchor's layers, run again


def test_remat_shrinks_a_1b_anchor_step_at_2048_positions():
    """A ~0.95B anchor (hidden 2048, 16 layers, 32k vocabulary) with a ~0.3B augmenting model,
    one row of 2048 tokens, abstract inputs: "full" keeps 16 layer inputs instead of their
    activations. Measured, loss in chunks of 512: 15.7 -> 4.0 GiB (benchmarks/results/remat.jsonl)."""
    anchor = ModelConfig(family="llama", vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16,
                         num_kv_heads=16, head_dim=128, intermediate_size=5632, max_positions=4096)
    augment = anchor.replace(hidden_size=1024, num_heads=8, num_kv_heads=8, intermediate_size=2816)
    ccfg = CompositionConfig(anchor, (augment,))
    none, full = (_compiled(ccfg, r, 512, b=1, t=2048).memory_analysis().temp_size_in_bytes for r in ("none", "full"))
    assert full < 0.6 * none, (none / 2 ** 30, full / 2 ** 30)
