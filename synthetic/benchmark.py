"""`svdprune-jax eval synthetic`: every pruning method spec x budget on the synthetic benchmark's test split
(or, with `--split validation`, the split to choose hyperparameters such as eps, r and adaptive targets on).

Each question gets one greedy answer through `Pipeline.answer` (the path `svdprune-jax run` takes), scored by
exact match with its one-word answer, overall and per question family. Methods are method specs
(`svdprune_jax.inference.methods`: "svd", "svd:energy=0.9", "lrcp:r=4", "svd:adaptive=0.9", ...); results are keyed by the spec as
given. Alongside accuracy:
- the well-formed-answer rate: answers that are one of the question family's answers and end there (EOS), so
  that a reader failure (rambling, answering out of the family) shows in every table, not only as lost accuracy;
- a 95% bootstrap interval over questions for every accuracy (`svdprune_jax.evaluation.stats.bootstrap_ci`, seeded: every method
  is resampled with the same draws);
- object recall, for the selectors that prune before the language model: the share of the asked object's
  patches (the sample's mask) among the kept tokens, averaged over questions that ask about an object
  (VisionZip: its dominant tokens and the anchors of its merged tokens). FastV prunes inside the language
  model and has none;
- `random` over several seeds (default 5), reported as mean and standard deviation over the seeds;
- `oracle`: the evidence the answer needs first, then other patches in a fixed random order, handed to the
  model as per-image scores: the ceiling for a selector that knew the question and the scene. The evidence is
  the asked object's patches (most covered first), except for counting questions: one patch per object, the
  counted ones first (`samples.object_points`);
- at each budget, the exact McNemar test between every `svd` spec and the most accurate other method that is
  not the oracle (`random`: its seed-0 answers, the pairing a McNemar test needs);
- mean kept image tokens and wall time per question (compilation excluded: each compiled shape is run once
  before it is timed). Adaptive specs choose each image's budget among the budget and its halvings
  (`svdprune_jax.budget_buckets`), group the questions by budget and answer each group at its static budget;
  their time includes choosing the budgets (one more pass of the vision tower in this implementation).
Budgets are shares of the model's image tokens ("50%", the paper's "64/576") or token counts ("20"). All
batches have one size (the last of a group is filled up with repeated rows whose answers are dropped), so every
method x budget compiles once. Outputs: a CSV and a JSON (rows with intervals and p-values, per-seed runs), an
accuracy-vs-mean-kept-tokens plot with the intervals as error bars (fixed and adaptive budgets on one axes) and a
grid of the kept tokens of every selector on the first test images at the smallest budget. Every finished
method x budget x seed is appended to `RESULTS` in the output directory: a rerun resumes from it, and a rerun with
other methods or budgets adds its rows to the earlier ones (see `run`).
"""
import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Bool, Float, Int
from PIL import Image
from tqdm import tqdm

import svdprune_jax
from svdprune_jax import names
from svdprune_jax.synthetic.bundled import SCENES
from svdprune_jax.inference.methods import MethodSpec, parse, parse_list
from svdprune_jax.inference.pictures import accuracy_plot, kept_grid
from svdprune_jax.inference.pipeline import GIVEN, Pipeline
from svdprune_jax.synthetic.scene import SceneConfig
from svdprune_jax.evaluation.harness import check_settings, drop_incomplete_tail, weights_fingerprint
from svdprune_jax.evaluation.stats import RESAMPLES, bootstrap_ci, mcnemar_exact
from svdprune_jax.synthetic.samples import ANSWERS, FAMILIES, make_sample, split_seeds
from svdprune_jax.convert.hf_config import read_config
from svdprune_jax.models import sharding
from svdprune_jax.models.clip import CLIPVisionConfig
from svdprune_jax.models.llava_next import LlavaNextConfig

ORACLE = "oracle"
# what the oracle keeps, in the recorded settings: answers of an earlier oracle are not resumed as this one's
ORACLE_EVIDENCE = "the asked object's patches; counting questions: one patch per object, the counted first"
FULL = names.FULL
RECALLED = (*names.METHODS, ORACLE)  # selectors that keep patches before the language model
METHODS = (*names.METHODS, names.FASTV, ORACLE)
BUDGETS = ("100%", "50%", "25%", "64/576", "32/576", "16/576")
SEEDS = 5  # random pruning's seeds
RESULTS = "runs.jsonl"  # one line per finished (method spec, budget, seed): the sweep resumes from it
GRID_IMAGES = 4  # test images in the kept-token grid


@dataclasses.dataclass(frozen=True)
class TestSet:
    seeds: list[int]
    images: list[Image.Image]
    questions: list[str]
    answers: list[str]
    families: np.ndarray  # (n,) str
    mask: Bool[np.ndarray, "n N"]  # the asked object's patches, row-major; all False when none is asked about
    coverage: Float[np.ndarray, "n N"]  # share of each patch the asked object covers
    points: Int[np.ndarray, "n N"]  # counting questions' one patch per object (samples.object_points)

    def __len__(self) -> int:
        return len(self.seeds)


@dataclasses.dataclass(frozen=True)
class Run:
    """One method spec at one budget (and one seed): what each question got."""
    spec: MethodSpec
    budget: str  # the budget as asked ("50%", "64/576", "20"), or "all" for the unpruned model
    keep: int  # image tokens the language model reads (adaptive: at most)
    seed: int
    correct: Bool[np.ndarray, "n"]
    tokens: Int[np.ndarray, "n"]  # image tokens each question's image kept
    kept: list[list[int]] | None  # kept patch indices per question; None without kept patches (full, fastv)
    recall: Float[np.ndarray, "n"] | None  # NaN where nothing is asked about; None without kept patches
    seconds: float  # wall time per question, compilation excluded
    well_formed: Bool[np.ndarray, "n"] | None = None  # one of the family's answers, and nothing after it
    texts: tuple[str, ...] | None = None  # the answers as given (what a resumed sweep reads back)
    stopped: tuple[bool, ...] | None = None  # the answer ended (EOS) within max_new_tokens

    @property
    def method(self) -> str:
        return self.spec.text


def scene_config(vision: CLIPVisionConfig) -> SceneConfig:
    """The scenes a model was made for: the bundled scene of its geometry, else default objects at its size."""
    same = [s for s in SCENES.values() if (s.image_size, s.patch_size) == (vision.image_size, vision.patch_size)]
    return same[0] if same else SceneConfig(image_size=vision.image_size, patch_size=vision.patch_size)


def well_formed(texts: Sequence[str], stopped: Sequence[bool], families: np.ndarray) -> Bool[np.ndarray, "n"]:
    """Answers that are one of their question family's answers and stop there (EOS next, nothing after): the
    share of answers the benchmark's reader can score at all. A decoder that rambles or answers out of its family
    is visible here even where accuracy alone would not say why."""
    return np.array([stop and text in ANSWERS[f] for text, stop, f in zip(texts, stopped, families)], bool)


def budget_tokens(spec: str, n: int) -> int:
    """Tokens kept for a budget: "50%" and "64/576" are shares of the n image tokens (rounded, at least 1),
    "20" is a count."""
    try:
        if spec.endswith("%"):
            share = float(spec[:-1]) / 100
        elif "/" in spec:
            num, den = spec.split("/")
            share = int(num) / int(den)
        else:
            share = None
            k = int(spec)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget {spec!r}: expected a share (50%, 64/576) or a token count (20)") from None
    if share is not None:
        if not 0 < share <= 1:  # NaN, inf, zero and negative shares too
            raise ValueError(f"budget {spec!r}: a share must be above 0 and at most 100%")
        k = max(1, round(share * n))
    if not 1 <= k <= n:
        raise ValueError(f"budget {spec!r} is {k} tokens, outside [1, {n}] (the model's image tokens)")
    return k


def load_test_set(n: int, scene: SceneConfig, split: str = "test") -> TestSet:
    """The first n questions of a split ("validation" to choose hyperparameters, "test" once per final choice)."""
    samples = [make_sample(seed, scene) for seed in tqdm(split_seeds(split, n), desc=f"{split} images", unit="image")]
    return TestSet([s.seed for s in samples], [Image.fromarray(s.image) for s in samples],
                   [s.question for s in samples], [s.answer for s in samples], np.array([s.family for s in samples]),
                   np.stack([s.mask.ravel() for s in samples]), np.stack([s.coverage.ravel() for s in samples]),
                   np.stack([s.points.ravel() for s in samples]))


def oracle_scores(mask: Bool[np.ndarray, "n N"], coverage: Float[np.ndarray, "n N"], points: Int[np.ndarray, "n N"]
                  ) -> Float[np.ndarray, "n N"]:
    """Scores whose top k are the evidence each answer needs, then other patches in a random order (fixed: row i
    is the same for any n > i): the asked object's patches, most covered first; for a row with `points` (a
    counting question), its counted objects' points, then the other objects' (`samples.object_points`)."""
    fill = np.random.default_rng(0).random(mask.shape)  # in [0, 1): below every evidence patch's score
    counting = points.any(1, keepdims=True)
    return np.where(counting, np.where(points > 0, 1 + points, fill), np.where(mask, 1 + coverage, fill)
                    ).astype(np.float32)


def object_recall(kept: Sequence[Sequence[int]], mask: Bool[np.ndarray, "n N"]) -> Float[np.ndarray, "n"]:
    """Share of each question's asked-object patches among its kept tokens (any number kept per question);
    NaN where none is asked about."""
    size = mask.sum(1)
    hits = np.array([mask[i, np.asarray(k, int)].sum() for i, k in enumerate(kept)])
    return np.where(size > 0, hits / np.maximum(size, 1), np.nan)


def _batches(rows: np.ndarray, batch: int) -> list[tuple[np.ndarray, int]]:
    """`rows` in batches of exactly `batch`, the last filled up by repeating rows: (batch rows, real rows)."""
    return [(rows[np.arange(start, start + batch) % len(rows)], min(batch, len(rows) - start))
            for start in range(0, len(rows), batch)]


class Clock:
    """Wall time of model calls, compilation excluded: a call of a shape not run before is run once untimed."""

    def __init__(self):
        self.warm, self.seconds = set(), 0.0

    def __call__(self, shape, fn):
        if shape not in self.warm:
            fn()
            self.warm.add(shape)
        t = time.perf_counter()
        out = fn()
        self.seconds += time.perf_counter() - t
        return out


def adaptive_tokens(pipe: Pipeline, test: TestSet, spec: MethodSpec, keep: int, *, batch: int, clock: Clock
                    ) -> Int[np.ndarray, "n"]:
    """Image tokens per question for an adaptive spec at budget `keep` (`Pipeline.adaptive_keep`)."""
    rows = np.arange(len(test))
    got = [clock(("adaptive", spec, keep), lambda b=b: pipe.adaptive_keep([test.images[i] for i in b], spec, keep))
           [:real] for b, real in _batches(rows, min(batch, len(test)))]
    return np.concatenate(got)


def evaluate_run(pipe: Pipeline, test: TestSet, spec: MethodSpec, budget: str, keep: int, *, seed: int = 0,
                 batch: int, max_new_tokens: int, bar: tqdm, clock: Clock | None = None) -> Run:
    """Answers every question of `test` with one method spec at one budget, `batch` questions per call; an
    adaptive spec answers each group of questions whose images chose the same budget together."""
    n, batch, clock = len(test), min(batch, len(test)), clock or Clock()
    start = clock.seconds
    tokens = (adaptive_tokens(pipe, test, spec, keep, batch=batch, clock=clock) if spec.adaptive is not None
              else np.full(n, keep))
    fixed = spec.fixed() if spec.adaptive is not None else spec
    scores = oracle_scores(test.mask, test.coverage, test.points) if spec.method == ORACLE else None
    texts, kept, stopped = np.empty(n, object), [None] * n, np.zeros(n, bool)
    eos = pipe.tokenizer.eos_token_id
    groups = [g for k in np.unique(tokens) for g in _batches(np.flatnonzero(tokens == k), batch)]
    for b, (rows, real) in enumerate(groups):
        k = int(tokens[rows[0]])
        select = dict(method=GIVEN, scores=scores[rows]) if scores is not None else dict(method=fixed.text)
        answers, _ = clock((fixed, k), lambda: pipe.answer(
            [test.images[i] for i in rows], [test.questions[i] for i in rows], **select,
            keep=None if spec.method == FULL else k, max_new_tokens=max_new_tokens,
            key=jax.random.fold_in(jax.random.key(seed), b)))
        for i, a in zip(rows[:real], answers[:real]):
            texts[i], kept[i], stopped[i] = a.text, a.kept_indices, bool(a.token_ids) and a.token_ids[-1] == eos
        bar.update(real)
    return make_run(test, spec, budget, keep, seed, texts.tolist(), stopped.tolist(), tokens,
                    kept if spec.method in RECALLED else None, (clock.seconds - start) / n)


def make_run(test: TestSet, spec: MethodSpec, budget: str, keep: int, seed: int, texts: Sequence[str],
             stopped: Sequence[bool], tokens: Sequence[int], kept: list[list[int]] | None, seconds: float) -> Run:
    """A Run from what the model gave (fresh, or read back from `RESULTS`): scores derived from the test set."""
    correct = np.array([t == a for t, a in zip(texts, test.answers)], bool)
    return Run(spec, budget, keep, seed, correct, np.asarray(tokens), kept,
               None if kept is None else object_recall(kept, test.mask), seconds,
               well_formed(texts, stopped, test.families), tuple(texts), tuple(map(bool, stopped)))


def run_record(run: Run) -> dict:
    """One line of `RESULTS`: everything a resumed sweep needs to rebuild the run (`read_runs`)."""
    return dict(method=run.method, budget=run.budget, keep=run.keep, seed=run.seed, texts=list(run.texts),
                stopped=list(run.stopped), tokens=run.tokens.tolist(), kept=run.kept, seconds=run.seconds)


def read_runs(path: Path, test: TestSet) -> dict[tuple[str, str, int], Run]:
    """Finished runs by (method spec, budget, seed), in file order. A last line without its newline (a crash
    mid-write) is ignored; any other malformed line raises ValueError naming file and line."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    runs = {}
    for number, line in enumerate(raw[:raw.rfind(b"\n") + 1].decode().split("\n")[:-1], 1):
        try:
            rec = json.loads(line)
            spec = parse(rec["method"], (*METHODS, FULL))
            texts, stopped, tokens, kept = rec["texts"], rec["stopped"], rec["tokens"], rec["kept"]
            if not len(texts) == len(stopped) == len(tokens) == len(test):
                raise ValueError(f"{len(texts)} answers for {len(test)} questions")
            run = make_run(test, spec, str(rec["budget"]), int(rec["keep"]), int(rec["seed"]), texts, stopped,
                           tokens, kept, float(rec["seconds"]))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path}:{number}: not a run of this sweep ({e}); use another --out") from None
        runs[run.method, run.budget, run.seed] = run
    return runs


def check(pipe: Pipeline, methods: Sequence[str], budgets: Sequence[str]) -> tuple[list[MethodSpec], dict[str, int]]:
    """The parsed method specs and the tokens kept per budget, after checking every spec at every budget
    against the model (before any work)."""
    specs = parse_list(methods, METHODS)
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets {list(budgets)}: each once")
    keeps = {b: budget_tokens(b, pipe.num_image_tokens) for b in budgets}
    for spec in specs:
        for k in keeps.values():
            if spec.method != ORACLE:
                pipe.budget(spec, k)
    return specs, keeps


def sweep(pipe: Pipeline, test: TestSet, methods: Sequence[str], budgets: Sequence[str], *, seeds: int = SEEDS,
          batch: int = 50, max_new_tokens: int = 3, done: dict | None = None, record=None) -> list[Run]:
    """The unpruned model, then every method spec at every budget (`random` once per seed). done: finished runs
    by (method spec, budget, seed), reused instead of answered again; record(run): called on each new run."""
    n_tokens = pipe.num_image_tokens
    if n_tokens != test.mask.shape[1]:
        raise ValueError(f"the model reads {n_tokens} image tokens per image, the scenes have {test.mask.shape[1]} "
                         "patches (only the 'default' feature strategy, patches without CLS, is supported)")
    if seeds < 1 or batch < 1 or max_new_tokens < 1:
        raise ValueError(f"seeds {seeds}, batch {batch} and max_new_tokens {max_new_tokens} must be >= 1")
    specs, keeps = check(pipe, methods, budgets)
    jobs = [(parse(FULL, [FULL]), "all", n_tokens, 0)] + [
        (spec, b, k, s) for b, k in keeps.items() for spec in specs for s in range(seeds if spec.method == "random" else 1)]
    clock = Clock()
    with tqdm(total=len(jobs) * len(test), unit="answer", desc="synthetic") as bar:
        runs = []
        for spec, b, keep, seed in jobs:
            finished = (done or {}).get((spec.text, b, seed))
            if finished is not None and finished.keep == keep:
                runs.append(finished)
                bar.update(len(test))
                continue
            bar.set_postfix_str(f"{spec} {b}" + (f" seed {seed}" if spec.method == "random" else ""))
            runs.append(evaluate_run(pipe, test, spec, b, keep, seed=seed, batch=batch,
                                     max_new_tokens=max_new_tokens, bar=bar, clock=clock))
            if record is not None:
                record(runs[-1])
    return runs


def summarize(runs: Sequence[Run], families: np.ndarray, *, resamples: int = RESAMPLES) -> list[dict]:
    """One row per method spec x budget: accuracy (%) with its bootstrap interval, well-formed answers (%), object recall (means over
    seeds, with their sample standard deviation), mean kept tokens, ms per question, accuracy per family with
    its interval, and for `svd` specs the McNemar p-value against the best other non-oracle method."""
    rows = []
    for key in dict.fromkeys((r.method, r.budget) for r in runs):
        group = [r for r in runs if (r.method, r.budget) == key]
        first = group[0]
        correct = np.stack([r.correct for r in group])
        acc = 100 * correct.mean(1)
        low, high = bootstrap_ci(correct, resamples=resamples)
        row = dict(method=first.method, budget=first.budget, keep=first.keep, adaptive=first.spec.adaptive,
                   mean_keep=float(np.mean([r.tokens.mean() for r in group])), seeds=len(group),
                   accuracy=acc.mean(), accuracy_std=_std(acc), ci_low=low, ci_high=high,
                   well_formed=None, well_formed_std=None, recall=None,
                   recall_std=None, ms_per_question=1e3 * float(np.mean([r.seconds for r in group])),
                   mcnemar_vs=None, mcnemar_p=None)
        if first.well_formed is not None:
            formed = np.array([100 * r.well_formed.mean() for r in group])
            row.update(well_formed=formed.mean(), well_formed_std=_std(formed))
        if first.recall is not None:
            rec = np.array([np.nanmean(r.recall) for r in group])
            row.update(recall=rec.mean(), recall_std=_std(rec))
        for f in FAMILIES:  # None for a family with no question among the n
            asked = families == f
            row[f"accuracy_{f}"] = 100 * correct[:, asked].mean() if asked.any() else None
            row[f"accuracy_{f}_ci_low"], row[f"accuracy_{f}_ci_high"] = (
                bootstrap_ci(correct[:, asked], resamples=resamples) if asked.any() else (None, None))
        rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
    _mcnemar(rows, runs)
    return rows


def _mcnemar(rows: list[dict], runs: Sequence[Run]) -> None:
    """Fills mcnemar_vs / mcnemar_p of every svd row: against the most accurate row at its budget that is neither
    svd nor oracle (nor the unpruned model), paired on seed 0's answers."""
    family = {r.method: r.spec.method for r in runs}
    answers = {(r.method, r.budget): r.correct for r in runs if r.seed == 0}
    for budget in dict.fromkeys(r["budget"] for r in rows):
        here = [r for r in rows if r["budget"] == budget]
        others = [r for r in here if family[r["method"]] not in ("svd", ORACLE, FULL)]
        if not others:
            continue
        best = max(others, key=lambda r: r["accuracy"])
        for r in here:
            if family[r["method"]] == "svd":
                r["mcnemar_vs"] = best["method"]
                r["mcnemar_p"] = mcnemar_exact(answers[r["method"], budget], answers[best["method"], budget])


def _std(values: np.ndarray) -> float:
    """Sample standard deviation over seeds; 0 for one seed."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _cell(row: dict, key: str, digits: int) -> str:
    """mean, ±std over seeds when there are several, [interval] when the row has one."""
    if row[key] is None:
        return "-"
    text = f"{row[key]:.{digits}f}" + (f"±{row[key + '_std']:.{digits}f}" if row["seeds"] > 1 else "")
    return text + (f" [{row['ci_low']:.{digits}f},{row['ci_high']:.{digits}f}]" if key == "accuracy" else "")


def _align(lines: list[list[str]], left: int) -> str:
    """Columns padded to their widest cell: the first `left` flush left, the rest flush right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def format_table(rows: Sequence[dict], key: str = "accuracy", title: str = "accuracy % [95% CI]",
                 cell=None) -> str:
    """Method specs down, budgets across (kept tokens in brackets); random as mean±std over seeds."""
    digits = 1 if key in ("accuracy", "well_formed") else 2
    cell = cell or (lambda r: _cell(r, key, digits))
    budgets = list(dict.fromkeys((r["budget"], r["keep"]) for r in rows if r["method"] != FULL))
    cells = {(r["method"], r["budget"]): cell(r) for r in rows}
    lines = [[title] + [f"{b} ({k})" for b, k in budgets]]
    lines += [[f"{FULL} ({r['keep']})", cell(r)] + [""] * (len(budgets) - 1) for r in rows if r["method"] == FULL]
    lines += [[m] + [cells.get((m, b), "") for b, _ in budgets]
              for m in dict.fromkeys(r["method"] for r in rows if r["method"] != FULL)]
    return _align(lines, 1)


def cost_cell(row: dict) -> str:
    return f"{row['mean_keep']:.1f} tok {row['ms_per_question']:.1f} ms"


def mcnemar_lines(rows: Sequence[dict]) -> str:
    """One line per svd spec x budget: the paired test against the best other method."""
    return "\n".join(f"{r['budget']:>8}  {r['method']} vs {r['mcnemar_vs']}: p = {r['mcnemar_p']:.3g}"
                     for r in rows if r["mcnemar_p"] is not None) or "(no svd spec and other method to compare)"


def family_table(rows: Sequence[dict], budget: str) -> str:
    """Accuracy per question family at one budget, and unpruned."""
    cell = lambda v: "-" if v is None else f"{v:.1f}"
    lines = [["method", "budget", *FAMILIES]]
    lines += [[r["method"], r["budget"], *(cell(r[f"accuracy_{f}"]) for f in FAMILIES)]
              for r in rows if r["budget"] in (budget, "all")]
    return _align(lines, 2)


def write_outputs(rows: Sequence[dict], runs: Sequence[Run], test: TestSet, out: Path, meta: dict,
                  image_size: int, patch_size: int) -> None:
    """out/synthetic.csv (one row per method x budget), out/synthetic.json (meta, rows, per-seed runs),
    out/synthetic.png (accuracy vs mean kept tokens, 95% intervals) and out/kept_tokens.png (kept tokens of every
    selector on the first test images at the smallest budget)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "synthetic.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    per_seed = [dict(method=r.method, budget=r.budget, keep=r.keep, seed=r.seed, accuracy=100 * float(r.correct.mean()),
                     well_formed=None if r.well_formed is None else 100 * float(r.well_formed.mean()),
                     recall=None if r.recall is None else float(np.nanmean(r.recall)),
                     mean_keep=float(r.tokens.mean()), ms_per_question=1e3 * r.seconds) for r in runs]
    (out / "synthetic.json").write_text(json.dumps(dict(meta, rows=list(rows), runs=per_seed), indent=1))
    accuracy_plot(rows, out / "synthetic.png", f"synthetic {meta['split']} split, n={meta['n']} (95% bootstrap CI)",
                  x="mean_keep")
    smallest = min((r for r in runs if r.kept is not None), key=lambda r: r.keep, default=None)
    if smallest is not None:
        shown = [r for r in runs if r.budget == smallest.budget and r.kept is not None and r.seed == 0]
        images = test.images[:GRID_IMAGES]
        kept_grid(images, {r.method: r.kept[:len(images)] for r in shown}, image_size, patch_size,
                  f"kept tokens at budget {smallest.budget}").save(out / "kept_tokens.png")


def run(model_dir: Path, out: Path, *, n: int = 500, methods: Sequence[str] = METHODS,
        budgets: Sequence[str] = BUDGETS, seeds: int = SEEDS, batch: int = 50, max_new_tokens: int = 3,
        resamples: int = RESAMPLES, split: str = "test", mesh: Mesh | None = None) -> list[dict]:
    """The whole evaluation: sweep, tables printed, outputs written (see `write_outputs`); returns the rows.
    Resumable: each finished (method spec, budget, seed) is appended to out/`RESULTS` the moment it exists, and a
    rerun into the same `out` (same model, split, n, batch and decoding: out/settings.json) answers only what is
    missing. The tables and files hold every run recorded there, earlier invocations' other methods and budgets
    included. mesh: run sharded (batches split over its data axis, across processes when it spans several: each
    answers its own rows, the answers are gathered, process 0 alone prints and writes)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"n {n} and resamples {resamples} must be >= 1")
    if seeds < 1 or batch < 1 or max_new_tokens < 1:
        raise ValueError(f"seeds {seeds}, batch {batch} and max_new_tokens {max_new_tokens} must be >= 1")
    if mesh is not None:
        sharding.check_batch(min(batch, n), mesh)
    # before the model loads; `sweep` would refuse it later by a token-count mismatch, naming the wrong cause
    if isinstance(read_config(model_dir), LlavaNextConfig):
        raise ValueError("eval synthetic takes LLaVA-1.5 models only: its questions' object masks, oracle, recall "
                         "and kept-token grid are patches of one square view, and LLaVA-NeXT reads several views of "
                         "each image (eval gqa / textvqa run it)")
    out, write = Path(out), jax.process_index() == 0
    settings = dict(model=str(Path(model_dir).resolve()), weights=weights_fingerprint(model_dir), split=split, n=n,
                    batch=batch, max_new_tokens=max_new_tokens, oracle=ORACLE_EVIDENCE)
    if write:  # before any work: an unusable --out, or one holding answers of other settings, is refused
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, settings)
    pipe = Pipeline.load(model_dir, mesh=mesh)
    _, keeps = check(pipe, methods, budgets)  # before the test images are drawn
    vision = pipe.config.vision
    test = load_test_set(n, scene_config(vision), split)
    results = out / RESULTS
    done = read_runs(results, test)
    if write:
        drop_incomplete_tail(results)

    def record(r: Run) -> None:
        if write:
            with open(results, "a") as f:
                f.write(json.dumps(run_record(r)) + "\n")

    runs = sweep(pipe, test, methods, budgets, seeds=seeds, batch=batch, max_new_tokens=max_new_tokens,
                 done=done, record=record)
    asked = {(r.method, r.budget, r.seed) for r in runs}
    runs += [r for key, r in done.items() if key not in asked]  # earlier invocations' other runs
    rows = summarize(runs, test.families, resamples=resamples)
    keeps = {r.budget: r.keep for r in runs if r.method != FULL}
    meta = dict(model=str(model_dir), split=split, n=n, image_tokens=pipe.num_image_tokens,
                methods=list(dict.fromkeys(r.method for r in runs if r.method != FULL)),
                budgets=keeps, random_seeds=seeds, bootstrap=dict(resamples=resamples, level=0.95, seed=0),
                adaptive_buckets={b: list(svdprune_jax.budget_buckets(k)) for b, k in keeps.items()})
    if not write:
        return rows
    write_outputs(rows, runs, test, out, meta, vision.image_size, vision.patch_size)
    print(format_table(rows), format_table(rows, "well_formed", "well-formed answers % (one of the family's, then "
                                                               "EOS)"),
          format_table(rows, "recall", "object recall"),
          format_table(rows, title="mean kept tokens, ms per question", cell=cost_cell),
          "McNemar (exact, two-sided), svd specs vs the best other non-oracle method:\n" + mcnemar_lines(rows),
          family_table(rows, budgets[-1]),
          f"wrote {out}/synthetic.csv, synthetic.json, synthetic.png, kept_tokens.png ({RESULTS}: every answer)",
          sep="\n\n")
    return rows
