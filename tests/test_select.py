"""Static top-k selection: ascending int32 indices, ties to the lower index, against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svdprune_jax as sp


def ref_select(scores, k):
    """Top-k by a stable descending sort (equal scores: lower index first), returned ascending."""
    return np.sort(np.argsort(-np.asarray(scores), axis=-1, kind="stable")[..., :k], axis=-1)


def test_matches_numpy_and_is_ascending_int32():
    scores = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    got = sp.select_tokens(scores, 7)
    assert got.dtype == jnp.int32 and got.shape == (3, 7)
    np.testing.assert_array_equal(got, ref_select(scores, 7))
    np.testing.assert_array_equal(jax.jit(sp.select_tokens, static_argnums=1)(scores, 7), got)


def test_ties_go_to_the_lower_index():
    np.testing.assert_array_equal(sp.select_tokens(np.array([1, 3, 3, 2, 3, 1, 0, 3], np.float32), 3), [1, 2, 4])
    np.testing.assert_array_equal(sp.select_tokens(np.zeros(9, np.float32), 4), [0, 1, 2, 3])
    # many ties at random sizes (few distinct values): always the stable-sort answer
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, (20, 64)).astype(np.float32)
    for k in (1, 5, 31, 64):
        np.testing.assert_array_equal(sp.select_tokens(scores, k), ref_select(scores, k))


def test_gather_tokens():
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    idx = np.array([[0, 4], [1, 2]], np.int32)
    np.testing.assert_array_equal(sp.gather_tokens(x, idx), np.stack([x[0, [0, 4]], x[1, [1, 2]]]))


@pytest.mark.parametrize("k,match", [(0, r"k=0 outside \[1, N=6\]"), (7, r"k=7 outside \[1, N=6\]"),
                                     (-1, "outside"), (2.0, "static Python int"), (True, "static Python int")])
def test_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        sp.select_tokens(np.ones(6, np.float32), k)


def test_bad_scores():
    with pytest.raises(ValueError, match="scores contains NaN or inf"):
        sp.select_tokens(np.array([1.0, np.nan, 2.0], np.float32), 1)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., N\)"):
        sp.select_tokens(np.float32(1.0), 1)
