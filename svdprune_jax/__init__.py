"""svdprune_jax: vision-token pruning maths (SVD-Prune leverage scores and the baselines it is compared to)."""
from svdprune_jax.adaptive import BUCKET_LEVELS, adaptive_budget, budget_buckets
from svdprune_jax.baselines import divprune_indices, norm_scores, visionzip, visionzip_split
from svdprune_jax.fastv import FASTV_LAYER, FASTV_RATIO, fastv_keep_count, fastv_select
from svdprune_jax.leverage import AUTO_SOLVER, LRCP_RANK, SOLVERS, leverage_scores, lrcp_scores
from svdprune_jax.pruning import BUDGET, METHODS, NEEDS_CLS_ATTENTION, NEEDS_KEY, SVD_DEFAULTS, prune, validate
from svdprune_jax.select import gather_tokens, select_tokens

__all__ = [
    "AUTO_SOLVER", "BUCKET_LEVELS", "BUDGET", "FASTV_LAYER", "FASTV_RATIO", "LRCP_RANK", "METHODS", "NEEDS_CLS_ATTENTION", "NEEDS_KEY", "SOLVERS", "SVD_DEFAULTS",
    "adaptive_budget", "budget_buckets", "divprune_indices", "fastv_keep_count", "fastv_select", "gather_tokens", "leverage_scores",
    "lrcp_scores", "norm_scores", "prune", "select_tokens", "validate", "visionzip", "visionzip_split",
]
