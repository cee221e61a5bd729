"""pass@k of sampled programs, each run against its problem's tests in a sandboxed subprocess.

    python -m eval.pass_at_k --problems FILE.jsonl --samples FILE.jsonl --out DIR [--k 1,5,10]
    python -m eval.pass_at_k --problems FILE.jsonl (--model DIR | --anchor DIR --augment DIR ...
        [--composition RUN_DIR] [--encoder-mode]) --n N [generation flags] --out DIR [--k 1,5,10]
    execution flags: [--timeout S] [--memory-mb MB] [--workers W]

Problems: {"prompt", "tests"[, "entry_point"][, "task_id"][, "canonical_solution"]} records
(HumanEval's fields, but its "test" is named "tests" here); task ids (strings or integers) must
be unique. Before any sample is generated or run, each problem's tests are compiled (and must
define check() when there is an entry point) and a canonical_solution, where given, is run
against them: a problem that fails this is broken (a warning names it and why), its samples
are not run, and it is left out of every mean (calm_jax.evaluation.broken_problems).
Samples, given either
  - as --samples: {"completion"} records naming their problem by "task_id" or by
    "problem_index" (0-based, in the problems file's order; with both, they must agree);
    other fields are kept. Problems may have different numbers of samples;
  - or generated: every prompt given to the model --n times (use --temperature > 0, or the n
    samples are all the same greedy one); the generations are the completions, as generated.
Every problem needs n >= k samples for each k of --k. Each sample runs as
calm_jax.execution.build_program (prompt + completion + tests + "check(entry_point)") under
calm_jax.execution's sandbox (its own process, rlimits, an unprivileged user when run as root);
pass@k per problem is calm_jax.metrics.pass_at_k of its n samples, c of them passed
(calm_jax.evaluation.score_programs, the library's scoring path).
Writes to DIR:
  samples.jsonl   each sample (its fields, problem_index, task_id, completion) with its
                  "result": status (passed, failed, timed_out, crashed), exit_code, signal,
                  seconds, output (tail) and output_truncated (calm_jax.execution.Result)
  problems.jsonl  per problem: problem_index, task_id, n, c, "pass@k": {k: estimate}; a broken
                  problem has c and pass@k null and "broken": why (its samples' result null)
  summary.json    "pass@k": {k: mean over the problems not broken}, problem and sample counts,
                  "broken_problems" (their count), "scored_problems", "broken" (each, and why),
                  "status": samples per status, "settings" (inputs, model, generation, sandbox)
--out is checked to be writable before anything is generated or run.
"""

from __future__ import annotations

import argparse
import collections
import json
import numbers
import os
import sys
import tempfile
import time

from calm_jax import evaluation, execution
from calm_jax.data import DataError, read_jsonl, where, write_json, write_jsonl
from . import common


def _parse_k(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",")})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise SystemExit(f"error: --k must be comma-separated positive integers, got {text!r}")
    return ks


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _name(problem: dict, index: int) -> str:
    """How messages name a problem: its task id (if any) and where it was read."""
    task = f" {problem['task_id']!r}" if "task_id" in problem else f" {index}"
    return f"problem{task} ({where(problem, index)})"


def read_problems(path: str) -> list[dict]:
    """The problems file's records, checked (see the module docstring). Raises DataError."""
    problems = read_jsonl(path, require=("prompt", "tests"))
    seen = {}
    for i, p in enumerate(problems):
        entry = p.get("entry_point")
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise DataError(f"{where(p, i)}: field 'entry_point' must be a Python identifier, found "
                            f"{json.dumps(entry)[:40]}")
        if "task_id" in p:
            task = p["task_id"]
            if not (isinstance(task, str) or _is_int(task)):
                raise DataError(f"{where(p, i)}: field 'task_id' must be a string or an integer, found "
                                f"{json.dumps(task)[:40]}")
            if task in seen:
                raise DataError(f"{where(p, i)}: task_id {task!r} already used at {where(problems[seen[task]], 0)}")
            seen[task] = i
    return problems


def read_samples(path: str, problems: list[dict], problems_path: str) -> list[tuple[int, dict]]:
    """(problem index, record) of every record of a samples file (see the module docstring).
    Raises DataError."""
    by_task = {p["task_id"]: i for i, p in enumerate(problems) if "task_id" in p}
    out = []
    for j, s in enumerate(read_jsonl(path, require=("completion",))):
        if "task_id" not in s and "problem_index" not in s:
            raise DataError(f"{where(s, j)}: a sample needs a 'task_id' or a 'problem_index' naming its problem")
        index = s.get("problem_index")
        if index is not None and not (_is_int(index) and 0 <= index < len(problems)):
            raise DataError(f"{where(s, j)}: problem_index must be an integer from 0 to {len(problems) - 1} "
                            f"({problems_path} has {len(problems)} problems), found {json.dumps(index)[:40]}")
        if "task_id" in s:
            if s["task_id"] not in by_task:
                raise DataError(f"{where(s, j)}: task_id {s['task_id']!r} is not the task_id of any problem in "
                                f"{problems_path}")
            if index is not None and by_task[s["task_id"]] != index:
                raise DataError(f"{where(s, j)}: task_id {s['task_id']!r} is problem {by_task[s['task_id']]}, "
                                f"not problem_index {index}")
            index = by_task[s["task_id"]]
        out.append((index, s))
    return out


def generate_samples(args, problems: list[dict], skip=()) -> tuple[list[tuple[int, dict]], dict, float]:
    """Generates args.n completions per problem (but those of `skip`, indices of broken problems):
    ((problem index, {"completion"}) pairs, the model's {"label", "source"}, seconds). Bad flags or
    prompts exit with a one-line error naming the problems file."""
    todo = [i for i in range(len(problems)) if i not in skip]
    try:  # checked here, so that errors name the problems file rather than the repeated prompts
        label, source = common.describe(args)
        checked = common.check(args)
        common.fit_max_new_tokens(args, checked.tokenizer, checked.max_positions, problems)
        common.fitting_prompts(problems, checked.tokenizer, args.max_new_tokens, checked.max_positions)
    except common.USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from e
    if args.temperature == 0 and args.n > 1:
        print(f"WARNING: --temperature 0 (greedy): the {args.n} samples of each problem will be the same",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        write_jsonl(prompts, [{"prompt": problems[i]["prompt"]} for i in todo for _ in range(args.n)])
        _, _, gens, seconds = common.generate_for(args, prompts)
    samples = [(todo[j // args.n], {"completion": g.text, "num_generated": g.num_generated})
               for j, g in enumerate(gens)]
    return samples, {"label": label, "source": source}, seconds


def _task_id(problem: dict) -> dict:
    return {"task_id": problem["task_id"]} if "task_id" in problem else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.pass_at_k", description=__doc__.split("\n")[0])
    parser.add_argument("--problems", required=True, metavar="FILE.jsonl",
                        help='{"prompt", "tests"[, "entry_point"][, "task_id"]} records')
    parser.add_argument("--samples", metavar="FILE.jsonl",
                        help='existing {"completion", "task_id" or "problem_index"} records, instead of a model')
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--k", default="1,5,10", help="comma-separated k of pass@k (default: 1,5,10)")
    common.add_model_flags(parser)
    parser.add_argument("--n", type=int, help="with a model: samples generated per problem (default: the largest k)")
    common.add_generation_flags(parser, max_new_tokens=128)
    g = parser.add_argument_group("execution (calm_jax.execution)")
    g.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per sample (default: 10)")
    g.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per sample (default: 1024)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="samples run at once, each in its own process (default: min(4, CPUs))")
    args = parser.parse_args(argv)

    ks = _parse_k(args.k)
    for flag, value, low in (("--timeout", args.timeout, 0), ("--memory-mb", args.memory_mb, 0),
                             ("--workers", args.workers, 0), ("--n", args.n, 0)):
        if value is not None and not value > low:
            raise SystemExit(f"error: {flag} must be > {low}, got {value}")
    with_model = bool(args.model or args.anchor)
    if with_model == bool(args.samples):
        raise SystemExit("error: give either --samples FILE.jsonl, or a model to sample from (--model DIR, or "
                         "--anchor DIR with --augment DIR)")
    if args.samples and args.n is not None:
        raise SystemExit("error: --n applies only when generating with a model, not to --samples")
    if with_model:
        args.n = args.n or ks[-1]
        if args.n < ks[-1]:
            raise SystemExit(f"error: --n {args.n} samples per problem, fewer than k={ks[-1]}: give --n >= "
                             f"{ks[-1]} or a smaller --k")
    common.check_outputs((args.out, True))  # before any generation or execution: their results are kept
    sandbox = execution.Sandbox(timeout=args.timeout, memory_mb=args.memory_mb)
    try:
        who = execution.identity(sandbox)
        problems = read_problems(args.problems)
        if not with_model:
            samples = read_samples(args.samples, problems, args.problems)
        # Before any sample is generated or run: a problem whose own tests cannot score a sample.
        broken = evaluation.broken_problems(problems, sandbox, args.workers)
        for i, why in sorted(broken.items()):
            print(f"WARNING: {_name(problems[i], i)} is broken, left out of pass@k: {why}", file=sys.stderr)
        if with_model:
            with common.precision(args):
                samples, model, gen_seconds = generate_samples(args, problems, skip=broken)
        else:
            model, gen_seconds = None, None
    except (DataError, execution.SandboxError) as e:
        raise SystemExit(f"error: {e}") from e
    counts = collections.Counter(i for i, _ in samples)
    for i, problem in enumerate(problems):
        if counts[i] < ks[-1] and i not in broken:
            raise SystemExit(f"error: {_name(problem, i)} has n={counts[i]} samples, fewer than k={ks[-1]}: give "
                             f"every problem at least {ks[-1]} samples, or a smaller --k")
    if not who.dropped:
        print(f"WARNING: not root: candidates run as this user ({who.user}, uid {who.uid}); the rlimits apply, "
              "but they can write wherever this user can", file=sys.stderr)

    start = time.perf_counter()
    results, rows, means = evaluation.score_programs(problems, [(i, s["completion"]) for i, s in samples], ks,
                                                     sandbox, workers=args.workers, broken=broken)
    exec_seconds = time.perf_counter() - start
    summary = {
        "pass@k": means,
        "problems": len(problems), "samples": len(samples),
        # Problems whose own tests cannot score a sample (evaluation.broken_problems): not in the mean.
        "broken_problems": len(broken), "scored_problems": len(problems) - len(broken),
        "broken": [{"problem_index": i, **_task_id(problems[i]), "why": why} for i, why in sorted(broken.items())],
        "status": {s: sum(r is not None and r.status == s for r in results) for s in execution.STATUSES},
        "settings": {
            "problems": os.path.abspath(args.problems),
            "samples": os.path.abspath(args.samples) if args.samples else None,
            "model": model, "k": ks,
            "generation": {"n": args.n, **{k: getattr(args, k) for k in (
                "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "no_eos_stop", "batch_size")}}
            if with_model else None,
            "sandbox": {**{k: getattr(sandbox, k) for k in ("timeout", "memory_mb", "file_size_mb", "max_processes",
                                                              "output_bytes")},
                        "cpu_seconds": sandbox.cpu_limit, "user": who.user, "uid": who.uid,
                        "dropped_privileges": who.dropped, "python": who.python, "workers": args.workers},
        },
        "seconds": {"generation": None if gen_seconds is None else round(gen_seconds, 2),
                    "execution": round(exec_seconds, 2)},
    }
    write_jsonl(os.path.join(args.out, "samples.jsonl"), [
        {**s, "problem_index": i, **_task_id(problems[i]), "result": None if r is None else r.to_json()}
        for (i, s), r in zip(samples, results)])
    write_jsonl(os.path.join(args.out, "problems.jsonl"), rows)
    write_json(os.path.join(args.out, "summary.json"), summary)
    if broken and len(broken) == len(problems):
        print(f"pass@k: none: all {len(problems)} problems are broken (see the warnings above)")
    else:
        print("  ".join(f"pass@{k} {v:.4f}" for k, v in summary["pass@k"].items())
              + (f"  (over {len(problems) - len(broken)} problems; {len(broken)} broken left out)" if broken else ""))
    print(f"{len(problems)} problems ({len(broken)} broken), {len(samples)} samples: "
          f"{', '.join(f'{v} {s}' for s, v in summary['status'].items())} in {exec_seconds:.1f}s -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
