"""The benchmark suite's smoke run (tiny configs, one timed run per figure): it runs end to end and writes
one table covering items 1-4 with ours and the reference on every ratio row, and no recompilation."""
import json

from benchmarks import run, scoring


def test_smoke_writes_one_table(tmp_path):
    assert run.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["item"] for r in data["rows"]} == {"1", "2", "3", "4"}
    assert all(r["ours"]["median"] > 0 for r in data["rows"])
    assert all(r["ratio"] is not None and r["ratio"][1] <= r["ratio"][0] <= r["ratio"][2] for r in data["rows"])
    assert all(r["tokens_equal"] == 1.0 for r in data["rows"] if "tokens_equal" in r)  # same weights, same tokens
    assert next(t for t in data["targets"] if "recompilation" in t["what"])["met"]
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| item | case |") == 1 and "Rooflines" in md


def test_scoring_selectors_are_valid_method_specs():
    """benchmarks.scoring times these specs; a typo would only show when the benchmark runs."""
    for text in scoring.SELECTORS:
        scoring.parse(text, scoring.sp.METHODS)
