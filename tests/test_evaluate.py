"""`svdprune-jax eval synthetic|gqa|textvqa` end to end, and the pieces it adds: object recall, the oracle,
random over seeds, batch filling, RGB conversion, resume. The synthetic sweep runs on a tiny random model; GQA
and TextVQA run on fixtures in their official formats with the bundled model, whose answers are mostly right.

Every model run uses batch 4, 3 new tokens and budgets 50 / 3 image tokens, so the runs share their compiled
programs (each method x budget compiles once per test session)."""
import csv
import json
import logging
import os
import shutil
import types

import numpy as np
import pytest
from PIL import Image

from svdprune_jax.synthetic import benchmark as eval_synthetic
from svdprune_jax.cli import evaluate
from svdprune_jax.cli import main as cli
from svdprune_jax.synthetic.bundled import MODEL_DIR, SCENES
from svdprune_jax.evaluation.harness import read_results, results_path
from svdprune_jax.inference.methods import parse
from svdprune_jax.evaluation.stats import mcnemar_exact
from svdprune_jax.inference.pipeline import GIVEN, Answer, Pipeline
from svdprune_jax.synthetic.samples import FAMILIES, make_sample, split_seeds
from svdprune_jax import budget_buckets
from tiny_bundled import tiny_model_dir

SCENE = SCENES["tiny"]  # 80 px, patch 8: 100 image tokens
BUNDLED = SCENES["bundled"]  # 112 px, patch 8: 196 image tokens
RUN = ["--batch", "4", "--max-new-tokens", "3"]
# the bundled model's training prompt: the question alone in its conversation, the image as the processor crops it
CHAT = ["--protocol", "plain", "--no-instruction", "--prompt-template", "USER: <image>\n{question} ASSISTANT:"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("eval") / "model")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- recall, oracle, budgets: hand-checked cases

def test_object_recall_hand_checked():
    mask = np.array([[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], bool)
    kept = np.array([[0, 2, 4], [0, 1, 2], [1, 3, 5]])
    np.testing.assert_array_equal(eval_synthetic.object_recall(kept, mask), [2 / 3, np.nan, 1.0])
    # adaptive budgets: a different number kept per question
    np.testing.assert_array_equal(eval_synthetic.object_recall([[0], [0, 1, 2, 3], [1, 5]], mask), [1 / 3, np.nan, 0])


def test_oracle_keeps_the_object_first_most_covered_first():
    mask = np.array([[0, 1, 1, 0, 1, 0]], bool)
    coverage = np.array([[0.1, 0.5, 0.9, 0.2, 0.3, 0.0]], np.float32)  # 0.1 and 0.2: below MIN_COVERAGE
    none = np.zeros(mask.shape, np.int8)
    order = np.argsort(-eval_synthetic.oracle_scores(mask, coverage, none)[0], kind="stable")
    assert order[:3].tolist() == [2, 1, 4]
    # the rest in a fixed random order, the same row whatever the number of questions
    many = eval_synthetic.oracle_scores(*(np.repeat(a, 5, 0) for a in (mask, coverage, none)))
    np.testing.assert_array_equal(many[0], eval_synthetic.oracle_scores(mask, coverage, none)[0])


def test_oracle_keeps_one_point_per_object_on_counting_questions():
    # row 0 a counting question (points), row 1 not: the mask is ignored where a row has points
    mask = np.array([[1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]], bool)
    coverage = np.where(mask, 0.9, 0.0).astype(np.float32)
    points = np.array([[0, 2, 0, 1, 2, 0], [0, 0, 0, 0, 0, 0]], np.int8)
    order = np.argsort(-eval_synthetic.oracle_scores(mask, coverage, points), axis=1, kind="stable")
    assert sorted(order[0, :2]) == [1, 4] and order[0, 2] == 3  # counted objects' points, then the others'
    assert sorted(order[1, :2]) == [1, 2]


@pytest.mark.parametrize("spec, k", [("100%", 100), ("50%", 50), ("25%", 25), ("64/576", 11), ("16/576", 3),
                                     ("7", 7)])
def test_budget_tokens(spec, k):
    assert eval_synthetic.budget_tokens(spec, 100) == k


@pytest.mark.parametrize("spec, message", [("0", "outside"), ("101", "outside"), ("150%", "at most 100%"),
                                           ("inf%", "at most 100%"), ("0%", "above 0"), ("-50%", "above 0"),
                                           ("1/0", "expected a share"), ("half", "expected a share")])
def test_budget_tokens_bad(spec, message):
    with pytest.raises(ValueError, match=message):
        eval_synthetic.budget_tokens(spec, 100)


def test_validation_split_for_choosing_hyperparameters():
    val = eval_synthetic.load_test_set(3, SCENE, "validation")
    assert val.seeds == split_seeds("validation", 3) and not set(val.seeds) & set(split_seeds("test", 3))


# ---- the sweep's bookkeeping, without a model

class FakePipe:
    """Answers right except on the count family ("wrong": not a count, so not well-formed either), each answer
    one token and EOS; keeps the first k tokens (oracle: the top k scores). Adaptive specs: the i-th test image
    keeps budget_buckets(keep)[i % 3]."""
    num_image_tokens = SCENE.num_patches
    tokenizer = types.SimpleNamespace(eos_token_id=2)

    def __init__(self, test):
        self.gold = {id(im): (a, f) for im, a, f in zip(test.images, test.answers, test.families)}
        self.index = {id(im): i for i, im in enumerate(test.images)}
        self.batches, self.methods, self.keeps = [], [], []

    def budget(self, spec, keep):
        return keep

    def adaptive_keep(self, images, spec, keep):
        buckets = budget_buckets(keep)
        return np.array([buckets[self.index[id(im)] % 3] for im in images])

    def answer(self, images, questions, *, method, keep, max_new_tokens, key, scores=None):
        self.batches.append(len(images))
        self.methods.append(method)
        self.keeps.append(keep)
        k = self.num_image_tokens if keep is None else keep
        order = np.arange(self.num_image_tokens) if scores is None else np.argsort(-scores, axis=1, kind="stable")
        kept = np.broadcast_to(order, (len(images), self.num_image_tokens))[:, :k]
        return [Answer("wrong" if self.gold[id(im)][1] == "count" else self.gold[id(im)][0], [9, 2], [],
                       None if method in ("full", "fastv") else sorted(kept[i].tolist()))
                for i, im in enumerate(images)], {}


def test_sweep_bookkeeping():
    test = eval_synthetic.load_test_set(11, SCENE)
    pipe = FakePipe(test)
    runs = eval_synthetic.sweep(pipe, test, ["random", "fastv", "oracle"], ["50%", "3"], seeds=3, batch=4)
    assert set(pipe.batches) == {4}  # 11 questions: the last batch filled up to 4
    # 3 batches per run, and each compiled shape once more untimed first (random: one shape for its seeds)
    assert pipe.methods.count("given") == 2 * (3 + 1) and "oracle" not in pipe.methods
    assert pipe.methods.count("random") == 2 * (3 * 3 + 1)
    rows = eval_synthetic.summarize(runs, test.families)
    assert [(r["method"], r["budget"], r["keep"], r["seeds"]) for r in rows] == [
        ("full", "all", 100, 1), ("random", "50%", 50, 3), ("fastv", "50%", 50, 1), ("oracle", "50%", 50, 1),
        ("random", "3", 3, 3), ("fastv", "3", 3, 1), ("oracle", "3", 3, 1)]
    wrong = np.mean(test.families == "count")
    for r in rows:  # every answer of the 11 counted once: the filled-up rows are dropped
        assert r["accuracy"] == pytest.approx(100 * (1 - wrong)) and r["accuracy_std"] == 0
        assert r["accuracy_count"] == 0 and r["accuracy_colour"] == 100
        assert r["well_formed"] == pytest.approx(100 * (1 - wrong))  # "wrong" is no count answer
    first = np.arange(100) < 50  # FakePipe keeps patches 0..49 for every method but the oracle
    asked = test.mask.any(1)
    assert rows[1]["recall"] == pytest.approx(np.mean((test.mask & first).sum(1)[asked] / test.mask.sum(1)[asked]))
    assert rows[2]["recall"] is None and rows[0]["recall"] is None  # no kept patches before the LLM
    # the oracle's 50 best-scored patches hold every asked object of these scenes, except on counting questions
    # (one patch per object, then random patches)
    top = np.argsort(-eval_synthetic.oracle_scores(test.mask, test.coverage, test.points), 1, kind="stable")[:, :50]
    share = np.take_along_axis(test.mask, top, 1).sum(1)[asked] / test.mask.sum(1)[asked]
    assert (share[test.families[asked] != "count"] == 1).all() and (share[test.families[asked] == "count"] < 1).all()
    assert rows[3]["recall"] == pytest.approx(share.mean())
    assert all(r["mean_keep"] == r["keep"] and r["ms_per_question"] >= 0 for r in rows)
    assert all(r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in rows)


def test_adaptive_spec_answers_each_image_at_its_budget():
    test = eval_synthetic.load_test_set(11, SCENE)
    pipe = FakePipe(test)
    runs = eval_synthetic.sweep(pipe, test, ["svd:adaptive=0.9", "norm"], ["50%"], seeds=1, batch=4)
    assert set(pipe.batches) == {4}
    # images 0, 3, 6, 9 keep 7 tokens, 1, 4, 7, 10 keep 13, 2, 5, 8 keep 25: 4 + 4 + 3 questions, a batch each
    timed = [(m, k) for m, k in zip(pipe.methods, pipe.keeps) if m == "svd"]
    assert sorted(timed) == sorted([("svd", k) for k in (7, 7, 13, 13, 25, 25)])
    adaptive = runs[1]
    assert adaptive.method == "svd:adaptive=0.9" and adaptive.keep == 50
    np.testing.assert_array_equal(adaptive.tokens, [(7, 13, 25)[i % 3] for i in range(11)])
    assert [len(k) for k in adaptive.kept] == adaptive.tokens.tolist()  # each answer back at its question
    np.testing.assert_array_equal(adaptive.correct, test.families != "count")
    rows = eval_synthetic.summarize(runs, test.families)
    assert rows[1]["mean_keep"] == pytest.approx(np.mean([(7, 13, 25)[i % 3] for i in range(11)]))
    assert rows[1]["adaptive"] == 0.9 and rows[2]["adaptive"] is None


def test_mcnemar_against_the_best_other_method():
    """svd specs are tested against the most accurate non-svd, non-oracle row at each budget (random: seed 0)."""
    n = 40
    rng = np.random.default_rng(0)
    answers = {m: rng.random(n) < p for m, p in [("svd", 0.6), ("svd:rank=k", 0.5), ("norm", 0.4),
                                                 ("random", 0.7), ("oracle", 0.95)]}
    runs = [eval_synthetic.Run(parse(m, eval_synthetic.METHODS + ("full",)), "5", 5, seed, answers[m] if seed == 0
                               else ~answers[m], np.full(n, 5), None, None, 0.0)
            for m in answers for seed in range(2 if m == "random" else 1)]
    rows = eval_synthetic.summarize(runs, np.array(["colour"] * n))
    by = {r["method"]: r for r in rows}
    best = max(("norm", "random"), key=lambda m: by[m]["accuracy"])
    for m in ("svd", "svd:rank=k"):
        assert by[m]["mcnemar_vs"] == best
        assert by[m]["mcnemar_p"] == mcnemar_exact(answers[m], answers[best])
    assert by["norm"]["mcnemar_p"] is None and by["oracle"]["mcnemar_vs"] is None
    assert "svd vs" in eval_synthetic.mcnemar_lines(rows)


@pytest.mark.parametrize("methods, message", [
    (["svd", "nope"], "unknown method 'nope'"), (["svd", "svd:energy=0.95"], "are the same; give each once"),
    (["full"], "unknown method 'full'"), (["svd:eps=2"], "svd takes no option 'eps'"),
    (["oracle:rank=2"], "oracle takes no option 'rank'")])
def test_sweep_refuses_bad_methods(methods, message):
    test = eval_synthetic.load_test_set(2, SCENE)
    with pytest.raises(ValueError, match=message):
        eval_synthetic.sweep(FakePipe(test), test, methods, ["50%"])


# ---- synthetic end to end on the tiny random model

def test_eval_synthetic_end_to_end(model_dir, tmp_path, capsys):
    """An adaptive spec on the projector's output, the oracle and random (2 seeds) at 3 of 100 tokens: tables,
    intervals, the paired test, CSV/JSON, the Pareto plot and the kept-token grid."""
    out, adaptive = tmp_path / "syn", "svd:adaptive=0.9:matrix=projector"
    # through the console script's main: its return value is the process's exit status (sys.exit(main()))
    status = cli.main(["eval", "synthetic", "--model", str(model_dir), "--n", "6", "--methods",
                       f"{adaptive},oracle,random", "--budgets", "16/576", "--seeds", "2", "--resamples", "200",
                       "--out", str(out), *RUN])
    assert status is None
    printed = capsys.readouterr().out
    assert "accuracy % [95% CI]" in printed and "object recall" in printed and "16/576 (3)" in printed
    assert f"{adaptive} vs random: p = " in printed and "ms per question" in printed
    rows = read_csv(out / "synthetic.csv")
    assert [(r["method"], r["budget"], r["keep"], r["seeds"]) for r in rows] == [
        ("full", "all", "100", "1"), (adaptive, "16/576", "3", "1"), ("oracle", "16/576", "3", "1"),
        ("random", "16/576", "3", "2")]
    assert {f"accuracy_{f}" for f in FAMILIES} | {f"accuracy_{f}_ci_low" for f in FAMILIES} <= set(rows[0])
    for r in rows:
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        assert float(r["ms_per_question"]) > 0
    by = {r["method"]: r for r in rows}
    assert 1 <= float(by[adaptive]["mean_keep"]) <= 3 and by[adaptive]["adaptive"] == "0.9"
    assert by[adaptive]["mcnemar_vs"] == "random" and 0 < float(by[adaptive]["mcnemar_p"]) <= 1
    assert by["random"]["mcnemar_p"] == "" and float(by["oracle"]["mean_keep"]) == 3
    test = eval_synthetic.load_test_set(6, SCENE)
    top = np.argsort(-eval_synthetic.oracle_scores(test.mask, test.coverage, test.points), 1, kind="stable")[:, :3]
    asked = test.mask.any(1)
    assert by["full"]["recall"] == ""  # the oracle's recall: its 3 best-scored patches, the asked object's share
    assert float(by["oracle"]["recall"]) == pytest.approx(np.mean(
        np.take_along_axis(test.mask, top, 1).sum(1)[asked] / test.mask.sum(1)[asked]))
    assert 0 <= float(by[adaptive]["recall"]) <= 1
    doc = json.loads((out / "synthetic.json").read_text())
    assert doc["n"] == 6 and doc["image_tokens"] == 100 and doc["budgets"] == {"16/576": 3}
    assert doc["bootstrap"]["resamples"] == 200 and doc["adaptive_buckets"] == {"16/576": [1, 2, 3]}
    assert len(doc["runs"]) == 5 and doc["rows"][1]["method"] == adaptive
    assert Image.open(out / "synthetic.png").size[0] > 100
    grid = Image.open(out / "kept_tokens.png")  # a row per selector (random: seed 0), a 160 px panel per image
    assert grid.format == "PNG" and grid.size[1] == 20 + 3 * 160 and 4 * 160 < grid.size[0] < 4 * 160 + 400


def test_given_scores_select_the_kept_tokens(model_dir):
    """The oracle's way in: Pipeline.answer(method=GIVEN, scores=...) keeps the top k of each row's scores."""
    pipe = Pipeline.load(model_dir)
    samples = [make_sample(seed, SCENE) for seed in split_seeds("test", 4)]
    images, questions = [Image.fromarray(s.image) for s in samples], [s.question for s in samples]
    scores = np.random.default_rng(1).random((4, 100)).astype(np.float32)
    answers, _ = pipe.answer(images, questions, method=GIVEN, keep=50, scores=scores, max_new_tokens=3)
    assert [a.kept_indices for a in answers] == np.sort(np.argsort(-scores, axis=1)[:, :50], axis=1).tolist()
    with pytest.raises(ValueError, match="scores go with pruning method 'given'"):
        pipe.answer(images, questions, method="svd", keep=50, scores=scores)
    with pytest.raises(ValueError, match="scores go with pruning method 'given'"):
        pipe.answer(images, questions, method=GIVEN, keep=50)
    with pytest.raises(ValueError, match=r"scores must be finite, of shape \(B, N\) = \(4, 100\)"):
        pipe.answer(images, questions, method=GIVEN, keep=50, scores=scores[:, :99])


def test_pipeline_adaptive_specs(model_dir):
    """answer() takes one budget per call: adaptive specs go through adaptive_keep, and only they do."""
    pipe = Pipeline.load(model_dir)
    image = Image.fromarray(make_sample(split_seeds("test", 1)[0], SCENE).image)
    with pytest.raises(ValueError, match="chooses a budget per image: get them with adaptive_keep"):
        pipe.answer([image], ["q"], method="svd:adaptive=0.9", keep=10)
    with pytest.raises(ValueError, match="method spec 'svd' is not adaptive"):
        pipe.adaptive_keep([image], "svd", 10)
    with pytest.raises(ValueError, match="unknown method 'oracle'"):
        pipe.answer([image], ["q"], method="oracle", keep=10)


# ---- GQA / TextVQA end to end on fixtures in the official formats, with the bundled model

def _save(image, path, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).convert(mode).save(path, format="JPEG")


def write_gqa(root, n=6):
    """GQA testdev-balanced format from the synthetic generator; the last image grayscale, one image missing."""
    questions = {}
    for i, seed in enumerate(split_seeds("test", n)):
        s = make_sample(seed, BUNDLED)
        questions[f"q{i}"] = dict(imageId=f"n{i}", question=s.question, answer=s.answer.lower(), isBalanced=True,
                                  fullAnswer=f"It is {s.answer}.", types={"structural": "query"})
        _save(s.image, root / "images" / f"n{i}.jpg", "L" if i == n - 1 else "RGB")
    questions["lost"] = dict(questions["q0"], imageId="nowhere")
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    return root


def write_textvqa(root, n=6):
    """TextVQA val format (10 human answers) from the generator; one entry has no answers."""
    data = []
    for i, seed in enumerate(split_seeds("test", n)):
        s = make_sample(seed, BUNDLED)
        data.append(dict(question_id=100 + i, image_id=f"t{i}", question=s.question, set_name="val",
                         answers=[s.answer] * 7 + ["unanswerable"] * 3, image_classes=["Sign"]))
        _save(s.image, root / "train_images" / f"t{i}.jpg")
    data.append(dict(data[0], question_id=999, answers=[]))
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(dict(dataset_name="textvqa", data=data)))
    return root


def test_eval_gqa_end_to_end_and_resume(tmp_path, capsys, caplog):
    data, out = write_gqa(tmp_path / "gqa"), tmp_path / "out"
    argv = ["gqa", "--data", str(data), "--model", str(MODEL_DIR), "--methods", "svd", "--keep", "50",
            "--out", str(out), *RUN, *CHAT]
    with caplog.at_level(logging.WARNING):
        rows = evaluate.main(argv)
    assert "skipping question lost" in caplog.text and "n5.jpg is L; converted to RGB" in caplog.text
    assert [(r.method, r.budget, r.count, r.skipped) for r in rows] == [("full", None, 6, 1), ("svd", 50, 6, 1)]
    assert rows[0].accuracy_pct >= 50  # real answers scored: the bundled model knows these scenes
    table = read_csv(out / "summary.csv")
    assert [(r["method"], r["budget"]) for r in table] == [("full", "all"), ("svd", "50")]
    assert (out / "summary.png").is_file() and "accuracy %" in capsys.readouterr().out

    # interrupted: svd lost its last answers, the write of one was cut off; summary gone
    path = results_path(out, "svd", 50)
    lines = path.read_text().splitlines(keepends=True)
    answered = read_results(path)
    path.write_text("".join(lines[:2]) + lines[2][:9])
    (out / "summary.csv").unlink()
    again = evaluate.main(argv)
    timeless = lambda rows: [(r.method, r.budget, r.accuracy_pct, r.count, r.skipped) for r in rows]
    assert timeless(again) == timeless(rows)
    assert {q: r["prediction"] for q, r in read_results(path).items()} == \
        {q: r["prediction"] for q, r in answered.items()}  # the lost answers were given again, the same
    assert [r["accuracy_pct"] for r in read_csv(out / "summary.csv")] == [r["accuracy_pct"] for r in table]
    with pytest.raises(ValueError, match="other settings \\(instruction, ocr, pad_square, prompt_template"):  # LLaVA's eval prompt: refused
        evaluate.main(argv[:-len(CHAT)])


def test_eval_textvqa_end_to_end(tmp_path, caplog):
    data, out = write_textvqa(tmp_path / "textvqa"), tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rows = evaluate.main(["textvqa", "--data", str(data), "--model", str(MODEL_DIR), "--methods", "svd",
                              "--keep", "50", "--limit", "5", "--out", str(out), *RUN, *CHAT])
    assert "skipping question 999: no answers" in caplog.text
    assert [(r.method, r.budget, r.count, r.skipped) for r in rows] == [("full", None, 5, 1), ("svd", 50, 5, 1)]
    for method, budget in (("full", None), ("svd", 50)):
        results = read_results(results_path(out, method, budget))
        assert sorted(results) == ["100", "101", "102", "103", "104"]
        assert all(0 <= r["score"] <= 1 for r in results.values())
    # 7 of 10 humans gave the sample's answer: a right prediction scores min(7/3, 1) = 1 on every subset
    fixture = json.loads((data / "TextVQA_0.5.1_val.json").read_text())["data"]
    truth = {str(d["question_id"]): d["answers"][0] for d in fixture if d["answers"]}
    full = read_results(results_path(out, "full", None))
    assert all(r["score"] == float(r["prediction"].lower() == truth[q].lower()) for q, r in full.items())
    assert rows[0].accuracy_pct >= 50


def test_eval_vqa_bad_input(tmp_path):
    data = write_gqa(tmp_path / "gqa")
    base = ["gqa", "--data", str(data), "--model", str(MODEL_DIR), "--out", str(tmp_path / "out"), *RUN]
    with pytest.raises(ValueError, match="1 bad gqa entries.*lost: missing image file"):
        evaluate.main(base + ["--strict"])
    (data / "testdev_balanced_questions.json").write_text(json.dumps(
        {k: v for k, v in json.loads((data / "testdev_balanced_questions.json").read_text()).items() if k == "q5"}))
    with pytest.raises(ValueError, match="n5.jpg is L, not RGB"):
        evaluate.main(base + ["--no-convert-rgb", "--methods", "svd", "--keep", "50"])
    with pytest.raises(ValueError, match="unknown method"):
        evaluate.main(base + ["--methods", "full"])
    with pytest.raises(ValueError, match="keep 197 outside"):
        evaluate.main(base + ["--methods", "svd", "--keep", "197"])


# ---- well-formed answers, resuming the synthetic sweep

def test_well_formed_answers_hand_checked():
    """One of the family's answers and then EOS: a rambling, out-of-family or unfinished answer is not."""
    texts = ["red", "red red", "circle", "2", "2", "yes"]
    stopped = [True, True, True, True, False, True]
    families = np.array(["colour", "colour", "colour", "count", "count", "presence"])
    np.testing.assert_array_equal(eval_synthetic.well_formed(texts, stopped, families),
                                  [True, False, False, True, False, True])


def test_eval_synthetic_resumes_and_appends(model_dir, tmp_path, capsys):
    """Each finished (method, budget, seed) is kept in runs.jsonl: a rerun answers only what is missing, a rerun
    with other methods adds its rows beside the earlier ones, and other settings are refused."""
    out = tmp_path / "syn"
    base = ["synthetic", "--model", str(model_dir), "--n", "4", "--budgets", "16/576", "--resamples", "50",
            "--out", str(out), *RUN]
    first = evaluate.main(base + ["--methods", "norm"])
    printed = capsys.readouterr().out
    assert "well-formed answers %" in printed
    lines = (out / eval_synthetic.RESULTS).read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["full", "norm"]
    # the well-formed rate in every table: CSV, JSON, and from the recorded answers
    test = eval_synthetic.load_test_set(4, SCENE)
    for line, row in zip(lines, read_csv(out / "synthetic.csv")):
        rec = json.loads(line)
        want = 100 * eval_synthetic.well_formed(rec["texts"], rec["stopped"], test.families).mean()
        assert float(row["well_formed"]) == pytest.approx(want)
    assert "well_formed" in json.loads((out / "synthetic.json").read_text())["rows"][0]

    (out / eval_synthetic.RESULTS).write_text(lines[0] + "\n" + lines[1][:20])  # norm's line cut off mid-write
    again = evaluate.main(base + ["--methods", "norm"])
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in first]
    timeless = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                             for line in text.splitlines()]
    assert timeless((out / eval_synthetic.RESULTS).read_text()) == timeless("\n".join(lines))  # norm given again

    more = evaluate.main(base + ["--methods", "random", "--seeds", "2"])  # appended, not overwritten
    assert [(r["method"], r["seeds"]) for r in more] == [("full", 1), ("random", 2), ("norm", 1)]
    assert [r["method"] for r in read_csv(out / "synthetic.csv")] == ["full", "random", "norm"]
    assert len((out / eval_synthetic.RESULTS).read_text().splitlines()) == 4
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens"):
        evaluate.main(base[:-1] + ["2", "--methods", "norm"])
    # the model re-saved in place (its largest file rewritten): its answers are not these
    weights = max((p for p in model_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    before = weights.stat()
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ValueError, match=r"other settings \(weights"):
            evaluate.main(base + ["--methods", "norm"])
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))


# ---- GQA: a corrupt image is skipped like a missing one; resuming checks every setting, the data too

@pytest.fixture(scope="module")
def gqa_run(tmp_path_factory):
    """A finished GQA run over a fixture whose image n1.jpg is corrupt (and question 'lost' has none)."""
    root = tmp_path_factory.mktemp("gqa_run")
    data, out = write_gqa(root / "gqa", n=3), root / "out"
    (data / "images" / "n1.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    argv = ["gqa", "--data", str(data), "--model", str(MODEL_DIR), "--methods", "svd", "--keep", "50",
            "--out", str(out), *RUN, *CHAT]
    return data, out, argv, evaluate.main(argv)


def test_eval_gqa_skips_a_corrupt_image_like_a_missing_one(gqa_run, caplog):
    data, out, argv, rows = gqa_run
    assert [(r.method, r.count, r.skipped) for r in rows] == [("full", 2, 2), ("svd", 2, 2)]
    assert sorted(read_results(results_path(out, "svd", 50))) == ["q0", "q2"]
    with pytest.raises(ValueError, match="2 bad gqa entries.*q1: unreadable image file .*n1.jpg"):
        evaluate.main(argv + ["--strict"])


@pytest.mark.parametrize("setting", ["data", "questions_sha256", "model", "max_new_tokens", "prompt_template",
                                     "convert_rgb", "pad_square", "ocr", "instruction"])
def test_eval_gqa_resume_refuses_every_changed_setting(gqa_run, setting, tmp_path, monkeypatch):
    """Before the model loads. The data: the same questions at another path, or other questions (ids overlapping
    the answered ones) at the same path, whose old answers were reused before."""
    data, out, argv, _ = gqa_run
    assert setting in json.loads((out / "settings.json").read_text())
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("refused only after the model loaded"))
    questions = data / "testdev_balanced_questions.json"
    original = questions.read_text()
    given = lambda option: argv.index(option) + 1
    argv = list(argv)
    if setting == "data":
        argv[given("--data")] = str(shutil.copytree(data, tmp_path / "copy"))
    elif setting == "questions_sha256":
        changed = json.loads(original)
        changed["q0"] = dict(changed["q0"], question="Is there a cat?", answer="no")
        questions.write_text(json.dumps(changed))
    elif setting == "model":
        argv[given("--model")] = str(tmp_path)
    elif setting == "max_new_tokens":
        argv[given("--max-new-tokens")] = "2"
    elif setting == "prompt_template":
        argv[given("--prompt-template")] = "USER: <image>\n{question}\nShort answer. ASSISTANT:"
    elif setting in ("pad_square", "ocr", "instruction"):  # the protocol's parts: the run used plain, no instruction
        argv.append("--" + setting.replace("_", "-"))
    else:
        argv.append("--no-convert-rgb")
    try:
        with pytest.raises(ValueError, match=rf"other settings \({setting}{', weights' * (setting == 'model')}:"):
            evaluate.main(argv)
    finally:
        questions.write_text(original)


def test_eval_gqa_settings_of_a_run_without_answers_are_replaced(tmp_path):
    """A first run that fails before its first answer (here: a grayscale image refused) records nothing that
    protects answers: the corrected rerun goes ahead instead of being refused for "other settings"."""
    data, out = write_gqa(tmp_path / "gqa", n=1), tmp_path / "out"
    (data / "images" / "n0.jpg").unlink()
    _save(make_sample(split_seeds("test", 1)[0], BUNDLED).image, data / "images" / "n0.jpg", "L")
    argv = ["gqa", "--data", str(data), "--model", str(MODEL_DIR), "--methods", "svd", "--keep", "50",
            "--out", str(out), *RUN, *CHAT]
    with pytest.raises(ValueError, match="n0.jpg is L, not RGB"):
        evaluate.main(argv + ["--no-convert-rgb"])
    rows = evaluate.main(argv)
    assert [(r.method, r.count) for r in rows] == [("full", 1), ("svd", 1)]
    assert json.loads((out / "settings.json").read_text())["convert_rgb"] is True
