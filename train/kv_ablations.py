"""Ablations (the paper's Table 5) and the held-in-fraction sweep of the key-value arithmetic experiment.

    python -m train.kv_ablations [--preset default|paper|tiny] [--out runs/kv_arithmetic] [--ablations] [--sweep]
                                 [--workers N]

Both reuse the pipeline of `train.kv_arithmetic` (its data, base models in OUT/m_A and
OUT/m_B, trained there when missing, its training stage preset.train_C on D_C and its
generation-based exact-match evaluation).

Ablations (OUT/ablations/ablations.json, .md, .png): every row is trained on the same D_C
with the same stage and evaluated on the same four sets as Table 1.
  m_A, m_B        the base models alone (nothing trained on D_C)
  calm            the composition as the preset configures it: the main run's Θ_C (OUT/calm,
                  trained there when missing), the same D_C, stage and seed
  random_m_A      m_A replaced by an untrained model of its config
  vanilla_m_A     m_A replaced by a model of its size and recipe trained on KV-Substitution
                  under another key -> value mapping (it knows the format, not the mapping)
  encoder_m_A     m_A as an encoder: it sees only the prompt, in training
                  (composition.encoder_mode_loss) and in decoding (encoder mode)
  lora_m_B        LoRA on every attention and MLP kernel of m_B, rank chosen so its parameter
                  count is the closest to Θ_C's (calm_jax.lora)
  finetune_m_B    every weight of m_B trained on D_C
  query_norm, zero_init_out, gate, cross_rope
                  the composition with that option flipped relative to the preset
Sweep (OUT/sweep/sweep.json, .md, .png): Θ_C trained on D_C drawn from 5, 10, 20 and 50% of
the keys, evaluated on KV-Arithmetic over that fraction's held-out keys and over all keys.
Evaluation expressions that the base models were trained on are dropped (the base models
only exclude the preset's own evaluation sets); the remaining set sizes are reported.
The sweep point at the preset's own fraction reuses OUT/calm too.
Every stage prints its time. Training runs resume (and finished ones are reused) on a rerun.
On CPU the rows (and sweep points) run side by side in worker processes, one per CPU core,
each pinned to its core; their output goes to OUT/ablations/logs/<row>.log (OUT/sweep/logs/).
--workers 1 runs them one after the other in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from train import kv_arithmetic as kva

CALM_SEED = 3  # Θ_C initialisation and D_C order, as in train.kv_arithmetic
RANDOM_M_A_SEED = 11
VANILLA_VALUES_SEED = 12
LORA_SEED = 13
OPTIONS = ("query_norm", "zero_init_out", "gate", "cross_rope")
ROWS = ("m_A", "m_B", "calm", "random_m_A", "vanilla_m_A", "encoder_m_A", "lora_m_B", "finetune_m_B", *OPTIONS)
SWEEP_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
SWEEP_TASKS = ("kv_arithmetic", "kv_arithmetic_heldout")


@dataclasses.dataclass
class _Run:
    """What every row needs: the preset, the data, the base models, the evaluation sets."""

    preset: kva.Preset
    out: str  # the ablation (or sweep) directory
    main_out: str  # the main run's directory (its m_A, m_B and Θ_C are shared)
    kv: object
    tok: object
    paths: dict
    seq_lens: dict
    m_A: object
    m_B: object
    eval_sets: dict

    def evaluate(self, label: str, model, params) -> dict:
        from tqdm.auto import tqdm

        with tqdm(total=len(self.eval_sets), desc=f"eval {label}", unit="set", dynamic_ncols=True) as bar:
            return kva.evaluate(label, model, params, self.tok, self.eval_sets, self.preset.eval_batch, self.out, bar)

    def train_on_dc(self, name: str, loss_fn, trainable, frozen, bases: dict):
        """calm_jax.trainer on D_C into OUT/name (resumed when there); returns the trained tree."""
        from calm_jax import data as data_lib
        from calm_jax import trainer

        run_dir = os.path.join(self.out, name)
        tcfg = self.preset.train_C.train_config(self.seq_lens["calm"], CALM_SEED)
        kva.check_run_recipe(run_dir, kva.training_recipe(tcfg, self.paths["calm"]))
        dataset = data_lib.load_dataset(self.paths["calm"], self.tok, self.seq_lens["calm"])
        print(f"D_C: {len(dataset)} examples, {self.preset.train_C.steps} steps of {self.preset.train_C.batch_size}")
        return trainer.train(run_dir, tcfg, loss_fn, trainable, frozen, dataset, bases=bases, resume=True).trainable


def _base_models(preset: kva.Preset, out: str, tok, paths: dict, seq_lens: dict):
    """m_A and m_B exactly as train.kv_arithmetic.run makes them (loaded from OUT when there)."""
    max_positions = 4 * max(seq_lens.values())
    m_A = kva.train_base("m_A", preset.m_A, preset.train_A, seq_lens["m_A"], tok, paths["m_A"], out, seed=1,
                         max_positions=max_positions)
    m_B = kva.train_base("m_B", preset.m_B, preset.train_B, seq_lens["m_B"], tok, paths["m_B"], out, seed=2,
                         max_positions=max_positions)
    return m_A, m_B


def _setup(preset_name: str, out: str, sub: str, timer, overrides=(), write: bool = True) -> _Run:
    """The data (written unless `write` is False) and the base models (trained when missing)."""
    from calm_jax.data import read_jsonl

    preset = kva.get_preset(preset_name, overrides)
    work = os.path.join(out, sub)
    with timer.stage("data"):
        kv, tok, paths, seq_lens = kva.build_data(preset, work, write=write)
    with timer.stage("base models"):
        m_A, m_B = _base_models(preset, out, tok, paths, seq_lens)
    eval_sets = {t: read_jsonl(paths[f"eval_{t}"]) for t in kva.EVAL_TASKS}
    return _Run(preset, work, out, kv, tok, paths, seq_lens, m_A, m_B, eval_sets)


# --- ablation rows: each returns (scores, trainable parameter count, note) ---------------------------

def _plain_row(run: _Run, name: str):
    from calm_jax.model import PlainLM

    model = getattr(run, name)
    return run.evaluate(name, PlainLM(model.config), model.params), 0, "base model alone"


def _composition_row(run: _Run, name: str, m_A, note: str, run_dir: str | None = None, **options):
    """Θ_C trained (into run_dir, default OUT/ablations/<name>) with `m_A` as the augmenting model."""
    from calm_jax.composition import ComposedLM, param_count

    ccfg = kva.composition_config(run.preset, m_A, run.m_B, **options)
    theta = kva.train_composition(run_dir or os.path.join(run.out, name), ccfg, run.preset.train_C,
                                  run.seq_lens["calm"], run.tok, run.paths["calm"], m_A, run.m_B, seed=CALM_SEED)
    params = {"theta": theta, "anchor": run.m_B.params, "augments": (m_A.params,)}
    return run.evaluate(name, ComposedLM(ccfg), params), param_count(theta), note


def _random_row(run: _Run, name: str):
    import jax

    from calm_jax.loading import Pretrained
    from calm_jax.model import init_params

    m_random = Pretrained(run.m_A.config, init_params(run.m_A.config, jax.random.key(RANDOM_M_A_SEED)), run.tok)
    return _composition_row(run, name, m_random, f"m_A = untrained model of m_A's config (seed {RANDOM_M_A_SEED})")


def _vanilla_row(run: _Run, name: str):
    import numpy as np

    from calm_jax import data as data_lib

    values = tuple(int(v) for v in np.random.default_rng(VANILLA_VALUES_SEED).permutation(run.kv.values))
    kv_other = dataclasses.replace(run.kv, values=values)
    stage = run.preset.train_A
    # m_A's expressions (as build_data draws them), substituted under the other mapping; m_A's seed.
    exprs = run.kv.train_expressions(max(stage.examples, run.preset.train_B.examples))[:stage.examples]
    records = kva.m_A_records(kv_other, exprs)
    path = os.path.join(run.out, "data", f"{name}.jsonl")
    kva._write_jsonl(path, records)
    seq_len = -(-max(len(data_lib.encode(run.tok, r, append_eos=True)[0]) for r in records) // 8) * 8
    # The model in OUT/<name>_base; OUT/<name> holds the Θ_C trained with it.
    m_vanilla = kva.train_base(f"{name}_base", run.preset.m_A, stage, seq_len, run.tok, path, run.out, seed=1,
                               max_positions=run.m_A.config.max_positions)
    same = sum(a == b for a, b in zip(values, run.kv.values))
    return _composition_row(run, name, m_vanilla, f"m_A = m_A's size and recipe, trained on KV-Substitution under "
                                                  f"another mapping ({same} of {len(values)} keys keep their value)")


def _encoder_row(run: _Run, name: str):
    import jax

    from calm_jax import checkpoint, composition

    ccfg = kva.composition_config(run.preset, run.m_A, run.m_B)
    theta = composition.init_theta(ccfg, jax.random.key(CALM_SEED))
    print(composition.describe(ccfg, theta))
    checkpoint.save_composition_config(os.path.join(run.out, name), ccfg)
    frozen = {"anchor": run.m_B.params, "augments": (run.m_A.params,)}
    theta = run.train_on_dc(name, composition.encoder_mode_loss(ccfg), theta, frozen,
                            checkpoint.composition_bases(run.m_B, [run.m_A]))
    params = {"theta": theta, **frozen}
    scores = run.evaluate(name, composition.ComposedLM(ccfg, encoder_mode=True), params)
    return scores, composition.param_count(theta), ("m_A sees only the prompt, in training "
                                                    "(composition.encoder_mode_loss) and decoding (encoder mode)")


def _theta_count(run: _Run) -> int:
    import jax

    from calm_jax import composition

    ccfg = kva.composition_config(run.preset, run.m_A, run.m_B)
    return composition.param_count(jax.eval_shape(lambda: composition.init_theta(ccfg, jax.random.key(0))))


def _lora_row(run: _Run, name: str):
    import jax

    from calm_jax import checkpoint, lora
    from calm_jax.train_step import lm_loss

    budget = _theta_count(run)
    rank = lora.rank_for_budget(run.m_B.config, budget)
    model = lora.LoRALM(run.m_B.config, rank)
    factors = lora.init_lora(run.m_B.config, rank, jax.random.key(LORA_SEED))
    count = lora.param_count(run.m_B.config, rank)
    what = (f"rank {rank}, alpha {model.alpha:g} on {', '.join(lora.resolve_targets(run.m_B.config))} of every "
            f"layer: {count:,} parameters (Θ_C: {budget:,})")
    print(f"LoRA on m_B: {what}")
    factors = run.train_on_dc(name, lm_loss(model.apply, lora.join_lora), factors, run.m_B.params,
                              {"base": checkpoint.fingerprint(run.m_B.config, run.m_B.params)})
    scores = run.evaluate(name, model, {"base": run.m_B.params, "lora": factors})
    return scores, count, what


def _finetune_row(run: _Run, name: str):
    from calm_jax import checkpoint
    from calm_jax.composition import param_count
    from calm_jax.model import PlainLM
    from calm_jax.train_step import lm_loss

    model = PlainLM(run.m_B.config)
    params = run.train_on_dc(name, lm_loss(model.apply), run.m_B.params, {},
                             {"init": checkpoint.fingerprint(run.m_B.config, run.m_B.params)})
    return run.evaluate(name, model, params), param_count(params), "every weight of m_B trained on D_C"


def _option_row(run: _Run, name: str):
    flipped = not getattr(run.preset, name)
    return _composition_row(run, name, run.m_A, f"calm with {name} {'on' if flipped else 'off'}", **{name: flipped})


def _calm_row(run: _Run, name: str):
    # Table 1's Θ_C is this row's: same D_C, stage and seed. Reused from OUT/calm (trained there
    # when missing); train_composition checks its recipe and wiring first.
    return _composition_row(run, name, run.m_A, "the composition as configured by the preset (Table 1's Θ_C, "
                                                "OUT/calm)", run_dir=os.path.join(run.main_out, "calm"))


def _row(run: _Run, name: str):
    """One row of ROWS: (scores per task, trainable parameter count, note)."""
    if name in ("m_A", "m_B"):
        return _plain_row(run, name)
    if name in OPTIONS:
        return _option_row(run, name)
    return {"calm": _calm_row, "random_m_A": _random_row, "vanilla_m_A": _vanilla_row, "encoder_m_A": _encoder_row,
            "lora_m_B": _lora_row, "finetune_m_B": _finetune_row}[name](run, name)


def run_ablations(preset_name: str, out: str, overrides=(), workers: int | None = None) -> dict:
    """Every ablation row into OUT/ablations; returns the ablations.json content.

    workers: rows run at once, each in its own process (default_workers: one per CPU core).
    """
    start = time.perf_counter()
    timer = kva.Timer()
    run = _setup(preset_name, out, "ablations", timer, overrides)
    workers = default_workers(len(ROWS)) if workers is None else workers
    table = {"trainable_params": {}, "notes": {}, "seconds": timer.seconds,
             "config": {"preset": preset_name, "overrides": list(overrides),
                        **kva.describe_config(run.preset, run.kv, run.seq_lens),
                        "eval_sizes": {t: len(r) for t, r in run.eval_sets.items()}, "workers": workers,
                        "seeds": {"theta": CALM_SEED, "random_m_A": RANDOM_M_A_SEED,
                                  "vanilla_values": VANILLA_VALUES_SEED, "lora": LORA_SEED}}}

    def done(name, result):
        scores, count, note = result
        table[name] = scores
        table["trainable_params"][name] = count
        table["notes"][name] = note
        print(f"{name}: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in scores.items())
              + f"; {count:,} trainable; {timer.seconds[name]:.1f}s", flush=True)
        _write_json(os.path.join(run.out, "ablations.json"), table)

    _run_jobs("ablations", ROWS, run, (preset_name, tuple(overrides), out), workers, timer, done,
              longest_first=_COST_ORDER)
    timer.seconds["total"] = round(time.perf_counter() - start, 1)
    table = {**{name: table[name] for name in ROWS}, **{k: v for k, v in table.items() if k not in ROWS}}
    table["trainable_params"] = {name: table["trainable_params"][name] for name in ROWS}
    table["notes"] = {name: table["notes"][name] for name in ROWS}
    _write_json(os.path.join(run.out, "ablations.json"), table)
    md = ablations_markdown(table)
    with open(os.path.join(run.out, "ablations.md"), "w") as f:
        f.write(f"# Ablations: key-value arithmetic (preset `{kva.preset_label(preset_name, overrides)}`)\n\n" + md)
    plot_ablations(table, os.path.join(run.out, "ablations.png"),
                   f"Key-value arithmetic ablations, preset {kva.preset_label(preset_name, overrides)}; "
                   f"total {timer.seconds['total']:.0f}s")
    print(md)
    return table


def ablations_markdown(table: dict) -> str:
    """One row per ablation: accuracy % on the four tasks, trainable parameters, seconds, what it is."""
    lines = ["| row | " + " | ".join(kva.TASK_NAMES[t] for t in kva.EVAL_TASKS) + " | trainable params | s | what |",
             "|---|" + "---:|" * (len(kva.EVAL_TASKS) + 2) + "---|"]
    for name in ROWS:
        cells = [f"{100 * table[name][t]:.1f}" for t in kva.EVAL_TASKS]
        count = table["trainable_params"][name]
        cells += [f"{count:,}" if count else "-", f"{table['seconds'][name]:.0f}", table["notes"][name]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    forgetting = (f"\nForgetting: Numeric-Arithmetic of m_B {100 * table['m_B']['numeric_arithmetic']:.1f}% before, "
                  f"{100 * table['finetune_m_B']['numeric_arithmetic']:.1f}% after full fine-tuning on D_C "
                  f"(CALM: {100 * table['calm']['numeric_arithmetic']:.1f}%).\n")
    note = ("\nExact match of greedy generation (accuracy %); every trained row uses the same D_C and training "
            "stage. Paper (Table 5, FLORES languages better than m_B, same added parameters): CALM 175, vanilla "
            "m_A 115, random m_A 43, m_A as encoder 102, LoRA 82.\n")
    return "\n".join(lines) + "\n" + forgetting + note


def plot_ablations(table: dict, path: str, title: str) -> None:
    """Grouped bars: per row, one bar per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(ROWS))
    width = 0.8 / len(kva.EVAL_TASKS)
    fig, ax = plt.subplots(figsize=(13, 4.5))
    for k, task in enumerate(kva.EVAL_TASKS):
        ax.bar(x + (k - (len(kva.EVAL_TASKS) - 1) / 2) * width, [100 * table[r][task] for r in ROWS], width,
               label=kva.TASK_NAMES[task])
    ax.set_xticks(x, ROWS, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 118)  # room for the legend above 100%
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- running rows (or sweep points) side by side -------------------------------------------------------
# On CPU these small models keep two cores only partly busy: two rows in two processes, one core
# each, finish sooner than the same rows one after the other on both cores.

# ROWS, longest first (results/kv_arithmetic/ablations), so that no long row starts last.
_COST_ORDER = ("finetune_m_B", "lora_m_B", "vanilla_m_A", "gate", "zero_init_out", "query_norm", "encoder_m_A",
               "cross_rope", "random_m_A", "calm", "m_A", "m_B")


def default_workers(jobs: int) -> int:
    """One worker process per usable CPU core (at most `jobs`) on CPU; 1 on an accelerator."""
    import jax

    if jax.default_backend() != "cpu":
        return 1
    return max(1, min(jobs, len(_usable_cores())))


def _usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _core_sets(workers: int) -> list:
    """Disjoint CPU core lists, one per worker (None each: not pinned, when not on CPU)."""
    import jax

    if jax.default_backend() != "cpu" or not hasattr(os, "sched_setaffinity"):
        return [None] * workers
    cores = _usable_cores()
    if workers > len(cores):
        raise ValueError(f"{workers} workers asked for, but this process may use only {len(cores)} CPU cores")
    return [cores[i * len(cores) // workers:(i + 1) * len(cores) // workers] for i in range(workers)]


def _job(kind: str, run: _Run, name: str):
    if kind == "ablations":
        return _row(run, name)
    return _sweep_point(run, _FRACTIONS_BY_NAME[name], _base_expressions(run))


def _run_jobs(kind: str, names, run: _Run, setup_args: tuple, workers: int, timer, done, longest_first) -> None:
    """done(name, _job(kind, run, name)) for every name: in this process one after the other
    (workers <= 1), or in `workers` processes, each pinned to its own CPU cores, started in the
    order `longest_first`. Each worker loads the data and base models `run` holds (setup_args:
    preset name, overrides, OUT) and writes its output to OUT/<kind>/logs/<name>.log."""
    if workers <= 1:
        for name in names:
            with timer.stage(name):
                result = _job(kind, run, name)
            done(name, result)
        return
    import concurrent.futures
    import multiprocessing

    from tqdm.auto import tqdm

    cores = _core_sets(workers)
    logs = os.path.join(run.out, "logs")
    print(f"{kind}: {len(names)} jobs in {workers} worker processes"
          + (f" (cores {', '.join(map(str, cores))})" if cores[0] is not None else "")
          + f"; the output of each: {logs}/<name>.log", flush=True)
    context = multiprocessing.get_context("spawn")  # a forked JAX runtime is not safe to use
    queue = context.Queue()
    for c in cores:
        queue.put(c)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                initargs=(queue,)) as pool, \
            tqdm(total=len(names), desc=kind, unit="job", dynamic_ncols=True) as bar:
        futures = {pool.submit(_worker_job, kind, *setup_args, name, os.path.join(logs, f"{name}.log")): name
                   for name in longest_first}
        try:
            for future in concurrent.futures.as_completed(futures):
                name = futures[future]
                try:
                    result, seconds = future.result()
                except Exception as e:
                    raise RuntimeError(f"{kind} job {name!r} failed: {type(e).__name__}: {e} "
                                       f"(its output: {os.path.join(logs, name + '.log')})") from e
                timer.seconds[name] = seconds
                bar.update(1)
                bar.set_postfix_str(name)
                with tqdm.external_write_mode():  # done() prints a line; keep it off the bar's
                    done(name, result)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the jobs not started yet; running ones finish (resumable)
            raise


def _worker_init(queue) -> None:
    cores = queue.get()
    if cores is not None:
        os.sched_setaffinity(0, cores)  # before JAX starts, so that its thread pools match
    os.environ.setdefault("TQDM_MININTERVAL", "10")  # bars go to a log file: a line per 10 s


_WORKER_RUNS: dict = {}  # per worker process: the _Run of each (kind, preset, overrides, OUT)


def _worker_job(kind: str, preset_name: str, overrides: tuple, out: str, name: str, log: str):
    """One job in a worker process, its output (Python's and the runtime's) into `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.makedirs(os.path.dirname(log), exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        key = (kind, preset_name, overrides, out)
        if key not in _WORKER_RUNS:
            _WORKER_RUNS[key] = _setup(preset_name, out, kind, kva.Timer(), overrides, write=False)
        timer = kva.Timer()
        with timer.stage(name):
            result = _job(kind, _WORKER_RUNS[key], name)
        return result, timer.seconds[name]
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


# --- the held-in fraction sweep ---------------------------------------------------------------------

def unseen_eval_sets(kv, base_exprs: set) -> tuple[dict, dict]:
    """KV-Arithmetic records of `kv`'s evaluation sets without the expressions in `base_exprs`.

    Returns ({task: records}, {task: expressions dropped}) for SWEEP_TASKS.
    """
    sets, dropped = {}, {}
    for task, exprs in (("kv_arithmetic", kv.eval_all), ("kv_arithmetic_heldout", kv.eval_heldout)):
        kept = [e for e in exprs if e not in base_exprs]
        sets[task], dropped[task] = kv.records(kept, "kv_arithmetic"), len(exprs) - len(kept)
        if not kept:
            raise ValueError(f"every {task} evaluation expression of held_in_fraction={kv.config.held_in_fraction} "
                             "was in the base models' training data; raise n_kv or n_eval")
    return sets, dropped


def _fraction_name(fraction: float) -> str:
    return f"held_in_{100 * fraction:g}pct"


_FRACTIONS_BY_NAME = {_fraction_name(f): f for f in SWEEP_FRACTIONS}


def _base_expressions(run: _Run) -> set:
    """Every expression m_A or m_B was trained on, drawn as build_data draws them."""
    return set(run.kv.train_expressions(max(run.preset.train_A.examples, run.preset.train_B.examples)))


def _sweep_point(run: _Run, fraction: float, base_exprs: set) -> dict:
    from calm_jax.composition import ComposedLM
    from calm_jax.data import read_jsonl

    preset = dataclasses.replace(run.preset, task=run.preset.task.replace(held_in_fraction=fraction))
    work = os.path.join(run.out, _fraction_name(fraction))
    kv, _, paths, seq_lens = kva.build_data(preset, work)
    if (kv.keys, kv.values) != (run.kv.keys, run.kv.values):
        raise ValueError(f"held_in_fraction={fraction} changes D_KV's keys or values: the base models do not "
                         "belong to this fraction's data")
    eval_sets, dropped = unseen_eval_sets(kv, base_exprs)
    for task, records in eval_sets.items():  # what was evaluated, in place of build_data's unfiltered sets
        kva._write_jsonl(paths[f"eval_{task}"], records)
    # build_data writes a whole run; the base-model files here are not what the base models saw.
    for name in ("m_A", "m_B", "eval_kv_substitution", "eval_numeric_arithmetic"):
        os.remove(paths[name])
    print(f"held-in {100 * fraction:g}%: {len(kv.held_in)} held-in keys, {len(kv.held_out)} held-out; evaluation "
          + ", ".join(f"{t} {len(r)} ({dropped[t]} dropped: in the base models' data)" for t, r in eval_sets.items()))
    ccfg = kva.composition_config(run.preset, run.m_A, run.m_B)
    # At the preset's own fraction, D_C is Table 1's: its Θ_C (OUT/calm) is reused (recipe-checked).
    theta_dir = os.path.join(run.main_out if fraction == run.preset.task.held_in_fraction else work, "calm")
    theta = kva.train_composition(theta_dir, ccfg, run.preset.train_C, seq_lens["calm"], run.tok, paths["calm"],
                                  run.m_A, run.m_B, seed=CALM_SEED)
    point = dataclasses.replace(run, out=work, eval_sets=eval_sets)
    scores = point.evaluate(f"calm-{_fraction_name(fraction)}", ComposedLM(ccfg),
                            {"theta": theta, "anchor": run.m_B.params, "augments": (run.m_A.params,)})
    dc_prompts = [r["prompt"] for r in read_jsonl(paths["calm"])]
    return {"held_in_fraction": fraction, "held_in_keys": len(kv.held_in), "held_out_keys": len(kv.held_out),
            "dc_examples": len(dc_prompts), "dc_distinct": len(set(dc_prompts)), **scores,
            "theta_dir": os.path.relpath(theta_dir, run.main_out),
            "eval_sizes": {t: len(r) for t, r in eval_sets.items()}, "eval_dropped": dropped}


def run_sweep(preset_name: str, out: str, overrides=(), workers: int | None = None) -> dict:
    """Θ_C per held-in key fraction (SWEEP_FRACTIONS) into OUT/sweep; returns the sweep.json content.

    workers: points run at once, each in its own process (default_workers).
    """
    start = time.perf_counter()
    timer = kva.Timer()
    run = _setup(preset_name, out, "sweep", timer, overrides)
    names = [_fraction_name(f) for f in SWEEP_FRACTIONS]
    workers = default_workers(len(names)) if workers is None else workers
    points = {}

    def done(name, point):
        points[name] = {**point, "seconds": timer.seconds[name]}
        print(f"held-in {100 * point['held_in_fraction']:g}%: "
              + ", ".join(f"{t} {100 * point[t]:.1f}%" for t in SWEEP_TASKS) + f"; {timer.seconds[name]:.1f}s",
              flush=True)

    reused = _fraction_name(run.preset.task.held_in_fraction)  # evaluation only: last
    _run_jobs("sweep", names, run, (preset_name, tuple(overrides), out), workers, timer, done,
              longest_first=sorted(names, key=lambda n: n == reused))
    timer.seconds["total"] = round(time.perf_counter() - start, 1)
    sweep = {"points": [points[name] for name in names], "seconds": timer.seconds,
             "config": {"preset": preset_name, "overrides": list(overrides),
                        **kva.describe_config(run.preset, run.kv, run.seq_lens), "workers": workers,
                        "fractions": list(SWEEP_FRACTIONS), "base_model_expressions": len(_base_expressions(run))}}
    _write_json(os.path.join(run.out, "sweep.json"), sweep)
    md = sweep_markdown(sweep)
    with open(os.path.join(run.out, "sweep.md"), "w") as f:
        f.write("# Held-in key fraction sweep: key-value arithmetic "
                f"(preset `{kva.preset_label(preset_name, overrides)}`)\n\n" + md)
    plot_sweep(sweep, os.path.join(run.out, "sweep.png"),
               f"CALM vs held-in key fraction, preset {kva.preset_label(preset_name, overrides)}; "
               f"total {timer.seconds['total']:.0f}s")
    print(md)
    return sweep


def sweep_markdown(sweep: dict) -> str:
    lines = ["| held-in keys | D_C (distinct) | KV-Arithmetic held-out keys | n | KV-Arithmetic all keys | n | s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for p in sweep["points"]:
        lines.append(f"| {100 * p['held_in_fraction']:g}% ({p['held_in_keys']}) | {p['dc_examples']} "
                     f"({p['dc_distinct']}) | {100 * p['kv_arithmetic_heldout']:.1f} | "
                     f"{p['eval_sizes']['kv_arithmetic_heldout']} | {100 * p['kv_arithmetic']:.1f} | "
                     f"{p['eval_sizes']['kv_arithmetic']} | {p['seconds']:.0f} |")
    note = ("\nExact match of greedy generation (accuracy %), iterative CALM; same base models, composition and "
            "training stage at every fraction. n: evaluation expressions left after dropping those the base models "
            "were trained on (each fraction draws its own held-out set).\n")
    return "\n".join(lines) + "\n" + note


def plot_sweep(sweep: dict, path: str, title: str) -> None:
    """Accuracy against the held-in fraction (categorical x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{100 * p['held_in_fraction']:g}%" for p in sweep["points"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in ("kv_arithmetic_heldout", "kv_arithmetic"):
        ax.plot(labels, [100 * p[task] for p in sweep["points"]], "o-", label=kva.TASK_NAMES[task])
    ax.set_xlabel("keys in D_C (held-in fraction)")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_json(path: str, content: dict) -> None:
    with open(path, "w") as f:
        json.dump(content, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.kv_ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", choices=tuple(kva._presets()))
    parser.add_argument("--out", default=os.path.join("runs", "kv_arithmetic"), metavar="DIR",
                        help="the main run's directory (its m_A, m_B are reused)")
    parser.add_argument("--ablations", action="store_true", help="only the ablations (default: both)")
    parser.add_argument("--sweep", action="store_true", help="only the held-in fraction sweep (default: both)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="rows run at once, each in its own process (default: one per CPU core on CPU)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, found {args.workers}")
    both = not (args.ablations or args.sweep)
    if args.ablations or both:
        run_ablations(args.preset, args.out, workers=args.workers)
    if args.sweep or both:
        run_sweep(args.preset, args.out, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
