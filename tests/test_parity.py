"""Parity with HF transformers: logits and every tap on a padded batch, for every family."""

import jax
import numpy as np
import pytest

from calm_jax import load_pretrained, masks, model
from tests import hf_models

TOL = 1e-4  # fp32: differences are summation-order noise (~2e-6 seen)
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


def test_default_positions_are_hf_positions(pair):
    """Without explicit positions, forward derives the same ones HF needs for padding."""
    _, _, ours = pair
    tokens, mask = padded_batch(seed=1)
    positions = masks.positions_from_mask(mask)
    a = FWD(ours.config, ours.params, tokens, mask).logits_BxTxV
    b = FWD(ours.config, ours.params, tokens, mask, positions).logits_BxTxV
    np.testing.assert_array_equal(np.asarray(a)[mask], np.asarray(b)[mask])
