"""The key-value arithmetic data: D_KV's properties, the three tasks, disjoint splits, the tokenizer."""

import re

import pytest

from calm_jax import data as data_lib
from train.kv_arithmetic import data as kv_task

CFG = kv_task.KVTaskConfig(n_kv=120, n_eval=100, seed=7)


@pytest.fixture(scope="module")
def kv():
    return kv_task.make_kv_data(CFG)


@pytest.fixture(scope="module")
def tok():
    return kv_task.make_tokenizer()


def test_dkv_keys_and_values(kv):
    assert len(kv.keys) == len(set(kv.keys)) == CFG.n_kv
    assert all(re.fullmatch(r"[a-z]{2,6}", k) for k in kv.keys)
    assert sorted(kv.values) == list(range(1, CFG.n_kv + 1))
    assert {len(k) for k in kv.keys} == set(range(2, 7))


def test_held_in_split(kv):
    assert len(kv.held_in) == round(0.2 * CFG.n_kv)
    assert set(kv.held_in).isdisjoint(kv.held_out)
    assert set(kv.held_in) | set(kv.held_out) == set(range(CFG.n_kv))


def test_deterministic_from_seed(kv):
    again = kv_task.make_kv_data(CFG)
    assert again == kv
    assert again.train_expressions(50, held_in_only=True) == kv.train_expressions(50, held_in_only=True)
    other = kv_task.make_kv_data(CFG.replace(seed=8))
    assert other.keys != kv.keys


def test_splits_disjoint_by_expression(kv):
    evals = set(kv.eval_all) | set(kv.eval_heldout)
    assert len(kv.eval_all) == len(set(kv.eval_all)) == CFG.n_eval
    assert set(kv.eval_all).isdisjoint(kv.eval_heldout)
    assert evals.isdisjoint(kv.train_expressions(2000))
    dc = kv.train_expressions(1000, held_in_only=True)
    assert evals.isdisjoint(dc)
    held_in = set(kv.held_in)
    assert all(set(keys) <= held_in for keys, _ in dc)
    assert all(not set(keys) & held_in for keys, _ in kv.eval_heldout)
    # The all-keys set is not restricted: it mixes held-in and held-out keys.
    assert any(set(keys) & held_in for keys, _ in kv.eval_all)
    assert any(set(keys) - held_in for keys, _ in kv.eval_all)


def test_three_tasks_from_one_expression(kv):
    expr = ((0, 1), ("-",))
    k0, k1 = kv.keys[0], kv.keys[1]
    v0, v1 = kv.values[0], kv.values[1]
    assert kv.record(expr, "kv_substitution") == {"prompt": f"[SUB]{k0}-{k1}=", "target": f"{v0}-{v1}"}
    assert kv.record(expr, "kv_arithmetic") == {"prompt": f"[KVA]{k0}-{k1}=", "target": str(v0 - v1)}
    assert kv.record(expr, "numeric_arithmetic") == {"prompt": f"[NUM]{v0}-{v1}=", "target": str(v0 - v1)}
    with pytest.raises(ValueError, match="unknown task"):
        kv.record(expr, "kv_division")


def test_paper_precedence():
    kv = kv_task.make_kv_data(kv_task.KVTaskConfig(n_kv=30, min_terms=3, max_terms=3, operators="+*", n_eval=10))
    expr = ((0, 1, 2), ("+", "*"))
    assert kv.result(expr) == kv.values[0] + kv.values[1] * kv.values[2]


def test_paper_preset_scale():
    p = kv_task.PAPER
    assert (p.n_kv, p.min_terms, p.max_terms, p.operators) == (25_000, 3, 6, "+-*")


@pytest.mark.parametrize("bad, match", [
    (dict(operators="/"), "operators"),
    (dict(n_kv=30, max_key_len=1, min_key_len=1), "do not fit"),
    (dict(held_in_fraction=1.0), "held_in_fraction"),
    (dict(min_terms=3, max_terms=2), "terms"),
    (dict(n_kv=50, max_value=60), "max_value"),
    (dict(max_value=0), "max_value"),
    (dict(max_noise_len=0), "max_noise_len"),
    (dict(dc_substitution=0.6, dc_numeric=0.5), "dc_substitution and dc_numeric"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        kv_task.KVTaskConfig(**bad)


def test_too_many_eval_expressions():
    with pytest.raises(ValueError, match="lower n_eval"):
        kv_task.make_kv_data(kv_task.KVTaskConfig(n_kv=10, n_eval=200))


def test_tokenizer_is_character_level(kv, tok):
    rec = kv.record(kv.eval_all[0], "kv_substitution")
    ids, is_target = data_lib.encode(tok, rec, append_eos=True)
    prompt_body = rec["prompt"][len("[SUB]"):]
    # BOS, one marker token, one token per character, then the target and EOS.
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[1] == tok.convert_tokens_to_ids("[SUB]")
    assert len(ids) == 2 + len(prompt_body) + len(rec["target"]) + 1
    assert sum(is_target) == len(rec["target"]) + 1
    assert tok.decode(ids, skip_special_tokens=True) == prompt_body + rec["target"]
    assert len({tok.convert_tokens_to_ids(m) for m in kv_task.MARKERS.values()}) == 3


def test_tokenizer_round_trips_hf_format(tmp_path, tok):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "[KVA]abc+de-fg="
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.bos_token, again.eos_token, again.pad_token) == ("[BOS]", "[EOS]", "[PAD]")
    assert again.get_vocab() == tok.get_vocab()


def test_fixed_width_and_scratchpad():
    cfg = kv_task.KVTaskConfig(n_kv=99, fixed_width=True, scratchpad=True, n_eval=20)
    kv = kv_task.make_kv_data(cfg)
    a, b = kv.values.index(7), kv.values.index(22)
    expr = ((a, b), ("-",))
    k = f"{kv.keys[a]}-{kv.keys[b]}"
    # With the scratchpad a written-out numeric expression starts with [NUM], as m_B's prompts do.
    assert kv.record(expr, "kv_substitution") == {"prompt": f"[SUB]{k}=", "target": "[NUM]07-22"}
    assert kv.record(expr, "numeric_arithmetic") == {"prompt": "[NUM]07-22=", "target": "-015"}
    assert kv.record(expr, "kv_arithmetic") == {"prompt": f"[KVA]{k}=", "target": "[NUM]07-22=-015"}
    plain = kv_task.make_kv_data(cfg.replace(scratchpad=False))
    assert plain.record(expr, "kv_substitution")["target"] == "07-22"
    assert plain.record(expr, "kv_arithmetic")["target"] == "-015"
    assert kv.record(((b, a), ("+",)), "numeric_arithmetic")["target"] == "+029"
    # Every numeric target has the same length: sign + digits of the largest |result| (99 + 99).
    assert {len(kv.record(e, "numeric_arithmetic")["target"]) for e in kv.eval_all} == {4}
    free = kv_task.make_kv_data(cfg.replace(fixed_width=False))
    assert free.record(expr, "numeric_arithmetic")["target"] == "-15"
    assert free.record(((b, a), ("+",)), "numeric_arithmetic")["target"] == "29"


def test_context_noise_prefixes_prompts_only():
    cfg = kv_task.KVTaskConfig(n_kv=99, fixed_width=True, context_noise=0.75, max_noise_len=16, n_eval=20)
    kv = kv_task.make_kv_data(cfg)
    records = kv.records(kv.train_expressions(2000), "numeric_arithmetic")
    noisy = kv_task.with_context_noise(records, cfg, seed=2)
    assert noisy == kv_task.with_context_noise(records, cfg, seed=2)  # deterministic
    assert noisy != kv_task.with_context_noise(records, cfg, seed=3)
    prefixes = []
    for r, n in zip(records, noisy):
        assert n["target"] == r["target"] and n["prompt"].endswith(r["prompt"])
        prefixes.append(n["prompt"][:-len(r["prompt"])])
    assert 0.70 < sum(bool(p) for p in prefixes) / len(prefixes) < 0.80
    tok = kv_task.make_tokenizer()
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prefixes if p]
    assert min(lengths) == 1 and max(lengths) == 16
    assert set("".join(prefixes)) <= set("".join(kv_task.NOISE_CHARS))
    assert kv_task.with_context_noise(records, cfg.replace(context_noise=0.0), seed=2) == records
    with pytest.raises(ValueError, match="context_noise"):
        kv_task.KVTaskConfig(context_noise=1.5)


def test_shared_values():
    """max_value < n_kv: each value used by n_kv / max_value keys, widths from max_value, and no
    training expression spells an evaluation problem's numbers through other keys."""
    cfg = kv_task.KVTaskConfig(n_kv=300, max_value=30, fixed_width=True, n_eval=200, seed=3)
    kv = kv_task.make_kv_data(cfg)
    assert len(set(kv.keys)) == 300
    assert sorted(set(kv.values)) == list(range(1, 31))
    assert {kv.values.count(v) for v in range(1, 31)} == {10}
    assert (cfg.value_width, cfg.result_width) == (2, 2)
    assert {len(kv.record(e, "numeric_arithmetic")["target"]) for e in kv.eval_all} == {3}
    eval_numeric = {kv.numeric_text(e) for e in kv.eval_all + kv.eval_heldout}
    train = kv.train_expressions(3000)
    assert eval_numeric.isdisjoint(kv.numeric_text(e) for e in train)
    assert len({kv.numeric_text(e) for e in train}) < len(set(train))  # values are shared
    # max_value = n_kv is the default's unique values, drawn identically.
    a, b = kv_task.make_kv_data(CFG), kv_task.make_kv_data(CFG.replace(max_value=CFG.n_kv))
    assert (a.keys, a.values, a.held_in, a.eval_all, a.eval_heldout) == (b.keys, b.values, b.held_in, b.eval_all,
                                                                         b.eval_heldout)
    assert a.train_expressions(500) == b.train_expressions(500)


def test_random_markers_change_only_the_marker():
    cfg = kv_task.KVTaskConfig(n_kv=99, fixed_width=True, scratchpad=True, random_marker=0.6, n_eval=20)
    kv = kv_task.make_kv_data(cfg)
    records = kv.records(kv.train_expressions(3000), "kv_substitution")
    marked = kv_task.with_random_markers(records, cfg, seed=1)
    assert marked == kv_task.with_random_markers(records, cfg, seed=1)
    assert all(m["target"] == r["target"] and m["prompt"][5:] == r["prompt"][5:] for m, r in zip(marked, records))
    share = {mk: sum(m["prompt"].startswith(mk) for m in marked) / len(marked) for mk in kv_task.MARKERS.values()}
    # 40% keep [SUB]; the 60% re-drawn are uniform over the three markers.
    assert share["[SUB]"] == pytest.approx(0.4 + 0.2, abs=0.03)
    assert share["[KVA]"] == pytest.approx(0.2, abs=0.03) and share["[NUM]"] == pytest.approx(0.2, abs=0.03)
    assert kv_task.with_random_markers(records, cfg.replace(random_marker=0.0), seed=1) == records
    with pytest.raises(ValueError, match="task marker"):
        kv_task.with_random_markers([{"prompt": "ab+cd=", "target": "1"}], cfg, seed=1)
    with pytest.raises(ValueError, match="random_marker"):
        kv_task.KVTaskConfig(random_marker=2.0)
