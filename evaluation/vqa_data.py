"""GQA and TextVQA readers, for the files as the benchmarks distribute them and as LLaVA's eval bundle has them.

Layouts under a data directory (`detect` tells them apart by their question file):
  gqa       official: testdev_balanced_questions.json  {qid: {"imageId", "question", "answer", "isBalanced", ...}},
                      images/{imageId}.jpg
            llava:    llava_gqa_testdev_balanced.jsonl  {"question_id", "image", "text"} per line, images/{image},
                      and testdev_balanced_questions.json for the answers (as GQA's eval.py reads them)
  textvqa   official: TextVQA_0.5.1_val.json  {"data": [{"question_id", "image_id", "question", "answers" (10),
                      optionally "ocr_tokens"}]}, train_images/{image_id}.jpg (the val images ship in the train_val
                      zip); OCR tokens from the entries or TextVQA_Rosetta_OCR_v0.2_val.json {"data": [{"image_id",
                      "ocr_tokens"}]} when present
            llava:    llava_textvqa_val_v051_ocr.jsonl (the text holds the OCR line), TextVQA_0.5.1_val.json for the
                      answers, train_images/{image}
  pope      llava:    llava_pope_test.jsonl  {"question_id", "image", "text", "category"} per line, val2014/{image},
                      coco/coco_pope_{adversarial,popular,random}.json (the yes/no labels, one line per question)
A sample keeps the question and its OCR tokens apart; `evaluation.protocol` builds the text the model reads.
Bad entries (missing or undecodable image, missing field, no answers, a text not in LLaVA's form) are logged with
their id and skipped, or raise under strict.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

from PIL import Image

from svdprune_jax.evaluation.protocol import parse_user_text

log = logging.getLogger(__name__)

GQA_QUESTIONS, TEXTVQA_ANNOTATIONS = "testdev_balanced_questions.json", "TextVQA_0.5.1_val.json"
ROSETTA_OCR = "TextVQA_Rosetta_OCR_v0.2_val.json"
LAYOUTS = {  # benchmark -> layout -> (question file, image folder)
    "gqa": {"official": (GQA_QUESTIONS, "images"), "llava": ("llava_gqa_testdev_balanced.jsonl", "images")},
    "textvqa": {"official": (TEXTVQA_ANNOTATIONS, "train_images"),
                "llava": ("llava_textvqa_val_v051_ocr.jsonl", "train_images")},
    "pope": {"llava": ("llava_pope_test.jsonl", "val2014")},
}
POPE_SPLITS = ("adversarial", "popular", "random")
POPE_LABELS = "coco"  # coco/coco_pope_{split}.json


@dataclasses.dataclass(frozen=True)
class Sample:
    qid: str
    image: Path
    question: str
    answers: tuple[str, ...]  # GQA: the one gold answer; TextVQA: the 10 human answers
    ocr: tuple[str, ...] | None = None  # TextVQA: the image's OCR tokens when the data has them
    category: str | None = None  # POPE: the split (adversarial, popular, random)


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


def _image(images: Path, file_name: str) -> Path:
    path = images / file_name
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
    once (GQA asks about each of its 398 testdev images ~30 times), so that a corrupt image is skipped like a
    missing one rather than aborting a run."""
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


def _gqa_answer(entry: dict) -> tuple[str, ...]:
    if entry.get("isBalanced") is False:  # GQA's eval.py scores balanced questions only
        raise _BadEntry("not a balanced question")
    return (_text(entry, "answer"),)


def _gqa_sample(qid: str, entry: dict, images: Path, ocr: dict) -> Sample:
    answers = _gqa_answer(entry)
    return Sample(qid, _image(images, _text(entry, "imageId") + ".jpg"), _text(entry, "question"), answers)


def _textvqa_qid(value) -> str | None:
    """Question ids are ints in the official file; str ones are accepted too."""
    ok = isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip()
    return str(value) if ok else None


def _textvqa_answers(entry: dict) -> tuple[str, ...]:
    if _textvqa_qid(entry.get("question_id")) is None:
        raise _BadEntry(f"missing or malformed 'question_id': {entry.get('question_id')!r}")
    answers = entry.get("answers")
    if not isinstance(answers, list) or not answers:
        raise _BadEntry(f"no answers: {answers!r}")
    if len(answers) != 10 or not all(isinstance(a, str) for a in answers):
        raise _BadEntry(f"expected 10 answer strings, got {answers!r}")
    return tuple(answers)


def _textvqa_sample(qid: str, entry: dict, images: Path, ocr: dict) -> Sample:
    answers = _textvqa_answers(entry)
    image_id = _text(entry, "image_id")
    tokens = entry.get("ocr_tokens", ocr.get(image_id))
    return Sample(qid, _image(images, image_id + ".jpg"), _text(entry, "question"), answers,
                  None if tokens is None else tuple(map(str, tokens)))


def _json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e


def _entries(name: str, path: Path):
    """Yields (qid, entry) of an official file in file order; a file whose top level is not the benchmark's
    format raises."""
    data = _json(path, f"{name} questions")
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


def _llava_entries(path: Path):
    """Yields (qid, entry) of a LLaVA question file (one JSON object per line); a line that is not one is
    named by its number."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read LLaVA question file {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        qid = _textvqa_qid(entry.get("question_id")) if isinstance(entry, dict) else None
        yield qid or f"line {n}", entry


def _llava_sample(answers: dict[str, tuple[str, ...]]):
    def make(qid: str, entry: dict, images: Path, ocr: dict) -> Sample:
        try:
            question, tokens = parse_user_text(_text(entry, "text"))
        except ValueError as e:
            raise _BadEntry(f"text {e}") from None
        if qid not in answers:
            raise _BadEntry("no answers for this question id")
        category = entry.get("category") if isinstance(entry.get("category"), str) else None
        return Sample(qid, _image(images, _text(entry, "image")), question, answers[qid], tokens, category)
    return make


def _pope_answers(labels: Path, questions: Path) -> dict[str, tuple[str, ...]]:
    """POPE labels by question id. LLaVA's eval_pope.py pairs each split's label lines, in order, with that
    split's questions in the question file's order; so do we, and refuse files whose counts differ."""
    order = {split: [] for split in POPE_SPLITS}
    for qid, entry in _llava_entries(questions):
        if isinstance(entry, dict) and entry.get("category") in order:
            order[entry["category"]].append(qid)
    table = {}
    for split, qids in order.items():
        if not qids:
            continue
        path = labels / f"coco_pope_{split}.json"
        try:
            values = [json.loads(line)["label"] for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read POPE labels {path}: {e}") from None
        if len(values) != len(qids) or not set(values) <= {"yes", "no"}:
            raise ValueError(f"{path}: {len(values)} yes/no labels expected for the {len(qids)} {split} questions of "
                             f"{questions.name}")
        table.update(zip(qids, ((v,) for v in values)))
    return table


def _answers(name: str, path: Path) -> dict[str, tuple[str, ...]]:
    """Gold answers by question id from an official file (entries without usable answers left out)."""
    table = {}
    for qid, entry in _entries(name, path):
        try:
            table[qid] = (_gqa_answer if name == "gqa" else _textvqa_answers)(entry) if isinstance(entry, dict) else None
        except _BadEntry:
            continue
    return {k: v for k, v in table.items() if v is not None}


def _rosetta_ocr(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        return {}
    data = _json(path, "TextVQA OCR tokens")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: Rosetta OCR must be a JSON object with a 'data' list")
    return {str(e["image_id"]): e.get("ocr_tokens") or [] for e in data["data"] if isinstance(e, dict) and "image_id" in e}


def read(name: str, questions: Path, images: Path, *, layout: str = "official", answers: Path | None = None,
         ocr: Path | None = None, strict: bool = False) -> Dataset:
    """Reads a benchmark's question file in `layout` ("official", or "llava" with the official `answers` file,
    for POPE the folder of its label files);
    `ocr`: TextVQA's Rosetta OCR file, if any. Bad entries are logged and skipped, or raise ValueError if strict."""
    if name not in LAYOUTS or layout not in LAYOUTS[name]:
        raise ValueError(f"unknown benchmark or layout {name!r}/{layout!r}; expected one of {sorted(LAYOUTS)}")
    if layout == "llava":
        if answers is None:
            raise ValueError(f"{name}: LLaVA's question file needs the official answers file beside it")
        table = _pope_answers(Path(answers), Path(questions)) if name == "pope" else _answers(name, Path(answers))
        entries, make = _llava_entries(Path(questions)), _llava_sample(table)
    else:
        entries, make = _entries(name, Path(questions)), _gqa_sample if name == "gqa" else _textvqa_sample
    tokens = _rosetta_ocr(Path(ocr)) if ocr is not None else {}
    samples, skipped, seen = [], [], set()
    for qid, entry in entries:
        try:
            if qid in seen:
                raise _BadEntry("duplicate question id")
            seen.add(qid)
            if not isinstance(entry, dict):
                raise _BadEntry("entry is not a JSON object")
            samples.append(make(qid, entry, Path(images), tokens))
        except _BadEntry as e:
            skipped.append((qid, str(e)))
    for qid, reason in skipped:
        log.warning("%s: skipping question %s: %s", name, qid, reason)
    if strict and skipped:
        listed = "; ".join(f"{qid}: {reason}" for qid, reason in skipped[:10]) + ("; ..." if len(skipped) > 10 else "")
        raise ValueError(f"{len(skipped)} bad {name} entries in {questions}: {listed}")
    return Dataset(name, tuple(samples), tuple(skipped))


def detect(name: str, data_dir: Path) -> str:
    """The layout of a data directory: "llava" where LLaVA's question file is (the official file may stand beside
    it for the answers), else "official"."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(LAYOUTS)}")
    for layout in sorted(LAYOUTS[name], key=lambda layout: layout != "llava"):
        questions = LAYOUTS[name][layout][0]
        if (Path(data_dir) / questions).is_file():
            return layout
    wanted = " or ".join(q for q, _ in LAYOUTS[name].values())
    raise ValueError(f"{name}: {data_dir} holds no question file ({wanted})")


def load(name: str, data_dir: Path, *, strict: bool = False) -> Dataset:
    """Reads a benchmark from whichever layout data_dir holds (see LAYOUTS, `detect`)."""
    layout = detect(name, data_dir)
    data_dir = Path(data_dir)
    questions, images = (data_dir / p for p in LAYOUTS[name][layout])
    if not images.is_dir():
        raise ValueError(f"{name}: image folder {images} not found")
    answers = data_dir / {"gqa": GQA_QUESTIONS, "textvqa": TEXTVQA_ANNOTATIONS, "pope": POPE_LABELS}[name]
    if layout == "llava" and not answers.exists():
        raise ValueError(f"{name}: {questions.name} needs the official {answers.name} beside it for the answers")
    ocr = data_dir / ROSETTA_OCR if name == "textvqa" and layout == "official" else None
    return read(name, questions, images, layout=layout, answers=answers if layout == "llava" else None,
                ocr=ocr if ocr is not None and ocr.is_file() else None, strict=strict)
