"""Checks that a change of code left behaviour unchanged: the same commands, run at two commits on
the same machine, must write the same files.

    python tools/same_outputs.py run --commit BASELINE --out /tmp/same/base   # a worktree of BASELINE
    python tools/same_outputs.py run --out /tmp/same/head                     # this checkout, as it is
    python tools/same_outputs.py compare /tmp/same/base /tmp/same/head

`run` executes, from the tree it checks (this checkout, or a temporary `git worktree` of
--commit), with this interpreter and JAX on one CPU thread-count setting:
  - `python -m train.kv_arithmetic --preset tiny` (data, m_A, m_B, Θ_C, Table 1),
  - `python -m train.compose` on its m_A/m_B and D_C, with --resume to more steps,
  - `python -m train.export` of that run,
  - `python -m eval.exact_match`, `eval.generate`, `eval.loglik` on the composition (the export),
  - `python -m train.plan --json` for the tiny pair.
`compare` walks both trees and reports every file that is missing on one side or differs.
Both runs write to the same path (--out is a staging directory: the run goes to RUN_AT, then
moves there) and the worktree is always at WORKTREE, so paths recorded in outputs agree.
JSON and JSONL are compared as data with the fields that record wall time removed (VOLATILE
below); text with durations (`12.3s`) and lines naming seconds normalised; orbax checkpoints by
their restored arrays (exact: dtype, shape and bytes) and their JSON metadata, since orbax names
its files at random; safetensors files by their tensors and metadata (safetensors writes the
metadata keys in a random order, so an export's sha256, in its composition.json and README,
is left out too); `table1.png` is not compared (its subtitle carries stage times). Everything
else, weights included, byte for byte. Exit status 0 when everything matches.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_AT = "/tmp/calm_jax_same_outputs/run"
WORKTREE = "/tmp/calm_jax_same_outputs/tree"

# Fields whose value is a time, a date or a path of the tree that ran: dropped before comparing.
VOLATILE = {"seconds", "time", "elapsed", "wall_seconds", "timestamp", "date", "started", "finished", "commit",
            "tokens_per_second", "examples_per_second", "steps_per_second", "compile_seconds", "eval_seconds",
            "train_seconds", "stage_seconds", "tokens_per_s", "sha256"}
# orbax metadata: timestamps of the save.
SKIP_FILES = {"_CHECKPOINT_METADATA", "table1.png", ".results.lock"}
_DURATION = re.compile(r"\b\d+(\.\d+)?s\b")


def _commands(out: str) -> list[list[str]]:
    kv = os.path.join(out, "kv")
    run = os.path.join(out, "compose_run")
    export = os.path.join(out, "export")
    dc = os.path.join(kv, "data", "calm.jsonl")
    held = os.path.join(kv, "data", "eval_kv_arithmetic_heldout.jsonl")
    composition = ["--anchor", os.path.join(kv, "m_B"), "--augment", os.path.join(kv, "m_A")]
    compose = ["-m", "train.compose", *composition, "--data", dc, "--eval-data", held, "--out", run,
               "--batch-size", "4", "--seq-len", "32", "--lr", "1e-3", "--warmup", "1", "--eval-every", "2",
               "--eval-batches", "1", "--save-every", "2", "--no-progress", "--query-norm", "--cross-rope"]
    return [
        ["-m", "train.kv_arithmetic", "--preset", "tiny", "--out", kv],
        [*compose, "--steps", "3"],
        [*compose, "--steps", "5", "--resume"],
        ["-m", "train.export", "--run", run, "--out", export],
        ["-m", "eval.exact_match", *composition, "--composition", export, "--data", held,
         "--out", os.path.join(out, "exact_match"), "--max-new-tokens", "8", "--label", "calm"],
        ["-m", "eval.generate", *composition, "--composition", run, "--prompts", held,
         "--out", os.path.join(out, "generate.jsonl"), "--max-new-tokens", "6", "--temperature", "0.7",
         "--top-k", "5", "--seed", "3"],
        ["-m", "eval.loglik", *composition, "--composition", export, "--data", held,
         "--out", os.path.join(out, "loglik.jsonl")],
        ["-m", "train.plan", *composition, "--devices", "2", "--batch-size", "4", "--seq-len", "32", "--json"],
    ]


def run(tree: str, dest: str) -> None:
    if os.path.exists(dest):
        raise SystemExit(f"{dest} exists: give a new --out")
    shutil.rmtree(RUN_AT, ignore_errors=True)
    out = RUN_AT
    os.makedirs(out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error", "PYTHONHASHSEED": "0"}
    env.pop("PYTHONPATH", None)
    for i, args in enumerate(_commands(out)):
        print("$", " ".join(args[1:3]), flush=True)
        proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True)
        # Standard output is an output too (train.plan prints its JSON, eval.loglik its summary).
        with open(os.path.join(out, f"stdout-{i}.txt"), "w") as f:
            f.write(proc.stdout)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    shutil.move(out, dest)


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, str):
        return _DURATION.sub("<T>s", value)
    return value


def _load(path: str):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".json") or os.path.basename(path) in {"composition.json", "bases.json"}:
        try:
            return _strip(json.loads(raw))
        except ValueError:
            return raw
    if path.endswith(".jsonl") or path.endswith(".txt"):
        lines = []
        for line in raw.decode("utf-8", "replace").splitlines():
            if "seconds" in line and not line.startswith("{"):
                continue
            try:
                lines.append(_strip(json.loads(line)))
            except ValueError:
                lines.append(_strip(line))
        return lines
    if path.endswith(".safetensors"):  # by content: safetensors writes metadata keys in a random order
        from safetensors.numpy import load
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            metadata = f.metadata()
        return {k: (str(v.dtype), v.shape, v.tobytes()) for k, v in load(raw).items()}, metadata
    if path.endswith(".md"):
        return [_strip(line) for line in raw.decode("utf-8", "replace").splitlines()
                if "seconds" not in line and "sha256" not in line]
    return raw


def _orbax(step_dir: str):
    """(arrays, metadata) of one orbax checkpoint step: what it restores to."""
    import numpy as np
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    flat = {}

    def visit(prefix, node):
        if isinstance(node, dict):
            for k in sorted(node):
                visit(f"{prefix}/{k}", node[k])
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(f"{prefix}/{i}", v)
        else:
            a = np.asarray(node)
            flat[prefix] = (str(a.dtype), a.shape, a.tobytes())

    visit("", state)
    return flat, _load(os.path.join(step_dir, "meta", "metadata"))


def _walk(top: str) -> tuple[set[str], set[str]]:
    """(files, orbax checkpoint step directories) under top, relative; files inside a checkpoint
    are left to the checkpoint's comparison."""
    files, steps = set(), set()
    for d, subdirs, names in os.walk(top):
        if "_CHECKPOINT_METADATA" in names:
            steps.add(os.path.relpath(d, top))
            subdirs.clear()
            continue
        files |= {os.path.relpath(os.path.join(d, f), top) for f in names if f not in SKIP_FILES}
    return files, steps


def compare(a: str, b: str) -> int:
    (fa, ca), (fb, cb) = _walk(a), _walk(b)
    problems = [f"only in {a}: {p}" for p in sorted((fa - fb) | (ca - cb))]
    problems += [f"only in {b}: {p}" for p in sorted((fb - fa) | (cb - ca))]
    same = 0
    for rel in sorted(fa & fb):
        if _load(os.path.join(a, rel)) != _load(os.path.join(b, rel)):
            problems.append(f"differs: {rel}")
        else:
            same += 1
    for rel in sorted(ca & cb):
        if _orbax(os.path.join(a, rel)) != _orbax(os.path.join(b, rel)):
            problems.append(f"differs: checkpoint {rel}")
        else:
            same += 1
    for p in problems:
        print(p)
    print(f"{same} files and checkpoints the same, {len(problems)} problems")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--commit", help="run a git worktree of this commit (default: this checkout as it is)")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "compare":
        return compare(args.a, args.b)
    out = os.path.abspath(args.out)
    shutil.rmtree(WORKTREE, ignore_errors=True)
    subprocess.run(["git", "-C", ROOT, "worktree", "prune"], check=True)
    if not args.commit:  # this checkout as it is, uncommitted changes included, at the same place
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                                capture_output=True, text=True).stdout.split("\0")
        for rel in filter(None, listed):
            if os.path.isfile(os.path.join(ROOT, rel)):
                os.makedirs(os.path.dirname(os.path.join(WORKTREE, rel)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, rel), os.path.join(WORKTREE, rel))
        try:
            run(WORKTREE, out)
        finally:
            shutil.rmtree(WORKTREE, ignore_errors=True)
        return 0
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", WORKTREE, args.commit], check=True)
    try:
        run(WORKTREE, out)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", WORKTREE], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
