"""FastV (Chen et al., ECCV 2024) image-token selection, called from the LLaMA decoder's hook.

After layer K - 1, FastV ranks the image tokens by the attention the last prompt token pays them (averaged
over heads, the released code's "last token" score) and keeps the top (1 - R) share for layers K onward.
The model owns the hook; this module owns the rule and FastV's defaults.
"""
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

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
                 batch_axis: str | None = None, *, mask: Bool[Array, "B n"] | None = None) -> Int[Array, "B keep"]:
    """Kept image tokens (int32, ascending) of each row.

    attention: the last prompt token's attention at layer K - 1, over the T keys: (B, T) head-averaged,
        (B, H, T) per head, or (B, H, Tq, T) per head and query (the last query is used); heads averaged.
    image_positions: (B, n) columns of the image tokens among the T keys (ascending); then the result is
        columns. None: the T keys are the image tokens themselves and the result indexes them.
    keep: static count, 1 <= keep <= n (`fastv_keep_count` gives FastV's default).
    mask: (B, n) bool, the real entries of image_positions (None: all): rows holding fewer image tokens than n
        (LLaVA-NeXT's images differ in token count) pad the rest, which are never kept (their positions may be
        out of range). At least `keep` real entries per row (checked when concrete).
    """
    shape = jnp.shape(attention)
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"attention must be (B, T), (B, H, T) or (B, H, Tq, T); got shape {shape}")
    score = attention[:, :, -1] if len(shape) == 4 else attention
    score = score.mean(axis=1) if score.ndim == 3 else score
    n = shape[-1] if image_positions is None else np.shape(image_positions)[-1]
    if image_positions is not None and (np.shape(image_positions)[:1] != shape[:1] or jnp.ndim(image_positions) != 2):
        raise ValueError(f"image_positions must be (B={shape[0]}, n); got shape {np.shape(image_positions)}")
    keep = checks.budget(keep, n)
    if mask is not None:
        if np.shape(mask) != (shape[0], n) or jnp.result_type(mask) != jnp.bool_:
            raise ValueError(f"mask must be bool of shape (B, n) = {(shape[0], n)}; got {jnp.result_type(mask)} "
                             f"of shape {np.shape(mask)}")
        fewest = int(np.asarray(mask).sum(axis=1).min()) if checks.is_concrete(mask) else keep
        if fewest < keep:
            raise ValueError(f"keep={keep} exceeds the image tokens of a row ({fewest}; mask)")
    if image_positions is not None:  # clip: padded entries may point past the T keys; the mask drops them
        score = jnp.take_along_axis(score, image_positions, axis=1, mode="clip")
    chosen = top_k_indices(score if mask is None else jnp.where(mask, score, -jnp.inf), keep, batch_axis)
    return chosen if image_positions is None else jnp.take_along_axis(image_positions, chosen, axis=1).astype(jnp.int32)
