"""calm-jax: CALM (Composition to Augment Language Models) in JAX/Flax."""

from calm_jax.config import ConfigError, ModelConfig, from_hf_config, to_hf_config
from calm_jax.loading import CheckpointError, Pretrained, load_pretrained, load_tokenizer, save_pretrained
from calm_jax.model import KVCache, LMOutput, PlainLM, forward, init_cache, init_params, param_shapes

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "LMOutput", "ModelConfig", "PlainLM", "Pretrained", "forward",
    "from_hf_config", "init_cache", "init_params", "load_pretrained", "load_tokenizer", "param_shapes",
    "save_pretrained", "to_hf_config",
]
