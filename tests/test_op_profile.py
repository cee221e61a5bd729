"""benchmarks/op_profile.py: the op breakdown the decode and train-step benchmarks print."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import decoding
from calm_jax.config import ModelConfig
from calm_jax.model import PlainLM, init_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import op_profile  # noqa: E402

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_positions=64)


def test_group_by_scope():
    assert op_profile.group("jit(decode)/while/body/Decoder/layers_1/attn/q/dot_general", "ynn_fusion.3") == \
        "weight matmuls"
    assert op_profile.group("jit(step)/transpose(jvp(Decoder))/layers_0/mlp/down/dot_general", "dot.7") == \
        "weight matmuls"
    assert op_profile.group("jit(decode)/Decoder/layers_0/attn/dot_general", "dot.2") == "attention"
    assert op_profile.group("jit(decode)/Decoder/layers_0/attn/q_norm/mul", "fusion.1") == "attention"
    assert op_profile.group("jit(decode)/Decoder/layers_0/attn/dynamic_update_slice", "fusion.4") == "cache writes"
    assert op_profile.group("jit(decode)/Decoder/layers_0/attn/dynamic_update_slice", "copy.9") == "layout copies"
    assert op_profile.group("jit(decode)/Decoder/embed.attend/dot_general", "dot.1") == "weight matmuls"
    assert op_profile.group("jit(decode)/Decoder/final_norm/mul", "fusion.2") == "other"


def test_breakdown_of_a_decode_counts_its_ops():
    model, params = PlainLM(CFG), init_params(CFG, jax.random.key(0))
    tokens = np.ones((2, 8), np.int32)
    args = (model, params, tokens, np.ones_like(tokens, bool), jnp.full((8,), -1, jnp.int32), jax.random.key(0))
    hlo = decoding.decode.lower(*args, max_new_tokens=4).compile().as_text()
    run = lambda: decoding.decode(*args, max_new_tokens=4)  # noqa: E731
    jax.block_until_ready(run())
    b = op_profile.breakdown(run, hlo)
    assert b["ops"] > 0 and b["wall_s"] > 0
    assert set(b["op_s"]) == set(op_profile.GROUPS)
    assert b["op_s"]["weight matmuls"] > 0 and b["op_s"]["cache writes"] > 0
    assert b["op_s"]["layout copies"] < b["op_s"]["weight matmuls"]
