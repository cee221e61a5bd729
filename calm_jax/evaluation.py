"""One generate-and-score path, shared by the eval scripts (eval/) and the experiments.

`generate_and_score` generates a continuation for each {"prompt", "target"[, "task"]} record
(calm_jax.decoding.generate) and scores it: exact match per record and per task
(calm_jax.metrics.summarize: "all" plus one entry per "task" field), and the corpus metrics
asked for (chrF, BLEU). Targets are compared as generations render
(`decoding.as_generated`: the tokenizer's special tokens removed), so a target spelled with
special tokens can be matched at all. Program-synthesis problems are scored by execution
instead (`score_programs`: each sample run sandboxed by calm_jax.execution, then
calm_jax.metrics.pass_at_k per problem; python -m eval.pass_at_k).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from calm_jax import decoding, execution, metrics


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


def score_programs(problems: Sequence[dict], samples: Sequence[tuple[int, str]], ks: Sequence[int],
                   sandbox=None, workers: int = 4):
    """Runs every sample (problem index, completion) against its problem's tests, each in its own
    sandboxed process (execution.build_program: prompt + completion + tests +
    check(entry_point)), and scores pass@k.

    Returns (results, rows, means): one execution.Result per sample; per problem
    {"problem_index", "task_id" (when the problem has one), "n", "c", "pass@k": {k: estimate}};
    {k: pass@k averaged over problems} (keys are str(k)).
    """
    sandbox = sandbox or execution.Sandbox()
    sources = [execution.build_program(problems[i]["prompt"], completion, problems[i]["tests"],
                                       problems[i].get("entry_point")) for i, completion in samples]
    results = execution.run_programs(sources, sandbox, workers=workers)
    counts, passed = [0] * len(problems), [0] * len(problems)
    for (index, _), result in zip(samples, results):
        counts[index] += 1
        passed[index] += result.status == "passed"
    rows = [{"problem_index": i, **({"task_id": p["task_id"]} if "task_id" in p else {}), "n": counts[i],
             "c": passed[i], "pass@k": {str(k): metrics.pass_at_k(counts[i], passed[i], k) for k in ks}}
            for i, p in enumerate(problems)]
    return results, rows, {str(k): metrics.mean_pass_at_k(zip(counts, passed), k) for k in ks}
