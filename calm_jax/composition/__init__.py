"""CALM: an anchor LM m_B composed with one or more frozen augmenting LMs m_A (paper §3).

For every connection (augmenting layer i -> anchor layer j) the composed model adds
f_cross(f_proj(H_A,i), H_B,j) (calm_jax.composition.cross_attention) to the anchor's residual stream
after layer j; the logits come from the anchor (all its vocab_size rows: the models may pad
their embedding tables differently, see `check_tokenizer_fits`). Only Θ_C (the connections'
parameters) is trainable; both kinds of frozen models are inputs under `jax.lax.stop_gradient`.

The cross-attention is causal by slot and ignores padding, with the same mask helper as
self-attention: anchor slot t sees augmenting slots s <= t that hold real tokens.

Decoding (`ComposedLM` with a `ComposedCache`) has two modes:
  - iterative (the paper's CALM, default): every apply runs the new tokens through every
    augmenting model (each with its own KV cache) and appends the k/v of f_proj of their
    tapped states to the cross-attention cache, so anchor slot t sees augmenting slots
    <= t. Cached decoding equals the uncached `composed_forward` over the whole sequence.
  - encoder (the paper's "m_A as encoder" ablation): only the *first* apply on a fresh
    cache (the prefill) runs the augmenting models; later applies reuse the prompt's cross
    k/v untouched, so every generated position attends to all (real) prompt slots and
    prompt slot t to prompt slots <= t. This equals `composed_forward` over the whole
    sequence with `augment_mask_BxT` = the prompt's mask (augmenting models see only the
    prompt). A static flag on the cache (`augments_done`) records that the prefill ran,
    so the prefill must be its own apply (not the first step of a decode loop).
    `calm_jax.losses.encoder_mode_loss` trains Θ_C under the same semantics (augmenting
    models shown the prompt of each training example only).

Modules, by concern:
  config   CompositionError, CompositionOptions, CompositionConfig (and its checks),
           default_connections: data only, no modules
  cross_attention  CrossAttention (one connection: f_proj + f_cross), connection_module
  vocab    check_vocabularies (the shared-tokenizer check), check_tokenizer_fits (its every id
           in every model's embedding table, whatever padding each has), num_token_ids
  theta    init_theta, param_count, describe
  forward  ComposedCache, init_composed_cache, composed_forward, ComposedLM
The losses that train Θ_C are in calm_jax.losses.
"""

from calm_jax.composition.config import (CompositionConfig, CompositionError, CompositionOptions, Pair,
                                         default_connections)
from calm_jax.composition.cross_attention import CrossAttention, connection_module
from calm_jax.composition.forward import ComposedCache, ComposedLM, composed_forward, init_composed_cache
from calm_jax.composition.theta import describe, init_theta, param_count
from calm_jax.composition.vocab import check_tokenizer_fits, check_vocabularies, num_token_ids

__all__ = [
    "ComposedCache", "ComposedLM", "CompositionConfig", "CompositionError", "CompositionOptions", "CrossAttention",
    "Pair", "check_tokenizer_fits", "check_vocabularies", "composed_forward", "connection_module",
    "default_connections", "describe",
    "init_composed_cache", "init_theta", "num_token_ids", "param_count",
]
