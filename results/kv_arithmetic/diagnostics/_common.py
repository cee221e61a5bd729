"""Shared helpers of the diagnostic scripts (teacher-forced loss and exact match on padded batches)."""
import functools, os, sys, time
import numpy as np, jax, jax.numpy as jnp, optax
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..')))
from calm_jax import kv_task, data, model
from calm_jax.config import ModelConfig

import os
def cfg_for(D, L, H, V=47, F=None):
    if os.environ.get("FAM") == "gpt2":
        return ModelConfig(family="gpt2", vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=H,
                           head_dim=D//H, intermediate_size=F or 4*D, max_positions=64, norm="layer", norm_eps=1e-5,
                           mlp="plain", activation="gelu_new", qkv_bias=True, o_bias=True, mlp_bias=True,
                           position="learned", tie_embeddings=True)
    return ModelConfig(family="llama", vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=H,
                       head_dim=D//H, intermediate_size=F or 4*D, max_positions=64)

def batchify(tok, recs, T):
    enc = [data.encode(tok, r, append_eos=True) for r in recs]
    toks, mask, flags = data.pad_batch([e[0] for e in enc], T, tok.pad_token_id, flags=[e[1] for e in enc])
    return toks, mask, flags

def lm_loss(logits, toks, flags):
    lp = jax.nn.log_softmax(logits[:, :-1])
    tgt = toks[:, 1:]; f = flags[:, 1:]
    nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    return (nll * f).sum() / f.sum()

def exact(logits, toks, flags):
    pred = logits[:, :-1].argmax(-1); f = flags[:, 1:]
    ok = (pred == toks[:, 1:]) | ~f
    return ok.all(-1)
