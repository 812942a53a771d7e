"""Per-group budgets: the tokens of an image come in G groups (LLaVA-NeXT's views: the base view and each crop),
each group is ranked alone and keeps its share of the budget k. Static shapes: k is static, the shares are data."""
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from svdprune_jax.select import top_k_indices


def group_budgets(counts: Int[Array, "*b g"], k: int) -> Int[Array, "*b g"]:
    """k split over groups in proportion to their token counts, by largest remainder (integer arithmetic, ties to
    the lower group): the budgets sum to k and none exceeds its group's count (given k <= counts.sum())."""
    counts = counts.astype(jnp.int32)
    total = jnp.maximum(counts.sum(axis=-1, keepdims=True), 1)
    base, rem = jnp.divmod(k * counts, total)
    left = k - base.sum(axis=-1, keepdims=True)
    order = jnp.argsort(-rem, axis=-1, stable=True)
    place = jnp.argsort(order, axis=-1)  # each group's place in the largest-remainder order
    return base + (place < left)


def rank_in_group(priority: Float[Array, "*b g n"]) -> Int[Array, "*b g n"]:
    """0 for each group's highest priority, 1 for the next, ... (ties: the lower index first)."""
    return jnp.argsort(jnp.argsort(-priority, axis=-1, stable=True), axis=-1)


def select_per_group(priority: Float[Array, "*b g n"], mask: Bool[Array, "*b g n"], k: int,
                     batch_axis: str | None = None) -> Int[Array, "*b k"]:
    """Indices (ascending, into the flattened g * n tokens) of each group's top `group_budgets` tokens by
    `priority`, valid tokens only: k in all."""
    budgets = group_budgets(mask.sum(axis=-1), k)
    keep = (rank_in_group(jnp.where(mask, priority, -jnp.inf)) < budgets[..., None]) & mask
    flat = keep.reshape(*keep.shape[:-2], -1).astype(jnp.float32)
    return top_k_indices(flat, k, batch_axis)  # exactly k ones: their positions, ascending
