"""Adaptive per-image budgets against a float64 NumPy reference: bucket choice, jit/vmap, static shapes, bad input."""
import chex
import jax
import numpy as np
import pytest

import svdprune_jax as sp
from svdprune_jax.benchmarks.timing import Compiles
from test_leverage import matrix, ref_leverage

BUCKETS = (4, 8, 16, 32, 48)


def ref_adaptive(x, target, buckets, **rule):
    """Float64: sorted leverage, the first k whose cumulative mass reaches target of the total, rounded up."""
    mass = np.cumsum(np.sort(ref_leverage(x, **rule))[::-1])
    need = int(np.searchsorted(mass, target * mass[-1])) + 1
    return next((b for b in buckets if b >= need), buckets[-1])


def images(seed=0):
    """Scenes of 48 tokens x 80 features: a shared background token (plus 5% noise) with 2, 4, 8 and 16 distinct
    object tokens, and a flat Gaussian matrix (every token distinct)."""
    rng = np.random.default_rng(seed)
    xs = []
    for m in (2, 4, 8, 16):
        x = rng.standard_normal(80) + 0.05 * rng.standard_normal((48, 80))
        x[:m] = 2 * rng.standard_normal((m, 80))
        xs.append(x)
    return np.stack(xs + [rng.standard_normal((48, 80))]).astype(np.float32)


RULES = [dict(energy=0.9), dict(energy=0.9, center=True), dict(rank=3), dict(energy=0.99, solver="gram")]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()))
def test_matches_float64_reference(rule):
    xs = images()
    ref_rule = {k: v for k, v in rule.items() if k != "solver"}
    checked = 0
    for target in (0.5, 0.8, 0.9, 0.95):
        got = np.asarray(sp.adaptive_budget(xs, target, BUCKETS, **rule))
        assert got.dtype == np.int32 and got.shape == (5,)
        for x, g in zip(xs, got):
            want = ref_adaptive(x, target, BUCKETS, **ref_rule)
            # compare only where the float64 answer is not on a knife edge between two k
            if all(ref_adaptive(x, t, BUCKETS, **ref_rule) == want for t in (target - 1e-4, target + 1e-4)):
                assert g == want, (rule, target)
                checked += 1
    assert checked >= 18


def test_simple_images_get_fewer_tokens():
    """Centred, the objects hold the leverage: k follows their number. Uncentred, the mean direction's leverage
    is spread over the background tokens and high targets need them all. A flat matrix has near-uniform
    leverage (about r/N each), so it needs about target * N tokens whatever its rank."""
    xs = images(1)
    np.testing.assert_array_equal(sp.adaptive_budget(xs, 0.9, BUCKETS, energy=0.9, center=True), [4, 4, 8, 16, 48])
    assert np.all(np.asarray(sp.adaptive_budget(xs[:2], 0.9, BUCKETS, energy=0.9)) == 48)


def test_larger_target_never_fewer_tokens():
    xs = images(2)
    ks = np.stack([np.asarray(sp.adaptive_budget(xs, t, BUCKETS, energy=0.9)) for t in (0.3, 0.6, 0.9, 1.0)])
    assert np.all(np.diff(ks, axis=0) >= 0)
    assert np.all(ks[-1] == 48)  # the whole mass: every token with leverage, here all 48


def test_cap_is_the_largest_bucket():
    xs = images(3)
    np.testing.assert_array_equal(sp.adaptive_budget(xs, 1.0, (2, 6), energy=0.9), 6)


def test_constant_image_gets_the_smallest_bucket():
    x = np.ones((48, 80), np.float32)
    assert int(sp.adaptive_budget(x, 0.9, BUCKETS, energy=0.9, center=True)) == 4


def test_jit_vmap_batched_agree():
    xs = images(4)
    f = lambda x: sp.adaptive_budget(x, 0.9, BUCKETS, energy=0.9)
    eager = np.array([int(f(x)) for x in xs])
    chex.assert_trees_all_equal(np.asarray(jax.jit(jax.vmap(f))(xs)), eager)
    chex.assert_trees_all_equal(np.asarray(f(xs)), eager)
    chex.assert_trees_all_equal(np.asarray(f(xs.reshape(5, 1, 48, 80))), eager[:, None])  # any batch shape


def test_no_recompile_for_new_data_or_target():
    xs = images(5)
    sp.adaptive_budget(xs, 0.9, BUCKETS, energy=0.9)
    with Compiles() as compiles:
        sp.adaptive_budget(images(6), 0.7, BUCKETS, energy=0.9)
    assert compiles.count == 0


def test_mask_is_the_valid_tokens_alone():
    """A padded image (LLaVA-NeXT's token arrays): the budget of its valid rows alone, whatever the padding holds."""
    xs = images(7)
    padded = np.concatenate([xs, np.repeat(xs[:, :1], 16, axis=1) + 3.0], axis=1)  # 16 rows of junk each
    mask = np.arange(64) < 48
    for rule in (dict(energy=0.9, center=True), dict(rank=3)):
        for target in (0.5, 0.9):
            want = np.asarray(sp.adaptive_budget(xs, target, BUCKETS, **rule))
            got = np.asarray(sp.adaptive_budget(padded, target, BUCKETS, mask=np.broadcast_to(mask, (5, 64)), **rule))
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(5, 64\)"):
        sp.adaptive_budget(padded, 0.9, BUCKETS, energy=0.9, mask=mask)


def test_budget_buckets():
    assert sp.budget_buckets(64) == (8, 16, 32, 64)
    assert sp.budget_buckets(50) == (7, 13, 25, 50)
    assert sp.budget_buckets(3) == (1, 2, 3)
    assert sp.budget_buckets(1) == (1,)
    assert sp.budget_buckets(64, levels=2) == (32, 64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target=0.0), r"target must be a fraction in \(0, 1\]"),
    (dict(target=1.01), r"target must be a fraction in \(0, 1\]"),
    (dict(target=True), r"target must be a fraction"),
    (dict(buckets=()), "buckets must be a non-empty tuple"),
    (dict(buckets=16), "buckets must be a non-empty tuple"),
    (dict(buckets=(8, 4)), "strictly increasing"),
    (dict(buckets=(4, 4, 8)), "strictly increasing"),
    (dict(buckets=(4, 8.0)), "buckets must be ints"),
    (dict(buckets=(0, 8)), r"buckets must lie in \[1, N=48\]"),
    (dict(buckets=(8, 64)), r"buckets must lie in \[1, N=48\]"),
    (dict(rule=dict()), "exactly one of rank and energy"),
    (dict(rule=dict(energy=0.9, solver="randomized")), "whole spectrum"),
])
def test_bad_input(kwargs, match):
    args = dict(target=0.9, buckets=BUCKETS, rule=dict(energy=0.9)) | kwargs
    with pytest.raises(ValueError, match=match):
        sp.adaptive_budget(images()[0], args["target"], args["buckets"], **args["rule"])


def test_bad_budget_buckets_and_features():
    for k in (0, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            sp.budget_buckets(k)
    with pytest.raises(ValueError, match="levels must be an int >= 1"):
        sp.budget_buckets(8, levels=0)
    x = images()[0]
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        sp.adaptive_budget(x, 0.9, BUCKETS, energy=0.9)
