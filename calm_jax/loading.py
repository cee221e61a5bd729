"""Hugging Face checkpoints <-> our parameter trees.

The mapping is data: per family, a table of (HF name template, our path template(s),
transform). `{i}` stands for the layer index. Loading checks every tensor against the
table and the expected shapes before anything is placed on a device (from the safetensors
headers alone), so a bad checkpoint fails whole, naming the tensor, never leaving a partial
model. Then it streams: one tensor at a time is read, converted and placed on its devices
(its target sharding, if given) and dropped, so host memory holds at most a tensor or two
beyond what the placed weights themselves take (benchmarks/bench_load.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from calm_jax import config as config_lib
from calm_jax import model as model_lib
from calm_jax.data import atomic_directory


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as asked."""


class ConfigFileError(config_lib.ConfigError, CheckpointError):
    """A model directory's config.json that cannot be read as a ModelConfig (a wrong field: named
    with the file, e.g. "m/config.json: field 'num_hidden_layers' must be an integer, found str '4'")."""


@dataclasses.dataclass(frozen=True)
class Transform:
    to_ours: Callable[[np.ndarray], list]
    to_hf: Callable[[list], np.ndarray]
    # True: to_ours gives one array, cut along its last axis into the widths of the parameters
    # it fills (fused projections whose pieces differ in width, e.g. Phi-3's qkv under GQA).
    split_by_shape: bool = False


SAME = Transform(lambda t: [t], lambda ts: ts[0])
TRANSPOSE = Transform(lambda t: [t.T], lambda ts: ts[0].T)  # torch Linear (out, in) -> kernel (in, out)
SPLIT3 = Transform(lambda t: np.split(t, 3, axis=-1), lambda ts: np.concatenate(ts, axis=-1))  # GPT-2 c_attn
# A fused torch Linear (sum of outs, in) -> one kernel (in, out_j) per part (Phi-3 qkv_proj, gate_up_proj).
FUSED = Transform(lambda t: [t.T], lambda ts: np.concatenate(ts, axis=-1).T, split_by_shape=True)

_L = "model.layers.{i}."
_LLAMA = [
    ("model.embed_tokens.weight", "embed/embedding", SAME),
    ("model.norm.weight", "final_norm/scale", SAME),
    ("lm_head.weight", "lm_head/kernel", TRANSPOSE),
    (_L + "input_layernorm.weight", "layers_{i}/ln1/scale", SAME),
    (_L + "post_attention_layernorm.weight", "layers_{i}/ln2/scale", SAME),
    *[(_L + f"self_attn.{p}_proj.weight", f"layers_{{i}}/attn/{p}/kernel", TRANSPOSE) for p in "qkvo"],
    *[(_L + f"self_attn.{p}_proj.bias", f"layers_{{i}}/attn/{p}/bias", SAME) for p in "qkvo"],
    (_L + "self_attn.q_norm.weight", "layers_{i}/attn/q_norm/scale", SAME),
    (_L + "self_attn.k_norm.weight", "layers_{i}/attn/k_norm/scale", SAME),
    *[(_L + f"mlp.{p}_proj.weight", f"layers_{{i}}/mlp/{p}/kernel", TRANSPOSE) for p in ("gate", "up", "down")],
    *[(_L + f"mlp.{p}_proj.bias", f"layers_{{i}}/mlp/{p}/bias", SAME) for p in ("gate", "up", "down")],
]
_H = "transformer.h.{i}."
_GPT2 = [
    ("transformer.wte.weight", "embed/embedding", SAME),
    ("transformer.wpe.weight", "pos_embed/embedding", SAME),
    ("transformer.ln_f.weight", "final_norm/scale", SAME),
    ("transformer.ln_f.bias", "final_norm/bias", SAME),
    ("lm_head.weight", "lm_head/kernel", TRANSPOSE),
    *[(_H + f"{hf}.{w}", f"layers_{{i}}/{ours}/{p}", SAME)
      for hf, ours in (("ln_1", "ln1"), ("ln_2", "ln2")) for w, p in (("weight", "scale"), ("bias", "bias"))],
    # GPT-2's Conv1D stores (in, out): already our kernel layout.
    (_H + "attn.c_attn.weight", ("layers_{i}/attn/q/kernel", "layers_{i}/attn/k/kernel", "layers_{i}/attn/v/kernel"),
     SPLIT3),
    (_H + "attn.c_attn.bias", ("layers_{i}/attn/q/bias", "layers_{i}/attn/k/bias", "layers_{i}/attn/v/bias"), SPLIT3),
    (_H + "attn.c_proj.weight", "layers_{i}/attn/o/kernel", SAME),
    (_H + "attn.c_proj.bias", "layers_{i}/attn/o/bias", SAME),
    (_H + "mlp.c_fc.weight", "layers_{i}/mlp/up/kernel", SAME),
    (_H + "mlp.c_fc.bias", "layers_{i}/mlp/up/bias", SAME),
    (_H + "mlp.c_proj.weight", "layers_{i}/mlp/down/kernel", SAME),
    (_H + "mlp.c_proj.bias", "layers_{i}/mlp/down/bias", SAME),
]


def _without(table, *hf_names):
    return [row for row in table if row[0] not in hf_names]


# Gemma 2/3: "post_attention_layernorm" is the attention *output* norm (in Llama: the MLP's input norm).
_GEMMA2 = _without(_LLAMA, _L + "post_attention_layernorm.weight") + [
    (_L + "post_attention_layernorm.weight", "layers_{i}/attn_out_norm/scale", SAME),
    (_L + "pre_feedforward_layernorm.weight", "layers_{i}/ln2/scale", SAME),
    (_L + "post_feedforward_layernorm.weight", "layers_{i}/mlp_out_norm/scale", SAME),
]
# OLMo-2: no input norms; both of its layer norms are on the sublayer outputs.
_OLMO2 = _without(_LLAMA, _L + "input_layernorm.weight", _L + "post_attention_layernorm.weight") + [
    (_L + "post_attention_layernorm.weight", "layers_{i}/attn_out_norm/scale", SAME),
    (_L + "post_feedforward_layernorm.weight", "layers_{i}/mlp_out_norm/scale", SAME),
]
# Phi-3: fused q|k|v and gate|up projections (no biases), split on load and fused again on save.
_PHI3 = _without(_LLAMA, *[_L + f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")],
                 *[_L + f"mlp.{p}_proj.{w}" for p in ("gate", "up") for w in ("weight", "bias")]) + [
    (_L + "self_attn.qkv_proj.weight", tuple(f"layers_{{i}}/attn/{p}/kernel" for p in "qkv"), FUSED),
    (_L + "mlp.gate_up_proj.weight", ("layers_{i}/mlp/gate/kernel", "layers_{i}/mlp/up/kernel"), FUSED),
]
NAME_TABLES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gpt2": _GPT2,
               "gemma2": _GEMMA2, "gemma3_text": _GEMMA2, "phi3": _PHI3, "olmo2": _OLMO2}

# Multimodal checkpoints whose text decoder is one of the families: per config.json model_type,
# how their tensor names map onto the decoder's (prefix -> replacement, first match), which
# prefixes belong to the parts we leave out, and the architecture a text-only copy is saved as.
# transformers writes language_model.model.* / vision_tower.* (every version: since 4.52 it
# renames its in-memory model.language_model.* back on save); the in-memory names are read too.
MULTIMODAL = {
    "gemma3": dict(
        text_prefixes=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                       ("model.language_model.", "model.")),
        ignored_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector."),
        text_model_type="gemma3_text", text_architecture="Gemma3ForCausalLM"),
}

# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")
# Prefixes seen in the wild for the same tensors (e.g. the original GPT-2 files have none).
_ALIASES = {"gpt2": ("transformer.", "")}


@dataclasses.dataclass
class Pretrained:
    """A loaded model: its config, parameter tree, tokenizer (or None) and config.json dict
    (for a multimodal checkpoint, that of its text decoder as a text-only model)."""

    config: config_lib.ModelConfig
    params: Any
    tokenizer: Any = None
    hf_config: dict = dataclasses.field(default_factory=dict)

    def __call__(self, tokens_BxT, **kwargs) -> model_lib.LMOutput:
        return model_lib.forward(self.config, self.params, tokens_BxT, **kwargs)


def _paths(template, i):
    paths = (template,) if isinstance(template, str) else template
    return tuple(tuple(p.format(i=i).split("/")) for p in paths)


def _compile(table):
    compiled = []
    for hf, ours, transform in table:
        pattern = re.compile("^" + re.escape(hf).replace(re.escape("{i}"), r"(\d+)") + "$")
        compiled.append((pattern, ours, transform))
    return compiled


def _canonical(name: str, family: str) -> str:
    prefix, bare = _ALIASES.get(family, (None, None))
    if prefix is not None and not name.startswith(prefix) and not name.startswith("lm_head."):
        return prefix + name[len(bare):]
    return name


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory not found: {path}")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path} has no config.json")
    hf_config = _read_json(cfg_file)
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object, found {type(hf_config).__name__}")
    return hf_config


def _read_json(file: str):
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not weight_map or not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Where one tensor of a checkpoint is, from its file's header (no data read)."""

    file: str
    name: str  # its name in the file
    shape: tuple


def _index_tensors(files: list[str]) -> dict[str, _Stored]:
    """{tensor name: _Stored} over all shards, from the headers alone. Raises CheckpointError on
    an unreadable (truncated, corrupt) file or a tensor in two shards."""
    stored = {}
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                for name in f.keys():
                    if name in stored:
                        raise CheckpointError(f"tensor {name} appears in more than one shard ({file})")
                    stored[name] = _Stored(file, name, tuple(f.get_slice(name).get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {file}: it is truncated or not a safetensors file ({e})") from e
    return stored


def _read_one(stored: _Stored) -> np.ndarray:
    # The file is opened for this one tensor: safetensors reads through a memory map, and the
    # pages a read touches count as this process's memory until the map is closed, so a file
    # held open while all its tensors are read would hold the whole shard resident.
    try:
        with safe_open(stored.file, framework="np") as f:
            return f.get_tensor(stored.name)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read tensor {stored.name} from {stored.file}: {e}") from e


def _pieces_fn(transform: Transform, widths: list[int] | None) -> Callable[[np.ndarray], list]:
    if widths is None:
        return transform.to_ours
    return lambda t: np.split(transform.to_ours(t)[0], np.cumsum(widths)[:-1], axis=-1)


def _match(shapes: Mapping[str, tuple], cfg: config_lib.ModelConfig) -> list[tuple[str, tuple, Callable]]:
    """Which stored tensors fill which parameters, from their names and shapes alone.

    Returns, per tensor to read, (its name, our paths, a function tensor -> the pieces in our
    layout, one per path). Every tensor must be used and every parameter filled; otherwise
    raises CheckpointError naming the tensors (see `hf_to_params`).
    """
    expected = traverse_util.flatten_dict(model_lib.param_shapes(cfg))
    rules = _compile(NAME_TABLES[cfg.family])
    plan, filled, unknown, problems = [], set(), [], []
    for raw_name, shape in shapes.items():
        shape = tuple(shape)
        name = _canonical(raw_name, cfg.family)
        if _IGNORED.search(name):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # a tied head stored anyway: the embedding is the head
        for pattern, ours, transform in rules:
            m = pattern.match(name)
            if m:
                break
        else:
            unknown.append(raw_name)
            continue
        layer = int(m.group(1)) if m.groups() else None
        paths = _paths(ours, layer)
        # The transform applied to a stand-in of the tensor's shape (no memory): the pieces' shapes.
        pieces = transform.to_ours(np.broadcast_to(np.zeros((), np.float32), shape))
        widths = None
        if transform.split_by_shape:
            absent = [p for p in paths if p not in expected]
            if absent:
                problems.append(f"{raw_name}: this {cfg.family} config ({cfg.num_layers} layers) "
                                f"has no parameter {'/'.join(absent[0])}")
                continue
            want = [tuple(expected[p].shape) for p in paths]
            whole = pieces[0]
            if any(w[:-1] != whole.shape[:-1] for w in want) or sum(w[-1] for w in want) != whole.shape[-1]:
                problems.append(f"{raw_name}: expected shape {(sum(w[-1] for w in want),) + want[0][:-1][::-1]}, "
                                f"found {shape}")
                continue
            widths = [w[-1] for w in want]
            pieces = np.split(whole, np.cumsum(widths)[:-1], axis=-1)
        fits = True
        for path, piece in zip(paths, pieces):
            if path not in expected:
                problems.append(f"{raw_name}: this {cfg.family} config ({cfg.num_layers} layers) "
                                f"has no parameter {'/'.join(path)}")
                fits = False
            elif piece.shape != expected[path].shape:
                want = tuple(expected[path].shape)
                problems.append(f"{raw_name}: expected shape {_hf_shape(transform, want, len(paths))}, "
                                f"found {shape}")
                fits = False
        if fits:
            plan.append((raw_name, paths, _pieces_fn(transform, widths)))
            filled.update(paths)
    if unknown:
        problems.append("unrecognised tensors: " + ", ".join(sorted(unknown)[:10])
                        + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    missing = sorted("/".join(p) for p in expected if p not in filled)
    if missing and not problems:
        problems.append("parameters missing from the checkpoint: " + ", ".join(missing[:10])
                        + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    if problems:
        raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(problems))
    return plan


def hf_to_params(tensors: Mapping[str, np.ndarray], cfg: config_lib.ModelConfig) -> dict:
    """Maps HF tensors to our flat {path: array}, checking names and shapes against `cfg`.

    Every tensor must be used and every parameter filled; otherwise raises CheckpointError
    naming the tensors. Returns numpy arrays (nothing placed on a device yet).
    """
    flat = {}
    for name, paths, pieces in _match({n: np.shape(t) for n, t in tensors.items()}, cfg):
        flat.update(zip(paths, pieces(np.asarray(tensors[name]))))
    return flat


def _stream(plan, stored: Mapping[str, _Stored], dtype, shardings) -> dict:
    """The parameter tree, read and placed one stored tensor at a time (see the module doc).

    shardings: None (the default device), one Sharding for all, or a tree like the params'.
    """
    flat_shardings = None
    if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = traverse_util.flatten_dict(shardings)
        absent = sorted("/".join(p) for _, paths, _ in plan for p in paths if p not in flat_shardings)
        if absent:
            raise ValueError(f"shardings has no entry for {', '.join(absent[:5])}")
    flat, in_flight = {}, []
    for name, paths, pieces_of in plan:
        pieces = [p.astype(dtype, copy=False) for p in pieces_of(_read_one(stored[name]))]
        placed = [jax.device_put(p, shardings if flat_shardings is None else flat_shardings[path])
                  for path, p in zip(paths, pieces)]
        del pieces
        # One tensor in flight: its host copy is freed once its transfer is done, so a slow
        # transfer cannot pile tensors up in host memory while the next ones are read.
        jax.block_until_ready(in_flight)
        in_flight = placed
        flat.update(zip(paths, placed))
    jax.block_until_ready(in_flight)
    return traverse_util.unflatten_dict(flat)


def _hf_shape(transform: Transform, ours: tuple, n: int) -> tuple:
    if transform is TRANSPOSE:
        return tuple(reversed(ours))
    if transform is SPLIT3:
        return ours[:-1] + (ours[-1] * n,)
    return ours


def load_config(path: str, dtype: str = "float32", param_dtype: str | None = None) -> config_lib.ModelConfig:
    """The ModelConfig `load_pretrained` gives for a model directory, from its config.json alone
    (no weights read): for checks that should not wait for a model to load."""
    return _load_config(path, dtype, param_dtype)[0]


def _load_config(path: str, dtype: str, param_dtype: str | None):
    # The dtypes are the caller's settings, not the file's: checked before the file is blamed.
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None:
            config_lib.check_dtype(name, value)
        if value == "float64" and not jax.config.jax_enable_x64:
            raise config_lib.ConfigError(
                f"{name} float64 needs JAX's 64-bit mode, which is off (JAX would compute in float32): call "
                "jax.config.update('jax_enable_x64', True) before any array is made, or set JAX_ENABLE_X64=1")
    hf_config = _read_config(path)
    try:
        return config_lib.from_hf_config(hf_config, dtype=dtype, param_dtype=param_dtype), hf_config
    except (config_lib.ConfigError, TypeError, ValueError) as e:  # a field the type checks do not cover
        raise ConfigFileError(f"{os.path.join(path, 'config.json')}: "
                              f"{e if isinstance(e, config_lib.ConfigError) else f'{type(e).__name__}: {e}'}") from e


def load_pretrained(path: str, dtype: str = "float32", param_dtype: str | None = None,
                    shardings=None, tokenizer: bool = True) -> Pretrained:
    """Loads a local HF model directory (config.json + safetensors [+ tokenizer files]).

    dtype: compute dtype; param_dtype: storage dtype (default: dtype).
    shardings: optional pytree of `jax.sharding.Sharding` matching the parameter tree (or a
      function cfg -> such a tree, or one Sharding for all); each weight goes straight to its
      devices, one tensor at a time (the checkpoint is never whole in host memory).
    """
    cfg, hf_config = _load_config(path, dtype, param_dtype)
    stored = _index_tensors(_weight_files(path))
    if hf_config.get("model_type") in MULTIMODAL:
        hf_config, stored = _text_decoder(path, hf_config, stored)
    try:
        plan = _match({name: s.shape for name, s in stored.items()}, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if callable(shardings):
        shardings = shardings(cfg)
    params = _stream(plan, stored, jnp.dtype(cfg.param_dtype), shardings)
    tok = load_tokenizer(path) if tokenizer else None
    return Pretrained(cfg, params, tok, hf_config)


def _text_decoder(path: str, hf_config: dict, tensors: dict) -> tuple[dict, dict]:
    """A multimodal checkpoint's text decoder: its config.json as a text-only model (what
    `save_pretrained` writes back) and its tensors (any values: arrays, or where they are
    stored) under the decoder's names, the rest dropped with a one-line notice on stderr."""
    spec = MULTIMODAL[hf_config["model_type"]]
    text, dropped = {}, 0
    for name, tensor in tensors.items():
        if name.startswith(spec["ignored_prefixes"]):
            dropped += 1
            continue
        for prefix, replacement in spec["text_prefixes"]:
            if name.startswith(prefix):
                name = replacement + name[len(prefix):]
                break
        text[name] = tensor
    print(f"calm_jax: {path} is a {', '.join(hf_config.get('architectures') or [hf_config['model_type']])}; "
          f"loading its text decoder only ({dropped} vision/projector tensors ignored)", file=sys.stderr)
    text_config = dict(hf_config.get("text_config") or {})
    if "tie_word_embeddings" not in text_config and "tie_word_embeddings" in hf_config:
        text_config["tie_word_embeddings"] = hf_config["tie_word_embeddings"]
    # The multimodal forward never soft-caps its logits (Gemma3ForConditionalGeneration); the
    # text-only copy must not start to.
    text_config.update(model_type=spec["text_model_type"], architectures=[spec["text_architecture"]],
                       final_logit_softcapping=None)
    return text_config, text


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str):
    """The directory's tokenizer via transformers' AutoTokenizer, or None if it has none."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds; the caller needs to know which directory
        from transformers import AutoConfig
        try:  # transformers reads config.json too: its complaint about that file is not the tokenizer's
            AutoConfig.from_pretrained(path)
        except Exception as config_error:
            raise ConfigFileError(f"{os.path.join(path, 'config.json')}: transformers cannot read it: "
                                  f"{type(config_error).__name__}: {config_error}") from e
        raise CheckpointError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e


def params_to_hf(params, cfg: config_lib.ModelConfig) -> dict[str, np.ndarray]:
    """Our parameter tree -> {HF tensor name: numpy array}."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in traverse_util.flatten_dict(params).items()}
    out, used = {}, set()
    for hf, ours, transform in NAME_TABLES[cfg.family]:
        layers = range(cfg.num_layers) if "{i}" in hf else [None]
        for i in layers:
            paths = _paths(ours, i)
            if all(p in flat for p in paths):
                out[hf.format(i=i)] = np.ascontiguousarray(transform.to_hf([flat[p] for p in paths]))
                used.update(paths)
    left = sorted("/".join(p) for p in flat if p not in used)
    if left:
        raise CheckpointError(f"parameters with no HF name: {', '.join(left)}")
    return out


def save_pretrained(model: Pretrained, path: str) -> None:
    """Writes config.json, model.safetensors and the tokenizer, loadable by transformers.

    Written to a temporary directory next to `path`, then moved into place: an
    interrupted save never leaves a half-written model at `path`.
    """
    hf_config = dict(model.hf_config) or config_lib.to_hf_config(model.config)
    hf_config["dtype"] = model.config.param_dtype
    tensors = params_to_hf(model.params, model.config)
    with atomic_directory(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
