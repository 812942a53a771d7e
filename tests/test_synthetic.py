import collections
import dataclasses
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from svdprune_jax.synthetic.scene import (COLOURS, GLYPH_BITMAPS, GLYPHS, MIN_COVERAGE, PALETTE, QUADRANTS, SHAPES, SceneConfig,
                       glyph_rgb, render)
from svdprune_jax.synthetic.samples import (ANSWERS, FAMILIES, MAX_OBJECTS, MIN_OBJECTS, SPLITS, all_questions, family_stats, make_batch,
                           follow_ups, make_sample, quadrant_questions, scene_questions, split_seeds, write_samples)

CFG = SceneConfig()


@pytest.fixture(scope="module")
def samples():
    return [make_sample(s) for s in split_seeds("validation", 60)]  # one full answer cycle of every family


def _digest(s) -> str:
    h = hashlib.sha256(s.image.tobytes() + s.question.encode() + s.answer.encode() + s.mask.tobytes())
    for k in sorted(s.targets):
        h.update(s.targets[k].tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes_in_a_fresh_process():
    seeds = [0, 7, 1_000_000_123, 2_000_000_004]
    here = [_digest(make_sample(s)) for s in seeds]
    assert here == [_digest(make_sample(s)) for s in seeds]
    assert len(set(here)) == len(here)
    code = (f"import hashlib\nfrom svdprune_jax.synthetic.samples import make_sample\n{inspect.getsource(_digest)}\n"
            f"print(*[_digest(make_sample(s)) for s in {seeds}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.split() == here


def test_splits_are_disjoint(samples):
    ranges = sorted(SPLITS.values(), key=lambda r: r.start)
    assert all(a.stop <= b.start for a, b in zip(ranges, ranges[1:]))
    images = {split: {hashlib.sha256(make_sample(s).image.tobytes()).hexdigest() for s in split_seeds(split, 40)}
              for split in ("train", "test")}
    images["validation"] = {hashlib.sha256(s.image.tobytes()).hexdigest() for s in samples}
    assert sum(map(len, images.values())) == 40 + 40 + 60  # no duplicates within a split either
    assert not (images["train"] & images["validation"] or images["train"] & images["test"]
                or images["validation"] & images["test"])
    with pytest.raises(ValueError, match="out of range"):
        split_seeds("test", 10, start=len(SPLITS["test"]) - 5)
    with pytest.raises(ValueError, match="unknown split"):
        split_seeds("dev", 1)


def test_answers_balanced_within_families(samples):
    stats = family_stats([s.seed for s in samples])
    for f in FAMILIES:
        assert set(stats[f]["answers"]) == set(ANSWERS[f])
        assert len(set(stats[f]["answers"].values())) == 1, (f, stats[f]["answers"])
        assert stats[f]["majority"] == pytest.approx(1 / len(ANSWERS[f]))
        assert 0 < stats[f]["mask_share"] < 0.2  # the asked object is a small part of the image


def _quadrant(o) -> str:  # from the drawn position, not the stored label
    return f"{'top' if o.cy < CFG.image_size / 2 else 'bottom'} {'left' if o.cx < CFG.image_size / 2 else 'right'}"


def _solve(question: str, objects) -> tuple[str, list[int]]:
    """Answers a question from the scene description alone; returns the answer and the referent objects."""
    def find(**attrs):
        return [i for i, o in enumerate(objects) if all(v(o) == want for v, want in attrs.values())]
    name = dict(colour=lambda o: COLOURS[o.colour], shape=lambda o: SHAPES[o.shape], quadrant=_quadrant)
    if m := re.fullmatch(r"What color is the (\w+) in the (\w+ \w+)\?", question):
        (i,) = find(s=(name["shape"], m[1]), q=(name["quadrant"], m[2]))
        return COLOURS[objects[i].colour], [i]
    if m := re.fullmatch(r"What shape is the (\w+) object in the (\w+ \w+)\?", question):
        (i,) = find(c=(name["colour"], m[1]), q=(name["quadrant"], m[2]))
        return SHAPES[objects[i].shape], [i]
    if m := re.fullmatch(r"How many (\w+) (\w+)s are there\?", question):
        found = find(c=(name["colour"], m[1]), s=(name["shape"], m[2]))
        return str(len(found)), found
    if m := re.fullmatch(r"What is written on the (\w+) (\w+)\?", question):
        (i,) = find(c=(name["colour"], m[1]), s=(name["shape"], m[2]))
        return GLYPHS[objects[i].glyph], [i]
    m = re.fullmatch(r"Is there a (\w+) (\w+)\?", question)
    found = find(c=(name["colour"], m[1]), s=(name["shape"], m[2]))
    return ("yes" if found else "no"), found


def test_questions_have_one_referent_and_hard_negatives(samples):
    for s in samples:
        objs = s.scene.objects
        answer, referents = _solve(s.question, objs)
        assert answer == s.answer and referents == list(s.asked), s.seed
        assert MIN_OBJECTS <= len(objs) <= MAX_OBJECTS
        assert all(abs(o.cx - CFG.image_size / 2) >= o.size / 4 and abs(o.cy - CFG.image_size / 2) >= o.size / 4
                   for o in objs), "an object centre sits on a midline: its quadrant is ambiguous"
        if s.family in ("colour", "shape"):  # neither the quadrant alone nor the named attribute alone answers
            t = objs[s.asked[0]]
            named = (lambda o: o.shape == t.shape) if s.family == "colour" else (lambda o: o.colour == t.colour)
            asked = (lambda o: o.colour) if s.family == "colour" else (lambda o: o.shape)
            assert any(asked(o) != asked(t) for o in objs if _quadrant(o) == _quadrant(t))
            assert any(asked(o) != asked(t) for o in objs if named(o) and o is not t)


def test_scene_questions_are_answered_by_the_scene(samples):
    for s in samples:
        asked = scene_questions(s.scene.objects)
        assert (s.family, s.question, s.answer, s.family in ("colour", "shape")) in asked
        assert len({q for _, q, _, _ in asked}) == len(asked)
        for family, question, answer, needs_quadrant in asked:
            assert question in all_questions() and answer in ANSWERS[family]
            assert _solve(question, s.scene.objects)[0] == answer, (s.seed, question)  # raises if not unique
            # the question without its quadrant names several objects
            named = re.fullmatch(r"What (?:color is the (\w+)|shape is the (\w+) object) in the .*", question)
            attr = named and (("shape", named[1]) if named[1] else ("colour", named[2]))
            same = [o for o in s.scene.objects if attr and (SHAPES[o.shape], COLOURS[o.colour])[attr[0] == "colour"] == attr[1]]
            assert needs_quadrant == (len(same) > 1), (s.seed, question)


def test_follow_ups_are_seeded_spread_over_families_or_quadrant_first(samples):
    for s in samples:
        asked = {(q, a): (f, needs) for f, q, a, needs in scene_questions(s.scene.objects)}
        more = follow_ups(s.seed, 20)
        assert more == follow_ups(s.seed, 20) and follow_ups(s.seed, 3) == more[:3]
        assert s.question not in [q for q, _ in more] and all(t in asked for t in more)
        families = [asked[t][0] for t in more]
        assert all(families.count(f) <= 2 for f in FAMILIES if f not in ("presence", "count"))
        by_answer = [(asked[t][0], t[1]) for t in more if asked[t][0] in ("presence", "count")]
        assert len(set(by_answer)) == len(by_answer)
        hard = follow_ups(s.seed, 6, need_quadrant=4)
        n_needs = min(4, sum(needs for (q, _), (_, needs) in asked.items() if q != s.question))
        assert [asked[t][1] for t in hard[:n_needs]] == [True] * n_needs and all(t in asked for t in hard)
        assert min(6, len(more)) <= len(set(hard)) == len(hard) <= 6 and s.question not in [q for q, _ in hard]
        alone = quadrant_questions(s.scene.objects)
        first = follow_ups(s.seed, 6, need_quadrant=2, by_quadrant=2)
        n_alone = min(2, len(alone))
        assert all(t in alone for t in first[:n_alone]) and first[n_alone:] == follow_ups(s.seed, 6 - n_alone, 2)


def test_quadrant_questions_name_the_only_object_of_a_quadrant(samples):
    seen = 0
    for s in samples:
        for question, answer in quadrant_questions(s.scene.objects):
            kind, quadrant = re.fullmatch(r"What (color|shape) is the object in the (.*)\?", question).groups()
            here = [o for o in s.scene.objects if QUADRANTS[o.quadrant] == quadrant]
            assert len(here) == 1 and answer == (COLOURS[here[0].colour] if kind == "color" else SHAPES[here[0].shape])
            seen += 1
        per_quadrant = collections.Counter(o.quadrant for o in s.scene.objects)
        assert len(quadrant_questions(s.scene.objects)) == 2 * list(per_quadrant.values()).count(1)
    assert seen > 0
    assert not set(q for s in samples for q, _ in quadrant_questions(s.scene.objects)) & set(all_questions())


def test_masks_match_the_drawn_objects(samples):
    for s in samples:
        without = render(dataclasses.replace(s.scene, objects=tuple(o for i, o in enumerate(s.scene.objects)
                                                                      if i not in s.asked)))
        drawn = np.any(without != s.image, -1)  # exactly the asked objects' pixels
        share = drawn.reshape(CFG.grid, CFG.patch_size, CFG.grid, CFG.patch_size).mean((1, 3))
        np.testing.assert_allclose(s.coverage, share, atol=0.05)
        assert np.array_equal(s.mask, s.coverage >= MIN_COVERAGE)
        assert s.mask.any() == (s.answer != "no")
        if s.family == "colour":  # of the mask patches' pixels in a palette colour, most are in the answer's
            pix = s.image.reshape(CFG.grid, CFG.patch_size, CFG.grid, CFG.patch_size, 3).swapaxes(1, 2)[s.mask]
            dist = np.abs(pix.reshape(-1, 1, 3).astype(np.float32) - PALETTE).max(-1)
            in_palette = dist.argmin(-1)[dist.min(-1) < 40]
            assert np.bincount(in_palette, minlength=len(COLOURS)).argmax() == COLOURS.index(s.answer)
        if len(s.asked) == 1:  # stage-1 targets label the asked object's patches with its attributes
            o = s.scene.objects[s.asked[0]]
            assert (s.targets["colour"][s.mask] == o.colour).mean() > 0.9
            assert (s.targets["shape"][s.mask] == o.shape).mean() > 0.9
        assert np.all((s.targets["object"] < 0) == (s.targets["colour"] == len(COLOURS)))
        centres = {(o.cy // CFG.patch_size, o.cx // CFG.patch_size) for o in s.scene.objects}
        assert s.targets["centre"].sum() == len(centres) and all(s.targets["centre"][c] for c in centres)
        assert s.targets["counts"].sum() == len(s.scene.objects)


def test_counting_points_are_one_patch_of_each_object(samples):
    """Counting questions' oracle evidence: as many points as the answer on the counted objects, one on every
    other object, each on a patch its object is drawn on; no points for other families."""
    counts = [s for s in samples if s.family == "count"]
    assert counts and all(not s.points.any() for s in samples if s.family != "count")
    for s in counts:
        assert (s.points == 2).sum() == int(s.answer) == len(s.asked)
        assert (s.points == 1).sum() == len(s.scene.objects) - len(s.asked)
        for i, o in enumerate(s.scene.objects):
            alone = render(dataclasses.replace(s.scene, objects=(o,)))
            empty = render(dataclasses.replace(s.scene, objects=()))
            drawn = np.any(alone != empty, -1).reshape(CFG.grid, CFG.patch_size, CFG.grid, CFG.patch_size).mean((1, 3))
            mine = drawn * (s.points == (2 if i in s.asked else 1))
            assert mine.max() >= 0.5, f"seed {s.seed}: object {i} has no point on it"


def test_the_answer_glyph_is_drawn(samples):
    for s in (s for s in samples if s.family == "read"):
        o = s.scene.objects[s.asked[0]]
        box = s.image[o.cy - o.size // 2:o.cy + o.size // 2, o.cx - o.size // 2:o.cx + o.size // 2].astype(np.float32)
        stroke = np.abs(box - glyph_rgb(o)).max(-1) < 30
        ys, xs = np.nonzero(stroke)
        crop = stroke[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        scale = crop.shape[0] // 7
        assert crop.shape == (7 * scale, 5 * scale)
        assert np.array_equal(crop.reshape(7, scale, 5, scale).all((1, 3)), GLYPH_BITMAPS[s.answer]), s.seed
        patches = s.targets["glyph"] == GLYPHS.index(s.answer)
        assert patches.any() and np.all(s.mask[patches])


def test_make_batch_and_write_samples(tmp_path, samples):
    batch = make_batch([s.seed for s in samples[:5]])
    assert batch["image"].shape == (5, CFG.image_size, CFG.image_size, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == batch["targets"]["colour"].shape == (5, CFG.grid, CFG.grid)
    assert batch["question"] == [s.question for s in samples[:5]]
    path = write_samples(tmp_path, [s.seed for s in samples[:3]])
    meta = json.loads(path.read_text())
    assert meta["grid"] == CFG.grid and len(meta["samples"]) == 3
    for rec, s in zip(meta["samples"], samples):
        assert np.array_equal(np.asarray(Image.open(tmp_path / rec["image"])), s.image)
        assert rec["mask"] == np.flatnonzero(s.mask).tolist() and rec["answer"] == s.answer


def test_config_is_validated():
    for bad in (dict(image_size=100, patch_size=8), dict(image_size=24, patch_size=8), dict(object_sizes=(5.0,)),
                dict(object_sizes=(1.5, 2.0))):
        with pytest.raises(ValueError):
            SceneConfig(**bad)
    with pytest.raises(ValueError, match="seed"):
        make_sample(-1)
    small = SceneConfig(image_size=96, patch_size=8, object_sizes=(2.5,))  # other geometries work too
    assert make_sample(3, small).mask.shape == (12, 12)


def test_tokenizer_and_processor_load_in_transformers(tmp_path, samples):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil, PreTrainedTokenizerFast

    from svdprune_jax.synthetic.vocab import SPECIAL_TOKENS, prompt, save_processor_files
    save_processor_files(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    texts = [prompt(q) for q in all_questions()] + [a for answers in ANSWERS.values() for a in answers]
    ids = tok(texts).input_ids
    assert all(tok.unk_token_id not in x for x in ids)
    assert ids == PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))(texts).input_ids
    q = "What color is the circle in the top left?"
    assert tok.convert_ids_to_tokens(tok(prompt(q)).input_ids) == [
        "<s>", "USER", ":", "<image>", "What", "color", "is", "the", "circle", "in", "the", "top", "left", "?",
        "ASSISTANT", ":"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert tok.image_token == "<image>"
    assert tok(prompt(q).replace("<image>", "<image>" * 3)).input_ids.count(image_id) == 3
    assert tok.decode(tok.convert_tokens_to_ids(["yellow", "</s>"]), skip_special_tokens=True) == "yellow"

    proc = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(proc, CLIPImageProcessorPil)
    images = np.stack([s.image for s in samples[:2]])
    pv = proc([Image.fromarray(x) for x in images], return_tensors="np")["pixel_values"]
    mean, std = np.array(proc.image_mean), np.array(proc.image_std)
    want = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert pv.dtype == np.float32 and pv.shape == (2, 3, CFG.image_size, CFG.image_size)
    np.testing.assert_allclose(pv, want, atol=1e-5)
    other = proc(Image.fromarray(np.zeros((150, 200, 3), np.uint8)), return_tensors="np")["pixel_values"]
    assert other.shape == (1, 3, CFG.image_size, CFG.image_size)
