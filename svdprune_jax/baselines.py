"""Selection rules of the prior methods that act on vision-encoder outputs (our code, read from the papers
and their released code). Score rules return (..., N) scores for `select.select_tokens`; DivPrune and
VisionZip are not top-k rules and return indices (and, for VisionZip, merged tokens) themselves.
Per-image rules are written for one (N, D) matrix and mapped over leading axes with `jnp.vectorize`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from svdprune_jax.select import top_k_indices

# VisionZip's released LLaVA-1.5 setting: 54 dominant + 10 contextual tokens for a budget of 64; other
# budgets keep that share (108+20 for 128, 162+30 for 192, as commonly reproduced).
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64


def _mm(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _unit(x):
    """Rows scaled to unit L2 norm; zero rows stay zero (the released codes would divide by zero)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norm > 0, norm, 1.0)


def norm_scores(features: Float[Array, "*b n d"]) -> Float[Array, "*b n"]:
    """Token L2 norm (float32)."""
    return jnp.linalg.norm(features.astype(jnp.float32), axis=-1)


def random_scores(key: Array, shape: tuple[int, ...]) -> Float[Array, "..."]:
    """I.i.d. uniform scores: their top-k is a uniformly random k-subset, independently per image (the
    shape includes the batch axes). Under `vmap` with an unbatched key every image gets the same subset."""
    return jax.random.uniform(key, shape)


def _divprune(x: Float[Array, "n d"], valid: Bool[Array, "n"], k: int) -> Int[Array, "k"]:
    """DivPrune's k picks in greedy order (first pick first); only valid tokens are picked while any is left."""
    n = x.shape[0]
    if n == 1:
        return jnp.zeros((1,), jnp.int32)
    xn = _unit(x.astype(jnp.float32))
    dist = 1.0 - _mm(xn, xn.T)  # cosine distance
    # First token: the most isolated valid one, i.e. the largest distance to its nearest valid neighbour (the
    # second-smallest entry of its row; the smallest is its own ~0 distance), as in the released code.
    near = lax.top_k(-jnp.where(valid, dist, jnp.inf), 2)[0][:, 1]
    first = jnp.argmax(jnp.where(valid, -near, -jnp.inf))
    chosen = jnp.zeros((k,), jnp.int32).at[0].set(first)
    gap = jnp.where(valid, dist[first], -jnp.inf).at[first].set(-jnp.inf)  # min distance to the chosen set

    def add(i, carry):  # greedy max-min step: the token farthest from everything chosen so far
        chosen, gap = carry
        j = jnp.argmax(gap)  # first maximum: ties go to the lower index
        return chosen.at[i].set(j), jnp.minimum(gap, dist[j]).at[j].set(-jnp.inf)

    chosen, _ = lax.fori_loop(1, k, add, (chosen, gap))
    return chosen


def divprune_order(features: Float[Array, "*b n d"], k: int, mask: Bool[Array, "*b n"] | None = None
                   ) -> Int[Array, "*b k"]:
    """DivPrune's first k picks in greedy order (`divprune_indices` sorts them); mask (..., N): tokens that may
    be picked (once the valid ones run out, the greedy's further picks are meaningless)."""
    valid = jnp.ones(features.shape[:-1], bool) if mask is None else mask
    return jnp.vectorize(functools.partial(_divprune, k=k), signature="(n,d),(n)->(k)")(features, valid)


def divprune_indices(features: Float[Array, "*b n d"], k: int, mask: Bool[Array, "*b n"] | None = None
                     ) -> Int[Array, "*b k"]:
    """DivPrune (Alvar et al., CVPR 2025): greedy solution of the max-min diversity problem on cosine
    distance. Start from the token whose nearest neighbour is farthest, then repeatedly add the token whose
    minimum distance to the chosen set is largest. Chosen tokens are excluded explicitly (the released code
    relies on their ~0 self-distance, which can tie with exact duplicates), so the k indices are distinct.
    Returned ascending. DivPrune applies it to the projector outputs; the caller chooses the features.
    mask (..., N): only these tokens are candidates and neighbours (at least k per row)."""
    return jnp.sort(divprune_order(features, k, mask), axis=-1)


def visionzip_split(k: int) -> tuple[int, int]:
    """(dominant, contextual) token counts of VisionZip for a budget k: 54 + 10 for 64 (released default),
    the same contextual share rounded half up otherwise (16 -> 13 + 3, 32 -> 27 + 5, 128 -> 108 + 20)."""
    contextual = int(k * VISIONZIP_CONTEXTUAL_SHARE + 0.5)
    return k - contextual, contextual


def _rest(chosen: Int[Array, "k"], valid: Bool[Array, "n"]) -> tuple[Int[Array, "n-k"], Bool[Array, "n-k"]]:
    """n - k indices: the valid ones not in `chosen` first, in original order, then filler (a static shape);
    and which of them are such tokens."""
    free = valid.at[chosen].set(False)
    rest = jnp.argsort(~free, stable=True)[: valid.shape[0] - chosen.shape[0]]
    return rest, free[rest]


def _group_sums(x, metric, targets, others, weight):
    """Every token of `others` joins its most cosine-similar (in `metric`) token of `targets`, counted with its
    `weight` (0 or 1): the float32 sum of each target's group (t, D) and the group sizes (t,)."""
    m = _unit(metric.astype(jnp.float32))
    assign = jax.nn.one_hot(jnp.argmax(_mm(m[others], m[targets].T), axis=-1), targets.shape[0]) * weight[:, None]
    return _mm(assign.T, x.astype(jnp.float32)[others]), assign.sum(0)


def _visionzip(x, attention, metric, valid, *, dominant: int, contextual: int):
    n = x.shape[0]
    dom = top_k_indices(jnp.where(valid, attention, -jnp.inf), dominant)
    if contextual == 0:
        return x[dom], dom
    # The valid rest in original order; `contextual` targets spread uniformly over them. Their count is data
    # (the mask), so the stride is traced and every rest position carries a 0/1 weight: static shapes.
    rest, _ = _rest(dom, valid)
    left = valid.sum() - dominant
    step = jnp.maximum(1, left // contextual)
    pos = jnp.arange(n - dominant)
    targets = rest[jnp.arange(contextual) * step]
    others = (pos < left) & ((pos % step != 0) | (pos // step >= contextual))
    sums, counts = _group_sums(x, metric, targets, rest, others.astype(jnp.float32))
    merged = sums / jnp.maximum(counts, 1.0)[:, None]
    kept = jnp.concatenate([x[dom].astype(jnp.float32), x[targets] + merged]).astype(x.dtype)  # target + group mean
    return kept, jnp.concatenate([dom, targets])


def _merge_dropped(x, kept, valid):
    n, k = x.shape[0], kept.shape[0]
    if k == n:
        return x[kept]
    rest, free = _rest(kept, valid)
    sums, counts = _group_sums(x, x, kept, rest, free.astype(jnp.float32))
    return ((x[kept].astype(jnp.float32) + sums) / (1.0 + counts)[:, None]).astype(x.dtype)


def merge_dropped(features: Float[Array, "*b n d"], kept: Int[Array, "*b k"], mask: Bool[Array, "*b n"] | None = None
                  ) -> Float[Array, "*b k d"]:
    """Merge instead of drop: every token not in `kept` joins its most cosine-similar kept token, and each kept
    token becomes the mean of itself and the tokens that joined it (token merging in the style of ToMe and
    VisionZip's contextual tokens, here onto the selector's own choice). `kept`: distinct indices per image.
    mask (..., N): tokens marked False are not tokens of the image and join nothing."""
    valid = jnp.ones(features.shape[:-1], bool) if mask is None else mask
    return jnp.vectorize(_merge_dropped, signature="(n,d),(k),(n)->(k,d)")(features, kept, valid)


def visionzip(features: Float[Array, "*b n d"], cls_attention: Float[Array, "*b n"], k: int, contextual: int,
              keys: Float[Array, "*b n e"] | None = None, mask: Bool[Array, "*b n"] | None = None
              ) -> tuple[Float[Array, "*b k d"], Int[Array, "*b k"]]:
    """VisionZip (Yang et al., CVPR 2025), following its released LLaVA code:
    - dominant: the k - contextual tokens with the highest CLS attention (kept as they are, ascending);
    - contextual: of the remaining tokens (original order), `contextual` targets at a uniform stride; every
      other remaining token joins its most cosine-similar target (similarity of `keys`: VisionZip uses the
      head-averaged attention keys of the feature layer; default the features themselves), and each
      contextual token is target + mean of the tokens assigned to it (the released code's sum, not a mean
      including the target).
    Returns (kept, indices) in VisionZip's order: dominant tokens ascending, then contextual tokens in
    target order. For a contextual token, `indices` is its target's (anchor's) position: the token it was
    built on, not the only one it contains; so indices are not globally sorted.
    mask (..., N): only these tokens are the image's (dominant, targets and merged tokens all among them).
    Difference: the released code spends one dominant slot on the CLS token; our features carry patch
    tokens only (LLaVA's "default" feature strategy), so all dominant slots go to patches.
    """
    fn = functools.partial(_visionzip, dominant=k - contextual, contextual=contextual)
    keys = features if keys is None else keys
    valid = jnp.ones(features.shape[:-1], bool) if mask is None else mask
    return jnp.vectorize(fn, signature="(n,d),(n),(n,e),(n)->(k,d),(k)")(features, cls_attention, keys, valid)
