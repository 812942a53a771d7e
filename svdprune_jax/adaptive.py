"""Adaptive per-image token budgets from each image's own leverage spectrum, with static shapes.

An image whose leverage mass sits in a few tokens (a simple scene: few directions, or a few tokens carrying
them) needs fewer tokens than one whose mass is spread out. Per image: sort the leverage scores (at the rank
rule in use) in descending order and take the smallest k whose top-k share of the total reaches `target`;
then round k up to the smallest of a few static bucket sizes, so that a batch of images runs as one
compiled program per bucket (group the images by bucket, prune each group at its bucket's static k).

What the rule measures (tests/test_adaptive.py): how concentrated leverage is, not the rank itself.
- Leverage at rank r sums to r with every score <= 1, so the top-k mass reaches `target` only once
  k >= target * r: with rank = the budget every image lands in the largest bucket. The rank rule must not
  follow the budget; an energy rule (or a small fixed rank) lets the budget follow the image.
- An incoherent matrix (every token distinct, e.g. Gaussian) has near-uniform leverage (about r/N each) and
  needs about target * N tokens whatever its rank.
- Uncentred, the mean token's direction spreads its leverage over the background tokens, so high targets
  need them all; centred, a few distinct objects on a shared background hold the mass and k follows them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from svdprune_jax import checks, leverage

BUCKET_LEVELS = 4  # default buckets: the budget and its halvings, k/8 .. k


def budget_buckets(k: int, levels: int = BUCKET_LEVELS) -> tuple[int, ...]:
    """The budget k and its `levels - 1` halvings (rounded up), ascending, without repeats: k=64 -> 8, 16, 32, 64."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be an int >= 1; got {levels!r}")
    return tuple(sorted({-(-int(k) // 2**j) for j in range(levels)}))


def check_buckets(buckets, n: int) -> tuple[int, ...]:
    """Bucket sizes: a non-empty, strictly increasing sequence of ints in [1, N]."""
    b = tuple(buckets) if isinstance(buckets, (tuple, list)) else None
    if not b:
        raise ValueError(f"buckets must be a non-empty tuple of token counts; got {buckets!r}")
    if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in b):
        raise ValueError(f"buckets must be ints; got {buckets!r}")
    if any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"buckets must be strictly increasing; got {buckets!r}")
    if b[0] < 1 or b[-1] > n:
        raise ValueError(f"buckets must lie in [1, N={n}]; got {buckets!r}")
    return tuple(int(x) for x in b)


@functools.partial(jax.jit, static_argnames=("buckets", "options"))
def _adaptive_budget(x, target, mask, *, buckets, options):
    scores = leverage.leverage_unchecked(x, **dict(options), mask=mask)  # masked tokens: 0, sorted last
    mass = jnp.cumsum(jnp.sort(scores, axis=-1)[..., ::-1], axis=-1)  # top-k leverage mass, k = 1..N
    # smallest k whose mass reaches target of the total (mass[-1]: the same float32 sum, so target 1 gives <= N)
    need = 1 + jnp.sum(mass < target * mass[..., -1:], axis=-1)
    sizes = jnp.asarray(buckets, jnp.int32)
    # the first bucket >= need; the largest bucket is the budget's cap
    return sizes[jnp.minimum(jnp.sum(sizes < need[..., None], axis=-1), len(buckets) - 1)]


def adaptive_budget(features: Float[Array, "*b n d"], target: float, buckets, *, rank: int | None = None,
                    energy: float | None = None, center: bool = False, solver: str = "auto",
                    mask: Bool[Array, "*b n"] | None = None) -> Int[Array, "*b"]:
    """Tokens to keep per image (int32 (...,)): the smallest k whose top-k leverage mass reaches `target` of
    the image's total, rounded up to the smallest of `buckets` that holds it, and capped at the largest.

    target  fraction in (0, 1] (traced inside: a sweep over targets does not recompile).
    buckets strictly increasing ints in [1, N], static (e.g. `budget_buckets(k)`).
    rank / energy / center / solver: the rank rule of the leverage scores, exactly as `leverage_scores`
            (exactly one of rank and energy; see the module docstring for why not rank = budget).
    mask    (..., N) bool: the image's tokens (an image with fewer than N, padded; LLaVA-NeXT): the matrix and
            its leverage mass are the valid rows alone, as `prune`'s mask.
    An image with no resolved direction (all-equal tokens) has zero leverage and gets the smallest bucket.
    jit- and vmap-clean; batched (..., N, D) input works directly. Raises ValueError on bad input.
    """
    n, d = checks.features_shape(features)
    target, buckets, options = adaptive_options(n, d, target, buckets, rank=rank, energy=energy, center=center,
                                                solver=solver)
    if mask is not None:
        checks.token_mask(mask, features)
    checks.finite(features, "features")
    return _adaptive_budget(features, jnp.float32(target), mask, buckets=buckets, options=options)


def adaptive_options(n: int, d: int, target, buckets, *, rank=None, energy=None, center=False, solver="auto"
                     ) -> tuple[float, tuple[int, ...], tuple]:
    """Checked (target, buckets, static leverage options) of `adaptive_budget` for N x D features."""
    options = leverage.leverage_options(n, d, rank, energy, center, solver)
    return checks.fraction(target, "target"), check_buckets(buckets, n), tuple(sorted(options.items()))
