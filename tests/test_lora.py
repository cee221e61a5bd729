"""LoRA on a frozen decoder: starts as the base, trains only its factors, rank from a budget, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import lora
from calm_jax.config import ModelConfig
from calm_jax.losses import lm_loss
from calm_jax.model import PlainLM, param_shapes
from calm_jax.train_step import make_optimizer, make_train_step
from tests import numerics

V = 48
LLAMA = ModelConfig(family="llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=48, max_positions=32)
GPT2 = ModelConfig(family="gpt2", vocab_size=V, hidden_size=24, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=6,
                   intermediate_size=40, max_positions=32, norm="layer", norm_eps=1e-5, mlp="plain",
                   activation="gelu_new", qkv_bias=True, o_bias=True, mlp_bias=True, position="learned",
                   tie_embeddings=True)
B, T = 3, 10


def _base(cfg, seed):
    """Random base weights drawn in numpy (no per-shape compiles); norm scales near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + 0.2 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@pytest.fixture(scope="module")
def batch():
    tokens = np.random.default_rng(0).integers(3, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[1, T - 3:] = False
    target = mask.copy()
    target[:, :4] = False
    return {"tokens_BxT": tokens, "mask_BxT": mask, "target_BxT": target}


def test_targets_and_shapes():
    assert lora.resolve_targets(LLAMA) == ("q", "k", "v", "o", "up", "gate", "down")
    assert lora.resolve_targets(GPT2) == ("q", "k", "v", "o", "up", "down")  # a plain MLP has no gate
    tree = lora.init_lora(LLAMA, 3, jax.random.key(0))
    assert sorted(tree) == ["layers_0", "layers_1"]
    assert tree["layers_1"]["attn"]["k"]["a"].shape == (32, 3)
    assert tree["layers_1"]["attn"]["k"]["b"].shape == (3, 16)  # GQA: 2 kv heads x 8
    assert tree["layers_0"]["mlp"]["down"]["a"].shape == (48, 3)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jax.tree_util.keystr(path).endswith("['b']"):
            assert not np.any(leaf)
        else:
            assert 0 < np.std(leaf) < 0.1
    assert sum(x.size for x in jax.tree.leaves(tree)) == lora.param_count(LLAMA, 3)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_zero_b_gives_the_base_exactly(cfg, batch):
    base = _base(cfg, 1)
    model = lora.LoRALM(cfg, 4, alpha=8.0)
    params = {"base": base, "lora": lora.init_lora(cfg, 4, jax.random.key(2))}
    got = jax.jit(model.apply)(params, batch["tokens_BxT"], batch["mask_BxT"]).logits_BxTxV
    want = jax.jit(PlainLM(cfg).apply)(base, batch["tokens_BxT"], batch["mask_BxT"]).logits_BxTxV
    np.testing.assert_array_equal(got, want)


def test_merge_is_w_plus_scaled_ab():
    base = _base(LLAMA, 1)
    tree = jax.tree.map(lambda x: x + 0.1, lora.init_lora(LLAMA, 2, jax.random.key(0), targets=("q", "down")))
    merged = lora.merge(base, tree, 0.5)
    q = tree["layers_0"]["attn"]["q"]
    want = base["layers_0"]["attn"]["q"]["kernel"] + 0.5 * q["a"] @ q["b"]
    # float32 on both sides: a rank-2 product, a scaling and an add, each rounding by at
    # most one unit of the largest term; 8 units of max|W| bound it (a relative tolerance
    # would not: entries where W and the product cancel can be ~0).
    np.testing.assert_allclose(merged["layers_0"]["attn"]["q"]["kernel"], want, rtol=0,
                               atol=numerics.fp32_atol(want, 8) + numerics.fp32_atol(0.5 * q["a"] @ q["b"], 8))
    assert merged["layers_0"]["attn"]["k"] is base["layers_0"]["attn"]["k"]  # not a target: untouched
    assert merged["embed"] is base["embed"]


def test_one_step_trains_only_the_lora_factors(batch):
    base = _base(LLAMA, 1)
    base_before = jax.tree.map(np.array, base)
    model = lora.LoRALM(LLAMA, 2)
    tree = lora.init_lora(LLAMA, 2, jax.random.key(0))
    tree_before = jax.tree.map(np.array, tree)
    loss_fn = lm_loss(model.apply, lora.join_lora)
    # B = 0: only B gets a gradient at the start (dL/dA = x^T dL/dy B^T = 0); the base none.
    grads = jax.grad(lambda p: loss_fn(p["lora"], p["base"], batch)[0])({"base": base, "lora": tree})
    assert not any(np.any(g) for g in jax.tree.leaves(grads["base"]))
    for path, g in jax.tree_util.tree_leaves_with_path(grads["lora"]):
        assert np.any(g) == jax.tree_util.keystr(path).endswith("['b']"), jax.tree_util.keystr(path)
    optimizer = make_optimizer(1e-2, 10)
    step = make_train_step(loss_fn, optimizer)
    trained, _, metrics = step(tree, optimizer.init(tree), base, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert jax.tree.structure(trained) == jax.tree.structure(tree_before)
    for path, leaf in jax.tree_util.tree_leaves_with_path(trained):
        changed = not np.array_equal(leaf, _at(tree_before, path))
        assert changed == jax.tree_util.keystr(path).endswith("['b']"), jax.tree_util.keystr(path)
    jax.tree.map(np.testing.assert_array_equal, base, base_before)
    # After the step B != 0, so every factor now gets a gradient.
    grads = jax.grad(lambda t: loss_fn(t, base, batch)[0])(trained)
    assert all(np.any(g) for g in jax.tree.leaves(grads))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_rank_for_budget_is_the_closest_count():
    per_rank = lora.param_count(LLAMA, 1)
    assert per_rank == 2 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 48))  # q, k and v, o, up gate down
    top = lora.max_rank(LLAMA)
    assert top == 16  # the k/v kernels: 32 x 16
    for budget in (1, per_rank // 3, per_rank, 5 * per_rank + per_rank // 2 - 1, 5 * per_rank + per_rank // 2 + 1,
                   7 * per_rank + 3, 10 ** 9):
        best = min(range(1, top + 1), key=lambda r: (abs(lora.param_count(LLAMA, r) - budget), r))
        assert lora.rank_for_budget(LLAMA, budget) == best, budget
    assert lora.rank_for_budget(LLAMA, 7 * per_rank + 3) == 7
    assert lora.rank_for_budget(LLAMA, 10 ** 9) == top
    assert lora.rank_for_budget(LLAMA, 4 * lora.param_count(LLAMA, 1, ("q",)), ("q",)) == 4


@pytest.mark.parametrize("rank, message", [
    (0, "positive integer"), (-2, "positive integer"), (2.0, "positive integer"), (True, "positive integer"),
    (17, r"1\.\.16"),
])
def test_bad_rank_raises(rank, message):
    with pytest.raises(ValueError, match=message):
        lora.init_lora(LLAMA, rank, jax.random.key(0))


def test_bad_targets_and_budget_raise():
    with pytest.raises(ValueError, match="unknown LoRA target 'wq'"):
        lora.init_lora(LLAMA, 2, jax.random.key(0), targets=("q", "wq"))
    with pytest.raises(ValueError, match="'gate' is not a kernel of this gpt2 model"):
        lora.resolve_targets(GPT2, ("gate",))
    with pytest.raises(ValueError, match="no LoRA targets"):
        lora.resolve_targets(LLAMA, ())
    with pytest.raises(ValueError, match="budget must be >= 1"):
        lora.rank_for_budget(LLAMA, 0)
    with pytest.raises(ValueError, match="positive integer"):
        lora.LoRALM(LLAMA, 0)
