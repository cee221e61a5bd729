"""The types of the config.json fields `calm_jax.config` reads, checked before any is read.

`field_problem` is the one reader's gate (called by `config.from_hf_config`, so by
`loading.load_config` and with it train.plan, train.compose and every eval script): a field of
the wrong type is a ConfigError naming the field (nested ones as `rope_scaling.factor`), the
type expected and the value found, instead of a number read from a string ("4") or a
TypeError from deep inside a reader. JSON null is accepted everywhere (Hugging Face writes it
for "not set"; the readers take their defaults or say the field is missing). Fields the
readers do not use are not checked.
"""

from __future__ import annotations

import json
import numbers
from typing import Any, Mapping

_INT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
        "sliding_window", "max_window_layers", "sliding_window_pattern", "original_max_position_embeddings")
_NUMBER = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta", "rope_local_base_freq", "partial_rotary_factor",
           "factor", "low_freq_factor", "high_freq_factor", "attention_factor", "attn_logit_softcapping",
           "final_logit_softcapping", "query_pre_attn_scalar")
_BOOL = ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window", "scale_attn_weights",
         "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "use_bidirectional_attention")
_STR = ("model_type", "hidden_act", "hidden_activation", "activation_function", "rope_type", "type")
_NESTED = ("rope_parameters", "rope_scaling", "text_config", "full_attention", "sliding_attention")

# field -> (what the message calls the expected type, the test)
KINDS: dict[str, tuple[str, Any]] = {
    **{k: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)) for k in _INT},
    **{k: ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)) for k in _NUMBER},
    **{k: ("true or false", lambda v: isinstance(v, bool)) for k in _BOOL},
    **{k: ("a string", lambda v: isinstance(v, str)) for k in _STR},
    **{k: ("a JSON object", lambda v: isinstance(v, dict)) for k in _NESTED},
    "layer_types": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    **{k: ("a list of numbers", lambda v: isinstance(v, list)
           and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v))
       for k in ("short_factor", "long_factor")},
}


def field_problem(hf: Mapping[str, Any], prefix: str = "") -> str | None:
    """What is wrong with the first field of `hf` (or of its nested objects) whose value is not of
    its type (see the module docstring), or None."""
    for key, value in hf.items():
        if key not in KINDS or value is None:
            continue
        expected, ok = KINDS[key]
        if not ok(value):
            shown = json.dumps(value) if not isinstance(value, str) else repr(value)
            return f"field '{prefix}{key}' must be {expected}, found {type(value).__name__} {shown[:60]}"
        if key in _NESTED:
            problem = field_problem(value, f"{prefix}{key}.")
            if problem:
                return problem
    return None
