"""How the tests compare numbers, and why each tolerance holds on any CPU or GPU.

Two kinds of comparison, never a tolerance tuned to one machine's float order:

- **Identities** (cache == no cache, padded == unpadded, sharded == one device, k
  micro-batches == one batch, ...): both sides compute the same function in a different
  order. They run in float64 (`float64()`), where each operation rounds by at most 2**-53
  relative. The tiny models here are a few dozen operations deep, so a reordering moves a
  result by well under 1e-12 of its scale on any IEEE machine (measured: <= 3e-14), while
  the bugs these tests exist for (a cache slot off by one, a key one position too late, a
  padding slot attended) move it by more than 1e-3. `IDENTITY_RTOL` = 1e-9 sits three
  orders above the first and six below the second. In float32 the same tests fail on
  some CPUs: 2**-24 rounding, amplified through a few large random layers, reached 1.2e-4.

- **Float32 results** against a float64 reference or HF transformers' float32: see
  `fp32_atol`, and each test's own comment.

Under `float64()` models must be float64 too (`f64(cfg)`, `to_f64(tree)`): the "at least
float32" upcasts in calm_jax then stay float64.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
IDENTITY_RTOL = 1e-9


@contextlib.contextmanager
def float64():
    """Runs the block with 64-bit JAX types enabled (`jax.enable_x64`)."""
    with jax.enable_x64(True):
        yield


def f64(cfg):
    """A ModelConfig (or anything with dtype/param_dtype fields) computing and storing in float64."""
    return cfg.replace(dtype="float64", param_dtype="float64")


def to_f64(tree):
    """Every floating leaf as float64 (call inside `float64()`)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


def scale(x, where=None) -> float:
    """max |x| over the selected entries (the magnitude a relative tolerance refers to)."""
    x = np.asarray(x)
    if where is not None:
        x = np.where(where, x, 0)
    return float(np.abs(x).max())


def assert_identity(actual, desired, where=None, rtol=IDENTITY_RTOL, err_msg=""):
    """actual == desired up to float64 reordering: |a - d| <= rtol * max|d| (over `where`).

    `where` (broadcastable) selects the entries that must agree, e.g. real tokens only.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.dtype == np.float64 and desired.dtype == np.float64, \
        f"identity checks run in float64, got {actual.dtype} and {desired.dtype}"
    if where is not None:
        actual, desired = np.where(where, actual, 0), np.where(where, desired, 0)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * max(scale(desired), 1e-30), err_msg=err_msg)


def assert_trees_identity(actual, desired, rtol=IDENTITY_RTOL):
    """`assert_identity` leaf by leaf, each leaf against its own scale."""
    jax.tree.map(lambda a, d: assert_identity(a, d, rtol=rtol), actual, desired)


def fp32_atol(ref, ulps: float, where=None) -> float:
    """`ulps` float32 rounding units of the result's scale: ulps * 2**-23 * max|ref|."""
    return ulps * EPS32 * scale(ref, where)
