"""How an anchor and its augmenting models are joined: the options, the config and its checks."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from calm_jax.config import ModelConfig

Pair = tuple[int, int]


class CompositionError(ValueError):
    """A composition that cannot be built: bad connections, mismatched models or vocabularies."""


def _option(doc: str):
    return dataclasses.field(default=False, metadata={"help": doc})


@dataclasses.dataclass(frozen=True)
class CompositionOptions:
    """Options of every connection beyond the paper, all off by default (the paper's CALM). Hashable.

    Each field's documentation is its metadata["help"] (also the help of train.compose's flag
    for it); they are listed here:
    """

    query_norm: bool = _option("RMSNorm on the anchor state before W^Q")
    zero_init_out: bool = _option("W^O starts at zero, so the initial composition equals the anchor")
    gate: bool = _option("output scaled by tanh(g), one learned scalar g per connection, g = 1 at init")
    cross_rope: bool = _option("RoPE on the cross-attention's q and k at the tokens' positions (base: the "
                               "anchor's rope_theta), so a connection can address the augmenting state at a "
                               "given distance, e.g. at its own position; no new parameters")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, bool], where: str = "composition options") -> CompositionOptions:
        """Options from {name: value}; names left out take their defaults. An unknown name
        raises CompositionError (`where` says whose options they are)."""
        unknown = sorted(set(values) - set(cls.names()), key=str)
        if unknown:
            raise CompositionError(f"{where}: unknown option {unknown[0]!r}; the options are "
                                   f"{', '.join(cls.names())}")
        return cls(**values)

    @classmethod
    def help(cls, name: str) -> str:
        """The documentation of option `name` (its field's metadata["help"])."""
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)

    def to_dict(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in self.names()}

    def enabled(self) -> tuple[str, ...]:
        """The names of the options that are on, in field order."""
        return tuple(name for name in self.names() if getattr(self, name))


CompositionOptions.__doc__ = CompositionOptions.__doc__.rstrip() + "".join(f"\n      {f.name}: {f.metadata['help']}."
                                      for f in dataclasses.fields(CompositionOptions))


def default_connections(num_augment_layers: int, num_anchor_layers: int) -> tuple[Pair, ...]:
    """The paper's layer choice: every 4th augmenting layer, n uniformly spaced anchor layers.

    n = max(1, min(N_A // 4, N_B)), and the k-th connection (k = 1..n), 0-based, is

        augmenting layer ceil(k * N_A / n) - 1  ->  anchor layer ceil(k * N_B / n) - 1.

    With N_A divisible by 4 (and N_A / 4 <= N_B) this is augmenting layers 3, 7, ..., N_A - 1
    feeding anchor layers N_B/n - 1, 2 N_B/n - 1, ..., N_B - 1 (rounded up when n does not
    divide N_B). Otherwise the n augmenting layers are spread uniformly too, so the last
    connection always joins the two last layers: N_A < 4 gives the single pair
    (N_A - 1, N_B - 1); N_A / 4 > N_B is capped at one connection per anchor layer.
    Examples: (8, 8) -> (3, 3), (7, 7); (8, 24) -> (3, 11), (7, 23); (6, 10) -> (5, 9);
    (16, 2) -> (7, 0), (15, 1).
    """
    for name, n_layers in (("augmenting", num_augment_layers), ("anchor", num_anchor_layers)):
        if n_layers < 1:
            raise CompositionError(f"{name} model must have at least one layer, found {n_layers}")
    n = max(1, min(num_augment_layers // 4, num_anchor_layers))
    return tuple((-(-k * num_augment_layers // n) - 1, -(-k * num_anchor_layers // n) - 1) for k in range(1, n + 1))


def _check_pairs(k: int, pairs, augment: ModelConfig, anchor: ModelConfig) -> tuple[Pair, ...]:
    where = f"connections for augmenting model {k}"
    try:
        pairs = tuple((int(i), int(j)) for i, j in pairs)
    except (TypeError, ValueError) as e:
        raise CompositionError(f"{where}: expected (augment layer, anchor layer) integer pairs, found {pairs!r}") from e
    if not pairs:
        raise CompositionError(f"{where}: empty; give at least one (augment layer, anchor layer) pair")
    for i, j in pairs:
        if not 0 <= i < augment.num_layers:
            raise CompositionError(f"{where}: layer {i} out of range for augmenting model {k} "
                                   f"({augment.family}, {augment.num_layers} layers: 0..{augment.num_layers - 1})")
        if not 0 <= j < anchor.num_layers:
            raise CompositionError(f"{where}: anchor layer {j} out of range for the anchor "
                                   f"({anchor.family}, {anchor.num_layers} layers: 0..{anchor.num_layers - 1})")
    for a, b in zip(pairs, pairs[1:]):
        if a == b:
            raise CompositionError(f"{where}: duplicate pair {a}")
        if b[0] < a[0] or b[1] < a[1]:
            raise CompositionError(f"{where}: pairs must be in increasing order of both layers "
                                   f"(the k-th augmenting layer feeds the k-th anchor layer); {b} follows {a}")
    return pairs


@dataclasses.dataclass(frozen=True)
class CompositionConfig:
    """How an anchor and its augmenting models are joined. Hashable (a static jit argument).

    anchor, augments: the models' configs (one or more augmenting models).
    connections: per augmenting model, (augment layer i, anchor layer j) pairs, 0-based, in
      increasing order of both layers: a sequence with one entry per augmenting model, or a
      {model index: pairs} mapping; None (for all, or for one model) = `default_connections`.
      Stored normalised: one tuple of pairs per augmenting model.
    num_heads: cross-attention heads (default: the anchor's); head size = D_B / num_heads.
    options: the options beyond the paper (`CompositionOptions`; default: all off).
    dtype: compute and storage dtype of Θ_C and of the cross-attention cache.
    The models' vocab_size may differ: models that share one tokenizer often pad their
    embedding tables differently (Qwen2.5-7B: 152,064 rows, Qwen2.5-Coder-1.5B: 151,936). What
    CALM needs, one tokenizer whose every id each table has, is checked where the tokenizer is
    known (`calm_jax.composition.check_vocabularies` and `check_tokenizer_fits`).
    """

    anchor: ModelConfig
    augments: tuple[ModelConfig, ...]
    connections: tuple[tuple[Pair, ...] | None, ...] | None = None
    num_heads: int | None = None
    options: CompositionOptions = CompositionOptions()
    dtype: str = "float32"

    def __post_init__(self):
        augments = (self.augments,) if isinstance(self.augments, ModelConfig) else tuple(self.augments)
        if not augments:
            raise CompositionError("a composition needs at least one augmenting model")
        if not isinstance(self.anchor, ModelConfig):
            raise CompositionError(f"anchor must be a ModelConfig, found {type(self.anchor).__name__}")
        if not isinstance(self.options, CompositionOptions):
            raise CompositionError(f"options must be a CompositionOptions, found {type(self.options).__name__}")
        for k, aug in enumerate(augments):
            if not isinstance(aug, ModelConfig):
                raise CompositionError(f"augmenting model {k} must be a ModelConfig, found {type(aug).__name__}")
        conns = self.connections if self.connections is not None else (None,) * len(augments)
        if isinstance(conns, Mapping):
            unknown = sorted(set(conns) - set(range(len(augments))), key=str)
            if unknown:
                raise CompositionError(f"connections given for augmenting model {unknown[0]!r}, but there are only "
                                       f"{len(augments)} augmenting model(s) (0..{len(augments) - 1})")
            conns = tuple(conns.get(k) for k in range(len(augments)))
        conns = tuple(conns)
        if len(conns) > len(augments):
            raise CompositionError(f"connections given for augmenting model {len(augments)} (0-based), "
                                   f"but there are only {len(augments)} augmenting model(s)")
        if len(conns) < len(augments):
            raise CompositionError(f"connections given for {len(conns)} augmenting model(s), but there are "
                                   f"{len(augments)}; use None for a model that takes the default")
        conns = tuple(
            default_connections(aug.num_layers, self.anchor.num_layers) if pairs is None
            else _check_pairs(k, pairs, aug, self.anchor)
            for k, (aug, pairs) in enumerate(zip(augments, conns)))
        heads = self.num_heads if self.num_heads is not None else self.anchor.num_heads
        if heads < 1 or self.anchor.hidden_size % heads:
            raise CompositionError(f"cross-attention heads ({heads}) must divide the anchor's hidden size "
                                   f"({self.anchor.hidden_size})")
        if self.options.cross_rope and (self.anchor.hidden_size // heads) % 2:
            raise CompositionError(f"cross_rope needs an even cross-attention head size; hidden "
                                   f"{self.anchor.hidden_size} / {heads} heads = {self.anchor.hidden_size // heads}")
        object.__setattr__(self, "augments", augments)
        object.__setattr__(self, "connections", conns)
        object.__setattr__(self, "num_heads", heads)

    @property
    def head_dim(self) -> int:
        return self.anchor.hidden_size // self.num_heads
