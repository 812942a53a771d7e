"""Smoke tests of the bundled model's training (svdprune_jax.synthetic.train) on the tiny recipe: every stage learns, an interrupted
run resumes to exactly the state of an uninterrupted one, and the export loads in transformers with our logits."""
import dataclasses

import numpy as np
import pytest
from flax import traverse_util

from svdprune_jax.synthetic import train as T
from svdprune_jax.synthetic.samples import follow_ups, make_sample
from svdprune_jax.synthetic.vocab import EOS, build_tokenizer, image_processor

RECIPE = T.RECIPES["tiny"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny recipe through its last stage twice: once straight, once stopped in stage 1 and again in stage 2."""
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    T.Run(RECIPE, straight, workers=1).run(until="2")
    for max_steps in (3, 6, None):  # stage 1 stops at 3/8; then stage 1 ends and stage 2 stops at 6/8; then done
        T.Run(RECIPE, resumed, workers=1).run(until="2", max_steps=max_steps)
    return straight, resumed


def _losses(history: T.History, stage: int) -> list[float]:
    return [r["loss"] for r in history.records if r["stage"] == stage and r["kind"] == "train"]


def test_every_stage_learns(runs):
    history = T.History(runs[0] / "history.jsonl")
    for stage, spec in enumerate(RECIPE.stages, 1):
        loss = _losses(history, stage)
        assert len(loss) == spec.steps
        assert np.mean(loss[-2:]) < 0.8 * np.mean(loss[:2]), (stage, loss)
    val = [r for r in history.records if r["kind"] == "val"]
    assert {r["stage"] for r in val} == {1, 2} and all("overall" in r for r in val if r["stage"] > 1)


def test_resume_reproduces_the_uninterrupted_run(runs):
    straight, resumed = (np.load(d / "stage2.npz") for d in runs)
    assert straight.files == resumed.files
    for k in set(straight.files) - {"seconds"}:  # training wall time differs
        np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)
    assert straight["seconds"] > 0 and resumed["seconds"] > 0
    a, b = (T.History(d / "history.jsonl") for d in runs)
    assert [_losses(a, s) for s in (1, 2)] == [_losses(b, s) for s in (1, 2)]


def test_checkpoint_round_trip(runs, tmp_path):
    graphdef, states = T.build(RECIPE)
    stage, step, _, opt = T.load_checkpoint(runs[1] / "stage2.npz", states)
    assert (stage, step, opt) == (2, RECIPE.stages[1].steps, None)
    T.save_checkpoint(tmp_path / "again.npz", states, None, stage, step, 0.0)
    a, b = np.load(runs[1] / "stage2.npz"), np.load(tmp_path / "again.npz")
    for k in a.files:
        if k != "seconds":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_export_loads_in_transformers_with_our_logits(runs, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlavaForConditionalGeneration

    run = T.Run(RECIPE, runs[0], workers=1)
    T.load_checkpoint(runs[0] / "stage2.npz", run.states)
    model = T.merge(run.graphdef, run.states).model
    T.export(model, run.scene, tmp_path / "hf")
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = np.asarray(T.vqa_eval(run.states, {k: run.val[k][:4] for k in ("image", "ids", "mask", "labels")},
                               graphdef=run.graphdef))
    pixels = np.asarray(T.pixel_values(run.val["image"][:4]))
    ids, mask = run.val["ids"][:4, :-1], run.val["mask"][:4, :-1]
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0)  # as ours and generate: 0 at the first real token
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(position_ids), pixel_values=torch.tensor(pixels)).logits[:, -2:].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_multi_turn_ids_label_every_answer_after_the_one_turn_prompt():
    samples = [make_sample(s) for s in range(5)]
    questions, answers = [s.question for s in samples], [s.answer for s in samples]
    follow = [follow_ups(s.seed, 3) for s in samples]
    one, one_mask, one_labels = T.vqa_ids(questions, answers, 6)
    ids, mask, labels = T.vqa_ids(questions, answers, 6, follow, turns=3)
    tok = build_tokenizer()
    for i, s in enumerate(samples):
        row = ids[i, mask[i] == 1].tolist()
        first = one[i, one_mask[i] == 1].tolist()
        assert row[:len(first)] == first  # the first turn is exactly the one-turn sequence
        said = tok.decode(row[len(first):])
        assert said == " ".join(f"USER : {q} ASSISTANT : {a}" for q, a in follow[i][:2]).replace("?", " ?").replace("  ", " ")
        want = [w for a in [s.answer] + [a for _, a in follow[i][:2]] for w in (a, EOS)]
        assert [tok.id_to_token(t) for t in labels[i][labels[i] >= 0]] == want
        assert (mask[i][labels[i] >= 0] == 1).all()
    assert (one_labels[:, -2] == one[:, -2]).all() and (one_labels[:, :-2] == -1).all()


def test_pixel_values_match_the_clip_processor():
    images = np.stack([make_sample(s).image for s in (3, 4)])
    want = image_processor()(images=list(images), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(np.asarray(T.pixel_values(images)), want, atol=1e-5)


def test_order_visits_every_sample_once_per_epoch():
    n, batch = 10, 4
    seen = np.concatenate([T.order(0, 1, step, batch, n) for step in range(5)])  # two epochs
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))
    assert not np.array_equal(seen[:n], seen[n:2 * n])
    np.testing.assert_array_equal(T.order(0, 1, 3, batch, n), seen[12:16])




@pytest.fixture(scope="module")
def subset_run(tmp_path_factory, runs):
    """A fine-tuning recipe in the bundled_subsets / bundled_objects shape on the tiny model: starts from the
    straight run's export, skips stage 1, and reads token subsets of every shape in 3 of 4 sequences."""
    init = runs[0] / "hf"
    if not init.exists():
        T.Run(RECIPE, runs[0], workers=1).run(until="export")
    recipe = dataclasses.replace(RECIPE, init=str(init), stages=(
        T.Stage(0, 8, 3e-3, 0), dataclasses.replace(RECIPE.stages[1], subsets=0.75, min_tokens=2,
                                                       subset_shapes=("uniform", "regions", "objects"))))
    out = tmp_path_factory.mktemp("subsets")
    run = T.Run(recipe, out, workers=1)
    return run, init


def test_init_starts_from_the_exported_weights(subset_run):
    from flax import nnx

    from svdprune_jax.convert import load_model
    run, init = subset_run
    want = nnx.to_pure_dict(nnx.state(load_model(init), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(T.merge(run.graphdef, run.states).model, nnx.Param))
    for (path, a), (_, b) in zip(sorted(traverse_util.flatten_dict(want).items()),
                                 sorted(traverse_util.flatten_dict(got).items())):
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_subset_batches_are_pruned_prompts_and_reproducible(subset_run):
    run, _ = subset_run
    idx = T.order(run.recipe.seed, 2, 0, 8, len(run.train["question"]))
    a, b = run.batch(2, 0, idx), run.batch(2, 0, idx)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)  # a pure function of the step
    full = run.vqa_inputs(run.recipe.stages[1])[0][np.sort(idx)]
    img = run.cfg.image_token_id
    counts = (np.asarray(a["ids"]) == img).sum(1)
    n = run.cfg.num_image_tokens
    assert (counts < n).any() and (counts <= n).all() and (counts >= 2).all()
    # the rows keep their text: the same ids once the image tokens are taken out
    for row, ref in zip(np.asarray(a["ids"]), full):
        pad = build_tokenizer().token_to_id("<pad>")
        strip = lambda r: [t for t in r if t not in (img, pad)]
        assert strip(row) == strip(ref)


def test_subset_recipe_trains_and_reports_the_bracket(subset_run):
    run, _ = subset_run
    run.run(until="2")
    val = [r for r in run.history.records if r["kind"] == "val"]
    assert val and all({"random22", "oracle22", "random11", "oracle11"} <= set(r) for r in val)
    assert all(0 <= r["oracle11"] <= 1 for r in val)
