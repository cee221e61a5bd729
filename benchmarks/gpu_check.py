"""One-command GPU check (`make bench-gpu`): train-step MFU, step memory, decode speed at ~1B scale.

    python3 benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.jsonl] [--budget-s 450]
        [--reps 7] [--remat full,dots,none] [--batch 8] [--seq 2048] [--skip-decode]
    python3 benchmarks/gpu_check.py --tiny     (tiny shapes: seconds on a CPU, to test the script)

Meant for one H100/H200 with the machine's own python and its jax (no venv); it uses only
APIs present from jax 0.10.2 to 0.12. Shapes (random weights): a ~0.95B Llama-style anchor
(hidden 2048, 16 layers, 16 heads, MLP 5632, vocab 32000) composed with a ~0.3B augmenting
model (hidden 1024, 16 layers, 8 heads, MLP 2816) through the paper's default connections
(augmenting layers 3, 7, 11, 15 -> anchor layers 3, 7, 11, 15); frozen weights stored and
computed in bf16, Θ_C and AdamW in fp32 (CompositionConfig's default).

JSON lines, on stdout and into --out (overwritten):
  gpu_check_header     device kind, versions, date, git commit, the peak FLOP/s used
  matmul_bf16          measured rate of a bf16 8192^3 matmul (the fallback peak)
  train_step           per remat policy ("full", "dots", "none"; loss in chunks of 512 positions),
                       batch 8 x 2048: seconds (median of --reps after 2 warm-up steps), tokens/s,
                       our FLOP count (benchmarks/bench_train_step.step_flops) and XLA's, and
                       MFU = our FLOPs / seconds / peak, next to the target 0.40; or status "oom"
  train_step_memory    per policy: the device's peak_bytes_in_use (None where the backend
                       has no memory_stats, e.g. CPU) next to the compiled step's own
                       memory_analysis() total (arguments + temporaries + outputs - aliases)
  decode               batch 32, prompt 128, 128 new tokens, greedy: new tokens/s of the composed
                       model (iterative CALM decoding) and of the anchor alone, then their ratio
  gpu_check_summary    the headline figures and the elapsed time

Every measurement runs in its own process (this script with --worker): the device's peak
memory counter is per process, and an out-of-memory step cannot disturb the next one.
The processes run one after another within --budget-s seconds in all (time is kept back
for the decode measurement); a process that runs past its share is stopped and reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = "benchmarks/results/gpu_check.jsonl"  # relative to the repository root
TARGET_MFU = 0.40
DECODE_RESERVE_S = 120  # kept back for the decode process while the train steps run

# Dense bf16 peak FLOP/s by device kind (spec sheets, without sparsity), first match wins.
SPEC_PEAKS = (
    (("nvl",), 835e12),  # H100 NVL / H200 NVL
    (("h100", "pcie"), 756e12),
    (("gh200",), 989e12),
    (("h200",), 989e12),
    (("h100",), 989e12),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    (("h800",), 989e12),
    (("a100",), 312e12),
)

# Shapes: (anchor, augment) ModelConfig fields, step batch/seq/loss chunk, decode batch/prompt/new, matmul n.
FULL = dict(
    anchor=dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128,
                intermediate_size=5632, max_positions=4096),
    augment=dict(vocab_size=32000, hidden_size=1024, num_layers=16, num_heads=8, num_kv_heads=8, head_dim=128,
                 intermediate_size=2816, max_positions=4096),
    batch=8, seq=2048, loss_chunk=512, decode_batch=32, prompt=128, new=128, matmul=8192, reps=7, decode_reps=5)
TINY = dict(
    anchor=dict(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=16,
                intermediate_size=176, max_positions=128),
    augment=dict(vocab_size=256, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=16,
                 intermediate_size=88, max_positions=128),
    batch=2, seq=64, loss_chunk=16, decode_batch=4, prompt=8, new=8, matmul=256, reps=5, decode_reps=5)


def spec_peak(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for words, peak in SPEC_PEAKS:
        if all(w in kind for w in words):
            return peak
    return None


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "resourceexhausted", "oom"))


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def progress(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints JSON lines on stdout.

def _setup_imports():
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)  # benchmarks/ (as bench_remat.py does): bench_train_step's helpers


def _configs(shape: dict):
    from calm_jax.composition import CompositionConfig
    from calm_jax.config import ModelConfig
    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    anchor = ModelConfig(family="llama", **shape["anchor"]).replace(**bf16)
    augment = ModelConfig(family="llama", **shape["augment"]).replace(**bf16)
    return anchor, augment, CompositionConfig(anchor, (augment,))  # Θ_C fp32, default connections


def _init(cfg, seed: int):
    import jax
    from calm_jax.model import init_params
    return jax.block_until_ready(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)))


def _memory_stats():
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without it
        return None
    return stats or None


def _mib(n) -> float | None:
    return None if n is None else round(n / 2 ** 20, 1)


def worker_header(args, shape):
    import jax
    import jax.numpy as jnp
    import flax
    import optax
    from bench_train_step import timed

    devices = jax.devices()
    dev = devices[0]
    versions = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                "optax": optax.__version__}
    try:
        import jaxlib
        versions["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        commit, dirty = None, None
    stats = _memory_stats()
    peak = spec_peak(dev.device_kind)
    emit({"bench": "gpu_check_header", "device_kind": dev.device_kind, "platform": dev.platform,
          "device_count": len(devices), "bytes_limit_gib": None if not stats or "bytes_limit" not in stats
          else round(stats["bytes_limit"] / 2 ** 30, 2), **versions,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "git_commit": commit, "git_dirty": dirty, "tiny": args.tiny,
          "spec_peak_bf16_flops": peak,
          "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
          "xla_flags": os.environ.get("XLA_FLAGS") or None})

    # A chain of matmuls in one jitted call (no per-call dispatch in the timing); x is scaled
    # so that y @ x keeps y's magnitude and bf16 never overflows.
    n, chain = shape["matmul"], 10
    x = (jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n ** 0.5).astype(jnp.bfloat16)

    @jax.jit
    def chained(y, x):
        return jax.lax.fori_loop(0, chain, lambda _, y: y @ x, y)

    try:
        seconds = timed(lambda: chained(x, x), args.reps) / chain
    except Exception as e:
        emit({"bench": "matmul_bf16", "n": n, "status": "oom" if is_oom(e) else "error",
              "error": f"{type(e).__name__}: {e}"[:1500]})
        return
    rate = 2 * n ** 3 / seconds
    emit({"bench": "matmul_bf16", "n": n, "seconds_per_matmul": seconds, "flops_s": rate,
          "tflops_s": round(rate / 1e12, 2), "spec_peak_bf16_flops": peak,
          "fraction_of_spec_peak": None if peak is None else round(rate / peak, 3), "reps": args.reps})


def worker_train(args, shape):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_train_step import step_flops, timed
    from calm_jax import train_step as ts
    from calm_jax.composition import init_theta, param_count
    from calm_jax.losses import composed_loss

    anchor, augment, ccfg = _configs(shape)
    b, t, chunk, remat = args.batch or shape["batch"], args.seq or shape["seq"], shape["loss_chunk"], args.remat
    dev = jax.devices()[0]
    row = {"bench": "train_step", "remat": remat, "batch": b, "seq": t, "loss_chunk": chunk,
           "device_kind": dev.device_kind, "frozen_dtype": "bfloat16", "theta_dtype": ccfg.dtype,
           "connections": [list(map(list, c)) for c in ccfg.connections]}
    mem_row = {"bench": "train_step_memory", "remat": remat, "batch": b, "seq": t, "loss_chunk": chunk,
               "device_kind": dev.device_kind}
    flops = step_flops(ccfg, b, t)
    total = sum(flops.values())
    row.update(flops=total, flops_by_part=flops)
    stage = "init"
    try:
        start = time.perf_counter()
        frozen = {"anchor": _init(anchor, 1), "augments": (_init(augment, 2),)}
        theta = init_theta(ccfg, jax.random.key(0))
        opt = ts.make_optimizer(1e-4, 1000, 10)
        state = opt.init(theta)
        tokens = np.random.default_rng(0).integers(3, anchor.vocab_size, (b, t)).astype(np.int32)
        batch = {"tokens_BxT": jnp.asarray(tokens), "mask_BxT": jnp.ones((b, t), bool),
                 "target_BxT": jnp.ones((b, t), bool)}
        row.update(theta_params=param_count(theta),
                   frozen_params=sum(int(x.size) for x in jax.tree.leaves(frozen)))
        progress(f"train {remat}: models ready in {time.perf_counter() - start:.1f}s; compiling")
        stage = "compile"
        step = ts.make_train_step(composed_loss(ccfg, remat, chunk), opt)
        start = time.perf_counter()
        compiled = step.jitted.lower(theta, state, frozen, batch).compile()
        row["compile_seconds"] = round(time.perf_counter() - start, 1)
        progress(f"train {remat}: compiled in {row['compile_seconds']}s; timing")
        try:
            mem = compiled.memory_analysis()
        except Exception:
            mem = None
        if mem is not None:
            parts = {"argument": int(mem.argument_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
                     "output": int(mem.output_size_in_bytes), "alias": int(mem.alias_size_in_bytes)}
            plan_total = parts["argument"] + parts["temp"] + parts["output"] - parts["alias"]
            mem_row.update({f"plan_{k}_mib": _mib(v) for k, v in parts.items()})
            mem_row["plan_total_mib"] = _mib(plan_total)
        else:
            plan_total = None
            mem_row["plan_total_mib"] = None
        try:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            row["xla_flops"] = float(cost["flops"]) if cost and cost.get("flops") is not None else None
        except Exception:
            row["xla_flops"] = None

        stage = "run"
        carry = {"theta": theta, "state": state}
        losses = []

        def run_step():
            carry["theta"], carry["state"], m = compiled(carry["theta"], carry["state"], frozen, batch)
            losses.append(m["loss"])
            return m["loss"]

        seconds = timed(run_step, args.reps)  # 2 warm-up steps, then the median of --reps
        loss = float(losses[-1])
        stats = _memory_stats()
        peak_used = args.peak_flops
        row.update(status="ok", seconds=seconds, tokens_per_s=round(b * t / seconds, 1),
                   achieved_tflops_s=round(total / seconds / 1e12, 2), reps=args.reps,
                   peak_flops=peak_used, peak_source=args.peak_source,
                   mfu=None if not peak_used else round(total / seconds / peak_used, 4),
                   fraction_of_measured_matmul=None if not args.matmul_flops
                   else round(total / seconds / args.matmul_flops, 4),
                   target_mfu=TARGET_MFU, loss=loss, loss_finite=bool(np.isfinite(loss)))
        if peak_used:
            row["met"] = bool(row["mfu"] >= TARGET_MFU)
        peak_bytes = None if not stats else stats.get("peak_bytes_in_use")
        mem_row.update(status="ok", peak_bytes_in_use_mib=_mib(peak_bytes),
                       bytes_in_use_after_mib=_mib(None if not stats else stats.get("bytes_in_use")),
                       bytes_limit_mib=_mib(None if not stats else stats.get("bytes_limit")),
                       peak_over_plan=None if peak_bytes is None or not plan_total
                       else round(peak_bytes / plan_total, 3),
                       memory_stats_available=stats is not None)
        emit(row)
        emit(mem_row)
    except Exception as e:  # out of memory (or anything else): a line, not a crash
        status = "oom" if is_oom(e) else "error"
        detail = f"{type(e).__name__}: {e}"[:1500]
        progress(f"train {remat}: {status} at {stage}: {detail[:300]}")
        stats = _memory_stats()
        row.update(status=status, stage=stage, error=detail, target_mfu=TARGET_MFU)
        mem_row.update(status=status, stage=stage,
                       peak_bytes_in_use_mib=_mib(None if not stats else stats.get("peak_bytes_in_use")),
                       bytes_limit_mib=_mib(None if not stats else stats.get("bytes_limit")))
        mem_row.setdefault("plan_total_mib", None)
        emit(row)
        emit(mem_row)


def worker_decode(args, shape):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_train_step import timed_together
    from calm_jax import composition as comp
    from calm_jax import decoding
    from calm_jax.model import PlainLM

    anchor, augment, ccfg = _configs(shape)
    b, p, n = shape["decode_batch"], shape["prompt"], shape["new"]
    common = {"bench": "decode", "batch": b, "prompt": p, "new_tokens": n, "sampling": "greedy",
              "device_kind": jax.devices()[0].device_kind, "frozen_dtype": "bfloat16", "reps": args.decode_reps}
    try:
        anchor_params = _init(anchor, 1)
        params = {"theta": comp.init_theta(ccfg, jax.random.key(0)), "anchor": anchor_params,
                  "augments": (_init(augment, 2),)}
        tokens = jnp.asarray(np.random.default_rng(0).integers(3, anchor.vocab_size, (b, p)).astype(np.int32))
        mask = jnp.ones((b, p), bool)
        no_stop = jnp.full((8,), -1, jnp.int32)
        variants = {"anchor": (PlainLM(anchor), anchor_params), "composed_iterative": (comp.ComposedLM(ccfg), params)}
        outputs = {}

        def run(name):
            model, prm = variants[name]
            outputs[name] = decoding.decode(model, prm, tokens, mask, no_stop, jax.random.key(0), max_new_tokens=n)
            return outputs[name]

        progress("decode: compiling and timing (anchor, composed)")
        median = timed_together({name: (lambda name=name: run(name)) for name in variants}, args.decode_reps)
        for name in variants:
            assert int(outputs[name].num_B.min()) == n, f"{name}: every row must decode all {n} new tokens"
            emit({**common, "variant": name, "status": "ok", "new_tokens_per_s": round(b * n / median[name], 1),
                  "median_s": round(median[name], 4)})
        ratio = median["anchor"] / median["composed_iterative"]
        emit({**common, "ratio": "composed_iterative_over_anchor", "status": "ok", "value": round(ratio, 3)})
    except Exception as e:
        status = "oom" if is_oom(e) else "error"
        emit({**common, "status": status, "error": f"{type(e).__name__}: {e}"[:1500]})


# ---------------------------------------------------------------------------------------------
# Driver: runs the workers one after another and collects their lines.

class Driver:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.start = time.monotonic()
        path = os.path.join(ROOT, DEFAULT_OUT) if args.out == DEFAULT_OUT else args.out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.out = open(path, "w")
        self.rows = []
        self.command = " ".join([os.path.basename(sys.executable)] + args.argv)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        self.out.write(line + "\n")
        self.out.flush()

    def worker(self, name: str, extra: list[str], timeout: float, fallback: dict) -> list[dict]:
        """Runs this script with --worker NAME; returns (and records) its JSON lines.

        If it ends without a line (crash, or stopped at `timeout`), records `fallback` with the status."""
        if timeout < 20:
            row = {**fallback, "status": "skipped", "error": f"time budget (--budget-s {self.args.budget_s}) spent"}
            self.record(row)
            return [row]
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--reps", str(self.args.reps),
               "--decode-reps", str(self.args.decode_reps)] + (["--tiny"] if self.args.tiny else []) + extra
        for flag in ("batch", "seq"):
            if getattr(self.args, flag):
                cmd += [f"--{flag}", str(getattr(self.args, flag))]
        label = " ".join([name] + extra[:2])
        progress(f"{label}: up to {timeout:.0f}s")
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
        rows = []

        def read():
            for line in proc.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    print(line, file=sys.stderr, flush=True)
                    continue
                if row.get("bench") == "gpu_check_header":
                    row["command"] = self.command
                rows.append(row)
                self.record(row)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group only
            proc.wait()
            rc = "timeout"
        reader.join(timeout=10)
        progress(f"{label}: done in {time.monotonic() - started:.0f}s (exit {rc})")
        if any(r.get("bench") == fallback["bench"] for r in rows):
            return rows  # it reported (a result, or its own out-of-memory / error line)
        if rc == "timeout":
            row = {**fallback, "status": "timeout", "error": f"stopped after {timeout:.0f}s (time budget)"}
        else:
            row = {**fallback, "status": "error", "error": f"worker exited with {rc} and no result (its stderr "
                                                           "is above)"}
        self.record(row)
        return rows + [row]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self):
        args = self.args
        header = self.worker("header", [], min(self.remaining(), 180), {"bench": "gpu_check_header"})
        kind = next((r.get("device_kind") for r in header if r.get("bench") == "gpu_check_header"), "unknown")
        mm = next((r for r in header if r.get("bench") == "matmul_bf16" and "flops_s" in r), None)
        measured = mm["flops_s"] if mm else None
        peak, source = spec_peak(kind or ""), "spec"
        if peak is None:
            peak, source = measured, "measured_matmul_bf16"
        flops_args = ["--peak-source", source]
        if peak:
            flops_args += ["--peak-flops", repr(peak)]
        if measured:
            flops_args += ["--matmul-flops", repr(measured)]

        train = {}
        reserve = 0 if args.skip_decode else (10 if args.tiny else DECODE_RESERVE_S)
        for remat in args.remat.split(","):
            rows = self.worker("train", ["--remat", remat] + flops_args, self.remaining() - reserve,
                               {"bench": "train_step", "remat": remat})
            train[remat] = next((r for r in rows if r.get("bench") == "train_step"), {})
            mem = next((r for r in rows if r.get("bench") == "train_step_memory"), None)
            if mem is not None:
                train[remat]["_memory"] = mem
        decode = []
        if not args.skip_decode:
            decode = self.worker("decode", [], self.remaining(), {"bench": "decode"})
        ratio = next((r.get("value") for r in decode if r.get("ratio")), None)
        self.record({
            "bench": "gpu_check_summary", "device_kind": kind, "peak_flops": peak, "peak_source": source,
            "matmul_bf16_flops_s": measured, "target_mfu": TARGET_MFU,
            "mfu": {r: v.get("mfu") if v.get("status") == "ok" else v.get("status") for r, v in train.items()},
            "step_seconds": {r: v.get("seconds") for r, v in train.items() if v.get("status") == "ok"},
            "peak_bytes_in_use_mib": {r: v.get("_memory", {}).get("peak_bytes_in_use_mib") for r, v in train.items()},
            "plan_total_mib": {r: v.get("_memory", {}).get("plan_total_mib") for r, v in train.items()},
            "decode_tokens_per_s": {r["variant"]: r.get("new_tokens_per_s") for r in decode if r.get("variant")},
            "decode_composed_over_anchor": ratio,
            "elapsed_s": round(time.monotonic() - self.start, 1), "budget_s": args.budget_s,
            "out": args.out})
        self.out.close()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (seconds on a CPU): tests the script")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines file, overwritten (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock seconds for everything")
    p.add_argument("--reps", type=int, default=None, help="timed train steps / matmul calls (median; >= 5)")
    p.add_argument("--decode-reps", type=int, default=None, help="timed decodes per variant (median)")
    p.add_argument("--remat", default="full,dots,none", help="comma-separated remat policies for the train step")
    p.add_argument("--batch", type=int, default=None, help="train step batch (default 8; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="train step sequence length (default 2048; tiny 64)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--worker", choices=("header", "train", "decode"), help=argparse.SUPPRESS)
    p.add_argument("--peak-flops", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak-source", default=None, help=argparse.SUPPRESS)
    p.add_argument("--matmul-flops", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [os.path.relpath(os.path.abspath(__file__), ROOT)] + argv
    shape = TINY if args.tiny else FULL
    args.reps = args.reps or shape["reps"]
    args.decode_reps = args.decode_reps or shape["decode_reps"]
    if args.reps < 5 or args.decode_reps < 5:
        p.error("--reps and --decode-reps must be at least 5 (medians of >= 5)")
    if args.worker:
        _setup_imports()
        {"header": worker_header, "train": worker_train, "decode": worker_decode}[args.worker](args, shape)
        return
    for r in args.remat.split(","):
        if r not in ("full", "dots", "none"):
            p.error(f"unknown remat policy {r!r}: use full, dots, none")
    # Let the step use most of the device (JAX's default pool is 75% of it); the value is reported.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    Driver(args).run()


if __name__ == "__main__":
    main()
