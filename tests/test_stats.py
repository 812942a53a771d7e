"""Bootstrap intervals and the exact McNemar test against independent references."""
import math

import numpy as np
import pytest

from svdprune_jax.evaluation.stats import bootstrap_ci, mcnemar_exact


def binom_two_sided(k, m):
    """Reference: scipy's exact binomial test when installed, else float64 sums of binomial terms (lgamma)."""
    try:
        from scipy.stats import binomtest
        return binomtest(k, m, 0.5).pvalue
    except ImportError:
        pmf = lambda i: math.exp(math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2))
        return min(1.0, sum(pmf(i) for i in range(m + 1) if pmf(i) <= pmf(k) * (1 + 1e-7)))


@pytest.mark.parametrize("only_a, only_b, both", [(0, 0, 5), (3, 0, 2), (0, 7, 0), (5, 5, 1), (4, 5, 3), (12, 30, 9),
                                                  (1, 9, 0), (200, 240, 50), (80, 20, 0)])
def test_mcnemar_matches_binomial_test(only_a, only_b, both):
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * 4, bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * 4, bool)
    perm = np.random.default_rng(0).permutation(len(a))
    want = 1.0 if only_a + only_b == 0 else binom_two_sided(only_a, only_a + only_b)
    assert mcnemar_exact(a[perm], b[perm]) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)


def test_mcnemar_hand_checked():
    assert mcnemar_exact([1, 1, 1], [0, 0, 0]) == pytest.approx(2 / 8)  # 3 discordant, all one way
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0
    with pytest.raises(ValueError, match="two \\(n,\\) arrays"):
        mcnemar_exact([1, 0], [1, 0, 1])


def test_bootstrap_covers_a_known_bernoulli_mean():
    """95% intervals from 200 samples of Bernoulli(0.7) cover 0.7 in about 95% of 300 trials, and have about the
    normal-approximation width 2 * 1.96 * sqrt(p (1 - p) / n)."""
    rng = np.random.default_rng(1)
    hits, widths = 0, []
    for trial in range(300):
        low, high = bootstrap_ci(rng.random(200) < 0.7, resamples=400, seed=trial)
        hits += low <= 70 <= high
        widths.append(high - low)
    assert 0.90 <= hits / 300 <= 0.99
    assert np.mean(widths) == pytest.approx(100 * 2 * 1.96 * math.sqrt(0.21 / 200), rel=0.1)


def test_bootstrap_shape_seeds_and_determinism():
    correct = np.random.default_rng(2).random((5, 80)) < 0.5
    low, high = bootstrap_ci(correct)
    assert low <= 100 * correct.mean() <= high
    assert bootstrap_ci(correct) == (low, high)  # seeded
    assert bootstrap_ci(correct.mean(0) > 2) == (0.0, 0.0)  # all wrong: a point
    # averaging over seeds first is the same statistic as resampling the (seeds, n) table by question
    draws = np.random.default_rng(0).integers(0, 80, (1000, 80))
    direct = np.quantile(correct[:, draws].mean(axis=(0, 2)), [0.025, 0.975]) * 100
    np.testing.assert_allclose((low, high), direct, atol=1e-9)
    for bad in (np.zeros((2, 0)), np.zeros((2, 2, 2))):
        with pytest.raises(ValueError, match="correct must be"):
            bootstrap_ci(bad)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(correct, level=1.0)
