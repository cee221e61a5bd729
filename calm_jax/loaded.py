"""Models set up from their directories, checked and ready to use: one path for the command lines
(train.compose, every eval.* script), the studies and notebooks.

    lm = calm_jax.load_composition("m_B/", ["m_A/"], "runs/calm")  # a run directory or an export
    lm.generate(["[KVA]ab+cd="], max_new_tokens=8)[0].text
    lm.loglik([{"prompt": "2+2=", "target": "4"}])                    # [(log-probability, tokens)]
    calm_jax.load_model("m_B/").generate(["2+2="], max_new_tokens=4)   # a plain model, same interface

Everything that needs no weights is checked before any weight is read (`check_model`,
`check_composition`: configs; the tokenizer of every model, one vocabulary for all, its every id
a row of each model's table; a trained Θ_C's step and, where a wiring is asked for, that Θ_C is
wired so), so bad input fails in seconds; `load_checked` continues from what they return.
Θ_C is either read from a `train.compose` run or export (its base models' content hashes
checked against the weights loaded, its wiring the one it was trained with) or freshly
initialised from a `Wiring` (default: the paper's layers, no options) and a seed.
`compose` does the same for models already in memory (the studies' freshly trained ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax

from calm_jax import checkpoint, decoding, scoring
from calm_jax.composition import (ComposedLM, CompositionConfig, CompositionError, CompositionOptions,
                                  check_tokenizer_fits, check_vocabularies, init_theta)
from calm_jax.config import ModelConfig
from calm_jax.loading import CheckpointError, Pretrained, load_config, load_pretrained, load_tokenizer
from calm_jax.model import PlainLM


@dataclasses.dataclass(frozen=True)
class Wiring:
    """How a fresh Θ_C joins the models (a trained one carries its own).

    connections: per augmenting model, (augment layer, anchor layer) pairs, or {model: pairs};
      None: the paper's default (`calm_jax.composition.default_connections`).
    num_heads: cross-attention heads (None: the anchor's). options: beyond the paper (all off).
    """

    connections: Any = None
    num_heads: int | None = None
    options: CompositionOptions = CompositionOptions()

    def config(self, anchor: ModelConfig, augments: Sequence[ModelConfig]) -> CompositionConfig:
        return CompositionConfig(anchor=anchor, augments=tuple(augments), connections=self.connections,
                                 num_heads=self.num_heads, options=self.options)


@dataclasses.dataclass(frozen=True)
class Checked:
    """What the checks read from the directories (no weights): enough to check data against.

    dirs, configs: the models, the anchor (or the plain model) first. composition: the wiring
    asked for as a config (None: a plain model, or a trained Θ_C's own wiring). theta_dir, step:
    the trained Θ_C to load (None: a fresh one).
    """

    dirs: tuple[str, ...]
    configs: tuple[ModelConfig, ...]
    tokenizer: Any
    dtype: str = "float32"
    param_dtype: str | None = None
    composition: CompositionConfig | None = None
    theta_dir: str | None = None
    step: int | None = None

    @property
    def is_composition(self) -> bool:
        return len(self.dirs) > 1

    @property
    def max_positions(self) -> int:
        """The positions every model has (a composition's limit is its shortest model's)."""
        return min(c.max_positions for c in self.configs)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A plain model or a composition with its parameters and tokenizer, ready to use.

    model: a PlainLM or ComposedLM (the jitted functions' static argument); params: its tree
    ({"theta", "anchor", "augments"} for a composition); models: the frozen models, anchor
    first; theta_dir, step: where Θ_C came from (None: freshly initialised, or a plain model).
    """

    model: PlainLM | ComposedLM
    params: Any
    tokenizer: Any
    models: tuple[Pretrained, ...]
    theta_dir: str | None = None
    step: int | None = None

    @property
    def composition(self) -> CompositionConfig | None:
        return self.model.ccfg if isinstance(self.model, ComposedLM) else None

    def with_theta(self, theta) -> LoadedModel:
        """The same composition with another Θ_C (e.g. once trained)."""
        return dataclasses.replace(self, params={**self.params, "theta": theta})

    def generate(self, texts: Sequence[str], **kwargs) -> list[decoding.Generation]:
        """`calm_jax.decoding.generate` on these prompts (max_new_tokens=, stop=, sampling=, ...);
        iterative decoding for a composition (every model sees every generated token)."""
        return decoding.generate(self.model, self.params, list(texts), tokenizer=self.tokenizer, **kwargs)

    def loglik(self, records: Sequence[dict], batch_size: int = 8) -> list[tuple[float, int]]:
        """`calm_jax.scoring.loglik`: (summed log-probability of the target, its token count) per
        {"prompt", "target"} or {"text"} record."""
        return scoring.loglik(self.model, self.params, self.tokenizer, records, batch_size)


def shared_tokenizer(dirs: Sequence[str], configs: Sequence[ModelConfig], tokenizers: Sequence | None = None):
    """The tokenizer of the models in `dirs` (anchor first), checked to be one for all: each has
    one, all have the anchor's vocabulary, and its every id has a row in each model's embedding
    table (they may pad it differently). tokenizers: already loaded (default: from `dirs`).
    Raises CheckpointError (no tokenizer files) or CompositionError."""
    tokenizers = [load_tokenizer(d) for d in dirs] if tokenizers is None else list(tokenizers)
    if tokenizers[0] is None:
        raise CheckpointError(f"{dirs[0]} has no tokenizer files (tokenizer.json, ...): text cannot be encoded")
    missing = [d for d, t in zip(dirs[1:], tokenizers[1:]) if t is None]
    if missing:
        raise CheckpointError(f"{missing[0]} has no tokenizer files, so its vocabulary cannot be checked")
    if len(dirs) > 1:
        check_vocabularies(tokenizers[0], tokenizers[1:])
        check_tokenizer_fits(tokenizers[0], configs[0], configs[1:], dirs=list(dirs))
    return tokenizers[0]


def check_model(path: str, *, dtype: str = "float32", param_dtype: str | None = None) -> Checked:
    """The checks of `load_model` that read no weights: its config and tokenizer."""
    config = load_config(path, dtype=dtype, param_dtype=param_dtype)
    return Checked((path,), (config,), shared_tokenizer([path], [config]), dtype, param_dtype)


def check_composition(anchor_dir: str, augment_dirs: Sequence[str], theta_dir: str | None = None, *,
                      wiring: Wiring | None = None, step: int | None = None, dtype: str = "float32",
                      param_dtype: str | None = None) -> Checked:
    """The checks of `load_composition` that read no weights.

    wiring: the composition asked for. Without `theta_dir` it is what a fresh Θ_C is built as
      (None: `Wiring()`); with one, the trained Θ_C must be wired so (None: take it as trained).
    Raises CompositionError, CheckpointError (BaseModelMismatch for another wiring) or ConfigError.
    """
    augment_dirs = tuple(augment_dirs)
    if not augment_dirs:
        raise CompositionError("a composition needs at least one augmenting model")
    dirs = (anchor_dir, *augment_dirs)
    configs = tuple(load_config(d, dtype=dtype, param_dtype=param_dtype) for d in dirs)
    if wiring is None and theta_dir is None:
        wiring = Wiring()
    ccfg = wiring.config(configs[0], configs[1:]) if wiring is not None else None
    if theta_dir is not None:
        step = checkpoint.composition_step(theta_dir, step)  # it has a Θ_C
        if ccfg is not None:
            checkpoint.check_wiring(theta_dir, ccfg)
    return Checked(dirs, configs, shared_tokenizer(dirs, configs), dtype, param_dtype, ccfg, theta_dir, step)


def load_checked(checked: Checked, *, shardings: Callable[[ModelConfig], Any] | None = None, theta_seed: int = 0,
                 encoder_mode: bool = False) -> LoadedModel:
    """Loads the weights of what `check_model` / `check_composition` checked.

    shardings: cfg -> a sharding tree of its parameters (`calm_jax.sharding.param_shardings`),
      to place each weight as it is read; default: the first device.
    theta_seed: the seed of a fresh Θ_C. encoder_mode: the paper's "m_A as encoder" ablation.
    """
    models = tuple(load_pretrained(d, dtype=checked.dtype, param_dtype=checked.param_dtype, shardings=shardings,
                                   tokenizer=False) for d in checked.dirs)
    models = (dataclasses.replace(models[0], tokenizer=checked.tokenizer), *models[1:])
    if not checked.is_composition:
        return LoadedModel(PlainLM(models[0].config), models[0].params, checked.tokenizer, models)
    return _compose(models[0], models[1:], checked.theta_dir, checked.step, checked.composition, theta_seed,
                    encoder_mode)


def compose(anchor: Pretrained, augments: Sequence[Pretrained], theta_dir: str | None = None, *,
            wiring: Wiring | None = None, step: int | None = None, theta_seed: int = 0,
            encoder_mode: bool = False) -> LoadedModel:
    """A composition of models already in memory (each with its tokenizer): the tokenizer checks,
    then Θ_C, read from `theta_dir` (checked against these very weights; `step`: which
    checkpoint) or fresh from `wiring` (default: the paper's) with seed `theta_seed`."""
    names = ["the anchor", *(f"augmenting model {k}" for k in range(len(augments)))]
    models = (anchor, *augments)
    shared_tokenizer(names, [m.config for m in models], [m.tokenizer for m in models])
    config = None
    if theta_dir is None:
        config = (wiring or Wiring()).config(anchor.config, [a.config for a in augments])
    elif wiring is not None:
        checkpoint.check_wiring(theta_dir, wiring.config(anchor.config, [a.config for a in augments]))
    return _compose(anchor, tuple(augments), theta_dir, step, config, theta_seed, encoder_mode)


def _compose(anchor: Pretrained, augments: tuple[Pretrained, ...], theta_dir: str | None, step: int | None,
             config: CompositionConfig | None, theta_seed: int, encoder_mode: bool) -> LoadedModel:
    frozen = {"anchor": anchor.params, "augments": tuple(a.params for a in augments)}
    if theta_dir is not None:  # checks the base models are the ones it was trained with
        step = checkpoint.composition_step(theta_dir, step)
        ccfg, theta = checkpoint.load_theta(theta_dir, anchor, augments, step=step)
    else:
        ccfg = config
        theta = init_theta(ccfg, jax.random.key(theta_seed))
    return LoadedModel(ComposedLM(ccfg, encoder_mode=encoder_mode), {"theta": theta, **frozen}, anchor.tokenizer,
                       (anchor, *augments), theta_dir, step)


def load_model(path: str, *, dtype: str = "float32", param_dtype: str | None = None,
               shardings: Callable[[ModelConfig], Any] | None = None) -> LoadedModel:
    """A plain HF model directory, as a LoadedModel (its tokenizer required)."""
    return load_checked(check_model(path, dtype=dtype, param_dtype=param_dtype), shardings=shardings)


def load_composition(anchor_dir: str, augment_dirs: Sequence[str], theta_dir: str | None = None, *,
                     wiring: Wiring | None = None, step: int | None = None, dtype: str = "float32",
                     param_dtype: str | None = None, shardings: Callable[[ModelConfig], Any] | None = None,
                     theta_seed: int = 0, encoder_mode: bool = False) -> LoadedModel:
    """An anchor (HF directory) composed with augmenting models (HF directories) by the Θ_C of
    `theta_dir` (a `train.compose` run directory or a `train.export` directory; `step`: which
    checkpoint, default the latest) or by a fresh Θ_C (`wiring`, `theta_seed`). See
    `check_composition` for what is checked before the weights load, `load_checked` for the rest.
    dtype: compute dtype of the frozen models; param_dtype: their storage dtype (default: dtype).
    """
    checked = check_composition(anchor_dir, augment_dirs, theta_dir, wiring=wiring, step=step, dtype=dtype,
                                param_dtype=param_dtype)
    return load_checked(checked, shardings=shardings, theta_seed=theta_seed, encoder_mode=encoder_mode)
