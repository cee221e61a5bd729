"""A CALM study end to end on any Task: Table 1, the Table 5 ablations, a sweep, several seeds.

  run_table1     data, m_A, m_B, Θ_C, then m_A, m_B and CALM scored on every eval set
                 -> OUT/table1.{json,md,png}, OUT/predictions/, OUT/m_A, OUT/m_B (HF), OUT/calm
  run_ablations  the ABLATIONS rows, each trained on the same D_C with the same stage
                 -> OUT/ablations/ablations.{json,md,png}
  run_sweep      Θ_C trained on the D_C of each of the task's sweep points
                 -> OUT/sweep/sweep.{json,md,png}
  run_seeds      run_table1 once per data seed -> OUT/seeds/seeds.{json,md}, with mean/min/max
Trained models and Θ_C are kept; a rerun reuses (or resumes) them after checking their
recipe (calm_jax.experiment.stages). The ablations, sweep and seeds share OUT's base models
(trained there when missing) and run their jobs in worker processes, one per CPU core
(calm_jax.experiment.workers), each job's output in <its directory>/logs/<job>.log.

Ablation rows (the paper's Table 5; only vanilla_m_A needs the task's help):
  m_A, m_B        the base models alone (nothing trained on D_C)
  calm            the composition as the preset configures it: Table 1's Θ_C (OUT/calm)
  random_m_A      m_A replaced by an untrained model of its config
  vanilla_m_A     m_A replaced by a model of its size and recipe trained on the task's
                  vanilla data (Task.vanilla_m_A_records: the format, not the knowledge)
  encoder_m_A     m_A as an encoder: it sees only the prompt, in training and decoding
  lora_m_B        LoRA on every attention and MLP kernel of m_B, with the rank whose
                  parameter count is closest to Θ_C's (calm_jax.lora)
  finetune_m_B    every weight of m_B trained on D_C
  <option>        the composition with that CompositionOptions field flipped, one row each
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from typing import Sequence

import jax
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from calm_jax import checkpoint, composition, evaluation, lora
from calm_jax import data as data_lib
from calm_jax.composition import CompositionOptions, param_count
from calm_jax.data import read_jsonl, write_json, write_jsonl
from calm_jax.experiment import report, spec, workers as workers_lib
from calm_jax.experiment.task import Data, Task
from calm_jax.loading import Pretrained
from calm_jax.losses import lm_loss
from calm_jax.model import PlainLM, init_params
from calm_jax.overrides import apply_overrides
from calm_jax.experiment.stages import Timer, composition_wiring, train_base, train_composition, train_on_dc

OPTIONS = CompositionOptions.names()
ABLATIONS = ("m_A", "m_B", "calm", "random_m_A", "vanilla_m_A", "encoder_m_A", "lora_m_B", "finetune_m_B", *OPTIONS)
# Seeds of the ablation rows' own draws.
RANDOM_M_A_SEED = 11
LORA_SEED = 13
# ABLATIONS, longest first (measured on the key-value task), so that no long row starts last.
_COST_ORDER = ("finetune_m_B", "lora_m_B", "vanilla_m_A", *reversed(OPTIONS), "encoder_m_A", "random_m_A", "calm",
               "m_A", "m_B")


@dataclasses.dataclass
class Study:
    """What every stage after the data needs: the preset, the files, the base models, the eval sets."""

    task: Task
    preset_name: str
    overrides: tuple
    preset: spec.Preset
    out: str  # this study's directory (OUT, OUT/ablations, OUT/sweep)
    main_out: str  # OUT: its base models and Table 1's Θ_C are shared
    data: Data
    tok: PreTrainedTokenizerBase
    m_A: Pretrained
    m_B: Pretrained
    eval_sets: dict[str, list[dict]]

    @property
    def title(self) -> str:
        return f"preset `{spec.label(self.preset_name, self.overrides)}`"

    def evaluate(self, label: str, model, params, eval_sets: dict | None = None, bar=None) -> dict:
        """Greedy generation (jitted, cached; iterative for a composition) and exact match per
        eval set (calm_jax.evaluation); predictions to OUT/predictions/LABEL-SET.jsonl."""
        eval_sets = self.eval_sets if eval_sets is None else eval_sets
        own_bar = bar is None
        bar = bar or tqdm(total=len(eval_sets), desc=f"eval {label}", unit="set", dynamic_ncols=True)
        max_new_tokens = self.task.max_new_tokens(self.tok, eval_sets)
        scores = {}
        for name, records in eval_sets.items():
            scored = evaluation.generate_and_score(model, params, self.tok, records, max_new_tokens=max_new_tokens,
                                                   batch_size=min(self.preset.eval_batch, len(records)))
            scores[name] = scored.exact_match
            write_jsonl(os.path.join(self.out, "predictions", f"{label}-{name}.jsonl"), scored.rows)
            bar.update(1)
            bar.set_postfix_str(f"{label} {name}: {100 * scores[name]:.1f}%")
        if own_bar:
            bar.close()
        return scores

    def describe(self) -> dict:
        return {"preset": self.preset_name, "overrides": list(self.overrides),
                **self.task.describe(self.preset, self.data)}


def max_positions(data) -> int:
    """The base models' positions: room for four times the longest training example."""
    return 4 * max(data.seq_lens.values())


def base_models(task, preset, out: str, tok, data):
    """m_A and m_B trained on their files into OUT/m_A and OUT/m_B (loaded when there)."""
    m_A = train_base("m_A", preset.m_A, preset.train_A, data.seq_lens["m_A"], tok, data.paths["m_A"], out,
                     seed=preset.seeds.m_A, max_positions=max_positions(data))
    m_B = train_base("m_B", preset.m_B, preset.train_B, data.seq_lens["m_B"], tok, data.paths["m_B"], out,
                     seed=preset.seeds.m_B, max_positions=max_positions(data))
    return m_A, m_B


def get_preset(task, name: str, overrides: Sequence[str] = ()) -> spec.Preset:
    """The task's preset `name` with `overrides` (calm_jax.overrides.apply_overrides). Raises ValueError."""
    presets = task.presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
    return apply_overrides(presets[name], overrides)


def setup(task, preset_name: str, out: str, sub: str = "", overrides=(), write: bool = True,
          timer: Timer | None = None) -> Study:
    """The data under OUT/SUB (written unless `write` is False: another process wrote it) and
    the base models in OUT (trained when missing)."""
    timer = timer or Timer()
    preset = get_preset(task, preset_name, overrides)
    work = os.path.join(out, sub) if sub else out
    tok = task.tokenizer()
    with timer.stage("data"):
        data = task.build_data(preset, work, write=write)
    with timer.stage("base models"):
        m_A, m_B = base_models(task, preset, out, tok, data)
    eval_sets = {s: read_jsonl(data.paths[f"eval_{s}"]) for s in task.eval_sets}
    return Study(task, preset_name, tuple(overrides), preset, work, out, data, tok, m_A, m_B, eval_sets)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """setup() as a picklable value (equal arguments: equal), for worker processes."""

    task: Task
    preset_name: str
    out: str
    sub: str
    overrides: tuple

    def __call__(self) -> Study:
        return setup(self.task, self.preset_name, self.out, self.sub, self.overrides, write=False)


# --- Table 1 ------------------------------------------------------------------------------------------

def run_table1(task, preset_name: str, out: str, fresh: bool = False, overrides=()) -> dict:
    """The whole experiment; returns the table1.json content."""
    start = time.perf_counter()
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    preset = get_preset(task, preset_name, overrides)
    timer = Timer()
    tok = task.tokenizer()
    with timer.stage("data"):
        data = task.build_data(preset, out)
        print(task.data_summary(data))
    with timer.stage("m_A"):
        m_A = train_base("m_A", preset.m_A, preset.train_A, data.seq_lens["m_A"], tok, data.paths["m_A"], out,
                         seed=preset.seeds.m_A, max_positions=max_positions(data))
    with timer.stage("m_B"):
        m_B = train_base("m_B", preset.m_B, preset.train_B, data.seq_lens["m_B"], tok, data.paths["m_B"], out,
                         seed=preset.seeds.m_B, max_positions=max_positions(data))
    with timer.stage("calm"):
        calm = train_composition(os.path.join(out, "calm"), composition_wiring(preset), preset.train_C,
                                 data.seq_lens["calm"], tok, data.paths["calm"], m_A, m_B, seed=preset.seeds.theta)
    eval_sets = {s: read_jsonl(data.paths[f"eval_{s}"]) for s in task.eval_sets}
    study = Study(task, preset_name, tuple(overrides), preset, out, out, data, tok, m_A, m_B, eval_sets)
    results = {}
    with timer.stage("eval"):
        with tqdm(total=len(report.MODELS) * len(eval_sets), desc="eval", unit="set", dynamic_ncols=True) as bar:
            results["m_A"] = study.evaluate("m_A", PlainLM(m_A.config), m_A.params, bar=bar)
            results["m_B"] = study.evaluate("m_B", PlainLM(m_B.config), m_B.params, bar=bar)
            results["calm"] = study.evaluate("calm", calm.model, calm.params, bar=bar)
    timer.seconds["total"] = round(time.perf_counter() - start, 1)
    table = {**results, "config": study.describe(), "seconds": timer.seconds}
    title = f"{task.title}, {study.title}: {task.plot_subtitle(preset, data)}; total {timer.seconds['total']:.0f}s"
    md = report.table1_markdown(task, results, study.title, timer.seconds)
    report.write(out, "table1", table, md, report.table1_plot(task, results, title))
    print(md)
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in timer.seconds.items()))
    return table


# --- ablations: each row returns (scores, trainable parameter count, note) -------------------------------

def _plain_row(study: Study, name: str):
    model = getattr(study, name)
    return study.evaluate(name, PlainLM(model.config), model.params), 0, "base model alone"


def _composition_row(study: Study, name: str, m_A, note: str, run_dir: str | None = None, encoder_mode=False,
                     **options):
    """Θ_C trained (into run_dir, default OUT/ablations/<name>) with `m_A` as the augmenting model."""
    calm = train_composition(run_dir or os.path.join(study.out, name), composition_wiring(study.preset, **options),
                             study.preset.train_C, study.data.seq_lens["calm"], study.tok, study.data.paths["calm"],
                             m_A, study.m_B, seed=study.preset.seeds.theta, encoder_mode=encoder_mode)
    return study.evaluate(name, calm.model, calm.params), param_count(calm.params["theta"]), note


def _calm_row(study: Study, name: str):
    # Table 1's Θ_C is this row's: same D_C, stage and seed. Reused from OUT/calm (trained there
    # when missing); train_composition checks its recipe and wiring first.
    return _composition_row(study, name, study.m_A, "the composition as configured by the preset (Table 1's Θ_C, "
                                                    "OUT/calm)", run_dir=os.path.join(study.main_out, "calm"))


def _random_row(study: Study, name: str):
    cfg = study.m_A.config
    m_random = Pretrained(cfg, init_params(cfg, jax.random.key(RANDOM_M_A_SEED)), study.tok)
    return _composition_row(study, name, m_random, f"m_A = untrained model of m_A's config (seed {RANDOM_M_A_SEED})")


def _vanilla_row(study: Study, name: str):
    records, what = study.task.vanilla_m_A_records(study.preset, study.data)
    path = os.path.join(study.out, "data", f"{name}.jsonl")
    write_jsonl(path, records)
    seq_len = -(-max(len(data_lib.encode(study.tok, r, append_eos=True)[0]) for r in records) // 8) * 8
    # The model in OUT/<name>_base; OUT/<name> holds the Θ_C trained with it.
    m_vanilla = train_base(f"{name}_base", study.preset.m_A, study.preset.train_A, seq_len, study.tok, path, study.out,
                           seed=study.preset.seeds.m_A, max_positions=study.m_A.config.max_positions)
    return _composition_row(study, name, m_vanilla, f"m_A = m_A's size and recipe, trained on {what}")


def _encoder_row(study: Study, name: str):
    return _composition_row(study, name, study.m_A, "m_A sees only the prompt, in training "
                                                    "(losses.encoder_mode_loss) and decoding (encoder mode)",
                            encoder_mode=True)


def _lora_row(study: Study, name: str):
    ccfg = composition_wiring(study.preset).config(study.m_B.config, [study.m_A.config])
    budget = composition.param_count(jax.eval_shape(lambda: composition.init_theta(ccfg, jax.random.key(0))))
    cfg = study.m_B.config
    rank = lora.rank_for_budget(cfg, budget)
    model = lora.LoRALM(cfg, rank)
    count = lora.param_count(cfg, rank)
    what = (f"rank {rank}, alpha {model.alpha:g} on {', '.join(lora.resolve_targets(cfg))} of every "
            f"layer: {count:,} parameters (Θ_C: {budget:,})")
    print(f"LoRA on m_B: {what}")
    factors = _train_on_dc(study, name, lm_loss(model.apply, lora.join_lora),
                           lora.init_lora(cfg, rank, jax.random.key(LORA_SEED)), study.m_B.params,
                           {"base": checkpoint.fingerprint(cfg, study.m_B.params)})
    return study.evaluate(name, model, {"base": study.m_B.params, "lora": factors}), count, what


def _finetune_row(study: Study, name: str):
    model = PlainLM(study.m_B.config)
    params = _train_on_dc(study, name, lm_loss(model.apply), study.m_B.params, {},
                          {"init": checkpoint.fingerprint(study.m_B.config, study.m_B.params)})
    return study.evaluate(name, model, params), param_count(params), "every weight of m_B trained on D_C"


def _train_on_dc(study: Study, name: str, loss_fn, trainable, frozen, bases):
    return train_on_dc(os.path.join(study.out, name), study.preset.train_C, study.data.seq_lens["calm"], study.tok,
                       study.data.paths["calm"], study.preset.seeds.theta, loss_fn, trainable, frozen, bases)


def _option_row(study: Study, name: str):
    flipped = not getattr(study.preset.options, name)
    return _composition_row(study, name, study.m_A, f"calm with {name} {'on' if flipped else 'off'}",
                            **{name: flipped})


_ROWS = {"calm": _calm_row, "random_m_A": _random_row, "vanilla_m_A": _vanilla_row, "encoder_m_A": _encoder_row,
         "lora_m_B": _lora_row, "finetune_m_B": _finetune_row, "m_A": _plain_row, "m_B": _plain_row,
         **{o: _option_row for o in OPTIONS}}


def ablation_rows(names=None) -> tuple:
    """`names` (None: all) checked against ABLATIONS, with the reference rows m_A, m_B, calm added, in ABLATIONS' order."""
    if names is None:
        return ABLATIONS
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; the rows are {', '.join(ABLATIONS)}")
    wanted = {"m_A", "m_B", "calm", *names}
    return tuple(n for n in ABLATIONS if n in wanted)


def ablation_row(study: Study, name: str):
    """One row of ABLATIONS: (scores per eval set, trainable parameter count, note)."""
    return _ROWS[name](study, name)


def run_ablations(task, preset_name: str, out: str, overrides=(), workers: int | None = None,
                  rows=None) -> dict:
    """The ablation rows (default: every one of ABLATIONS) into OUT/ablations; returns the ablations.json content.

    workers: rows run at once, each in its own process (default_workers: one per CPU core).
    rows: a subset of ABLATIONS, kept in ABLATIONS' order; m_A, m_B and calm are always included
    (they are the reference rows, and cost only their evaluation once Table 1 has run).
    """
    rows = ablation_rows(rows)
    start = time.perf_counter()
    timer = Timer()
    study = setup(task, preset_name, out, "ablations", overrides, timer=timer)
    workers = workers_lib.default_workers(len(rows)) if workers is None else workers
    table = {"trainable_params": {}, "notes": {}, "seconds": timer.seconds,
             "config": {**study.describe(), "eval_sizes": {s: len(r) for s, r in study.eval_sets.items()},
                        "workers": workers, "seeds": {"theta": study.preset.seeds.theta,
                                                      "random_m_A": RANDOM_M_A_SEED, "lora": LORA_SEED}}}

    def done(name, result):
        scores, count, note = result
        table[name] = scores
        table["trainable_params"][name] = count
        table["notes"][name] = note
        print(f"{name}: " + ", ".join(f"{s} {100 * v:.1f}%" for s, v in scores.items())
              + f"; {count:,} trainable; {timer.seconds[name]:.1f}s", flush=True)
        write_json(os.path.join(study.out, "ablations.json"), table)

    workers_lib.run_jobs("ablations", rows, ablation_row, _Setup(task, preset_name, out, "ablations",
                                                                      tuple(overrides)),
                         workers, timer, done, os.path.join(study.out, "logs"),
                         order=[name for name in _COST_ORDER if name in rows], context=study)
    timer.seconds["total"] = round(time.perf_counter() - start, 1)
    table = {**{name: table[name] for name in rows}, **{k: v for k, v in table.items() if k not in ABLATIONS}}
    table["trainable_params"] = {name: table["trainable_params"][name] for name in rows}
    table["notes"] = {name: table["notes"][name] for name in rows}
    md = report.ablations_markdown(task, table, rows, study.title)
    report.write(study.out, "ablations", table, md, report.ablations_plot(
        task, table, rows, f"{task.title} ablations, {study.title}; total {timer.seconds['total']:.0f}s"))
    print(md)
    return table


# --- the sweep ------------------------------------------------------------------------------------------

def sweep_point(study: Study, name: str) -> dict:
    """Θ_C on the D_C of the task's sweep point `name`, scored on the point's eval sets."""
    point = next(p for p in study.task.sweep_points(study.preset) if p.name == name)
    work = os.path.join(study.out, name)
    data, eval_sets, info = study.task.sweep_data(study, point, work)
    # A point whose preset is the study's has Table 1's D_C: its Θ_C (OUT/calm) is reused (recipe-checked).
    theta_dir = os.path.join(study.main_out if point.preset == study.preset else work, "calm")
    calm = train_composition(theta_dir, composition_wiring(study.preset), study.preset.train_C, data.seq_lens["calm"],
                             study.tok, data.paths["calm"], study.m_A, study.m_B, seed=study.preset.seeds.theta)
    at_point = dataclasses.replace(study, out=work, eval_sets=eval_sets)
    scores = at_point.evaluate(f"calm-{name}", calm.model, calm.params)
    dc_prompts = [r["prompt"] for r in read_jsonl(data.paths["calm"])]
    return {**info, "dc_examples": len(dc_prompts), "dc_distinct": len(set(dc_prompts)), **scores,
            "theta_dir": os.path.relpath(theta_dir, study.main_out),
            "eval_sizes": {s: len(r) for s, r in eval_sets.items()}}


def run_sweep(task, preset_name: str, out: str, overrides=(), workers: int | None = None) -> dict:
    """Θ_C per sweep point (Task.sweep_points) into OUT/sweep; returns the sweep.json content.

    workers: points run at once, each in its own process (default_workers).
    """
    start = time.perf_counter()
    timer = Timer()
    study = setup(task, preset_name, out, "sweep", overrides, timer=timer)
    points = task.sweep_points(study.preset)
    names = [p.name for p in points]
    workers = workers_lib.default_workers(len(names)) if workers is None else workers
    rows = {}

    def done(name, row):
        rows[name] = {**row, "seconds": timer.seconds[name]}
        print(f"{task.sweep_label(row)}: " + ", ".join(f"{s} {100 * row[s]:.1f}%" for s in task.sweep_sets)
              + f"; {timer.seconds[name]:.1f}s", flush=True)

    reused = [p.name for p in points if p.preset == study.preset]  # evaluation only: last
    workers_lib.run_jobs("sweep", names, sweep_point, _Setup(task, preset_name, out, "sweep", tuple(overrides)),
                         workers, timer, done, os.path.join(study.out, "logs"),
                         order=sorted(names, key=lambda n: n in reused), context=study)
    timer.seconds["total"] = round(time.perf_counter() - start, 1)
    sweep = {"points": [rows[name] for name in names], "seconds": timer.seconds,
             "config": {**study.describe(), "workers": workers, **task.sweep_config(study)}}
    md = report.sweep_markdown(task, sweep, study.title)
    report.write(study.out, "sweep", sweep, md, report.sweep_plot(
        task, sweep, f"CALM vs {task.sweep_axis}, {study.title}; total {timer.seconds['total']:.0f}s"))
    print(md)
    return sweep


# --- seeds ----------------------------------------------------------------------------------------------

def training_seeds(t: int) -> tuple[str, ...]:
    """Training seed T as overrides: the three stages seeded 3T+1, 3T+2, 3T+3 (T = 0: the defaults)."""
    stages = [f.name for f in dataclasses.fields(spec.Seeds)]
    return tuple(f"seeds.{stage}={3 * t + i}" for i, stage in enumerate(stages, start=1))


def seed_run_name(data_seed: int, train_seed: int | None) -> str:
    return f"seed{data_seed}" if train_seed is None else f"data{data_seed}-train{train_seed}"


def _seed_job(task, preset_name: str, out: str, overrides: tuple, runs: dict, _context, name: str) -> dict:
    data_seed, train_seed = runs[name]
    more = (f"task.seed={data_seed}",) + (() if train_seed is None else training_seeds(train_seed))
    return run_table1(task, preset_name, os.path.join(out, name), overrides=(*overrides, *more))


def _no_setup():
    return None


def run_seeds(task, preset_name: str, out: str, seeds: Sequence[int], overrides=(),
              workers: int | None = None, train_seeds: Sequence[int] | None = None) -> dict:
    """run_table1 once per data seed (`task.seed`) into OUT/seed<S>, or, with `train_seeds`, once
    per data seed and training seed T (the stages' seeds 3T+1, 3T+2, 3T+3: `training_seeds`)
    into OUT/data<S>-train<T>; in worker processes. Writes OUT/seeds.json ({"runs": {run name:
    table1.json}, "summary": mean/min/max, "config"}) and seeds.md. Each run is a whole pipeline
    of its own (its own base models)."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"run_seeds needs distinct seeds, found {list(seeds)}")
    if train_seeds is not None and (len(set(train_seeds)) != len(train_seeds) or not train_seeds
                                    or min(train_seeds) < 0):
        raise ValueError(f"run_seeds needs distinct training seeds >= 0, found {list(train_seeds)}")
    if train_seeds is not None and any(o.startswith("seeds.") for o in overrides):
        raise ValueError(f"training seeds set the stage seeds; drop the overrides "
                         f"{[o for o in overrides if o.startswith('seeds.')]}")
    start = time.perf_counter()
    timer = Timer()
    runs = {seed_run_name(s, t): (s, t) for s in seeds for t in (train_seeds or (None,))}
    names = list(runs)
    workers = workers_lib.default_workers(len(names)) if workers is None else workers
    tables = {}
    workers_lib.run_jobs("seeds", names, functools.partial(_seed_job, task, preset_name, out, tuple(overrides), runs),
                         _no_setup, workers, timer, lambda name, table: tables.__setitem__(name, table),
                         os.path.join(out, "logs"))
    tables = {name: tables[name] for name in names}
    timer.seconds["total"] = round(time.perf_counter() - start, 1)
    seeds_json = {"runs": tables, "summary": report.spread(tables),
                  "config": {"preset": preset_name, "overrides": list(overrides), "seeds": list(seeds),
                             "train_seeds": None if train_seeds is None else list(train_seeds),
                             "workers": workers}, "seconds": timer.seconds}
    title = f"preset `{spec.label(preset_name, overrides)}`, data seeds {', '.join(map(str, seeds))}"
    if train_seeds is not None:
        title += f" × training seeds {', '.join(map(str, train_seeds))}"
    report.write(out, "seeds", seeds_json, report.seeds_markdown(task, seeds_json, title))
    print(report.seeds_markdown(task, seeds_json, title))
    return seeds_json
