"""Log-likelihood scoring (calm_jax.scoring and python -m eval.loglik) against HF's logits."""

import json

import jax
import numpy as np
import pytest
import torch

from calm_jax import data, load_pretrained, model, scoring
from eval import loglik as loglik_cli
from tests import hf_models, numerics

RECORDS = [
    {"prompt": "Key ab + cd =", "target": " 17"},
    {"prompt": "x", "target": "y"},
    {"prompt": "The value of the key named qrs plus the value of tu is", "target": " 4012, as stored."},
    {"prompt": "7 * 6 =", "target": " 42"},
    {"prompt": "", "target": "hello"},
    {"text": "A whole text, scored after its first token."},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    hf = hf_models.save_hf_model("llama", path)
    hf_models.make_tokenizer().save_pretrained(path)
    ours = load_pretrained(path)
    return path, hf, ours, model.PlainLM(ours.config)


def hf_loglik(hf, tokenizer, record):
    """Unpadded HF forward of one record; sum of log p(token j | tokens < j) over target tokens,
    normalised over the tokenizer's 82 ids as calm_jax.scoring does (the model's 96 rows are padded)."""
    ids, flags = data.encode(tokenizer, record)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0, :, :len(tokenizer)].double()
    logp = torch.log_softmax(logits, -1).numpy()
    picked = [logp[j - 1, ids[j]] for j in range(1, len(ids)) if flags[j]]
    return float(np.sum(picked)), len(picked)


def test_matches_hf(setup):
    _, hf, ours, lm = setup
    scores = scoring.loglik(lm, ours.params, ours.tokenizer, RECORDS, batch_size=4)
    for record, (total, n) in zip(RECORDS, scores):
        want_total, want_n = hf_loglik(hf, ours.tokenizer, record)
        assert n == want_n, record
        # The parity bar (1e-4 per logit in float32) carried to each scored token's log-probability.
        assert abs(total - want_total) <= 1e-4 * max(1, n), (record, total, want_total)
    assert scores[0][1] == 3  # " 17": three characters
    assert scores[5][1] == len(RECORDS[5]["text"])  # BOS + text, all but the BOS scored


@numerics.float64()
def test_padding_and_batching_do_not_change_scores(setup):
    # An identity (padding and batching only reorder the maths): float64, tests/numerics.py.
    path = setup[0]
    ours = load_pretrained(path, dtype="float64")
    assert ours.config.dtype == "float64" and all(x.dtype == np.float64 for x in jax.tree.leaves(ours.params))
    lm = model.PlainLM(ours.config)
    target = RECORDS[0]
    alone = scoring.loglik(lm, ours.params, ours.tokenizer, [target], batch_size=1)[0]
    batched = scoring.loglik(lm, ours.params, ours.tokenizer, [RECORDS[2], RECORDS[1], target], batch_size=4)[2]
    # the batch is padded to a longer bucket and has an empty row: a real test of padding
    lengths = [len(data.encode(ours.tokenizer, r)[0]) for r in (target, RECORDS[2])]
    assert scoring.bucket_length(lengths[0], lm.max_positions) < scoring.bucket_length(lengths[1], lm.max_positions)
    assert batched[1] == alone[1]
    numerics.assert_identity(np.float64(batched[0]), np.float64(alone[0]))


def test_bucket_length():
    assert [scoring.bucket_length(n, 128) for n in (1, 16, 17, 33, 100, 128)] == [16, 16, 32, 64, 128, 128]
    assert scoring.bucket_length(100, 80) == 80


def test_too_long_record(setup):
    _, _, ours, lm = setup
    with pytest.raises(data.DataError, match=r"record 1 has 1\d\d tokens, more than the model's 128 positions"):
        scoring.loglik(lm, ours.params, ours.tokenizer, [RECORDS[0], {"prompt": "a" * 130, "target": "b"}])


def test_cli(setup, tmp_path, capsys):
    path, hf, ours, _ = setup
    data_file, out_file = tmp_path / "d.jsonl", tmp_path / "out.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:4]))
    assert loglik_cli.main(["--model", path, "--data", str(data_file), "--out", str(out_file),
                            "--batch-size", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "target")} for r in rows] == RECORDS[:4]
    want = [hf_loglik(hf, ours.tokenizer, r) for r in RECORDS[:4]]
    # Parity with HF: the bar of 1e-4 per scored token, as in test_matches_hf.
    for r, w in zip(rows, want):
        assert abs(r["loglik"] - w[0]) <= 1e-4 * max(1, w[1]), (r, w)
    assert [r["n_tokens"] for r in rows] == [w[1] for w in want]
    tokens = sum(w[1] for w in want)
    assert summary["records"] == 4 and summary["target_tokens"] == tokens
    # The summary aggregates the rows it wrote, in float64: only summation order may differ.
    total = sum(r["loglik"] for r in rows)
    assert summary["loglik_per_token"] == pytest.approx(total / tokens, rel=1e-12)
    assert summary["perplexity"] == pytest.approx(np.exp(-total / tokens), rel=1e-12)


@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    ('{"prompt": "a", "target": "b"}\n{"prompt": "a", \n', "d.jsonl: line 2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}\n', 'd.jsonl: line 1: expected {"prompt", "target"} or {"text"}'),
    ("\n\n", "has no records"),
])
def test_cli_bad_data(setup, tmp_path, capsys, content, message):
    path = setup[0]
    data_file = tmp_path / "d.jsonl"
    if content is not None:
        data_file.write_text(content)
    assert loglik_cli.main(["--model", path, "--data", str(data_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.loglik: error: ") and message in err, err


def test_cli_model_without_tokenizer(tmp_path, capsys):
    hf_models.save_hf_model("gpt2", str(tmp_path / "m"))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "target": "b"}\n')
    assert loglik_cli.main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl")]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
