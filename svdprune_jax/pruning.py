"""One entry point for every token-pruning method: `prune(features, k, method, ...)`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from svdprune_jax import baselines, checks, groups, leverage
from svdprune_jax.names import METHODS  # the one list of method names
from svdprune_jax.select import gather_tokens, top_k_indices

NEEDS_CLS_ATTENTION = ("cls_attention", "visionzip")
NEEDS_KEY = ("random",)
MERGEABLE = ("svd", "random", "norm", "cls_attention", "divprune", "lrcp")  # selections that can merge the rest
BUDGET = "k"  # svd's rank="k": the rank is the budget k (clipped to min(N, D)), the classic rank-k leverage
# svd's default rank rule, chosen on the first bundled model's validation split: the sweep and its test read are in
# docs/results.md ("Choosing svd's default").
SVD_DEFAULTS = dict(energy=0.95, center=True)
OPTIONS = dict(svd=("rank", "energy", "center", "solver", "merge"), lrcp=("rank", "solver", "merge"),
               visionzip=("contextual", "keys"), **{m: ("merge",) for m in ("random", "norm", "cls_attention", "divprune")})


def _static_options(method: str, n: int, d: int, k: int, options: dict) -> tuple:
    """Checked method options with defaults filled in, as a hashable (name, value) tuple (arrays excluded)."""
    allowed = OPTIONS.get(method, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} takes no option(s) {unknown}; valid: {allowed}")
    merge = options.get("merge", False)
    if not isinstance(merge, bool):
        raise ValueError(f"merge must be a bool; got {merge!r}")
    if method == "svd":
        rank, energy = options.get("rank"), options.get("energy")
        if rank is None and energy is None:
            energy = SVD_DEFAULTS["energy"]
        rank = min(k, n, d) if rank == BUDGET else rank
        o = leverage.leverage_options(n, d, rank, energy, options.get("center", SVD_DEFAULTS["center"]),
                                      options.get("solver", "auto"))
    elif method == "lrcp":
        o = leverage.leverage_options(n, d, options.get("rank", min(leverage.LRCP_RANK, n, d)), None, False,
                                      options.get("solver", "auto"))
        o = dict(rank=o["rank"], solver=o["solver"])
    elif method == "visionzip":
        c = options.get("contextual", baselines.visionzip_split(k)[1])
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < k:
            raise ValueError(f"visionzip contextual must be an int in [0, k-1={k - 1}]; got {c!r}")
        o = dict(contextual=int(c))
    else:
        o = {}
    if merge:
        o["merge"] = True
    return tuple(sorted(o.items()))


def _side_input(x, name: str, features, last: tuple | None) -> None:
    """A per-token side input: same leading shape as features' tokens, floating, finite when concrete."""
    want = np.shape(features)[:-1]
    got = np.shape(x)
    if (got != want) if last is None else (got[:-1] != want or len(got) != len(want) + 1):
        raise ValueError(f"{name} must have shape {want + (last or ())}; got {got}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be floating point; got dtype {jnp.result_type(x)}")
    checks.finite(x, name)


def validate(features: Float[Array, "*b n d"], k: int, method: str = "svd", *, key: Array | None = None,
             cls_attention: Float[Array, "*b n"] | None = None, mask: Bool[Array, "*b n"] | None = None,
             per_group: bool = False, **options) -> tuple:
    """Every check `prune` makes, returning its static options. Shapes and options are checked even on
    tracers; NaN/inf and the mask's counts only on concrete arrays: under an outer jit, call this eagerly on the
    data first."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    n, d = checks.features_shape(features)
    if not isinstance(per_group, bool):
        raise ValueError(f"per_group must be a bool; got {per_group!r}")
    if per_group:
        if np.ndim(features) < 3:
            raise ValueError(f"per_group needs features of shape (..., G, N, D); got shape {np.shape(features)}")
        if method == "visionzip":
            raise ValueError("visionzip merges its contextual tokens over the whole image: it has no per-group mode")
    k = checks.budget(k, n * np.shape(features)[-3] if per_group else n)
    if mask is not None:
        checks.token_mask(mask, features, k, per_group)
    if method in NEEDS_KEY:
        if key is None:
            raise ValueError(f"method {method!r} needs an explicit PRNG key (key=jax.random.key(...))")
        typed = jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)
        if not (typed and jnp.ndim(key) == 0 or jnp.result_type(key) == jnp.uint32 and np.shape(key) == (2,)):
            raise ValueError(f"key must be one PRNG key (jax.random.key or PRNGKey); got {jnp.result_type(key)} "
                             f"of shape {np.shape(key)}")
    if method in NEEDS_CLS_ATTENTION:
        if cls_attention is None:
            raise ValueError(f"method {method!r} needs cls_attention: the (..., N) head-averaged attention of "
                             "the CLS query to the N patch tokens in the feature layer")
        _side_input(cls_attention, "cls_attention", features, None)
    if options.get("keys") is not None:
        _side_input(options["keys"], "keys", features, ("E",))
    checks.finite(features, "features")
    return _static_options(method, n, d, min(k, n), options)


def _scores(features, key, cls_attention, method, o):
    return {
        "svd": lambda: leverage.leverage_unchecked(features, **o),
        "lrcp": lambda: leverage.residual_unchecked(features, **o),
        "norm": lambda: baselines.norm_scores(features),
        "cls_attention": lambda: cls_attention,
        "random": lambda: baselines.random_scores(key, features.shape[:-1]),
    }[method]()


def _divprune_priority(features, mask, k: int):
    """DivPrune's greedy order as a priority: its first pick highest, unpicked tokens -inf."""
    k = min(k, features.shape[-2])
    order = baselines.divprune_order(features, k, mask)
    picked = jax.nn.one_hot(order, features.shape[-2], dtype=bool)  # (..., k, n)
    return jnp.max(jnp.where(picked, (k - jnp.arange(k, dtype=jnp.float32))[:, None], -jnp.inf), axis=-2)


@functools.partial(jax.jit, static_argnames=("k", "method", "options", "batch_axis", "per_group"))
def _prune(features, key, cls_attention, keys, mask, *, k, method, options, batch_axis, per_group):
    o = dict(options)
    merge = o.pop("merge", False)
    if method in ("svd", "lrcp"):
        o["mask"] = mask
    if method == "visionzip":
        return baselines.visionzip(features, cls_attention, k, o["contextual"], keys, mask)
    if per_group:
        valid = jnp.ones(features.shape[:-1], bool) if mask is None else mask
        priority = (_divprune_priority(features, valid, k) if method == "divprune"
                    else _scores(features, key, cls_attention, method, o))
        idx = groups.select_per_group(priority, valid, k, batch_axis)
        features = features.reshape(*features.shape[:-3], -1, features.shape[-1])
        mask = valid.reshape(*valid.shape[:-2], -1)
    elif method == "divprune":
        idx = baselines.divprune_indices(features, k, mask)
    else:
        scores = _scores(features, key, cls_attention, method, o)
        idx = top_k_indices(scores if mask is None else jnp.where(mask, scores, -jnp.inf), k, batch_axis)
    return (baselines.merge_dropped(features, idx, mask) if merge else gather_tokens(features, idx)), idx


def prune(features: Float[Array, "*b n d"], k: int, method: str = "svd", *, key: Array | None = None,
          cls_attention: Float[Array, "*b n"] | None = None, batch_axis: str | None = None,
          mask: Bool[Array, "*b n"] | None = None, per_group: bool = False, **options
          ) -> tuple[Float[Array, "*b k d"], Int[Array, "*b k"]]:
    """Keep k of the N tokens of `features` (..., N, D): returns (kept (..., k, D), indices int32 (..., k)).

    Selection methods return the kept rows unchanged (input dtype) and their indices ascending (spatial
    order kept). Methods (`METHODS`):
      "svd"            SVD-Prune: top-k leverage scores (`leverage_scores`). Options: rank (an int, or "k": the
                       budget clipped to min(N, D)) or energy (when neither is given, `SVD_DEFAULTS`: energy 0.95),
                       center (default `SVD_DEFAULTS`: True), solver="auto". The defaults are what the first
                       bundled model's validation split favoured (docs/results.md)
      "lrcp"           LRCP: largest residual off the rank-r PCA subspace (`lrcp_scores`). Options: rank=4, solver.
      "norm"           largest token L2 norm.
      "cls_attention"  FasterVLM: largest CLS attention (needs cls_attention).
      "random"         uniform random k-subset (needs key; a different subset per image of a batch).
      "divprune"       DivPrune greedy max-min cosine diversity (`baselines.divprune_indices`).
      "visionzip"      VisionZip dominant + merged contextual tokens (needs cls_attention; options: contextual,
                       default from `visionzip_split(k)`, and keys for the similarity). Returns merged tokens,
                       and indices that are not globally ascending: see `baselines.visionzip`.
    merge=True (every method but visionzip): merge instead of drop, each dropped token averaged into its most
    cosine-similar kept token (`baselines.merge_dropped`); the indices are the kept tokens' (the anchors).
    mask (..., N) bool: the image's tokens (an image with fewer tokens than N, padded): the others are never
    kept, merged or scored with (svd/lrcp: the matrix is the valid rows alone). At least k valid per image.
    per_group: features (..., G, N, D) are G groups of one image (LLaVA-NeXT's views): each group is scored
    alone and keeps a share of k proportional to its valid tokens (`groups.group_budgets`); indices point
    into the flattened G * N tokens (ascending), kept (..., k, D). Every method but visionzip.
    k and method are static; batched input (B, N, D) works directly and the call is vmap-able (`jax.vmap`
    with k/method closed over). key and cls_attention are ignored by methods that do not use them. batch_axis: a
    device-mesh axis that splits the batch (`svdprune_jax.models.sharding.DATA`): each device selects its own rows.
    Raises ValueError for bad input (see `validate`).
    """
    static = validate(features, k, method, key=key, cls_attention=cls_attention, mask=mask, per_group=per_group,
                      **options)
    return _prune(features, key if method in NEEDS_KEY else None,
                  cls_attention if method in NEEDS_CLS_ATTENTION else None, options.get("keys"),
                  None if mask is None else jnp.asarray(mask), k=k, method=method, options=static,
                  batch_axis=batch_axis, per_group=per_group)
