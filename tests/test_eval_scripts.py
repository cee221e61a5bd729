"""eval.generate and eval.exact_match end to end on tiny saved models with a char tokenizer."""

import json
import os
import subprocess
import sys

import pytest

from calm_jax import decoding
from calm_jax import loaded as loaded_lib
from calm_jax.loading import Pretrained, save_pretrained
from eval import common, exact_match, generate
from tests import numerics
from tests.test_decoding import char_tokenizer, random_params, tiny_config

PROMPTS = ["ab+c", "hello 12", "x", "9*9=?"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Saved HF directories: an anchor and two augmenting models sharing one tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tok = char_tokenizer()
    out = {}
    for name, cfg, seed in (("anchor", tiny_config(hidden=32, layers=4), 1),
                            ("aug1", tiny_config(hidden=24, layers=4, heads=2, kv_heads=1), 2),
                            ("aug2", tiny_config(hidden=16, layers=4, family="gpt2"), 3)):
        save_pretrained(Pretrained(cfg, random_params(cfg, seed), tok), str(root / name))
        out[name] = str(root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out["prompts"] = str(prompts)
    out["root"] = root
    return out


def _composed_flags(dirs, encoder=False):
    return ["--anchor", dirs["anchor"], "--augment", dirs["aug1"], "--augment", dirs["aug2"]] + (
        ["--encoder-mode"] if encoder else [])


def test_generate_plain_model_matches_library(dirs, tmp_path):
    out = tmp_path / "gen.jsonl"
    assert generate.main(["--model", dirs["anchor"], "--prompts", dirs["prompts"], "--out", str(out),
                          "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    loaded = common.build_model(common_args(["--model", dirs["anchor"]]))
    lib = decoding.generate(loaded.model, loaded.params, PROMPTS, max_new_tokens=6, tokenizer=loaded.tokenizer,
                            batch_size=4)
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))  # input fields kept, order kept
    assert [r["tokens"] for r in rows] == [g.tokens for g in lib]
    for r in rows:
        assert 1 <= r["num_generated"] == len(r["tokens"]) <= 6
        kept = r["tokens"][:-1] if r["stopped"] else r["tokens"]
        assert r["generation"] == loaded.tokenizer.decode(kept, skip_special_tokens=True)


def common_args(argv):
    import argparse
    parser = argparse.ArgumentParser()
    common.add_model_flags(parser)
    return parser.parse_args(argv)


def test_generate_composition_command_line(dirs, tmp_path):
    """The real `python -m eval.generate` entry point, on a composition of two augmenting models."""
    out = tmp_path / "gen.jsonl"
    cmd = [sys.executable, "-m", "eval.generate", *_composed_flags(dirs), "--prompts", dirs["prompts"],
           "--out", str(out), "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "5", "--seed", "3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Θ_C is randomly initialised" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(1 <= r["num_generated"] <= 5 for r in rows)


def test_exact_match_side_by_side_table(dirs, tmp_path):
    """Targets built from the models' own greedy outputs, so the expected accuracies are known."""
    variants = [("plain", ["--model", dirs["anchor"]]), ("calm", _composed_flags(dirs)),
                ("calm-encoder", _composed_flags(dirs, encoder=True))]
    out_dir = tmp_path / "em"
    for label, flags in variants:
        loaded = common.build_model(common_args(flags))
        gens = decoding.generate(loaded.model, loaded.params, PROMPTS, max_new_tokens=6, tokenizer=loaded.tokenizer,
                                 batch_size=4)
        # Task "right": the target is the generation itself, padded with whitespace that the
        # normalisation removes; task "wrong": a target it cannot produce ("#" is outside the
        # tokenizer's characters, so no decoded generation contains it).
        records = [{"prompt": p, "target": f"  {g.text} ", "task": "right"} for p, g in zip(PROMPTS[:3], gens)]
        records.append({"prompt": PROMPTS[3], "target": gens[3].text + "#", "task": "wrong"})
        data = tmp_path / f"data-{label}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert exact_match.main([*flags, "--data", str(data), "--out", str(out_dir), "--label", label,
                                 "--max-new-tokens", "6", "--batch-size", "4", "--metrics", "chrf,bleu"]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert list(results) == ["plain", "calm", "calm-encoder"]
    for label in results:
        scores = results[label]["scores"]
        assert scores["right"]["exact_match"] == 1.0 and scores["right"]["n"] == 3
        assert scores["wrong"]["exact_match"] == 0.0
        assert scores["all"]["exact_match"] == 0.75
        assert scores["right"]["chrf"] == pytest.approx(100.0)
    assert results["calm-encoder"]["encoder_mode"] and not results["calm"]["encoder_mode"]
    table = (out_dir / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | right EM % |") and len(table) == 2 + 3
    assert table[2].startswith("| plain | 100.0 |")
    preds = [json.loads(line) for line in (out_dir / "predictions-calm-encoder.jsonl").read_text().splitlines()]
    assert [p["correct"] for p in preds] == [True, True, True, False]


def test_scripts_report_bad_input(dirs, tmp_path):
    out = str(tmp_path / "x.jsonl")
    with pytest.raises(SystemExit, match="only apply to a composition"):
        generate.main(["--model", dirs["anchor"], "--augment", dirs["aug1"], "--prompts", dirs["prompts"],
                       "--out", out])
    with pytest.raises(SystemExit, match="--anchor needs at least one --augment"):
        generate.main(["--anchor", dirs["anchor"], "--prompts", dirs["prompts"], "--out", out])
    with pytest.raises(SystemExit, match="error: stop token 'zz' is not a token of the vocabulary"):
        generate.main(["--model", dirs["anchor"], "--prompts", dirs["prompts"], "--out", out, "--stop", "zz",
                       "--max-new-tokens", "4"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl: line 1: expected a JSON object with string field\(s\) "
                                         r"prompt, target"):
        exact_match.main(["--model", dirs["anchor"], "--data", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: model directory not found"):
        generate.main(["--model", str(tmp_path / "nope"), "--prompts", dirs["prompts"], "--out", out])


def test_trained_composition_from_run_dir(dirs, tmp_path):
    """--composition RUN_DIR loads Θ_C from a checkpoint and refuses other base models."""
    import jax

    from calm_jax import checkpoint
    from calm_jax import composition as comp
    from calm_jax.loading import load_pretrained

    anchor, aug1, aug2 = (load_pretrained(dirs[n]) for n in ("anchor", "aug1", "aug2"))
    ccfg = comp.CompositionConfig(anchor=anchor.config, augments=(aug1.config, aug2.config),
                                  connections=(((3, 3),), ((1, 1), (3, 2))), options=comp.CompositionOptions(gate=True))
    theta = jax.tree.map(lambda x: 3.0 * x, comp.init_theta(ccfg, jax.random.key(5)))
    run = str(tmp_path / "run")
    checkpoint.save_composition_config(run, ccfg)
    ckpts = checkpoint.Checkpoints(run, checkpoint.composition_bases(anchor, [aug1, aug2]), async_save=False)
    ckpts.save(7, {"trainable": theta}, {"step": 7})
    ckpts.close()

    out = tmp_path / "gen.jsonl"
    assert generate.main([*_composed_flags(dirs), "--composition", run, "--prompts", dirs["prompts"],
                          "--out", str(out), "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    model = comp.ComposedLM(ccfg)
    params = {"theta": theta, "anchor": anchor.params, "augments": (aug1.params, aug2.params)}
    lib = decoding.generate(model, params, PROMPTS, max_new_tokens=6, tokenizer=anchor.tokenizer, batch_size=4)
    assert [json.loads(line)["tokens"] for line in out.read_text().splitlines()] == [g.tokens for g in lib]

    swapped = ["--anchor", dirs["anchor"], "--augment", dirs["aug2"], "--augment", dirs["aug1"]]
    with pytest.raises(SystemExit, match="belongs to other base models:\n  augment_0 config differs"):
        generate.main([*swapped, "--composition", run, "--prompts", dirs["prompts"], "--out", str(out)])


def test_loglik_scores_a_composition(dirs, tmp_path, capsys):
    """eval.loglik with --anchor/--augment: each record's score equals a direct composed forward."""
    import jax
    import numpy as np

    from calm_jax import checkpoint
    from calm_jax import composition as comp
    from calm_jax.data import encode
    from calm_jax.loading import load_pretrained
    from eval import loglik

    records = [{"prompt": "ab+c", "target": "=12"}, {"prompt": "hello", "target": " x"}]
    data = tmp_path / "ll.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "scores.jsonl"
    # The CLI batched vs a direct forward of each record alone: an identity, so in float64
    # (tests/numerics.py): a float64 Θ_C in a run directory, the frozen models at --dtype float64.
    with numerics.float64():
        models = [load_pretrained(dirs[name], dtype="float64") for name in ("anchor", "aug1", "aug2")]
        ccfg = comp.CompositionConfig(models[0].config, (models[1].config, models[2].config), dtype="float64")
        theta = jax.tree.map(lambda x: 3.0 * x, comp.init_theta(ccfg, jax.random.key(5)))
        run = str(tmp_path / "run64")
        checkpoint.save_composition_config(run, ccfg)
        ckpts = checkpoint.Checkpoints(run, checkpoint.composition_bases(models[0], models[1:]), async_save=False)
        ckpts.save(1, {"trainable": theta}, {"step": 1})
        ckpts.close()
        flags = [*_composed_flags(dirs), "--composition", run, "--dtype", "float64"]
        assert loglik.main([*flags, "--data", str(data), "--out", str(out)]) == 0
        scores = [json.loads(line)["loglik"] for line in out.read_text().splitlines()]
        loaded = common.build_model(common_args(flags))
        assert loaded.model.ccfg.anchor.dtype == loaded.model.ccfg.dtype == "float64"
        for record, score in zip(records, scores):
            ids, flags_T = encode(loaded.tokenizer, record)
            logits = loaded.model.apply(loaded.params, np.asarray([ids])).logits_BxTxV[0]
            assert logits.dtype == np.float64
            # Normalised over the tokenizer's 46 ids, as calm_jax.scoring does (the tables have 48 rows).
            logp = jax.nn.log_softmax(logits[:-1, :len(loaded.tokenizer)], axis=-1)[np.arange(len(ids) - 1),
                                                                                    np.asarray(ids[1:])]
            numerics.assert_identity(np.float64(score), np.sum(np.asarray(logp)[np.asarray(flags_T[1:])]))
    with pytest.raises(SystemExit):
        loglik.main([*flags, "--encoder-mode", "--data", str(data)])
    assert "--encoder-mode is a decoding ablation" in capsys.readouterr().err


def test_exact_match_scores_key_value_targets_as_generated(tmp_path, monkeypatch):
    """The key-value eval files: every target begins with the [NUM] task marker, a special token
    that generated text never shows. A model whose generation is exactly each target's tokens
    must score 100%."""
    import numpy as np

    from calm_jax.data import read_jsonl
    from train.kv_arithmetic.presets import PRESETS
    from train.kv_arithmetic.task import TASK

    paths, tok = TASK.build_data(PRESETS["tiny"], str(tmp_path)).paths, TASK.tokenizer()
    model_dir = str(tmp_path / "model")
    cfg = tiny_config(hidden=16, heads=2, kv_heads=1)
    save_pretrained(Pretrained(cfg, random_params(cfg, 4), tok), model_dir)
    files = {"sub": paths["eval_kv_substitution"], "kva": paths["eval_kv_arithmetic_heldout"]}
    records = [r for f in files.values() for r in read_jsonl(f)]
    assert all(r["target"].startswith("[NUM]") for r in records)
    answers = {tuple(decoding.prompt_ids(tok, r["prompt"])):
               tok(r["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in records}

    def decode_the_target(model, params, tokens_BxP, mask_BxP, stop_ids_Z, rng, *, max_new_tokens, **_):
        rows = [answers[tuple(t[m].tolist())] for t, m in zip(np.asarray(tokens_BxP), np.asarray(mask_BxP))]
        tokens_BxM = np.full((len(rows), max_new_tokens), -1, np.int32)
        for r, ids in enumerate(rows):
            tokens_BxM[r, :len(ids)] = ids
        return decoding.DecodeOutput(tokens_BxM=tokens_BxM, num_B=np.array([len(ids) for ids in rows]),
                                     stopped_B=np.ones(len(rows), bool))

    monkeypatch.setattr(decoding, "decode", decode_the_target)
    out = tmp_path / "em"
    for name, path in files.items():
        assert exact_match.main(["--model", model_dir, "--data", path, "--out", str(out), "--label", name,
                                 "--batch-size", "16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {name: results[name]["scores"]["all"]["exact_match"] for name in files} == {"sub": 1.0, "kva": 1.0}
    preds = [json.loads(line) for line in (out / "predictions-kva.jsonl").read_text().splitlines()]
    assert all(p["correct"] and p["target"] == "[NUM]" + p["prediction"] for p in preds)


def _save_run(dirs, run, step, seed):
    """A train.compose run directory over dirs' three models with one checkpoint, `step`."""
    import jax

    from calm_jax import checkpoint
    from calm_jax import composition as comp
    from calm_jax.loading import load_pretrained

    models = [load_pretrained(dirs[n]) for n in ("anchor", "aug1", "aug2")]
    ccfg = comp.CompositionConfig(anchor=models[0].config, augments=(models[1].config, models[2].config))
    checkpoint.save_composition_config(str(run), ccfg)
    ckpts = checkpoint.Checkpoints(str(run), checkpoint.composition_bases(models[0], models[1:]), async_save=False)
    ckpts.save(step, {"trainable": comp.init_theta(ccfg, jax.random.key(seed))}, {"step": step})
    ckpts.close()
    return str(run)


def test_exact_match_keeps_one_row_per_composition(dirs, tmp_path, capsys):
    """Compositions of the same models (two runs, a random Θ_C) evaluated into one --out are
    rows of their own, each recording what it was; a rerun replaces its own row; a different
    composition under a label the table has is refused, before any model loads."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": "12"}) + "\n" for p in PROMPTS))
    run_a = _save_run(dirs, tmp_path / "a" / "calm", 7, 1)
    run_b = _save_run(dirs, tmp_path / "b" / "calm", 3, 2)
    out = tmp_path / "em"

    def evaluate(*flags):
        return exact_match.main([*_composed_flags(dirs), *flags, "--data", str(data), "--out", str(out),
                                 "--max-new-tokens", "3", "--batch-size", "4"])

    for flags in (["--composition", run_a], ["--composition", run_b], [], ["--composition", run_b]):
        assert evaluate(*flags) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["calm:anchor+aug1+aug2@calm:step7", "calm:anchor+aug1+aug2@calm:step3",
                             "calm:anchor+aug1+aug2@random-theta:seed0"]
    sources = [r["source"] for r in results.values()]
    assert [(s["composition"], s["step"], s["theta_seed"]) for s in sources] == [
        (os.path.abspath(run_a), 7, None), (os.path.abspath(run_b), 3, None), (None, None, 0)]
    assert sources[0]["augments"] == [os.path.abspath(dirs["aug1"]), os.path.abspath(dirs["aug2"])]
    assert len(list(out.glob("predictions-*.jsonl"))) == 3
    capsys.readouterr()
    run_c = _save_run(dirs, tmp_path / "c" / "calm", 3, 3)  # same directory name and step as run_b
    with pytest.raises(SystemExit, match=r"already has a row 'calm:anchor\+aug1\+aug2@calm:step3' from something "
                                         r"else \(source.composition: .*b/calm' there, .*c/calm' here\); give "
                                         r"this one another --label"):
        evaluate("--composition", run_c)
    assert json.loads((out / "results.json").read_text()) == results


def test_eval_bad_input_is_reported_early_with_line_numbers(dirs, tmp_path, capsys, monkeypatch):
    from calm_jax.config import ConfigError
    from calm_jax.loading import load_pretrained
    from eval import loglik

    out = str(tmp_path / "gen.jsonl")
    with pytest.raises(SystemExit):
        generate.main(["--model", dirs["anchor"], "--prompts", dirs["prompts"], "--out", out, "--dtype", "bf16"])
    assert "invalid choice: 'bf16'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="dtype 'bf16' is not a dtype .* use one of float32, bfloat16"):
        load_pretrained(dirs["anchor"], dtype="bf16")
    # Line numbers of the file, from 1, blank lines counted.
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text('{"prompt": "ab", "target": "c"}\n\n{"prompt": "64-28=", "target": 36}\n')
    assert loglik.main(["--model", dirs["anchor"], "--data", str(numeric)]) == 2
    assert "numeric.jsonl: line 3: field 'target' must be a string, found int 36" in capsys.readouterr().err
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "ab", "target": "c"}\n\n' + json.dumps({"prompt": "a" * 70, "target": "b"}) + "\n")
    assert loglik.main(["--model", dirs["anchor"], "--data", str(long)]) == 2
    assert "long.jsonl: line 3 has 72 tokens, more than the model's 64 positions" in capsys.readouterr().err
    # The default --max-new-tokens (64) cannot fit a 64-position model: it is lowered, and said so.
    assert generate.main(["--model", dirs["anchor"], "--prompts", dirs["prompts"], "--out", out,
                          "--batch-size", "4"]) == 0
    assert (f"--max-new-tokens not given: using 55, not the default 64: the model has 64 positions and the longest "
            f"prompt ({dirs['prompts']}: line 2) has 9 tokens") in capsys.readouterr().err
    assert max(json.loads(line)["num_generated"] for line in open(out)) <= 55
    with pytest.raises(SystemExit, match=r"prompts.jsonl: line 1 has 5 tokens; with max_new_tokens=60 that needs 65 "
                                         r"positions, more than the model's maximum of 64"):
        generate.main(["--model", dirs["anchor"], "--prompts", dirs["prompts"], "--out", out,
                       "--max-new-tokens", "60"])
    # Data errors come before any model is loaded.
    monkeypatch.setattr(loaded_lib, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded first"))
    with pytest.raises(SystemExit, match="numeric.jsonl: line 3: field 'target' must be a string"):
        exact_match.main(["--model", dirs["anchor"], "--data", str(numeric), "--out", str(tmp_path / "em")])
