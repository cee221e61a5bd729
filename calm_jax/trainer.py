"""The training loop: placement on the mesh, steps, progress, metrics, eval, checkpoints.

Generic over what is trained (see calm_jax.train_step): `train.compose` passes Θ_C as
`trainable` and the frozen models as `frozen`; plain LM training passes all weights as
`trainable` and `frozen={}`. Writes to RUN_DIR:
  metrics.jsonl  one JSON line per step ({"step", "loss", "tokens", "grad_norm", "lr",
                 "tokens_per_s"}) and per eval ({"step", "eval_loss", "eval_tokens"})
  loss.png       the loss curve, redrawn at each evaluation and at the end
  bases.json, checkpoints/   see calm_jax.checkpoint; each checkpoint's metadata records the
                 run's history (calm_jax.checkpoint.history): its data and schedule per segment

Resuming is a contract (calm_jax.checkpoint.history): other data or settings are refused,
naming what differs, unless new data (resume_new_data) or more steps (extend_steps) are asked
for; either is then said, and recorded as a new segment of the run's history.

Ctrl-C (SIGINT): the first finishes the current step, saves a checkpoint of it and raises
`Interrupted` (a KeyboardInterrupt naming the step); a second stops at once (KeyboardInterrupt).
Only in the main thread of a single-process run: with several processes (multi-host) SIGINT
is left as it is (a KeyboardInterrupt where it lands, the steps since the last checkpoint
redone on resume), since stopping at one step would need every process to agree on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from calm_jax import checkpoint as ckpt
from calm_jax import data as data_lib
from calm_jax.checkpoint import history as history_lib
from calm_jax import sharding as shard_lib
from calm_jax import train_step as ts
from calm_jax.loading import CheckpointError
from calm_jax.model import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the models and the data files."""

    steps: int = 1000
    batch_size: int = 8  # global, before splitting into grad_accum micro-batches
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int = 100
    end_lr_ratio: float = 0.1  # cosine decay ends at lr * end_lr_ratio
    weight_decay: float = 0.0
    clip: float = 1.0  # global gradient norm
    b2: float = 0.999  # Adam's second-moment decay
    grad_accum: int = 1
    seed: int = 0  # data order (and the saved RNG)
    mesh: str = ""  # "data=4,model=2"; empty: every device on the data axis
    fsdp: bool = True  # also shard weights over the data axis
    eval_every: int = 200  # steps; 0: only at the end
    eval_batches: int = 0  # 0: the whole eval file
    save_every: int = 200  # steps; a checkpoint is always written at the end
    keep: int = 3  # checkpoints kept
    append_eos: bool = True  # end each target with EOS, so the model learns to stop
    # Several examples per row (data.packed_batch_at): a step's batch_size rows hold as many
    # examples as fit, with no attention or loss across them; less padding computed.
    pack: bool = False
    progress: bool = True  # tqdm bar
    # Memory for compute; neither changes the loss or the gradients. What the caller's loss
    # does with them (losses.composed_loss): the anchor layers' rematerialisation
    # (model.REMAT_POLICIES) and the loss's logits made loss_chunk positions at a time (0: all).
    remat: str = "none"
    loss_chunk: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "warmup", "end_lr_ratio", "weight_decay", "clip", "eval_every", "eval_batches",
                     "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {', '.join(REMAT_POLICIES)}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class TrainResult:
    trainable: Any  # the trained parameters, on the mesh
    step: int
    losses: list  # (step, loss) of the steps this call ran
    eval_loss: float | None
    mesh: Any


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) after finishing `step`, saved as a checkpoint in `run_dir`."""

    def __init__(self, step: int, run_dir: str):
        super().__init__(f"interrupted: step {step} finished and saved in {run_dir}")
        self.step, self.run_dir = step, run_dir

    def __reduce__(self):  # from a worker process to its parent (calm_jax.experiment.workers)
        return Interrupted, (self.step, self.run_dir)


class _StopOnSigint:
    """While active (main thread, one process): the first SIGINT asks the loop to stop after the
    current step (`requested`); a second raises KeyboardInterrupt at once."""

    def __init__(self, say):
        self.requested, self.say, self.previous = False, say, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt("second Ctrl-C: stopped at once")
        self.requested = True
        self.say("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once, "
                 "losing the steps since the last checkpoint)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def train(run_dir: str, cfg: TrainConfig, loss_fn: ts.LossFn, trainable: Any, frozen: Any,
          data: data_lib.Dataset, eval_data: data_lib.Dataset | None = None,
          bases: Mapping[str, dict] | None = None, resume: bool = False, mesh=None,
          meta: Mapping[str, Any] | None = None, resume_new_data: bool = False,
          extend_steps: bool = False) -> TrainResult:
    """Trains `trainable` (with `frozen` held fixed) for cfg.steps steps, checkpointing to run_dir.

    bases: {name: checkpoint.fingerprint(...)} of the frozen models; checked against the
      run directory's record before anything is restored.
    resume: continue from the latest checkpoint in run_dir (exactly: same batches, same
      optimizer state). Without it, a run_dir that has checkpoints is refused. The data's
      content and the settings (checkpoint.history.RESUME_FIELDS) must be the run's, or it
      is refused naming what differs; unless
    resume_new_data: the data may differ: it is said, and the stream starts over the new data;
    extend_steps: cfg.steps may be more than the run's: the schedule is extended by the rule of
      calm_jax.checkpoint.history (the lr never jumps), said, and recorded.
    mesh: a jax Mesh (default: built from cfg.mesh). Place `frozen` with
      sharding.param_shardings(mesh, ...) before calling to avoid a copy.
    meta: extra JSON stored with every checkpoint.
    Raises Interrupted after a first Ctrl-C (the step it finished saved); see the module doc.
    """
    mesh = mesh if mesh is not None else shard_lib.make_mesh(cfg.mesh)
    if cfg.batch_size // cfg.grad_accum % mesh.shape["data"]:
        raise shard_lib.MeshError(f"micro-batch size {cfg.batch_size // cfg.grad_accum} (batch_size / grad_accum) "
                                  f"is not divisible by the mesh's data axis ({mesh.shape['data']})")
    if data.seq_len != cfg.seq_len:
        raise ValueError(f"{data.path} was tokenized to length {data.seq_len}, the config says {cfg.seq_len}")
    main = jax.process_index() == 0
    say = print if main else (lambda *a, **k: None)
    optimizer = ts.make_optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.clip, cfg.end_lr_ratio,
                                   cfg.b2)

    t_sh = shard_lib.param_shardings(mesh, trainable, fsdp=cfg.fsdp)
    o_sh = shard_lib.param_shardings(mesh, jax.eval_shape(optimizer.init, trainable), fsdp=cfg.fsdp)
    f_sh = shard_lib.param_shardings(mesh, frozen, fsdp=cfg.fsdp)
    shardings = ts.StepShardings(t_sh, o_sh, f_sh, shard_lib.batch_sharding(mesh), shard_lib.replicated(mesh))
    frozen = shard_lib.place(frozen, f_sh)  # no copy when the caller placed them already
    # A copy, because the step donates (deletes) the trainable arrays it is given.
    trainable = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=t_sh)(shard_lib.place(trainable, t_sh))
    opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(trainable)
    rep = shard_lib.replicated(mesh)
    rng = shard_lib.place(np.asarray(jax.random.key_data(jax.random.key(cfg.seed))), rep)

    checkpoints = ckpt.Checkpoints(run_dir, bases or {}, keep=cfg.keep)
    latest = checkpoints.latest_step()
    if latest is not None and not resume:
        raise CheckpointError(f"{run_dir} already has checkpoints (latest: step {latest}); "
                              "resume it (--resume) or choose another output directory")
    step, position = 0, data_lib.Position(0, 0)
    data_fp = history_lib.data_fingerprint(data)
    history = [{"from_step": 0, "to_step": cfg.steps, "schedule": history_lib.first_schedule(cfg), "data": data_fp}]
    state = {"trainable": trainable, "opt_state": opt_state, "step": shard_lib.place(np.int32(0), rep), "rng": rng}
    if resume and latest is not None:
        saved = checkpoints.meta(latest)
        # Checked before any array is restored: a refusal costs nothing and changes nothing.
        history, restart_data = history_lib.resume_history(run_dir, saved, cfg, data_fp, int(saved.get("step", latest)),
                                                           resume_new_data, extend_steps, say)
        state, saved = checkpoints.restore(ckpt.abstract(
            state, {"trainable": t_sh, "opt_state": o_sh, "step": rep, "rng": rep}))
        step = int(state["step"])
        position = data_lib.Position(0, 0) if restart_data else data_lib.Position(*saved["data_position"])
        if position.index >= len(data):  # only a run of an earlier version, with no data fingerprint, gets here
            raise CheckpointError(f"{run_dir}: the run stopped at example {position.index} of its data, but "
                                  f"{data.path} has {len(data)} examples: it is not the data the run trained on "
                                  "(give --resume-new-data to continue on it)")
        if step >= cfg.steps:
            say(f"{run_dir}: already trained for {step} steps (asked for {cfg.steps})")
        else:
            say(f"{run_dir}: resuming from step {step} (of {cfg.steps})")
    trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
    schedule = history_lib.schedule_fn(history)
    optimizer = ts.make_optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.clip, cfg.end_lr_ratio,
                                  cfg.b2, schedule=schedule)

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    png_path = os.path.join(run_dir, "loss.png")
    if main:
        _truncate_metrics(metrics_path, step)
    train_step = ts.make_train_step(loss_fn, optimizer, cfg.grad_accum, shardings)
    eval_step = ts.make_eval_step(loss_fn, shardings) if eval_data is not None else None

    def evaluate():
        total, count = 0.0, 0.0
        for i, batch in enumerate(data_lib.eval_batches(eval_data, cfg.batch_size // cfg.grad_accum)):
            if cfg.eval_batches and i >= cfg.eval_batches:
                break
            loss_sum, n = eval_step(trainable, frozen, shard_lib.put_batch(mesh, batch))
            total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0), count

    def save():
        checkpoints.save(step, {"trainable": trainable, "opt_state": opt_state,
                                "step": shard_lib.place(np.int32(step), rep), "rng": rng},
                         {"data_position": list(position), "step": step, "train_config": dataclasses.asdict(cfg),
                          "history": history, **(meta or {})})

    next_batch = data_lib.packed_batch_at if cfg.pack else data_lib.batch_at
    losses, eval_loss = [], None
    bar = _progress(cfg, step) if main else None
    stop = _StopOnSigint(bar.write if bar is not None and not bar.disable else say)
    with stop, open(metrics_path, "a") if main else _Null() as log:
        pending = None  # the previous step's metrics, read after the next step is dispatched
        last_time, tokens_since = time.perf_counter(), 0
        start = step
        while step < cfg.steps:
            batch, position = next_batch(data, position, cfg.batch_size, cfg.seed)
            tokens_since += int(batch["mask_BxT"].sum())
            trainable, opt_state, metrics = train_step(trainable, opt_state, frozen,
                                                       shard_lib.put_batch(mesh, batch))
            step += 1
            if pending is not None:
                _record(pending, log, bar, losses, start)
            now = time.perf_counter()
            pending = (step, metrics, float(schedule(step - 1)), tokens_since / max(now - last_time, 1e-9))
            last_time, tokens_since = now, 0
            at_eval = step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
            at_save = step == cfg.steps or bool(cfg.save_every and step % cfg.save_every == 0)
            if at_eval or at_save or stop.requested:
                _record(pending, log, bar, losses, start)
                pending = None
                if eval_step is not None and at_eval:
                    eval_loss, n = evaluate()
                    _write(log, {"step": step, "eval_loss": eval_loss, "eval_tokens": n})
                    if bar is not None:
                        bar.write(f"step {step}: eval loss {eval_loss:.4f} over {int(n)} tokens")
                if at_save or stop.requested:
                    save()
                if main and (at_eval or stop.requested):
                    plot_losses(metrics_path, png_path)  # the curve so far, at each evaluation
                if stop.requested:
                    break
                last_time = time.perf_counter()  # eval and saving are not training time
        if pending is not None:
            _record(pending, log, bar, losses, start)
        if bar is not None:
            bar.close()
        checkpoints.close()  # waits for the last save, still under the Ctrl-C handler
    if stop.requested and step < cfg.steps:
        raise Interrupted(step, run_dir)
    if main and start < cfg.steps:
        plot_losses(metrics_path, png_path)
    return TrainResult(trainable, step, losses, eval_loss, mesh)


def _record(pending, log, bar, losses, start: int):
    step, metrics, lr, tok_s = pending
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
        raise FloatingPointError(f"step {step}: loss is {m['loss']}")
    losses.append((step, m["loss"]))
    _write(log, {"step": step, **m, "lr": lr, "tokens_per_s": tok_s})
    if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
        if step == start + 1:
            _restart_clock(bar)


def _restart_clock(bar) -> None:
    """Times the bar's rate and ETA from now: the first step of a run compiles the train step,
    and counted in, its seconds would hold both at that step's figure for much of the run."""
    if bar.disable:
        return
    # What tqdm's reset() does, less zeroing the count (and drawing the bar at 0 in a log).
    bar.initial = bar.last_print_n = bar.n
    bar.start_t = bar.last_print_t = bar._time()
    for moving_average in ("_ema_dn", "_ema_dt"):
        setattr(bar, moving_average, type(getattr(bar, moving_average))(bar.smoothing))


def _write(log, record):
    log.write(json.dumps(record) + "\n")
    log.flush()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass


def _progress(cfg: TrainConfig, start: int):
    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not cfg.progress,
                dynamic_ncols=True)


def _truncate_metrics(path: str, step: int) -> None:
    # A resumed run redoes the steps after its checkpoint; drop their old lines.
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Train (and eval) loss against step, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(ln) for ln in f if ln.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
