"""Method specs on the command line: parsing, defaults and aliases, sameness, checks against the model's sizes,
and clear errors for unknown methods, options and bad values."""
import numpy as np
import pytest

import svdprune_jax as sp
from svdprune_jax.inference.methods import MethodSpec, parse, parse_list
from svdprune_jax.inference.pipeline import METHODS
from svdprune_jax.models.llava import Pruning

ALLOWED = (*METHODS, "oracle")


@pytest.mark.parametrize("text, method, options, matrix, adaptive", [
    ("svd", "svd", dict(energy=0.95, center=True, solver="auto", merge=False), "tower", None),
    ("svd:merge=true", "svd", dict(energy=0.95, center=True, solver="auto", merge=True), "tower", None),
    ("svd:energy=0.5", "svd", dict(energy=0.5, center=True, solver="auto", merge=False), "tower", None),
    ("svd:r=8:center=false", "svd", dict(rank=8, center=False, solver="auto", merge=False), "tower", None),
    ("svd:rank=k:center=FALSE:solver=gram", "svd", dict(rank="k", center=False, solver="gram", merge=False), "tower", None),
    ("svd:matrix=projector", "svd", dict(energy=0.95, center=True, solver="auto", merge=False), "projector", None),
    ("svd:adaptive=0.9", "svd", dict(energy=0.95, center=True, solver="auto", merge=False), "tower", 0.9),
    ("svd:adaptive=1:center=false", "svd", dict(energy=0.95, center=False, solver="auto", merge=False), "tower", 1.0),
    ("svd:adaptive=0.8:rank=3", "svd", dict(rank=3, center=True, solver="auto", merge=False), "tower", 0.8),
    ("lrcp", "lrcp", dict(rank=4, solver="auto", merge=False), "tower", None),
    ("lrcp:r=2:matrix=projector", "lrcp", dict(rank=2, solver="auto", merge=False), "projector", None),
    ("visionzip:contextual=3", "visionzip", dict(contextual=3), "tower", None),
    (" norm ", "norm", dict(merge=False), "tower", None),
    ("random:merge=true", "random", dict(merge=True), "tower", None),
    ("fastv", "fastv", {}, "tower", None),
    ("oracle", "oracle", {}, "tower", None),
])
def test_parse(text, method, options, matrix, adaptive):
    spec = parse(text, ALLOWED)
    assert (spec.text, spec.method, dict(spec.options), spec.matrix, spec.adaptive) == (
        text.strip(), method, options, matrix, adaptive)
    assert str(spec) == text.strip()


def test_per_view_spec():
    """LLaVA-NeXT's per-view budgets: an option of every selector but visionzip (and fastv), carried to Pruning."""
    spec = parse("divprune:per_view=true:merge=true", ALLOWED)
    assert spec.per_view and spec.pruning(8) == Pruning("divprune", 8, (("merge", True),), "tower", True)
    assert spec.fixed().text == "divprune:merge=true:per_view=true" and parse(spec.fixed().text, ALLOWED) == spec
    assert not parse("svd", ALLOWED).per_view
    for bad in ("visionzip:per_view=true", "fastv:per_view=true"):
        with pytest.raises(ValueError, match="takes no option 'per_view'"):
            parse(bad, ALLOWED)


@pytest.mark.parametrize("text, match", [
    ("svdd", r"unknown method 'svdd'; choose from full, svd, random"),
    ("svd:energy", r"option 'energy' is not NAME=VALUE"),
    ("svd:energy=", r"option 'energy=' is not NAME=VALUE"),
    ("svd:eps=0.9", r"svd takes no option 'eps'; valid: rank, energy, center, solver, merge, matrix, adaptive"),
    ("random:matrix=projector", r"random takes no option 'matrix'; valid: merge, per_view$"),
    ("oracle:merge=true", r"oracle takes no option 'merge' \(it has no options\)"),
    ("visionzip:merge=true", "visionzip takes no option 'merge'"),
    ("svd:merge=1", "option merge: expected true or false"),
    ("fastv:rank=4", "fastv takes no option 'rank'"),
    ("lrcp:adaptive=0.9", "lrcp takes no option 'adaptive'"),
    ("svd:adaptive=0.9:per_view=true", r"adaptive \(a budget from the image's leverage over all its tokens\) and per_view"),
    ("visionzip:keys=1", "visionzip takes no option 'keys'"),
    ("svd:energy=1.5", r"option energy: energy must be a fraction in \(0, 1\]; got 1.5"),
    ("svd:energy=high", r"option energy: energy must be a fraction in \(0, 1\]; got 'high'"),
    ("svd:adaptive=0", r"option adaptive: adaptive must be a fraction in \(0, 1\]"),
    ("svd:rank=0", r"option rank: expected an int >= 1 or 'k' \(the budget\), got '0'"),
    ("svd:r=2.5", r"option rank: expected an int >= 1 or 'k'"),
    ("svd:center=yes", r"option center: expected true or false, got 'yes'"),
    ("svd:solver=lu", r"option solver: expected one of auto, svd, gram, randomized, got 'lu'"),
    ("svd:matrix=decoder", r"option matrix: expected one of tower, projector, got 'decoder'"),
    ("visionzip:contextual=-1", r"option contextual: expected an int >= 0"),
    ("svd:rank=4:energy=0.9", "give one of rank and energy"),
    ("svd:r=4:rank=4", "option 'rank' given twice"),
    ("svd:adaptive=0.9:rank=k", "adaptive needs a rank rule that does not follow the budget"),
    ("lrcp:rank=k", "rank=k \\(the budget\\) is a rank rule of svd only"),
])
def test_bad_specs(text, match):
    with pytest.raises(ValueError, match=match):
        parse(text, ALLOWED)


def test_allowed_depends_on_the_command():
    with pytest.raises(ValueError, match="unknown method 'oracle'"):
        parse("oracle", METHODS)


def test_sameness_ignores_spelling_and_lists_split_on_commas():
    specs = parse_list(["svd,svd:energy=0.5", "lrcp:r=2"], ALLOWED)
    assert [s.text for s in specs] == ["svd", "svd:energy=0.5", "lrcp:r=2"]
    assert parse("svd", ALLOWED) == parse("svd:energy=0.95:center=true:solver=auto", ALLOWED)
    assert parse("lrcp", ALLOWED) == parse("lrcp:r=4", ALLOWED) != parse("lrcp:matrix=projector", ALLOWED)
    with pytest.raises(ValueError, match="method specs 'svd' and 'svd:energy=0.95:center=true' are the same"):
        parse_list(["svd", "svd:energy=0.95:center=true"], ALLOWED)
    assert len(parse_list(["svd", "svd:rank=k"], ALLOWED)) == 2  # rank = k is not the default rule


def test_fixed_form_of_an_adaptive_spec():
    fixed = parse("svd:adaptive=0.9", ALLOWED).fixed()
    assert fixed.adaptive is None and fixed == parse("svd", ALLOWED) and fixed.text == "svd"
    assert parse("svd:adaptive=0.9:center=false", ALLOWED).fixed().text == "svd:center=false"
    assert parse("svd:matrix=projector:adaptive=0.5:r=3", ALLOWED).fixed().text == "svd:rank=3:matrix=projector"


def test_pruning_at_a_budget_reaches_prune():
    spec = parse("svd:center=false:matrix=projector", ALLOWED)
    assert spec.pruning(7) == Pruning("svd", 7, (("center", False), ("energy", 0.95), ("merge", False), ("solver", "auto")),
                                      "projector")
    x = np.random.default_rng(0).standard_normal((2, 30, 20)).astype(np.float32)
    for text, direct in [("svd:energy=0.5:center=true", dict(energy=0.5, center=True)), ("svd:r=6", dict(rank=6)), ("svd", dict()),
                         ("lrcp:r=2", dict(rank=2)), ("svd:rank=k", dict(rank="k")), ("norm:merge=true", dict(merge=True))]:
        s = parse(text, ALLOWED)
        for k in (6, 25):  # 25 > D: rank = k clipped to D
            np.testing.assert_array_equal(sp.prune(x, k, s.method, **dict(s.options))[1],
                                          sp.prune(x, k, s.method, **direct)[1])


def test_check_against_the_matrix_size():
    parse("svd:rank=20", ALLOWED).check(30, 20, 5)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(N, D\)=20\]; got 21"):
        parse("svd:rank=21", ALLOWED).check(30, 20, 5)
    parse("svd:rank=k", ALLOWED).check(30, 20, 25)  # rank = the budget clipped to min(N, D), as in prune
    with pytest.raises(ValueError, match="contextual must be an int"):
        parse("visionzip:contextual=5", ALLOWED).check(30, 20, 5)
    parse("svd:adaptive=0.9", ALLOWED).check(30, 20, 5)
    with pytest.raises(ValueError, match=r"min\(N, D\)=20\]; got 21"):
        parse("svd:adaptive=0.9:rank=21", ALLOWED).check(30, 20, 5)
    assert isinstance(parse("fastv", ALLOWED), MethodSpec)
    parse("fastv", ALLOWED).check(30, 20, 5)  # nothing to check before the language model
