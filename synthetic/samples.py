"""The synthetic fine-detail VQA benchmark: question families, samples, splits, fixtures and statistics.

`make_sample(seed)` is a pure function of the seed. The family is `seed % 5` and the answer cycles with
`seed // 5`, so any run of 5 * len(answers) consecutive seeds holds every answer of a family exactly once
(answers are balanced by construction). Every question names its object(s) by two attributes, and each scene
carries hard negatives that share one attribute with the asked object, so no single-attribute shortcut
(colour alone, quadrant alone, shape alone) answers it.

    python -m svdprune_jax.synthetic.samples [--split validation] [--n 1000]     # per-family statistics
"""

import argparse
import collections
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float32, Int8, Int32, UInt8
from PIL import Image

from svdprune_jax.synthetic.scene import (COLOURS, GLYPH_SHAPES, GLYPHS, MIN_COVERAGE, MIN_GLYPH_COVERAGE, QUADRANTS, SHAPES, Scene,
                       SceneConfig, SceneObject, glyph_pixels, object_pixels, patch_shares, render, sample_scene)

FAMILIES = ("colour", "shape", "count", "read", "presence")
MIN_OBJECTS, MAX_OBJECTS = 5, 8  # 5: a count of 3 plus two hard negatives; 8: two per quadrant
ANSWERS = {"colour": COLOURS, "shape": SHAPES, "count": ("1", "2", "3"), "read": GLYPHS, "presence": ("yes", "no")}
TEMPLATES = {
    "colour": "What color is the {shape} in the {quadrant}?",
    "shape": "What shape is the {colour} object in the {quadrant}?",
    "count": "How many {colour} {shape}s are there?",
    "read": "What is written on the {colour} {shape}?",
    "presence": "Is there a {colour} {shape}?",
}
# Training follow-ups only (never a benchmark question): the object a quadrant holds alone, named by the quadrant.
# Retrieval by position has no content shortcut here; a decoder trained without them learnt colour/shape
# questions by the named attribute alone (see svdprune_jax.synthetic.train.Stage.by_quadrant).
QUADRANT_TEMPLATES = {"colour": "What color is the object in the {quadrant}?",
                      "shape": "What shape is the object in the {quadrant}?"}
# Disjoint seed ranges; the test split is never used for training or model selection.
SPLITS = {"train": range(0, 10**9), "validation": range(10**9, 10**9 + 10**6),
          "test": range(2 * 10**9, 2 * 10**9 + 10**6)}


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    seed: int
    family: str
    question: str
    answer: str
    image: UInt8[np.ndarray, "H W 3"]
    coverage: Float32[np.ndarray, "g g"]  # share of each patch covered by the asked object(s)
    mask: Bool[np.ndarray, "g g"]  # coverage >= MIN_COVERAGE; all False when nothing is asked about (presence "no")
    points: Int8[np.ndarray, "g g"]  # counting questions' evidence, see object_points
    targets: dict[str, Int32[np.ndarray, "..."]]  # dense stage-1 targets, see dense_targets
    scene: Scene
    asked: tuple[int, ...]  # indices into scene.objects of the object(s) the question is about


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    seeds = SPLITS[split]
    if n < 0 or start < 0 or start + n > len(seeds):
        raise ValueError(f"samples [{start}, {start + n}) out of range for split {split!r} of size {len(seeds)}")
    return list(seeds[start:start + n])


def family_and_answer(seed: int) -> tuple[str, str]:
    family = FAMILIES[seed % len(FAMILIES)]
    answers = ANSWERS[family]
    return family, answers[(seed // len(FAMILIES)) % len(answers)]


def all_questions() -> list[str]:
    """Every question any seed can ask (the tokenizer's vocabulary is built from these and the answers)."""
    colour_shape = [dict(colour=c, shape=s) for c in COLOURS for s in SHAPES]
    return sorted({TEMPLATES[f].format(**kw) for f, fills in (
        ("colour", [dict(shape=s, quadrant=q) for s in SHAPES for q in QUADRANTS]),
        ("shape", [dict(colour=c, quadrant=q) for c in COLOURS for q in QUADRANTS]),
        ("count", colour_shape),
        ("read", [dict(colour=c, shape=s) for c in COLOURS for s in GLYPH_SHAPES]),
        ("presence", colour_shape)) for kw in fills})


def training_questions() -> list[str]:
    """`all_questions` and the training-only `QUADRANT_TEMPLATES` questions: every question training asks."""
    return sorted({*all_questions(), *(t.format(quadrant=q) for t in QUADRANT_TEMPLATES.values() for q in QUADRANTS)})


def make_sample(seed: int, cfg: SceneConfig = SceneConfig()) -> Sample:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    family, answer = family_and_answer(seed)
    rng, objects, n_asked, question = _seed_objects(seed)
    scene = sample_scene(rng, objects, cfg)
    cover = _object_coverage(scene, cfg)
    coverage = cover[:n_asked].sum(0)
    return Sample(seed, family, question, answer, render(scene), coverage, coverage >= MIN_COVERAGE,
                  object_points(cover, n_asked) if family == "count" else np.zeros_like(coverage, np.int8),
                  dense_targets(scene, cfg), scene, tuple(range(n_asked)))


def object_points(cover: Float32[np.ndarray, "K g g"], n_asked: int) -> Int8[np.ndarray, "g g"]:
    """One patch per object of the scene, the one it covers most: 2 on the first `n_asked` (the counted) objects',
    1 on every other object's, 0 elsewhere. The evidence a count needs: each counted object once, among the
    others. More patches of a counted object are no more evidence, and the shipped reader counts kept tokens of
    the asked kind, so they read as more objects (docs/results.md)."""
    k, g, _ = cover.shape
    points = np.zeros(g * g, np.int8)
    best = cover.reshape(k, -1).argmax(1)
    points[best[n_asked:]] = 1
    points[best[:n_asked]] = 2  # after the others: a patch two objects share most counts for the counted one
    return points.reshape(g, g)


def _seed_objects(seed: int) -> tuple[np.random.Generator, list[SceneObject], int, str]:
    """The seed's object list (drawn first from its random stream), asked count and question, and the stream
    left for placing and drawing them: `follow_ups` needs only the objects, `make_sample` goes on to render."""
    rng = np.random.default_rng(seed)
    return rng, *_objects(rng, *family_and_answer(seed))


def _objects(rng: np.random.Generator, family: str, answer: str) -> tuple[list[SceneObject], int, str]:
    """Attributes (not positions) of a scene's objects: the asked ones first, then hard negatives sharing one
    attribute with them, then fillers that keep the referent unique. Quadrant -1 = any.

    Outside the count family the scene's colours and shapes are each a balanced multiset drawn before the
    question (every colour 1-2 times, every shape 1-3 times), so colour or shape frequencies carry nothing
    about the answer. Count scenes hold 8 objects, 4 of the asked colour and 4 of the asked shape whatever the
    count, so only binding colour to shape object by object answers them. Every circle and square carries a
    glyph, all different while the glyphs last."""
    def pick(values):
        values = list(values)
        return int(values[rng.integers(len(values))])

    def take(pool, allowed):  # removes and returns a random element of the pool that is allowed
        v = pick(u for u in pool if allowed(u))
        pool.remove(v)
        return v

    q = pick(range(len(QUADRANTS)))
    other_q = pick(j for j in range(len(QUADRANTS)) if j != q)
    colours, shapes = [], []
    if family == "count":
        k, c, s = int(answer), pick(range(len(COLOURS))), pick(range(len(SHAPES)))
        not_c, not_s = [v for v in range(len(COLOURS)) if v != c], [v for v in range(len(SHAPES)) if v != s]
        specs = ([(s, c, -1)] * k + [(pick(not_s), c, -1) for _ in range(4 - k)]
                 + [(s, pick(not_c), -1) for _ in range(4 - k)] + [(pick(not_s), pick(not_c), -1) for _ in range(k)])
        n_asked = k
    else:
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        colours, shapes = _balanced(rng, n, len(COLOURS)), _balanced(rng, n, len(SHAPES))
        if family == "colour":  # hard negatives: same shape elsewhere, other object in the same quadrant
            c = take(colours, lambda v: v == COLOURS.index(answer))
            s = take(shapes, lambda v: shapes.count(v) >= 2)
            specs = [(s, c, q), (take(shapes, lambda v: v == s), take(colours, lambda v: v != c), other_q),
                     (take(shapes, lambda v: v != s), take(colours, lambda v: v != c), q)]
        elif family == "shape":  # hard negatives: same colour elsewhere, other object in the same quadrant
            s = take(shapes, lambda v: v == SHAPES.index(answer))
            c = take(colours, lambda v: colours.count(v) >= 2)
            specs = [(s, c, q), (take(shapes, lambda v: v != s), take(colours, lambda v: v == c), other_q),
                     (take(shapes, lambda v: v != s), take(colours, lambda v: v != c), q)]
        elif family == "read":  # hard negative: same shape, other colour, other glyph
            s = take(shapes, lambda v: SHAPES[v] in GLYPH_SHAPES and shapes.count(v) >= 2)
            c = take(colours, lambda v: True)
            specs = [(s, c, -1), (take(shapes, lambda v: v == s), take(colours, lambda v: v != c), -1)]
        else:  # presence; hard negatives: same colour other shape, same shape other colour
            c = take(colours, lambda v: colours.count(v) >= 2)
            s = take(shapes, lambda v: shapes.count(v) >= 2)
            specs = [(take(shapes, lambda v: v != s), take(colours, lambda v: v == c), -1),
                     (take(shapes, lambda v: v == s), take(colours, lambda v: v != c), -1)]
            if answer == "yes":
                specs.insert(0, (s, c, -1))
            else:
                colours.append(c)
                shapes.append(s)
        n_asked = int(family != "presence" or answer == "yes")
    question = TEMPLATES[family].format(colour=COLOURS[c], shape=SHAPES[s], quadrant=QUADRANTS[q])

    unique_pair = family in ("read", "presence")  # colour/shape referents are unique already: their quadrant is full
    for _ in range(1000):
        fillers = list(zip(rng.permutation(shapes).tolist(), colours))
        if not (unique_pair and (s, c) in fillers):
            break
    else:
        raise ValueError(f"no filler pairing keeps the {COLOURS[c]} {SHAPES[s]} unique")  # unreachable by design

    room = [2 - sum(sp[2] == j for sp in specs) for j in range(len(QUADRANTS))]  # two per quadrant always fit
    objects = []
    for shape, colour, quadrant in specs + [(sh, co, -1) for sh, co in fillers]:
        if quadrant < 0:
            quadrant = pick(np.flatnonzero(room))
            room[quadrant] -= 1
        objects.append(SceneObject(shape, colour, quadrant))

    glyphs = [g for g in rng.permutation(len(GLYPHS)).tolist() if family != "read" or g != GLYPHS.index(answer)]
    bearers = [i for i, o in enumerate(objects) if SHAPES[o.shape] in GLYPH_SHAPES]
    if family == "read":
        objects[0] = dataclasses.replace(objects[0], glyph=GLYPHS.index(answer))
        bearers.remove(0)
    for j, i in enumerate(bearers):
        objects[i] = dataclasses.replace(objects[i], glyph=glyphs[j % len(glyphs)])
    return objects, n_asked, question


def scene_questions(objects: Sequence[SceneObject]) -> list[tuple[str, str, str, bool]]:
    """(family, question, answer, needs_quadrant) of every templated question a scene's objects answer
    unambiguously: quadrant referents unique in their quadrant, counts within the count answers, reading only a
    unique glyph bearer. needs_quadrant: a colour or shape question whose named shape or colour also occurs in
    another quadrant, so only the quadrant tells the referent apart (as in the colour and shape samples' own
    questions)."""
    out = []
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            kind = [o for o in objects if (o.colour, o.shape) == (c, s)]
            out.append(("presence", TEMPLATES["presence"].format(colour=colour, shape=shape), "yes" if kind else "no", False))
            if str(len(kind)) in ANSWERS["count"]:
                out.append(("count", TEMPLATES["count"].format(colour=colour, shape=shape), str(len(kind)), False))
            if len(kind) == 1 and kind[0].glyph >= 0:
                out.append(("read", TEMPLATES["read"].format(colour=colour, shape=shape), GLYPHS[kind[0].glyph], False))
    for q, quadrant in enumerate(QUADRANTS):
        here = [o for o in objects if o.quadrant == q]
        for s, shape in enumerate(SHAPES):
            if len(m := [o for o in here if o.shape == s]) == 1:
                elsewhere = any(o.shape == s and o.quadrant != q for o in objects)
                out.append(("colour", TEMPLATES["colour"].format(shape=shape, quadrant=quadrant), COLOURS[m[0].colour], elsewhere))
        for c, colour in enumerate(COLOURS):
            if len(m := [o for o in here if o.colour == c]) == 1:
                elsewhere = any(o.colour == c and o.quadrant != q for o in objects)
                out.append(("shape", TEMPLATES["shape"].format(colour=colour, quadrant=quadrant), SHAPES[m[0].shape], elsewhere))
    return out


def quadrant_questions(objects: Sequence[SceneObject]) -> list[tuple[str, str]]:
    """(question, answer) of `QUADRANT_TEMPLATES` about every quadrant that holds exactly one object."""
    out = []
    for q, quadrant in enumerate(QUADRANTS):
        if len(here := [o for o in objects if o.quadrant == q]) == 1:
            out += [(QUADRANT_TEMPLATES["colour"].format(quadrant=quadrant), COLOURS[here[0].colour]),
                    (QUADRANT_TEMPLATES["shape"].format(quadrant=quadrant), SHAPES[here[0].shape])]
    return out


def follow_ups(seed: int, n: int, need_quadrant: int = 0, by_quadrant: int = 0) -> list[tuple[str, str]]:
    """Up to n (question, answer) pairs about seed's scene besides its own question, for multi-turn training:
    seeded, in random order. Up to two per family, except presence and count: one per answer, since scenes hold
    far more absent and single objects than anything else. First come up to `by_quadrant` of the scene's
    `quadrant_questions`, then up to `need_quadrant` of its needs_quadrant questions, then those picks. Only
    the object list is drawn, not the image."""
    _, objects, _, own = _seed_objects(seed)
    rng = np.random.default_rng([seed, 1])
    asked = [t for t in scene_questions(objects) if t[1] != own]
    pools = collections.defaultdict(list)
    for family, question, answer, _ in asked:
        by_answer = family in ("presence", "count")
        pools[family, answer if by_answer else "", 1 if by_answer else 2].append((question, answer))
    picks = [pool[i] for (_, _, m), pool in pools.items() for i in rng.permutation(len(pool))[:m]]
    rng.shuffle(picks)
    hard = [(question, answer) for _, question, answer, needs in asked if needs]
    hard = [hard[i] for i in np.random.default_rng([seed, 2]).permutation(len(hard))][:need_quadrant]
    alone = quadrant_questions(objects)
    alone = [alone[i] for i in np.random.default_rng([seed, 3]).permutation(len(alone))][:by_quadrant]
    return (alone + hard + [p for p in picks if p not in hard])[:n]


def _balanced(rng: np.random.Generator, n: int, m: int) -> list[int]:
    """n values over range(m), each used n // m or n // m + 1 times."""
    return list(range(m)) * (n // m) + rng.choice(m, n % m, replace=False).tolist()


def _object_coverage(scene: Scene, cfg: SceneConfig) -> Float32[np.ndarray, "K g g"]:
    """Share of each patch covered by each object."""
    return patch_shares(np.stack([object_pixels(o, cfg.image_size) for o in scene.objects]), cfg.patch_size)


def dense_targets(scene: Scene, cfg: SceneConfig) -> dict[str, Int32[np.ndarray, "..."]]:
    """Per-patch targets for stage-1 training of the vision tower (int32 (g, g) unless noted). A patch is an
    object patch when its most-covering object covers >= MIN_COVERAGE of it; otherwise it is background.

    object: index of that object in scene.objects, -1 for background
    colour: COLOURS index, len(COLOURS) for background          shape: SHAPES index, len(SHAPES) for background
    glyph:  GLYPHS index where >= MIN_GLYPH_COVERAGE of the patch is glyph strokes, len(GLYPHS) elsewhere
    centre: 1 on the patch holding an object's centre, else 0   counts: (len(COLOURS), len(SHAPES)) objects per kind
    """
    cover = _object_coverage(scene, cfg)
    glyphs = patch_shares(np.stack([glyph_pixels(o, cfg.image_size) for o in scene.objects]), cfg.patch_size)
    colours = np.array([o.colour for o in scene.objects])
    shapes = np.array([o.shape for o in scene.objects])
    glyph_ids = np.array([o.glyph for o in scene.objects])
    top = cover.argmax(0)
    on = cover.max(0) >= MIN_COVERAGE
    centre = np.zeros((cfg.grid, cfg.grid), np.int32)
    counts = np.zeros((len(COLOURS), len(SHAPES)), np.int32)
    for o in scene.objects:
        centre[o.cy // cfg.patch_size, o.cx // cfg.patch_size] = 1
        counts[o.colour, o.shape] += 1
    return {
        "object": np.where(on, top, -1).astype(np.int32),
        "colour": np.where(on, colours[top], len(COLOURS)).astype(np.int32),
        "shape": np.where(on, shapes[top], len(SHAPES)).astype(np.int32),
        "glyph": np.where(glyphs.max(0) >= MIN_GLYPH_COVERAGE, glyph_ids[glyphs.argmax(0)],
                          len(GLYPHS)).astype(np.int32),
        "centre": centre,
        "counts": counts,
    }


def make_batch(seeds: list[int], cfg: SceneConfig = SceneConfig()) -> dict:
    """Samples stacked for training: arrays with a leading batch axis, strings as lists."""
    samples = [make_sample(s, cfg) for s in seeds]
    return {
        "seed": np.array(seeds, np.int64),
        "image": np.stack([s.image for s in samples]),
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
        "family": [s.family for s in samples],
        "coverage": np.stack([s.coverage for s in samples]),
        "mask": np.stack([s.mask for s in samples]),
        "targets": {k: np.stack([s.targets[k] for s in samples]) for k in samples[0].targets},
    }


def sample_record(s: Sample) -> dict:
    """JSON-ready description of a sample (image stored separately)."""
    return {
        "seed": s.seed, "family": s.family, "question": s.question, "answer": s.answer,
        "mask": np.flatnonzero(s.mask).tolist(),  # row-major patch indices = vision-tower token order
        "asked": list(s.asked),
        "objects": [{"shape": SHAPES[o.shape], "colour": COLOURS[o.colour], "quadrant": QUADRANTS[o.quadrant],
                     "glyph": GLYPHS[o.glyph] if o.glyph >= 0 else None,
                     "box": [o.cx - o.size // 2, o.cy - o.size // 2, o.cx + o.size // 2, o.cy + o.size // 2]}
                    for o in s.scene.objects],
    }


def write_samples(out_dir: str | Path, seeds: list[int], cfg: SceneConfig = SceneConfig()) -> Path:
    """Writes images/<seed>.png and samples.json (geometry + one record per sample); returns the JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for seed in seeds:
        s = make_sample(seed, cfg)
        Image.fromarray(s.image).save(out / "images" / f"{seed}.png")
        records.append({"image": f"images/{seed}.png", **sample_record(s)})
    path = out / "samples.json"
    path.write_text(json.dumps({"image_size": cfg.image_size, "patch_size": cfg.patch_size, "grid": cfg.grid,
                                "samples": records}, indent=1))
    return path


def family_stats(seeds: list[int], cfg: SceneConfig = SceneConfig()) -> dict:
    """Per family: answer counts, majority-answer baseline, mean share of patches in the asked object's mask
    (over samples that ask about an object). Under "scene": mean share of object patches and of background
    patches that show clutter."""
    answers, shares = collections.defaultdict(collections.Counter), collections.defaultdict(list)
    object_share, clutter_share = [], []
    for seed in seeds:
        s = make_sample(seed, cfg)
        answers[s.family][s.answer] += 1
        if s.mask.any():
            shares[s.family].append(s.mask.mean())
        background = s.targets["object"] < 0
        object_share.append(1 - background.mean())
        visible_clutter = s.scene.clutter & ~np.any([object_pixels(o, cfg.image_size) for o in s.scene.objects], 0)
        clutter_share.append((patch_shares(visible_clutter, cfg.patch_size) > 0)[background].mean())
    stats = {f: {"n": sum(answers[f].values()), "answers": dict(sorted(answers[f].items())),
                 "majority": max(answers[f].values()) / sum(answers[f].values()),
                 "mask_share": float(np.mean(shares[f])) if shares[f] else 0.0} for f in FAMILIES if answers[f]}
    stats["scene"] = {"object_patch_share": float(np.mean(object_share)),
                      "clutter_background_share": float(np.mean(clutter_share))}
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-family statistics of the synthetic benchmark.")
    parser.add_argument("--split", default="validation", choices=tuple(SPLITS))
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args(argv)
    cfg = SceneConfig()
    stats = family_stats(split_seeds(args.split, args.n), cfg)
    print(f"{args.split}: {args.n} samples, {cfg.image_size}x{cfg.image_size} px, patch {cfg.patch_size}, "
          f"{cfg.num_patches} patches")
    for f in (f for f in FAMILIES if f in stats):
        st = stats[f]
        print(f"{f:9s} n={st['n']:4d} majority={st['majority']:.3f} asked-object patch share={st['mask_share']:.3f} "
              f"answers={st['answers']}")
    print(f"object patches {stats['scene']['object_patch_share']:.3f} of the image; "
          f"background patches with clutter {stats['scene']['clutter_background_share']:.3f}")


if __name__ == "__main__":
    main()
