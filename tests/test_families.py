"""Gemma 2, Gemma 3 (text, and the text decoder of Gemma3ForConditionalGeneration), Phi-3 and
OLMo-2: parity with HF transformers, the KV cache, saving, and each config.json spelling.

The tiny HF models (tests/hf_models.py FAMILY_SPECS) switch on every quirk of their family at
sizes where it bites; `test_quirks_bite` checks that it does, so parity here means something.
"""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from calm_jax import CheckpointError, Pretrained, load_pretrained, masks, model, save_pretrained
from calm_jax import config as config_lib
from calm_jax.loading import load_config
from tests import hf_models, numerics
from tests.numerics import assert_identity
from tests.test_model import decode_batch, run_in_chunks
from tests.test_parity import FWD, TOL, padded_batch

FAMILIES = ("gemma2", "gemma3_text", "phi3", "olmo2")
MODELS = FAMILIES + ("gemma3_mm",)  # + Gemma 3's decoder inside a Gemma3ForConditionalGeneration
# Phi-3's longrope switches factors above 10 positions: 10-token padded batches stay below
# (8 real tokens at most), 16-token ones go above (13).
SHORT, LONG = 10, 16


class _Models(dict):
    """name -> (directory, HF model, our fp32 Pretrained), each built on first use."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp = tmp_path_factory

    def __missing__(self, name):
        path = str(self.tmp.mktemp(name))
        hf = hf_models.save_hf_model(name, path)
        self[name] = (path, hf, load_pretrained(path))
        return self[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _Models(tmp_path_factory)


def _ours(pretrained, tokens, mask, positions):
    """Logits and taps of every layer: one compiled program per config and batch shape."""
    n = pretrained.config.num_layers
    return FWD(pretrained.config, pretrained.params, tokens, mask, positions, taps=tuple(range(n)))


def _batch(length):
    tokens, mask = padded_batch(length=length)
    return tokens, mask, np.asarray(masks.positions_from_mask(mask))


def _hf_logits(hf, tokens, mask, positions):
    return hf_models.hf_logits_and_hidden(hf, tokens, mask, positions)[0]


# ---- parity with transformers ----------------------------------------------------------------

# Measured max |diff| (fp32, this CPU): logits <= 2.2e-6 and taps <= 5.3e-6 over all of these,
# on logits of scale 1.6-2.6 (Gemma's capped at 3). TOL is the project's 1e-4.
@pytest.mark.parametrize("name,length", [(m, SHORT) for m in MODELS] + [("phi3", LONG)])
def test_logits_and_taps_match_hf(models, name, length):
    _, hf, ours = models[name]
    tokens, mask, positions = _batch(length)
    out = _ours(ours, tokens, mask, positions)
    hf_logits, hf_hidden = hf_models.hf_logits_and_hidden(hf, tokens, mask, positions)
    n = ours.config.num_layers
    assert len(hf_hidden) == n + 1
    np.testing.assert_allclose(np.asarray(out.logits_BxTxV)[mask], hf_logits[mask], atol=TOL, rtol=0,
                               err_msg=f"{name}: logits")
    for i in range(n - 1):  # taps[i] == HF hidden_states[i + 1]
        np.testing.assert_allclose(np.asarray(out.taps[i])[mask], hf_hidden[i + 1][mask], atol=TOL, rtol=0,
                                   err_msg=f"{name}: tap {i}")
    final = model.final_norm(ours.config, ours.params, out.taps[n - 1])
    np.testing.assert_allclose(np.asarray(final)[mask], hf_hidden[n][mask], atol=TOL, rtol=0,
                               err_msg=f"{name}: final-normed last tap")


# Each quirk, switched off in transformers' own model (same weights), moves its logits far
# past TOL: so the parity above, at TOL, shows we implement it. (HF models cost no compile.)
GEMMA3_ROPE = hf_models.GEMMA3_TEXT["rope_parameters"]
QUIRKS = [
    ("gemma2", SHORT, dict(attn_logit_softcapping=None)),
    ("gemma2", SHORT, dict(final_logit_softcapping=None)),
    ("gemma2", SHORT, dict(sliding_window=64)),
    ("gemma2", SHORT, dict(query_pre_attn_scalar=16)),  # = head_dim
    ("gemma3_text", SHORT, dict(sliding_window=64)),
    ("gemma3_text", SHORT, dict(rope_parameters=dict(GEMMA3_ROPE, sliding_attention=dict(  # local = global base
        rope_type="default", rope_theta=10000.0)))),
    ("gemma3_text", SHORT, dict(rope_parameters=dict(GEMMA3_ROPE, full_attention=dict(  # no global scaling
        rope_type="default", rope_theta=10000.0)))),
    ("phi3", SHORT, dict(sliding_window=64)),
    ("phi3", LONG, dict(original_max_position_embeddings=LONG + 10)),  # long -> short factors
    ("phi3", SHORT, dict(original_max_position_embeddings=4)),  # short -> long factors
    ("phi3", SHORT, dict(rope_parameters=dict(hf_models.FAMILY_SPECS["phi3"][2]["rope_parameters"],
                                              attention_factor=1.0))),
]


@pytest.mark.parametrize("name,length,off", QUIRKS,
                         ids=[f"{n}-{length}-{'-'.join(off)}" for n, length, off in QUIRKS])
def test_quirks_bite(models, name, length, off):
    _, hf, _ = models[name]
    cfg_cls, model_cls, kwargs = hf_models.FAMILY_SPECS[name]
    config = getattr(transformers, cfg_cls)(**copy.deepcopy({**kwargs, **off}))  # HF writes into nested dicts
    plain = getattr(transformers, model_cls)(config).eval()
    plain.load_state_dict(hf.state_dict())
    tokens, mask, positions = _batch(length)
    changed = _hf_logits(plain, tokens, mask, positions) - _hf_logits(hf, tokens, mask, positions)
    assert np.abs(changed)[mask].max() > 1e-2


# ---- the KV cache ----------------------------------------------------------------------------

# Identities, in float64 (tests/numerics.py), decoding token by token from an empty cache
# (one compiled step; tests/test_model.py covers multi-token prefills), through every sliding
# window. The Phi-3 cases stay on one side of longrope's threshold, where cached decoding
# equals the full forward: "short" never exceeds it (10 real tokens per row, threshold 10);
# "long" exceeds it in every call (threshold 3, two 6-token chunks of 4 real tokens or more).
CACHE_CASES = [("gemma2", {}, [1] * 12), ("gemma3_text", {}, [1] * 12), ("olmo2", {}, [1] * 12),
               ("phi3", {}, [1] * 12), ("phi3", dict(rope_original_max_positions=3), [6, 6])]


@pytest.mark.parametrize("name,changes,chunks", CACHE_CASES,
                         ids=[f"{n}-long" if c else n for n, c, _ in CACHE_CASES])
@numerics.float64()
def test_cached_decoding_equals_full_forward(models, name, changes, chunks):
    ours = load_pretrained(models[name][0], dtype="float64", tokenizer=False)
    ours = Pretrained(ours.config.replace(**changes), ours.params)
    tokens, mask = decode_batch()
    full = np.asarray(FWD(ours.config, ours.params, tokens, mask).logits_BxTxV)
    cached, _ = run_in_chunks(ours, tokens, mask, chunks)
    assert_identity(cached[mask], full[mask])


def test_longrope_cached_decode_crossing_the_threshold_matches_hf(models):
    """Like transformers, each call picks short or long factors by its own positions: a cached
    decode that crosses the threshold keeps the short-factor keys it cached, as HF's does,
    and so differs from one forward over the whole sequence."""
    _, hf, ours = models["phi3"]
    tokens = np.random.default_rng(5).integers(3, hf_models.VOCAB, (1, 14)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    ours_cached, _ = run_in_chunks(ours, tokens, mask, [1] * 14)
    hf_cached, past = [], None
    with torch.no_grad():
        for t in range(14):
            out = hf(input_ids=torch.tensor(tokens[:, t:t + 1]), position_ids=torch.tensor([[t]]),
                     past_key_values=past, use_cache=True)
            hf_cached.append(out.logits.numpy())
            past = out.past_key_values
    hf_cached = np.concatenate(hf_cached, axis=1)
    np.testing.assert_allclose(ours_cached, hf_cached, atol=TOL, rtol=0)
    hf_full = _hf_logits(hf, tokens, mask, np.arange(14)[None])  # one call: long factors throughout
    assert np.abs(hf_full - hf_cached).max() > 1e-2


# ---- saving ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,config_source", [(m, "checkpoint") for m in MODELS]
                         + [(f, "to_hf_config") for f in FAMILIES])
def test_save_then_hf_loads_same_logits(models, tmp_path, name, config_source):
    """Our writer (fused Phi-3 projections re-fused, the Gemma 3 decoder saved text-only) gives a
    directory transformers loads to our logits, with the checkpoint's config.json or, for a model
    without one, the one `to_hf_config` writes."""
    _, _, ours = models[name]
    if config_source == "to_hf_config":
        ours = Pretrained(ours.config, ours.params)  # no config.json to keep
    save_pretrained(ours, str(tmp_path / "m"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    tokens, mask, positions = _batch(SHORT)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask, positions)[mask],
                               np.asarray(_ours(ours, tokens, mask, positions).logits_BxTxV)[mask], atol=TOL, rtol=0)
    again = load_pretrained(str(tmp_path / "m"))
    assert again.config == ours.config
    for a, b in zip(jax_leaves(ours.params), jax_leaves(again.params)):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_phi3_fused_projections_are_split_and_fused_again(models, tmp_path):
    path, hf, ours = models["phi3"]
    layer = hf.model.layers[1]
    q, k, v = (np.asarray(ours.params["layers_1"]["attn"][p]["kernel"]) for p in "qkv")
    assert (q.shape, k.shape, v.shape) == ((32, 32), (32, 16), (32, 16))  # GQA: parts of unequal width
    np.testing.assert_array_equal(np.concatenate([q, k, v], -1).T, layer.self_attn.qkv_proj.weight.detach().numpy())
    gate, up = (np.asarray(ours.params["layers_1"]["mlp"][p]["kernel"]) for p in ("gate", "up"))
    np.testing.assert_array_equal(np.concatenate([gate, up], -1).T, layer.mlp.gate_up_proj.weight.detach().numpy())
    save_pretrained(ours, str(tmp_path / "m"))
    saved, original = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(
        os.path.join(path, "model.safetensors"))
    assert set(saved) == set(original)
    for name in original:
        np.testing.assert_array_equal(saved[name], original[name])


def test_phi3_fused_tensor_of_wrong_width_names_it(models, tmp_path):
    path = str(tmp_path / "m")
    shutil.copytree(models["phi3"][0], path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.2.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight: expected shape \(64, 32\), found \(63, 32\)"):
        load_pretrained(path)


# ---- config.json spellings -------------------------------------------------------------------

def _gemma3_old_rope(cfg):
    rope = cfg.pop("rope_parameters")
    full = dict(rope["full_attention"])
    cfg.update(rope_theta=full.pop("rope_theta"), rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
               rope_scaling=full)


def _gemma3_pattern(cfg):  # transformers 4.50-4.52: no layer_types, a sliding_window_pattern
    _gemma3_old_rope(cfg)
    cfg.pop("layer_types")
    cfg.pop("_sliding_window_pattern", None)
    cfg["sliding_window_pattern"] = 3  # every third layer global: S S F S, as layer_types said


def _gemma2_old(cfg):  # transformers < 4.47: no layer_types (even layers slide), rope_theta at the top
    cfg.pop("layer_types")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]


def _phi3_old(cfg):  # the Hub's Phi-3 files: rope_scaling, rope_theta and partial_rotary_factor at the top
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope.pop("rope_theta"), partial_rotary_factor=rope.pop("partial_rotary_factor"),
               rope_scaling=dict(type=rope.pop("rope_type"), short_factor=rope["short_factor"],
                                 long_factor=rope["long_factor"]))


# (family, spelling) -> edit of the config.json transformers 5 writes (itself tested above).
SPELLINGS = {
    ("gemma3_text", "layer_types+rope_theta/rope_local_base_freq/rope_scaling"): _gemma3_old_rope,
    ("gemma3_text", "sliding_window_pattern+rope_theta/rope_local_base_freq/rope_scaling"): _gemma3_pattern,
    ("gemma2", "even/odd+rope_theta"): _gemma2_old,
    ("phi3", "rope_scaling+top-level rope_theta/partial_rotary_factor"): _phi3_old,
}


@pytest.mark.parametrize("name,spelling", list(SPELLINGS), ids=lambda x: x)
def test_config_spellings(models, tmp_path, name, spelling):
    """A config.json written the older way reads as the same model, here and in transformers."""
    src, _, ours = models[name]
    path = str(tmp_path / "m")
    shutil.copytree(src, path)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        hf_config = json.load(f)
    SPELLINGS[name, spelling](hf_config)
    with open(cfg_file, "w") as f:
        json.dump(hf_config, f)
    assert load_config(path) == ours.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, mask, positions = _batch(SHORT)
    np.testing.assert_allclose(_hf_logits(hf, tokens, mask, positions)[mask],
                               np.asarray(_ours(ours, tokens, mask, positions).logits_BxTxV)[mask], atol=TOL, rtol=0)


def test_gemma3_multimodal_directory(models, tmp_path, capfd):
    """Gemma3ForConditionalGeneration: the text decoder, under the names transformers writes
    (language_model.model.*) or its in-memory ones (model.language_model.*), the vision tower
    ignored with a one-line notice; HF's multimodal forward never soft-caps logits, nor do we."""
    src, _, ours = models["gemma3_mm"]
    assert ours.config == load_config(models["gemma3_text"][0]).replace(logit_softcap=None)
    assert ours.hf_config["architectures"] == ["Gemma3ForCausalLM"]  # what save_pretrained writes
    path = str(tmp_path / "in_memory_names")
    shutil.copytree(src, path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    assert any(k.startswith("vision_tower.") for k in tensors)

    def in_memory(k):
        if k.startswith("language_model.model."):
            return "model.language_model." + k[len("language_model.model."):]
        return k[len("language_model."):] if k.startswith("language_model.") else "model." + k

    save_file({in_memory(k): t for k, t in tensors.items()}, file, metadata={"format": "pt"})
    capfd.readouterr()
    again = load_pretrained(path)
    notices = [line for line in capfd.readouterr().err.splitlines() if line.startswith("calm_jax:")]
    assert len(notices) == 1 and "Gemma3ForConditionalGeneration" in notices[0], notices
    assert "text decoder only (34 vision/projector tensors ignored)" in notices[0]
    for a, b in zip(jax_leaves(ours.params), jax_leaves(again.params)):
        np.testing.assert_array_equal(a, b)


# google/gemma-3-4b-it's config.json (transformers 4.50): a text_config of six keys, the rest
# the Gemma3TextConfig defaults.
GEMMA3_4B_IT = dict(
    architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", mm_tokens_per_image=256,
    text_config=dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
                     rope_scaling=dict(factor=8.0, rope_type="linear"), sliding_window=1024),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=896, intermediate_size=4304,
                       num_attention_heads=16, num_hidden_layers=27, patch_size=14, vision_use_head=False))


def test_gemma3_hub_config_with_a_sparse_text_config():
    ours = config_lib.from_hf_config(GEMMA3_4B_IT)
    hf = transformers.Gemma3Config(**copy.deepcopy(GEMMA3_4B_IT)).text_config
    assert (ours.vocab_size, ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.max_positions) == (
        hf.vocab_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.max_position_embeddings)
    assert ours.sliding_layers == tuple(t == "sliding_attention" for t in hf.layer_types)
    assert ours.scale == hf.query_pre_attn_scalar ** -0.5 and ours.tie_embeddings == hf.tie_word_embeddings
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert (ours.rope_type, ours.rope_factor, ours.rope_theta) == (full["rope_type"], full["factor"],
                                                                   full["rope_theta"])
    assert ours.rope_local_theta == local["rope_theta"] and local["rope_type"] == "default"


@pytest.mark.parametrize("name,edit,fragment", [
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1.0),
                                              sliding_attention=dict(rope_type="linear", factor=2.0))),
     "sliding-attention RoPE of type 'linear'"),
    ("gemma2", dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "unsupported layer_types 'chunked_attention'"),
    ("phi3", dict(rope_parameters=dict(rope_type="dynamic", factor=2.0)), "phi3 rope_type 'dynamic'"),
    ("olmo2", dict(model_type="olmo3"), "supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, "
                                        "phi3, olmo2, gpt2, gemma3"),
])
def test_unsupported_configs_are_named(models, name, edit, fragment):
    with open(os.path.join(models[name][0], "config.json")) as f:
        hf_config = {**json.load(f), **edit}
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.from_hf_config(hf_config)
    assert fragment in str(e.value)
