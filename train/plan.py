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
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

# JAX, and calm_jax with it, is imported in main once the device count is set (and where a
# function below needs it): JAX fixes its devices when it starts.

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | int) -> int:
    """"80GiB" / "80 GB" / "1.5TiB" / "123456" -> bytes (--device-memory). GB is 10^9, GiB 2^30; a bare
    number is bytes. A size it cannot read is a ValueError."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read memory size {text!r}: expected a number with an optional unit "
                             "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GiB")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value)


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
    # Here, not in calm_jax: importing it would start JAX.
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
    try:
        device_memory = parse_bytes(args.device_memory)
    except ValueError as e:
        return _error(str(e))
    if "jax" in sys.modules:  # too late to set the device count here
        return _reexec(argv, args.devices)
    # Before JAX starts: N simulated CPU devices, even on a machine with an accelerator.
    os.environ["XLA_FLAGS"] = _device_flags(os.environ.get("XLA_FLAGS", ""), args.devices)
    os.environ["JAX_PLATFORMS"] = "cpu"

    from calm_jax import composition, sharding
    from calm_jax.config import ConfigError
    from calm_jax.loading import CheckpointError, load_config
    from calm_jax.plan import PlanError, Setup, plan

    from .compose import options_from, parse_connections

    known = (PlanError, CheckpointError, ConfigError, composition.CompositionError, sharding.MeshError)
    try:
        sharding.parse_mesh(args.mesh)  # a bad spec is named before anything is read
        configs = [load_config(d, param_dtype=args.frozen_dtype) for d in (args.anchor, *args.augment)]
        if args.match_vocab:
            configs = configs[:1] + [c.replace(vocab_size=configs[0].vocab_size) for c in configs[1:]]
        mesh = sharding.make_mesh(args.mesh)  # over this process's devices: the --devices simulated ones
        if mesh.devices.size != args.devices:
            raise sharding.MeshError(f"mesh {args.mesh!r} uses {mesh.devices.size} devices (data={mesh.shape['data']}"
                                     f" x model={mesh.shape['model']}), but --devices is {args.devices}")
        ccfg = composition.CompositionConfig(
            anchor=configs[0], augments=tuple(configs[1:]),
            connections=parse_connections(args.connections), num_heads=args.num_heads,
            options=options_from(args))
        setup = Setup(ccfg, mesh, args.batch_size, args.seq_len, args.grad_accum, args.remat, args.loss_chunk,
                      args.fsdp)
        setup.check()
    except known as e:
        return _error(str(e))
    try:
        setup.train_config()
    except ValueError as e:  # TrainConfig's own checks (remat policy, loss chunk), reported as train.compose does
        return _error(f"bad training settings: {e}")
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else \
        (lambda line: print(line, flush=True))
    try:
        result = plan(setup, device_memory, args.search, args.usable_fraction, log=log)
    except known as e:
        return _error(str(e))
    names = [os.path.basename(os.path.normpath(d)) for d in (args.anchor, *args.augment)]
    a = ccfg.anchor
    describe = (f"anchor {names[0]} ({a.family}, {a.num_layers} layers, hidden {a.hidden_size}) + "
                + " + ".join(f"{n} ({c.family}, {c.num_layers} layers, hidden {c.hidden_size})"
                             for n, c in zip(names[1:], ccfg.augments))
                + f"; {sum(len(p) for p in ccfg.connections)} connections, "
                  f"Θ_C {result['theta_params']:,} parameters"
                + ("; augmenting vocab_size planned as the anchor's (--match-vocab)" if args.match_vocab else ""))
    result = {"pair": args.name or " + ".join(names), "command": command_line(argv),
              "anchor": args.anchor, "augments": args.augment, "describe": describe,
              "match_vocab": args.match_vocab, **result}
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def format_report(p: dict) -> str:
    """The plan (`calm_jax.plan.plan`'s dict, with main's fields) as a few lines for a terminal."""
    from calm_jax.plan import fmt_bytes  # JAX: main has started it by now

    d = p["per_device"]
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"composition: {p.get('describe', '')}".rstrip(),
        f"mesh {mesh} on {p['backend']}; batch {p['batch_size']} x {p['seq_len']} "
        f"(grad_accum {p['grad_accum']}, micro-batch {p['micro_batch_per_device']} per device); "
        f"remat {p['remat']}, loss chunk {p['loss_chunk'] or 'off'}; frozen {p['frozen_dtype']}, "
        f"compute {p['compute_dtype']}",
        "per device:",
        f"  frozen weights          {fmt_bytes(d['frozen_weights']):>12}",
        f"  Θ_C + optimizer state   {fmt_bytes(d['theta_and_optimizer']):>12} "
        f"(Θ_C {fmt_bytes(d['theta'])}, AdamW {fmt_bytes(d['optimizer'])})",
        f"  batch                   {fmt_bytes(d['batch']):>12}",
        f"  XLA arguments           {fmt_bytes(d['argument']):>12}",
        f"  XLA outputs             {fmt_bytes(d['output']):>12}",
        f"  XLA donated (alias)     {fmt_bytes(d['alias']):>12}",
        f"  XLA temporaries         {fmt_bytes(d['temp']):>12}",
        f"  XLA total               {fmt_bytes(d['total']):>12}  (arguments + outputs - donated + temporaries)",
        f"  inputs XLA dropped      {fmt_bytes(d['unused_inputs']):>12}  (never read, resident all the same)",
        f"  total                   {fmt_bytes(d['needed']):>12}",
        f"fits {fmt_bytes(p['usable_bytes'])} per device: {'yes' if p['fits'] else 'NO'} "
        f"({'headroom' if p['fits'] else 'over by'} {fmt_bytes(abs(p['headroom_bytes']))})",
        f"FLOPs per step: {p['flops_per_step']:.4g} (anchor {p['flops_by_part']['anchor']:.3g}, augmenting "
        f"{p['flops_by_part']['augment']:.3g}, Θ_C {p['flops_by_part']['theta']:.3g}); per device "
        f"{p['flops_per_device']:.4g}, XLA's count per device "
        + (f"{p['xla_flops_per_device']:.4g}" if p["xla_flops_per_device"] is not None else "n/a"),
    ]
    if "max_micro_batch_per_device" in p:
        m = p["max_micro_batch_per_device"]
        lines.append(f"largest micro-batch per device that fits: {m} (global batch {p['max_batch_size']}"
                     + (f", {fmt_bytes(p['max_batch_per_device_bytes'])} per device" if m else "")
                     + f"); {p['max_batch_method']}")
    if p.get("residual_bytes_per_device") is not None:
        lines.append(f"kept for the backward pass (JAX's residuals, one device's rows, before XLA): "
                     f"{fmt_bytes(p['residual_bytes_per_device'])}")
    lines.append(f"trace+lower {p['lower_seconds']:.1f} s, compile {p['compile_seconds']:.1f} s"
                 + (f" (XLA options {p['compiler_options']})" if p.get("compiler_options") else ""))
    return "\n".join(lines)


def command_line(argv: Sequence[str], module: str = "train.plan") -> str:
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def markdown_table(records: Sequence[dict]) -> str:
    """The README's "What fits where" table from plan records (JSON lines of `python -m train.plan --json`).

    A searched record shows the largest batch that fits (or, if none does, the batch it was
    asked for); per-device GiB is XLA's figure (total), residuals JAX's (calm_jax.plan.residual_bytes).
    """
    rows = ["| pair | devices | mesh | batch (rows per device) | remat | per-device GiB | "
            "of which kept for backward (JAX) | fits |",
            "|---|---:|---|---:|---|---:|---:|---|"]
    for r in records:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        best = r.get("max_micro_batch_per_device")
        if best:
            batch, rows_per, total, resid, fits = (r["max_batch_size"], best, r["max_batch_per_device_bytes"],
                                                   r.get("max_batch_residual_bytes"), True)
        else:
            batch, rows_per, total, resid, fits = (r["batch_size"], r["micro_batch_per_device"],
                                                   r["per_device_bytes"], r.get("residual_bytes_per_device"),
                                                   r["fits"])
        note = "" if best or "max_micro_batch_per_device" not in r else " (largest that fits: none)"
        rows.append(f"| {r.get('pair', '?')} | {r['devices']} | {mesh} | {batch} ({rows_per}){note} | {r['remat']} | "
                    f"{total / GiB:.1f} | {'n/a' if resid is None else f'{resid / GiB:.1f}'} | "
                    f"{'yes' if fits else 'no'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
