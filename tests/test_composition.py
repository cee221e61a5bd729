"""The CALM composition: layer choice, validation, masks, Θ_C-only gradients, caches."""

import dataclasses
import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers

from calm_jax.config import ModelConfig
from calm_jax.composition import (ComposedCache, ComposedLM, CompositionConfig, CompositionError, CompositionOptions,
                                  check_vocabularies, composed_forward, default_connections, describe,
                                  init_composed_cache, init_theta, param_count)
from calm_jax.composition.cross_attention import GATE_INIT, connection_module
from calm_jax.losses import encoder_mode_loss, next_token_loss
from calm_jax.model import forward, init_params, param_shapes
from tests import numerics
from tests.numerics import assert_identity

# Every model here is float64 and every test runs under `numerics.float64()` (the autouse
# fixture below): the equalities tested are identities, checked to float64 reordering
# (tests/numerics.py says why that holds on any machine). One test checks float32.
F64 = dict(dtype="float64", param_dtype="float64")
V = 64
ANCHOR = ModelConfig(family="llama", vocab_size=V, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48, max_positions=64, **F64)
AUG_LLAMA = ModelConfig(family="llama", vocab_size=V, hidden_size=16, num_layers=8, num_heads=2, num_kv_heads=1,
                        head_dim=8, intermediate_size=32, max_positions=64, **F64)
AUG_GPT2 = ModelConfig(family="gpt2", vocab_size=V, hidden_size=24, num_layers=4, num_heads=4, num_kv_heads=4,
                       head_dim=6, intermediate_size=48, max_positions=48, norm="layer", norm_eps=1e-5, mlp="plain",
                       activation="gelu_new", qkv_bias=True, o_bias=True, mlp_bias=True, position="learned",
                       tie_embeddings=True, **F64)
# Augment 0 takes the paper's default ((3, 1), (7, 3)); augment 1 also feeds anchor layers 1 and 3,
# so both kinds of "terms add up" are exercised.
CCFG = CompositionConfig(ANCHOR, (AUG_LLAMA, AUG_GPT2), connections=(None, ((1, 1), (3, 3))), dtype="float64")
B, T = 4, 12

fwd = jax.jit(composed_forward, static_argnums=(0,), static_argnames=("encoder_mode",))
anchor_fwd = jax.jit(forward, static_argnums=(0,))


@pytest.fixture(scope="module", autouse=True)
def x64():
    with numerics.float64():
        yield


def _frozen_params(cfg, seed, std=0.3):
    """Random frozen weights, drawn in numpy (jax.random would compile a kernel per shape):
    large enough (std 0.3) that every layer visibly changes the stream; norm scales near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + std * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@pytest.fixture(scope="module")
def params(x64):
    assert jnp.zeros(()).dtype == jnp.float64, "x64 must be on before the parameters are drawn"
    return {"theta": init_theta(CCFG, jax.random.key(0)), "anchor": _frozen_params(ANCHOR, 1),
            "augments": (_frozen_params(AUG_LLAMA, 2), _frozen_params(AUG_GPT2, 3))}


@pytest.fixture(scope="module")
def batch():
    """Row 0 full, row 1 left-padded (3), row 2 right-padded (3), row 3 fully padded."""
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (B, T), 3, V))
    mask = np.ones((B, T), bool)
    mask[1, :3] = False
    mask[2, T - 3:] = False
    mask[3] = False
    return tokens, mask


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


# --- the layer choice -------------------------------------------------------------------

@pytest.mark.parametrize("n_a, n_b, expected", [
    (8, 8, ((3, 3), (7, 7))),
    (8, 24, ((3, 11), (7, 23))),
    (32, 32, tuple((4 * k + 3, 4 * k + 3) for k in range(8))),
    (24, 18, ((3, 2), (7, 5), (11, 8), (15, 11), (19, 14), (23, 17))),
    (12, 8, ((3, 2), (7, 5), (11, 7))),
    (6, 10, ((5, 9),)),  # N_A not divisible by 4: n = 1, from the last layer
    (10, 4, ((4, 1), (9, 3))),
    (3, 5, ((2, 4),)),  # fewer than 4 layers: one connection, last to last
    (16, 2, ((7, 0), (15, 1))),  # N_A/4 > N_B: capped at one connection per anchor layer
    (1, 1, ((0, 0),)),
])
def test_default_connections(n_a, n_b, expected):
    assert default_connections(n_a, n_b) == expected


def test_default_connections_rejects_empty_models():
    with pytest.raises(CompositionError, match="augmenting model must have at least one layer, found 0"):
        default_connections(0, 4)
    with pytest.raises(CompositionError, match="anchor model must have at least one layer"):
        default_connections(4, 0)


def test_config_normalises_connections():
    ccfg = CompositionConfig(ANCHOR, [AUG_LLAMA, AUG_GPT2], connections={1: [[0, 2]]})
    assert ccfg.connections == (((3, 1), (7, 3)), ((0, 2),))
    assert ccfg.augments == (AUG_LLAMA, AUG_GPT2)
    assert ccfg.num_heads == ANCHOR.num_heads and ccfg.head_dim == 8
    assert hash(ccfg) == hash(CompositionConfig(ANCHOR, (AUG_LLAMA, AUG_GPT2), (None, ((0, 2),))))
    assert CompositionConfig(ANCHOR, AUG_LLAMA, num_heads=2).head_dim == 16


# --- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(connections=(((8, 1),), None)), r"layer 8 out of range for augmenting model 0 \(llama, 8 layers: 0\.\.7\)"),
    (dict(connections=(None, ((-1, 1),))), r"layer -1 out of range for augmenting model 1 \(gpt2, 4 layers"),
    (dict(connections=(((3, 4),), None)), r"anchor layer 4 out of range for the anchor \(llama, 4 layers: 0\.\.3\)"),
    (dict(connections=(((3, 1), (3, 1)), None)), r"augmenting model 0: duplicate pair \(3, 1\)"),
    (dict(connections=(((7, 1), (3, 3)), None)), r"increasing order.*\(3, 3\) follows \(7, 1\)"),
    (dict(connections=(((3, 3), (7, 1)), None)), r"increasing order.*\(7, 1\) follows \(3, 3\)"),
    (dict(connections=(None, None, ((0, 0),))), r"connections given for augmenting model 2 .*only 2"),
    (dict(connections={5: ((0, 0),)}), r"connections given for augmenting model 5, but there are only 2"),
    (dict(connections=(None,)), r"connections given for 1 augmenting model\(s\), but there are 2"),
    (dict(connections=((), None)), r"augmenting model 0: empty"),
    (dict(connections=((("a", 1),), None)), r"augmenting model 0: expected \(augment layer, anchor layer\) integer"),
    (dict(num_heads=5), r"cross-attention heads \(5\) must divide the anchor's hidden size \(32\)"),
])
def test_bad_connections_raise(kwargs, message):
    with pytest.raises(CompositionError, match=message):
        CompositionConfig(ANCHOR, (AUG_LLAMA, AUG_GPT2), **kwargs)


def test_bad_models_raise():
    assert issubclass(CompositionError, ValueError)
    with pytest.raises(CompositionError, match="at least one augmenting model"):
        CompositionConfig(ANCHOR, ())
    # Tables padded differently compose (the tokenizer's fit is checked where it is known:
    # check_tokenizer_fits, tests/test_vocab_padding.py).
    assert CompositionConfig(ANCHOR, (AUG_LLAMA, AUG_GPT2.replace(vocab_size=65))).augments[1].vocab_size == 65
    with pytest.raises(CompositionError, match="augmenting model 0 must be a ModelConfig, found dict"):
        CompositionConfig(ANCHOR, ({},))
    with pytest.raises(CompositionError, match=r"params\['augments'\] holds 1 parameter trees for 2"):
        composed_forward(CCFG, {"theta": {}, "anchor": {}, "augments": ({},)}, jnp.zeros((1, 2), jnp.int32))
    theta = init_theta(CompositionConfig(ANCHOR, (AUG_LLAMA, AUG_GPT2)), jax.random.key(0))  # 1 conn for augment 1
    with pytest.raises(CompositionError, match=r"Θ_C has no parameters for augment_1/conn_1: .* 2 connection\(s\)"):
        jax.eval_shape(functools.partial(composed_forward, CCFG), {"theta": theta, "anchor": {}, "augments": ({}, {})},
                       jax.ShapeDtypeStruct((1, 2), jnp.int32))


def _tokenizer(tokens):
    model = tokenizers.models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model))


def test_check_vocabularies():
    anchor = _tokenizer(["<unk>", "a", "b", "c"])
    check_vocabularies(anchor, [_tokenizer(["<unk>", "a", "b", "c"])] * 2)
    # Same size, one token swapped: sizes alone would not catch it.
    with pytest.raises(CompositionError, match=r"augmenting model 1's tokenizer differs .* at id 2: anchor has "
                                               r"'b', augmenting model 1 has 'x'"):
        check_vocabularies(anchor, [_tokenizer(["<unk>", "a", "b", "c"]), _tokenizer(["<unk>", "a", "x", "c"])])
    with pytest.raises(CompositionError, match=r"at id 4: anchor has None, augmenting model 0 has 'd'"):
        check_vocabularies(anchor, [_tokenizer(["<unk>", "a", "b", "c", "d"])])
    with pytest.raises(CompositionError, match=r"at id 1: anchor has 'a', augmenting model 0 has 'b'"):
        check_vocabularies(anchor, [_tokenizer(["<unk>", "b", "a", "c"])])


# --- Θ_C --------------------------------------------------------------------------------

def test_theta_shapes_and_count_at_peer_shapes():
    # BENCHMARKS.md's peer shapes, through eval_shape: nothing is allocated.
    anchor = ANCHOR.replace(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64,
                            intermediate_size=1408, vocab_size=512)
    aug = AUG_LLAMA.replace(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4, head_dim=64, vocab_size=512)
    ccfg = CompositionConfig(anchor, (aug,))
    assert ccfg.connections == (((3, 3), (7, 7)),)
    theta = jax.eval_shape(lambda: init_theta(ccfg, jax.random.key(0)))
    assert set(theta) == {"augment_0"} and set(theta["augment_0"]) == {"conn_0", "conn_1"}
    conn = theta["augment_0"]["conn_0"]
    assert set(conn) == {"proj", "q", "k", "v", "o"}
    chex.assert_shape(conn["proj"]["kernel"], (256, 512))
    chex.assert_shape(conn["proj"]["bias"], (512,))
    for name in "qkvo":
        chex.assert_shape(conn[name]["kernel"], (512, 512))
        assert set(conn[name]) == {"kernel"}
    # The paper's count per connection: D_A·D_B (+ D_B bias) + 4·D_B².
    assert param_count(theta) == 2 * (256 * 512 + 512 + 4 * 512 * 512)

    tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32)
    params = {"theta": theta, "anchor": jax.eval_shape(lambda: init_params(anchor, jax.random.key(0))),
              "augments": (jax.eval_shape(lambda: init_params(aug, jax.random.key(0))),)}
    out = jax.eval_shape(functools.partial(composed_forward, ccfg), params, tokens)
    chex.assert_shape(out.logits_BxTxV, (8, 128, 512))
    cache = jax.eval_shape(lambda: init_composed_cache(ccfg, 8, 160))
    chex.assert_shape(cache.anchor.k, [(8, 8, 160, 64)] * 8)
    chex.assert_shape(cache.cross_k[0] + cache.cross_v[0], [(8, 8, 160, 64)] * 4)
    chex.assert_shape(cache.augments[0].valid_BxS, (8, 160))
    step = jax.eval_shape(functools.partial(composed_forward, ccfg), params, jax.ShapeDtypeStruct((8, 1), jnp.int32),
                          cache=cache)
    chex.assert_shape(step.logits_BxTxV, (8, 1, 512))
    chex.assert_trees_all_equal_shapes_and_dtypes(step.cache, cache)


def test_options_params_and_describe():
    ccfg = CompositionConfig(ANCHOR, (AUG_LLAMA,), num_heads=2,
                             options=CompositionOptions(query_norm=True, zero_init_out=True, gate=True))
    theta = init_theta(ccfg, jax.random.key(0))
    conn = theta["augment_0"]["conn_1"]
    assert set(conn) == {"proj", "q", "k", "v", "o", "query_norm", "gate"}
    chex.assert_shape(conn["q"]["kernel"], (32, 32))
    np.testing.assert_array_equal(conn["o"]["kernel"], 0)
    np.testing.assert_array_equal(conn["query_norm"]["scale"], 1)
    assert float(conn["gate"]) == GATE_INIT and np.tanh(GATE_INIT) > 0.5  # the gate starts open
    assert param_count(theta) == 2 * (16 * 32 + 32 + 4 * 32 * 32 + 32 + 1)
    text = describe(CCFG, init_theta(CCFG, jax.random.key(0)))
    for line in ("augment 0: layer 3 -> anchor layer 1", "augment 0: layer 7 -> anchor layer 3",
                 "augment 1: layer 1 -> anchor layer 1", "augment 1: layer 3 -> anchor layer 3",
                 "cross-attention 4 heads x 8", "options: none"):
        assert line in text
    assert f"Θ_C parameters: {param_count(init_theta(CCFG, jax.random.key(0))):,}" in text
    assert "options: query_norm, zero_init_out, gate" in describe(ccfg, theta)


def test_composition_options():
    """One frozen dataclass; each option documented once (its field's help, listed in the class
    docstring); dict round trip; unknown names and a bare dict refused."""
    names = tuple(f.name for f in dataclasses.fields(CompositionOptions))
    assert names == CompositionOptions.names() == ("query_norm", "zero_init_out", "gate", "cross_rope")
    assert not any(CompositionOptions().to_dict().values()) and CompositionOptions().enabled() == ()
    for f in dataclasses.fields(CompositionOptions):
        assert f"{f.name}: {f.metadata['help']}." in CompositionOptions.__doc__
    options = CompositionOptions(gate=True, cross_rope=True)
    assert options.enabled() == ("gate", "cross_rope") and hash(options) == hash(CompositionOptions.from_dict(
        {"cross_rope": True, "gate": True}))
    assert CompositionOptions.from_dict(options.to_dict()) == options
    with pytest.raises(CompositionError, match=r"run 3: unknown option 'gates'; the options are query_norm, "
                                               r"zero_init_out, gate, cross_rope"):
        CompositionOptions.from_dict({"gates": True}, where="run 3")
    with pytest.raises(CompositionError, match="options must be a CompositionOptions, found dict"):
        CompositionConfig(ANCHOR, (AUG_LLAMA,), options={"gate": True})
    assert CompositionConfig(ANCHOR, (AUG_LLAMA,), options=options) != CompositionConfig(ANCHOR, (AUG_LLAMA,))
    assert connection_module(CCFG).options is CCFG.options


def test_the_composition_imports_no_training_code():
    code = ("import sys, calm_jax.composition; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['calm_jax', 'losses'], "
            "['calm_jax', 'train_step'], ['calm_jax', 'trainer']) or m.split('.')[0] == 'train'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_composed_lm_is_a_hashable_frozen_dataclass():
    lm = ComposedLM(CCFG)
    assert lm == ComposedLM(dataclasses.replace(CCFG)) and hash(lm) == hash(ComposedLM(CCFG))
    assert lm != ComposedLM(CCFG, encoder_mode=True) and ComposedLM(CCFG, encoder_mode=1).encoder_mode is True
    assert (lm.vocab_size, lm.max_positions) == (V, 48)  # the GPT-2 augment's 48 positions are the fewest


def test_cross_attention_empty_rows_are_exactly_zero():
    module = connection_module(CCFG)
    p = init_theta(CCFG, jax.random.key(0))["augment_0"]["conn_0"]
    h_a = jax.random.normal(jax.random.key(1), (2, 5, 16))
    h_b = jax.random.normal(jax.random.key(2), (2, 3, 32))
    mask = np.ones((2, 3, 5), bool)
    mask[0, 1] = False  # one query with nothing to attend to
    mask[1] = False  # a whole row

    @jax.jit
    def out(p, h_b):
        return module.apply({"params": p}, h_a, h_b, mask)

    delta = out(p, h_b)
    chex.assert_shape(delta, (2, 3, 32))
    np.testing.assert_array_equal(delta[0, 1], 0)
    np.testing.assert_array_equal(delta[1], 0)
    assert np.abs(delta[0, 0]).min() > 0
    grads = jax.grad(lambda p, h: jnp.sum(out(p, h) ** 2), argnums=(0, 1))(p, h_b)
    chex.assert_tree_all_finite(grads)


# --- the composed forward ---------------------------------------------------------------

def test_zero_output_projection_gives_the_anchor(params, batch):
    tokens, mask = batch
    anchor = anchor_fwd(ANCHOR, params["anchor"], tokens, mask).logits_BxTxV
    zero_o = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[-2].key == "o" else x, params["theta"])
    composed = fwd(CCFG, {**params, "theta": zero_o}, tokens, mask).logits_BxTxV
    assert_identity(composed, anchor)


def test_each_augmenting_model_contributes(params, batch):
    tokens, mask = batch
    anchor = anchor_fwd(ANCHOR, params["anchor"], tokens, mask).logits_BxTxV
    full = fwd(CCFG, params, tokens, mask).logits_BxTxV
    chex.assert_shape(full, (B, T, V))
    real = mask[..., None]
    assert np.abs(np.where(real, full - anchor, 0)).max() > 1e-2
    outs = []
    for m in range(2):
        theta = {**params["theta"], f"augment_{m}": _zeros_like(params["theta"][f"augment_{m}"])}
        outs.append(fwd(CCFG, {**params, "theta": theta}, tokens, mask).logits_BxTxV)
        assert np.abs(np.where(real, outs[-1] - full, 0)).max() > 1e-2, f"augmenting model {m} changes nothing"
        assert np.abs(np.where(real, outs[-1] - anchor, 0)).max() > 1e-2, f"augmenting model {1 - m} changes nothing"
    both_zero = fwd(CCFG, {**params, "theta": _zeros_like(params["theta"])}, tokens, mask).logits_BxTxV
    assert_identity(both_zero, anchor)


def test_no_leakage_from_later_tokens(params, batch):
    tokens, mask = batch
    base = fwd(CCFG, params, tokens, mask).logits_BxTxV
    rng = np.random.default_rng(0)
    for t in (0, 3, 5, 8, T - 2):
        changed = tokens.copy()
        changed[:, t + 1:] = rng.integers(3, V, size=(B, T - t - 1))
        assert (changed != tokens).any()
        out = fwd(CCFG, params, changed, mask).logits_BxTxV
        # Bit for bit: one compiled program, and a masked key's weight is exactly 0 (exp of
        # -1e30 below the row's max), so later tokens cannot even change the rounding.
        # Padding slots are excluded: a query with no valid key spreads uniformly over all slots.
        real = mask[:, :t + 1, None]
        np.testing.assert_array_equal(np.where(real, out[:, :t + 1], 0), np.where(real, base[:, :t + 1], 0),
                                      err_msg=f"a real position <= {t} saw later tokens")
        assert np.abs(out[:3, t + 1:] - base[:3, t + 1:]).max() > 1e-3  # the change itself is visible later


def test_padding_invariance_and_fully_padded_row(params, batch):
    tokens, mask = batch
    out = fwd(CCFG, params, tokens, mask).logits_BxTxV
    chex.assert_tree_all_finite(out)
    # Rows 1 and 2 have 9 real tokens each: together they make an unpadded batch.
    alone = fwd(CCFG, params, np.stack([tokens[1][mask[1]], tokens[2][mask[2]]]), None).logits_BxTxV
    for row in (1, 2):
        assert_identity(out[row][mask[row]], alone[row - 1])


def test_gradients_reach_theta_only(params, batch):
    tokens, mask = batch

    def loss(p):
        logits = fwd(CCFG, p, tokens, mask).logits_BxTxV
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        weight = mask[:, 1:] & mask[:, :-1]
        return jnp.sum(nll * weight) / weight.sum()

    g_theta = jax.grad(lambda th: loss({**params, "theta": th}))(params["theta"])
    chex.assert_tree_all_finite(g_theta)
    for path, g in jax.tree_util.tree_leaves_with_path(g_theta):
        assert np.abs(g).max() > 0, f"no gradient for {jax.tree_util.keystr(path)}"
    # Differentiating with respect to everything: the frozen models get exactly nothing.
    g_all = jax.grad(loss)(params)
    for name in ("anchor", "augments"):
        for path, g in jax.tree_util.tree_leaves_with_path(g_all[name]):
            assert not np.any(g), f"frozen {name}{jax.tree_util.keystr(path)} got a gradient"
    numerics.assert_trees_identity(g_all["theta"], g_theta)


def test_options_forward_is_finite_and_differs(params, batch):
    tokens, mask = batch
    ccfg = CompositionConfig(ANCHOR, (AUG_LLAMA, AUG_GPT2), CCFG.connections,
                             options=CompositionOptions(query_norm=True, gate=True))
    theta = init_theta(ccfg, jax.random.key(0))

    def loss(th):
        logits = fwd(ccfg, {**params, "theta": th}, tokens, mask).logits_BxTxV
        return jnp.sum(jnp.where(mask[..., None], logits, 0) ** 2), logits

    (_, out), g = jax.value_and_grad(loss, has_aux=True)(theta)
    chex.assert_tree_all_finite((out, g))
    anchor = anchor_fwd(ANCHOR, params["anchor"], tokens, mask).logits_BxTxV
    assert np.abs(np.where(mask[..., None], out - anchor, 0)).max() > 1e-2
    assert all(np.abs(g[f"augment_{m}"][f"conn_{c}"]["gate"]) > 0 for m in range(2) for c in range(2))


# --- caches -----------------------------------------------------------------------------

PROMPT = 7


@pytest.fixture(scope="module")
def decode_batch():
    """Prompts of PROMPT slots, left-padded (row 1 by 3, row 2 by 6), then T - PROMPT decoded tokens."""
    tokens = np.asarray(jax.random.randint(jax.random.key(7), (3, T), 3, V))
    prompt_mask = np.zeros((3, T), bool)
    prompt_mask[:, :PROMPT] = True
    prompt_mask[1, :3] = False
    prompt_mask[2, :6] = False
    mask = prompt_mask.copy()
    mask[:, PROMPT:] = True
    return tokens, mask, prompt_mask


def _decode(lm, params, tokens, mask, chunks):
    """Runs `lm` over tokens in the given chunk sizes with a cache; returns (logits, caches after each chunk)."""
    apply = jax.jit(lm.apply)
    cache = lm.init_cache(tokens.shape[0], T + 2)
    logits, caches, start = [], [], 0
    for size in chunks:
        out = apply(params, tokens[:, start:start + size], mask[:, start:start + size], cache)
        cache = out.cache
        logits.append(out.logits_BxTxV)
        caches.append(cache)
        start += size
    assert start == tokens.shape[1]
    return np.concatenate(logits, axis=1), caches


CHUNKS = (PROMPT, 2) + (1,) * (T - PROMPT - 2)  # prefill, a 2-token chunk, then single tokens


def test_cached_iterative_equals_uncached(params, decode_batch):
    tokens, mask, _ = decode_batch
    full = fwd(CCFG, params, tokens, mask).logits_BxTxV
    lm = ComposedLM(CCFG)
    cached, caches = _decode(lm, params, tokens, mask, CHUNKS)
    assert_identity(cached, full, where=mask[..., None])
    last = caches[-1]
    assert isinstance(last, ComposedCache) and not last.augments_done
    assert int(last.anchor.index) == T and all(int(c.index) == T for c in last.augments)
    # Cross k/v already written are never rewritten.
    for m in range(2):
        for before, after in zip(caches[0].cross_k[m], last.cross_k[m]):
            np.testing.assert_array_equal(before[:, :, :PROMPT], after[:, :, :PROMPT])  # k_BxHxSxK


def test_float32_forward_and_cache_match_the_float64_reference(decode_batch):
    """The float32 path computes the same function: its full and cached logits against float64.

    Weights at HF's initializer range (std 0.02), where rounding is not amplified layer by
    layer. Bound: 64 float32 units of the logit scale, i.e. a few roundings for each of the
    ~16 normalised layers the signal passes through, each adding its share linearly (seen:
    2.3 units on AVX-512; with the std 0.3 weights above, float32 cached vs full differed by
    ~150 units on an AVX-512 CPU, which is why the identities run in float64). A float32 bug (a cast
    to 16 bits, a lost upcast) is off by 2**-8 of the scale or more.
    """
    tokens, mask, _ = decode_batch
    frozen64 = {"anchor": _frozen_params(ANCHOR, 1, std=0.02),
                "augments": (_frozen_params(AUG_LLAMA, 2, std=0.02), _frozen_params(AUG_GPT2, 3, std=0.02))}
    theta64 = jax.tree.map(lambda x: x * 0.5, init_theta(CCFG, jax.random.key(0)))
    params64 = {"theta": theta64, **frozen64}
    ref = fwd(CCFG, params64, tokens, mask).logits_BxTxV
    f32 = dict(dtype="float32", param_dtype="float32")
    ccfg32 = dataclasses.replace(CCFG, anchor=ANCHOR.replace(**f32),
                                 augments=tuple(a.replace(**f32) for a in CCFG.augments), dtype="float32")
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    full = fwd(ccfg32, params32, tokens, mask).logits_BxTxV
    cached, _ = _decode(ComposedLM(ccfg32), params32, tokens, mask, CHUNKS)
    assert full.dtype == cached.dtype == jnp.float32
    real = mask[..., None]
    bound = numerics.fp32_atol(ref, 64, where=real)
    for name, got in (("full", full), ("cached", cached)):
        err = numerics.scale(np.asarray(got, np.float64) - ref, where=real)
        assert err <= bound, f"float32 {name} forward: max error {err:.3g} > {bound:.3g}"


def test_encoder_mode_keeps_augmenting_states_fixed(params, decode_batch):
    tokens, mask, prompt_mask = decode_batch
    lm = ComposedLM(CCFG, encoder_mode=True)
    cached, caches = _decode(lm, params, tokens, mask, (PROMPT,) + (1,) * (T - PROMPT))
    # The documented semantics: the uncached forward with the augmenting models shown only the prompt.
    reference = fwd(CCFG, params, tokens, mask, augment_mask_BxT=prompt_mask).logits_BxTxV
    real = mask[..., None]
    assert_identity(cached, reference, where=real)
    # ... which is not what iterative decoding gives: refreshed states would change the decoded positions.
    iterative = fwd(CCFG, params, tokens, mask).logits_BxTxV
    assert_identity(cached[:, :PROMPT], iterative[:, :PROMPT], where=real[:, :PROMPT])
    assert np.abs(cached[:, PROMPT:] - iterative[:, PROMPT:]).max(axis=(1, 2)).min() > 1e-2
    # The augmenting caches and cross k/v stay as the prefill left them.
    assert all(c.augments_done for c in caches)
    for m in range(2):
        assert int(caches[-1].augments[m].index) == PROMPT
        np.testing.assert_array_equal(caches[-1].augments[m].valid_BxS[:, :T], prompt_mask)
        chex.assert_trees_all_equal(caches[0].cross_k[m], caches[-1].cross_k[m])
        chex.assert_trees_all_equal(caches[0].cross_v[m], caches[-1].cross_v[m])
    assert int(caches[-1].anchor.index) == T


def test_encoder_mode_loss_trains_what_encoder_decoding_computes(params, decode_batch):
    tokens, mask, prompt_mask = decode_batch
    batch = {"tokens_BxT": tokens, "mask_BxT": mask, "target_BxT": mask & ~prompt_mask}
    frozen = {k: params[k] for k in ("anchor", "augments")}
    loss_sum, n = jax.jit(encoder_mode_loss(CCFG))(params["theta"], frozen, batch)
    # Encoder-mode decoding equals the forward with the prompt as augment mask (tested above).
    reference = fwd(CCFG, params, tokens, mask, augment_mask_BxT=prompt_mask).logits_BxTxV
    want_sum, want_n = next_token_loss(reference, tokens, batch["target_BxT"])
    assert_identity(loss_sum, want_sum)
    assert n == want_n == (mask & ~prompt_mask)[:, 1:].sum()
    iterative_sum, _ = next_token_loss(fwd(CCFG, params, tokens, mask).logits_BxTxV, tokens, batch["target_BxT"])
    assert abs(float(iterative_sum) - float(loss_sum)) > 1e-3


def test_composed_lm_interface():
    lm = ComposedLM(CCFG)
    assert lm.vocab_size == V
    assert lm.max_positions == 48  # the smallest of the three models'
    cache = lm.init_cache(2, 10)
    chex.assert_shape(cache.anchor.valid_BxS, (2, 10))
    chex.assert_shape(cache.cross_k[1], [(2, 4, 10, 8)] * 2)
    # Augmenting layers after the last tapped one never run, so they hold no slots.
    chex.assert_shape(cache.augments[0].k, [(2, 1, 10, 8)] * 8)
    chex.assert_shape(cache.augments[1].k, [(2, 4, 10, 6)] * 4)
    ccfg = CompositionConfig(ANCHOR, (AUG_LLAMA,), connections=(((1, 0), (3, 2)),))
    chex.assert_shape(init_composed_cache(ccfg, 2, 10).augments[0].k, [(2, 1, 10, 8)] * 4 + [(2, 1, 0, 8)] * 4)


ROPE_CCFG = dataclasses.replace(CCFG, options=CompositionOptions(cross_rope=True))


def test_cross_rope_changes_scores_not_parameters(params, batch):
    """Same Θ_C, positions on: the composed logits change; no parameter is added."""
    tokens, mask = batch
    assert jax.tree.structure(init_theta(ROPE_CCFG, jax.random.key(0))) == jax.tree.structure(params["theta"])
    plain = fwd(CCFG, params, tokens, mask).logits_BxTxV
    rope = fwd(ROPE_CCFG, params, tokens, mask).logits_BxTxV
    assert np.abs(np.where(mask[:3, :, None], plain[:3] - rope[:3], 0)).max() > 1e-3
    assert "cross_rope" in describe(ROPE_CCFG, params["theta"])


def test_cross_rope_no_leakage_and_padding_invariance(params, batch):
    tokens, mask = batch
    base = fwd(ROPE_CCFG, params, tokens, mask).logits_BxTxV
    changed = tokens.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    out = fwd(ROPE_CCFG, params, changed, mask).logits_BxTxV
    real = mask[:, :6, None]
    np.testing.assert_array_equal(np.where(real, out[:, :6], 0), np.where(real, base[:, :6], 0))
    # Row 1 (left-padded by 3) alone and unpadded: RoPE positions count real tokens only.
    alone = fwd(ROPE_CCFG, params, tokens[1:2, 3:], mask[1:2, 3:]).logits_BxTxV
    assert_identity(alone[0], base[1, 3:])


def test_cross_rope_cached_equals_uncached(params, decode_batch):
    tokens, mask, _ = decode_batch
    full = fwd(ROPE_CCFG, params, tokens, mask).logits_BxTxV
    cached, _ = _decode(ComposedLM(ROPE_CCFG), params, tokens, mask, CHUNKS)
    assert_identity(cached, full, where=mask[..., None])


def test_cross_rope_needs_an_even_head_size():
    odd = ModelConfig(family="llama", vocab_size=V, hidden_size=12, num_layers=2, num_heads=4, num_kv_heads=4,
                      head_dim=3, intermediate_size=16)
    with pytest.raises(CompositionError, match="even cross-attention head size"):
        CompositionConfig(odd, (AUG_LLAMA,), connections=(((7, 1),),), options=CompositionOptions(cross_rope=True))
