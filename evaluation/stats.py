"""Statistics for accuracy tables: bootstrap confidence intervals over questions, the exact McNemar test."""
import math

import numpy as np
from jaxtyping import Bool

LEVEL = 0.95
RESAMPLES = 1000


def bootstrap_ci(correct: Bool[np.ndarray, "*seeds n"], *, level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (in %) of the accuracy, questions resampled with replacement.

    correct: (n,) or (seeds, n) for a method run under several seeds: a resampled question brings its answers
    under every seed, and each resample's accuracy is the mean over seeds and questions. The draws depend only
    on (seed, n, resamples): methods evaluated on the same questions are resampled alike."""
    c = np.asarray(correct, np.float64)
    if c.ndim not in (1, 2) or c.shape[-1] == 0:
        raise ValueError(f"correct must be (n,) or (seeds, n) with n >= 1; got shape {c.shape}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level {level} must be in (0, 1) and resamples {resamples} >= 1")
    per_question = c.reshape(-1, c.shape[-1]).mean(0)  # the mean over seeds commutes with resampling questions
    draws = np.random.default_rng(seed).integers(0, len(per_question), (resamples, len(per_question)))
    low, high = np.quantile(per_question[draws].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return 100 * float(low), 100 * float(high)


def mcnemar_exact(a: Bool[np.ndarray, "n"], b: Bool[np.ndarray, "n"]) -> float:
    """Two-sided exact McNemar p-value of paired right/wrong outcomes: a binomial test at 1/2 of the discordant
    pairs (a right and b wrong, against a wrong and b right); 1 when there are none. Exact integer sums."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two (n,) arrays; got shapes {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**m)
