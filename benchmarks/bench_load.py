"""Peak host memory of loading a large multi-shard checkpoint: streamed vs the whole checkpoint at once.

    .venv/bin/python benchmarks/bench_load.py [--shards 3] [--layers 12] [--dir DIR] [--no-whole]
        [--out benchmarks/results/load.jsonl]

Builds a random Llama-style checkpoint in a temporary directory (hidden 1024, 16 heads / 8
KV heads, MLP 4096, vocab 32000, untied head; 12 layers: 254M fp32 parameters, 1.02 GB)
saved as --shards safetensors shards with a model.safetensors.index.json, then loads it in a
fresh subprocess per path:
  streamed  calm_jax.loading.load_pretrained: one tensor read, converted, placed, dropped
  whole     the path load_pretrained took before (kept here to compare): every tensor of
            every shard read into host memory, mapped, then the whole tree device_put
Peak RSS is the child's resource.getrusage(RUSAGE_SELF).ru_maxrss after loading, minus its
resident set (VmRSS) after importing jax and calm_jax and starting the backend (the
baseline; ru_maxrss at that point is recorded too), so neither the benchmark's own
allocations nor the imports count. ratio = that difference / the checkpoint's file bytes.
On a CPU backend the loaded weights themselves live in host memory, so 1.0 is the floor; on
a GPU/TPU they do not. Prints one JSON line and appends it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
          "intermediate_size": 4096, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64,
          "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def tensor_shapes(cfg: dict) -> dict[str, tuple]:
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                    p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f)})
    out.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    return out


def build(path: str, layers: int, shards: int) -> int:
    """Writes config.json, `shards` safetensors files and their index; returns the shards' bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    cfg = dict(CONFIG, num_hidden_layers=layers)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shapes = tensor_shapes(cfg)
    total = sum(4 * int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(0)
    weight_map, groups, size = {}, [[]], 0
    for name, shape in shapes.items():  # consecutive tensors, cut into `shards` groups of about equal bytes
        if size >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += 4 * int(np.prod(shape))
    for k, names in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (rng.standard_normal(shapes[n], dtype=np.float32) * 0.02) for n in names}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors  # one shard in this process's memory at a time
        weight_map.update({n: file for n in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return sum(os.path.getsize(os.path.join(path, f)) for f in set(weight_map.values()))


# Runs in a fresh interpreter: python bench_load.py --child MODE DIR
def child(mode: str, path: str) -> None:
    import resource

    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    from calm_jax import loading

    jax.devices()  # the backend started: part of the baseline
    # The baseline is the resident set now; ru_maxrss so far can be higher (a transient peak of
    # the imports), which would make the load look smaller than it is. Both are recorded.
    base = current_rss()
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "streamed":
        params = loading.load_pretrained(path, tokenizer=False).params
    else:  # load_pretrained before streaming, step by step
        from flax import traverse_util
        from safetensors import safe_open

        import jax.numpy as jnp
        cfg = loading.load_config(path)
        tensors = {}
        for file in loading._weight_files(path):
            with safe_open(file, framework="np") as f:
                tensors.update({name: f.get_tensor(name) for name in f.keys()})
        flat = loading.hf_to_params(tensors, cfg)
        params = jax.device_put(traverse_util.unflatten_dict(
            {k: v.astype(jnp.dtype(cfg.param_dtype), copy=False) for k, v in flat.items()}))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(json.dumps({"rss_baseline_bytes": base, "rss_baseline_maxrss_bytes": base_max,
                      "rss_peak_bytes": peak, "rss_after_bytes": current_rss(), "seconds": round(seconds, 2),
                      "params": n, "backend": jax.default_backend(), "jax": jax.__version__}))


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1]) * 1024


def measure(mode: str, path: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, path], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"the {mode} load failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"node": platform.node(), "platform": platform.platform(), "processor": platform.machine(),
            "cpus": os.cpu_count(), "memory_bytes": mem}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dir", help="build the checkpoint here (default: a temporary directory, removed after)")
    p.add_argument("--no-whole", dest="whole", action="store_false", help="measure the streamed load only")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "load.jsonl"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=args.dir) as path:
        file_bytes = build(path, args.layers, args.shards)
        results = {"streamed": measure("streamed", path)}
        if args.whole:
            results["whole"] = measure("whole", path)
    record = {"bench": "load_pretrained_rss", "file_bytes": file_bytes, "shards": args.shards,
              "params": results["streamed"]["params"], "dtype": "float32",
              "backend": results["streamed"]["backend"], "jax": results["streamed"]["jax"],
              "python": platform.python_version(), "machine": machine(),
              "command": " ".join(["python benchmarks/bench_load.py", *sys.argv[1:]])}
    for mode, r in results.items():
        extra = r["rss_peak_bytes"] - r["rss_baseline_bytes"]
        record[mode] = {**{k: v for k, v in r.items() if k.startswith("rss_")},
                        "rss_peak_minus_baseline_bytes": extra, "ratio": round(extra / file_bytes, 3),
                        "seconds": r["seconds"]}
    line = json.dumps(record)
    print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
