"""One generate-and-score path, shared by the eval scripts (eval/) and the experiments.

`generate_and_score` generates a continuation for each {"prompt", "target"[, "task"]} record
(calm_jax.decoding.generate) and scores it: exact match per record and per task
(calm_jax.metrics.summarize: "all" plus one entry per "task" field), and the corpus metrics
asked for (chrF, BLEU). Targets are compared as generations render
(`decoding.as_generated`: the tokenizer's special tokens removed), so a target spelled with
special tokens can be matched at all. Program-synthesis records are scored by execution
instead: `calm_jax.execution` and `calm_jax.metrics.pass_at_k` (python -m eval.pass_at_k).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from calm_jax import decoding, metrics


@dataclasses.dataclass(frozen=True)
class Scored:
    """generations: one decoding.Generation per record; rows: each record with its
    "prediction" and "correct" (exact match); scores: metrics.summarize's {task: {...}}."""

    generations: list
    rows: list[dict]
    scores: dict

    @property
    def exact_match(self) -> float:
        """Exact-match accuracy over all records, in [0, 1]."""
        return self.scores["all"]["exact_match"]


def score(tokenizer, records: Sequence[dict], predictions: Sequence[str], corpus_metrics: Sequence[str] = ()):
    """(rows, scores) of `predictions` against the records' targets (see the module docstring)."""
    targets = [decoding.as_generated(tokenizer, r["target"]) for r in records]
    scores = metrics.summarize([r.get("task") for r in records], predictions, targets, corpus_metrics)
    rows = [{**r, "prediction": p, "correct": metrics.exact_match(p, t)}
            for r, p, t in zip(records, predictions, targets)]
    return rows, scores


def generate_and_score(model, params, tokenizer, records: Sequence[dict], *, max_new_tokens: int,
                       corpus_metrics: Sequence[str] = (), names: Sequence[str] | None = None,
                       **generation) -> Scored:
    """Generates for every record's "prompt" and scores against its "target".

    model, params: a PlainLM, composition.ComposedLM or lora.LoRALM and its parameter tree.
    generation: the other keyword arguments of `decoding.generate` (sampling, seed, stop,
      stop_at_eos, batch_size).
    names: what errors call each record (e.g. "FILE: line N").
    """
    gens = decoding.generate(model, params, [r["prompt"] for r in records], tokenizer=tokenizer,
                             max_new_tokens=max_new_tokens, names=names, **generation)
    rows, scores = score(tokenizer, records, [g.text for g in gens], corpus_metrics)
    return Scored(gens, rows, scores)
