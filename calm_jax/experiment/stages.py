"""The training stages of a study, each kept on disk and reused only when its recipe matches.

  train_base         a plain LM from scratch (every weight trainable)     -> OUT/<name> (HF format)
  train_composition  Θ_C on D_C with both models frozen                    -> OUT/<run dir>
  train_on_dc        anything else trained on D_C (LoRA, fine-tuning, encoder-mode Θ_C)
All use calm_jax.trainer (one jitted step, AdamW, orbax checkpoints), resume an interrupted
run, and record in RUN/recipe.json what they were trained from (`training_recipe`): a rerun
with other data or settings into the same directory stops with an error naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import jax

from calm_jax import checkpoint, composition, losses, records, trainer
from calm_jax import data as data_lib
from calm_jax.loaded import LoadedModel, Wiring, compose
from calm_jax.loading import Pretrained, load_pretrained, save_pretrained
from calm_jax.losses import lm_loss
from calm_jax.model import PlainLM, init_params

RECIPE_FILE = "recipe.json"
# TrainConfig fields that do not change what is trained (how it is shown, saved or placed).
_NOT_RECIPE = ("progress", "eval_every", "eval_batches", "save_every", "keep", "mesh", "fsdp")


class Timer:
    """Per-stage wall time, printed as each stage ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                print(f"== {name}", flush=True)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.start, 1)
                if exc[0] is None:
                    print(f"== {name}: {timer.seconds[name]:.1f}s", flush=True)
                return False

        return _Stage()


def training_recipe(tcfg, data_path: str, **more) -> dict:
    """What a trained artefact was made from: its data file (SHA-256), its TrainConfig, and `more`."""
    with open(data_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    train = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in _NOT_RECIPE}
    return json.loads(json.dumps({"data_sha256": digest, "train": train, **more}))


def check_recipe(directory: str, recipe: dict, trained: bool) -> None:
    """Guards reuse of a trained artefact: `directory` holds (or will hold) what `recipe` makes.

    A recorded recipe that differs raises ValueError naming the directory and every field that
    differs, so a rerun with other data or settings never reuses (or resumes) the old result.
    With no record: writes one when nothing is trained there yet, else warns (unverifiable).
    """
    path = os.path.join(directory, RECIPE_FILE)
    if not os.path.isfile(path) and trained:
        print(f"warning: {directory} has no {RECIPE_FILE}; reusing it without checking what it was trained on")
        return
    records.check_or_write(path, recipe, mismatch=lambda diffs: ValueError(
        f"{directory} was trained from another recipe than this run's ({'; '.join(diffs)}); "
        "rerun with --fresh, or choose another --out"))


def check_run_recipe(run_dir: str, recipe: dict) -> None:
    """check_recipe for a trainer run directory (trained there = it has checkpoints)."""
    check_recipe(run_dir, recipe, trained=os.path.isdir(os.path.join(run_dir, "checkpoints")))


def train_base(name: str, size, stage, seq_len: int, tok, data_path: str, out: str, seed: int, max_positions: int):
    """Trains a plain LM of `size` (calm_jax.experiment.spec.ModelSize) on `data_path` for
    `stage`; saves it as OUT/name (HF format) and returns it loaded (loading.Pretrained).

    Kept across runs: an existing OUT/name is loaded instead of retrained, after checking that
    it was trained on the same data with the same settings (check_recipe).
    """
    final = os.path.join(out, name)
    cfg = size.config(len(tok), max_positions)
    tcfg = stage.train_config(seq_len, seed)
    recipe = training_recipe(tcfg, data_path, model=dataclasses.asdict(size), vocab_size=len(tok),
                             max_positions=max_positions)
    if os.path.isfile(os.path.join(final, "config.json")):
        check_recipe(final, recipe, trained=True)
        print(f"{name}: trained model found in {final}; skipping training")
        return load_pretrained(final)
    run_dir = os.path.join(out, "runs", name)
    check_run_recipe(run_dir, recipe)
    dataset = data_lib.load_dataset(data_path, tok, seq_len)
    print(f"{name}: {size.family}, {size.layers} layers, hidden {size.hidden}, "
          f"{sum(x.size for x in jax.tree.leaves(init_params(cfg, jax.random.key(seed)))):,} parameters; "
          f"{len(dataset)} examples, {stage.steps} steps of {stage.batch_size}")
    result = trainer.train(run_dir, tcfg, lm_loss(PlainLM(cfg).apply),
                           init_params(cfg, jax.random.key(seed)), {}, dataset, resume=True)
    save_pretrained(Pretrained(cfg, jax.device_get(result.trainable), tok), final)
    shutil.copyfile(os.path.join(run_dir, RECIPE_FILE), os.path.join(final, RECIPE_FILE))
    return load_pretrained(final)


def composition_wiring(preset, **options) -> Wiring:
    """The preset's composition of m_A into m_B; `options` flip CompositionOptions fields."""
    return Wiring(connections=(preset.connections,), options=dataclasses.replace(preset.options, **options))


def train_on_dc(run_dir: str, stage, seq_len: int, tok, data_path: str, seed: int, loss_fn, trainable, frozen,
                bases: dict):
    """calm_jax.trainer on D_C (`data_path`) into `run_dir` (resumed when there, recipe-checked);
    returns the trained tree."""
    tcfg = stage.train_config(seq_len, seed)
    check_run_recipe(run_dir, training_recipe(tcfg, data_path))
    dataset = data_lib.load_dataset(data_path, tok, seq_len)
    print(f"D_C: {len(dataset)} examples, {stage.steps} steps of {stage.batch_size}")
    return trainer.train(run_dir, tcfg, loss_fn, trainable, frozen, dataset, bases=bases, resume=True).trainable


def train_composition(run_dir: str, wiring: Wiring, stage, seq_len: int, tok, data_path: str, m_A: Pretrained,
                      m_B: Pretrained, seed: int, encoder_mode: bool = False) -> LoadedModel:
    """Trains Θ_C on D_C with both models frozen (the trainer of `train.compose`); returns the
    composition (calm_jax.loaded.compose) with the trained Θ_C.

    encoder_mode: the paper's "m_A as encoder" ablation (m_A sees only each example's prompt:
      losses.encoder_mode_loss, and encoder-mode decoding).
    """
    lm = compose(m_B, [m_A], wiring=wiring, theta_seed=seed, encoder_mode=encoder_mode)
    ccfg, theta = lm.composition, lm.params["theta"]
    print(composition.describe(ccfg, theta))
    checkpoint.save_composition_config(run_dir, ccfg)
    loss_fn = (losses.encoder_mode_loss(ccfg) if encoder_mode
               else losses.lm_loss(composition.ComposedLM(ccfg).apply, losses.join_composition))
    frozen = {"anchor": lm.params["anchor"], "augments": lm.params["augments"]}
    return lm.with_theta(train_on_dc(run_dir, stage, seq_len, tok, data_path, seed, loss_fn, theta, frozen,
                                     checkpoint.composition_bases(m_B, [m_A])))
