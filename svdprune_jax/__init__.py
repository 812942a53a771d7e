"""svdprune_jax: vision-token pruning maths (SVD-Prune leverage scores and the baselines it is compared to).

Names load on first use (PEP 562), so importing a subpackage (`svdprune_jax.cli`, ...) does not load JAX before
it needs it.
"""
import importlib

_EXPORTS = {
    "AUTO_SOLVER": "leverage",
    "BUCKET_LEVELS": "adaptive",
    "BUDGET": "pruning",
    "FASTV_LAYER": "fastv",
    "FASTV_RATIO": "fastv",
    "LRCP_RANK": "leverage",
    "METHODS": "pruning",
    "NEEDS_CLS_ATTENTION": "pruning",
    "NEEDS_KEY": "pruning",
    "SOLVERS": "leverage",
    "SVD_DEFAULTS": "pruning",
    "adaptive_budget": "adaptive",
    "budget_buckets": "adaptive",
    "divprune_indices": "baselines",
    "fastv_keep_count": "fastv",
    "group_budgets": "groups",
    "fastv_select": "fastv",
    "gather_tokens": "select",
    "leverage_scores": "leverage",
    "lrcp_scores": "leverage",
    "norm_scores": "baselines",
    "prune": "pruning",
    "select_tokens": "select",
    "validate": "pruning",
    "visionzip": "baselines",
    "visionzip_split": "baselines",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'svdprune_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"svdprune_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
