"""One Flax decoder covering the Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3,
OLMo-2 and GPT-2 families.

Linen modules, applied to plain parameter pytrees through `forward`. The layer loop is a
Python loop so that callers can *tap* the residual stream after any layer and *modify* it
there (`hooks`): that is where the composition reads the augmenting models and writes
into the anchor.

Tap convention: `taps[i]` is the residual stream after decoder layer i (0-based), after
any hook at layer i has run. Without hooks, `taps[i]` equals HF's `hidden_states[i + 1]`
for i < num_layers - 1; HF's last entry `hidden_states[num_layers]` is the final-normed
stream, i.e. `final_norm(taps[num_layers - 1])`.

Shapes are in tensor names (`h_BxTxD`: axes B, T, D), one letter per axis, the same meaning
everywhere in calm_jax, train/, eval/, benchmarks/ and tests/:
  B  batch rows                      T  positions of the input (the queries)
  S  key slots: a KV cache's slots, or the augmenting positions a cross-attention reads
  D  model width (in the composition: the anchor's)   E  an augmenting model's width
  F  MLP width                       V  vocabulary rows (the logits' width)
  H  query heads    G  key/value heads    R  query heads per key/value head (H = G R)
  K  head size                       C  positions per chunk    Q  chunks
  N  a dataset's examples            P  prompt positions       M  generated (new) tokens
  L  a decoding buffer's positions (prompt + generated)        Z  stop ids
  1  an axis of size 1 kept for broadcasting
A name with no suffix is a scalar, a pytree, or an array whose shape the code does not fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from calm_jax import masks
from calm_jax.config import ModelConfig

Hook = Callable[[jax.Array], jax.Array]

# Rematerialisation of each decoder layer in a backward pass (memory for compute):
#   none: keep what autodiff keeps; full: keep only each layer's input, recompute the rest;
#   dots: keep the weight matmuls' outputs, recompute attention scores and elementwise ops.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}

_ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@struct.dataclass
class KVCache:
    """Per-layer keys/values for S slots, written left to right from `index`."""

    # Per layer k_BxGxSxK / v_BxGxSxK (G = kv heads, K = head dim): head-major, the layout the
    # attention's batched matmuls read, so a decode step never transposes the whole cache.
    k: tuple
    v: tuple
    valid_BxS: jax.Array  # slot holds a real (non-padding) token
    pos_BxS: jax.Array  # RoPE position of the token in each slot
    index: jax.Array  # scalar int32: the next free slot

    @property
    def length(self) -> int:
        return self.valid_BxS.shape[1]


@struct.dataclass
class LMOutput:
    logits_BxTxV: jax.Array | None
    taps: dict  # layer index -> h_BxTxD
    cache: KVCache | None = None


def accum_dtype(dtype) -> jnp.dtype:
    """The dtype softmax, norms, RoPE and logits are computed in: at least float32.

    bf16/fp16 models upcast there, as HF does; a float64 model (the tests' exact
    reference) stays float64 instead of being rounded to float32 midway.
    """
    return jnp.promote_types(dtype, jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty cache of `length` slots. Decoding must not write past `length`."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   valid_BxS=jnp.zeros((batch, length), bool), pos_BxS=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def softcap(x, cap: float | None):
    """cap * tanh(x / cap) (Gemma 2's soft-capping); x itself when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


# Long inputs: queries are taken Q_CHUNK at a time once there are at least Q_CHUNK_FROM of
# them, so that the scores and probabilities held at once are B x H x Q_CHUNK x S instead of
# B x H x T x S (at T = 8192: 16x less), in a backward pass too (each chunk is recomputed,
# not stored). Every query row is computed by the same ops either way.
Q_CHUNK = 512
Q_CHUNK_FROM = 2048


def _attention_rows(q_BxTxGxRxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS, scale: float, logit_cap: float | None):
    s_BxGxRxTxS = jnp.einsum("btgrk,bgsk->bgrts", q_BxTxGxRxK, k_BxGxSxK,
                             preferred_element_type=accum_dtype(q_BxTxGxRxK.dtype)) * scale
    s_BxGxRxTxS = softcap(s_BxGxRxTxS, logit_cap)
    s_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], s_BxGxRxTxS, masks.NEG_INF)
    p_BxGxRxTxS = jax.nn.softmax(s_BxGxRxTxS, axis=-1).astype(v_BxGxSxK.dtype)
    return jnp.einsum("bgrts,bgsk->btgrk", p_BxGxRxTxS, v_BxGxSxK)


def multihead_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS, scale: float, logit_cap: float | None = None,
                        q_chunk: int | None = None):
    """Grouped-query attention with scores and softmax in `accum_dtype`. Returns out_BxTxHxK.

    Keys and values are head-major (k_BxGxSxK), the layout of the KV cache (`KVCache`).

    logit_cap: soft-caps the scaled scores (before the mask), as Gemma 2 does.
    q_chunk: queries per chunk (a checkpointed loop over chunks; see Q_CHUNK); None: Q_CHUNK
      when T >= Q_CHUNK_FROM, else all at once. Same result either way.
    """
    b, t, h, kd = q_BxTxHxK.shape
    g = k_BxGxSxK.shape[1]
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, kd)
    if q_chunk is None:
        q_chunk = Q_CHUNK if t >= Q_CHUNK_FROM else t
    if q_chunk >= t:
        out_BxTxGxRxK = _attention_rows(q_BxTxGxRxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS, scale, logit_cap)
        return out_BxTxGxRxK.reshape(b, t, h, kd)
    n = -(-t // q_chunk)
    pad = n * q_chunk - t  # padded query rows attend nothing (uniform softmax) and are dropped
    q_QxBxCxGxRxK = jnp.pad(q_BxTxGxRxK, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).reshape(
        b, n, q_chunk, g, h // g, kd).swapaxes(0, 1)
    mask_QxBxCxS = jnp.pad(mask_BxTxS, ((0, 0), (0, pad), (0, 0))).reshape(b, n, q_chunk, -1).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(args):
        q_BxCxGxRxK, mask_BxCxS = args
        return _attention_rows(q_BxCxGxRxK, k_BxGxSxK, v_BxGxSxK, mask_BxCxS, scale, logit_cap)

    out_QxBxCxGxRxK = jax.lax.map(chunk, (q_QxBxCxGxRxK, mask_QxBxCxS))
    return out_QxBxCxGxRxK.swapaxes(0, 1).reshape(b, n * q_chunk, h, kd)[:, :t]


def default_inv_freq(dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2, in fp32 as transformers computes it."""
    return 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))


def longrope_inv_freq(cfg: ModelConfig, long: bool) -> np.ndarray:
    """Phi-3 longrope: 1 / (factor_i * theta^(2i/dim)) with the short or the long factors (fp32)."""
    dim = cfg.rotary_dim
    ext = np.asarray(cfg.rope_long_factor if long else cfg.rope_short_factor, np.float32)
    base = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    return (np.float32(1.0) / (ext * base)).astype(np.float32)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies (rotary_dim/2,) of the config's rope_type, computed as transformers does (fp32).

    For longrope: the short set (`longrope_inv_freq` gives either)."""
    if cfg.rope_type == "longrope":
        return longrope_inv_freq(cfg, long=False)
    inv = default_inv_freq(cfg.rotary_dim, cfg.rope_theta)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        old = cfg.rope_original_max_positions
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions_BxT, inv_freq_K2, dtype=jnp.float32, attention_factor: float = 1.0):
    """(cos_BxTxK, sin_BxTxK) for RoPE at integer positions, in `accum_dtype(dtype)`.

    attention_factor multiplies both (longrope's attention scaling)."""
    dtype = accum_dtype(dtype)
    freqs_BxTxK2 = positions_BxT[..., None].astype(dtype) * jnp.asarray(inv_freq_K2, dtype)
    freqs_BxTxK = jnp.concatenate([freqs_BxTxK2, freqs_BxTxK2], axis=-1)
    cos_BxTxK, sin_BxTxK = jnp.cos(freqs_BxTxK), jnp.sin(freqs_BxTxK)
    if attention_factor != 1.0:
        cos_BxTxK, sin_BxTxK = cos_BxTxK * attention_factor, sin_BxTxK * attention_factor
    return cos_BxTxK, sin_BxTxK


def model_rope_tables(cfg: ModelConfig, positions_BxT, mask_BxT):
    """The global layers' (cos, sin) for one forward call.

    longrope picks its short or long factors per call, as transformers does: long when the
    call's sequence length, max position + 1, exceeds rope_original_max_positions. Unlike
    transformers, which takes the max over every position id it is given, only real tokens
    count here (padding slots never switch a batch to the long factors). With a KV cache the
    call is the chunk being written: keys cached by earlier calls keep the factors they were
    rotated with (transformers' cached decoding does the same), so a cached decode crossing
    the threshold differs from one full forward over the whole sequence.
    """
    if cfg.rope_type != "longrope":
        return rope_tables(positions_BxT, rope_inv_freq(cfg), cfg.dtype)
    seq_len = jnp.max(jnp.where(mask_BxT, positions_BxT, -1)) + 1
    inv_K2 = jnp.where(seq_len > cfg.rope_original_max_positions, longrope_inv_freq(cfg, long=True),
                       longrope_inv_freq(cfg, long=False))
    return rope_tables(positions_BxT, inv_K2, cfg.dtype, cfg.rope_attention_factor)


def apply_rope(x_BxTxHxK, cos_BxTxK, sin_BxTxK):
    """RoPE on the first cos.shape[-1] dims of each head (all of them unless partial); the rest pass."""
    rot = cos_BxTxK.shape[-1]
    if rot < x_BxTxHxK.shape[-1]:  # partial rotary (Phi-3's partial_rotary_factor)
        return jnp.concatenate([apply_rope(x_BxTxHxK[..., :rot], cos_BxTxK, sin_BxTxK), x_BxTxHxK[..., rot:]],
                               axis=-1)
    half = x_BxTxHxK.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxHxK[..., half:], x_BxTxHxK[..., :half]], axis=-1)
    dtype = accum_dtype(x_BxTxHxK.dtype)
    out = x_BxTxHxK.astype(dtype) * cos_BxTxK[:, :, None] + rotated.astype(dtype) * sin_BxTxK[:, :, None]
    return out.astype(x_BxTxHxK.dtype)


def _dense(cfg: ModelConfig, features: int, bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)


class RMSNorm(nn.Module):
    eps: float
    offset: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        acc = accum_dtype(x.dtype)
        xa = x.astype(acc)
        y = xa * jax.lax.rsqrt(jnp.mean(xa * xa, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + scale.astype(acc))).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    return RMSNorm(cfg.norm_eps, cfg.norm_offset, cfg.dtype, cfg.param_dtype, name=name)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, rope, mask_BxTxS, kv=None, index=None):
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        q_BxTxHxK = _dense(cfg, cfg.num_heads * cfg.head_dim, cfg.qkv_bias, "q")(x_BxTxD)
        k_BxTxGxK = _dense(cfg, cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "k")(x_BxTxD)
        v_BxTxGxK = _dense(cfg, cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "v")(x_BxTxD)

        def qk_norms(q, k):  # RMSNorm over the last axis (Qwen3: offset 0; Gemma 3: 1 + w)
            return (RMSNorm(cfg.norm_eps, cfg.norm_offset, cfg.dtype, cfg.param_dtype, name="q_norm")(q),
                    RMSNorm(cfg.norm_eps, cfg.norm_offset, cfg.dtype, cfg.param_dtype, name="k_norm")(k))

        if cfg.qk_norm and cfg.qk_norm_over == "proj":  # OLMo-2: over the whole projection
            q_BxTxHxK, k_BxTxGxK = qk_norms(q_BxTxHxK, k_BxTxGxK)
        q_BxTxHxK = q_BxTxHxK.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k_BxTxGxK = k_BxTxGxK.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v_BxTxGxK = v_BxTxGxK.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm and cfg.qk_norm_over == "head":  # over each head's head_dim
            q_BxTxHxK, k_BxTxGxK = qk_norms(q_BxTxHxK, k_BxTxGxK)
        if rope is not None:
            q_BxTxHxK = apply_rope(q_BxTxHxK, *rope)
            k_BxTxGxK = apply_rope(k_BxTxGxK, *rope)
        k_BxGxSxK, v_BxGxSxK = k_BxTxGxK.swapaxes(1, 2), v_BxTxGxK.swapaxes(1, 2)
        new_kv = None
        if kv is not None:  # this call's T keys written into the cache's S slots at `index`
            k_cache, v_cache = kv
            k_BxGxSxK = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxGxSxK.astype(k_cache.dtype), index, axis=2)
            v_BxGxSxK = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxGxSxK.astype(v_cache.dtype), index, axis=2)
            new_kv = (k_BxGxSxK, v_BxGxSxK)
        out_BxTxHxK = multihead_attention(q_BxTxHxK, k_BxGxSxK.astype(q_BxTxHxK.dtype),
                                          v_BxGxSxK.astype(q_BxTxHxK.dtype), mask_BxTxS, cfg.scale,
                                          cfg.attn_softcap)
        out_BxTxD = _dense(cfg, x_BxTxD.shape[-1], cfg.o_bias, "o")(out_BxTxHxK.reshape(b, t, -1))
        return out_BxTxD, new_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg
        act = _ACTIVATIONS[cfg.activation]
        up_BxTxF = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up")(x_BxTxD)
        if cfg.mlp == "gated":
            up_BxTxF = act(_dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate")(x_BxTxD)) * up_BxTxF
        else:
            up_BxTxF = act(up_BxTxF)
        return _dense(cfg, x_BxTxD.shape[-1], cfg.mlp_bias, "down")(up_BxTxF)


class Block(nn.Module):
    """One decoder layer. Norms: ln1/ln2 on the sublayer inputs (cfg.pre_norm) and
    attn_out_norm/mlp_out_norm on their outputs before the residual add (cfg.post_norm)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD, rope, mask_BxTxS, kv=None, index=None):
        cfg = self.cfg
        x_BxTxD = make_norm(cfg, "ln1")(h_BxTxD) if cfg.pre_norm else h_BxTxD
        a_BxTxD, new_kv = Attention(cfg, name="attn")(x_BxTxD, rope, mask_BxTxS, kv, index)
        if cfg.post_norm:
            a_BxTxD = make_norm(cfg, "attn_out_norm")(a_BxTxD)
        h_BxTxD = h_BxTxD + a_BxTxD
        x_BxTxD = make_norm(cfg, "ln2")(h_BxTxD) if cfg.pre_norm else h_BxTxD
        m_BxTxD = MLP(cfg, name="mlp")(x_BxTxD)
        if cfg.post_norm:
            m_BxTxD = make_norm(cfg, "mlp_out_norm")(m_BxTxD)
        return h_BxTxD + m_BxTxD, new_kv


class Decoder(nn.Module):
    """The decoder LM. Use through `forward(cfg, params, ...)`."""

    cfg: ModelConfig
    remat: str = "none"  # a REMAT_POLICIES name

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, mask_BxT, cache: KVCache | None = None,
                 taps: Sequence[int] = (), hooks: Mapping[int, Hook] | None = None, logits: bool = True,
                 segments_BxT=None):
        cfg = self.cfg
        block = Block if self.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[self.remat])
        hooks = hooks or {}
        b, t = tokens_BxT.shape
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        h_BxTxD = embed(tokens_BxT)
        if cfg.embed_scale:
            h_BxTxD = h_BxTxD * jnp.asarray(math.sqrt(cfg.hidden_size), h_BxTxD.dtype)
        if cfg.position == "learned":
            # Clamped: an out-of-range lookup gives NaN, and a padding slot past the table
            # would spread it to every real token through attention's 0 * NaN.
            h_BxTxD = h_BxTxD + nn.Embed(cfg.max_positions, cfg.hidden_size, dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(0.01),
                                         name="pos_embed")(jnp.minimum(positions_BxT, cfg.max_positions - 1))
        rope = local_rope = None
        if cfg.position == "rope":
            rope = model_rope_tables(cfg, positions_BxT, mask_BxT)
            if cfg.rope_local_theta is not None:  # Gemma 3's local layers: plain RoPE, their own base
                local_rope = rope_tables(positions_BxT, default_inv_freq(cfg.rotary_dim, cfg.rope_local_theta),
                                         cfg.dtype)

        if cache is None:
            q_slot_T = k_slot_S = jnp.arange(t)
            k_valid_BxS, k_pos_BxS, index = mask_BxT, positions_BxT, None
        else:
            index = cache.index
            q_slot_T = index + jnp.arange(t)
            k_slot_S = jnp.arange(cache.length)
            k_valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, mask_BxT, index, axis=1)
            k_pos_BxS = jax.lax.dynamic_update_slice_in_dim(cache.pos_BxS, positions_BxT.astype(jnp.int32), index, 1)
        seg = {} if segments_BxT is None else {"q_seg_BxT": segments_BxT, "k_seg_BxS": segments_BxT}
        full_mask = masks.attention_mask(q_slot_T, k_slot_S, k_valid_BxS, **seg)
        window_mask = None
        if cfg.sliding_window is not None:
            window_mask = masks.attention_mask(q_slot_T, k_slot_S, k_valid_BxS, positions_BxT, k_pos_BxS,
                                               cfg.sliding_window, **seg)

        # Without logits, layers after the last tap cannot affect anything returned.
        last = cfg.num_layers if logits else max(list(taps) + list(hooks) + [-1]) + 1
        tapped, new_k, new_v = {}, [], []
        for i in range(cfg.num_layers):
            if i >= last:
                if cache is not None:
                    new_k.append(cache.k[i])
                    new_v.append(cache.v[i])
                continue
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            mask_BxTxS = window_mask if cfg.uses_window(i) else full_mask
            layer_rope = local_rope if cfg.uses_local_rope(i) else rope
            h_BxTxD, layer_kv = block(cfg, name=f"layers_{i}")(h_BxTxD, layer_rope, mask_BxTxS, kv, index)
            if i in hooks:
                h_BxTxD = hooks[i](h_BxTxD)
            if i in taps:
                tapped[i] = h_BxTxD
            if cache is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])

        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid_BxS=k_valid_BxS, pos_BxS=k_pos_BxS,
                                index=index + t)
        logits_BxTxV = None
        if logits:
            h_BxTxD = make_norm(cfg, "final_norm")(h_BxTxD)
            if cfg.tie_embeddings:
                logits_BxTxV = embed.attend(h_BxTxD)
            else:
                logits_BxTxV = _dense(cfg, cfg.vocab_size, False, "lm_head")(h_BxTxD)
            logits_BxTxV = softcap(logits_BxTxV.astype(accum_dtype(logits_BxTxV.dtype)), cfg.logit_softcap)
        return LMOutput(logits_BxTxV=logits_BxTxV, taps=tapped, cache=new_cache)


def forward(cfg: ModelConfig, params, tokens_BxT, mask_BxT=None, positions_BxT=None, cache: KVCache | None = None,
            taps: Sequence[int] = (), hooks: Mapping[int, Hook] | None = None, logits: bool = True,
            remat: str = "none", segments_BxT=None) -> LMOutput:
    """Runs the LM on `tokens_BxT`.

    mask_BxT: True for real tokens, False for padding (default: all real). Left or right
      padding both work; positions default to the count of real tokens before each slot
      (plus those already in `cache`).
    cache: if given, the tokens are written at `cache.index` and attend to everything
      cached; the updated cache is returned in the output.
    taps: layer indices whose output (the residual stream after layer i) to return.
    hooks: {layer i: fn(h_BxTxD) -> h_BxTxD}, applied to the stream after layer i.
    logits: False skips the final norm and head (and all layers after the last tap/hook).
    remat: what a backward pass through each layer recomputes instead of storing
      (REMAT_POLICIES); the values are the same.
    segments_BxT: packed rows (int, one id per example, runs along the row; see
      calm_jax.data.pack): attention stays within a segment and positions restart at each
      (masks.positions_from_segments). Not with a cache.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {', '.join(REMAT_POLICIES)}")
    for i in list(taps) + list(hooks or {}):
        if not 0 <= i < cfg.num_layers:
            raise IndexError(f"layer index {i} out of range for a {cfg.num_layers}-layer {cfg.family} model")
    if mask_BxT is None:
        mask_BxT = jnp.ones(tokens_BxT.shape, bool)
    mask_BxT = mask_BxT.astype(bool)
    if segments_BxT is not None:
        if cache is not None:
            raise ValueError("packed rows (segments_BxT) are for training and scoring, not with a cache")
        if cfg.rope_type == "longrope":
            raise ValueError("longrope picks its factors by a row's length: packed rows are not supported for it")
    if positions_BxT is None:
        if segments_BxT is not None:
            positions_BxT = masks.positions_from_segments(segments_BxT)
        else:
            offset_B = None if cache is None else cache.valid_BxS.sum(-1).astype(jnp.int32)
            positions_BxT = masks.positions_from_mask(mask_BxT, offset_B)
    return Decoder(cfg, remat).apply({"params": params}, tokens_BxT, positions_BxT, mask_BxT, cache,
                                     tuple(taps), hooks, logits, segments_BxT)


def final_norm(cfg: ModelConfig, params, h_BxTxD):
    """The model's final norm on a residual stream: maps `taps[num_layers - 1]` to HF's last hidden state."""
    return make_norm(cfg, "final_norm").apply({"params": params["final_norm"]}, h_BxTxD)


def head_logits(cfg: ModelConfig, params, h_BxTxD):
    """Logits from the last layer's output `taps[num_layers - 1]`: the final norm and the head,
    as `forward` applies them (for losses that compute logits a chunk of positions at a time)."""
    h_BxTxD = final_norm(cfg, params, h_BxTxD)
    if cfg.tie_embeddings:
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        logits_BxTxV = embed.apply({"params": params["embed"]}, h_BxTxD, method=nn.Embed.attend)
    else:
        logits_BxTxV = _dense(cfg, cfg.vocab_size, False, "lm_head").apply({"params": params["lm_head"]}, h_BxTxD)
    return softcap(logits_BxTxV.astype(accum_dtype(logits_BxTxV.dtype)), cfg.logit_softcap)


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Random parameters (normal(0.02) weights), for models trained from scratch."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg).init(rng, tokens, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))["params"]


def param_shapes(cfg: ModelConfig):
    """The parameter tree as ShapeDtypeStructs; nothing is allocated."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


@dataclasses.dataclass(frozen=True)
class PlainLM:
    """The interface generation and evaluation use, for a single LM.

    A composed model (`calm_jax.composition.ComposedLM`) offers the same three members, so
    code written against them takes either:
      - `apply(params, tokens_BxT, mask_BxT=None, cache=None) -> LMOutput`
      - `init_cache(batch, length)` -> the cache pytree `apply` takes and returns
      - `vocab_size`, `max_positions`
    Parameters stay an explicit argument so jitted callers never bake weights in as constants.
    A frozen dataclass: hashable, equal when the configs are, so the model itself is a static
    jit argument (calm_jax.decoding, calm_jax.scoring) and equal models share compiled code.
    """

    cfg: ModelConfig

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def apply(self, params, tokens_BxT, mask_BxT=None, cache=None, *, segments_BxT=None) -> LMOutput:
        return forward(self.cfg, params, tokens_BxT, mask_BxT, cache=cache, segments_BxT=segments_BxT)

    def init_cache(self, batch: int, length: int) -> KVCache:
        return init_cache(self.cfg, batch, length)
