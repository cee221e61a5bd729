"""Evaluation metrics over generated text: exact match, chrF and BLEU (sacrebleu).

Exact-match normalisation (`normalize_answer`), applied to prediction and target alike:
  1. Unicode NFKC (so e.g. full-width digits equal ASCII ones),
  2. leading/trailing whitespace removed,
  3. every internal run of whitespace (spaces, tabs, newlines) replaced by one space.
Case and punctuation are kept: "12" != "12." and "Paris" != "paris".
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from typing import Iterable, Sequence

import sacrebleu


def normalize_answer(text: str) -> str:
    """The exact-match normal form (see the module docstring)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def exact_match(prediction: str, target: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(target)


def chrf(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0..100."""
    _check_lengths(predictions, targets)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(targets)]).score)


def bleu(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, 4-grams), 0..100."""
    _check_lengths(predictions, targets)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score)


METRICS = {"chrf": chrf, "bleu": bleu}


def summarize(tasks: Iterable[str | None], predictions: Sequence[str], targets: Sequence[str],
              metrics: Sequence[str] = ()) -> dict:
    """Scores per task (records whose task is None count only in "all") and over "all":
    {task: {"n", "exact_match" (accuracy in [0, 1]), and each of `metrics` (0..100)}}."""
    predictions, targets, tasks = list(predictions), list(targets), list(tasks)
    _check_lengths(predictions, targets)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; available: exact match (always), "
                         f"{', '.join(METRICS)}")
    groups = defaultdict(list)
    for i, task in enumerate(tasks):
        if task is not None:
            groups[str(task)].append(i)
    groups["all"] = list(range(len(predictions)))
    out = {}
    for task, rows in groups.items():
        preds, tgts = [predictions[i] for i in rows], [targets[i] for i in rows]
        scores = {"n": len(rows), "exact_match": sum(map(exact_match, preds, tgts)) / max(len(rows), 1)}
        for name in metrics:
            scores[name] = METRICS[name](preds, tgts)
        out[task] = scores
    return out


def _check_lengths(predictions, targets):
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
