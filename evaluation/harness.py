"""Method x budget sweeps over a VQA dataset: one resumable JSONL of answers per run, then a summary table.

The model enters only as `predict(batch, method, budget) -> list[str]` (budget None = unpruned), so the harness is
tested without one. Every answer is flushed as one JSONL line {"qid", "prediction", "score", "seconds"} the moment
it exists; a rerun skips the question ids already in the file. The table recomputes scores from the predictions,
over the dataset's current samples only (lines for other ids, e.g. from a larger earlier run, are ignored).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from tqdm import tqdm

from svdprune_jax import names
from svdprune_jax.evaluation.vqa_data import Dataset, Sample
from svdprune_jax.evaluation.vqa_metrics import SCORES, pope_metrics

log = logging.getLogger(__name__)

Predict = Callable[[Sequence[Sample], str, int | None], list[str]]
SETTINGS = "settings.json"  # what the answers in an output directory were made with
BASELINE = (names.FULL, None)  # the unpruned model: every vision token kept
_METHOD_NAME = re.compile(r"[A-Za-z0-9_.:=-]+")  # method specs too (svdprune_jax.inference.methods: "svd:energy=0.9")


@dataclass(frozen=True)
class Row:
    method: str
    budget: int | None
    accuracy_pct: float
    seconds_per_sample: float
    count: int  # samples answered
    skipped: int  # bad entries the reader left out


def results_path(out_dir: Path, method: str, budget: int | None) -> Path:
    return Path(out_dir) / (f"{method}.jsonl" if budget is None else f"{method}_k{budget}.jsonl")


def read_results(path: Path) -> dict[str, dict]:
    """Finished answers by question id. A last line without its newline (a crash mid-write) is ignored; any other
    malformed or duplicated line raises ValueError naming file and line, since it is not a crash artefact."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        log.warning("%s: ignoring an incomplete last line (%d bytes) left by an interrupted write", path,
                    len(raw) - end)
    results = {}
    for n, line in enumerate(raw[:end].decode().split("\n")[:-1], 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON line ({e})") from e
        if not (isinstance(rec, dict) and isinstance(rec.get("qid"), str) and isinstance(rec.get("prediction"), str)
                and isinstance(rec.get("seconds"), (int, float))):
            raise ValueError(f"{path}:{n}: expected an object with str 'qid', str 'prediction', number 'seconds'")
        if rec["qid"] in results:
            raise ValueError(f"{path}:{n}: duplicate question id {rec['qid']!r}")
        results[rec["qid"]] = rec
    return results


def weights_fingerprint(model_dir: Path) -> str:
    """A hash of the names, sizes and modification times of a model directory's files: answers made before the
    model was retrained or re-exported in place are not taken for its own (hashing a 7B checkpoint's contents
    would take minutes at every resume)."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    stats = [(str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def check_settings(out_dir: Path, settings: dict) -> None:
    """A resumed run must answer as the finished answers in `out_dir` (its *.jsonl files) were: same data, model,
    prompt, decoding. The settings are recorded while `out_dir` holds no answer yet (a first run that failed
    before its first answer leaves nothing to protect), and compared once it holds some: ValueError naming every
    setting that changed."""
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS
    if any(p.stat().st_size for p in out_dir.glob("*.jsonl")):
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{out_dir} holds answers but no readable {SETTINGS} ({e}); use another --out") from None
        changed = sorted(k for k in settings.keys() | stored.keys() if stored.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out_dir} holds answers made with other settings ({', '.join(changed)}: "
                             f"{[stored.get(k) for k in changed]} there); use another --out")
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")


def drop_incomplete_tail(path: Path) -> None:
    """Cuts the file back to its last newline, so appended lines do not fuse with a half-written one."""
    if path.exists():
        raw = path.read_bytes()
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)


def run(dataset: Dataset, predict: Predict, method: str, budget: int | None, out_dir: Path, *,
        batch_size: int = 1, progress: bool = True, write: bool = True) -> None:
    """Answers every sample of `dataset` not yet in this run's JSONL, appending and flushing one line per answer.
    write False (every process but the first of a multi-host run, `out_dir` shared): the same batches, in step
    with the process that writes, nothing written."""
    path = results_path(out_dir, method, budget)
    done = read_results(path)
    pending = [s for s in dataset.samples if s.qid not in done]
    if write:
        drop_incomplete_tail(path)
    score = SCORES[dataset.name]
    desc = f"{dataset.name} {method}" + ("" if budget is None else f" k={budget}")
    sink = path if write else os.devnull
    with open(sink, "a") as f, tqdm(total=len(dataset.samples), initial=len(dataset.samples) - len(pending),
                                    unit="sample", desc=desc, disable=not progress) as bar:
        for i in range(0, len(pending), batch_size):
            batch = pending[i:i + batch_size]
            start = time.perf_counter()
            predictions = predict(batch, method, budget)
            seconds = (time.perf_counter() - start) / len(batch)
            if (not isinstance(predictions, list) or len(predictions) != len(batch)
                    or not all(isinstance(p, str) for p in predictions)):
                raise ValueError(f"predict must return a list of {len(batch)} strings, got {predictions!r}")
            for sample, prediction in zip(batch, predictions):
                line = dict(qid=sample.qid, prediction=prediction, score=score(prediction, sample.answers),
                            seconds=seconds)
                f.write(json.dumps(line) + "\n")
                f.flush()
            bar.update(len(batch))


def summarize(dataset: Dataset, runs: Sequence[tuple[str, int | None]], out_dir: Path) -> list[Row]:
    score = SCORES[dataset.name]
    rows = []
    for method, budget in runs:
        results = read_results(results_path(out_dir, method, budget))
        answered = [(s, results[s.qid]) for s in dataset.samples if s.qid in results]
        n = len(answered)
        accuracy = 100 * sum(score(r["prediction"], s.answers) for s, r in answered) / n if n else math.nan
        seconds = sum(r["seconds"] for _, r in answered) / n if n else math.nan
        rows.append(Row(method, budget, accuracy, seconds, n, len(dataset.skipped)))
    return rows


def split_metrics(dataset: Dataset, runs: Sequence[tuple[str, int | None]], out_dir: Path) -> list[dict]:
    """POPE: accuracy, precision, recall, F1 and yes-ratio (%) per (method, budget) and split, over the answered
    questions (`vqa_metrics.pope_metrics`), as LLaVA's eval_pope.py reports them."""
    rows = []
    for method, budget in runs:
        results = read_results(results_path(out_dir, method, budget))
        for split in sorted({s.category for s in dataset.samples}):
            answered = [(s, results[s.qid]) for s in dataset.samples if s.category == split and s.qid in results]
            metrics = pope_metrics([r["prediction"] for _, r in answered], [s.answers[0] for s, _ in answered])
            rows.append(dict(method=method, budget=_budget_label(budget), split=split, count=len(answered), **metrics))
    return rows


def _budget_label(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'method':<16}{'budget':>8}{'accuracy %':>12}{'s/sample':>10}{'count':>8}{'skipped':>9}"]
    for r in rows:
        lines.append(f"{r.method:<16}{_budget_label(r.budget):>8}{r.accuracy_pct:>12.2f}"
                     f"{r.seconds_per_sample:>10.4f}{r.count:>8}{r.skipped:>9}")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(field.name for field in fields(Row))
        writer.writerows((r.method, _budget_label(r.budget), *astuple(r)[2:]) for r in rows)


def _check_runs(runs: Sequence[tuple[str, int]]) -> None:
    for method, budget in runs:
        if not isinstance(method, str) or not _METHOD_NAME.fullmatch(method) or method == BASELINE[0]:
            raise ValueError(f"bad method name {method!r}: letters, digits, '_.:=-' only, and not {BASELINE[0]!r}")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"budget of {method!r} must be a positive int, got {budget!r}")
    if len(set(runs)) != len(runs):
        raise ValueError(f"duplicate (method, budget) pairs in {list(runs)}")


def evaluate(dataset: Dataset, predict: Predict, runs: Sequence[tuple[str, int]], out_dir: Path, *,
             batch_size: int = 1, progress: bool = True, write: bool = True) -> list[Row]:
    """Runs the unpruned baseline and every (method, budget), resuming from out_dir; prints the summary table and
    writes it to out_dir/summary.csv. write False: see `run`; no summary, returns []."""
    _check_runs(runs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not dataset.samples:
        raise ValueError(f"{dataset.name}: no samples to evaluate ({len(dataset.skipped)} skipped)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [BASELINE, *runs]
    for method, budget in runs:
        run(dataset, predict, method, budget, out_dir, batch_size=batch_size, progress=progress, write=write)
    if not write:
        return []
    rows = summarize(dataset, runs, out_dir)
    write_csv(rows, out_dir / "summary.csv")
    print(format_table(rows))
    return rows
