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

import ast
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


def broken_problems(problems: Sequence[dict], sandbox=None, workers: int = 4) -> dict[int, str]:
    """{problem index: why} of the problems whose own tests cannot score a sample: tests that do
    not compile, tests without the check() function that check(entry_point) calls, or (for a
    problem with a "canonical_solution", HumanEval's field) a canonical solution that does not
    pass them, run as a sample is. Checked before any sample runs; score_programs leaves them out."""
    broken = {}
    for i, problem in enumerate(problems):
        try:
            tree = ast.parse(problem["tests"], "<tests>")
        except (SyntaxError, ValueError) as e:
            where = f" (line {e.lineno} of the tests)" if getattr(e, "lineno", None) else ""
            broken[i] = f"its tests do not compile: {type(e).__name__}: {getattr(e, 'msg', e)}{where}"
            continue
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if problem.get("entry_point") is not None and "check" not in defined:
            broken[i] = "its tests define no check() function, which check(entry_point) calls"
    canonical = [i for i, p in enumerate(problems) if i not in broken and isinstance(p.get("canonical_solution"), str)]
    if canonical:
        sources = [execution.build_program(problems[i]["prompt"], problems[i]["canonical_solution"],
                                           problems[i]["tests"], problems[i].get("entry_point")) for i in canonical]
        for i, result in zip(canonical, execution.run_programs(sources, sandbox or execution.Sandbox(), workers)):
            if result.status != "passed":
                last = (result.output.strip().splitlines() or [""])[-1][:200]
                broken[i] = (f"its canonical_solution does not pass its tests ({result.status}"
                             + (f": {last})" if last else ")"))
    return broken


def score_programs(problems: Sequence[dict], samples: Sequence[tuple[int, str]], ks: Sequence[int],
                   sandbox=None, workers: int = 4, broken: dict[int, str] | None = None):
    """Runs every sample (problem index, completion) against its problem's tests, each in its own
    sandboxed process (execution.build_program: prompt + completion + tests +
    check(entry_point)), and scores pass@k.

    broken: {problem index: why} of problems left out (default: `broken_problems`, found here
      before any sample runs): their samples are not run and they count in no mean.
    Returns (results, rows, means): one execution.Result per sample (None for a broken
    problem's); per problem {"problem_index", "task_id" (when the problem has one), "n", "c",
    "pass@k": {k: estimate}}, or, for a broken problem, "c" and "pass@k" None and "broken": why;
    {k: pass@k averaged over the problems that are not broken} (keys are str(k); None when all are).
    """
    sandbox = sandbox or execution.Sandbox()
    if broken is None:
        broken = broken_problems(problems, sandbox, workers)
    run = [j for j, (i, _) in enumerate(samples) if i not in broken]
    sources = [execution.build_program(problems[i]["prompt"], completion, problems[i]["tests"],
                                       problems[i].get("entry_point"))
               for i, completion in (samples[j] for j in run)]
    results = [None] * len(samples)
    for j, result in zip(run, execution.run_programs(sources, sandbox, workers=workers)):
        results[j] = result
    counts, passed = [0] * len(problems), [0] * len(problems)
    for (index, _), result in zip(samples, results):
        counts[index] += 1
        passed[index] += result is not None and result.status == "passed"
    rows = [{"problem_index": i, **({"task_id": p["task_id"]} if "task_id" in p else {}), "n": counts[i],
             **({"c": None, "pass@k": None, "broken": broken[i]} if i in broken else
                {"c": passed[i], "pass@k": {str(k): metrics.pass_at_k(counts[i], passed[i], k) for k in ks}})}
            for i, p in enumerate(problems)]
    scored = [(counts[i], passed[i]) for i in range(len(problems)) if i not in broken]
    return results, rows, {str(k): metrics.mean_pass_at_k(scored, k) if scored else None for k in ks}
