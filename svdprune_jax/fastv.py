"""FastV (Chen et al., ECCV 2024) image-token selection, called from the LLaMA decoder's hook.

After layer K - 1, FastV ranks the image tokens by the attention the last prompt token pays them (averaged
over heads, the released code's "last token" score) and keeps the top (1 - R) share for layers K onward.
The model owns the hook; this module owns the rule and FastV's defaults.
"""
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from svdprune_jax import checks
from svdprune_jax.select import top_k_indices

FASTV_LAYER = 2    # K: prune after the first K decoder layers
FASTV_RATIO = 0.5  # R: share of the image tokens dropped


def fastv_keep_count(num_image_tokens: int, ratio: float = FASTV_RATIO) -> int:
    """Image tokens FastV keeps: round(n (1 - R)), at least 1 (576 -> 288 at R = 50%)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"FastV ratio must be in [0, 1); got {ratio!r}")
    return max(1, int(round(num_image_tokens * (1.0 - ratio))))


def fastv_select(attention: Float[Array, "..."], image_positions: Int[Array, "B n"] | None, keep: int,
                 batch_axis: str | None = None) -> Int[Array, "B keep"]:
    """Kept image tokens (int32, ascending) of each row.

    attention: the last prompt token's attention at layer K - 1, over the T keys: (B, T) head-averaged,
        (B, H, T) per head, or (B, H, Tq, T) per head and query (the last query is used); heads averaged.
    image_positions: (B, n) columns of the image tokens among the T keys (ascending); then the result is
        columns. None: the T keys are the image tokens themselves and the result indexes them.
    keep: static count, 1 <= keep <= n (`fastv_keep_count` gives FastV's default).
    """
    shape = jnp.shape(attention)
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"attention must be (B, T), (B, H, T) or (B, H, Tq, T); got shape {shape}")
    score = attention[:, :, -1] if len(shape) == 4 else attention
    score = score.mean(axis=1) if score.ndim == 3 else score
    if image_positions is None:
        return top_k_indices(score, checks.budget(keep, shape[-1]), batch_axis)
    if np.shape(image_positions)[:1] != shape[:1] or jnp.ndim(image_positions) != 2:
        raise ValueError(f"image_positions must be (B={shape[0]}, n); got shape {np.shape(image_positions)}")
    keep = checks.budget(keep, np.shape(image_positions)[1])
    chosen = top_k_indices(jnp.take_along_axis(score, image_positions, axis=1), keep, batch_axis)
    return jnp.take_along_axis(image_positions, chosen, axis=1).astype(jnp.int32)
