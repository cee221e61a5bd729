"""Train a CALM composition: Θ_C between a frozen anchor and frozen augmenting model(s).

    python -m train.compose --anchor DIR --augment DIR [--augment DIR ...] --data FILE --out RUN_DIR
        [--eval-data FILE] [--steps N --batch-size B --seq-len T --lr LR --warmup N --grad-accum K]
        [--mesh data=D,model=M] [--connections "0:3-1,0:7-3"] [--resume] [--config FILE.json]
        [--init-from RUN_DIR|EXPORT_DIR]

A JSON config file holds any of the flags (by their long name, "-" or "_"); flags given on
the command line override it. Data: JSONL of {"prompt", "target"} (loss on the target) or
{"text"}. Output in RUN_DIR: metrics.jsonl, loss.png, checkpoints/, bases.json,
composition.json (load with calm_jax.checkpoint.load_composition; share Θ_C alone with
python -m train.export). --init-from starts Θ_C from a run directory's latest checkpoint or
an export instead of a random init: same base models and same wiring, or it is refused.

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS=HOST:PORT,
JAX_NUM_PROCESSES=P and JAX_PROCESS_ID=p (or --coordinator/--num-processes/--process-id);
RUN_DIR must be on a filesystem all hosts share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from calm_jax.composition import CompositionOptions
from calm_jax.model import REMAT_POLICIES
from calm_jax.trainer import TrainConfig  # importing jax does not start it; initialize can still run

_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_OPTION_FIELDS = dataclasses.fields(CompositionOptions)
_MODEL_DEFAULTS = dict(augment=[], eval_data=None, connections=None, num_heads=None,
                       **{f.name: f.default for f in _OPTION_FIELDS}, frozen_dtype="float32", resume=False,
                       init_from=None, coordinator=None, num_processes=None, process_id=None)


def option_flag(name: str) -> str:
    """The command-line flag of a CompositionOptions field: its name with "-" for "_", after "--"."""
    return "--" + name.replace("_", "-")


def add_option_flags(parser) -> None:
    """One on/off flag per CompositionOptions field (--query-norm, ...), its help the field's doc.
    An absent flag parses to None ("not given"), so a --config file's value stands."""
    for f in _OPTION_FIELDS:
        parser.add_argument(option_flag(f.name), action="store_true", default=None,
                            help=f"{f.metadata['help']} (not in the paper)")


def options_from(values) -> CompositionOptions:
    """The CompositionOptions of parsed values: a {field name: value} dict (`resolve`'s) or an
    argparse Namespace with an attribute per field."""
    get = values.__getitem__ if isinstance(values, dict) else lambda name: getattr(values, name)
    return CompositionOptions(**{f.name: get(f.name) for f in _OPTION_FIELDS})


def parse_connections(spec: str | None, n_augments: int):
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.compose", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.json", help="JSON file of flag values; flags override it")
    p.add_argument("--anchor", metavar="DIR", help="anchor m_B (Hugging Face directory)")
    p.add_argument("--augment", metavar="DIR", action="append", help="augmenting model m_A; repeat for several")
    p.add_argument("--data", metavar="FILE", help="training JSONL")
    p.add_argument("--eval-data", metavar="FILE", help="held-out JSONL for periodic eval loss")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (metrics, checkpoints, plots)")
    p.add_argument("--connections", help="explicit pairs 'model:aug_layer-anchor_layer,...' (default: the paper's)")
    p.add_argument("--num-heads", type=int, help="cross-attention heads (default: the anchor's)")
    add_option_flags(p)
    p.add_argument("--frozen-dtype", choices=("float32", "bfloat16"), help="storage dtype of the frozen models")
    p.add_argument("--resume", action="store_true", default=None, help="continue from RUN_DIR's latest checkpoint")
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
    d = p.add_argument_group("multi-process launch (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    d.add_argument("--coordinator", metavar="HOST:PORT")
    d.add_argument("--num-processes", type=int)
    d.add_argument("--process-id", type=int)
    return p


def resolve(argv) -> dict:
    """Flag values: built-in defaults < --config file < command-line flags.

    values["given"]: the names of the settings the file or the flags set; values["notices"]:
    defaults changed to fit the other settings, to print at the start.
    """
    args = build_parser().parse_args(argv)
    values = {**{k: f.default for k, f in _TRAIN_FIELDS.items()}, **_MODEL_DEFAULTS}
    values.update(anchor=None, data=None, out=None)
    given = set()
    if args.config:
        try:
            with open(args.config) as f:
                file_values = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--config {args.config}: cannot read it as JSON ({e})") from None
        unknown = sorted(k for k in file_values if k.replace("-", "_") not in values)
        if unknown:
            raise SystemExit(f"--config {args.config}: unknown keys {unknown}")
        values.update({k.replace("-", "_"): v for k, v in file_values.items()})
        given.update(k.replace("-", "_") for k in file_values)
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    given.update(k for k, v in vars(args).items() if v is not None and k != "config")
    if isinstance(values["augment"], str):
        values["augment"] = [values["augment"]]
    missing = [f"--{k.replace('_', '-')}" for k in ("anchor", "augment", "data", "out") if not values[k]]
    if missing:
        raise SystemExit(f"missing required {', '.join(missing)}")
    try:
        values["train"] = TrainConfig(**{k: values.pop(k) for k in list(values) if k in _TRAIN_FIELDS})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad training settings: {e}") from None
    cfg, notices = values["train"], []
    if cfg.warmup > cfg.steps:
        if "warmup" in given:  # asked for: the run would never reach the learning rate asked for
            raise SystemExit(f"bad training settings: warmup {cfg.warmup} is more than steps {cfg.steps}, "
                             "so no step would run at the full learning rate; lower --warmup")
        notices.append(f"--warmup not given: using {cfg.steps // 10} (a tenth of --steps), not the default "
                       f"{cfg.warmup}, which is more than the {cfg.steps} steps")
        values["train"] = cfg.replace(warmup=cfg.steps // 10)
    values.update(given=given, notices=notices)
    return values


def main(argv=None) -> int:
    v = resolve(argv)
    from calm_jax import sharding
    # Before anything touches a device.
    sharding.maybe_initialize_distributed(v["coordinator"], v["num_processes"], v["process_id"])

    import jax

    from calm_jax import checkpoint, composition, data, losses, trainer
    from calm_jax.config import ConfigError
    from calm_jax.loading import CheckpointError, load_config, load_pretrained, load_tokenizer
    from calm_jax.model import param_shapes

    cfg: TrainConfig = v["train"]
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)
    for notice in v["notices"]:
        say(notice)
    try:
        # Everything that needs no weights is checked first: loading them takes the longest.
        mesh = sharding.make_mesh(cfg.mesh)
        configs = [load_config(d, param_dtype=v["frozen_dtype"]) for d in (v["anchor"], *v["augment"])]
        ccfg = composition.CompositionConfig(
            anchor=configs[0], augments=tuple(configs[1:]),
            connections=parse_connections(v["connections"], len(v["augment"])), num_heads=v["num_heads"],
            options=options_from(v))
        if v["init_from"]:
            checkpoint.composition_step(v["init_from"])  # it has a Θ_C
            checkpoint.check_wiring(v["init_from"], ccfg)
        longest = composition.ComposedLM(ccfg).max_positions
        if "seq_len" not in v["given"] and cfg.seq_len > longest:
            say(f"--seq-len not given: using {longest}, the models' position limit, not the default {cfg.seq_len}")
            cfg = cfg.replace(seq_len=longest)
        if cfg.seq_len > longest:
            raise data.DataError(f"--seq-len {cfg.seq_len} is longer than the models' position limit ({longest})")
        tokenizers = [load_tokenizer(d) for d in (v["anchor"], *v["augment"])]
        if tokenizers[0] is None:
            raise CheckpointError(f"{v['anchor']} has no tokenizer files; the training data must be tokenized")
        missing_tok = [d for d, t in zip(v["augment"], tokenizers[1:]) if t is None]
        if missing_tok:
            raise CheckpointError(f"{missing_tok[0]} has no tokenizer files, so its vocabulary cannot be checked")
        composition.check_vocabularies(tokenizers[0], tokenizers[1:])
        # vocab_size may differ (tables padded differently); every tokenizer id must have a row in each.
        composition.check_tokenizer_fits(tokenizers[0], ccfg.anchor, ccfg.augments, dirs=[v["anchor"], *v["augment"]])
        train_data = data.load_dataset(v["data"], tokenizers[0], cfg.seq_len, cfg.append_eos)
        eval_data = (data.load_dataset(v["eval_data"], tokenizers[0], cfg.seq_len, cfg.append_eos)
                     if v["eval_data"] else None)
        place = lambda mcfg: sharding.param_shardings(mesh, param_shapes(mcfg), fsdp=cfg.fsdp)  # noqa: E731
        anchor = load_pretrained(v["anchor"], param_dtype=v["frozen_dtype"], shardings=place, tokenizer=False)
        augments = [load_pretrained(d, param_dtype=v["frozen_dtype"], shardings=place, tokenizer=False)
                    for d in v["augment"]]
        theta = composition.init_theta(ccfg, jax.random.key(cfg.seed))
        if v["init_from"]:  # checks the base models are the ones it was trained with
            theta = checkpoint.load_composition(v["init_from"], anchor, augments)[1]
            say(f"Θ_C initialised from {v['init_from']} (step {checkpoint.composition_step(v['init_from'])})")
        say(composition.describe(ccfg, theta))
        say(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} device(s), {jax.process_count()} process(es)")
        say(f"memory: remat {cfg.remat}, loss " + (f"in chunks of {cfg.loss_chunk} positions" if cfg.loss_chunk
                                                  else "over all positions at once"))
        say(f"data: {len(train_data)} training examples" + (f", {len(eval_data)} eval" if eval_data else ""))
        checkpoint.save_composition_config(v["out"], ccfg)
        frozen = {"anchor": anchor.params, "augments": tuple(a.params for a in augments)}
        result = trainer.train(
            v["out"], cfg, losses.composed_loss(ccfg, cfg.remat, cfg.loss_chunk), theta, frozen,
            train_data, eval_data, bases=checkpoint.composition_bases(anchor, augments), resume=v["resume"],
            mesh=mesh, meta={"anchor": v["anchor"], "augments": v["augment"], "data": v["data"],
                             "train_examples": len(train_data), "eval_data": v["eval_data"],
                             "init_from": v["init_from"]})
    except (CheckpointError, ConfigError, composition.CompositionError, data.DataError, sharding.MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
    say(f"done: step {result.step}, last train loss {last}"
        + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
        + f"; run directory {v['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
