"""The key-value arithmetic task of the paper (§4.1): data and tokenizer, deterministic from a seed.

D_KV maps N_KV unique keys (2-6 lowercase letters) to unique integers in [1, N_KV] (or,
with `max_value`, to integers in [1, max_value] that several keys share). An
expression joins k keys with operators; three datasets are made from the same expressions:

  KV-Substitution     [SUB]ab+cde=  ->  10+22       (scratchpad: [NUM]10+22)
  KV-Arithmetic       [KVA]ab+cde=  ->  32          (scratchpad: [NUM]10+22=32)
  Numeric-Arithmetic  [NUM]10+22=   ->  32

The leading marker (one token) tells the task. Splits are disjoint by expression: the
evaluation expressions are drawn first and every training list rejects them (and, with
shared values, any expression that spells an evaluation problem's numbers). D_C (the
composition's data) uses only a held-in fraction of the keys; `heldout` evaluation
expressions use only the other keys, so CALM must read values it never saw in D_C.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import numpy as np

TASKS = ("kv_substitution", "kv_arithmetic", "numeric_arithmetic")
MARKERS = {"kv_substitution": "[SUB]", "kv_arithmetic": "[KVA]", "numeric_arithmetic": "[NUM]"}
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
CHARS = string.ascii_lowercase + string.digits + "+-*="


@dataclasses.dataclass(frozen=True)
class KVTaskConfig:
    """Scale of the task. The default is small enough for 2 CPU cores; `PAPER` is the paper's."""

    n_kv: int = 200  # keys; values are a permutation of 1..n_kv (but see max_value)
    # Values in [1, max_value], each used n_kv / max_value times (rounded), when max_value <
    # n_kv: many keys with short numbers. None: the paper's unique values, max_value = n_kv.
    max_value: int | None = None
    min_key_len: int = 2
    max_key_len: int = 6
    min_terms: int = 2  # keys per expression
    max_terms: int = 2
    operators: str = "+-"  # "*" is the paper's x; evaluated with the usual precedence
    held_in_fraction: float = 0.2
    n_eval: int = 500  # expressions per evaluation set
    seed: int = 0
    # Numbers zero-padded to a fixed width, results with a sign ("07-22" -> "-015"), so that
    # every digit has a fixed place: small models learn the arithmetic far faster.
    fixed_width: bool = False
    # KV-Arithmetic targets show the substitution first ("ab+cd=" -> "[NUM]10+22=32"): the
    # anchor reads m_A's substitution as it is generated (iterative decoding) and then
    # computes. A written-out numeric expression then starts with the [NUM] marker, in
    # KV-Substitution targets too, so that m_A's substitution begins as m_B's problems do.
    scratchpad: bool = False
    # Fraction of m_B's training examples given a random-length prefix of random tokens:
    # the unrelated context a pre-trained model has learned to read past. Letters and
    # digits there are random, so no key is ever paired with its value. See `with_context_noise`.
    context_noise: float = 0.0
    max_noise_len: int = 16
    # Fraction of m_A's KV-Substitution examples whose [SUB] marker is replaced by a task
    # marker drawn uniformly: m_A reads the keys of a [KVA] prompt (the composition's input)
    # as it reads a [SUB] one. It is still only taught substitution. See `with_random_markers`.
    random_marker: float = 0.0
    # D_C (the composition's data, held-in keys only): the fractions given as KV-Substitution
    # and as Numeric-Arithmetic (which carries no key) instead of KV-Arithmetic.
    dc_substitution: float = 0.0
    dc_numeric: float = 0.0

    def __post_init__(self):
        if not set(self.operators) <= set("+-*") or not self.operators:
            raise ValueError(f"operators must be a non-empty subset of '+-*', found {self.operators!r}")
        if not 1 <= self.min_key_len <= self.max_key_len:
            raise ValueError(f"key lengths must satisfy 1 <= min <= max, found {self.min_key_len}..{self.max_key_len}")
        if not 1 <= self.min_terms <= self.max_terms:
            raise ValueError(f"terms must satisfy 1 <= min <= max, found {self.min_terms}..{self.max_terms}")
        if not 0.0 < self.held_in_fraction < 1.0:
            raise ValueError(f"held_in_fraction must be in (0, 1), found {self.held_in_fraction}")
        if not (0.0 <= self.dc_substitution and 0.0 <= self.dc_numeric
                and self.dc_substitution + self.dc_numeric <= 1.0):
            raise ValueError(f"dc_substitution and dc_numeric must be >= 0 with a sum <= 1, found "
                             f"{self.dc_substitution}, {self.dc_numeric}")
        if not 0.0 <= self.random_marker <= 1.0:
            raise ValueError(f"random_marker must be in [0, 1], found {self.random_marker}")
        if not 0.0 <= self.context_noise <= 1.0 or self.max_noise_len < 1:
            raise ValueError(f"context_noise must be in [0, 1] and max_noise_len >= 1, found "
                             f"{self.context_noise}, {self.max_noise_len}")
        if self.max_value is not None and not 1 <= self.max_value <= self.n_kv:
            raise ValueError(f"max_value must be in [1, n_kv={self.n_kv}], found {self.max_value}")
        possible = sum(26 ** n for n in range(self.min_key_len, self.max_key_len + 1))
        if self.n_kv > possible:
            raise ValueError(f"n_kv={self.n_kv} keys do not fit in {possible} strings of "
                             f"{self.min_key_len}-{self.max_key_len} letters")

    @property
    def largest_value(self) -> int:
        return self.n_kv if self.max_value is None else self.max_value

    @property
    def value_width(self) -> int:
        return len(str(self.largest_value)) if self.fixed_width else 0

    @property
    def result_width(self) -> int:
        """Digits of the largest |result| (with a fixed width; 0 otherwise)."""
        if not self.fixed_width:
            return 0
        v = self.largest_value
        largest = v ** self.max_terms if "*" in self.operators else v * self.max_terms
        return len(str(largest))

    def replace(self, **changes) -> "KVTaskConfig":
        return dataclasses.replace(self, **changes)


PAPER = KVTaskConfig(n_kv=25_000, min_terms=3, max_terms=6, operators="+-*")

# An expression: key indices and the operators between them (len(ops) == len(keys) - 1).
Expr = tuple[tuple[int, ...], tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class KVData:
    """D_KV, the held-in key set and the evaluation expressions."""

    config: KVTaskConfig
    keys: tuple[str, ...]
    values: tuple[int, ...]
    held_in: tuple[int, ...]  # indices of the keys D_C may use
    held_out: tuple[int, ...]
    eval_all: tuple[Expr, ...]  # over all keys
    eval_heldout: tuple[Expr, ...]  # only held-out keys

    def key_text(self, expr: Expr) -> str:
        return _join([self.keys[i] for i in expr[0]], expr[1])

    def numeric_text(self, expr: Expr) -> str:
        return _join([str(self.values[i]).zfill(self.config.value_width) for i in expr[0]], expr[1])

    def result(self, expr: Expr) -> int:
        # Only digits and + - * reach eval; it gives the usual precedence of x over + and -.
        text = _join([str(self.values[i]) for i in expr[0]], expr[1])
        return int(eval(text, {"__builtins__": {}}))  # noqa: S307

    def result_text(self, expr: Expr) -> str:
        r, cfg = self.result(expr), self.config
        sign = "-" if r < 0 else ("+" if cfg.fixed_width else "")
        digits = str(abs(r)).zfill(cfg.result_width)  # result_width is 0 without a fixed width
        return sign + digits

    def record(self, expr: Expr, task: str) -> dict:
        """{"prompt", "target"} for one expression in one task (see the module docstring)."""
        written = (MARKERS["numeric_arithmetic"] if self.config.scratchpad else "") + self.numeric_text(expr)
        if task == "kv_substitution":
            prompt, target = self.key_text(expr), written
        elif task == "kv_arithmetic":
            prompt, target = self.key_text(expr), self.result_text(expr)
            if self.config.scratchpad:
                target = f"{written}={target}"
        elif task == "numeric_arithmetic":
            prompt, target = self.numeric_text(expr), self.result_text(expr)
        else:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        return {"prompt": f"{MARKERS[task]}{prompt}=", "target": target}

    def records(self, exprs: Sequence[Expr], task: str) -> list[dict]:
        return [self.record(e, task) for e in exprs]

    def train_expressions(self, n: int, held_in_only: bool = False, seed: int = 1) -> list[Expr]:
        """`n` expressions never in an evaluation set (unique, unless the space is too small).

        held_in_only: use only the held-in keys (D_C). Different seeds give different lists.
        """
        pool = self.held_in if held_in_only else tuple(range(len(self.keys)))
        taken = set(self.eval_all) | set(self.eval_heldout)
        # With shared values (max_value < n_kv) other keys can spell an evaluation problem's numbers.
        taken_numeric = {self.numeric_text(e) for e in taken}
        rng = np.random.default_rng([self.config.seed, seed, int(held_in_only)])
        space = _space(self.config, len(pool))
        out, seen = [], set()
        while len(out) < n:
            e = _sample(rng, pool, self.config)
            if e in taken or self.numeric_text(e) in taken_numeric:
                continue
            if e in seen and len(seen) < 0.5 * (space - len(taken)):
                continue
            seen.add(e)
            out.append(e)
        return out


NOISE_CHARS = (*CHARS, *MARKERS.values())


def with_context_noise(records: Sequence[dict], cfg: KVTaskConfig, seed: int) -> list[dict]:
    """`records` with a random prefix before the prompt of a `cfg.context_noise` fraction of them.

    A prefix is 1..`cfg.max_noise_len` tokens drawn uniformly and independently from
    NOISE_CHARS (letters, digits, operators, task markers): a letter string next to digits
    there is chance, never a key with its value.
    Targets are unchanged. Deterministic from `seed`.
    """
    rng = np.random.default_rng([cfg.seed, seed])
    out = []
    for r in records:
        prefix = ""
        if rng.random() < cfg.context_noise:
            n = int(rng.integers(1, cfg.max_noise_len + 1))
            prefix = "".join(NOISE_CHARS[j] for j in rng.integers(0, len(NOISE_CHARS), n))
        out.append({**r, "prompt": prefix + r["prompt"]})
    return out


def with_random_markers(records: Sequence[dict], cfg: KVTaskConfig, seed: int) -> list[dict]:
    """`records` with the leading task marker of a `cfg.random_marker` fraction of them replaced
    by one drawn uniformly from MARKERS (possibly the same one). Targets are unchanged.
    Deterministic from `seed`."""
    rng = np.random.default_rng([cfg.seed, seed])
    markers = tuple(MARKERS.values())
    out = []
    for r in records:
        marker = next((m for m in markers if r["prompt"].startswith(m)), None)
        if marker is None:
            raise ValueError(f"prompt {r['prompt']!r} does not start with a task marker {markers}")
        if rng.random() < cfg.random_marker:
            r = {**r, "prompt": markers[int(rng.integers(len(markers)))] + r["prompt"][len(marker):]}
        out.append(r)
    return out


def _join(terms: Sequence[str], ops: Sequence[str]) -> str:
    return terms[0] + "".join(op + t for op, t in zip(ops, terms[1:]))


def _space(cfg: KVTaskConfig, n_keys: int) -> int:
    n_ops = len(cfg.operators)
    return sum(n_keys ** k * n_ops ** (k - 1) for k in range(cfg.min_terms, cfg.max_terms + 1))


def _sample(rng: np.random.Generator, pool: Sequence[int], cfg: KVTaskConfig) -> Expr:
    k = int(rng.integers(cfg.min_terms, cfg.max_terms + 1))
    keys = tuple(int(pool[j]) for j in rng.integers(0, len(pool), k))
    ops = tuple(cfg.operators[j] for j in rng.integers(0, len(cfg.operators), k - 1))
    return keys, ops


def _unique(rng, pool, cfg, n, taken=frozenset()) -> tuple[Expr, ...]:
    space = _space(cfg, len(pool))
    if n > space // 2:
        raise ValueError(f"asked for {n} evaluation expressions from {len(pool)} keys, "
                         f"but only {space} expressions exist; lower n_eval or raise n_kv")
    out = {}
    while len(out) < n:
        e = _sample(rng, pool, cfg)
        if e not in taken:
            out[e] = None
    return tuple(out)


def make_kv_data(cfg: KVTaskConfig) -> KVData:
    """D_KV, its held-in/held-out key split and the two evaluation sets, all from `cfg.seed`."""
    rng = np.random.default_rng(cfg.seed)
    keys: dict[str, None] = {}
    while len(keys) < cfg.n_kv:
        n = int(rng.integers(cfg.min_key_len, cfg.max_key_len + 1))
        keys["".join(rng.choice(list(string.ascii_lowercase), n))] = None
    values = tuple(int(v) % cfg.largest_value + 1 for v in rng.permutation(cfg.n_kv))
    order = rng.permutation(cfg.n_kv)
    n_in = max(1, round(cfg.held_in_fraction * cfg.n_kv))
    held_in, held_out = tuple(sorted(order[:n_in].tolist())), tuple(sorted(order[n_in:].tolist()))
    eval_all = _unique(rng, range(cfg.n_kv), cfg, cfg.n_eval)
    eval_heldout = _unique(rng, held_out, cfg, cfg.n_eval, frozenset(eval_all))
    return KVData(cfg, tuple(keys), values, held_in, held_out, eval_all, eval_heldout)


def make_tokenizer():
    """A character-level tokenizer (HF PreTrainedTokenizerFast) shared by both models.

    One token per character of `CHARS`, one per task marker; BOS is prepended to every
    encoded prompt; decoding joins characters without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    markers = list(MARKERS.values())
    vocab = {t: i for i, t in enumerate([*SPECIALS, *markers, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens([*SPECIALS, *markers])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]", additional_special_tokens=markers)
