"""Baseline selectors against small NumPy re-implementations of each paper's rule (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svdprune_jax as sp

N, D = 48, 32


def data(seed=0, b=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, N, D)).astype(np.float32)
    attn = rng.dirichlet(np.ones(N), b).astype(np.float32)
    return x, attn


def top_k(scores, k):
    return np.sort(np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k])


def cosine_distance(x):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - xn @ xn.T


def ref_divprune(x, k):
    """DivPrune as stated: seed = the token with the farthest nearest neighbour, then repeatedly the
    candidate maximising its minimum distance to the chosen set (recomputed from scratch each step)."""
    dist = cosine_distance(np.asarray(x, np.float64))
    nn = np.where(np.eye(len(x), dtype=bool), np.inf, dist).min(1)
    chosen = [int(np.argmax(nn))]
    while len(chosen) < k:
        rest = [i for i in range(len(x)) if i not in chosen]
        chosen.append(rest[int(np.argmax([dist[i, chosen].min() for i in rest]))])
    return sorted(chosen)


def ref_visionzip(x, attn, k, contextual, keys):
    """VisionZip's released rule, step by step: dominant by attention, uniform targets among the rest,
    each other token joins its most cosine-similar target, contextual = target + mean of its group."""
    x, keys = np.asarray(x, np.float64), np.asarray(keys, np.float64)
    dom = top_k(attn, k - contextual)
    rest = [i for i in range(len(x)) if i not in set(dom)]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    others = [i for i in rest if i not in targets]
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    group = {t: [] for t in targets}
    for o in others:
        group[targets[int(np.argmax([kn[o] @ kn[t] for t in targets]))]].append(o)
    ctx = [x[t] + (x[group[t]].mean(0) if group[t] else 0.0) for t in targets]
    return np.concatenate([x[dom], np.stack(ctx)]), np.concatenate([dom, targets])


def ref_lrcp(x, rank):
    xc = np.asarray(x, np.float64) - x.mean(0)
    v = np.linalg.svd(xc, full_matrices=False)[2][:rank]
    return ((xc - xc @ v.T @ v) ** 2).sum(1)


def ref_energy_leverage(x, energy):
    """Leverage of the centred tokens at the fewest directions whose s^2 reach `energy` of the total."""
    u, s, _ = np.linalg.svd(np.asarray(x, np.float64) - x.mean(0), full_matrices=False)
    rank = int(np.searchsorted(np.cumsum(s ** 2) / (s ** 2).sum(), energy)) + 1
    return (u[:, :rank] ** 2).sum(1)


@pytest.mark.parametrize("method, options", [("norm", {}), ("cls_attention", {}), ("lrcp", {}),
                                             ("svd", dict(rank="k", center=False)), ("svd", {})])
def test_score_rules_match_numpy(method, options):
    x, attn = data()
    kept, idx = sp.prune(x, 9, method, cls_attention=attn, **options)
    for b in range(2):
        scores = {"norm": lambda: np.linalg.norm(x[b].astype(np.float64), axis=1),
                  "cls_attention": lambda: attn[b],
                  "lrcp": lambda: ref_lrcp(x[b], 4),
                  "svd": lambda: ((np.linalg.svd(x[b].astype(np.float64))[0][:, :9] ** 2).sum(1) if options
                                  else ref_energy_leverage(x[b], sp.SVD_DEFAULTS["energy"]))}[method]()
        np.testing.assert_array_equal(idx[b], top_k(scores, 9))
        np.testing.assert_array_equal(kept[b], x[b][idx[b]])


def test_divprune_matches_greedy_reference():
    x, _ = data(1)
    for k in (1, 12):
        _, idx = sp.prune(x, k, "divprune")
        for b in range(2):
            np.testing.assert_array_equal(idx[b], ref_divprune(x[b], k))


def test_divprune_distinct_on_duplicates():
    x = np.repeat(np.eye(4, 6, dtype=np.float32), 3, axis=0)  # 4 directions, each token three times
    idx = np.asarray(sp.prune(x, 6, "divprune")[1])
    assert len(set(idx)) == 6
    assert len({i // 3 for i in idx}) == 4  # all four directions covered before any repeat


@pytest.mark.parametrize("k,contextual,with_keys", [(16, None, False), (10, 4, True), (12, 0, False)])
def test_visionzip_matches_reference(k, contextual, with_keys):
    x, attn = data(2)
    keys = np.random.default_rng(3).standard_normal((2, N, 8)).astype(np.float32) if with_keys else None
    opts = {} if contextual is None else dict(contextual=contextual)
    kept, idx = sp.prune(x, k, "visionzip", cls_attention=attn, keys=keys, **opts)
    c = sp.visionzip_split(k)[1] if contextual is None else contextual
    for b in range(2):
        want_kept, want_idx = ref_visionzip(x[b], attn[b], k, c, x[b] if keys is None else keys[b]) if c else \
            (x[b][top_k(attn[b], k)], top_k(attn[b], k))
        np.testing.assert_array_equal(idx[b], want_idx)
        np.testing.assert_allclose(kept[b], want_kept, rtol=1e-5, atol=1e-5)


def ref_merge(x, kept):
    """Merge instead of drop, float64: each dropped token joins its most cosine-similar kept token; a kept
    token becomes the mean of itself and its joiners."""
    x = np.asarray(x, np.float64)
    dropped = np.setdiff1d(np.arange(len(x)), kept)
    to = np.argmax((1 - cosine_distance(x))[np.ix_(dropped, kept)], axis=1)
    total, count = x[kept].copy(), np.ones(len(kept))
    for j, t in zip(dropped, to):
        total[t] += x[j]
        count[t] += 1
    return total / count[:, None], count


@pytest.mark.parametrize("method", ["svd", "norm", "divprune", "random"])
def test_merge_instead_of_drop_matches_reference(method):
    x, attn = data(4)
    kept, idx = sp.prune(x, 9, method, merge=True, key=jax.random.key(1))
    np.testing.assert_array_equal(idx, sp.prune(x, 9, method, key=jax.random.key(1))[1])  # same selection
    for b in range(2):
        want, count = ref_merge(x[b], np.asarray(idx[b]))
        np.testing.assert_allclose(kept[b], want, rtol=1e-5, atol=1e-5)
        # every token counted once: group means times group sizes add up to the sum of all tokens
        np.testing.assert_allclose((np.asarray(kept[b], np.float64) * count[:, None]).sum(0), x[b].sum(0), atol=1e-4)


def test_merge_jit_vmap_batched_and_edges():
    x, _ = data(5, b=3)
    f = lambda x: sp.prune(x, 6, "svd", merge=True)
    eager = [f(x[b]) for b in range(3)]
    for got in (jax.jit(jax.vmap(f))(x), f(x)):
        for b in range(3):
            np.testing.assert_allclose(got[0][b], eager[b][0], atol=1e-5)
            np.testing.assert_array_equal(got[1][b], eager[b][1])
    np.testing.assert_array_equal(sp.prune(x, N, "norm", merge=True)[0], x)  # nothing dropped, nothing merged
    kept = sp.prune(jnp.asarray(x, jnp.bfloat16), 6, "norm", merge=True)[0]
    assert kept.dtype == jnp.bfloat16


def test_visionzip_split_follows_the_released_default():
    assert sp.visionzip_split(64) == (54, 10)
    assert [sp.visionzip_split(k) for k in (16, 32, 128, 192)] == [(13, 3), (27, 5), (108, 20), (162, 30)]
    assert sp.visionzip_split(4) == (3, 1) and sp.visionzip_split(3) == (3, 0)


def test_random_is_a_uniform_subset_per_image():
    x, _ = data(4, b=3)
    _, idx = sp.prune(x, 10, "random", key=jax.random.key(0))
    idx = np.asarray(idx)
    assert all(len(set(r)) == 10 and np.all(np.diff(r) > 0) for r in idx)
    assert not np.array_equal(idx[0], idx[1])  # independent per image
    np.testing.assert_array_equal(sp.prune(x, 10, "random", key=jax.random.key(0))[1], idx)  # deterministic
    assert not np.array_equal(sp.prune(x, 10, "random", key=jax.random.key(1))[1], idx)
    # uniform: over many keys every token is kept about k/N of the time
    keys = jax.random.split(jax.random.key(2), 200)
    picks = np.asarray(jax.vmap(lambda key: sp.prune(x[0], 12, "random", key=key)[1])(keys))
    freq = np.bincount(picks.ravel(), minlength=N) / 200
    assert np.abs(freq - 12 / N).max() < 0.12


def ref_fastv(attn_last, positions, keep):
    return np.stack([np.sort(p[np.argsort(-a[p], kind="stable")[:keep]]) for a, p in zip(attn_last, positions)])


def test_fastv_select():
    rng = np.random.default_rng(5)
    B, H, T, n = 2, 4, 30, 12
    probs = rng.dirichlet(np.ones(T), (B, H, 3)).astype(np.float32)  # (B, H, Tq, T)
    positions = np.stack([np.sort(rng.choice(T, n, replace=False)) for _ in range(B)]).astype(np.int32)
    want = ref_fastv(probs[:, :, -1].mean(1), positions, 5)
    for attn in (probs, probs[:, :, -1], probs[:, :, -1].mean(1)):  # (B,H,Tq,T), (B,H,T), (B,T)
        got = sp.fastv_select(jnp.asarray(attn), jnp.asarray(positions), 5)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, want)
    # without positions the keys are the image tokens
    np.testing.assert_array_equal(sp.fastv_select(probs[:, :, -1, :n], None, 5),
                                  ref_fastv(probs[:, :, -1, :n].mean(1), np.tile(np.arange(n), (B, 1)), 5))
    # rows holding fewer image tokens (LLaVA-NeXT's images) pad their positions, past the keys here: never kept,
    # even where the last key (where a clipped position lands) draws the most attention
    padded, spiked = positions.copy(), probs[:, :, -1].mean(1)
    padded[1, 9:], spiked[1, T - 1] = T, 1.0
    assert positions[1, 8] < T - 1
    mask = np.arange(n) < np.array([[n], [9]])
    got = sp.fastv_select(jnp.asarray(spiked), jnp.asarray(padded), 5, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(got[0], ref_fastv(spiked[:1], positions[:1], 5)[0])
    np.testing.assert_array_equal(got[1], ref_fastv(spiked[1:], positions[1:, :9], 5)[0])
    assert sp.fastv_keep_count(576) == 288 and sp.fastv_keep_count(576, 0.75) == 144
    assert (sp.FASTV_LAYER, sp.FASTV_RATIO) == (2, 0.5)


def test_fastv_bad_input():
    with pytest.raises(ValueError, match="attention must be"):
        sp.fastv_select(jnp.ones(5), None, 2)
    with pytest.raises(ValueError, match="image_positions must be"):
        sp.fastv_select(jnp.ones((2, 9)), jnp.zeros((3, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match=r"k=5 outside \[1, N=4\]"):
        sp.fastv_select(jnp.ones((2, 9)), jnp.zeros((2, 4), jnp.int32), 5)
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(B, n\) = \(2, 4\)"):
        sp.fastv_select(jnp.ones((2, 9)), jnp.zeros((2, 4), jnp.int32), 2, mask=jnp.ones((2, 9), bool))
    with pytest.raises(ValueError, match=r"keep=3 exceeds the image tokens of a row \(2; mask\)"):
        sp.fastv_select(jnp.ones((2, 9)), jnp.zeros((2, 4), jnp.int32), 3, mask=jnp.arange(4) < jnp.array([[4], [2]]))
    with pytest.raises(ValueError, match="ratio"):
        sp.fastv_keep_count(576, 1.0)
