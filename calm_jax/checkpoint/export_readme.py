"""README.md of an export: what it composes, how it was trained, and how to load it."""

from __future__ import annotations

from calm_jax.checkpoint.history import describe_data, describe_schedule
from calm_jax.composition import CompositionOptions


def readme_text(export: dict, out_dir: str) -> str:
    names = list(export["bases"])
    comp_rec, theta, training = export["composition"], export["theta"], export["training"]
    dirs = [export["bases"][n]["trained_with"] or f"{n.upper()}_DIR" for n in names]
    rows = []
    for name, path in zip(names, dirs):
        fp = export["bases"][name]["fingerprint"]
        c = fp["config"]
        rows.append(f"| {name} | `{path}` | {c['family']} | {c['num_layers']} | {c['hidden_size']} | "
                    f"{c['vocab_size']} | `{fp['hash']}` |")
    conns = [f"augment {k}: " + ", ".join(f"layer {i} -> anchor layer {j}" for i, j in pairs)
             for k, pairs in enumerate(comp_rec["connections"])]
    enabled = [k for k, v in comp_rec["options"].items() if v]
    spec = ",".join(f"{k}:{i}-{j}" for k, pairs in enumerate(comp_rec["connections"]) for i, j in pairs)
    model_flags = f"--anchor {dirs[0]} " + " ".join(f"--augment {d}" for d in dirs[1:])
    wiring_flags = (f'--connections "{spec}" --num-heads {comp_rec["num_heads"]}'
                    + "".join(f" --{k.replace('_', '-')}" for k in enabled if k in CompositionOptions.names()))
    tc = training.get("train_config", {})
    lines = [
        "# Θ_C of a CALM composition",
        "",
        f"The trained cross-attention (Θ_C) joining a frozen anchor and {len(names) - 1} frozen augmenting "
        f"model(s), exported by `python -m train.export` from `{export['source']['run_dir']}` at step "
        f"{export['step']}. The base models are not in this directory: load your own copies. They are checked "
        "against the fingerprints in `composition.json` (config and content hash); other models are refused.",
        "",
        "| | trained with | family | layers | hidden | vocab | content hash (bf16) |",
        "|---|---|---|---:|---:|---:|---|",
        *rows,
        "",
        "Connections: " + "; ".join(conns) + f". Cross-attention heads: {comp_rec['num_heads']}. "
        f"Options: {', '.join(enabled) or 'none (as in the paper)'}.",
        "",
        f"`theta.safetensors`: {theta['tensors']} tensors, {theta['parameters']:,} parameters, {theta['dtype']}, "
        f"{theta['bytes']:,} bytes of weights; sha256 `{theta['sha256']}`.",
        "",
        "## Training",
        "",
    ]
    if training:
        facts = [f"{export['step']} steps" + (f" (of {tc['steps']} planned)" if tc.get("steps") else "")]
        if tc:
            facts.append(f"batch {tc.get('batch_size')} x {tc.get('seq_len')} tokens, seed {tc.get('seed')}, "
                         f"weight decay {tc.get('weight_decay')}, clip {tc.get('clip')}")
        segments = training.get("history") or []
        if segments:  # the recorded history: every segment's schedule and data
            facts.append(f"schedule and data, in {len(segments)} segment(s) of the run's history:")
            facts += [f"  steps {seg['from_step']} → {seg['to_step']}: {describe_schedule(seg['schedule'])}; "
                      f"data {describe_data(seg['data'])}" for seg in segments]
        elif tc:
            facts.append(f"lr {tc.get('lr')}, warmup {tc.get('warmup')}")
        if "data" in training and not segments:
            facts.append(f"data `{training['data']}`" + (f" ({training['train_examples']:,} examples)"
                                                         if "train_examples" in training else ""))
        if "target_tokens" in training:
            facts.append(f"{training['target_tokens']:,} target tokens trained on; last train loss "
                         f"{training['last_loss']:.4f}")
        if "eval_loss" in training:
            facts.append(f"eval loss {training['eval_loss']:.4f} at step {training['eval_step']}"
                         + (f" on `{training['eval_data']}`" if training.get("eval_data") else ""))
        if training.get("init_from"):
            facts.append(f"Θ_C initialised from `{training['init_from']}`")
        lines += [f"  - {fact.strip()}" if fact.startswith("  ") else f"- {fact}" for fact in facts]
    else:
        lines.append("The run recorded no training metadata.")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import calm_jax",
        "",
        f'lm = calm_jax.load_composition("{dirs[0]}", [' + ", ".join(f'"{d}"' for d in dirs[1:])
        + f'], "{out_dir}")',
        'print(lm.generate(["your prompt"], max_new_tokens=32)[0].text)',
        'print(lm.loglik([{"prompt": "your prompt", "target": " its continuation"}]))',
        "# lm.model and lm.params: the ComposedLM and its parameters, for calm_jax.decoding and scoring",
        "```",
        "",
        "```bash",
        f"python -m eval.exact_match {model_flags} --composition {out_dir} --data test.jsonl --out results/",
        f"python -m eval.generate {model_flags} --composition {out_dir} --prompts prompts.jsonl --out gen.jsonl",
        f"python -m eval.loglik {model_flags} --composition {out_dir} --data test.jsonl",
        "# train further, starting from this Θ_C (the wiring flags must be these):",
        f"python -m train.compose {model_flags} {wiring_flags} --init-from {out_dir} --data more.jsonl "
        "--out runs/next",
        "```",
        "",
        "The directories above are the ones it was trained with; give your copies of the same models.",
        "",
    ]
    return "\n".join(lines)
