"""GQA / TextVQA readers on tiny files in the official formats, and the resumable evaluation harness."""
import csv
import json
import logging
import subprocess
import sys

import pytest
from PIL import Image

from svdprune_jax.evaluation.harness import BASELINE, evaluate, read_results, results_path, summarize
from svdprune_jax.evaluation.vqa_data import load, read


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format="JPEG")


def write_gqa(root, questions, images=()):
    """testdev_balanced_questions.json (qid -> question) and images/{imageId}.jpg for each id in images."""
    for image_id in images:
        _image(root / "images" / f"{image_id}.jpg")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    return root


def gqa_entry(image_id, question, answer, **extra):
    return dict(imageId=image_id, question=question, answer=answer, fullAnswer=f"It is {answer}.",
                isBalanced=True, types={"structural": "query"}) | extra


def write_textvqa(root, data, images=()):
    """TextVQA_0.5.1_val.json ({"data": [...]}) and train_images/{image_id}.jpg for each id in images."""
    for image_id in images:
        _image(root / "train_images" / f"{image_id}.jpg")
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    doc = dict(dataset_type="val", dataset_name="textvqa", dataset_version=0.51, data=data)
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(doc))
    return root


def textvqa_entry(qid, image_id, question, answers):
    return dict(question_id=qid, image_id=image_id, question=question, answers=answers, image_classes=["Sign"],
                set_name="val", question_tokens=question.split())


def test_read_gqa(tmp_path):
    write_gqa(tmp_path, {"201": gqa_entry("n1", "Is the ball red?", "yes"),
                         "105": gqa_entry("n2", "What color is the car?", "blue"),
                         "300": gqa_entry("n1", "What is on the table?", "cup")}, images=["n1", "n2"])
    ds = load("gqa", tmp_path)
    assert ds.name == "gqa" and ds.skipped == ()
    assert [s.qid for s in ds.samples] == ["201", "105", "300"]  # file order
    s = ds.samples[1]
    assert (s.image, s.question, s.answers) == (tmp_path / "images" / "n2.jpg", "What color is the car?", ("blue",))


def test_read_textvqa(tmp_path):
    answers = ["nokia"] * 7 + ["Nokia", "nokia phone", "unanswerable"]
    write_textvqa(tmp_path, [textvqa_entry(34602, "003a8ae2ef43b901", "what brand is the phone?", answers)],
                  images=["003a8ae2ef43b901"])
    (s,) = load("textvqa", tmp_path).samples
    assert (s.qid, s.image.name, s.answers) == ("34602", "003a8ae2ef43b901.jpg", tuple(answers))
    assert s.question == "what brand is the phone?" and s.ocr is None


def test_gqa_bad_entries_are_reported_and_skipped(tmp_path, caplog):
    write_gqa(tmp_path, {"1": gqa_entry("n1", "Q?", "yes"),
                         "2": gqa_entry("missing", "Q?", "yes"),
                         "3": gqa_entry("n1", "Q?", ""),
                         "4": {"imageId": "n1", "answer": "no"},
                         "5": ["not", "an", "object"],
                         "6": gqa_entry("n1", "Q?", "no", isBalanced=False)}, images=["n1"])
    with caplog.at_level(logging.WARNING):
        ds = load("gqa", tmp_path)
    assert [s.qid for s in ds.samples] == ["1"]
    reasons = dict(ds.skipped)
    assert list(reasons) == ["2", "3", "4", "5", "6"]
    assert "missing image file" in reasons["2"] and "missing.jpg" in reasons["2"]
    assert "'answer'" in reasons["3"] and "'question'" in reasons["4"]
    assert "not a JSON object" in reasons["5"] and "balanced" in reasons["6"]
    assert all(f"question {qid}:" in caplog.text for qid in reasons)
    with pytest.raises(ValueError, match=r"5 bad gqa entries.*2: missing image file"):
        load("gqa", tmp_path, strict=True)


def test_textvqa_bad_entries_are_reported_and_skipped(tmp_path):
    ten = ["yes"] * 10
    write_textvqa(tmp_path, [textvqa_entry(1, "a", "q?", ten),
                             textvqa_entry(2, "a", "q?", []),
                             {k: v for k, v in textvqa_entry(3, "a", "q?", ten).items() if k != "answers"},
                             textvqa_entry(4, "a", "q?", ten[:9]),
                             textvqa_entry(5, "b", "q?", ten),
                             textvqa_entry(1, "a", "again?", ten),
                             {"image_id": "a", "question": "q?", "answers": ten},
                             textvqa_entry(6, "a", "q?", ten[:9] + [None])], images=["a"])
    ds = load("textvqa", tmp_path)
    assert [s.qid for s in ds.samples] == ["1"]
    reasons = dict(ds.skipped)
    assert list(reasons) == ["2", "3", "4", "5", "1", "data[6]", "6"]
    assert reasons["2"].startswith("no answers") and reasons["3"].startswith("no answers")
    assert "expected 10 answer strings" in reasons["4"] and "expected 10 answer strings" in reasons["6"]
    assert "b.jpg" in reasons["5"] and reasons["1"] == "duplicate question id"
    assert "'question_id'" in reasons["data[6]"]
    with pytest.raises(ValueError, match="7 bad textvqa entries"):
        read("textvqa", tmp_path / "TextVQA_0.5.1_val.json", tmp_path / "train_images", strict=True)


def test_malformed_files_raise(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "train_images").mkdir()
    (tmp_path / "testdev_balanced_questions.json").write_text('{"1": {"imageId": ')
    with pytest.raises(ValueError, match="cannot read gqa questions"):
        load("gqa", tmp_path)
    (tmp_path / "testdev_balanced_questions.json").write_text("[]")
    with pytest.raises(ValueError, match="JSON object of question id"):
        load("gqa", tmp_path)
    (tmp_path / "TextVQA_0.5.1_val.json").write_text('{"questions": []}')
    with pytest.raises(ValueError, match="'data' list"):
        load("textvqa", tmp_path)
    with pytest.raises(ValueError, match="cannot read textvqa"):
        read("textvqa", tmp_path / "nope.json", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'vqav2'"):
        load("vqav2", tmp_path)
    with pytest.raises(ValueError, match="holds no question file"):
        load("gqa", tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "testdev_balanced_questions.json").write_text("{}")
    with pytest.raises(ValueError, match="image folder"):
        load("gqa", tmp_path / "elsewhere")


# ---- harness ----------------------------------------------------------------------------------------------------

N = 7


@pytest.fixture
def gqa(tmp_path):
    questions = {str(q): gqa_entry(f"n{q % 3}", f"question {q}?", f"answer{q}") for q in range(N)}
    questions["bad"] = gqa_entry("n9", "no image?", "x")
    return load("gqa", write_gqa(tmp_path / "gqa", questions, images=["n0", "n1", "n2"]))


def oracle(batch, method, budget):
    """Right on every question unpruned; with budget k, wrong on question ids divisible by k (as "Answer0.")."""
    return [s.answers[0].capitalize() + "." if budget is None or int(s.qid) % budget else "wrong" for s in batch]


class Crash(Exception):
    pass


def crashing_after(n_calls, calls):
    def predict(batch, method, budget):
        if len(calls) == n_calls:
            raise Crash
        calls.append((method, budget, [s.qid for s in batch]))
        return oracle(batch, method, budget)
    return predict


RUNS = [("svd", 2), ("random", 3)]
EXPECTED = [  # qids 0..6; k=2 misses 0,2,4,6; k=3 misses 0,3,6
    (BASELINE[0], None, 100.0, N, 1), ("svd", 2, 300 / 7, N, 1), ("random", 3, 400 / 7, N, 1)]


def _table(rows):
    return [(r.method, r.budget, pytest.approx(r.accuracy_pct), r.count, r.skipped) for r in rows]


def test_evaluate_writes_jsonl_table_and_csv(gqa, tmp_path, capsys):
    out = tmp_path / "out"
    rows = evaluate(gqa, oracle, RUNS, out, progress=False)
    assert _table(rows) == EXPECTED
    assert all(r.seconds_per_sample >= 0 for r in rows)
    printed = capsys.readouterr().out
    assert "full" in printed and "all" in printed and "42.86" in printed and "57.14" in printed
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["method"], t["budget"], t["count"], t["skipped"]) for t in table] == [
        ("full", "all", "7", "1"), ("svd", "2", "7", "1"), ("random", "3", "7", "1")]
    assert float(table[1]["accuracy_pct"]) == pytest.approx(300 / 7)
    lines = [json.loads(line) for line in results_path(out, "svd", 2).read_text().splitlines()]
    assert [(r["qid"], r["prediction"], r["score"]) for r in lines[:2]] == [("0", "wrong", 0.0), ("1", "Answer1.", 1.0)]


def test_resume_after_interruption_gives_the_same_table(gqa, tmp_path):
    full = evaluate(gqa, oracle, RUNS, tmp_path / "uninterrupted", batch_size=2, progress=False)
    out = tmp_path / "interrupted"
    calls = []
    with pytest.raises(Crash):  # 4 batches of the baseline, then 2 of svd_k2, then the process "dies"
        evaluate(gqa, crashing_after(6, calls), RUNS, out, batch_size=2, progress=False)
    assert len(read_results(results_path(out, "svd", 2))) == 4
    assert not results_path(out, "random", 3).exists()
    calls.clear()
    resumed = evaluate(gqa, crashing_after(100, calls), RUNS, out, batch_size=2, progress=False)
    assert _table(resumed) == _table(full) == EXPECTED
    # nothing answered twice: only the rest of svd_k2 and all of random_k3 were asked, in batches of <= 2
    assert [(m, k, q) for m, k, q in calls] == [("svd", 2, ["4", "5"]), ("svd", 2, ["6"]),
                                                ("random", 3, ["0", "1"]), ("random", 3, ["2", "3"]),
                                                ("random", 3, ["4", "5"]), ("random", 3, ["6"])]
    for method, budget in [BASELINE, *RUNS]:
        assert len(results_path(out, method, budget).read_text().splitlines()) == N


_KILLED_RUN = """
import os, sys
from svdprune_jax.evaluation.harness import evaluate
from svdprune_jax.evaluation.vqa_data import load
calls = []
def predict(batch, method, budget):
    if len(calls) == 3:
        os._exit(3)  # a hard kill: no exception handling, no file closing
    calls.append(1)
    return [s.answers[0] for s in batch]
evaluate(load("gqa", sys.argv[1]), predict, [], sys.argv[2], progress=False)
"""


def test_answers_survive_a_hard_kill(gqa, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path / "gqa"), str(out)], timeout=120)
    assert done.returncode == 3
    assert list(read_results(results_path(out, *BASELINE))) == ["0", "1", "2"]


@pytest.mark.parametrize("tail", ['{"qid": "6", "predic', '{"qid": "6", "prediction": "x", "score": 0, "seconds": 1}'])
def test_line_cut_by_a_crash_is_redone(gqa, tmp_path, tail, caplog):
    out = tmp_path / "out"
    evaluate(gqa, oracle, RUNS, out, progress=False)
    path = results_path(out, "svd", 2)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + tail)  # the last write stopped before its newline
    assert set(read_results(path)) == {str(q) for q in range(N - 1)}
    calls = []
    with caplog.at_level(logging.WARNING):
        rows = evaluate(gqa, crashing_after(100, calls), RUNS, out, progress=False)
    assert "incomplete last line" in caplog.text
    assert calls == [("svd", 2, ["6"])]
    assert _table(rows) == EXPECTED
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == N


def test_corrupt_results_raise(gqa, tmp_path):
    out = tmp_path / "out"
    evaluate(gqa, oracle, [], out, progress=False)
    path = results_path(out, *BASELINE)
    good = path.read_text().splitlines(keepends=True)
    path.write_text(good[0] + "{not json\n" + "".join(good[1:]))
    with pytest.raises(ValueError, match=r"full.jsonl:2: malformed JSON line"):
        evaluate(gqa, oracle, [], out, progress=False)
    path.write_text("".join(good) + good[3])
    with pytest.raises(ValueError, match=r"full.jsonl:8: duplicate question id '3'"):
        evaluate(gqa, oracle, [], out, progress=False)
    path.write_text("".join(good[:2]) + '{"qid": 2, "prediction": "x", "seconds": 0.1}\n')
    with pytest.raises(ValueError, match=r"full.jsonl:3: expected an object"):
        evaluate(gqa, oracle, [], out, progress=False)


def test_summary_counts_only_current_samples(gqa, tmp_path):
    out = tmp_path / "out"
    evaluate(gqa, oracle, RUNS, out, progress=False)
    subset = type(gqa)(gqa.name, gqa.samples[1:4], gqa.skipped)
    rows = summarize(subset, [BASELINE, ("svd", 2)], out)
    assert _table(rows) == [("full", None, pytest.approx(100.0), 3, 1), ("svd", 2, pytest.approx(200 / 3), 3, 1)]


def test_textvqa_harness_scores_softly(tmp_path):
    data = [textvqa_entry(1, "a", "how many?", ["two"] * 10),
            textvqa_entry(2, "a", "is it open?", ["yes"] * 3 + ["no"] * 7),
            textvqa_entry(3, "a", "what brand?", [])]
    ds = load("textvqa", write_textvqa(tmp_path / "tv", data, images=["a"]))
    said = {"1": "2", "2": "Yes."}  # 1.0 (10 of 10 humans, "two" -> "2") and 0.9 (3 of 10)
    rows = evaluate(ds, lambda batch, m, k: [said[s.qid] for s in batch], [("svd", 4)], tmp_path / "out",
                    batch_size=2, progress=False)
    assert _table(rows) == [("full", None, pytest.approx(95.0), 2, 1), ("svd", 4, pytest.approx(95.0), 2, 1)]


@pytest.mark.parametrize("runs, match", [
    ([("svd", 0)], "positive int"), ([("svd", None)], "positive int"), ([("svd", True)], "positive int"),
    ([("svd", 8), ("svd", 8)], "duplicate"), ([("full", 8)], "bad method name"), ([("a/b", 8)], "bad method name"),
])
def test_bad_runs_raise(gqa, tmp_path, runs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(gqa, oracle, runs, tmp_path / "out", progress=False)


def test_bad_predict_output_raises(gqa, tmp_path):
    with pytest.raises(ValueError, match="list of 2 strings"):
        evaluate(gqa, lambda batch, m, k: ["only one"], [], tmp_path / "out", batch_size=2, progress=False)
    empty = type(gqa)(gqa.name, (), gqa.skipped)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(empty, oracle, [], tmp_path / "out", progress=False)


def test_progress_bar_reports_throughput(gqa, tmp_path, capsys):
    evaluate(gqa, oracle, [], tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "gqa full" in err and "sample/s" in err and f"{N}/{N}" in err


def test_processes_that_do_not_write_answer_the_same_batches(gqa, tmp_path):
    """A multi-host sweep: every process answers the same batches in step (the collectives need all of them);
    only process 0 writes (write=True). The others leave the shared directory as they found it."""
    out = tmp_path / "out"
    writer, follower = [], []
    with pytest.raises(Crash):  # a first run, cut short in the baseline
        evaluate(gqa, crashing_after(2, writer), RUNS, out, batch_size=2, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    writer.clear()
    assert evaluate(gqa, crashing_after(100, follower), RUNS, out, batch_size=2, progress=False, write=False) == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rows = evaluate(gqa, crashing_after(100, writer), RUNS, out, batch_size=2, progress=False)
    assert follower == writer and _table(rows) == EXPECTED
