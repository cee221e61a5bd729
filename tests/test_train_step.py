"""The train step and the data stream: Θ_C-only training, accumulation, bf16 frozen models, order."""

import dataclasses
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import data as data_lib
from calm_jax import losses
from calm_jax import train_step as ts
from calm_jax import trainer
from calm_jax.composition import ComposedLM, CompositionConfig, init_theta
from calm_jax.config import ModelConfig
from calm_jax.loading import CheckpointError
from calm_jax.model import PlainLM, forward, param_shapes
from tests import numerics

V = 128
ANCHOR = ModelConfig(family="llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48, max_positions=32)
AUG = ModelConfig(family="llama", vocab_size=V, hidden_size=16, num_layers=4, num_heads=2, num_kv_heads=1,
                  head_dim=8, intermediate_size=32, max_positions=32)
CCFG = CompositionConfig(ANCHOR, (AUG,))  # paper default: augment layer 3 -> anchor layer 1
# The same in float64, for identities (k micro-batches == one batch, N devices == one):
# checked to float64 reordering under `numerics.float64()` (tests/numerics.py says why).
CCFG64 = CompositionConfig(numerics.f64(ANCHOR), (numerics.f64(AUG),), dtype="float64")


def random_params(cfg: ModelConfig, seed: int, scale: float = 0.3):
    """Frozen-model weights ~ N(0, scale) (norm scales ~ 1 + N(0, scale)), well beyond the 0.02 init.

    Made with numpy from the parameter shapes: no per-op compilation, so tests start fast.
    """
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        noise = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        return noise + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else noise
    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg))


def random_theta(ccfg: CompositionConfig, seed: int):
    """Θ_C with lecun-normal kernels and zero biases, like init_theta, made with numpy."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        if len(leaf.shape) < 2:
            return np.zeros(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(lambda: init_theta(ccfg, jax.random.key(0))))


@functools.lru_cache(maxsize=None)
def tiny_composition(seed: int = 0, float64: bool = False):
    """(ccfg, theta, frozen) as numpy trees; frozen models perturbed beyond their init.

    float64: the same draws as float64 arrays with CCFG64 (use under `numerics.float64()`).
    """
    theta, frozen = random_theta(CCFG, seed), {"anchor": random_params(ANCHOR, seed + 1),
                                               "augments": (random_params(AUG, seed + 2),)}
    if not float64:
        return CCFG, theta, frozen
    return CCFG64, *jax.tree.map(lambda x: np.asarray(x, np.float64), (theta, frozen))


def random_batch(b=8, t=12, seed=0):
    """Right-padded rows with different numbers of target tokens (prompt of varying length)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, V, (b, t)).astype(np.int32)
    lengths = rng.integers(4, t + 1, b)
    prompts = rng.integers(1, 4, b)
    slot = np.arange(t)[None]
    mask = slot < lengths[:, None]
    return {"tokens_BxT": tokens, "mask_BxT": mask, "target_BxT": mask & (slot >= prompts[:, None])}


COMPOSED_LOSS = losses.lm_loss(ComposedLM(CCFG).apply, losses.join_composition)
OPT = ts.make_optimizer(1e-2, 100, 10)
STEP = ts.make_train_step(COMPOSED_LOSS, OPT)  # shared, so tests reuse its compilations
COMPOSED_LOSS64 = losses.lm_loss(ComposedLM(CCFG64).apply, losses.join_composition)
STEP64 = ts.make_train_step(COMPOSED_LOSS64, OPT)


def copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@numerics.float64()
def test_next_token_loss_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(2, 5, 7))
    tokens = np.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]], np.int32)
    target = np.array([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    loss_sum, n = jax.jit(losses.next_token_loss)(logits, tokens, target)
    chex.assert_shape((loss_sum, n), ())
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [-logp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(1, 5) if target[b, t]]
    numerics.assert_identity(loss_sum, np.sum(want))
    assert n == len(want) == 6


def test_lr_schedule_warmup_then_cosine():
    s = ts.lr_schedule(1.0, steps=10, warmup=4, end_lr_ratio=0.1)
    # optax evaluates these in float32 with two or three roundings each: 8 units of 2**-23 bound them.
    np.testing.assert_allclose([s(i) for i in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=8 * numerics.EPS32)
    assert float(s(4)) == pytest.approx(1.0) and float(s(10)) == pytest.approx(0.1)  # approx's 1e-6: as above
    assert all(float(s(i)) > float(s(i + 1)) for i in range(4, 9))


def test_only_theta_is_trained_and_frozen_params_are_untouched():
    ccfg, theta, frozen = tiny_composition()
    frozen, frozen_before, theta = jax.device_put(frozen), copy(frozen), copy(theta)
    theta_before = copy(theta)
    opt_state = OPT.init(theta)
    # The optimizer state mirrors Θ_C alone: nothing is kept for the frozen models.
    assert jax.tree.structure(opt_state[1][0].mu) == jax.tree.structure(theta)
    batch = random_batch()
    for _ in range(3):
        theta, opt_state, metrics = STEP(theta, opt_state, frozen, batch)
    chex.assert_trees_all_equal(frozen, frozen_before)  # bitwise
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))  # inputs, not donated
    assert jax.tree.structure(theta) == jax.tree.structure(theta_before)  # only Θ_C comes back
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), theta, theta_before)
    assert all(jax.tree.leaves(changed)), changed
    chex.assert_shape([metrics["loss"], metrics["tokens"], metrics["grad_norm"]], ())


@numerics.float64()
def test_grad_accumulation_equals_one_big_batch():
    # Adam's first update is about lr * g / |g|: in float32, a gradient entry near zero
    # (rounding of its sum order ~ its size) could come out with either sign. In float64
    # the two orders agree to ~1e-16, so the updated Θ_C is compared as an identity.
    ccfg, theta, frozen = tiny_composition(float64=True)
    batch = random_batch(b=8)  # rows hold different numbers of target tokens
    out = {}
    for k, step in ((1, STEP64), (4, ts.make_train_step(COMPOSED_LOSS64, OPT, grad_accum=4))):
        t = copy(theta)
        out[k] = step(t, OPT.init(t), frozen, batch)
    for name in ("loss", "grad_norm"):
        numerics.assert_identity(out[4][2][name], out[1][2][name], err_msg=name)
    assert float(out[4][2]["tokens"]) == float(out[1][2]["tokens"]) == batch["target_BxT"][:, 1:].sum()
    numerics.assert_trees_identity(out[4][0], out[1][0])
    with pytest.raises(ValueError, match="not divisible by grad_accum 3"):
        ts.make_train_step(COMPOSED_LOSS64, OPT, grad_accum=3)(theta, OPT.init(theta), frozen, batch)


def test_bf16_frozen_models_with_fp32_theta_and_optimizer():
    ccfg, theta, frozen = tiny_composition()
    frozen16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    batch = random_batch()
    t = copy(theta)
    _, _, m32 = STEP(t, OPT.init(t), frozen, batch)
    t = copy(theta)
    theta16, state16, m16 = STEP(t, OPT.init(t), frozen16, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((theta16, state16)) if x.dtype.kind == "f")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen16))
    # Same model up to bf16 rounding of the frozen weights.
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05 * float(m32["loss"])
    assert float(m16["loss"]) != float(m32["loss"])


def test_plain_lm_training_through_the_trainer(tmp_path):
    # Plain LM training (all weights trainable, nothing frozen) uses the same machinery.
    params = random_params(ANCHOR, 9, scale=0.02)
    b = random_batch(seed=1)
    ds = data_lib.Dataset("random", b["tokens_BxT"], b["mask_BxT"], b["target_BxT"])
    cfg = trainer.TrainConfig(steps=15, batch_size=8, seq_len=12, lr=3e-3, warmup=0, mesh="data=1", progress=False)
    result = trainer.train(str(tmp_path), cfg, losses.lm_loss(PlainLM(ANCHOR).apply), params, {}, ds)
    curve = [loss for _, loss in result.losses]
    assert len(curve) == 15 and curve[-1] < curve[0] - 1.0, curve
    assert jax.tree.structure(result.trainable) == jax.tree.structure(params)
    assert os.listdir(tmp_path / "checkpoints") == ["15"] and (tmp_path / "loss.png").is_file()


def test_loss_decreases_only_with_the_augmenting_models_knowledge():
    # The task: after token x, predict f(x) = the augmenting model's greedy next token. The
    # anchor cannot know f; Θ_C can read it from the augmenting model's last layer. The same
    # training with another random augmenting model (no knowledge of f) fits the training
    # pairs less well and cannot generalise to held-out x.
    ccfg, theta0, frozen = tiny_composition()
    aug = frozen["augments"][0]
    other = random_params(AUG, 50)
    xs = np.arange(3, V)
    f = np.asarray(jnp.argmax(forward(AUG, aug, jnp.asarray(xs)[:, None]).logits_BxTxV[:, 0], -1))
    perm = np.random.default_rng(0).permutation(len(xs))

    def pairs(idx):
        tokens = np.stack([xs[idx], f[idx]], 1).astype(np.int32)
        return {"tokens_BxT": tokens, "mask_BxT": np.ones_like(tokens, bool),
                "target_BxT": np.tile([False, True], (len(idx), 1))}
    train, held_out = pairs(perm[:90]), pairs(perm[90:])
    evaluate = jax.jit(COMPOSED_LOSS)
    result = {}
    for name, a in (("augment", aug), ("other", other)):
        fz = {"anchor": frozen["anchor"], "augments": (a,)}
        theta = copy(theta0)
        state = OPT.init(theta)
        first = float(evaluate(theta, fz, train)[0]) / 90
        for _ in range(100):
            theta, state, m = STEP(theta, state, fz, train)
        loss_sum, n = evaluate(theta, fz, held_out)
        result[name] = (first, float(m["loss"]), float(loss_sum / n))
    first, last, held = result["augment"]
    assert last < first / 3, result
    assert last < result["other"][1], result
    assert held < result["other"][2] - 1.0, result  # measured: 4.0 vs 6.0 nats


# --- data -----------------------------------------------------------------------------

class CharTokenizer:
    """ids = 3 + ord(c) - ord('a'); BOS 1, EOS 2."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) - 97 for c in text]}


@pytest.fixture
def jsonl(tmp_path):
    def write(records, name="d.jsonl"):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        return str(path)
    return write


def test_load_dataset_flags_targets_and_pads(jsonl):
    path = jsonl([{"prompt": "ab", "target": "cd"}, {"text": "xyz"}])
    ds = data_lib.load_dataset(path, CharTokenizer(), seq_len=8)
    chex.assert_shape([ds.tokens_NxT, ds.mask_NxT, ds.target_NxT], (2, 8))
    np.testing.assert_array_equal(ds.tokens_NxT[0], [1, 3, 4, 5, 6, 2, 0, 0])
    np.testing.assert_array_equal(ds.target_NxT[0], [0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(ds.target_NxT[1], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ds.mask_NxT[1], [1, 1, 1, 1, 1, 0, 0, 0])


def test_load_dataset_errors(jsonl, tmp_path):
    with pytest.raises(data_lib.DataError, match="data file not found: .*missing.jsonl"):
        data_lib.load_dataset(str(tmp_path / "missing.jsonl"), CharTokenizer(), 8)
    with pytest.raises(data_lib.DataError, match=r": line 2 has 10 tokens, more than the sequence length 8"):
        data_lib.load_dataset(jsonl([{"text": "ab"}, {"text": "abcdefgh"}]), CharTokenizer(), 8)
    with pytest.raises(data_lib.DataError, match=r": line 1 has no target token"):
        data_lib.load_dataset(jsonl([{"prompt": "ab", "target": ""}]), CharTokenizer(), 8, append_eos=False)
    with pytest.raises(data_lib.DataError, match=r": line 2: expected"):
        data_lib.load_dataset(jsonl([{"text": "ab"}, {"prompt": "ab"}]), CharTokenizer(), 8)


def _stream(ds, n_batches, batch_size, seed, position=data_lib.Position(0, 0)):
    rows = []
    for _ in range(n_batches):
        batch, position = data_lib.batch_at(ds, position, batch_size, seed)
        rows.append(batch["tokens_BxT"][:, 1])
    return np.concatenate(rows), position


def test_batch_order_is_seeded_covers_epochs_and_resumes_exactly(jsonl):
    path = jsonl([{"text": chr(97 + i)} for i in range(10)])
    ds = data_lib.load_dataset(path, CharTokenizer(), 4)
    ids, pos = _stream(ds, 5, 4, seed=7)  # 20 examples: two epochs, batches straddle them
    assert pos == data_lib.Position(2, 0)
    for epoch in (ids[:10], ids[10:]):
        assert sorted(epoch) == list(range(3, 13))
    assert not np.array_equal(ids[:10], ids[10:])  # each epoch reshuffled
    again, _ = _stream(ds, 5, 4, seed=7)
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(ids, _stream(ds, 5, 4, seed=8)[0])
    # Resuming from a saved position continues the very same stream.
    first, mid = _stream(ds, 2, 4, seed=7)
    rest, _ = _stream(ds, 3, 4, seed=7, position=data_lib.Position(*json.loads(json.dumps(mid))))
    np.testing.assert_array_equal(np.concatenate([first, rest]), ids)


def test_eval_batches_cover_the_file_once(jsonl):
    ds = data_lib.load_dataset(jsonl([{"text": chr(97 + i)} for i in range(5)]), CharTokenizer(), 4)
    batches = list(data_lib.eval_batches(ds, 4))
    assert len(batches) == 2
    assert sum(int(b["target_BxT"].sum()) for b in batches) == int(ds.target_NxT.sum())
    assert not batches[1]["mask_BxT"][1:].any()


def test_resume_refuses_other_batch_settings(tmp_path):
    params = random_params(ANCHOR, 9, scale=0.02)
    b = random_batch(seed=1)
    ds = data_lib.Dataset("random", b["tokens_BxT"], b["mask_BxT"], b["target_BxT"])
    cfg = trainer.TrainConfig(steps=2, batch_size=8, seq_len=12, lr=1e-3, warmup=0, mesh="data=1", progress=False)
    trainer.train(str(tmp_path), cfg, losses.lm_loss(PlainLM(ANCHOR).apply), params, {}, ds)
    other = dataclasses.replace(cfg, steps=4, seed=cfg.seed + 1)
    with pytest.raises(CheckpointError, match=r"seed: trained with 0, given 1"):
        trainer.train(str(tmp_path), other, losses.lm_loss(PlainLM(ANCHOR).apply), params, {}, ds, resume=True)
    packed = dataclasses.replace(cfg, steps=4, pack=True)
    with pytest.raises(CheckpointError, match=r"pack: trained with False, given True"):
        trainer.train(str(tmp_path), packed, losses.lm_loss(PlainLM(ANCHOR).apply), params, {}, ds, resume=True)
