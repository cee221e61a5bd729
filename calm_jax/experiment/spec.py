"""What a CALM study is made of: model sizes, training stages, seeds and the preset joining them.

A preset is one frozen dataclass tree; `apply_overrides` changes any of its fields from the
command line ("train_C.steps=6000", "task.seed=1", "options.gate=True", "seeds.theta=4").
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Sequence

from calm_jax.composition import CompositionOptions


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A decoder trained from scratch: Llama-style (RoPE) or GPT-2-style (learned positions)."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    family: str = "llama"

    def config(self, vocab_size: int, max_positions: int):
        from calm_jax.config import ModelConfig
        common = dict(vocab_size=vocab_size, hidden_size=self.hidden, num_layers=self.layers, num_heads=self.heads,
                      num_kv_heads=self.heads, head_dim=self.hidden // self.heads, intermediate_size=self.mlp,
                      max_positions=max_positions)
        if self.family == "gpt2":
            return ModelConfig(family="gpt2", norm="layer", norm_eps=1e-5, mlp="plain", activation="gelu_new",
                               qkv_bias=True, o_bias=True, mlp_bias=True, position="learned", tie_embeddings=True,
                               **common)
        return ModelConfig(family=self.family, **common)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run: how many distinct examples it draws from, and the optimizer schedule."""

    examples: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    b2: float = 0.999  # Adam's second-moment decay
    clip: float = 1.0  # global gradient norm
    # Steps between kept checkpoints, for a learning curve (train.kv_arithmetic.analyze curve);
    # 0: only the last. Not part of the recipe: it changes no weight.
    save_every: int = 0
    # Several examples per row (calm_jax.data.packed_batch_at): a step's rows hold as many
    # examples as fit. Part of the recipe (a step sees more examples).
    pack: bool = False

    def train_config(self, seq_len: int, seed: int):
        """This stage as a calm_jax.trainer.TrainConfig (no periodic eval; one checkpoint at the end,
        and with save_every one every save_every steps, all kept)."""
        from calm_jax import trainer
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, found {self.save_every}")
        keep = 1 if not self.save_every else -(-self.steps // self.save_every)  # every one of them
        return trainer.TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=seq_len, lr=self.lr,
                                   warmup=self.warmup, end_lr_ratio=0.05, b2=self.b2, clip=self.clip, seed=seed,
                                   eval_every=0, save_every=self.save_every, keep=keep, pack=self.pack)


@dataclasses.dataclass(frozen=True)
class Seeds:
    """Seeds of the three training stages: each seeds its model's (or Θ_C's) initialisation and
    its data order. The data itself is drawn from the task's own seed (`task.seed`)."""

    m_A: int = 1
    m_B: int = 2
    theta: int = 3


@dataclasses.dataclass(frozen=True)
class Preset:
    """A whole study at one scale.

    task: the task's own config, a frozen dataclass with a `seed` field (the data seed that
      `--seeds` varies); read only by the task (calm_jax.experiment.task.Task).
    connections: (m_A layer, m_B layer) pairs; None: the paper's rule (composition.default_connections).
    """

    task: Any
    m_A: ModelSize
    m_B: ModelSize
    train_A: Stage
    train_B: Stage
    train_C: Stage  # examples = |D_C|
    connections: tuple | None
    options: CompositionOptions = CompositionOptions()
    eval_batch: int = 256
    seeds: Seeds = Seeds()


def apply_overrides(preset, overrides: Sequence[str] = ()):
    """`preset` with "FIELD=VALUE" or "PART.FIELD=VALUE" overrides applied, PART a dataclass
    field of the preset (task, m_A, ..., options, seeds). VALUE is a Python literal (a bare
    word is taken as a string). Raises ValueError naming a bad override."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not FIELD=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        part, _, field = key.rpartition(".")
        if part and not dataclasses.is_dataclass(getattr(preset, part, None)):
            parts = [f.name for f in dataclasses.fields(preset) if dataclasses.is_dataclass(getattr(preset, f.name))]
            raise ValueError(f"override {item!r}: {part!r} is not one of {', '.join(parts)}")
        target = getattr(preset, part) if part else preset
        names = {f.name for f in dataclasses.fields(target)}
        if field not in names:
            raise ValueError(f"override {item!r}: {type(target).__name__} has no field {field!r}; "
                             f"fields: {', '.join(sorted(names))}")
        changed = dataclasses.replace(target, **{field: value})
        preset = dataclasses.replace(preset, **{part: changed}) if part else changed
    return preset


def label(name: str, overrides: Sequence[str] = ()) -> str:
    """The preset's name, with its overrides: for titles."""
    return name + (f" with {' '.join(overrides)}" if overrides else "")
