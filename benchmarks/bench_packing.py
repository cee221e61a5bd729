"""Packed vs padded training batches: the fraction of real tokens per step, and real tokens/s.

    .venv/bin/python benchmarks/bench_packing.py [--reps 3] [--steps 50] [--no-timing]

Data: the key-value experiment's three training files at the default preset (m_A's, m_B's and
D_C; built in a temporary directory), and a synthetic long-tail set: 4,000 examples of 8-512
tokens, most short (length 8 * 64**(u**2), u uniform). Padded: `data.batch_at`, every row
one example padded to the longest (the key-value stages' seq_len; 512). Packed:
`data.packed_batch_at`, rows of 4x the key-value seq_len with a quarter of the rows (the
same slots per step), and 512-slot rows for the long-tail set. `real_fraction`: real
tokens over slots, mean over --steps consecutive batches of the stream.

Timing (one run, interleaved, median of --reps after a warm-up): the composed train step
at the peer shapes of shared/BENCHMARKS.md on the long-tail set's padded and packed batches
(batch 8 x 512) and on D_C's (64 x 32 padded, 16 x 128 packed); real tokens per second =
the batches' mean real tokens over the step time. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from calm_jax import data as data_lib  # noqa: E402

LONG_TAIL = dict(n=4000, min_len=8, max_len=512, seed=0)


def long_tail_dataset() -> data_lib.Dataset:
    rng = np.random.default_rng(LONG_TAIL["seed"])
    n, t = LONG_TAIL["n"], LONG_TAIL["max_len"]
    lengths = np.clip(np.round(LONG_TAIL["min_len"] * 64.0 ** (rng.random(n) ** 2)), LONG_TAIL["min_len"], t)
    tokens, mask = np.zeros((n, t), np.int32), np.zeros((n, t), bool)
    for i, k in enumerate(lengths.astype(int)):
        tokens[i, :k] = rng.integers(3, 512, k)
        mask[i, :k] = True
    return data_lib.Dataset("long_tail", tokens, mask, mask.copy())


def repad(ds: data_lib.Dataset, seq_len: int) -> data_lib.Dataset:
    """The same examples, right-padded to seq_len slots instead (rows for packing)."""
    pad = ((0, 0), (0, seq_len - ds.seq_len))
    return data_lib.Dataset(ds.path, np.pad(ds.tokens_NxT, pad), np.pad(ds.mask_NxT, pad), np.pad(ds.target_NxT, pad))


def batches(ds, rows: int, steps: int, packed: bool, seed: int = 0) -> list[dict]:
    fn = data_lib.packed_batch_at if packed else data_lib.batch_at
    position, out = data_lib.Position(0, 0), []
    for _ in range(steps):
        batch, position = fn(ds, position, rows, seed)
        out.append(batch)
    return out


def real_fraction(bs: list[dict]) -> float:
    return float(np.mean([b["mask_BxT"].mean() for b in bs]))


def kv_datasets() -> dict:
    from train.kv_arithmetic.presets import PRESETS
    from train.kv_arithmetic.task import TASK

    tok = TASK.tokenizer()
    with tempfile.TemporaryDirectory() as out:
        data = TASK.build_data(PRESETS["default"], out)
        return {f"kv_{name}": data_lib.load_dataset(data.paths[name], tok, data.seq_lens[name])
                for name in ("m_A", "m_B", "calm")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args()

    sets = {**kv_datasets(), "long_tail": long_tail_dataset()}
    plans = {}  # name -> (padded batches, packed batches)
    for name, ds in sets.items():
        if name == "long_tail":
            padded, packed = batches(ds, 8, args.steps, False), batches(ds, 8, args.steps, True)
        else:
            padded = batches(ds, 64, args.steps, False)
            packed = batches(repad(ds, 4 * ds.seq_len), 16, args.steps, True)
        plans[name] = (padded, packed)
        examples = [int((b["segment_BxT"].max(axis=1)).sum()) for b in packed]
        print(json.dumps({"bench": "packing", "data": name, "padded_rows_x_slots": list(padded[0]["mask_BxT"].shape),
                          "packed_rows_x_slots": list(packed[0]["mask_BxT"].shape),
                          "real_fraction_padded": round(real_fraction(padded), 3),
                          "real_fraction_packed": round(real_fraction(packed), 3),
                          "examples_per_step_padded": padded[0]["mask_BxT"].shape[0],
                          "examples_per_step_packed": round(float(np.mean(examples)), 1), "steps": args.steps}),
              flush=True)
    if args.no_timing:
        return

    import jax

    from bench_train_step import CCFG, timed_together
    from calm_jax import losses
    from calm_jax import train_step as ts
    from calm_jax.composition import init_theta
    from calm_jax.model import init_params

    opt = ts.make_optimizer(1e-3, 1000, 10)
    step = ts.make_train_step(losses.composed_loss(CCFG), opt)
    theta = init_theta(CCFG, jax.random.key(0))
    frozen = {"anchor": init_params(CCFG.anchor, jax.random.key(1)),
              "augments": (init_params(CCFG.augments[0], jax.random.key(2)),)}
    state = opt.init(theta)
    current = {"theta": theta, "state": state}

    def advance(batch):  # the step donates Θ_C and its optimizer state: carry the new ones forward
        current["theta"], current["state"], metrics = step.jitted(current["theta"], current["state"], frozen, batch)
        return metrics

    for name in ("calm", "long_tail"):
        padded, packed = plans["kv_calm" if name == "calm" else name]
        fns = {}
        for kind, bs in (("padded", padded), ("packed", packed)):
            batch = {k: jax.device_put(v % CCFG.anchor.vocab_size if k == "tokens_BxT" else v)
                     for k, v in bs[0].items()}
            fns[kind] = (lambda b=batch: advance(b))
        seconds = timed_together(fns, args.reps)
        rates = {}
        for kind, bs in (("padded", padded), ("packed", packed)):
            real = float(np.mean([b["mask_BxT"].sum() for b in bs]))
            rates[kind] = real / seconds[kind]
            print(json.dumps({"bench": "packing_step", "data": name, "batch": kind, "shape": list(bs[0]["mask_BxT"].shape),
                              "step_s": round(seconds[kind], 4), "real_tokens_per_step": round(real, 1),
                              "real_tokens_per_s": round(rates[kind], 1), "reps": args.reps}), flush=True)
        print(json.dumps({"bench": "packing_step", "data": name, "packed_over_padded_tokens_per_s":
                          round(rates["packed"] / rates["padded"], 2)}), flush=True)


if __name__ == "__main__":
    main()
