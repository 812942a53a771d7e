"""The benchmark suite's smoke run (tiny configs, one timed run per figure): it runs end to end and writes
one table covering items 1-4 with ours and the reference on every ratio row, and no recompilation."""
import json

from svdprune_jax.benchmarks import run, scoring, tower_profile


def test_smoke_writes_one_table(tmp_path):
    assert run.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["item"] for r in data["rows"]} == {"1", "2", "3", "4"}
    assert all(r["ours"]["median"] > 0 for r in data["rows"])
    assert all(r["ratio"] is not None and r["ratio"][1] <= r["ratio"][0] <= r["ratio"][2] for r in data["rows"])
    assert all(r["tokens_equal"] == 1.0 for r in data["rows"] if "tokens_equal" in r)  # same weights, same tokens
    assert next(t for t in data["targets"] if "recompilation" in t["what"])["met"]
    assert all(r["ours_unpadded_ratio"] > 0 for r in data["prefill"].values()) and data["prefill_weight_floor_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| item | case |") == 1 and "Rooflines" in md


def test_scoring_selectors_are_valid_method_specs():
    """benchmarks.scoring times these specs; a typo would only show when the benchmark runs."""
    for text in scoring.SELECTORS:
        scoring.parse(text, scoring.sp.METHODS)


def test_tower_profile_smoke(tmp_path):
    """One encoder layer, ours vs transformers on the same weights: equal outputs, every part timed on both
    sides, and the XLA kernel account names the layer's GEMMs."""
    tower_profile.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "tower_profile.json").read_text())
    assert data["max_abs_diff_layer"] < 1e-4
    assert set(data["parts"]) == {"layer", "q/k/v/out projection", "fc1 + activation", "fc2", "attention core", "layer norm"}
    assert all(p[side]["median"] > 0 for p in data["parts"].values() for side in ("ours", "torch"))
    assert sum(k["what"].startswith("GEMM") for k in data["kernels"]) >= 4  # q, k, v, out, fc1, fc2 at least in part
    assert "| attention core | 1 |" in (tmp_path / "tower_profile.md").read_text()


def test_next_smoke_writes_its_table(tmp_path):
    """The LLaVA-NeXT section at tiny size (5 views, 80 image tokens; unpruned and 3 budgets): every row timed on
    both sides, same tokens, no recompilation, the prefill FLOP shares falling with the budget."""
    assert run.main(["--smoke", "--geometry", "llava-next-7b", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench-next.json").read_text())
    assert len(data["rows"]) == 4 * 4  # generate, encode, prefill, decode per token; for each budget
    assert all(r["ours"]["median"] > 0 and r["ref"]["median"] > 0 for r in data["rows"])
    assert all(r["tokens_equal"] == 1.0 for r in data["rows"] if "tokens_equal" in r)
    assert data["recompiles"] == 0
    shares = [d["flop_share"] for d in data["prefill"].values()]
    assert shares[0] == 1.0 and shares == sorted(shares, reverse=True)
    assert "| unpruned | 95 |" in (tmp_path / "bench-next.md").read_text()
    assert not (tmp_path / "bench.md").exists()  # --geometry picks; the LLaVA-1.5 section did not run
