"""Loading and saving HF checkpoints: round trips, shards, tokenizers, and every bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from calm_jax import CheckpointError, Pretrained, init_params, load_pretrained, masks, model, save_pretrained
from calm_jax import config as config_lib
from tests import hf_models
from tests.test_parity import FWD, TOL, padded_batch


def _logits(pretrained, tokens, mask):
    return np.asarray(FWD(pretrained.config, pretrained.params, tokens, mask).logits_BxTxV)


def _hf_logits(hf, tokens, mask):
    positions = np.asarray(masks.positions_from_mask(mask))
    return hf_models.hf_logits_and_hidden(hf, tokens, mask, positions)[0]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    hf_models.save_hf_model("llama", path)
    hf_models.make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def broken(llama_dir, tmp_path):
    """A fresh copy of the llama checkpoint, to damage."""
    path = str(tmp_path / "model")
    shutil.copytree(llama_dir, path)
    return path


# ---- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(hf_models.SPECS))
def test_save_then_hf_loads_same_logits(name, tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    hf_models.save_hf_model(name, src, seed=1)
    ours = load_pretrained(src)
    save_pretrained(ours, dst)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tokens, mask = padded_batch()
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask)[mask], _logits(ours, tokens, mask)[mask],
                               atol=TOL, rtol=0)
    # and back: our own file reloads bit for bit
    again = load_pretrained(dst)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_built_here_saves_for_hf(family, tmp_path):
    """A model with no original config.json (trained from scratch) gets one HF accepts."""
    cfg = config_lib.ModelConfig(family=family, vocab_size=hf_models.VOCAB, hidden_size=32, num_layers=2,
                                 num_heads=4, num_kv_heads=2 if family == "llama" else 4, head_dim=8,
                                 intermediate_size=48, max_positions=64, tie_embeddings=family == "gpt2",
                                 **(dict(norm="layer", mlp="plain", activation="gelu_new", qkv_bias=True,
                                         o_bias=True, mlp_bias=True, position="learned", norm_eps=1e-5)
                                    if family == "gpt2" else {}))
    ours = Pretrained(cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)))
    save_pretrained(ours, str(tmp_path / "m"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    tokens, mask = padded_batch()
    np.testing.assert_allclose(_hf_logits(hf, tokens, mask)[mask], _logits(ours, tokens, mask)[mask],
                               atol=TOL, rtol=0)


def test_sharded_checkpoint_loads(tmp_path, llama_dir):
    hf = hf_models.make_hf_model("llama")
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    sharded, single = load_pretrained(str(tmp_path)), load_pretrained(llama_dir)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_streamed_load_equals_the_whole_checkpoint_path(tmp_path):
    """load_pretrained reads and places one tensor at a time; the result is what mapping the
    whole checkpoint at once gives (hf_to_params on every shard's tensors), bit for bit, and
    each weight lands on the sharding asked for."""
    from flax import traverse_util

    from calm_jax.loading import hf_to_params, load_config
    hf_models.make_hf_model("llama", seed=3).save_pretrained(str(tmp_path), max_shard_size="300KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) == 2
    tensors = {k: v for f in shards for k, v in load_file(str(tmp_path / f)).items()}
    cfg = load_config(str(tmp_path), param_dtype="bfloat16")
    whole = traverse_util.unflatten_dict(
        {k: v.astype(jnp.bfloat16) for k, v in hf_to_params(tensors, cfg).items()})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    shardings = jax.tree.map(lambda s: split if len(s.shape) == 2 else jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()), model.param_shapes(cfg))
    streamed = load_pretrained(str(tmp_path), param_dtype="bfloat16", shardings=shardings, tokenizer=False)
    assert jax.tree.structure(streamed.params) == jax.tree.structure(whole)
    for a, b, s in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(whole), jax.tree.leaves(shardings)):
        assert a.dtype == jnp.bfloat16 and a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenizer_loaded_and_saved(llama_dir, tmp_path):
    ours = load_pretrained(llama_dir)
    assert ours.tokenizer is not None
    ids = ours.tokenizer("Key ab + 12")["input_ids"]
    assert ids == hf_models.make_tokenizer()("Key ab + 12")["input_ids"]
    assert ids[0] == 1
    save_pretrained(ours, str(tmp_path / "m"))
    assert load_pretrained(str(tmp_path / "m")).tokenizer("Key ab + 12")["input_ids"] == ids
    assert load_pretrained(llama_dir, tokenizer=False).tokenizer is None


def test_no_tokenizer_files_gives_none(tmp_path):
    hf_models.save_hf_model("gpt2", str(tmp_path))
    assert load_pretrained(str(tmp_path)).tokenizer is None


def test_param_dtype_and_shardings(llama_dir):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ours = load_pretrained(llama_dir, param_dtype="bfloat16",
                           shardings=lambda cfg: jax.tree.map(lambda _: replicated, model.param_shapes(cfg)))
    leaves = jax.tree.leaves(ours.params)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert all(leaf.sharding == replicated for leaf in leaves)


def test_bf16_checkpoint_loads_and_saves(tmp_path):
    src, dst = str(tmp_path / "in"), str(tmp_path / "out")
    hf = hf_models.make_hf_model("qwen3").to(torch.bfloat16)
    hf.save_pretrained(src)
    ours = load_pretrained(src)  # upcast to the float32 default
    np.testing.assert_array_equal(np.asarray(ours.params["layers_1"]["attn"]["k_norm"]["scale"]),
                                  hf.model.layers[1].self_attn.k_norm.weight.float().detach().numpy())
    np.testing.assert_array_equal(np.asarray(ours.params["lm_head"]["kernel"]),
                                  hf.lm_head.weight.float().detach().numpy().T)
    stored = load_pretrained(src, param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(stored.params)} == {jnp.dtype(jnp.bfloat16)}
    save_pretrained(stored, dst)  # written back in bf16, bit for bit
    again = transformers.AutoModelForCausalLM.from_pretrained(dst)
    assert again.dtype == torch.bfloat16
    for (name, a), b in zip(hf.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_save_over_existing_model_replaces_it(llama_dir, tmp_path):
    dst = str(tmp_path / "m")
    gpt2_dir = str(tmp_path / "gpt2")
    hf_models.save_hf_model("gpt2", gpt2_dir)
    save_pretrained(load_pretrained(gpt2_dir), dst)
    save_pretrained(load_pretrained(llama_dir), dst)
    assert load_pretrained(dst).config.family == "llama"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary directories left


# ---- bad input: a clear CheckpointError, never a partial model -----------------------------

def _edit_config(path, **changes):
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _raises(path, *fragments):
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"


def test_missing_directory(tmp_path):
    _raises(str(tmp_path / "nope"), "model directory not found", "nope")


def test_missing_config(broken):
    os.remove(os.path.join(broken, "config.json"))
    _raises(broken, "has no config.json")


def test_config_not_json(broken):
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write("{not json")
    _raises(broken, "config.json", "not valid JSON")


def test_config_not_an_object(broken):
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write("[1, 2]")
    _raises(broken, "config.json must hold a JSON object, found list")


def test_corrupt_tokenizer(broken):
    with open(os.path.join(broken, "tokenizer.json"), "w") as f:
        f.write("{not json")
    _raises(broken, "cannot load the tokenizer in", broken)


def test_missing_weights(broken):
    os.remove(os.path.join(broken, "model.safetensors"))
    _raises(broken, "neither model.safetensors nor model.safetensors.index.json")


def test_unsupported_model_type(broken):
    _edit_config(broken, model_type="mamba")
    _raises(broken, "unsupported model_type 'mamba'", "llama")


def test_config_missing_required_field(broken):
    _edit_config(broken, hidden_size=None)
    _raises(broken, "config.json", "missing required field 'hidden_size'")


def test_unsupported_activation(broken):
    _edit_config(broken, hidden_act="quick_gelu")
    _raises(broken, "config.json", "unsupported activation 'quick_gelu'")


def test_config_missing_model_type(broken):
    _edit_config(broken, model_type=None)
    _raises(broken, "missing required field 'model_type'")


def test_wrong_shape_names_tensor_expected_and_found(broken):
    def shrink(t):
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-1]
    _edit_tensors(broken, shrink)
    _raises(broken, "model.layers.1.mlp.up_proj.weight", "expected shape (96, 64)", "found (95, 64)")


def test_config_disagrees_with_tensors(broken):
    _edit_config(broken, intermediate_size=128)
    _raises(broken, "model.layers.0.mlp.up_proj.weight", "expected shape (128, 64)", "found (96, 64)")


def test_extra_unknown_tensor(broken):
    _edit_tensors(broken, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    _raises(broken, "unrecognised tensors", "model.layers.0.self_attn.extra.weight")


def test_tensor_for_a_layer_that_does_not_exist(broken):
    _edit_config(broken, num_hidden_layers=2)
    _raises(broken, "model.layers.2.", "2 layers")


def test_missing_tensor(broken):
    _edit_tensors(broken, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    _raises(broken, "missing from the checkpoint", "layers_2/attn/k/kernel")


def test_truncated_safetensors(broken):
    file = os.path.join(broken, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    _raises(broken, "model.safetensors", "truncated or not a safetensors file")


def test_corrupt_safetensors(broken):
    with open(os.path.join(broken, "model.safetensors"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    _raises(broken, "model.safetensors", "truncated or not a safetensors file")


def test_sharded_index_names_missing_shard(tmp_path):
    hf_models.make_hf_model("llama").save_pretrained(str(tmp_path), max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    _raises(str(tmp_path), "names shard files that do not exist", shard)


@pytest.mark.parametrize("index", ["{not json", '{"metadata": {}}'])
def test_bad_sharded_index(tmp_path, index):
    hf_models.make_hf_model("llama").save_pretrained(str(tmp_path), max_shard_size="40KB")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    _raises(str(tmp_path), "model.safetensors.index.json", "not valid JSON" if "not" in index else "no weight_map")
