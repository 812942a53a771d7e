"""Static top-k selection: kept tokens stay in their original (spatial) order."""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from svdprune_jax import checks


DATA_AXIS = "data"  # the device-mesh axis that splits a batch of images (`models.sharding.DATA`)


@functools.partial(jax.jit, static_argnames="k")
def _select(scores, k):
    return _on_own_rows(functools.partial(_top_k, k=k), scores)


def _top_k(scores, k):
    # XLA's TopK puts the lower index first among equal values (tested), so ties are deterministic.
    return jnp.sort(lax.top_k(scores, k)[1], axis=-1).astype(jnp.int32)


def _on_own_rows(fn, x):
    """fn(x) for a fn of independent rows. Under a device mesh (`jax.set_mesh`) whose DATA_AXIS splits x's
    leading axis, each device runs fn on its own rows (shard_map over that axis alone): XLA's partitioner does
    not split TopK's batch dimension and all-gathers the whole batch of scores first (compiled HLO, CPU).
    Without such a mesh, fn(x) as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or x.ndim < 2 or x.shape[0] % mesh.shape[DATA_AXIS]:
        return fn(x)
    rows = jax.sharding.PartitionSpec(DATA_AXIS)
    return jax.shard_map(fn, in_specs=rows, out_specs=rows, axis_names={DATA_AXIS})(x)


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
