"""Static top-k selection: kept tokens stay in their original (spatial) order."""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from svdprune_jax import checks


@functools.partial(jax.jit, static_argnames=("k", "batch_axis"))
def top_k_indices(scores: Float[Array, "*b n"], k: int, batch_axis: str | None = None) -> Int[Array, "*b k"]:
    """`select_tokens` without its checks (for callers that made them). batch_axis: a mesh axis that splits the
    leading axis of scores (the caller's convention, e.g. `svdprune_jax.models.sharding.DATA`)."""
    return _on_own_rows(functools.partial(_top_k, k=k), scores, batch_axis)


def _top_k(scores, k):
    # XLA's TopK puts the lower index first among equal values (tested), so ties are deterministic.
    return jnp.sort(lax.top_k(scores, k)[1], axis=-1).astype(jnp.int32)


def _on_own_rows(fn, x, axis: str | None):
    """fn(x) for a fn of independent rows. Under a device mesh (`jax.set_mesh`) whose `axis` splits x's
    leading axis, each device runs fn on its own rows (shard_map over that axis alone): XLA's partitioner does
    not split TopK's batch dimension and all-gathers the whole batch of scores first (compiled HLO, CPU).
    Without such a mesh, fn(x) as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if axis is None or mesh.empty or axis not in mesh.axis_names or x.ndim < 2 or x.shape[0] % mesh.shape[axis]:
        return fn(x)
    rows = jax.sharding.PartitionSpec(axis)
    return jax.shard_map(fn, in_specs=rows, out_specs=rows, axis_names={axis})(x)


def select_tokens(scores: Float[Array, "*b n"], k: int, batch_axis: str | None = None) -> Int[Array, "*b k"]:
    """Indices (int32, ascending) of the k highest `scores` along the last axis; ties go to the lower index.
    `k` is static (1 <= k <= N); NaN/inf scores are refused when concrete. Under a mesh whose `batch_axis` splits
    the batch, each device selects its own rows (no gather of the batch's scores)."""
    if jnp.ndim(scores) < 1:
        raise ValueError(f"scores must have shape (..., N); got a scalar")
    k = checks.budget(k, jnp.shape(scores)[-1])
    checks.finite(scores, "scores")
    return top_k_indices(scores, k, batch_axis)


def gather_tokens(features: Float[Array, "*b n d"], indices: Int[Array, "*b k"]) -> Float[Array, "*b k d"]:
    """Rows `indices` of each (N, D) token matrix."""
    return jnp.take_along_axis(features, indices[..., None], axis=-2)
