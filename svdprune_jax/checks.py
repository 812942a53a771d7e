"""Input checks shared by the public functions: every bad input is a ValueError naming the problem.

Shape, dtype and option checks always run (shapes are static, even under an outer `jax.jit`). Value checks
(NaN/inf) need concrete numbers, so they run only on concrete arrays (NumPy, or jax arrays outside a trace);
under an outer jit they are skipped and non-finite features give meaningless scores: call `validate`
eagerly on a sample first if the data source is untrusted. No checkify, no host callbacks inside traces.
"""
import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def features_shape(features, name: str = "features") -> tuple[int, int]:
    """(N, D) of a (..., N, D) floating array."""
    shape = np.shape(features)
    if len(shape) < 2:
        raise ValueError(f"{name} must have shape (..., N, D); got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
        raise ValueError(f"{name} must be floating point; got dtype {jnp.result_type(features)}")
    n, d = shape[-2:]
    if n < 1 or d < 1:
        raise ValueError(f"{name} needs at least one token and one feature; got shape {shape}")
    return n, d


def finite(x, name: str) -> None:
    """Raise on NaN/inf when `x` is concrete; a no-op on tracers (see module docstring)."""
    if is_concrete(x) and not bool(jnp.isfinite(jnp.asarray(x)).all()):
        raise ValueError(f"{name} contains NaN or inf")


def token_mask(mask, features, k: int | None = None, per_group: bool = False) -> None:
    """A mask of `features`' (..., N, D) tokens: bool of shape (..., N); with k, at least k valid tokens per image
    (per_group: per image of (..., G, N)) when concrete."""
    want = np.shape(features)[:-1]
    if np.shape(mask) != want or jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"mask must be bool of shape {want} (features' tokens); got {jnp.result_type(mask)} of "
                         f"shape {np.shape(mask)}")
    if k is not None and is_concrete(mask):
        valid = np.asarray(mask).sum(axis=(-2, -1) if per_group else -1)
        if np.size(valid) and valid.min() < k:
            raise ValueError(f"k={k} exceeds the valid tokens of an image ({int(valid.min())}; mask)")


def budget(k, n: int) -> int:
    """A static token budget 1 <= k <= n."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be a static Python int; got {k!r} ({type(k).__name__})")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, N={n}]")
    return int(k)


def rank(r, most: int) -> int:
    """A subspace rank 1 <= r <= min(N, D)."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= most:
        raise ValueError(f"rank must be an int in [1, min(N, D)={most}]; got {r!r}")
    return int(r)


def fraction(value, name: str) -> float:
    """A share in (0, 1] (an energy fraction, a leverage-mass target)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1]; got {value!r}")
    return float(value)
