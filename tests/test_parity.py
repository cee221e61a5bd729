"""Parity with HF transformers: logits and every tap on a padded batch, for every family."""

import jax
import numpy as np
import pytest

from calm_jax import load_pretrained, masks, model
from tests import hf_models, numerics

# The project's parity bar for float32 (MISSION.md). Both sides compute in float32 in
# different orders (and HF's own float32 RoPE tables); measured <= 2.1e-6 on logits of
# scale 3-5 (2.0e-6 on an AVX-512 CPU): a margin of ~50. A wrong formula (norm offset, RoPE
# scaling, a missing bias, a mask) shows as >= 1e-2.
TOL = 1e-4
# forward jitted once per config (static) and set of taps.
FWD = jax.jit(model.forward, static_argnums=0, static_argnames=("taps", "logits"))


def padded_batch(seed=0, length=10):
    """Row 0 left-padded by 3, row 1 right-padded by 2."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, hf_models.VOCAB, (2, length)).astype(np.int32)
    mask = np.ones((2, length), bool)
    mask[0, :3] = False
    mask[1, -2:] = False
    tokens[~mask] = 0
    return tokens, mask


@pytest.fixture(scope="module", params=sorted(hf_models.SPECS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = hf_models.save_hf_model(request.param, str(path))
    return request.param, hf, load_pretrained(str(path))


def test_logits_and_taps_match_hf(pair):
    name, hf, ours = pair
    tokens, mask = padded_batch()
    positions = np.asarray(masks.positions_from_mask(mask))
    n = ours.config.num_layers
    out = FWD(ours.config, ours.params, tokens, mask, positions, taps=tuple(range(n)))
    hf_logits, hf_hidden = hf_models.hf_logits_and_hidden(hf, tokens, mask, positions)

    assert len(hf_hidden) == n + 1
    np.testing.assert_allclose(np.asarray(out.logits_BxTxV)[mask], hf_logits[mask], atol=TOL, rtol=0,
                               err_msg=f"{name}: logits")
    for i in range(n - 1):  # taps[i] == HF hidden_states[i + 1]
        np.testing.assert_allclose(np.asarray(out.taps[i])[mask], hf_hidden[i + 1][mask], atol=TOL, rtol=0,
                                   err_msg=f"{name}: tap {i}")
    # HF's last hidden state is after the final norm; ours is before it.
    final = model.final_norm(ours.config, ours.params, out.taps[n - 1])
    np.testing.assert_allclose(np.asarray(final)[mask], hf_hidden[n][mask], atol=TOL, rtol=0,
                               err_msg=f"{name}: final-normed last tap")


def test_padded_rows_match_hf_on_the_unpadded_rows(pair):
    """Our padded batch (default positions) gives each row the logits HF gives it alone, unpadded."""
    name, hf, ours = pair
    tokens, mask = padded_batch(seed=2)
    logits = np.asarray(FWD(ours.config, ours.params, tokens, mask).logits_BxTxV)
    for row in range(len(tokens)):
        real = tokens[row][mask[row]][None]
        hf_logits, _ = hf_models.hf_logits_and_hidden(hf, real, np.ones_like(real, bool),
                                                      np.arange(real.shape[1])[None])
        np.testing.assert_allclose(logits[row][mask[row]], hf_logits[0], atol=TOL, rtol=0,
                                   err_msg=f"{name}: row {row}")


def test_default_positions_are_hf_positions(pair):
    """Without explicit positions, forward derives the same ones HF needs for padding."""
    _, _, ours = pair
    tokens, mask = padded_batch(seed=1)
    with numerics.float64():  # two programs computing one function: an identity
        cfg64, params64 = numerics.f64(ours.config), numerics.to_f64(ours.params)
        positions = masks.positions_from_mask(mask)
        a = FWD(cfg64, params64, tokens, mask).logits_BxTxV
        b = FWD(cfg64, params64, tokens, mask, positions).logits_BxTxV
        numerics.assert_identity(np.asarray(a)[mask], np.asarray(b)[mask])


@pytest.mark.parametrize("keep_layer_types", [True, False])
def test_qwen2_sliding_window_layers(tmp_path, keep_layer_types):
    """Qwen2 windows only layers >= max_window_layers; old config.json files say so without layer_types."""
    import json

    import torch
    import transformers

    config = transformers.Qwen2Config(**{**hf_models._BASE, "num_key_value_heads": 2}, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=1)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(str(tmp_path))
    cfg_file = tmp_path / "config.json"
    saved = json.loads(cfg_file.read_text())
    assert saved["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    if not keep_layer_types:
        del saved["layer_types"]
        cfg_file.write_text(json.dumps(saved))
    ours = load_pretrained(str(tmp_path))
    assert ours.config.sliding_layers == (False, True, True)
    tokens, mask = padded_batch()
    positions = np.asarray(masks.positions_from_mask(mask))
    out = FWD(ours.config, ours.params, tokens, mask, positions)
    hf_logits, _ = hf_models.hf_logits_and_hidden(hf, tokens, mask, positions)
    np.testing.assert_allclose(np.asarray(out.logits_BxTxV)[mask], hf_logits[mask], atol=TOL, rtol=0)
