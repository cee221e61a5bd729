"""One CALM connection: f_proj and the multi-head cross-attention f_cross (paper §3).

    f_cross(f_proj(H_A,i), H_B,j) = gate * W^O · MHA(q = H_B,j W^Q, k = P W^K, v = P W^V),
    P = f_proj(H_A,i) = H_A,i W^P + b^P

where H_A,i is the augmenting model's layer-i output (D_A wide) and H_B,j the anchor's
layer-j output (D_B wide). Heads and head size come from the CompositionConfig (default:
the anchor's heads, D_B / heads), the options beyond the paper from its
`CompositionOptions` (`options`). W^Q, W^K, W^V, W^O carry no bias, as in the paper's
formula; only f_proj has one.

The module has two entry points so the decoding cache can keep k/v per slot:
`keys_values` (augmenting side, run once per token) and `attend` (anchor side).
`connection_module(ccfg)` builds it from a CompositionConfig (the config holds data only).

Parameters of one connection (a plain dict, the leaves of Θ_C):
  proj:       {kernel: D_A x D_B, bias: D_B}
  q, k, v:    {kernel: D_B x (H*K)}
  o:          {kernel: (H*K) x D_B}      zeros with options.zero_init_out
  query_norm: {scale: D_B}               only with options.query_norm (RMSNorm on H_B,j before W^Q)
  gate:       scalar g, output scaled by tanh(g); only with options.gate; g starts at
              GATE_INIT, so tanh(g) = 0.76 and the gate is not a no-op at init.

With options.cross_rope (not in the paper), q and k are rotated by RoPE (base `rope_theta`)
at their tokens' positions, as in self-attention, so the scores can depend on the
distance between the anchor token and the augmenting token. Both models read the same
tokens, so "the augmenting state at my own position" is then easy to address; without
it, a model whose residual stream carries no absolute position (RoPE models) can only
address augmenting states by content. No new parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from calm_jax.composition.config import CompositionConfig, CompositionOptions
from calm_jax.model import RMSNorm, apply_rope, default_inv_freq, multihead_attention, rope_tables

GATE_INIT = 1.0
QUERY_NORM_EPS = 1e-6


class CrossAttention(nn.Module):
    features: int  # D_B: the anchor's width, f_proj's output width
    num_heads: int
    head_dim: int
    options: CompositionOptions
    dtype: str = "float32"
    param_dtype: str = "float32"
    rope_theta: float = 10000.0  # the RoPE base with options.cross_rope

    def setup(self):
        def dense(features, bias=False, init=nn.initializers.lecun_normal()):
            return nn.Dense(features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=init)

        inner = self.num_heads * self.head_dim
        self.proj = dense(self.features, bias=True)
        self.q, self.k, self.v = dense(inner), dense(inner), dense(inner)
        self.o = dense(self.features, init=nn.initializers.zeros if self.options.zero_init_out
                       else nn.initializers.lecun_normal())
        if self.options.query_norm:
            self.query_norm = RMSNorm(QUERY_NORM_EPS, 0.0, self.dtype, self.param_dtype)
        if self.options.gate:
            self.gate = self.param("gate", nn.initializers.constant(GATE_INIT), (), self.param_dtype)

    def _rotate(self, x_BxTxHxK, pos_BxT):
        if not self.options.cross_rope:  # no positions in the cross-attention (the paper)
            return x_BxTxHxK
        if pos_BxT is None:
            raise ValueError("cross-attention with RoPE needs the tokens' positions")
        return apply_rope(x_BxTxHxK, *rope_tables(pos_BxT, default_inv_freq(self.head_dim, self.rope_theta),
                                                    self.dtype))

    def keys_values(self, h_BxSxE, pos_BxS=None):
        """Augmenting layer output h_BxSxE (E = D_A) -> (k_BxHxSxK, v_BxHxSxK) of f_proj(h),
        head-major as the self-attention cache keeps them (calm_jax.model.KVCache).

        pos_BxS: the tokens' positions (used with options.cross_rope only).
        """
        b, s, _ = h_BxSxE.shape
        p_BxSxD = self.proj(h_BxSxE.astype(self.dtype))
        k_BxSxHxK = self._rotate(self.k(p_BxSxD).reshape(b, s, self.num_heads, self.head_dim), pos_BxS)
        v_BxSxHxK = self.v(p_BxSxD).reshape(b, s, self.num_heads, self.head_dim)
        return k_BxSxHxK.swapaxes(1, 2), v_BxSxHxK.swapaxes(1, 2)

    def attend(self, h_BxTxD, k_BxHxSxK, v_BxHxSxK, mask_BxTxS, pos_BxT=None):
        """The term added to the anchor stream h_BxTxD. Rows with no allowed key give exactly 0."""
        b, t, _ = h_BxTxD.shape
        x_BxTxD = h_BxTxD.astype(self.dtype)
        if self.options.query_norm:
            x_BxTxD = self.query_norm(x_BxTxD)
        q_BxTxHxK = self._rotate(self.q(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim), pos_BxT)
        out_BxTxHxK = multihead_attention(q_BxTxHxK, k_BxHxSxK.astype(self.dtype), v_BxHxSxK.astype(self.dtype),
                                          mask_BxTxS, self.head_dim ** -0.5)
        out_BxTxD = self.o(out_BxTxHxK.reshape(b, t, -1))
        if self.options.gate:
            out_BxTxD = out_BxTxD * jnp.tanh(self.gate.astype(self.dtype))
        # The softmax over an all-masked row is uniform, not empty: zero such rows here.
        has_key_BxT = jnp.any(mask_BxTxS, axis=-1)
        return jnp.where(has_key_BxT[..., None], out_BxTxD, 0).astype(h_BxTxD.dtype)

    def __call__(self, h_BxSxE, h_BxTxD, mask_BxTxS, pos_BxS=None, pos_BxT=None):
        """Both halves in one call; used to create the parameters."""
        return self.attend(h_BxTxD, *self.keys_values(h_BxSxE, pos_BxS), mask_BxTxS, pos_BxT)


def connection_module(ccfg: CompositionConfig) -> CrossAttention:
    """The linen module of every connection of `ccfg` (they all have one shape: the anchor's width
    out, any augmenting width in); its parameters are one connection's leaves of Θ_C."""
    rope_theta = ccfg.anchor.rope_theta if ccfg.anchor.position == "rope" else 10000.0
    return CrossAttention(ccfg.anchor.hidden_size, ccfg.num_heads, ccfg.head_dim, ccfg.options, ccfg.dtype,
                          ccfg.dtype, rope_theta, parent=None)
