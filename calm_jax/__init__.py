"""calm-jax: CALM (Composition to Augment Language Models) in JAX/Flax.

The public API in one place; each name lives in the module of its concept:
config (ModelConfig), model (the Flax decoder), loading (HF checkpoints), composition
(Θ_C and the composed model), loaded (a model or a composition set up from its
directories, checked and ready to generate and score: `load_model`, `load_composition`),
losses / train_step / trainer / sharding / checkpoint (training), records (JSON records
checked on reuse), decoding (generation), scoring and evaluation / metrics
(generate-and-score), experiment (a CALM study on any task; the key-value experiment in
train/kv_arithmetic/ is one).
"""

from calm_jax.composition import (ComposedCache, ComposedLM, CompositionConfig, CompositionError, CompositionOptions,
                                  CrossAttention, check_tokenizer_fits, check_vocabularies, composed_forward,
                                  default_connections, describe, init_composed_cache, init_theta, param_count)
from calm_jax.config import ConfigError, ModelConfig, from_hf_config, to_hf_config
from calm_jax.decoding import GenerationError, Sampling, generate
from calm_jax.loaded import LoadedModel, Wiring, check_composition, check_model, load_composition, load_model
from calm_jax.loading import CheckpointError, Pretrained, load_pretrained, load_tokenizer, save_pretrained
from calm_jax.model import (KVCache, LMOutput, PlainLM, final_norm, forward, init_cache, init_params,
                            param_shapes)
from calm_jax.scoring import loglik

__all__ = [
    "CheckpointError", "ComposedCache", "ComposedLM", "CompositionConfig", "CompositionError", "CompositionOptions",
    "ConfigError", "CrossAttention", "GenerationError", "KVCache", "LMOutput", "LoadedModel", "ModelConfig", "PlainLM",
    "Pretrained", "Sampling", "Wiring", "check_composition", "check_model", "load_composition", "load_model",
    "check_tokenizer_fits", "check_vocabularies", "composed_forward", "default_connections", "describe",
    "final_norm", "forward", "from_hf_config", "generate", "init_cache", "init_composed_cache", "init_params",
    "init_theta", "load_pretrained", "load_tokenizer", "loglik", "param_count", "param_shapes", "save_pretrained",
    "to_hf_config",
]
