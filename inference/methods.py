"""Method specs: a pruning method and its options in one word, as every command line names methods.

    METHOD[:NAME=VALUE[:NAME=VALUE...]]      several specs in a list are separated by commas

    svd                      SVD-Prune as `prune` defaults it (`svdprune_jax.SVD_DEFAULTS`: energy=0.95 on centred
                             tokens, tower features)
    svd:energy=0.5           rank chosen per image: the first singular directions holding 50% of sum(s^2)
    svd:rank=8, svd:r=8      a fixed rank; svd:rank=k is the budget clipped to min(N, D) (classic rank-k leverage)
    svd:center=false         leverage of the raw tokens (default: mean-centred, PCA leverage)
    svd:solver=gram          the leverage solver (`svdprune_jax.SOLVERS`)
    svd:matrix=projector     score the projector's output instead of the tower's selected layer (the paper's)
    svd:adaptive=0.9         a per-image budget: the smallest bucket (the budget and its halvings) holding 90% of
                             the image's leverage mass (`svdprune_jax.adaptive_budget`), by the spec's rank rule
                             (not rank=k: it would put every image in the largest bucket; not with per_view:
                             the budget is read from the leverage over all of an image's tokens)
    lrcp:r=4                 LRCP with its PCA rank (default `svdprune_jax.LRCP_RANK`)
    visionzip:contextual=4   VisionZip's merged-token count (default from the budget)
    svd:per_view=true        LLaVA-NeXT: each view (base image, crops) scored alone with a share of the budget
                             proportional to its tokens (default: one selection over all of the image's tokens;
                             every method but visionzip and fastv)
    svd:merge=true           merge instead of drop: each dropped token averaged into its most similar kept token
                             (every method but visionzip and fastv; `svdprune_jax.baselines.merge_dropped`)
    random, norm, ...        the other methods as before; `matrix` applies to methods that score the features

Values are checked here as far as they can be without a model (types, ranges, names); ranks against the
feature matrix's size are checked by `svdprune_jax.validate` once the model is known (`MethodSpec.check`).
Two specs are the same when they mean the same (aliases and defaults filled in), whatever their spelling.
"""
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import svdprune_jax
from svdprune_jax import adaptive, checks, pruning
from svdprune_jax.models.llava import MATRICES, Pruning

FEATURE_METHODS = ("svd", "lrcp", "norm", "divprune", "visionzip")  # they score the features: `matrix` applies
BUDGET = svdprune_jax.BUDGET  # rank=k: the rank is the token budget
DEFAULT_RULE = dict(energy=svdprune_jax.SVD_DEFAULTS["energy"])  # svd's rank rule when the spec names none
ALIASES = dict(r="rank")
DEFAULTS = {m: dict(merge=False) for m in pruning.MERGEABLE} | dict(
    svd=dict(center=svdprune_jax.SVD_DEFAULTS["center"], solver="auto", merge=False), lrcp=dict(rank=svdprune_jax.LRCP_RANK, solver="auto", merge=False))


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A parsed spec. `text` is the spelling it was given (the key of its results); equality ignores it."""
    text: str = dataclasses.field(compare=False)
    method: str
    options: tuple[tuple[str, Any], ...] = ()  # `prune` options, defaults filled in; rank may be BUDGET ("k")
    matrix: str = "tower"
    adaptive: float | None = None  # leverage-mass target of a per-image budget
    per_view: bool = False  # LLaVA-NeXT: a share of the budget per view (`Pruning.per_view`)

    def __str__(self) -> str:
        return self.text

    def pruning(self, k: int) -> Pruning:
        return Pruning(self.method, k, self.options, self.matrix, self.per_view)

    def fixed(self) -> "MethodSpec":
        """This spec at a fixed budget: the adaptive target dropped, its rank rule kept (and spelt out)."""
        defaults = DEFAULTS.get(self.method, {}) | (DEFAULT_RULE if self.method == "svd" else {})
        words = [f"{name}={str(value).lower()}" for name, value in self.options if defaults.get(name) != value]
        words += [f"matrix={self.matrix}"] * (self.matrix != "tower") + ["per_view=true"] * self.per_view
        return dataclasses.replace(self, text=":".join([self.method, *words]), adaptive=None)

    def rule(self) -> tuple[tuple[str, Any], ...]:
        """The leverage rank rule (rank or energy, center, solver) an adaptive spec chooses its budget by."""
        return tuple((name, value) for name, value in self.options if name in ("rank", "energy", "center", "solver"))

    def check(self, n: int, d: int, k: int) -> None:
        """Every check `prune` (and `adaptive_budget`) makes at N tokens of D features and budget k: ValueError."""
        if self.method in svdprune_jax.METHODS:
            zeros = np.zeros((n, d), np.float32)
            svdprune_jax.validate(zeros, k, self.method, key=jax.random.key(0), cls_attention=zeros[:, 0],
                                  **dict(self.options))
        if self.adaptive is not None:
            adaptive.adaptive_options(n, d, self.adaptive, svdprune_jax.budget_buckets(k), **dict(self.rule()))


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _rank(text: str):
    if text == BUDGET:
        return BUDGET
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected an int >= 1 or {BUDGET!r} (the budget), got {text!r}")
    return value


def _fraction(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = text
        return checks.fraction(value, name)
    return parse


def _one_of(choices: Sequence[str]):
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text
    return parse


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"expected an int >= 0, got {text!r}")
    return int(text)


VALUES = dict(rank=_rank, energy=_fraction("energy"), center=_bool, solver=_one_of(svdprune_jax.SOLVERS),
              contextual=_count, matrix=_one_of(MATRICES), adaptive=_fraction("adaptive"), merge=_bool,
              per_view=_bool)


def option_names(method: str) -> tuple[str, ...]:
    """The options a method takes on the command line."""
    names = [o for o in pruning.OPTIONS.get(method, ()) if o in VALUES]  # not array options (visionzip keys)
    names += ["matrix"] * (method in FEATURE_METHODS) + ["adaptive"] * (method == "svd")
    names += ["per_view"] * (method in svdprune_jax.METHODS and method != "visionzip")
    return tuple(names)


def parse(text: str, allowed: Sequence[str]) -> MethodSpec:
    """One spec (see the module docstring) whose method is in `allowed`."""
    method, *parts = text.strip().split(":")
    if method not in allowed:
        raise ValueError(f"method spec {text!r}: unknown method {method!r}; choose from {', '.join(allowed)}")
    valid = option_names(method)
    options = {}
    for part in parts:
        name, eq, value = part.partition("=")
        name = ALIASES.get(name, name)
        if not eq or not value:
            raise ValueError(f"method spec {text!r}: option {part!r} is not NAME=VALUE")
        if name not in valid:
            raise ValueError(f"method spec {text!r}: {method} takes no option {name!r}"
                             + (f"; valid: {', '.join(valid)}" if valid else " (it has no options)"))
        if name in options:
            raise ValueError(f"method spec {text!r}: option {name!r} given twice")
        try:
            options[name] = VALUES[name](value)
        except ValueError as e:
            raise ValueError(f"method spec {text!r}: option {name}: {e}") from None
    matrix, adaptive = options.pop("matrix", "tower"), options.pop("adaptive", None)
    per_view = options.pop("per_view", False)
    if "rank" in options and "energy" in options:
        raise ValueError(f"method spec {text!r}: give one of rank and energy")
    if method == "svd" and "rank" not in options and "energy" not in options:  # the default rank rule
        options = DEFAULT_RULE | options
    if method != "svd" and options.get("rank") == BUDGET:
        raise ValueError(f"method spec {text!r}: rank={BUDGET} (the budget) is a rank rule of svd only")
    if adaptive is not None and options.get("rank") == BUDGET:
        raise ValueError(f"method spec {text!r}: adaptive needs a rank rule that does not follow the budget "
                         "(energy=..., or a fixed rank): at rank = budget every image lands in the largest bucket")
    if adaptive is not None and per_view:
        raise ValueError(f"method spec {text!r}: adaptive (a budget from the image's leverage over all its tokens) "
                         "and per_view (each view scored alone) measure different leverage; give one")
    options = DEFAULTS.get(method, {}) | options
    return MethodSpec(text.strip(), method, tuple(sorted(options.items())), matrix, adaptive, per_view)


def parse_list(texts: Sequence[str], allowed: Sequence[str]) -> list[MethodSpec]:
    """Specs from command-line words (each may hold several, comma-separated); each spec once."""
    specs = [parse(t, allowed) for text in texts for t in text.split(",") if t.strip()]
    for i, spec in enumerate(specs):
        same = next((s for s in specs[:i] if s == spec), None)
        if same is not None:
            raise ValueError(f"method specs {same.text!r} and {spec.text!r} are the same; give each once")
    return specs
