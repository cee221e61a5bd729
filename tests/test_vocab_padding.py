"""Models that share one tokenizer but pad their embedding tables differently compose.

A 96-id tokenizer; an anchor with 128 embedding rows and an augmenting model with 100 (as
Qwen2.5-7B's 152,064 and Qwen2.5-Coder-1.5B's 151,936 rows for one 151,665-id tokenizer).
The anchor's padded rows (ids 96..127) are made to win every argmax on purpose: decoding and
scoring must never let them through. Also: the refusals (a tokenizer id some table lacks,
different tokenizers), the CLI layer, and a mixed-family pair (Gemma-2 anchor, OLMo-2
augmenting model) whose cached decoding equals the uncached forward.
"""

import copy
import json
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers

from calm_jax import composition as comp
from calm_jax import data, decoding, losses, scoring, train_step
from calm_jax.config import from_hf_config
from calm_jax.decoding import GenerationError, Sampling
from calm_jax.loading import Pretrained, save_pretrained
from calm_jax.model import PlainLM, param_shapes
from eval import common, generate
from tests import hf_models, numerics
from tests.test_decoding import tiny_config

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
CHARS = " " + string.ascii_lowercase + string.digits + string.ascii_uppercase + string.punctuation[:29]
N_IDS = len(SPECIALS) + len(CHARS)  # 96
ANCHOR = tiny_config(hidden=32, layers=4).replace(vocab_size=128)
AUG = tiny_config(hidden=24, layers=4, heads=2, kv_heads=1).replace(vocab_size=100)
CCFG = comp.CompositionConfig(ANCHOR, (AUG,))
PROMPTS = ["ab+c", "hello 12", "x", "Z=?"]
BIG = 1000.0  # the padded rows' logits: BIG * |a hidden unit|, far above any real id's


def tokenizer(chars=CHARS):
    """A character-level WordLevel tokenizer: [PAD]=0, [BOS]=1 (prepended), [EOS]=2, [UNK]=3."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tok.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                                pad_token="[PAD]", unk_token="[UNK]")


TOK = tokenizer()


def draw(cfg, seed, std=0.3):
    """Random weights drawn in numpy (no kernel compiled per shape); norm scales near 1."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + std * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg))


def padded_rows_win(cfg, params, n_real=N_IDS):
    """The head's rows >= n_real set to ±BIG on one hidden unit each (ids n_real, n_real + 1 on
    unit 0, ...), so for any normalised final state one of them has the largest logit."""
    key, axis = (("embed", "embedding"), 0) if cfg.tie_embeddings else (("lm_head", "kernel"), 1)
    table = np.array(params[key[0]][key[1]])
    rows = np.zeros((cfg.vocab_size - n_real, cfg.hidden_size), table.dtype)
    for r in range(len(rows)):
        rows[r, (r // 2) % cfg.hidden_size] = BIG * (1 if r % 2 == 0 else -1)
    if axis == 0:
        table[n_real:] = rows
    else:
        table[:, n_real:] = rows.T
    return {**params, key[0]: {**params[key[0]], key[1]: jnp.asarray(table)}}


# The composed forward at one shape (4 x 16), compiled once for the references below.
logits_of = jax.jit(lambda params, tokens, mask: comp.ComposedLM(CCFG).apply(params, tokens, mask).logits_BxTxV)


def right_padded(rows):
    """rows right-padded to 4 x 16 (empty rows added), and each given row's length."""
    tokens, mask = data.pad_batch(list(rows) + [[]] * (4 - len(rows)), 16)
    return tokens, mask, [len(r) for r in rows]


@pytest.fixture(scope="module")
def params():
    theta = jax.tree.map(lambda x: 4.0 * x, comp.init_theta(CCFG, jax.random.key(0)))
    return {"theta": theta, "anchor": padded_rows_win(ANCHOR, draw(ANCHOR, 1)), "augments": (draw(AUG, 2),)}


def test_config_accepts_padded_tables_and_the_tokenizer_fits():
    assert (CCFG.anchor.vocab_size, CCFG.augments[0].vocab_size) == (128, 100)
    lm = comp.ComposedLM(CCFG)
    assert (lm.vocab_size, lm.num_tokens) == (128, 100)  # logits: the anchor's; ids all tables have: 100
    assert comp.num_token_ids(TOK) == len(TOK) == N_IDS
    comp.check_vocabularies(TOK, [tokenizer()])
    assert comp.check_tokenizer_fits(TOK, ANCHOR, [AUG]) == N_IDS
    assert comp.check_tokenizer_fits(TOK, AUG.replace(vocab_size=N_IDS), [ANCHOR]) == N_IDS  # exactly full fits


def test_refusals_name_the_model_and_the_id():
    small = AUG.replace(vocab_size=90)
    token = re.escape(repr(TOK.convert_ids_to_tokens(90)))
    with pytest.raises(comp.CompositionError, match=r"augmenting model 1 \(/m/aug2\) has vocab_size 90, but the "
                                                    rf"tokenizer has 96 token ids: token id 90 \({token}\) is out"):
        comp.check_tokenizer_fits(TOK, ANCHOR, [AUG, small], dirs=["/m/anchor", "/m/aug1", "/m/aug2"])
    with pytest.raises(comp.CompositionError, match=r"^the anchor has vocab_size 95, .* token id 95 "):
        comp.check_tokenizer_fits(TOK, ANCHOR.replace(vocab_size=95), [AUG])
    # Different tokenizers are still refused, whatever the tables' sizes.
    swapped = tokenizer(CHARS[1::-1] + CHARS[2:])
    with pytest.raises(comp.CompositionError, match=r"augmenting model 0's tokenizer differs .* at id 4"):
        comp.check_vocabularies(TOK, [swapped])


def test_training_theta_on_the_padded_pair():
    """The loss is over target ids, real ones: Θ_C trains with the anchor's full-width logits."""
    frozen = {"anchor": draw(ANCHOR, 1), "augments": (draw(AUG, 2),)}
    records = [{"prompt": p, "target": " ok" + p[::-1]} for p in PROMPTS]
    seqs, flags = zip(*(data.encode(TOK, r, append_eos=True) for r in records))
    assert max(max(s) for s in seqs) < N_IDS
    tokens, mask, target = data.pad_batch(seqs, 24, flags=flags)
    batch = {"tokens_BxT": tokens, "mask_BxT": mask, "target_BxT": target}
    optimizer = train_step.make_optimizer(3e-3, 4)
    step = train_step.make_train_step(losses.composed_loss(CCFG), optimizer)
    theta = comp.init_theta(CCFG, jax.random.key(3))
    opt_state, seen = optimizer.init(theta), []
    for _ in range(4):
        theta, opt_state, metrics = step(theta, opt_state, frozen, batch)
        seen.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    assert all(np.isfinite(seen).ravel()) and all(g > 0 for _, g in seen)
    assert seen[-1][0] < seen[0][0], seen


def test_decoding_never_generates_a_padded_id(params):
    lm = comp.ComposedLM(CCFG)
    ids = [decoding.prompt_ids(TOK, p) for p in PROMPTS]
    # Unmasked, every prompt's next token would be a padded row of the anchor.
    tokens, mask, lengths = right_padded(ids)
    logits = np.asarray(logits_of(params, tokens, mask))
    assert all(logits[r, n - 1].argmax() >= N_IDS for r, n in enumerate(lengths))
    greedy = decoding.generate(lm, params, PROMPTS, max_new_tokens=6, tokenizer=TOK, stop_at_eos=False)
    sampled = decoding.generate(lm, params, PROMPTS, max_new_tokens=6, tokenizer=TOK, stop_at_eos=False,
                                sampling=Sampling(temperature=1.5), seed=1)
    for gens in (greedy, sampled):
        toks = [t for g in gens for t in g.tokens]
        assert len(toks) == 6 * len(PROMPTS) and max(toks) < N_IDS, toks
    assert [g.tokens for g in greedy] != [g.tokens for g in sampled]
    # Without a tokenizer: never beyond the smallest table (the augmenting model's 100 rows),
    # so an id the anchor generates is always one the augmenting model can be fed.
    assert decoding.model_num_tokens(lm) == AUG.vocab_size and decoding.model_num_tokens(PlainLM(ANCHOR)) == 128
    # Prompt and stop ids the tokenizer (or a table) lacks are refused.
    with pytest.raises(GenerationError, match="prompt 0 has token id 96, out of range for a vocabulary of 96"):
        decoding.generate(lm, params, [[1, 96]], max_new_tokens=2, tokenizer=TOK)
    with pytest.raises(GenerationError, match="prompt 0 has token id 100, out of range for a vocabulary of 100"):
        decoding.generate(lm, params, [[1, 100]], max_new_tokens=2)
    with pytest.raises(GenerationError, match="stop token id 97 is out of range for a vocabulary of 96"):
        decoding.generate(lm, params, [[1, 5]], max_new_tokens=2, tokenizer=TOK, stop=[97])


def test_select_token_masks_before_every_filter():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 128)), jnp.float32).at[:, 96:].set(50.0)
    keys = jax.random.split(jax.random.key(0), 64)
    for sampling in (Sampling(), Sampling(1.0), Sampling(2.0, top_k=4), Sampling(1.0, top_p=0.5),
                     Sampling(0.7, top_k=8, top_p=0.9)):
        draws = jax.vmap(lambda k: decoding.select_token(logits, sampling, k, num_tokens=N_IDS))(keys)
        assert int(draws.max()) < N_IDS, sampling
    # Nothing to mask: the very same array, no op traced (plain models decode bit for bit as before).
    assert decoding.mask_padded(logits, 128) is logits and decoding.mask_padded(logits, None) is logits


def test_scoring_normalises_over_the_tokenizer_ids(params):
    lm = comp.ComposedLM(CCFG)
    records = [{"prompt": "ab+", "target": "cd"}, {"prompt": "hello", "target": " World!"}, {"text": "x y z"}]
    scores = scoring.loglik(lm, params, TOK, records, batch_size=2)
    encoded = [data.encode(TOK, r) for r in records]
    tokens, mask, _ = right_padded([ids for ids, _ in encoded])
    all_logits = np.asarray(logits_of(params, tokens, mask), np.float64)
    for record, (total, n), (ids, flags), logits in zip(records, scores, encoded, all_logits):
        logp, logp_full = log_softmax(logits[:, :N_IDS]), log_softmax(logits)  # by hand, in float64
        want = sum(logp[j - 1, ids[j]] for j in range(1, len(ids)) if flags[j])
        full = sum(logp_full[j - 1, ids[j]] for j in range(1, len(ids)) if flags[j])
        assert np.isfinite(total) and n == sum(flags[1:])
        assert abs(total - want) <= 1e-4 * max(1, n) * max(1.0, abs(want)), (record, total, want)
        assert full < want - 10 * n  # the padded rows would have swallowed the probability mass


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("padded")
    out = {}
    for name, cfg, p in (("anchor", ANCHOR, params["anchor"]), ("aug", AUG, params["augments"][0]),
                         ("aug_small", AUG.replace(vocab_size=90), draw(AUG.replace(vocab_size=90), 4))):
        save_pretrained(Pretrained(cfg, p, TOK), str(root / name))
        out[name] = str(root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out["prompts"], out["root"] = str(prompts), root
    return out


def test_cli_accepts_the_padded_pair(dirs, tmp_path):
    import argparse
    parser = argparse.ArgumentParser()
    common.add_model_flags(parser)
    loaded = common.build_model(parser.parse_args(["--anchor", dirs["anchor"], "--augment", dirs["aug"]]))
    assert (loaded.model.ccfg.anchor.vocab_size, loaded.model.ccfg.augments[0].vocab_size) == (128, 100)
    out = tmp_path / "gen.jsonl"
    assert generate.main(["--anchor", dirs["anchor"], "--augment", dirs["aug"], "--prompts", dirs["prompts"],
                          "--out", str(out), "--max-new-tokens", "6", "--no-eos-stop", "--batch-size", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(len(r["tokens"]) == 6 and max(r["tokens"]) < N_IDS for r in rows)


def test_cli_refuses_a_table_without_every_tokenizer_id(dirs, capsys):
    with pytest.raises(SystemExit, match=r"augmenting model 0 \(.*aug_small\) has vocab_size 90, .* token id 90"):
        generate.main(["--anchor", dirs["anchor"], "--augment", dirs["aug_small"], "--prompts", dirs["prompts"],
                       "--out", str(dirs["root"] / "never.jsonl"), "--max-new-tokens", "2"])
    from train import compose
    train_file = dirs["root"] / "train.jsonl"
    train_file.write_text(json.dumps({"prompt": "a", "target": "b"}) + "\n")
    code = compose.main(["--anchor", dirs["anchor"], "--augment", dirs["aug_small"], "--data", str(train_file),
                         "--out", str(dirs["root"] / "run"), "--steps", "1", "--batch-size", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "augmenting model 0 (" in err and "has vocab_size 90" in err and "token id 90" in err, err


def _family(name, vocab_size):
    kwargs = copy.deepcopy(hf_models.FAMILY_SPECS[name][2])
    return from_hf_config(dict(kwargs, model_type=name, vocab_size=vocab_size), dtype="float64")


def test_mixed_family_pair_cached_equals_uncached():
    """A Gemma-2 anchor (128 rows, tied, soft-capped, sliding window 3) with an OLMo-2 augmenting
    model (100 rows), one tokenizer: an identity, so float64 (tests/numerics.py)."""
    with numerics.float64():
        anchor, aug = _family("gemma2", 128), _family("olmo2", 100)
        assert (anchor.family, anchor.tie_embeddings, aug.family) == ("gemma2", True, "olmo2")
        ccfg = comp.CompositionConfig(anchor, (aug,), dtype="float64")
        assert comp.check_tokenizer_fits(TOK, anchor, [aug]) == N_IDS
        lm = comp.ComposedLM(ccfg)
        theta = jax.tree.map(lambda x: 4.0 * x, comp.init_theta(ccfg, jax.random.key(1)))
        params = {"theta": theta, "anchor": draw(anchor, 5), "augments": (draw(aug, 6),)}
        rows = [data.encode(TOK, {"text": t})[0] for t in ("Key ab + cd = 17", "x*y", "hello world")]
        tokens, mask = data.pad_batch(rows, 17)
        tokens, mask = tokens[:, :16], mask[:, :16]  # row 0 full, the others right-padded
        apply = jax.jit(lm.apply)
        full = np.asarray(apply(params, tokens, mask).logits_BxTxV)
        assert full.dtype == np.float64 and full.shape == (3, 16, 128) and np.isfinite(full).all()
        cache, start, chunks = lm.init_cache(3, 16), 0, []
        for size in (10, 2, 2, 1, 1):  # prefill, 2-token chunks, single tokens
            out = apply(params, tokens[:, start:start + size], mask[:, start:start + size], cache)
            cache, start = out.cache, start + size
            chunks.append(np.asarray(out.logits_BxTxV))
        numerics.assert_identity(np.concatenate(chunks, axis=1), full, where=mask[..., None])
        # The augmenting model really contributes: without Θ_C's output the logits differ.
        zero = {**params, "theta": jax.tree.map(jnp.zeros_like, theta)}
        assert np.abs(np.asarray(apply(zero, tokens, mask).logits_BxTxV) - full).max() > 1e-3
