"""Train a CALM composition: Θ_C between a frozen anchor and frozen augmenting model(s).

    python -m train.compose --anchor DIR --augment DIR [--augment DIR ...] --data FILE --out RUN_DIR
        [--eval-data FILE] [--steps N --batch-size B --seq-len T --lr LR --warmup N --grad-accum K]
        [--mesh data=D,model=M] [--connections "0:3-1,0:7-3"] [--resume] [--config FILE.json]
        [--init-from RUN_DIR|EXPORT_DIR]

Settings are one dataclass, `ComposeConfig` (its training part `calm_jax.trainer.TrainConfig`),
read in layers: its defaults < a JSON --config file (any flag by its long name, "-" or "_") <
--set FIELD=VALUE (any field, e.g. --set train.b2=0.98, --set options.gate=True; VALUE a Python
literal, as the studies' --set) < the named flags. Data: JSONL of {"prompt", "target"} (loss on the target) or
{"text"}. Output in RUN_DIR: metrics.jsonl, loss.png, checkpoints/, bases.json,
composition.json (load with calm_jax.load_composition(ANCHOR, [AUGMENT], RUN_DIR); share Θ_C
alone with python -m train.export). --init-from starts Θ_C from a run directory's latest checkpoint or
an export instead of a random init: same base models and same wiring, or it is refused.

--resume continues RUN_DIR's run under its contract (calm_jax.checkpoint.history): the same data
(size and sha256 of the file; it may have moved) and the same settings, those not given taken
from the run; other data or settings are refused, naming what differs, unless asked for:
--resume-new-data continues on other data (its stream starts at its first example), and
--extend-steps trains on to more --steps (the cosine decay re-planned from the step resumed at,
starting at the lr reached there, so the lr never jumps). Both are said and recorded in the
run's history, which an export's README lists.

Ctrl-C: the first finishes the current step, saves a checkpoint of it and exits (code 130),
naming the step and the command that resumes; a second stops at once (the steps since the last
checkpoint are lost). Multi-host: run the same command on every host with
JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES=P and JAX_PROCESS_ID=p (or
--coordinator/--num-processes/--process-id); RUN_DIR must be on a filesystem all hosts share.
There Ctrl-C is not caught: it stops the process it reaches at once, and a resume redoes the
steps since the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

import jax

from calm_jax import checkpoint, composition, data, loaded, losses, overrides, sharding, trainer
from calm_jax.checkpoint import history
from calm_jax.composition import CompositionOptions
from calm_jax.config import ConfigError
from calm_jax.loading import CheckpointError
from calm_jax.model import REMAT_POLICIES, param_shapes
from calm_jax.trainer import TrainConfig


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    """Everything a `train.compose` run is given. Fields of `train` and `options` are set as
    "train.FIELD" and "options.FIELD" (--set), or by their flags (--steps, --query-norm, ...)."""

    anchor: str | None = None
    augment: tuple[str, ...] = ()
    data: str | None = None
    eval_data: str | None = None
    out: str | None = None
    connections: str | None = None  # "model:augment_layer-anchor_layer,..." (None: the paper's layers)
    num_heads: int | None = None
    options: CompositionOptions = CompositionOptions()
    frozen_dtype: str = "float32"
    resume: bool = False
    resume_new_data: bool = False  # with resume: continue on other data (said and recorded)
    extend_steps: bool = False  # with resume: train on to more steps (the schedule extended, said and recorded)
    init_from: str | None = None
    skip_invalid: bool = False  # leave out unusable records (counted and named) instead of refusing the file
    truncate: bool = False  # cut examples longer than seq_len (counted and named) instead of refusing them
    train: TrainConfig = TrainConfig()
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def wiring(self) -> loaded.Wiring:
        return loaded.Wiring(parse_connections(self.connections), self.num_heads, self.options)


# A flag or --config key's field: TrainConfig's and CompositionOptions' fields live in their parts.
_PART = {**{f.name: "train" for f in dataclasses.fields(TrainConfig)},
         **{name: "options" for name in CompositionOptions.names()}}
_FIELDS = {f.name for f in dataclasses.fields(ComposeConfig)} - {"train", "options"}


def _field(name: str) -> str | None:
    """The ComposeConfig path of a flag's dest or a --config key ("steps" -> "train.steps"), or None."""
    name = name.replace("-", "_")
    if name in _PART:
        return f"{_PART[name]}.{name}"
    return name if name in _FIELDS else None


def option_flag(name: str) -> str:
    """The command-line flag of a CompositionOptions field: its name with "-" for "_", after "--"."""
    return "--" + name.replace("_", "-")


def add_option_flags(parser) -> None:
    """One on/off flag per CompositionOptions field (--query-norm, ...), its help the field's doc.
    An absent flag parses to None ("not given"), so a --config file's value stands."""
    for name in CompositionOptions.names():
        parser.add_argument(option_flag(name), action="store_true", default=None,
                            help=f"{CompositionOptions.help(name)} (not in the paper)")


def options_from(args: argparse.Namespace) -> CompositionOptions:
    """The CompositionOptions of parsed flags (an attribute per option; absent or None: off)."""
    return CompositionOptions(**{name: bool(getattr(args, name, False)) for name in CompositionOptions.names()})


def parse_connections(spec: str | None):
    """"0:3-1,0:7-3" (augment model:augment layer-anchor layer, 0-based) -> {model: ((3, 1), (7, 3))}."""
    if not spec:
        return None
    out: dict[int, list] = {}
    for part in spec.split(","):
        try:
            model, pair = part.strip().split(":")
            i, j = pair.split("-")
            out.setdefault(int(model), []).append((int(i), int(j)))
        except ValueError:
            raise SystemExit(f"--connections {spec!r}: expected 'model:augment_layer-anchor_layer' items separated "
                             f"by commas (e.g. '0:3-1,0:7-3'), found {part!r}") from None
    return {k: tuple(v) for k, v in out.items()}


EPILOG = """Losses: metrics.jsonl's train and eval losses are nats per target token and count the EOS
appended to each target (--set train.append_eos=False: not appended); eval.loglik scores the
target alone, without that EOS, so its per-token figures differ from these.

Defaults shown are ComposeConfig's; a --config file or --set replaces them, and a flag given
replaces those. With --resume, the settings not given are the run's."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.compose", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", metavar="FILE.json", help="JSON file of flag values; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="any ComposeConfig field, e.g. train.b2=0.98 or options.gate=True (repeatable; "
                        "over --config, under the named flags)")
    p.add_argument("--anchor", metavar="DIR", help="anchor m_B (Hugging Face directory)")
    p.add_argument("--augment", metavar="DIR", action="append", help="augmenting model m_A; repeat for several")
    p.add_argument("--data", metavar="FILE", help="training JSONL")
    p.add_argument("--eval-data", metavar="FILE", help="held-out JSONL for periodic eval loss")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (metrics, checkpoints, plots)")
    p.add_argument("--connections", help="explicit pairs 'model:aug_layer-anchor_layer,...' (default: the paper's)")
    p.add_argument("--num-heads", type=int, help="cross-attention heads (default: the anchor's)")
    add_option_flags(p)
    p.add_argument("--frozen-dtype", choices=("float32", "bfloat16"), help="storage dtype of the frozen models")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from RUN_DIR's latest checkpoint, with its data and settings")
    p.add_argument("--resume-new-data", action="store_true", default=None,
                   help="with --resume: continue on --data although it is not the data the run trained on")
    p.add_argument("--extend-steps", action="store_true", default=None,
                   help="with --resume: train on to --steps, more than the run planned (the cosine decay "
                        "re-planned from the step resumed at, from the lr reached there)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start Θ_C from this run directory's latest checkpoint or this export (train.export), "
                        "trained with the same base models and wiring; the optimizer starts fresh")
    t = p.add_argument_group("training (calm_jax.trainer.TrainConfig)")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size")
    t.add_argument("--seq-len", type=int, help="default: 128, or the models' position limit if lower")
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int, help="linear warmup steps (default: 100, or a tenth of --steps if more)")
    t.add_argument("--end-lr-ratio", type=float, help="cosine decay ends at lr * this")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--clip", type=float, help="global gradient-norm clip")
    t.add_argument("--grad-accum", type=int, help="micro-batches per step")
    t.add_argument("--remat", choices=tuple(REMAT_POLICIES),
                   help="what the anchor's layers recompute in the backward pass instead of storing: none, "
                        "full (keep only each layer's input), dots (keep the weight matmuls' outputs)")
    t.add_argument("--loss-chunk", type=int, metavar="N",
                   help="compute the loss's logits N positions at a time (0: all at once), so B x T x V "
                        "logits never exist at once")
    t.add_argument("--seed", type=int)
    t.add_argument("--pack", action="store_true", default=None,
                   help="several examples per row (no attention or loss across them): less padding computed")
    t.add_argument("--mesh", help="device mesh, e.g. data=4,model=2 (default: all devices on data)")
    t.add_argument("--no-fsdp", dest="fsdp", action="store_false", default=None,
                   help="replicate weights over the data axis")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--eval-batches", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--keep", type=int, help="checkpoints kept")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    t.add_argument("--skip-invalid", action="store_true", default=None,
                   help="leave out unusable records (bad lines; too long unless --truncate), counted and named, "
                        "instead of refusing the file")
    t.add_argument("--truncate", action="store_true", default=None,
                   help="cut examples longer than --seq-len (counted and named) instead of refusing them")
    d = p.add_argument_group("multi-process launch (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    d.add_argument("--coordinator", metavar="HOST:PORT")
    d.add_argument("--num-processes", type=int)
    d.add_argument("--process-id", type=int)
    _show_defaults(p)
    return p


def _default_of(path: str):
    value = ComposeConfig()
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Appends "(default: X)" to each flag's help, X the ComposeConfig default it stands for. The
    flags themselves default to None ("not given"), so that a --config file's value stands."""
    for action in parser._actions:
        path = _field(action.dest) if action.dest not in ("help", "config", "overrides") else None
        if path is None or action.help == argparse.SUPPRESS or "default" in (action.help or ""):
            continue
        value = _default_of(path)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "off"
        elif value is None or value == ():
            continue
        else:
            shown = value
        action.help = f"{action.help or ''} (default: {shown})".lstrip()


def _join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """["--lr", "-1e-3"] -> ["--lr=-1e-3"] for numeric flags: argparse would take "-1e-3" for an
    option and say the value is missing; joined, the value is parsed and then checked."""
    numeric = {s for a in parser._actions if a.type in (int, float) for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in numeric and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
        out.append(argv[i])
        i += 1
    return out


@dataclasses.dataclass(frozen=True)
class Resolved:
    """`read_config`'s result: the settings, the fields the file or the flags set, and the
    defaults changed to fit the other settings (notices to print at the start)."""

    config: ComposeConfig
    given: frozenset[str]
    notices: tuple[str, ...] = ()


def _file_values(path: str) -> dict:
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--config {path}: cannot read it as JSON ({e})") from None
    unknown = sorted(k for k in values if _field(k) is None)
    if unknown:
        raise SystemExit(f"--config {path}: unknown keys {unknown}")
    return {_field(k): v for k, v in values.items()}


def read_config(argv) -> Resolved:
    """The run's settings: ComposeConfig's defaults < --config file < --set < named flags.
    Raises SystemExit naming a bad file, key, override or setting."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(parser, list(sys.argv[1:] if argv is None else argv)))
    layers = [_file_values(args.config)] if args.config else []
    try:
        layers.append(dict(overrides.parse(item) for item in args.overrides))
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    layers.append({_field(k): v for k, v in vars(args).items() if v is not None and k not in ("config", "overrides")})
    changes = {k: v for layer in layers for k, v in layer.items()}
    if isinstance(changes.get("augment"), (str, list)):
        changes["augment"] = tuple([changes["augment"]] if isinstance(changes["augment"], str) else changes["augment"])
    try:
        cfg = overrides.replace_fields(ComposeConfig(), changes)
    except overrides.OverrideError as e:
        raise SystemExit(str(e)) from None
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad training settings: {e}") from None
    missing = [f"--{k.replace('_', '-')}" for k in ("anchor", "augment", "data", "out") if not getattr(cfg, k)]
    if missing:
        raise SystemExit(f"missing required {', '.join(missing)}")
    given, notices, tcfg = frozenset(changes), [], cfg.train
    if tcfg.warmup > tcfg.steps:
        if "train.warmup" in given:  # asked for: the run would never reach the learning rate asked for
            raise SystemExit(f"bad training settings: warmup {tcfg.warmup} is more than steps {tcfg.steps}, "
                             "so no step would run at the full learning rate; lower --warmup")
        notices.append(f"--warmup not given: using {tcfg.steps // 10} (a tenth of --steps), not the default "
                       f"{tcfg.warmup}, which is more than the {tcfg.steps} steps")
        cfg = dataclasses.replace(cfg, train=tcfg.replace(warmup=tcfg.steps // 10))
    return Resolved(cfg, given, tuple(notices))


def with_run_settings(resolved: Resolved, meta: dict | None) -> Resolved:
    """With --resume: the run's recorded settings (its latest checkpoint's `meta`) for the
    training fields a resume keeps that were not given (history.RESUME_FIELDS), said."""
    run = resolved.config
    was = (meta or {}).get("train_config") or {}
    taken = {k: was[k] for k in history.RESUME_FIELDS
             if k in was and f"train.{k}" not in resolved.given and was[k] != getattr(run.train, k)}
    if not taken:
        return resolved
    try:
        cfg = dataclasses.replace(run, train=run.train.replace(**taken))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{run.out}: its recorded settings cannot be read by this version: {e}") from None
    notices = [n for n in resolved.notices if not any(n.startswith(f"--{k.replace('_', '-')} not given")
                                                      for k in taken)]
    notices.append("--resume: the run's own settings where none was given: "
                   + ", ".join(f"{k} {v}" for k, v in taken.items()))
    return Resolved(cfg, resolved.given, tuple(notices))


def resume_command(argv) -> str:
    """The command line that resumes the run `argv` started."""
    argv = list(argv)
    return shlex.join(["python", "-m", "train.compose", *argv, *([] if "--resume" in argv else ["--resume"])])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    resolved = read_config(argv)
    # Before anything touches a device (importing jax does not start it).
    sharding.maybe_initialize_distributed(resolved.config.coordinator, resolved.config.num_processes,
                                          resolved.config.process_id)
    try:
        return _run(resolved)
    except trainer.Interrupted as e:
        print(f"interrupted (Ctrl-C) after step {e.step}, saved as a checkpoint in {e.run_dir}; continue with: "
              f"{resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"stopped at once (Ctrl-C): nothing after the last checkpoint in {resolved.config.out} was kept; "
              f"continue with: {resume_command(argv)}", file=sys.stderr)
        return 130


def _run(resolved: Resolved) -> int:
    run = resolved.config
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)
    try:
        meta = history.latest_meta(run.out) if run.resume else None
        if meta is not None:
            resolved = with_run_settings(resolved, meta)
            run = resolved.config
            if os.path.isfile(run.data):  # the resume's data contract, checked before any weights load
                was = meta.get("train_config") or {}  # (the settings: by the trainer, after the base models)
                same = run.train.replace(**{k: was[k] for k in history.RESUME_FIELDS if k in was})
                history.resume_history(run.out, meta, same, history.file_fingerprint(run.data),
                                       int(meta.get("step", 0)), run.resume_new_data, run.extend_steps,
                                       say=lambda *_: None)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = run.train
    for notice in resolved.notices:
        say(notice)
    try:
        # Everything that needs no weights is checked first: loading them takes the longest.
        if main_process:
            data.check_writable(run.out, directory=True, what="--out")
        mesh = sharding.make_mesh(cfg.mesh)
        checked = loaded.check_composition(run.anchor, run.augment, run.init_from, wiring=run.wiring(),
                                           param_dtype=run.frozen_dtype)
        longest = checked.max_positions
        if "train.seq_len" not in resolved.given and cfg.seq_len > longest:
            say(f"--seq-len not given: using {longest}, the models' position limit, not the default {cfg.seq_len}")
            cfg = cfg.replace(seq_len=longest)
        if cfg.seq_len > longest:
            raise data.DataError(f"--seq-len {cfg.seq_len} is longer than the models' position limit ({longest})")
        reading = dict(skip_invalid=run.skip_invalid, truncate=run.truncate, log=say)
        train_data = data.load_dataset(run.data, checked.tokenizer, cfg.seq_len, cfg.append_eos, **reading)
        eval_data = (data.load_dataset(run.eval_data, checked.tokenizer, cfg.seq_len, cfg.append_eos, **reading)
                     if run.eval_data else None)
        place = lambda mcfg: sharding.param_shardings(mesh, param_shapes(mcfg), fsdp=cfg.fsdp)  # noqa: E731
        lm = loaded.load_checked(checked, shardings=place, theta_seed=cfg.seed)
        ccfg, theta = lm.composition, lm.params["theta"]
        if run.init_from:
            say(f"Θ_C initialised from {run.init_from} (step {lm.step})")
        say(composition.describe(ccfg, theta))
        say(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} device(s), {jax.process_count()} process(es)")
        say(f"memory: remat {cfg.remat}, loss " + (f"in chunks of {cfg.loss_chunk} positions" if cfg.loss_chunk
                                                  else "over all positions at once"))
        say(f"data: {len(train_data)} training examples" + (f", {len(eval_data)} eval" if eval_data else ""))
        checkpoint.save_composition_config(run.out, ccfg)
        frozen = {"anchor": lm.params["anchor"], "augments": lm.params["augments"]}
        result = trainer.train(
            run.out, cfg, losses.composed_loss(ccfg, cfg.remat, cfg.loss_chunk), theta, frozen,
            train_data, eval_data, bases=checkpoint.composition_bases(lm.models[0], lm.models[1:]),
            resume=run.resume, mesh=mesh, resume_new_data=run.resume_new_data, extend_steps=run.extend_steps,
            meta={"anchor": run.anchor, "augments": list(run.augment), "data": run.data,
                  "train_examples": len(train_data), "eval_data": run.eval_data, "init_from": run.init_from,
                  "skip_invalid": run.skip_invalid, "truncate": run.truncate})
    except (CheckpointError, ConfigError, composition.CompositionError, data.DataError, sharding.MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
    say(f"done: step {result.step}, last train loss {last}"
        + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
        + f"; run directory {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
