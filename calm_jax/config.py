"""Model configuration: one frozen dataclass for every supported decoder family.

The Hugging Face families differ only in a handful of switches (norm kind, MLP kind,
biases, position encoding, ...). `from_hf_config` reads a `config.json` dict into those
switches through a per-family table; `to_hf_config` writes one back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from calm_jax.config_fields import field_problem

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                      "gpt2")
# config.json model_types read: the families, plus multimodal wrappers whose text decoder is one
# ("gemma3": a Gemma3ForConditionalGeneration; its text_config is a gemma3_text decoder).
SUPPORTED_MODEL_TYPES = SUPPORTED_FAMILIES + ("gemma3",)
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# The MLP activations calm_jax.model implements (HF names).
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
# Compute and storage dtypes, by their numpy names.
DTYPES = ("float32", "bfloat16", "float16", "float64")


class ConfigError(ValueError):
    """A config.json that cannot be turned into a ModelConfig."""


def check_dtype(name: str, value) -> None:
    """Raises ConfigError unless `value` is one of DTYPES (`name` says which setting it is)."""
    if value not in DTYPES:
        raise ConfigError(f"{name} {value!r} is not a dtype this package computes or stores in; "
                          f"use one of {', '.join(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM. Hashable, so it can be a static jit argument."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int = 2048
    # Norms: "rms" (x * rsqrt(mean x^2)) or "layer" (LayerNorm with bias).
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma stores RMSNorm scale as (weight - 1).
    # MLP: "gated" (down(act(gate x) * up x)) or "plain" (down(act(up x))).
    mlp: str = "gated"
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on q and k before RoPE (Qwen3, Gemma 3, OLMo-2), with norm_offset
    # What the q/k norm normalises over: "head" (each head's head_dim: Qwen3, Gemma 3) or
    # "proj" (the whole projection, before the head split: OLMo-2).
    qk_norm_over: str = "head"
    # Where the layer norms sit. pre_norm: ln1/ln2 on each sublayer's input (all but OLMo-2).
    # post_norm: a norm on each sublayer's output before the residual add (Gemma 2/3: both; OLMo-2: only).
    pre_norm: bool = True
    post_norm: bool = False
    # Positions: "rope" or "learned" (GPT-2).
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    # llama3: the pretraining length; longrope: the length above which the long factors apply.
    rope_original_max_positions: int = 8192
    # longrope (Phi-3): per-frequency divisors of the inverse frequencies, the short set while a
    # forward call's sequence (max real position + 1) is <= rope_original_max_positions, the long
    # set above; cos and sin are multiplied by rope_attention_factor either way (rope_factor is
    # the file's scaling factor, kept to be written back).
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0
    # RoPE rotates the first int(head_dim * partial_rotary_factor) dims of each head (Phi-3).
    partial_rotary_factor: float = 1.0
    # Gemma 3: sliding-window ("local") layers use plain RoPE with this base; rope_theta and the
    # rope scaling apply to the global layers only. None: every layer uses the same RoPE.
    rope_local_theta: float | None = None
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size).
    tie_embeddings: bool = False
    sliding_window: int | None = None
    # Per layer: True where the layer uses the sliding window (Mistral: all; Qwen2: some).
    sliding_layers: tuple[bool, ...] = ()
    attn_scale: float | None = None  # None: head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5)
    # tanh soft-capping, c * tanh(x / c): of the attention scores (after the scale, before the
    # mask) and of the final logits (Gemma 2). None: off.
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype

    def __post_init__(self):
        check_dtype("dtype", self.dtype)
        check_dtype("param_dtype", self.param_dtype)
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.activation!r} "
                              f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope_type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ConfigError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if self.qk_norm_over not in ("head", "proj"):
            raise ConfigError(f"qk_norm_over must be 'head' or 'proj', not {self.qk_norm_over!r}")
        if self.partial_rotary_factor != 1.0 and (not 0 < self.partial_rotary_factor < 1 or self.rotary_dim % 2):
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and "
                              f"rotate an even number of the {self.head_dim} head dims")
        if self.rope_type == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                if len(getattr(self, name)) != self.rotary_dim // 2:
                    raise ConfigError(f"longrope {name} has {len(getattr(self, name))} entries; "
                                      f"expected rotary_dim / 2 = {self.rotary_dim // 2}")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (head_dim unless partial_rotary_factor < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def uses_window(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.sliding_layers[layer] if self.sliding_layers else True

    def uses_local_rope(self, layer: int) -> bool:
        """Gemma 3: the layer is a sliding-attention ("local") layer with its own RoPE base."""
        if self.rope_local_theta is None:
            return False
        return self.sliding_layers[layer] if self.sliding_layers else True

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _req(hf: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in hf and hf[k] is not None:
            return hf[k]
    raise ConfigError(f"config.json is missing required field {keys[0]!r}"
                      + (f" (or {', '.join(map(repr, keys[1:]))})" if len(keys) > 1 else ""))


def _rope(hf: Mapping[str, Any]) -> dict:
    # transformers >= 5 nests everything under rope_parameters; older configs use
    # rope_theta + rope_scaling at the top level.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    if rope_type == "longrope":
        raise ConfigError("rope_type 'longrope' is supported for phi3 only")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(_req(params, "factor"))
    if rope_type == "llama3":
        out.update(
            rope_low_freq_factor=float(_req(params, "low_freq_factor")),
            rope_high_freq_factor=float(_req(params, "high_freq_factor")),
            rope_original_max_positions=int(_req(params, "original_max_position_embeddings")),
        )
    return out


def _shape(hf: Mapping[str, Any]) -> dict:
    """The decoder's sizes, as every Llama-like config.json spells them."""
    hidden = int(_req(hf, "hidden_size"))
    heads = int(_req(hf, "num_attention_heads"))
    return dict(
        vocab_size=int(_req(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_req(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        intermediate_size=int(_req(hf, "intermediate_size")),
    )


def _llama_like(hf: Mapping[str, Any], family: str) -> dict:
    out = dict(
        **_shape(hf),
        max_positions=int(hf.get("max_position_embeddings") or 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_rope(hf),
    )
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if family == "qwen2":
        out["qkv_bias"], out["o_bias"] = True, False
    if family == "qwen3":
        out["qk_norm"] = True
    if family == "gemma":
        out.update(norm_offset=1.0, embed_scale=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        if out["activation"] == "gelu":  # Gemma checkpoints say "gelu" but mean the tanh form.
            out["activation"] = "gelu_pytorch_tanh"
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            window = None
    if window is not None:
        out["sliding_window"] = int(window)
        if layer_types:
            out["sliding_layers"] = tuple(t == "sliding_attention" for t in layer_types)
        elif family in ("qwen2", "qwen3"):
            # Older Qwen configs carry no layer_types: transformers then windows the layers
            # from max_window_layers on (default 28).
            first = int(hf.get("max_window_layers", 28))
            out["sliding_layers"] = tuple(i >= first for i in range(out["num_layers"]))
    return out


def _gpt2(hf: Mapping[str, Any], family: str) -> dict:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ConfigError(f"GPT-2 option {flag}=true is not supported")
    hidden = int(_req(hf, "n_embd", "hidden_size"))
    heads = int(_req(hf, "n_head", "num_attention_heads"))
    return dict(
        vocab_size=int(_req(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_req(hf, "n_layer", "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        max_positions=int(_req(hf, "n_positions", "max_position_embeddings")),
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp="plain",
        activation=hf.get("activation_function", "gelu_new"),
        qkv_bias=True, o_bias=True, mlp_bias=True,
        position="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
    )


# transformers' config-class defaults for the keys the readers below use, for files that leave
# them out (transformers then takes the class default). Gemma 3 gets its sizes too: the Hub's
# Gemma3ForConditionalGeneration files carry only a few text_config keys.
_HF_DEFAULTS = {
    "gemma2": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None, sliding_window_pattern=6),
    "phi3": dict(hidden_act="silu", max_position_embeddings=4096, original_max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None),
    "olmo2": dict(hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  attention_bias=False),
}
_GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta


def _sizes(hf: Mapping[str, Any], activation_key: str) -> dict:
    return dict(
        **_shape(hf),
        max_positions=int(hf["max_position_embeddings"]),
        norm_eps=float(hf["rms_norm_eps"]),
        activation=hf[activation_key],
        tie_embeddings=bool(hf["tie_word_embeddings"]),
    )


def _no_bidirectional(hf: Mapping[str, Any], family: str) -> None:
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{family} with use_bidirectional_attention=true is an encoder, not a causal LM; "
                          "not supported")


def _gemma2(hf: Mapping[str, Any], family: str) -> dict:
    hf = {**_HF_DEFAULTS["gemma2"], **hf}
    _no_bidirectional(hf, family)
    out = _sizes(hf, "hidden_activation")
    bias = bool(hf["attention_bias"])
    n = out["num_layers"]
    # transformers < 4.47 wrote no layer_types: the even layers slide (0, 2, ...).
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    out.update(
        norm_offset=1.0, embed_scale=True, post_norm=True, qkv_bias=bias, o_bias=bias,
        attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        attn_softcap=_opt_float(hf["attn_logit_softcapping"]),
        logit_softcap=_opt_float(hf["final_logit_softcapping"]),
        sliding_window=None if hf["sliding_window"] is None else int(hf["sliding_window"]),
        sliding_layers=_layer_types(layer_types, n),
        **_rope(hf),
    )
    return out


def _gemma3(hf: Mapping[str, Any], family: str) -> dict:
    """Gemma 3's text decoder: Gemma 2's layout with q/k norms, local/global RoPE, no attention soft-cap.

    transformers' Gemma 3 attention never soft-caps the scores (attn_logit_softcapping is read
    by the config and then ignored), so neither do we.
    """
    if family == "gemma3":  # Gemma3ForConditionalGeneration: only its text decoder
        text = dict(hf.get("text_config") or {})
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in hf:
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        out = _gemma3(text, "gemma3_text")
        # Gemma3ForConditionalGeneration's forward never soft-caps its logits either.
        out["logit_softcap"] = None
        return out
    hf = {**_HF_DEFAULTS["gemma3_text"], **hf}
    _no_bidirectional(hf, family)
    out = _sizes(hf, "hidden_activation")
    bias = bool(hf["attention_bias"])
    n = out["num_layers"]
    pattern = int(hf["sliding_window_pattern"])  # before layer_types (transformers < 4.53): every pattern-th is global
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                            for i in range(n)]
    # RoPE: transformers >= 5 nests it per layer type under rope_parameters; older files have
    # rope_theta (+ rope_scaling, global layers only) and rope_local_base_freq.
    params = hf.get("rope_parameters")
    if params and not {"full_attention", "sliding_attention"} & set(params):
        raise ConfigError("gemma3_text rope_parameters must be keyed by layer type "
                          "('full_attention', 'sliding_attention')")
    params = {k: dict(v) for k, v in (params or {}).items() if v is not None}
    full = params.get("full_attention", {"rope_type": "default"})
    local = params.get("sliding_attention", {"rope_type": "default"})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", _GEMMA3_THETA["full_attention"]))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", _GEMMA3_THETA["sliding_attention"]))
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ConfigError(f"gemma3_text sliding-attention RoPE of type {local.get('rope_type', local.get('type'))!r} "
                          "is not supported (only 'default')")
    out.update(
        norm_offset=1.0, embed_scale=True, post_norm=True, qk_norm=True, qkv_bias=bias, o_bias=bias,
        attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        logit_softcap=_opt_float(hf["final_logit_softcapping"]),
        sliding_window=None if hf["sliding_window"] is None else int(hf["sliding_window"]),
        sliding_layers=_layer_types(layer_types, n),
        rope_local_theta=float(local["rope_theta"]),
        **_rope({"rope_parameters": full}),
    )
    return out


def _phi3(hf: Mapping[str, Any], family: str) -> dict:
    hf = {**_HF_DEFAULTS["phi3"], **hf}
    out = _sizes(hf, "hidden_act")
    # As Phi3Config reads them: rope_scaling (older files) wins over rope_parameters.
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("su", "yarn"):  # what transformers maps these old Phi-3 names to
        rope_type = "longrope"
    if rope_type not in ("default", "longrope"):
        raise ConfigError(f"phi3 rope_type {rope_type!r} is not supported (supported: default, longrope)")
    out.update(
        rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        partial_rotary_factor=float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        sliding_window=None if hf["sliding_window"] is None else int(hf["sliding_window"]),
    )
    if rope_type == "longrope":
        # Phi-3's top-level original_max_position_embeddings overrides the one in the rope dict.
        original = int(hf["original_max_position_embeddings"])
        factor = params.get("factor")
        factor = float(factor) if factor is not None else out["max_positions"] / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        out.update(rope_original_max_positions=original, rope_attention_factor=float(attention),
                   rope_factor=factor,
                   rope_short_factor=tuple(float(x) for x in _req(params, "short_factor")),
                   rope_long_factor=tuple(float(x) for x in _req(params, "long_factor")))
    return out


def _olmo2(hf: Mapping[str, Any], family: str) -> dict:
    hf = {**_HF_DEFAULTS["olmo2"], **hf}
    out = _sizes(hf, "hidden_act")
    bias = bool(hf["attention_bias"])
    out.update(pre_norm=False, post_norm=True, qk_norm=True, qk_norm_over="proj", qkv_bias=bias, o_bias=bias,
               **_rope(hf))
    return out


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


def _layer_types(layer_types, n: int) -> tuple[bool, ...]:
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConfigError(f"unsupported layer_types {', '.join(map(repr, unknown))} "
                          "(supported: sliding_attention, full_attention)")
    if len(layer_types) != n:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for {n} layers")
    return tuple(t == "sliding_attention" for t in layer_types)


_FAMILY_READERS = {
    "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
    "qwen3": _llama_like, "gemma": _llama_like, "gpt2": _gpt2,
    "gemma2": _gemma2, "gemma3_text": _gemma3, "gemma3": _gemma3, "phi3": _phi3, "olmo2": _olmo2,
}
# model_type -> the family of the decoder it is read as.
_FAMILY_OF = {"gemma3": "gemma3_text"}


def from_hf_config(hf: Mapping[str, Any], dtype: str = "float32", param_dtype: str | None = None) -> ModelConfig:
    """Reads a Hugging Face `config.json` dict. Raises ConfigError naming what is wrong."""
    if problem := field_problem(hf):  # every field's type first (calm_jax.config_fields)
        raise ConfigError(problem)
    family = _req(hf, "model_type")
    if family not in _FAMILY_READERS:
        raise ConfigError(f"unsupported model_type {family!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    fields = _FAMILY_READERS[family](hf, family)
    return ModelConfig(family=_FAMILY_OF.get(family, family), dtype=dtype, param_dtype=param_dtype or dtype,
                       **fields)


def _rope_dict(cfg: ModelConfig) -> dict:
    rope = dict(rope_theta=cfg.rope_theta, rope_type=cfg.rope_type)
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_positions)
    return rope


_ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                  "olmo2": "Olmo2ForCausalLM"}


def _query_pre_attn_scalar(cfg: ModelConfig) -> int:
    # transformers stores the Gemma query scale as an integer q (scale = q ** -0.5).
    q = cfg.scale ** -2
    if abs(q - round(q)) > 1e-6 * q:
        raise ConfigError(f"attention scale {cfg.scale} is not query_pre_attn_scalar ** -0.5 for an integer "
                          "query_pre_attn_scalar, which is all a Gemma config.json can express")
    return int(round(q))


def _new_family_config(cfg: ModelConfig) -> dict:
    hf = dict(model_type=cfg.family, architectures=[_ARCHITECTURES[cfg.family]], vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              # No tokenizer is known here (pass the ids as `extra`); the config classes'
              # defaults (Phi-3's pad id 32000) would not even fit a small vocabulary.
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads or cfg.family.startswith("gemma"):
        hf["head_dim"] = cfg.head_dim
    sliding = [cfg.sliding_layers[i] if cfg.sliding_layers else True for i in range(cfg.num_layers)]
    layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    if cfg.family in ("gemma2", "gemma3_text"):
        hf.update(hidden_activation=cfg.activation, attention_bias=cfg.qkv_bias,
                  query_pre_attn_scalar=_query_pre_attn_scalar(cfg), sliding_window=cfg.sliding_window,
                  layer_types=layer_types, final_logit_softcapping=cfg.logit_softcap,
                  attn_logit_softcapping=cfg.attn_softcap)
        if cfg.family == "gemma2":
            hf["rope_parameters"] = _rope_dict(cfg)
        else:
            hf["rope_parameters"] = dict(
                full_attention=_rope_dict(cfg),
                sliding_attention=dict(rope_type="default",
                                       rope_theta=cfg.rope_theta if cfg.rope_local_theta is None
                                       else cfg.rope_local_theta))
    elif cfg.family == "phi3":
        rope = dict(rope_type=cfg.rope_type, rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.partial_rotary_factor)
        if cfg.rope_type == "longrope":
            rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
                        factor=cfg.rope_factor, attention_factor=cfg.rope_attention_factor,
                        original_max_position_embeddings=cfg.rope_original_max_positions)
            hf["original_max_position_embeddings"] = cfg.rope_original_max_positions
        hf.update(hidden_act=cfg.activation, sliding_window=cfg.sliding_window, rope_parameters=rope)
    else:  # olmo2
        hf.update(hidden_act=cfg.activation, attention_bias=cfg.qkv_bias, rope_parameters=_rope_dict(cfg))
    # Nothing the file cannot say: it must read back as this very config.
    back = from_hf_config(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    differ = [f.name for f in dataclasses.fields(cfg) if getattr(back, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ConfigError(f"this {cfg.family} config cannot be written as a {cfg.family} config.json: "
                          f"{', '.join(differ)} differ from what the family's config.json can express")
    return hf


def to_hf_config(cfg: ModelConfig, **extra: Any) -> dict:
    """A `config.json` dict for a config built here (Llama-style, GPT-2, Gemma 2/3, Phi-3, OLMo-2 models)."""
    if cfg.family == "gpt2":
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                  n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                  n_inner=cfg.intermediate_size, n_positions=cfg.max_positions,
                  layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
                  tie_word_embeddings=cfg.tie_embeddings)
    elif cfg.family == "llama":
        hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                  hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
                  hidden_act=cfg.activation, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                  tie_word_embeddings=cfg.tie_embeddings, rope_parameters=_rope_dict(cfg))
    elif cfg.family in _ARCHITECTURES:
        hf = _new_family_config(cfg)
    else:
        raise ConfigError(f"writing a new config.json is supported for llama, gpt2, {', '.join(_ARCHITECTURES)}, "
                          f"not {cfg.family!r}; models loaded from a checkpoint keep their original config.json")
    hf["dtype"] = cfg.param_dtype
    hf.update(extra)
    return hf
