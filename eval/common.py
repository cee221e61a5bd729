"""What every eval script shares: building the model from flags, sampling flags, prompt files.

Model flags (`add_model_flags`), one of:
  --model DIR                          a plain LM (HF directory)
  --anchor DIR --augment DIR [...]     a composition m_A1..⊕B
      [--composition RUN_DIR|EXPORT]   its trained Θ_C: a train.compose run directory or a
                                       train.export directory (without it: random Θ_C, said loudly)
      [--encoder-mode]                 the paper's "m_A as encoder" ablation
`check(args)` runs every check that needs no weights (calm_jax.loaded: configs, tokenizers,
the composition's step), `build_model(args, checked)` loads the rest into a `Loaded` (model
with the PlainLM interface, params, tokenizer, label, source), so the same script evaluates
any of the three; `describe(args)` gives the label and source without loading anything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any

import jax

from calm_jax import checkpoint
from calm_jax import composition as comp
from calm_jax import decoding, loaded as loaded_lib
from calm_jax.config import DTYPES, ConfigError
from calm_jax.data import DataError, check_writable, keep_valid, read_jsonl, where
from calm_jax.loading import CheckpointError


# Bad input the scripts report as one line instead of a traceback.
USER_ERRORS = (DataError, CheckpointError, ConfigError, comp.CompositionError, decoding.GenerationError)


@dataclasses.dataclass
class Loaded:
    model: Any  # PlainLM or composition.ComposedLM
    params: Any
    tokenizer: Any
    label: str  # short name for tables, see `describe`
    source: dict  # what was evaluated (directories, run step or random Θ_C seed, dtype), see `describe`


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (--model, or --anchor with --augment)")
    g.add_argument("--model", metavar="DIR", help="a plain LM: Hugging Face model directory")
    g.add_argument("--anchor", metavar="DIR", help="the composition's anchor m_B (HF directory)")
    g.add_argument("--augment", metavar="DIR", action="append", default=[],
                   help="an augmenting model m_A (HF directory); repeat for several")
    g.add_argument("--composition", metavar="DIR",
                   help="trained composition (Θ_C): a train.compose run directory or a train.export directory")
    g.add_argument("--encoder-mode", action="store_true",
                   help="augmenting models see only the prompt (the paper's 'm_A as encoder' ablation)")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype of the frozen models (float64 turns on JAX's 64-bit mode for the run)")
    g.add_argument("--label", help="name of this model in result tables (default: from the flags)")
    g.add_argument("--theta-seed", type=int, default=0, help="seed of the random Θ_C used without --composition")


def precision(args: argparse.Namespace):
    """The context a script runs its work in: with --dtype float64, JAX's 64-bit mode (without it JAX
    makes float32 arrays of float64 requests; the library refuses float64 then, see
    calm_jax.loading), for the whole run, before any array is made; otherwise nothing."""
    return jax.enable_x64(True) if getattr(args, "dtype", None) == "float64" else contextlib.nullcontext()


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave out the records that cannot be used (bad lines, too long for the model), "
                             "said with their count and lines, instead of refusing the file")


def check_outputs(*paths: tuple[str, bool]) -> None:
    """Exits with a one-line error unless each (path, is a directory) can be written: before any
    model loads, so no generation or execution is done for results that cannot be kept."""
    try:
        for path, directory in paths:
            check_writable(path, directory=directory)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def describe(args: argparse.Namespace) -> tuple[str, dict]:
    """(label, source) of the model the flags describe, without loading it.

    source: everything that tells one evaluated model from another (absolute directories, the
      composition's run directory and checkpoint step or the random Θ_C's seed, encoder mode,
      dtype); the default label carries the same in short: "model:DIR", or
      "calm:ANCHOR+AUG@RUN:stepN" ("calm-encoder:..." in encoder mode, "@random-theta:seedS"
      without --composition), with "[DTYPE]" added when it is not float32.
    Raises SystemExit on bad flags, CheckpointError on a run directory without a checkpoint.
    """
    if bool(args.model) == bool(args.anchor):
        raise SystemExit("give either --model DIR (a plain LM) or --anchor DIR with --augment DIR (a composition)")
    if args.model:
        extra = [f for f, v in (("--augment", args.augment), ("--composition", args.composition),
                                ("--encoder-mode", args.encoder_mode)) if v]
        if extra:
            raise SystemExit(f"{', '.join(extra)} only apply to a composition (--anchor), not to --model")
        source = {"model": os.path.abspath(args.model), "dtype": args.dtype}
        label = f"model:{_name(args.model)}"
    else:
        if not args.augment:
            raise SystemExit("--anchor needs at least one --augment DIR")
        step = checkpoint.composition_step(args.composition) if args.composition else None
        source = {"anchor": os.path.abspath(args.anchor), "augments": [os.path.abspath(d) for d in args.augment],
                  "composition": os.path.abspath(args.composition) if args.composition else None, "step": step,
                  "theta_seed": None if args.composition else args.theta_seed,
                  "encoder_mode": bool(args.encoder_mode), "dtype": args.dtype}
        theta = f"{_name(args.composition)}:step{step}" if args.composition else f"random-theta:seed{args.theta_seed}"
        label = (f"{'calm-encoder' if args.encoder_mode else 'calm'}:{_name(args.anchor)}+"
                 f"{'+'.join(_name(d) for d in args.augment)}@{theta}")
    if args.dtype != "float32":
        label += f"[{args.dtype}]"
    return args.label or label, source


def check(args: argparse.Namespace) -> loaded_lib.Checked:
    """The checks of the model the flags describe that read no weights (its configs, tokenizer and
    tokenizer checks, the composition's step): `.tokenizer` and `.max_positions` are what records
    are checked against before `build_model` loads anything. Raises CheckpointError,
    CompositionError or ConfigError."""
    describe(args)  # the flags first: their own messages
    if args.model:
        return loaded_lib.check_model(args.model, dtype=args.dtype)
    return loaded_lib.check_composition(args.anchor, args.augment, args.composition, dtype=args.dtype)


def build_model(args: argparse.Namespace, checked: loaded_lib.Checked | None = None) -> Loaded:
    """The model the flags describe (`checked`: what `check(args)` returned, or None to check
    here). Raises SystemExit with a clear message on bad flags."""
    label, source = describe(args)
    checked = checked or check(args)
    model = loaded_lib.load_checked(checked, theta_seed=args.theta_seed, encoder_mode=bool(args.encoder_mode))
    if checked.is_composition and checked.theta_dir is None:
        print("WARNING: no --composition given: Θ_C is randomly initialised (untrained)", file=sys.stderr)
    return Loaded(model.model, model.params, model.tokenizer, label, source)


def add_generation_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int,
                   help=f"default: {max_new_tokens}, or fewer if the model's positions leave less room after the "
                        "longest prompt (said when it happens)")
    parser.set_defaults(default_max_new_tokens=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], metavar="TOKEN",
                   help="a stop token (a token string of the vocabulary, or an integer id); repeatable")
    g.add_argument("--no-eos-stop", action="store_true", help="do not stop at the tokenizer's EOS")
    g.add_argument("--batch-size", type=int, default=8)


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of `calm_jax.decoding.generate` from the generation flags."""
    # Escapes as typed in a shell ("\\n") become the characters they name.
    stop = [int(s) if s.lstrip("-").isdigit() else s.encode("latin-1", "backslashreplace").decode("unicode_escape")
            for s in args.stop]
    return dict(max_new_tokens=args.max_new_tokens, stop=stop, stop_at_eos=not args.no_eos_stop,
                sampling=decoding.Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed,
                batch_size=args.batch_size)


def read_prompts(path: str, need_target: bool = False, skip_invalid: bool = False) -> list[dict]:
    """JSONL records with a "prompt" (and a "target" if `need_target`); other fields are kept."""
    return read_jsonl(path, require=("prompt", "target") if need_target else ("prompt",), skip_invalid=skip_invalid)


def fitting_prompts(records: list[dict], tokenizer, max_new_tokens: int, max_positions: int,
                    skip_invalid: bool = False) -> list[dict]:
    """The records whose prompt `decoding.generate` takes (not empty, room for max_new_tokens):
    all of them, or a DataError naming every one that is not; with `skip_invalid`, the others
    (and a line on stderr counting those left out)."""
    good, problems = [], []
    for i, r in enumerate(records):
        try:  # one at a time, so that every prompt that does not fit is named
            decoding.prompt_token_ids([r["prompt"]], tokenizer, max_new_tokens, max_positions, [""])
            good.append(r)
        except decoding.GenerationError as e:
            problems.append((r.line if hasattr(r, "line") and r.line else where(r, i), str(e)))
    path = getattr(records[0], "path", "") or "prompts"
    return keep_valid(path, good, problems, skip_invalid)


def generate_for(args, path: str, need_target: bool = False, before_loading=None, records=None):
    """Reads the prompts, builds the model from flags and generates: (loaded, records, gens, seconds).

    records: already read (default: read from `path`). With args.skip_invalid, records that are
      bad or too long are left out (and counted on stderr): the records returned are those used.

    before_loading(label, source): called once the prompts and flags are checked, before any
      model is loaded (see `describe`). Sets args.max_new_tokens when it was not given (see
      `fit_max_new_tokens`). Bad input exits with a one-line error.
    """
    skip = getattr(args, "skip_invalid", False)
    try:
        if records is None:
            records = read_prompts(path, need_target, skip)
        if before_loading is not None:
            before_loading(*describe(args))
        checked = check(args)
        fit_max_new_tokens(args, checked.tokenizer, checked.max_positions, records)
        records = fitting_prompts(records, checked.tokenizer, args.max_new_tokens, checked.max_positions, skip)
        names = [where(r, i) for i, r in enumerate(records)]
        loaded = build_model(args, checked)
        start = time.perf_counter()
        gens = decoding.generate(loaded.model, loaded.params, [r["prompt"] for r in records],
                                 tokenizer=loaded.tokenizer, names=names,
                                 **generation_kwargs(args))
        return loaded, records, gens, time.perf_counter() - start
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from e


def fit_max_new_tokens(args, tokenizer, max_positions: int, records) -> None:
    """Without --max-new-tokens: the script's default, lowered (and said so) when the model's
    positions leave less room after the longest prompt, so a small model's default works."""
    if args.max_new_tokens is not None:
        return  # asked for: decoding refuses it, naming the prompt, if it does not fit
    lengths = [len(decoding.prompt_ids(tokenizer, r["prompt"])) for r in records]
    longest = max(range(len(records)), key=lengths.__getitem__)
    room = max_positions - lengths[longest]
    args.max_new_tokens = max(1, min(args.default_max_new_tokens, room))
    if 1 <= room < args.default_max_new_tokens:
        print(f"--max-new-tokens not given: using {room}, not the default {args.default_max_new_tokens}: the "
              f"model has {max_positions} positions and the longest prompt "
              f"({where(records[longest], longest)}) has {lengths[longest]} tokens", file=sys.stderr)
