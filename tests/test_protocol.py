"""LLaVA-1.5's evaluation protocol: fake GQA / TextVQA directories in the official layout and in LLaVA's eval-bundle
layout (non-square images, OCR tokens); the prompt text and pixel values our harness feeds the model are checked
against an independent implementation of LLaVA's loader (model_vqa_loader.py, vicuna_v1, image_aspect_ratio=pad)
written here in PIL + NumPy."""
import json

import numpy as np
import pytest
from PIL import Image

from svdprune_jax.cli.evaluate import vqa_predict
from svdprune_jax.evaluation import vqa_data
from svdprune_jax.evaluation.protocol import PROTOCOLS, Protocol, parse_user_text
from svdprune_jax.inference.pipeline import Pipeline
from tiny_bundled import tiny_model_dir

SUFFIX = "\nAnswer the question using a single word or phrase."


# ---- LLaVA's loader, independently: conversation vicuna_v1 (SeparatorStyle.TWO), expand2square, CLIP preprocess
def llava_prompt(text: str) -> str:
    system = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")
    messages, seps = [("USER", "<image>\n" + text), ("ASSISTANT", None)], (" ", "</s>")
    out = system + seps[0]
    for i, (role, message) in enumerate(messages):
        out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return out


def llava_pixels(path, mean, std, size) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    side = max(w, h)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = [int(m * 255) for m in mean]
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = np.asarray(image)
    resized = Image.fromarray(square).resize((size, size), Image.BICUBIC)  # square: shortest edge = crop
    x = np.asarray(resized, np.float64) / 255
    return ((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


# ---- fake data directories
def _image(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path)


GQA = [("201", "n1", (120, 60), "Is the ball red?", "yes"), ("105", "n2", (50, 90), "What color is the car?", "blue")]
TEXTVQA = [(34602, "003a", (130, 70), "what brand is the phone?", ["nokia", "phone"]),
           (34603, "003b", (64, 64), "what does the sign say?", [])]


def write_gqa(root, layout):
    for i, (qid, image_id, size, question, answer) in enumerate(GQA):
        _image(root / "images" / f"{image_id}.jpg", size, i)
    official = {qid: dict(imageId=image_id, question=question, answer=answer, isBalanced=True)
                for qid, image_id, _, question, answer in GQA}
    (root / "testdev_balanced_questions.json").write_text(json.dumps(official))
    if layout == "llava":
        lines = [dict(question_id=qid, image=f"{image_id}.jpg", text=question + SUFFIX, category="default")
                 for qid, image_id, _, question, _ in GQA]
        (root / "llava_gqa_testdev_balanced.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return root


def textvqa_text(question, ocr):
    return question + (f"\nReference OCR token: {', '.join(ocr)}" if ocr else "") + SUFFIX


def write_textvqa(root, layout):
    for i, (_, image_id, size, _, _) in enumerate(TEXTVQA):
        _image(root / "train_images" / f"{image_id}.jpg", size, 10 + i)
    data = [dict(question_id=qid, image_id=image_id, question=q, answers=["nokia"] * 10)
            for qid, image_id, _, q, _ in TEXTVQA]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(dict(data=data)))
    if layout == "llava":
        lines = [dict(question_id=qid, image=f"{image_id}.jpg", text=textvqa_text(q, ocr))
                 for qid, image_id, _, q, ocr in TEXTVQA]
        (root / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    else:
        rosetta = [dict(image_id=image_id, ocr_tokens=ocr) for _, image_id, _, _, ocr in TEXTVQA]
        (root / vqa_data.ROSETTA_OCR).write_text(json.dumps(dict(data=rosetta)))
    return root


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.load(tiny_model_dir(tmp_path_factory.mktemp("protocol") / "model"))


def fed(pipe, dataset, protocol):
    """(prompt texts, pixel values) the model receives for the dataset's samples under `protocol`: the pipeline's
    own pixel_values and prompt_ids, spied on (not replaced)."""
    seen = {}
    pixel_values, prompt_ids = pipe.pixel_values, pipe.prompt_ids

    def spy_pixels(images):
        seen["pixels"] = pixel_values(images)
        return seen["pixels"]

    def spy_prompt(question, template):
        seen.setdefault("prompts", []).append(template.format(question=question))
        return prompt_ids(question, template)

    pipe.pixel_values, pipe.prompt_ids = spy_pixels, spy_prompt
    try:
        vqa_predict(pipe, protocol, batch=len(dataset.samples), max_new_tokens=1, convert_rgb=True)(
            dataset.samples, "full", None)
    finally:
        del pipe.pixel_values, pipe.prompt_ids
    return seen["prompts"], seen["pixels"]


@pytest.mark.parametrize("layout", ["official", "llava"])
@pytest.mark.parametrize("name", ["gqa", "textvqa"])
def test_llava15_feeds_what_llavas_loader_feeds(pipe, tmp_path, name, layout):
    root = (write_gqa if name == "gqa" else write_textvqa)(tmp_path, layout)
    dataset = vqa_data.load(name, root)
    assert vqa_data.detect(name, root) == layout and len(dataset.samples) == 2
    prompts, pixels = fed(pipe, dataset, PROTOCOLS["llava15"])
    rows = GQA if name == "gqa" else TEXTVQA
    folder = "images" if name == "gqa" else "train_images"
    proc = pipe.processor
    for i, row in enumerate(rows):
        text = row[3] + SUFFIX if name == "gqa" else textvqa_text(row[3], row[4])
        assert prompts[i] == llava_prompt(text)
        assert prompts[i].count("Answer the question using a single word or phrase.") == 1
        want = llava_pixels(root / folder / f"{row[1]}.jpg", proc.image_mean, proc.image_std, proc.crop_size["height"])
        np.testing.assert_allclose(pixels[i], want, atol=1e-5)


def test_each_part_alone(pipe, tmp_path):
    """plain: the processor's centre crop of the unpadded image, no system line, no OCR line; each option adds
    its one part."""
    dataset = vqa_data.load("textvqa", write_textvqa(tmp_path, "llava"))
    plain = PROTOCOLS["plain"]
    prompts, pixels = fed(pipe, dataset, plain)
    assert prompts[0] == "USER: <image>\nwhat brand is the phone?" + SUFFIX + " ASSISTANT:"
    image = Image.open(tmp_path / "train_images" / "003a.jpg")
    np.testing.assert_allclose(pixels[0], pipe.pixel_values([image])[0], atol=1e-6)  # no padding
    prompts, _ = fed(pipe, dataset, Protocol(pad_square=False, system=False, ocr=True))
    assert prompts[0] == "USER: <image>\n" + textvqa_text("what brand is the phone?", ["nokia", "phone"]) + " ASSISTANT:"
    prompts, padded = fed(pipe, dataset, Protocol(pad_square=True, system=False, ocr=False))
    assert prompts[0] == "USER: <image>\nwhat brand is the phone?" + SUFFIX + " ASSISTANT:"
    assert np.abs(padded[0] - pixels[0]).max() > 0.5  # the wide image is padded, not cropped


def test_llava_text_is_parsed_back_to_its_parts():
    assert parse_user_text("what is it?\nReference OCR token: a, b c, d" + SUFFIX) == ("what is it?", ("a", "b c", "d"))
    assert parse_user_text("Is it red? " + SUFFIX) == ("Is it red? ", None)
    for bad in ("no instruction", "two\nlines" + SUFFIX):
        with pytest.raises(ValueError):
            parse_user_text(bad)


def test_bad_llava_lines_are_skipped_and_named(tmp_path, caplog):
    root = write_gqa(tmp_path, "llava")
    with open(root / "llava_gqa_testdev_balanced.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps(dict(question_id="999", image="n1.jpg", text="Q?" + SUFFIX)) + "\n")  # no answer
        f.write(json.dumps(dict(question_id="105", image="n2.jpg", text="dup" + SUFFIX)) + "\n")
        f.write(json.dumps(dict(question_id="7", image="n1.jpg", text="no suffix")) + "\n")
    ds = vqa_data.load("gqa", root)
    assert [s.qid for s in ds.samples] == ["201", "105"]
    reasons = dict(ds.skipped)
    assert set(reasons) == {"line 3", "999", "105", "7"}
    assert "no answers" in reasons["999"] and "duplicate" in reasons["105"] and "instruction" in reasons["7"]
    with pytest.raises(ValueError, match="4 bad gqa entries"):
        vqa_data.load("gqa", root, strict=True)


def test_llava_layout_needs_the_answers_file(tmp_path):
    root = write_gqa(tmp_path, "llava")
    (root / "testdev_balanced_questions.json").unlink()
    with pytest.raises(ValueError, match="needs the official testdev_balanced_questions.json"):
        vqa_data.load("gqa", root)
    with pytest.raises(ValueError, match="holds no question file"):
        vqa_data.load("textvqa", root)


# ---- POPE (LLaVA's eval bundle: llava_pope_test.jsonl, coco/coco_pope_{split}.json, val2014/)
POPE = [(1, "adversarial", "Is there a dog in the image?", "yes"), (2, "adversarial", "Is there a cat in the image?", "no"),
        (3, "popular", "Is there a car in the image?", "no"), (4, "random", "Is there a cup in the image?", "yes"),
        (5, "random", "Is there a bus in the image?", "no")]


def write_pope(root):
    for qid, *_ in POPE:
        _image(root / "val2014" / f"COCO_{qid}.jpg", (90, 60), qid)
    lines = [dict(question_id=qid, image=f"COCO_{qid}.jpg", text=q + SUFFIX, category=c) for qid, c, q, _ in POPE]
    (root / "llava_pope_test.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (root / "coco").mkdir()
    for split in ("adversarial", "popular", "random"):  # label ids restart per split, as in POPE's files
        labels = [dict(question_id=i, label=a) for i, (_, c, _, a) in enumerate((p for p in POPE if p[1] == split), 1)]
        (root / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(l) + "\n" for l in labels))
    return root


def test_pope_reader_pairs_each_splits_labels_in_order(tmp_path):
    ds = vqa_data.load("pope", write_pope(tmp_path))
    assert [(s.qid, s.category, s.question, s.answers) for s in ds.samples] == \
        [(str(qid), c, q, (a,)) for qid, c, q, a in POPE]
    labels = tmp_path / "coco" / "coco_pope_random.json"
    labels.write_text(labels.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="1 yes/no labels expected for the 2 random questions"):
        vqa_data.load("pope", tmp_path)


def test_pope_reading_and_metrics_hand_checked():
    from svdprune_jax.evaluation.vqa_metrics import normalize_pope, pope_metrics, pope_score
    cases = {"Yes": "yes", "No": "no", "no.": "no", "Yes, there is a dog.": "yes", "There is no dog": "no",
             "It is not": "no", "Yes, no doubt.": "no", "Yes. No.": "yes", "nope": "yes", "NO": "yes"}
    assert {p: normalize_pope(p) for p in cases} == cases  # eval_pope.py's reading, quirks included
    assert pope_score("No, it is not.", ["no"]) == 1.0 and pope_score("Yes", ["no"]) == 0.0
    # 6 answers: TP 2 (yes/yes), FP 1, FN 1, TN 2 -> precision 2/3, recall 2/3, F1 2/3, accuracy 4/6, yes 3/6
    m = pope_metrics(["Yes", "yes", "Yes", "No", "no", "No"], ["yes", "yes", "no", "yes", "no", "no"])
    assert m == pytest.approx(dict(accuracy=400 / 6, precision=200 / 3, recall=200 / 3, f1=200 / 3, yes_ratio=50.0))


def test_eval_pope_writes_the_per_split_table(tmp_path, pipe, capsys):
    import csv

    from svdprune_jax.cli import evaluate
    from svdprune_jax.evaluation.harness import read_results, results_path
    data, out = write_pope(tmp_path / "pope"), tmp_path / "out"
    model = tmp_path / "model"
    tiny_model_dir(model)
    evaluate.main(["pope", "--data", str(data), "--model", str(model), "--methods", "svd", "--keep", "5",
                   "--out", str(out), "--batch", "2", "--max-new-tokens", "2"])
    rows = list(csv.DictReader(open(out / "pope.csv")))
    assert [(r["method"], r["budget"], r["split"], r["count"]) for r in rows] == [
        (m, b, s, str(n)) for m, b in (("full", "all"), ("svd", "5"))
        for s, n in (("adversarial", 2), ("popular", 1), ("random", 2))]
    for r in rows:  # the table from the saved predictions, recomputed here
        preds = read_results(results_path(out, r["method"], None if r["budget"] == "all" else int(r["budget"])))
        mine = [(("no" if {"No", "no", "not"} & set(preds[str(q)]["prediction"].split(".")[0].replace(",", "").split(" "))
                  else "yes"), a) for q, c, _, a in POPE if c == r["split"]]
        assert float(r["accuracy"]) == pytest.approx(100 * np.mean([p == a for p, a in mine]))
        assert float(r["yes_ratio"]) == pytest.approx(100 * np.mean([p == "yes" for p, _ in mine]))
    assert "f1" in capsys.readouterr().out
