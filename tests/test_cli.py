"""`svdprune-jax run` end to end on a tiny random model: the JSON contract, the picture, bad input."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import svdprune_jax

from svdprune_jax.cli import main as cli
from svdprune_jax.synthetic import bundled
from svdprune_jax.inference.pipeline import Pipeline, expand, left_pad
from svdprune_jax.synthetic.samples import ANSWERS
from tiny_bundled import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("cli") / "model")


def run_json(capsys, *argv):
    cli.main(["run", *map(str, argv), "--json"])
    return json.loads(capsys.readouterr().out)


def test_run_json_contract(model_dir, tmp_path, capsys):
    out = run_json(capsys, "--model", model_dir, "--keep", 12, "--max-new-tokens", 5, "--out", tmp_path / "k.png")
    pipe = Pipeline.load(model_dir)
    assert out["keep"] == 12 and out["method"] == "svd" and out["image_tokens"] == pipe.num_image_tokens
    kept = out["kept_indices"]
    assert len(kept) == 12 and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < pipe.num_image_tokens
    assert 1 <= len(out["token_ids"]) <= 5 and out["seconds"] > 0
    # prompt_ids: the template's ids with one image token, before expansion to the budget
    assert out["prompt_ids"] == pipe.prompt_ids(out["question"])
    assert out["answer"] == pipe.tokenizer.decode(out["token_ids"], skip_special_tokens=True).strip()
    picture = np.asarray(Image.open(tmp_path / "k.png"))
    assert picture.shape[:2] == (4 * pipe.config.vision.image_size,) * 2


def test_run_matches_pipeline_answer(model_dir, tmp_path, capsys):
    """The CLI's answer is the pipeline's greedy answer for the same image, question and budget."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), np.uint8))
    image.save(tmp_path / "x.png")
    out = run_json(capsys, "--model", model_dir, "--image", tmp_path / "x.png", "--prompt", "How many red circles?",
                   "--keep", 7, "--method", "norm", "--out", tmp_path / "k.png")
    (ans,), _ = Pipeline.load(model_dir).answer([image], ["How many red circles?"], method="norm", keep=7)
    assert out["token_ids"] == ans.token_ids and out["kept_indices"] == ans.kept_indices


def test_run_svd_keeps_the_top_leverage_tokens_of_the_tower_features(model_dir, tmp_path, capsys):
    """--method svd keeps what `svdprune_jax.prune` keeps on that image's tower features (its default options):
    the tokens of highest leverage (up to float32 ties between the two compiled paths)."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (80, 80, 3), np.uint8))
    image.save(tmp_path / "x.png")
    out = run_json(capsys, "--model", model_dir, "--image", tmp_path / "x.png", "--prompt", "Is there a red circle?",
                   "--keep", 7, "--method", "svd", "--max-new-tokens", 1, "--out", tmp_path / "k.png")
    pipe = Pipeline.load(model_dir)
    features, _ = nnx.merge(pipe.graphdef, pipe.state).image_features(jnp.asarray(pipe.pixel_values([image])))
    _, want = svdprune_jax.prune(features, 7, "svd")
    scores = np.asarray(svdprune_jax.leverage_scores(features, **svdprune_jax.SVD_DEFAULTS))[0]
    kept = out["kept_indices"]
    assert len(kept) == 7 and scores[kept].min() >= np.delete(scores, kept).max() - 1e-5
    assert len(set(kept) & set(np.asarray(want)[0].tolist())) >= 6, (kept, want)


def test_run_adaptive_spec(model_dir, tmp_path, capsys):
    """An adaptive spec answers at the image's own budget: a bucket of the given one, the pipeline's choice."""
    out = run_json(capsys, "--model", model_dir, "--keep", 12, "--method", "svd:adaptive=0.5:matrix=projector",
                   "--max-new-tokens", 2, "--out", tmp_path / "k.png")
    image = Image.open(bundled.EXAMPLE_IMAGE)
    want = Pipeline.load(model_dir).adaptive_keep([image], "svd:adaptive=0.5:matrix=projector", 12)
    assert out["keep"] == len(out["kept_indices"]) == want[0] and want[0] in (2, 3, 6, 12)
    assert out["method"] == "svd:adaptive=0.5:matrix=projector"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_run_converts_other_modes_like_transformers(model_dir, tmp_path, mode, capsys, caplog):
    """A grayscale, RGBA or palette image answers as its RGB conversion (transparency on white, as transformers'
    `convert_to_rgb`), with a one-line note naming the file."""
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 255, (80, 80, 4), np.uint8), "RGBA")
    image = rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)
    image.save(tmp_path / "x.png")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    expected = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    expected.save(tmp_path / "rgb.png")
    argv = ["--model", model_dir, "--keep", 9, "--max-new-tokens", 3, "--out", tmp_path / "k.png"]
    with caplog.at_level("WARNING"):
        got = run_json(capsys, *argv, "--image", tmp_path / "x.png")
    notes = [r.getMessage() for r in caplog.records if "converted to RGB" in r.getMessage()]
    assert len(notes) == 1 and "x.png" in notes[0] and mode in notes[0]
    want = run_json(capsys, *argv, "--image", tmp_path / "rgb.png")
    assert got["token_ids"] == want["token_ids"] and got["kept_indices"] == want["kept_indices"]


@pytest.mark.parametrize("argv, message", [
    (["--keep", "0"], "keep 0 outside"),
    (["--keep", "101"], "keep 101 outside"),
    (["--method", "full", "--keep", "5"], "keeps all"),
    (["--method", "svd:eps=0.9"], "svd takes no option 'eps'"),
    (["--method", "svd:rank=40"], r"rank must be an int in \[1, min\(N, D\)=32\]; got 40"),  # the tower's width
    (["--method", "svd:rank=40:matrix=projector"], r"min\(N, D\)=32"),  # the projector's width
])
def test_run_bad_budget(model_dir, argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["run", "--model", str(model_dir), *argv])


def test_run_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="not a LLaVA model directory"):
        cli.main(["run", "--model", str(tmp_path)])


def test_expand_and_left_pad():
    assert expand([1, 5, 9, 2], 9, 3) == [1, 5, 9, 9, 9, 2]
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_run_on_a_mesh_answers_as_one_device(model_dir, tmp_path, capsys):
    """--mesh data=1,model=1 (this session has one device) takes the sharded path (params placed by their
    logical names, inputs split over data, the run under the mesh, results gathered): the same answer."""
    argv = ("--model", model_dir, "--keep", 12, "--max-new-tokens", 5, "--out", tmp_path / "k.png")
    one = run_json(capsys, *argv)
    meshed = run_json(capsys, *argv, "--mesh", "data=1,model=1")
    assert (meshed["token_ids"], meshed["kept_indices"]) == (one["token_ids"], one["kept_indices"])
    with pytest.raises(SystemExit, match="mesh data=2,model=1 needs 2 devices; 1 are visible"):
        cli.main(["run", "--model", str(model_dir), "--mesh", "data=2,model=1"])
    with pytest.raises(SystemExit, match="expected data=D,model=M"):
        cli.main(["run", "--model", str(model_dir), "--mesh", "2x1"])
    with pytest.raises(SystemExit, match="--coordinator, --num-processes and --process-id go together"):
        cli.main(["--coordinator", "localhost:1234", "run", "--model", str(model_dir)])


def test_run_without_arguments_answers_the_bundled_example(tmp_path, monkeypatch, capsys):
    """The README's main job: the bundled model, image and question, SVD-Prune at 64/576 of its tokens."""
    monkeypatch.chdir(tmp_path)  # the picture goes to the working directory
    out = run_json(capsys)
    assert (tmp_path / f"kept_tokens_svd_{out['keep']}.png").is_file()
    example = bundled.example()
    assert out["method"] == "svd" and out["keep"] == round(64 / 576 * out["image_tokens"])
    assert out["question"] == example["question"] and out["truth"] == example["answer"]
    assert out["answer"] in ANSWERS[example["family"]], out["answer"]
    # unpruned, the bundled model knows the example (pruned to 22 tokens it may not: docs/results.md); the
    # unpruned answer printed beside the pruned one is the `full` method's
    full = run_json(capsys, "--method", "full", "--out", tmp_path / "full.png")
    assert full["answer"] == example["answer"] == out["unpruned_answer"] and full["unpruned_answer"] is None
    assert out["unpruned_seconds"] > 0


def test_run_shows_the_right_answer_only_for_the_bundled_example(model_dir, tmp_path, capsys):
    cli.main(["run", "--model", str(model_dir), "--out", str(tmp_path / "k.png")])
    assert "right answer:" in capsys.readouterr().out
    out = run_json(capsys, "--model", model_dir, "--prompt", "Is there a red circle?", "--out", tmp_path / "k.png")
    assert out["truth"] is None
