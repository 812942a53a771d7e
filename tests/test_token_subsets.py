"""Token-subset augmentation: subsets of the asked size and kind, and rows that read exactly what a pruned
prompt at inference reads (the pipeline's expand + left_pad of the same prompt, the kept features in order)."""
import numpy as np
import pytest

from svdprune_jax.inference.pipeline import expand, left_pad
from svdprune_jax.synthetic.token_subsets import (apply_subset, draw_size, draw_subset, object_labels, object_subset,
                                                 region_subset, uniform_subset)

IMG, PAD = 7, 0


@pytest.mark.parametrize("k", [1, 4, 11, 22, 49, 100, 196])
@pytest.mark.parametrize("shape", [uniform_subset, region_subset])
def test_subsets_have_k_distinct_sorted_patches(k, shape):
    rng = np.random.default_rng(k)
    for _ in range(20):
        kept = shape(rng, 14, k)
        assert len(kept) == k and (np.diff(kept) > 0).all() and 0 <= kept[0] and kept[-1] < 196


def test_regions_are_compact_and_uniform_subsets_are_not():
    """Mean distance of a kept patch to its nearest kept neighbour: regions are blobs (about 1 patch), uniform
    subsets of the same size are spread out."""
    def spacing(kept):
        yx = np.stack(np.divmod(kept, 14), 1).astype(float)
        d = np.linalg.norm(yx[:, None] - yx[None], axis=-1) + np.eye(len(kept)) * 1e9
        return d.min(1).mean()
    rng = np.random.default_rng(0)
    regions = np.mean([spacing(region_subset(rng, 14, 11)) for _ in range(50)])
    uniform = np.mean([spacing(uniform_subset(rng, 14, 11)) for _ in range(50)])
    assert regions < 1.15 < 2.0 < uniform


def test_sizes_are_log_uniform_over_the_range():
    rng = np.random.default_rng(0)
    sizes = np.array([draw_size(rng, 196, 4) for _ in range(20000)])
    assert sizes.min() == 4 and sizes.max() == 196
    # equal mass per factor of two (4-8, 8-16, ..., 64-128): within 2 points of 1/log2(197/4)
    share = [np.mean((sizes >= lo) & (sizes < 2 * lo)) for lo in (4, 8, 16, 32, 64)]
    assert np.allclose(share, 1 / np.log2(197 / 4), atol=0.02), share
    kinds = [draw_subset(rng, 14, 4) for _ in range(2000)]
    assert all(4 <= len(k) <= 196 for k in kinds)


def test_pruned_row_is_what_inference_feeds():
    prompt = [1, 5, IMG, 6, 8]  # <s> USER: <image> question ASSISTANT:
    n, d, answer = 12, 3, [9, 2]
    full = expand(prompt, IMG, n) + answer
    ids, mask = left_pad([full, [1] * (len(full) + 4)], PAD)  # a longer row in the batch: this one is padded
    labels = np.full(ids.shape[1], -1)
    labels[-2:] = answer
    feats = np.arange(n * d, dtype=np.float32).reshape(n, d)
    kept = np.array([1, 4, 5, 10])
    f, i, m, lab = apply_subset(feats, ids[0], mask[0], labels, kept, IMG, PAD)
    want_ids, want_mask = left_pad([expand(prompt, IMG, len(kept)) + answer, [1] * (len(full) + 4)], PAD)
    np.testing.assert_array_equal(i, want_ids[0])
    np.testing.assert_array_equal(m, want_mask[0])
    np.testing.assert_array_equal(f[:len(kept)], feats[kept])
    assert lab[-2:].tolist() == answer and (lab[:-2] == -1).all() and len(f) == n


def test_apply_subset_refuses_a_feature_count_mismatch():
    ids = np.array(expand([1, IMG, 2], IMG, 5))
    with pytest.raises(ValueError, match="5 image tokens for 6 features"):
        apply_subset(np.zeros((6, 2)), ids, np.ones_like(ids), -np.ones_like(ids), np.array([0]), IMG, PAD)


def test_object_labels_recover_the_scenes_objects():
    """Connected regions of one colour-shape binding, against the scene's own object map (dense_targets'
    `object`): no object is ever split, and the same partition on most scenes (two touching objects of one
    binding merge: 5 of these 40 scenes)."""
    from svdprune_jax.synthetic.samples import make_sample
    from svdprune_jax.synthetic.scene import COLOURS, SHAPES, SceneConfig

    cfg, same = SceneConfig(), []
    for seed in range(40):
        t = make_sample(seed, cfg).targets
        ours = object_labels(t["colour"] * (len(SHAPES) + 1) + t["shape"], len(COLOURS) * (len(SHAPES) + 1) + len(SHAPES))
        np.testing.assert_array_equal(ours < 0, t["object"] < 0)
        for o in np.unique(t["object"][t["object"] >= 0]):
            assert len(np.unique(ours[t["object"] == o])) == 1, (seed, o)  # never split
        same.append(len(np.unique(ours)) == len(np.unique(t["object"])))
    assert np.mean(same) >= 0.85, np.mean(same)


@pytest.mark.parametrize("k", [1, 3, 7, 9, 12, 30])
def test_object_subsets_take_whole_objects_first(k):
    """Every object is kept whole or not at all, except at most one (the last, trimmed); background only once
    every object is in."""
    kind = np.full((6, 6), 9)
    kind[0:2, 0:2] = 1
    kind[4:6, 4:6] = 1
    kind[0:3, 4] = 2
    labels = object_labels(kind, 9)
    assert sorted(np.unique(labels).tolist()) == [-1, 0, 1, 2]
    rng = np.random.default_rng(k)
    for _ in range(20):
        kept = object_subset(rng, labels, k)
        assert len(kept) == k and (np.diff(kept) > 0).all()
        flat = labels.ravel()
        partial = [o for o in range(3) if 0 < np.isin(np.flatnonzero(flat == o), kept).sum() < (flat == o).sum()]
        assert len(partial) <= 1
        if (flat[kept] < 0).any():
            assert (flat >= 0).sum() == np.isin(np.flatnonzero(flat >= 0), kept).sum()


def test_object_shape_needs_the_labels():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="object labels"):
        for _ in range(50):
            draw_subset(rng, 14, 4, ("objects",))
