"""Forward tokens/s: our jitted decoder vs HF transformers (torch) on the same weights.

Anchor peer shape of shared/BENCHMARKS.md: Llama-style, hidden 512, 8 layers, 8 heads,
MLP 1408 (gated), vocab 512; batch 8 x 128, fp32, full logits. Both run in this process,
interleaved (one rep of each per round) so machine noise hits both alike; median of the
rounds. Prints one JSON line per implementation and one with the ratio; for context, the
forward's FLOPs over a 2048x2048 fp32 matmul's throughput measured in the same rounds
(the machine's limit for this work).

    python benchmarks/bench_forward.py [--reps 7] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from calm_jax import load_pretrained, model  # noqa: E402

ANCHOR = dict(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
              tie_word_embeddings=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ANCHOR)).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = load_pretrained(path, tokenizer=False)

    tokens = np.random.default_rng(0).integers(0, ANCHOR["vocab_size"], (args.batch, args.seq)).astype(np.int32)
    tokens_pt = torch.tensor(tokens, dtype=torch.long)
    fwd = jax.jit(lambda p, t: model.forward(ours.config, p, t).logits_BxTxV)

    a = jax.random.normal(jax.random.key(0), (2048, 2048))
    matmul = jax.jit(lambda x: x @ x)

    def run_matmul():
        return matmul(a).block_until_ready()

    def run_ours():
        return fwd(ours.params, tokens).block_until_ready()

    def run_hf():
        with torch.inference_mode():
            return hf(input_ids=tokens_pt).logits

    # Warm-up (compile) and a check that both compute the same thing.
    diff = float(np.abs(np.asarray(run_ours()) - run_hf().numpy()).max())
    run_ours(), run_hf(), run_matmul()

    times = {"calm_jax": [], "hf_torch": [], "matmul": []}
    for _ in range(args.reps):
        for name, fn in (("calm_jax", run_ours), ("hf_torch", run_hf), ("matmul", run_matmul)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    n_tokens = args.batch * args.seq
    common = dict(bench="forward", shape=f"llama h512 L8 H8 mlp1408 V512, batch {args.batch}x{args.seq}, fp32",
                  reps=args.reps, jax=jax.__version__, torch=torch.__version__,
                  torch_threads=torch.get_num_threads())
    median = {name: statistics.median(ts) for name, ts in times.items()}
    matmul_flops_per_s = 2 * 2048 ** 3 / median.pop("matmul")
    for name in ("calm_jax", "hf_torch"):
        ts = times[name]
        print(json.dumps(dict(common, impl=name, median_s=round(median[name], 5), min_s=round(min(ts), 5),
                              tokens_per_s=round(n_tokens / median[name], 1))))
    print(json.dumps(dict(common, impl="ratio", ours_over_torch_tokens_per_s=round(median["hf_torch"] /
                                                                                 median["calm_jax"], 3),
                          max_abs_logit_diff=diff)))
    flops = forward_flops(ours.config, args.batch, args.seq)
    print(json.dumps(dict(common, impl="limit", forward_gflop=round(flops / 1e9, 2),
                          matmul_gflop_per_s=round(matmul_flops_per_s / 1e9, 1),
                          limit_s=round(flops / matmul_flops_per_s, 5),
                          ours_fraction_of_limit=round(flops / matmul_flops_per_s / median["calm_jax"], 3))))


def forward_flops(cfg, batch, seq):
    """Matmul FLOPs of one forward: weights (2 per weight per token) plus attention scores and mixing."""
    d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = d * k * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    weights = cfg.num_layers * per_layer + d * cfg.vocab_size
    attention = cfg.num_layers * 2 * seq * cfg.num_heads * k  # q.k and p.v per token, causal half ignored
    return 2 * batch * seq * (weights + attention)


if __name__ == "__main__":
    main()
