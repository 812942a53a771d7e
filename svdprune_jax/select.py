"""Static top-k selection: kept tokens stay in their original (spatial) order."""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from svdprune_jax import checks


@functools.partial(jax.jit, static_argnames="k")
def _select(scores, k):
    # XLA's TopK puts the lower index first among equal values (tested), so ties are deterministic.
    return jnp.sort(lax.top_k(scores, k)[1], axis=-1).astype(jnp.int32)


def select_tokens(scores: Float[Array, "*b n"], k: int) -> Int[Array, "*b k"]:
    """Indices (int32, ascending) of the k highest `scores` along the last axis; ties go to the lower index.
    `k` is static (1 <= k <= N); NaN/inf scores are refused when concrete."""
    if jnp.ndim(scores) < 1:
        raise ValueError(f"scores must have shape (..., N); got a scalar")
    k = checks.budget(k, jnp.shape(scores)[-1])
    checks.finite(scores, "scores")
    return _select(scores, k)


def gather_tokens(features: Float[Array, "*b n d"], indices: Int[Array, "*b k"]) -> Float[Array, "*b k d"]:
    """Rows `indices` of each (N, D) token matrix."""
    return jnp.take_along_axis(features, indices[..., None], axis=-2)
