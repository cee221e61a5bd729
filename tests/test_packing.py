"""Packed training rows (data.packed_batch_at, segments_BxT): several examples per row, with the
same losses and Θ_C gradient as one example per row, no attention across examples, and a
stream that resumes exactly.

Identities run in float64 (tests/numerics.py says why they hold on any machine).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import data as data_lib
from calm_jax import losses, masks
from calm_jax.composition import composed_forward, init_theta
from calm_jax.model import forward
from tests import numerics
from tests.numerics import assert_identity
from tests.test_composition import ANCHOR, AUG_GPT2, AUG_LLAMA, CCFG, V, _frozen_params

T = 24  # slots per row

# Jitted: the same functions, compiled once per shape instead of dispatched op by op.
COMPOSED = jax.jit(functools.partial(composed_forward, CCFG))
ANCHOR_FWD = jax.jit(functools.partial(forward, ANCHOR))
NEXT_TOKEN_LOSS = jax.jit(losses.next_token_loss)


@pytest.fixture(scope="module", autouse=True)
def x64():
    with numerics.float64():
        yield


@pytest.fixture(scope="module")
def params(x64):
    return {"theta": init_theta(CCFG, jax.random.key(0)), "anchor": _frozen_params(ANCHOR, 1),
            "augments": (_frozen_params(AUG_LLAMA, 2), _frozen_params(AUG_GPT2, 3))}


def _dataset(n=11, seed=0, lengths=(3, 11)) -> data_lib.Dataset:
    """n examples of random lengths, each a prompt then a target, right-padded to T."""
    rng = np.random.default_rng(seed)
    tokens, mask, target = np.zeros((n, T), np.int32), np.zeros((n, T), bool), np.zeros((n, T), bool)
    for i in range(n):
        k = int(rng.integers(*lengths, endpoint=True))
        tokens[i, :k] = rng.integers(3, V, k)
        mask[i, :k] = True
        target[i, int(rng.integers(1, k)):k] = True
    return data_lib.Dataset("synthetic", tokens, mask, target)


def test_packed_rows_hold_the_stream_and_resume_exactly():
    """Each batch holds exactly the stream's next examples (across epoch boundaries), each
    whole and once; the same position gives the same batch (a resumed run)."""
    ds = _dataset()
    position, total = data_lib.Position(0, 0), 0
    for _ in range(6):
        batch, after = data_lib.packed_batch_at(ds, position, 2, seed=7)
        again, after_again = data_lib.packed_batch_at(ds, position, 2, seed=7)
        assert after == after_again
        for name in batch:
            np.testing.assert_array_equal(batch[name], again[name])
        seg = batch["segment_BxT"]
        np.testing.assert_array_equal(seg > 0, batch["mask_BxT"])
        held = []
        for r in range(2):
            ids = seg[r][seg[r] > 0]
            assert np.all(np.diff(ids) >= 0) and set(ids) == set(range(1, ids.max() + 1))  # runs 1, 2, ...
            held += [tuple(batch["tokens_BxT"][r][seg[r] == j]) + tuple(batch["target_BxT"][r][seg[r] == j])
                     for j in range(1, ids.max() + 1)]
        stream = []
        for k in range(len(held)):  # the next len(held) examples of the stream
            epoch, index = divmod(position.epoch * len(ds) + position.index + k, len(ds))
            i = data_lib.epoch_order(len(ds), 7, epoch)[index]
            stream.append(tuple(ds.tokens_NxT[i][ds.mask_NxT[i]]) + tuple(ds.target_NxT[i][ds.mask_NxT[i]]))
        assert sorted(held) == sorted(stream)
        total += len(held)
        assert after.epoch * len(ds) + after.index == total
        position = after
    assert position.epoch >= 1


def test_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(masks.positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1],
                                                                       [0, 1, 2, 3, 4, 5, 6, 7]])


def _packed_and_unpacked(ds, rows=2):
    packed, after = data_lib.packed_batch_at(ds, data_lib.Position(0, 0), rows, seed=3)
    n = after.index
    assert after.epoch == 0 and n > 2 * rows, "the rows must hold several examples each"
    unpacked, _ = data_lib.batch_at(ds, data_lib.Position(0, 0), n, seed=3)
    return packed, unpacked, n


def test_packed_batch_gives_the_same_losses_and_theta_gradient(params):
    """Per example, the anchor's and the composition's summed loss over a packed row equals
    that example's loss alone in its own row; the batch's Θ_C gradient is the same."""
    ds = _dataset()
    packed, unpacked, n = _packed_and_unpacked(ds)
    loss = losses.composed_loss(CCFG)
    frozen = {"anchor": params["anchor"], "augments": params["augments"]}
    (sum_p, n_p), grad_p = _value_and_grad(loss, params["theta"], frozen, packed)
    (sum_u, n_u), grad_u = _value_and_grad(loss, params["theta"], frozen, unpacked)
    assert float(n_p) == float(n_u) > 0
    assert_identity(sum_p, sum_u)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad_p), jax.tree.leaves(grad_u)):
        assert_identity(a, b, err_msg=jax.tree_util.keystr(path))

    # Per example: the composition's and the anchor alone's next-token losses.
    comp_p = COMPOSED(params, packed["tokens_BxT"], packed["mask_BxT"], segments_BxT=packed["segment_BxT"]).logits_BxTxV
    comp_u = COMPOSED(params, unpacked["tokens_BxT"], unpacked["mask_BxT"]).logits_BxTxV
    anch_p = ANCHOR_FWD(params["anchor"], packed["tokens_BxT"], packed["mask_BxT"],
                        segments_BxT=packed["segment_BxT"]).logits_BxTxV
    anch_u = ANCHOR_FWD(params["anchor"], unpacked["tokens_BxT"], unpacked["mask_BxT"]).logits_BxTxV
    seg, done = packed["segment_BxT"], []
    for r in range(seg.shape[0]):
        for j in range(1, seg[r].max() + 1):
            example = list(packed["tokens_BxT"][r][seg[r] == j])
            k = next(k for k in range(n) if list(unpacked["tokens_BxT"][k][unpacked["mask_BxT"][k]]) == example)
            only_BxT = packed["target_BxT"] & (seg == j) & (np.arange(seg.shape[0]) == r)[:, None]
            for lp, lu in ((comp_p, comp_u), (anch_p, anch_u)):
                got = NEXT_TOKEN_LOSS(lp, packed["tokens_BxT"], only_BxT, seg)
                want = NEXT_TOKEN_LOSS(lu[k:k + 1], unpacked["tokens_BxT"][k:k + 1], unpacked["target_BxT"][k:k + 1])
                assert float(got[1]) == float(want[1]) > 0
                assert_identity(got[0], want[0], err_msg=f"example {k} (row {r}, segment {j})")
            done.append(k)
    assert sorted(done) == list(range(n))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(loss, theta, frozen, batch):
    """((loss_sum, n_tokens), d loss_sum / d Θ_C)."""
    (s, n), g = jax.value_and_grad(lambda th: loss(th, frozen, batch), has_aux=True)(theta)
    return (s, n), g


def test_no_attention_crosses_a_segment(params):
    """Changing one example's tokens changes nothing in the other examples of its row
    (self-attention of both models, the cross-attention, positions), and changes that example."""
    ds = _dataset(seed=1)
    packed, _ = data_lib.packed_batch_at(ds, data_lib.Position(0, 0), 2, seed=3)
    seg = packed["segment_BxT"]
    assert seg[0].max() >= 3
    other = packed["tokens_BxT"].copy()
    hit = seg == 2
    other[hit] = (other[hit] + 5) % (V - 3) + 3
    kw = dict(mask_BxT=packed["mask_BxT"], segments_BxT=seg)
    before = COMPOSED(params, packed["tokens_BxT"], **kw).logits_BxTxV
    after = COMPOSED(params, other, **kw).logits_BxTxV
    keep = (seg != 2) & packed["mask_BxT"]
    assert_identity(after, before, where=keep[..., None])
    assert float(jnp.abs(after - before)[hit].max()) > 1e-3


def test_segments_with_a_cache_raise(params):
    from calm_jax.composition import CompositionError, init_composed_cache
    from calm_jax.model import init_cache

    tokens = jnp.ones((1, 4), jnp.int32)
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="not with a cache"):
        forward(ANCHOR, params["anchor"], tokens, cache=init_cache(ANCHOR, 1, 8), segments_BxT=seg)
    with pytest.raises(CompositionError, match="not with a cache"):
        composed_forward(CCFG, params, tokens, cache=init_composed_cache(CCFG, 1, 8), segments_BxT=seg)
