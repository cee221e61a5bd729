"""Plan a composition's training before running it: memory per device, FLOPs, the batch that fits.

    python -m train.plan --anchor DIR --augment DIR [--augment DIR ...] --devices N
        [--mesh data=D,model=M] --batch-size B --seq-len T [--grad-accum K]
        [--frozen-dtype bfloat16] [--remat POLICY] [--loss-chunk N] [--device-memory 80GiB]
        [--search extrapolate|bisect|none] [--json]

Reads only each directory's config.json (no weights), builds the real composed train step
(the one `python -m train.compose` runs, with its shardings) on abstract inputs and
compiles it ahead of time on N simulated CPU devices. Prints, per device: frozen weights,
Θ_C + AdamW state, and XLA's arguments / outputs / donated / temporaries and their total;
the FLOPs of one step (our count and XLA's); whether it fits --device-memory; and the
largest per-device micro-batch that fits (calm_jax.plan). --json prints one JSON object.
The figures are the CPU compiler's; a GPU's buffer assignment can differ.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anchor", metavar="DIR", required=True, help="anchor m_B (a directory with config.json)")
    p.add_argument("--augment", metavar="DIR", action="append", required=True,
                   help="augmenting model m_A; repeat for several")
    p.add_argument("--devices", type=int, required=True, help="number of devices to plan for (simulated)")
    p.add_argument("--mesh", help="device mesh, e.g. data=4,model=2 (default: all devices on data)")
    p.add_argument("--batch-size", type=int, required=True, help="global batch size")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--frozen-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="storage dtype of the frozen models (as train.compose)")
    p.add_argument("--remat", default="none", help="rematerialisation policy (calm_jax.model.REMAT_POLICIES)")
    p.add_argument("--loss-chunk", type=int, default=0, help="positions per chunk of the loss (0: plain loss)")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="replicate weights over the data axis")
    p.add_argument("--device-memory", default="80GiB", help="memory per device (default 80GiB)")
    p.add_argument("--usable-fraction", type=float, default=1.0,
                   help="fraction of --device-memory the step may use (default 1: all of it)")
    p.add_argument("--search", choices=("extrapolate", "bisect", "none"), default="extrapolate",
                   help="how to find the largest micro-batch that fits (default: extrapolate from two "
                        "compiles, then check the prediction by compiling it)")
    p.add_argument("--connections", help="explicit pairs 'model:aug_layer-anchor_layer,...' (default: the paper's)")
    p.add_argument("--num-heads", type=int, help="cross-attention heads (default: the anchor's)")
    # train.compose's composition-option flags (CompositionOptions' fields), written out here:
    # generating them would import JAX before the device count is set. tests/test_train_cli.py checks
    # that they match.
    p.add_argument("--query-norm", action="store_true", help="as train.compose")
    p.add_argument("--zero-init-out", action="store_true", help="as train.compose")
    p.add_argument("--gate", action="store_true", help="as train.compose")
    p.add_argument("--cross-rope", action="store_true", help="as train.compose")
    p.add_argument("--match-vocab", action="store_true",
                   help="no longer needed: models whose embedding tables are padded differently (same "
                        "tokenizer, e.g. Qwen2.5-7B 152064 vs Qwen2.5-1.5B 151936 rows) now compose and plan "
                        "as they are. Kept so earlier plans re-run unchanged (benchmarks/plan_pairs.py): plans "
                        "as if each augmenting model's vocab_size were the anchor's")
    p.add_argument("--name", help="name of the pair in the JSON record (default: the directories' names)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return p


def _reexec(argv: list[str], devices: int) -> int:
    """JAX is already loaded in this process (its device count fixed): plan in a fresh one."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = _device_flags(env.get("XLA_FLAGS", ""), devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, "-m", "train.plan", *argv], env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def _device_flags(flags: str, devices: int) -> str:
    # The same as calm_jax.plan.cpu_device_flags, without importing JAX.
    kept = [f for f in (flags or "").split() if not f.startswith("--xla_force_host_platform_device_count=")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.devices < 1:
        return _error(f"--devices must be >= 1, got {args.devices}")
    if "jax" in sys.modules:  # too late to set the device count here
        return _reexec(argv, args.devices)
    # Before JAX starts: N simulated CPU devices, even on a machine with an accelerator.
    os.environ["XLA_FLAGS"] = _device_flags(os.environ.get("XLA_FLAGS", ""), args.devices)
    os.environ["JAX_PLATFORMS"] = "cpu"

    import json

    from calm_jax import composition, plan as plan_lib, sharding
    from calm_jax.config import ConfigError
    from calm_jax.loading import CheckpointError, load_config
    from train.compose import options_from, parse_connections

    try:
        device_memory = plan_lib.parse_bytes(args.device_memory)
        sharding.parse_mesh(args.mesh)  # a bad spec is named before anything is read
        configs = [load_config(d, param_dtype=args.frozen_dtype) for d in (args.anchor, *args.augment)]
        if args.match_vocab:
            configs = configs[:1] + [c.replace(vocab_size=configs[0].vocab_size) for c in configs[1:]]
        mesh = plan_lib.make_mesh(args.mesh, args.devices)
        ccfg = composition.CompositionConfig(
            anchor=configs[0], augments=tuple(configs[1:]),
            connections=parse_connections(args.connections, len(args.augment)), num_heads=args.num_heads,
            options=options_from(args))
        setup = plan_lib.Setup(ccfg, mesh, args.batch_size, args.seq_len, args.grad_accum, args.remat,
                               args.loss_chunk, args.fsdp)
        setup.check()
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else \
            (lambda line: print(line, flush=True))
        result = plan_lib.plan(setup, device_memory, args.search, args.usable_fraction, log=log)
    except (plan_lib.PlanError, CheckpointError, ConfigError, composition.CompositionError,
            sharding.MeshError) as e:
        return _error(str(e))
    names = [os.path.basename(os.path.normpath(d)) for d in (args.anchor, *args.augment)]
    a = ccfg.anchor
    describe = (f"anchor {names[0]} ({a.family}, {a.num_layers} layers, hidden {a.hidden_size}) + "
                + " + ".join(f"{n} ({c.family}, {c.num_layers} layers, hidden {c.hidden_size})"
                             for n, c in zip(names[1:], ccfg.augments))
                + f"; {sum(len(p) for p in ccfg.connections)} connections, "
                  f"Θ_C {result['theta_params']:,} parameters"
                + ("; augmenting vocab_size planned as the anchor's (--match-vocab)" if args.match_vocab else ""))
    result = {"pair": args.name or " + ".join(names), "command": plan_lib.command_line(argv),
              "anchor": args.anchor, "augments": args.augment, "describe": describe,
              "match_vocab": args.match_vocab, **result}
    print(json.dumps(result) if args.json else plan_lib.format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
