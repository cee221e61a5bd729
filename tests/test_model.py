"""The decoder's own properties: KV cache, taps and hooks, causality, dtypes, shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import config as config_lib
from calm_jax import load_pretrained, masks, model
from tests import hf_models, numerics
from tests.numerics import assert_identity
from tests.test_parity import FWD


class _Models(dict):
    """name -> Pretrained, each saved by HF and loaded on first use; `f64(name)`: the same in float64."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp = tmp_path_factory
        self.paths, self.float64 = {}, {}

    def path(self, name):
        if name not in self.paths:
            self.paths[name] = str(self.tmp.mktemp(name))
            hf_models.save_hf_model(name, self.paths[name])
        return self.paths[name]

    def __missing__(self, name):
        self[name] = load_pretrained(self.path(name))
        return self[name]

    def f64(self, name):
        """Call inside `numerics.float64()`; so must everything that uses the result."""
        if name not in self.float64:
            self.float64[name] = load_pretrained(self.path(name), dtype="float64")
        return self.float64[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _Models(tmp_path_factory)


# The equalities below (cache == no cache, the past unchanged by the future, ...) are
# identities: they run in float64 and are checked to float64 reordering (tests/numerics.py).


def decode_batch(length=12, prompt=6):
    """Row 0: left-padded prompt; row 1: right-padded prompt, so its decoded tokens follow padding."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(3, hf_models.VOCAB, (2, length)).astype(np.int32)
    mask = np.ones((2, length), bool)
    mask[0, :2] = False
    mask[1, prompt - 2:prompt] = False
    tokens[~mask] = 0
    return tokens, mask


def run_in_chunks(pretrained, tokens, mask, chunks, cache_length=16):
    cache = model.init_cache(pretrained.config, tokens.shape[0], cache_length)
    logits, start = [], 0
    for size in chunks:
        out = FWD(pretrained.config, pretrained.params, tokens[:, start:start + size], mask[:, start:start + size],
                  cache=cache)
        logits.append(np.asarray(out.logits_BxTxV))
        cache, start = out.cache, start + size
    assert start == tokens.shape[1]
    assert int(cache.index) == start
    return np.concatenate(logits, axis=1), cache


# ---- KV cache ----------------------------------------------------------------------------------

# GQA with one kv head and head_dim != hidden/heads; a sliding window; learned positions.
@pytest.mark.parametrize("name", ["llama_tied_headdim", "mistral", "gpt2"])
@numerics.float64()
def test_prefill_then_decode_equals_full_forward(models, name):
    ours = models.f64(name)
    tokens, mask = decode_batch()
    full = np.asarray(FWD(ours.config, ours.params, tokens, mask).logits_BxTxV)
    cached, cache = run_in_chunks(ours, tokens, mask, [6] + [1] * 6)
    assert_identity(cached[mask], full[mask])
    np.testing.assert_array_equal(np.asarray(cache.valid_BxS)[:, :12], mask)
    assert not np.asarray(cache.valid_BxS)[:, 12:].any()


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
@numerics.float64()
def test_prefill_in_two_chunks(models, name):
    ours = models.f64(name)
    tokens, mask = decode_batch()
    full = np.asarray(FWD(ours.config, ours.params, tokens, mask).logits_BxTxV)
    cached, _ = run_in_chunks(ours, tokens, mask, [4, 8])
    assert_identity(cached[mask], full[mask])


def test_sliding_window_matters(models):
    """The Mistral window (5) is shorter than the sequence, so the cache tests above exercise it."""
    ours = models["mistral"]
    assert ours.config.sliding_window == 5
    tokens, mask = decode_batch()
    wide = ours.config.replace(sliding_window=None)
    a = np.asarray(FWD(ours.config, ours.params, tokens, mask).logits_BxTxV)
    b = np.asarray(FWD(wide, ours.params, tokens, mask).logits_BxTxV)
    assert np.abs(a - b)[:, -1].max() > 1e-2


# ---- masks: causality and padding ----------------------------------------------------------------

@numerics.float64()
def test_causal_and_padding_invariant(models):
    ours = models.f64("llama")
    tokens, mask = decode_batch()
    base = np.asarray(FWD(ours.config, ours.params, tokens, mask).logits_BxTxV)
    later = tokens.copy()
    later[:, 8:] = (later[:, 8:] + 7) % hf_models.VOCAB  # change the future
    later[~mask] = 5  # and what padding slots hold
    changed = np.asarray(FWD(ours.config, ours.params, later, mask).logits_BxTxV)
    assert_identity(changed[:, :8][mask[:, :8]], base[:, :8][mask[:, :8]])
    assert np.abs(changed[:, 8:] - base[:, 8:]).max() > 1e-2


# ---- taps and hooks ------------------------------------------------------------------------------

@numerics.float64()
def test_hooks_modify_the_stream_before_taps(models):
    ours = models.f64("llama")
    cfg, params = ours.config, ours.params
    tokens, mask = decode_batch()
    plain = FWD(cfg, params, tokens, mask, taps=(0, 1, 2))
    hooked = jax.jit(lambda p: model.forward(cfg, p, tokens, mask, taps=(0, 1, 2), hooks={1: lambda h: h + 0.5}))(
        params)
    # Separate programs, so compared as identities rather than bit for bit.
    assert_identity(hooked.taps[0], plain.taps[0])
    assert_identity(hooked.taps[1], np.asarray(plain.taps[1]) + 0.5)
    assert np.abs(np.asarray(hooked.taps[2]) - np.asarray(plain.taps[2])).max() > 1e-2
    identity = jax.jit(lambda p: model.forward(cfg, p, tokens, mask, taps=(0, 1, 2), hooks={1: lambda h: h}))(params)
    assert_identity(identity.logits_BxTxV, plain.logits_BxTxV)


@numerics.float64()
def test_taps_without_logits_stop_early(models):
    ours = models.f64("gpt2")
    tokens, mask = decode_batch()
    full = FWD(ours.config, ours.params, tokens, mask, taps=(1,))
    early = FWD(ours.config, ours.params, tokens, mask, taps=(1,), logits=False)
    assert early.logits_BxTxV is None and set(early.taps) == {1}
    assert_identity(early.taps[1], full.taps[1])


@pytest.mark.parametrize("kwargs", [dict(taps=(3,)), dict(taps=(-1,)), dict(hooks={7: lambda h: h})])
def test_layer_index_out_of_range(models, kwargs):
    ours = models["llama"]
    with pytest.raises(IndexError, match=r"layer index (3|-1|7) out of range for a 3-layer llama model"):
        model.forward(ours.config, ours.params, jnp.zeros((1, 4), jnp.int32), **kwargs)


# ---- dtypes --------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits (relative rounding up to 2**-8). Storing weights in bf16
# perturbs every weight by that much; over 3 layers the logits move by a few such units of
# their scale (seen: <=1% of max|logit|). Computing in bf16 also rounds every activation
# (seen: <=1.7%). Limits: 8 and 16 units of 2**-8 of the logit scale (3% and 6%); a wrong
# cast or a bf16 softmax over -1e30 masks would be off by O(1).
BF16_LIMITS = {"storage": 8 * 2.0 ** -8, "compute": 16 * 2.0 ** -8}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["storage", "compute"])
def test_bf16_close_to_fp32(models, tmp_path, name, mode):
    ours = models[name]
    cfg = ours.config.replace(param_dtype="bfloat16", dtype="bfloat16" if mode == "compute" else "float32")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ours.params)
    tokens, mask = decode_batch()
    ref = np.asarray(FWD(ours.config, ours.params, tokens, mask).logits_BxTxV)[mask]
    out = FWD(cfg, params, tokens, mask, taps=(0,))
    assert out.logits_BxTxV.dtype == jnp.float32
    assert out.taps[0].dtype == jnp.dtype(cfg.dtype)
    got = np.asarray(out.logits_BxTxV)[mask]
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < BF16_LIMITS[mode], f"{name} bf16 {mode}: relative error {err:.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# ---- shapes --------------------------------------------------------------------------------------

def test_public_function_shapes(models):
    """Traced with eval_shape: the parity and cache tests run the same functions for values."""
    ours = models["llama"]
    cfg = ours.config
    b, t, s = 2, 5, 9
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    cache = model.init_cache(cfg, b, s)
    chex.assert_shape(cache.k + cache.v, (b, cfg.num_kv_heads, s, cfg.head_dim))  # head-major
    chex.assert_shape([cache.valid_BxS, cache.pos_BxS], (b, s))
    out = jax.eval_shape(lambda p, x, c: model.forward(cfg, p, x, taps=(0, 2), cache=c), ours.params, tokens, cache)
    chex.assert_shape(out.logits_BxTxV, (b, t, cfg.vocab_size))
    chex.assert_shape(list(out.taps.values()), (b, t, cfg.hidden_size))
    chex.assert_trees_all_equal_shapes_and_dtypes(out.cache, cache)
    final = jax.eval_shape(lambda p, h: model.final_norm(cfg, p, h), ours.params, out.taps[2])
    chex.assert_shape(final, (b, t, cfg.hidden_size))
    chex.assert_trees_all_equal_shapes_and_dtypes(model.param_shapes(cfg), ours.params)

    q = jnp.ones((b, t, cfg.num_heads, cfg.head_dim))
    kv = jnp.ones((b, cfg.num_kv_heads, s, cfg.head_dim))
    mask_BxTxS = masks.attention_mask(jnp.arange(t) + 4, jnp.arange(s), jnp.ones((b, s), bool))
    chex.assert_shape(mask_BxTxS, (b, t, s))
    chex.assert_shape(model.multihead_attention(q, kv, kv, mask_BxTxS, cfg.scale), (b, t, cfg.num_heads, cfg.head_dim))
    chex.assert_shape(masks.positions_from_mask(jnp.ones((b, t), bool), jnp.array([3, 0])), (b, t))

    lm = model.PlainLM(cfg)
    out = jax.eval_shape(lambda p, x, c: lm.apply(p, x, None, c), ours.params, tokens, lm.init_cache(b, s))
    chex.assert_shape(out.logits_BxTxV, (b, t, lm.vocab_size))


def test_every_config_activation_is_implemented():
    assert set(model._ACTIVATIONS) == set(config_lib.SUPPORTED_ACTIVATIONS)


def test_positions_from_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 1]], bool)
    np.testing.assert_array_equal(masks.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(masks.positions_from_mask(mask, jnp.array([4, 1])), [[4, 4, 4, 5, 6],
                                                                                        [1, 2, 3, 3, 3]])


LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def test_llama2_7b_traced_without_allocating():
    cfg = config_lib.from_hf_config(LLAMA2_7B, param_dtype="bfloat16")
    shapes = model.param_shapes(cfg)
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == 6_738_415_616
    layer = shapes["layers_31"]
    chex.assert_shape(layer["attn"]["q"]["kernel"], (4096, 4096))
    chex.assert_shape(layer["mlp"]["gate"]["kernel"], (4096, 11008))
    chex.assert_shape(shapes["lm_head"]["kernel"], (4096, 32000))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}

    cache = jax.eval_shape(lambda: model.init_cache(cfg, 2, 64))
    out = jax.eval_shape(lambda p, t, c: model.forward(cfg, p, t, cache=c, taps=(7, 31)), shapes,
                         jax.ShapeDtypeStruct((2, 16), jnp.int32), cache)
    chex.assert_shape(out.logits_BxTxV, (2, 16, 32000))
    chex.assert_shape([out.taps[7], out.taps[31]], (2, 16, 4096))
    chex.assert_shape(out.cache.k, (2, 32, 64, 128))
    assert len(out.cache.k) == 32


@numerics.float64()
def test_learned_positions_past_the_table_do_not_poison_real_tokens(models):
    # GPT-2 with a 6-slot position table, 6 real tokens then padding at positions 6 and 7:
    # an unclamped lookup there gives NaN, which attention spreads to the whole row.
    ours = models.f64("gpt2")
    cfg = ours.config.replace(max_positions=6)
    params = dict(ours.params, pos_embed={"embedding": ours.params["pos_embed"]["embedding"][:6]})
    tokens, mask = np.full((1, 8), 5, np.int32), np.arange(8)[None] < 6
    out = np.asarray(FWD(cfg, params, tokens, mask).logits_BxTxV)
    assert np.isfinite(out).all()
    assert_identity(out[:, :6], FWD(cfg, params, tokens[:, :6]).logits_BxTxV)


@pytest.mark.parametrize("q_chunk", [1, 4, 5, 12])
def test_query_chunked_attention_is_the_same_function(q_chunk):
    """Attention taken q_chunk queries at a time (the long-context path: model.Q_CHUNK) equals
    all queries at once, in its output and in every gradient: GQA, soft-capping, padding and
    a sliding window, and T = 13 not a multiple of the chunk (its padded rows are dropped)."""
    b, t, s, h, g, k = 2, 13, 13, 4, 2, 8
    rng = np.random.default_rng(0)
    with numerics.float64():
        q, kk, v = (jnp.asarray(rng.normal(size=shape)) for shape in ((b, t, h, k), (b, g, s, k), (b, g, s, k)))
        valid_BxS = jnp.asarray(rng.random((b, s)) > 0.25)
        pos_BxT = masks.positions_from_mask(valid_BxS)
        mask_BxTxS = masks.attention_mask(jnp.arange(t), jnp.arange(s), valid_BxS, pos_BxT, pos_BxT, window=5)

        def loss(q_chunk, q, kk, v):
            out = model.multihead_attention(q, kk, v, mask_BxTxS, 0.3, logit_cap=2.0, q_chunk=q_chunk)
            return jnp.sum(jnp.sin(out)), out

        (_, whole), grads_whole = jax.value_and_grad(lambda *a: loss(t, *a), argnums=(0, 1, 2), has_aux=True)(q, kk, v)
        (_, chunked), grads_chunked = jax.value_and_grad(lambda *a: loss(q_chunk, *a), argnums=(0, 1, 2),
                                                         has_aux=True)(q, kk, v)
        assert_identity(chunked, whole)
        for name, a, d in zip("qkv", grads_chunked, grads_whole):
            assert_identity(a, d, err_msg=f"d loss / d {name}")


def test_long_inputs_take_the_chunked_path(models, monkeypatch):
    """From Q_CHUNK_FROM queries on, the model's attention runs in chunks, with the same logits."""
    ours = models["llama"]
    with numerics.float64():
        cfg, params = numerics.f64(ours.config), numerics.to_f64(ours.params)
        tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
        mask = jnp.ones((2, 11), bool).at[0, :3].set(False)
        whole = model.forward(cfg, params, tokens, mask).logits_BxTxV
        calls = []
        real = model._attention_rows
        monkeypatch.setattr(model, "_attention_rows", lambda q, *a: calls.append(q.shape[1]) or real(q, *a))
        monkeypatch.setattr(model, "Q_CHUNK_FROM", 8)
        monkeypatch.setattr(model, "Q_CHUNK", 4)
        chunked = model.forward(cfg, params, tokens, mask).logits_BxTxV
        assert calls and set(calls) == {4}  # every layer's attention, 4 queries at a time
        assert_identity(chunked, whole, where=mask[..., None])
