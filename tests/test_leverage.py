"""Leverage scores and the LRCP residual against an independent float64 NumPy reference."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svdprune_jax as sp
from svdprune_jax.benchmarks.timing import Compiles

RCOND = 1e-5  # float64 reference: directions below this share of s_1 are null (test matrices avoid 1e-5..1e-2)


def ref_leverage(x, rank=None, energy=None, center=False):
    """Float64 SVD leverage: top-`rank` directions, or the first reaching `energy` of sum(s^2)."""
    x = np.asarray(x, np.float64)
    if center:
        x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    r = rank if energy is None else int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), energy) + 1)
    r = min(r, int(np.sum(s > RCOND * s[0])))
    return (u[:, :r] ** 2).sum(1)


def ref_residual(x, rank):
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    v = np.linalg.svd(x, full_matrices=False)[2][:rank]
    return ((x - x @ v.T @ v) ** 2).sum(1)


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def matrix(case, n, d, seed=0):
    rng = np.random.default_rng(seed)
    if case == "gaussian":
        x = rng.standard_normal((n, d))
    elif case == "lowrank+noise":  # rank-8 signal, noise 1e-3 of the entries
        x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 1e-3 * np.sqrt(8) * rng.standard_normal((n, d))
    else:  # exactly rank 6 (float32 rounding adds ~1e-7 noise: null for every solver)
        x = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d))
    return x.astype(np.float32)


# (case, ranks): ranks where the cut is resolvable by every exact solver (lowrank: within the signal;
# deficient: beyond the matrix rank too, where the scores must sum to the numerical rank 6).
CASES = [("gaussian", (1, 7, 48)), ("lowrank+noise", (3, 8)), ("rank-deficient", (4, 6, 10))]


@pytest.mark.parametrize("solver", ["svd", "gram"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["N<D", "N>D"])
@pytest.mark.parametrize("case,ranks", CASES, ids=[c for c, _ in CASES])
def test_matches_float64_reference(case, ranks, shape, solver):
    x = matrix(case, *shape)
    true_rank = 6 if case == "rank-deficient" else min(shape)
    for r in ranks:
        got = sp.leverage_scores(x, r, solver=solver)
        chex.assert_shape(got, (shape[0],))
        assert got.dtype == jnp.float32
        assert rel_err(got, ref_leverage(x, r)) <= 1e-4, (case, r, solver)
        np.testing.assert_allclose(float(got.sum()), min(r, true_rank), rtol=1e-4)
        assert float(got.min()) >= -1e-6 and float(got.max()) <= 1 + 1e-5


@pytest.mark.parametrize("solver", ["svd", "gram"])
@pytest.mark.parametrize("case", ["gaussian", "lowrank+noise", "rank-deficient"])
def test_energy_matches_reference(case, solver):
    x = matrix(case, 48, 80, seed=1)
    # energy 1.0 = every resolved direction: for lowrank+noise the 1e-3 noise is resolved by "svd" only.
    for eps in (0.3, 0.9, 0.999) + ((1.0,) if case != "lowrank+noise" else ()):
        got = sp.leverage_scores(x, energy=eps, solver=solver)
        want = ref_leverage(x, energy=eps)
        assert rel_err(got, want) <= 1e-4, (case, eps)
        np.testing.assert_allclose(float(got.sum()), want.sum(), rtol=1e-4)  # the per-image rank it chose


def test_energy_rank_is_per_image_under_vmap():
    xs = np.stack([matrix("lowrank+noise", 48, 80, seed=s) for s in range(3)] + [matrix("gaussian", 48, 80)])
    got = jax.vmap(lambda x: sp.leverage_scores(x, energy=0.95))(xs)
    for x, g in zip(xs, got):
        assert rel_err(g, ref_leverage(x, energy=0.95)) <= 1e-4
    sums = np.round(np.asarray(got.sum(-1)))
    assert sums[0] <= 8 < sums[3]  # signal rank vs a flat spectrum: different ranks, one static shape


def test_randomized_agrees_when_the_spectrum_has_a_gap():
    x = matrix("lowrank+noise", 80, 48, seed=2)
    # rank 5 + 10 oversampling columns cover the rank-8 signal: a clear gap after the sketch
    assert rel_err(sp.leverage_scores(x, 5, solver="randomized"), ref_leverage(x, 5)) <= 1e-4


def test_center_option_is_pca_leverage():
    x = matrix("gaussian", 80, 48) + 3.0  # a mean token makes centring matter
    got = sp.leverage_scores(x, 5, center=True)
    assert rel_err(got, ref_leverage(x, 5, center=True)) <= 1e-4
    assert rel_err(sp.leverage_scores(x, 5), ref_leverage(x, 5, center=True)) > 1e-2


def test_full_rank_with_n_le_d_is_degenerate():
    np.testing.assert_allclose(sp.leverage_scores(matrix("gaussian", 48, 80), 48), np.ones(48), atol=1e-5)


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_scale_invariant_and_permutation_equivariant(solver):
    x = matrix("gaussian", 48, 80)
    base = np.asarray(sp.leverage_scores(x, 6, solver=solver))
    for c in (1e-3, 1e3):
        np.testing.assert_allclose(sp.leverage_scores(x * np.float32(c), 6, solver=solver), base, atol=1e-5)
    perm = np.random.default_rng(3).permutation(48)
    np.testing.assert_allclose(sp.leverage_scores(x[perm], 6, solver=solver), base[perm], atol=1e-5)


@pytest.mark.parametrize("solver", ["svd", "gram"])
@pytest.mark.parametrize("scale", [1e18, 1e-25])
def test_extreme_scales_match_float64(solver, scale):
    """Squared singular values of features at 1e18 overflow float32 (and at 1e-25 underflow): every score was 0
    and `prune` kept the first k tokens. Leverage does not depend on the scale; checked against float64."""
    x = matrix("lowrank+noise", 48, 80)
    want = ref_leverage(x.astype(np.float64) * scale, energy=0.9, center=True)
    got = sp.leverage_scores(x * np.float32(scale), energy=0.9, center=True, solver=solver)
    assert rel_err(got, want) < 1e-4
    _, kept = sp.prune(x * np.float32(scale), 8, "svd", energy=0.9, center=True)
    np.testing.assert_array_equal(kept, np.sort(np.argsort(-want, kind="stable")[:8]))


def test_bfloat16_input_computes_in_float32():
    x = jnp.asarray(matrix("gaussian", 48, 80), jnp.bfloat16)
    got = sp.leverage_scores(x, 4)
    assert got.dtype == jnp.float32
    assert rel_err(got, ref_leverage(np.asarray(x.astype(jnp.float32)), 4)) <= 1e-4


def test_lrcp_residual_matches_reference():
    x = matrix("lowrank+noise", 80, 48, seed=4) + 2.0
    for solver in ("svd", "gram"):
        assert rel_err(sp.lrcp_scores(x, 4, solver=solver), ref_residual(x, 4)) <= 1e-3
    assert rel_err(sp.lrcp_scores(x, 2), ref_residual(x, 2)) <= 1e-4


def test_jit_vmap_batched_agree():
    xs = np.stack([matrix("gaussian", 48, 80, seed=s) for s in range(3)])
    f = lambda x: sp.leverage_scores(x, 5)
    eager = np.stack([np.asarray(f(x)) for x in xs])
    chex.assert_trees_all_close(jax.jit(f)(xs[0]), eager[0], atol=1e-6)
    chex.assert_trees_all_close(jax.vmap(f)(xs), eager, atol=1e-6)
    chex.assert_trees_all_close(f(xs), eager, atol=1e-6)  # (B, N, D) directly


def test_no_recompile_on_new_data_rank_or_energy():
    sp.leverage_scores(matrix("gaussian", 48, 80, seed=5), 3)
    sp.leverage_scores(matrix("gaussian", 48, 80, seed=6), energy=0.5)
    with Compiles() as compiles:
        sp.leverage_scores(matrix("gaussian", 48, 80, seed=7), 9)  # new data, new rank
        sp.leverage_scores(matrix("lowrank+noise", 48, 80, seed=8), energy=0.8)  # new data, new per-image rank
    assert compiles.count == 0


def test_auto_is_the_benchmarked_default():
    x = matrix("gaussian", 48, 80)
    assert sp.AUTO_SOLVER == "svd"
    np.testing.assert_array_equal(sp.leverage_scores(x, 5), sp.leverage_scores(x, 5, solver="svd"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an int"),
    (dict(rank=21), r"rank must be an int in \[1, min\(N, D\)=20\]"),
    (dict(rank=2.0), "rank must be an int"),
    (dict(), "exactly one of rank and energy"),
    (dict(rank=2, energy=0.5), "exactly one of rank and energy"),
    (dict(energy=0.0), r"energy must be a fraction in \(0, 1\]"),
    (dict(energy=1.5), r"energy must be a fraction in \(0, 1\]"),
    (dict(energy=float("nan")), r"energy must be a fraction"),
    (dict(energy=0.9, solver="randomized"), "whole spectrum"),
    (dict(rank=2, solver="qr"), "unknown solver 'qr'"),
    (dict(rank=2, center=1), "center must be a bool"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.leverage_scores(matrix("gaussian", 20, 30), **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(bad):
    x = matrix("gaussian", 20, 30)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        sp.leverage_scores(x, 2)
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        sp.lrcp_scores(x)


def test_bad_feature_shapes():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., N, D\)"):
        sp.leverage_scores(np.ones(5, np.float32), 1)
    with pytest.raises(ValueError, match="floating point"):
        sp.leverage_scores(np.ones((4, 5), np.int32), 1)
