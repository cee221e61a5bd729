"""Model configuration: one frozen dataclass for every supported decoder family.

The Hugging Face families differ only in a handful of switches (norm kind, MLP kind,
biases, position encoding, ...). `from_hf_config` reads a `config.json` dict into those
switches through a per-family table; `to_hf_config` writes one back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")
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
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
    # Positions: "rope" or "learned" (GPT-2).
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size).
    tie_embeddings: bool = False
    sliding_window: int | None = None
    # Per layer: True where the layer uses the sliding window (Mistral: all; Qwen2: some).
    sliding_layers: tuple[bool, ...] = ()
    attn_scale: float | None = None  # None: head_dim ** -0.5
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype

    def __post_init__(self):
        check_dtype("dtype", self.dtype)
        check_dtype("param_dtype", self.param_dtype)
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.activation!r} "
                              f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"unsupported rope_type {self.rope_type!r} (supported: default, linear, llama3)")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ConfigError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def uses_window(self, layer: int) -> bool:
        if self.sliding_window is None:
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


def _llama_like(hf: Mapping[str, Any], family: str) -> dict:
    hidden = int(_req(hf, "hidden_size"))
    heads = int(_req(hf, "num_attention_heads"))
    out = dict(
        vocab_size=int(_req(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_req(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        intermediate_size=int(_req(hf, "intermediate_size")),
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


_FAMILY_READERS = {
    "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
    "qwen3": _llama_like, "gemma": _llama_like, "gpt2": _gpt2,
}


def from_hf_config(hf: Mapping[str, Any], dtype: str = "float32", param_dtype: str | None = None) -> ModelConfig:
    """Reads a Hugging Face `config.json` dict. Raises ConfigError naming what is wrong."""
    family = hf.get("model_type")
    if family is None:
        raise ConfigError("config.json is missing required field 'model_type'")
    if family not in _FAMILY_READERS:
        raise ConfigError(
            f"unsupported model_type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    fields = _FAMILY_READERS[family](hf, family)
    return ModelConfig(family=family, dtype=dtype, param_dtype=param_dtype or dtype, **fields)


def to_hf_config(cfg: ModelConfig, **extra: Any) -> dict:
    """A `config.json` dict for a config built here (Llama-style or GPT-2 models)."""
    if cfg.family == "gpt2":
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                  n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                  n_inner=cfg.intermediate_size, n_positions=cfg.max_positions,
                  layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
                  tie_word_embeddings=cfg.tie_embeddings)
    elif cfg.family == "llama":
        rope = dict(rope_theta=cfg.rope_theta, rope_type=cfg.rope_type)
        if cfg.rope_type != "default":
            rope["factor"] = cfg.rope_factor
        if cfg.rope_type == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                        original_max_position_embeddings=cfg.rope_original_max_positions)
        hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                  hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
                  hidden_act=cfg.activation, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                  tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope)
    else:
        raise ConfigError(f"writing a new config.json is supported for llama and gpt2, not {cfg.family!r}; "
                          "models loaded from a checkpoint keep their original config.json")
    hf["dtype"] = cfg.param_dtype
    hf.update(extra)
    return hf
