"""A run's recorded history: what it trained on and under which learning-rate schedule, and
the contract a resume keeps (`calm_jax.trainer.train(resume=True)`).

Every checkpoint's metadata holds "history": a list of segments
  {"from_step", "to_step", "schedule": {"rule", "lr", "warmup", "steps", "end_lr_ratio", ...},
   "data": {"path", "bytes", "sha256", "examples"}}
The first segment starts at step 0. A resume with the same data and settings continues the
last segment; a resume is refused, naming what differs, when the data's content (size and
sha256 of the file: the path is recorded for information only, so a moved run resumes) or the
schedule (steps, lr, warmup, end_lr_ratio) or any other setting in RESUME_FIELDS differs,
unless it is asked for:
  new data (--resume-new-data): a new segment from the step resumed at; the data stream
    starts over the new file (epoch 0 of its seeded order); step, Θ_C and optimizer go on.
  more steps (--extend-steps): a new segment to the new total. The extension rule: the cosine
    decay is re-planned to end (at lr * end_lr_ratio) at the new total, from the step resumed
    at and starting at the lr the old schedule had reached there, so the lr never jumps.
    Resumed inside the warmup, the warmup ends where it was planned to and the cosine runs to
    the new total. A finished run extended trains on at its final lr (lr * end_lr_ratio).
"""

from __future__ import annotations

import hashlib
import math
import os
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from calm_jax.checkpoint.runs import open_manager
from calm_jax.loading import CheckpointError

# TrainConfig fields a resume keeps (what is trained and how); the others only say how a run
# is shown, saved, placed or computed (progress, eval_every, save_every, keep, mesh, remat, ...).
SCHEDULE_FIELDS = ("steps", "lr", "warmup", "end_lr_ratio")
RESUME_FIELDS = (*SCHEDULE_FIELDS, "batch_size", "seq_len", "grad_accum", "seed", "pack", "append_eos",
                 "weight_decay", "clip", "b2")


def data_fingerprint(dataset) -> dict:
    """{"path", "bytes", "sha256", "examples"} of a calm_jax.data.Dataset: of its file when there
    is one, else ("tokens_sha256") of its tokenized arrays."""
    if os.path.isfile(dataset.path):
        return {**file_fingerprint(dataset.path), "examples": len(dataset)}
    out = {"path": dataset.path, "examples": len(dataset)}
    digest = hashlib.sha256()
    for a in (dataset.tokens_NxT, dataset.mask_NxT, dataset.target_NxT):
        digest.update(np.ascontiguousarray(a).tobytes())
    return {**out, "tokens_sha256": digest.hexdigest()}


def file_fingerprint(path: str) -> dict:
    """{"path", "bytes", "sha256"} of a data file (what a resume compares: its size and sha256)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _content(fp: dict) -> tuple:
    return tuple(fp.get(k) for k in ("bytes", "sha256", "tokens_sha256"))


def describe_data(fp: dict) -> str:
    if fp.get("sha256"):
        return f"{fp.get('path')} ({fp['bytes']:,} bytes, sha256 {fp['sha256'][:12]}…, {fp.get('examples')} examples)"
    if fp.get("tokens_sha256"):
        return f"{fp.get('path')} ({fp.get('examples')} examples, tokens sha256 {fp['tokens_sha256'][:12]}…)"
    return f"{fp.get('path')} (content not recorded)"


def first_schedule(cfg) -> dict:
    return {"rule": "warmup_cosine", **{k: getattr(cfg, k) for k in SCHEDULE_FIELDS}}


def schedule_fn(history: list[dict]):
    """The lr at each step (the optimizer's update count) of a history: each segment's rule from
    its from_step on."""
    pieces = [(seg["from_step"], _piece(seg["schedule"])) for seg in history]

    def schedule(count):
        out = pieces[0][1](count)
        for start, piece in pieces[1:]:
            out = jnp.where(count >= start, piece(count), out)
        return out
    return schedule


def _piece(s: dict):
    if s["rule"] == "warmup_cosine":
        # Here, not at the top: reading a run (calm_jax.loaded, for evaluation) must not import the
        # training code (tests/test_composition.py checks that calm_jax.composition does not).
        from calm_jax.train_step import lr_schedule
        return lr_schedule(s["lr"], s["steps"], s["warmup"], s["end_lr_ratio"])
    if s["rule"] == "cosine_from":
        start, end, a, b = s["start_lr"], s["lr"] * s["end_lr_ratio"], s["from_step"], s["steps"]

        def cosine(count):
            frac = jnp.clip((count - a) / max(b - a, 1), 0.0, 1.0)
            return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return cosine
    raise CheckpointError(f"unknown schedule rule {s['rule']!r} in the run's history (a newer version's?)")


def describe_schedule(s: dict) -> str:
    end = f"{s['lr'] * s['end_lr_ratio']:.3g}"
    if s["rule"] == "cosine_from":
        return (f"extended: cosine from lr {s['start_lr']:.3g} at step {s['from_step']} to {end} at step "
                f"{s['steps']} (peak lr {s['lr']}, warmup {s['warmup']} as planned before)")
    return f"lr {s['lr']}, warmup {s['warmup']}, cosine to {end} at step {s['steps']}"


def recorded(meta: dict, cfg_was: dict) -> list[dict]:
    """The history a checkpoint's metadata records; for a run of an earlier version (no history),
    one segment made of its train_config, with its data's content unknown."""
    if meta.get("history"):
        return [dict(seg) for seg in meta["history"]]
    return [{"from_step": 0, "to_step": cfg_was.get("steps"),
             "schedule": {"rule": "warmup_cosine", **{k: cfg_was.get(k) for k in SCHEDULE_FIELDS}},
             "data": {"path": meta.get("data"), "examples": meta.get("train_examples")}}]


def resume_history(run_dir: str, meta: dict, cfg, data_fp: dict, step: int, new_data: bool = False,
                   extend_steps: bool = False, say=print) -> tuple[list[dict], bool]:
    """(history, data_restarts) of a run resumed at `step` with `cfg` on data `data_fp`: the
    recorded history, continued or with a new segment when new data or more steps are asked for
    (and said). Raises CheckpointError, one line naming what differs, for a change not asked for."""
    was = meta.get("train_config", {})
    history = recorded(meta, was)
    last = history[-1]
    other = [f"{k}: trained with {was[k]!r}, given {getattr(cfg, k)!r}" for k in RESUME_FIELDS
             if k in was and k != "steps" and was[k] != getattr(cfg, k)]
    if other:
        raise CheckpointError(f"{run_dir}: cannot resume with other settings: {'; '.join(other)} "
                              "(a resume keeps the run's settings; train a new run for these)")
    old_data = last["data"]
    data_changed = _content(old_data) != _content(data_fp) and any(_content(old_data))
    if not any(_content(old_data)):
        say(f"{run_dir}: the run recorded no fingerprint of its data (an earlier version's run); "
            f"taking {describe_data(data_fp)} as its data from here on")
        last["data"] = data_fp
    steps_changed = "steps" in was and was["steps"] != cfg.steps
    refused = []
    if data_changed and not new_data:
        refused.append(f"the data differs: {describe_data(data_fp)} is not what it trained on, "
                       f"{describe_data(old_data)} (give --resume-new-data to continue on it)")
    if steps_changed and not (extend_steps and cfg.steps > was["steps"]):
        hint = (f"give --extend-steps to train on to step {cfg.steps}" if cfg.steps > was["steps"]
                else "fewer steps than planned is not an extension; resume with the steps of the run")
        refused.append(f"the schedule differs: steps: trained with {was['steps']}, given {cfg.steps} ({hint})")
    if refused:
        raise CheckpointError(f"{run_dir}: cannot resume at step {step}: " + "; ".join(refused))
    if not (data_changed or steps_changed):
        return history, False
    schedule = dict(last["schedule"])
    if steps_changed:
        if step < schedule["warmup"] or schedule["rule"] != "warmup_cosine" and step <= schedule["from_step"]:
            schedule["steps"] = cfg.steps  # the warmup (or the segment) has not begun its decay: re-plan it whole
        else:
            reached = float(schedule_fn(history)(step))
            schedule = {**schedule, "rule": "cosine_from", "start_lr": reached, "from_step": step,
                        "steps": cfg.steps}
        say(f"{run_dir}: extending the schedule from {was['steps']} to {cfg.steps} steps at step {step}: "
            + describe_schedule(schedule))
    if data_changed:
        say(f"{run_dir}: continuing at step {step} on new data: {describe_data(data_fp)} "
            f"(before: {describe_data(old_data)}); its stream starts at its first example")
    if last["from_step"] == step:
        history.pop()  # a segment that never ran a step
    else:
        last["to_step"] = step
    history.append({"from_step": step, "to_step": cfg.steps, "schedule": schedule,
                    "data": data_fp if data_changed else old_data})
    return history, data_changed


def latest_meta(run_dir: str) -> dict | None:
    """The metadata of a run directory's latest checkpoint (no arrays read), or None."""
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return None
    manager = open_manager(run_dir)
    try:
        step = manager.latest_step()
        if step is None:
            return None
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
    finally:
        manager.close()

