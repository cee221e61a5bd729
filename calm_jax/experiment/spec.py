"""What a CALM study is made of: model sizes, training stages, seeds and the preset joining them.

A preset is one frozen dataclass tree; `calm_jax.overrides.apply_overrides` changes any of its
fields from the command line ("train_C.steps=6000", "task.seed=1", "options.gate=True", "seeds.theta=4").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from calm_jax import trainer
from calm_jax.composition import CompositionOptions
from calm_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A decoder trained from scratch: Llama-style (RoPE) or GPT-2-style (learned positions)."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    family: str = "llama"

    def config(self, vocab_size: int, max_positions: int) -> ModelConfig:
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

    def train_config(self, seq_len: int, seed: int) -> trainer.TrainConfig:
        """This stage as a calm_jax.trainer.TrainConfig (no periodic eval; one checkpoint at the end,
        and with save_every one every save_every steps, all kept)."""
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


def label(name: str, overrides: Sequence[str] = ()) -> str:
    """The preset's name, with its overrides: for titles."""
    return name + (f" with {' '.join(overrides)}" if overrides else "")
