"""GQA and TextVQA readers for the files as the benchmarks distribute them, and LLaVA-1.5's evaluation prompt.

Layouts under a data directory (as unpacked from the official downloads):
  gqa:      testdev_balanced_questions.json  {qid: {"imageId", "question", "answer", "isBalanced", ...}},
            images/{imageId}.jpg
  textvqa:  TextVQA_0.5.1_val.json  {"data": [{"question_id", "image_id", "question", "answers" (10), ...}]},
            train_images/{image_id}.jpg  (the val images ship in the train_val zip)
Bad entries (missing or undecodable image, missing field, no answers) are logged with their id and skipped, or raise under strict.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
LAYOUTS = {
    "gqa": ("testdev_balanced_questions.json", "images"),
    "textvqa": ("TextVQA_0.5.1_val.json", "train_images"),
}


@dataclasses.dataclass(frozen=True)
class Sample:
    qid: str
    image: Path
    question: str
    answers: tuple[str, ...]  # GQA: the one gold answer; TextVQA: the 10 human answers

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str  # a key of LAYOUTS (and of vqa_metrics.SCORES)
    samples: tuple[Sample, ...]
    skipped: tuple[tuple[str, str], ...]  # (id, reason) of every entry left out


class _BadEntry(ValueError):
    pass


def _text(entry: dict, key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _BadEntry(f"missing or empty {key!r}: {value!r}")
    return value


def _image(images: Path, image_id: str) -> Path:
    path = images / f"{image_id}.jpg"
    if not path.is_file():
        raise _BadEntry(f"missing image file {path}")
    stat = path.stat()
    problem = _unreadable(path, stat.st_mtime_ns, stat.st_size)
    if problem:
        raise _BadEntry(f"unreadable image file {path}: {problem}")
    return path


@functools.lru_cache(maxsize=None)
def _unreadable(path: Path, mtime_ns: int, size: int) -> str | None:
    """Why an image file cannot be decoded, or None. Each version of a file (its mtime and size) is decoded
    once (GQA asks about each of its 398 testdev images ~30 times), so that a corrupt image is skipped like a missing one rather than aborting a run."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__
    return None


def fingerprint(path: Path) -> str:
    """sha256 of a file: what identifies a question file whatever its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gqa_sample(qid: str, entry: dict, images: Path) -> Sample:
    if entry.get("isBalanced") is False:  # GQA's eval.py scores balanced questions only
        raise _BadEntry("not a balanced question")
    answer = _text(entry, "answer")
    return Sample(qid, _image(images, _text(entry, "imageId")), _text(entry, "question"), (answer,))


def _textvqa_qid(value) -> str | None:
    """Question ids are ints in the official file; str ones are accepted too."""
    ok = isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip()
    return str(value) if ok else None


def _textvqa_sample(qid: str, entry: dict, images: Path) -> Sample:
    if _textvqa_qid(entry.get("question_id")) is None:
        raise _BadEntry(f"missing or malformed 'question_id': {entry.get('question_id')!r}")
    answers = entry.get("answers")
    if not isinstance(answers, list) or not answers:
        raise _BadEntry(f"no answers: {answers!r}")
    if len(answers) != 10 or not all(isinstance(a, str) for a in answers):
        raise _BadEntry(f"expected 10 answer strings, got {answers!r}")
    return Sample(qid, _image(images, _text(entry, "image_id")), _text(entry, "question"), tuple(answers))


def _entries(name: str, path: Path):
    """Yields (qid, entry) in file order; a file whose top level is not the benchmark's format raises."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {name} questions {path}: {e}") from e
    if name == "gqa":
        if not isinstance(data, dict):
            raise ValueError(f"{path}: GQA questions must be a JSON object of question id -> question")
        yield from data.items()
        return
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: TextVQA annotations must be a JSON object with a 'data' list")
    for i, entry in enumerate(data["data"]):
        # an entry without a usable question id is named by its position
        yield _textvqa_qid(entry.get("question_id") if isinstance(entry, dict) else None) or f"data[{i}]", entry


def read(name: str, questions: Path, images: Path, *, strict: bool = False) -> Dataset:
    """Reads a benchmark's question file; bad entries are logged and skipped, or raise ValueError if strict."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(LAYOUTS)}")
    make = _gqa_sample if name == "gqa" else _textvqa_sample
    samples, skipped, seen = [], [], set()
    for qid, entry in _entries(name, Path(questions)):
        try:
            if qid in seen:
                raise _BadEntry("duplicate question id")
            seen.add(qid)
            if not isinstance(entry, dict):
                raise _BadEntry("entry is not a JSON object")
            samples.append(make(qid, entry, Path(images)))
        except _BadEntry as e:
            skipped.append((qid, str(e)))
    for qid, reason in skipped:
        log.warning("%s: skipping question %s: %s", name, qid, reason)
    if strict and skipped:
        listed = "; ".join(f"{qid}: {reason}" for qid, reason in skipped[:10]) + ("; ..." if len(skipped) > 10 else "")
        raise ValueError(f"{len(skipped)} bad {name} entries in {questions}: {listed}")
    return Dataset(name, tuple(samples), tuple(skipped))


def load(name: str, data_dir: Path, *, strict: bool = False) -> Dataset:
    """Reads a benchmark from its standard layout under data_dir (see LAYOUTS)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(LAYOUTS)}")
    questions, images = (Path(data_dir) / p for p in LAYOUTS[name])
    if not images.is_dir():
        raise ValueError(f"{name}: image folder {images} not found")
    return read(name, questions, images, strict=strict)
