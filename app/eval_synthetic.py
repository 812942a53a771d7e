"""`svdprune-jax eval synthetic`: every pruning method x budget on the synthetic benchmark's test split.

Each question gets one greedy answer through `Pipeline.answer` (the path `svdprune-jax run` takes), scored by
exact match with its one-word answer, overall and per question family. Alongside accuracy:
- object recall, for the selectors that prune before the language model: the share of the asked object's
  patches (the sample's mask) among the kept tokens, averaged over questions that ask about an object
  (VisionZip: its dominant tokens and the anchors of its merged tokens). FastV prunes inside the language
  model and has none;
- `random` over several seeds, reported as mean and standard deviation over the seeds;
- `oracle`: the asked object's patches first (most covered first), then other patches in a fixed random order,
  handed to the model as per-image scores: the ceiling for a selector that knew the question.
Budgets are shares of the model's image tokens ("50%", the paper's "64/576") or token counts ("20"). All
batches have one size (the last is filled up with repeated rows whose answers are dropped), so every method x
budget compiles once.
"""
import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Bool, Float, Int
from PIL import Image
from tqdm import tqdm

import svdprune_jax
from app.bundled import SCENES
from app.pictures import accuracy_plot
from app.pipeline import GIVEN, Pipeline
from app.scene import SceneConfig
from app.synthetic import FAMILIES, make_sample, split_seeds
from models import sharding
from models.clip import CLIPVisionConfig

ORACLE = "oracle"
FULL = "full"
RECALLED = (*svdprune_jax.METHODS, ORACLE)  # selectors that keep patches before the language model
METHODS = (*svdprune_jax.METHODS, "fastv", ORACLE)
BUDGETS = ("100%", "50%", "25%", "64/576", "32/576", "16/576")


@dataclasses.dataclass(frozen=True)
class TestSet:
    seeds: list[int]
    images: list[Image.Image]
    questions: list[str]
    answers: list[str]
    families: np.ndarray  # (n,) str
    mask: Bool[np.ndarray, "n N"]  # the asked object's patches, row-major; all False when none is asked about
    coverage: Float[np.ndarray, "n N"]  # share of each patch the asked object covers

    def __len__(self) -> int:
        return len(self.seeds)


@dataclasses.dataclass(frozen=True)
class Run:
    """One method at one budget (and one seed): what each question got."""
    method: str
    budget: str  # the budget as asked ("50%", "64/576", "20"), or "all" for the unpruned model
    keep: int  # image tokens the language model reads
    seed: int
    correct: Bool[np.ndarray, "n"]
    recall: Float[np.ndarray, "n"] | None  # NaN where nothing is asked about; None without kept patches


def scene_config(vision: CLIPVisionConfig) -> SceneConfig:
    """The scenes a model was made for: the bundled scene of its geometry, else default objects at its size."""
    same = [s for s in SCENES.values() if (s.image_size, s.patch_size) == (vision.image_size, vision.patch_size)]
    return same[0] if same else SceneConfig(image_size=vision.image_size, patch_size=vision.patch_size)


def budget_tokens(spec: str, n: int) -> int:
    """Tokens kept for a budget: "50%" and "64/576" are shares of the n image tokens (rounded, at least 1),
    "20" is a count."""
    try:
        if spec.endswith("%"):
            k = max(1, round(float(spec[:-1]) / 100 * n))
        elif "/" in spec:
            num, den = spec.split("/")
            k = max(1, round(int(num) / int(den) * n))
        else:
            k = int(spec)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget {spec!r}: expected a share (50%, 64/576) or a token count (20)") from None
    if not 1 <= k <= n:
        raise ValueError(f"budget {spec!r} is {k} tokens, outside [1, {n}] (the model's image tokens)")
    return k


def load_test_set(n: int, scene: SceneConfig) -> TestSet:
    samples = [make_sample(seed, scene) for seed in tqdm(split_seeds("test", n), desc="test images", unit="image")]
    return TestSet([s.seed for s in samples], [Image.fromarray(s.image) for s in samples],
                   [s.question for s in samples], [s.answer for s in samples], np.array([s.family for s in samples]),
                   np.stack([s.mask.ravel() for s in samples]), np.stack([s.coverage.ravel() for s in samples]))


def oracle_scores(mask: Bool[np.ndarray, "n N"], coverage: Float[np.ndarray, "n N"]) -> Float[np.ndarray, "n N"]:
    """Scores whose top k are the asked object's patches, most covered first, then other patches in a random
    order (fixed: row i is the same for any n > i)."""
    fill = np.random.default_rng(0).random(mask.shape)  # in [0, 1): below every object patch's 1 + coverage
    return np.where(mask, 1 + coverage, fill).astype(np.float32)


def object_recall(kept: Int[np.ndarray, "n k"], mask: Bool[np.ndarray, "n N"]) -> Float[np.ndarray, "n"]:
    """Share of each question's asked-object patches among its kept tokens; NaN where none is asked about."""
    size = mask.sum(1)
    hits = np.take_along_axis(mask, kept, axis=1).sum(1)
    return np.where(size > 0, hits / np.maximum(size, 1), np.nan)


def evaluate_run(pipe: Pipeline, test: TestSet, method: str, budget: str, keep: int, *, seed: int = 0,
                 batch: int, max_new_tokens: int, bar: tqdm) -> Run:
    """Answers every question of `test` with one method at one budget, `batch` questions per call."""
    n, batch = len(test), min(batch, len(test))
    scores = oracle_scores(test.mask, test.coverage) if method == ORACLE else None
    texts, kept = [], []
    for b, start in enumerate(range(0, n, batch)):
        rows = np.arange(start, start + batch) % n  # the last batch is filled up with repeated rows
        select = dict(method=GIVEN, scores=scores[rows]) if method == ORACLE else dict(method=method)
        answers, _ = pipe.answer([test.images[i] for i in rows], [test.questions[i] for i in rows], **select,
                                 keep=None if method == FULL else keep, max_new_tokens=max_new_tokens,
                                 key=jax.random.fold_in(jax.random.key(seed), b))
        real = answers[:n - start]  # the repeated rows' answers are dropped
        texts += [a.text for a in real]
        kept += [a.kept_indices for a in real]
        bar.update(len(real))
    correct = np.array(texts) == np.array(test.answers)
    recall = object_recall(np.array(kept), test.mask) if method in RECALLED else None
    return Run(method, budget, keep, seed, correct, recall)


def check(methods: Sequence[str], budgets: Sequence[str], n_tokens: int) -> dict[str, int]:
    """Tokens kept per budget, after checking the methods and budgets."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods {list(methods)}: each once, from {', '.join(METHODS)}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets {list(budgets)}: each once")
    return {spec: budget_tokens(spec, n_tokens) for spec in budgets}


def sweep(pipe: Pipeline, test: TestSet, methods: Sequence[str], budgets: Sequence[str], *, seeds: int = 3,
          batch: int = 50, max_new_tokens: int = 3) -> list[Run]:
    """The unpruned model, then every method at every budget (`random` once per seed)."""
    n_tokens = pipe.num_image_tokens
    if n_tokens != test.mask.shape[1]:
        raise ValueError(f"the model reads {n_tokens} image tokens per image, the scenes have {test.mask.shape[1]} "
                         "patches (only the 'default' feature strategy, patches without CLS, is supported)")
    if seeds < 1 or batch < 1 or max_new_tokens < 1:
        raise ValueError(f"seeds {seeds}, batch {batch} and max_new_tokens {max_new_tokens} must be >= 1")
    keeps = check(methods, budgets, n_tokens)
    jobs = [(FULL, "all", n_tokens, 0)] + [(m, spec, k, s) for spec, k in keeps.items() for m in methods
                                            for s in range(seeds if m == "random" else 1)]
    with tqdm(total=len(jobs) * len(test), unit="answer", desc="synthetic") as bar:
        runs = []
        for method, spec, keep, seed in jobs:
            bar.set_postfix_str(f"{method} {spec}" + (f" seed {seed}" if method == "random" else ""))
            runs.append(evaluate_run(pipe, test, method, spec, keep, seed=seed, batch=batch,
                                     max_new_tokens=max_new_tokens, bar=bar))
    return runs


def summarize(runs: Sequence[Run], families: np.ndarray) -> list[dict]:
    """One row per method x budget: accuracy (%) and object recall (means over seeds, with their sample
    standard deviation), and accuracy per family."""
    rows = []
    for method, budget, keep in dict.fromkeys((r.method, r.budget, r.keep) for r in runs):
        group = [r for r in runs if (r.method, r.budget) == (method, budget)]
        acc = np.array([100 * r.correct.mean() for r in group])
        row = dict(method=method, budget=budget, keep=keep, seeds=len(group), accuracy=acc.mean(),
                   accuracy_std=_std(acc), recall=None, recall_std=None)
        if group[0].recall is not None:
            rec = np.array([np.nanmean(r.recall) for r in group])
            row.update(recall=rec.mean(), recall_std=_std(rec))
        for f in FAMILIES:  # None for a family with no question among the n
            asked = families == f
            row[f"accuracy_{f}"] = np.mean([100 * r.correct[asked].mean() for r in group]) if asked.any() else None
        rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
    return rows


def _std(values: np.ndarray) -> float:
    """Sample standard deviation over seeds; 0 for one seed."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _cell(row: dict, key: str, digits: int) -> str:
    if row[key] is None:
        return "-"
    return f"{row[key]:.{digits}f}" + (f"±{row[key + '_std']:.{digits}f}" if row["seeds"] > 1 else "")


def _align(lines: list[list[str]], left: int) -> str:
    """Columns padded to their widest cell: the first `left` flush left, the rest flush right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def format_table(rows: Sequence[dict], key: str = "accuracy", title: str = "accuracy %") -> str:
    """Methods down, budgets across (kept tokens in brackets); random as mean±std over seeds."""
    digits = 1 if key == "accuracy" else 2
    budgets = list(dict.fromkeys((r["budget"], r["keep"]) for r in rows if r["method"] != FULL))
    cells = {(r["method"], r["budget"]): _cell(r, key, digits) for r in rows}
    lines = [[title] + [f"{b} ({k})" for b, k in budgets]]
    lines += [[f"{FULL} ({r['keep']})", _cell(r, key, digits)] + [""] * (len(budgets) - 1)
              for r in rows if r["method"] == FULL]
    lines += [[m] + [cells.get((m, b), "") for b, _ in budgets]
              for m in dict.fromkeys(r["method"] for r in rows if r["method"] != FULL)]
    return _align(lines, 1)


def family_table(rows: Sequence[dict], budget: str) -> str:
    """Accuracy per question family at one budget, and unpruned."""
    cell = lambda v: "-" if v is None else f"{v:.1f}"
    lines = [["method", "budget", *FAMILIES]]
    lines += [[r["method"], r["budget"], *(cell(r[f"accuracy_{f}"]) for f in FAMILIES)]
              for r in rows if r["budget"] in (budget, "all")]
    return _align(lines, 2)


def write_outputs(rows: Sequence[dict], runs: Sequence[Run], out: Path, meta: dict) -> None:
    """out/synthetic.csv (one row per method x budget), out/synthetic.json (meta, rows, per-seed runs) and
    out/synthetic.png (accuracy vs kept tokens)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "synthetic.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    per_seed = [dict(method=r.method, budget=r.budget, keep=r.keep, seed=r.seed, accuracy=100 * float(r.correct.mean()),
                     recall=None if r.recall is None else float(np.nanmean(r.recall))) for r in runs]
    (out / "synthetic.json").write_text(json.dumps(dict(meta, rows=list(rows), runs=per_seed), indent=1))
    accuracy_plot(rows, out / "synthetic.png", f"synthetic test split, n={meta['n']}")


def run(model_dir: Path, out: Path, *, n: int = 500, methods: Sequence[str] = METHODS,
        budgets: Sequence[str] = BUDGETS, seeds: int = 3, batch: int = 50, max_new_tokens: int = 3,
        mesh: Mesh | None = None) -> list[dict]:
    """The whole evaluation: sweep, tables printed, outputs written (see `write_outputs`); returns the rows.
    mesh: run sharded (batches split over its data axis, across processes when it spans several: each answers its
    own rows, the answers are gathered, process 0 alone prints and writes)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if mesh is not None:
        sharding.check_batch(min(batch, n), mesh)
    pipe = Pipeline.load(model_dir, mesh=mesh)
    keeps = check(methods, budgets, pipe.num_image_tokens)  # before the test images are drawn
    test = load_test_set(n, scene_config(pipe.config.vision))
    runs = sweep(pipe, test, methods, budgets, seeds=seeds, batch=batch, max_new_tokens=max_new_tokens)
    rows = summarize(runs, test.families)
    meta = dict(model=str(model_dir), n=n, image_tokens=pipe.num_image_tokens, methods=list(methods),
                budgets=keeps, random_seeds=seeds)
    if jax.process_index() != 0:
        return rows
    write_outputs(rows, runs, out, meta)
    print(format_table(rows), format_table(rows, "recall", "object recall"), family_table(rows, budgets[-1]),
          f"wrote {out}/synthetic.csv, synthetic.json, synthetic.png", sep="\n\n")
    return rows
