"""Evaluation metrics over generated text: exact match, chrF and BLEU (sacrebleu), and pass@k.

Exact-match normalisation (`normalize_answer`), applied to prediction and target alike:
  1. Unicode NFKC (so e.g. full-width digits equal ASCII ones),
  2. leading/trailing whitespace removed,
  3. every internal run of whitespace (spaces, tabs, newlines) replaced by one space.
Case and punctuation are kept: "12" != "12." and "Paris" != "paris".

pass@k (`pass_at_k`): of n programs sampled for a problem, c passed its tests; the unbiased
estimate of the chance that at least one of k samples passes is 1 - C(n-c, k) / C(n, k)
(Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), computed as
1 - prod_{i=n-c+1}^{n} (1 - k/i), which stays finite and accurate for large n. A benchmark's
pass@k is its mean over problems (`mean_pass_at_k`); eval.pass_at_k runs the programs.
"""

from __future__ import annotations

import math
import numbers
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c passed (see the module docstring):
    0.0 when c == 0, 1.0 when n - c < k (every k-subset holds a passing sample).

    Raises ValueError unless n, c, k are integers with 0 <= c <= n and 1 <= k <= n.
    """
    if not (all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, c, k))
            and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs integers with 0 <= c <= n and 1 <= k <= n, got n={n!r}, c={c!r}, k={k!r}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean of `pass_at_k(n, c, k)` over problems given as (n, c) pairs (their n may differ).
    Raises ValueError on no problems or on a pair `pass_at_k` refuses."""
    scores = [pass_at_k(n, c, k) for n, c in counts]
    if not scores:
        raise ValueError("pass@k of no problems")
    return sum(scores) / len(scores)


def _check_lengths(predictions, targets):
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
