"""Token-subset augmentation: training sequences whose image tokens are a subset of the grid, fed exactly as
inference feeds pruned tokens (kept features in spatial order, one image token each, at contiguous positions).

The subsets are drawn without looking at the image, the question or any score, so they favour no selector under
test: the size k is log-uniform over [min_tokens, N] (every budget the benchmark uses, from ~2% to 100%, gets
about the same weight per factor of two), and the shape is, with equal odds,
  - uniform: k patches drawn uniformly without replacement (the scattered subsets of random pruning, and of
    score-based selectors on cluttered images), or
  - regions: a union of random axis-aligned rectangles (sides 1 .. ~sqrt(k)) grown until it holds k patches,
    trimmed at random within the last rectangle (the compact blobs of object-centred selectors and of an oracle).
A share of rows keeps the full grid, so the unpruned reader is trained on as before.
"""
import numpy as np


def draw_size(rng: np.random.Generator, n: int, min_tokens: int) -> int:
    """Log-uniform integer in [min_tokens, n]."""
    lo, hi = np.log(min_tokens), np.log(n + 1)
    return int(min(n, max(min_tokens, np.floor(np.exp(rng.uniform(lo, hi))))))


def uniform_subset(rng: np.random.Generator, grid: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(grid * grid, size=k, replace=False))


def region_subset(rng: np.random.Generator, grid: int, k: int) -> np.ndarray:
    """Sorted indices of k patches forming a union of random rectangles."""
    taken = np.zeros((grid, grid), bool)
    side = max(2, int(round(np.sqrt(k))))
    while taken.sum() < k:
        h, w = rng.integers(1, side + 1, size=2)
        y, x = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        rect = np.zeros_like(taken)
        rect[y:y + h, x:x + w] = True
        new = np.flatnonzero(rect & ~taken)
        excess = taken.sum() + len(new) - k
        if excess > 0:
            new = rng.choice(new, size=len(new) - excess, replace=False)
        taken.flat[new] = True
    return np.flatnonzero(taken)


def draw_subset(rng: np.random.Generator, grid: int, min_tokens: int) -> np.ndarray:
    """Sorted kept indices into the grid*grid patches: a log-uniform size, uniform or region shape."""
    k = draw_size(rng, grid * grid, min_tokens)
    return (uniform_subset if rng.random() < 0.5 else region_subset)(rng, grid, k)


def apply_subset(features: np.ndarray, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, kept: np.ndarray,
                 image_token_id: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """One left-padded row reading only the `kept` image tokens: features (N, D) with the kept rows first (in
    the given order; the rest are never read), and ids / mask / labels (T,) with N - k image tokens removed and
    as many pads added on the left, so the row keeps its length and its answers their columns."""
    is_img = ids == image_token_id
    n = int(is_img.sum())
    if n != len(features):
        raise ValueError(f"row has {n} image tokens for {len(features)} features")
    drop = np.flatnonzero(is_img)[len(kept):]
    keep = np.ones(len(ids), bool)
    keep[drop] = False
    pad = len(drop)
    out_feats = np.concatenate([features[kept], features[:n - len(kept)]])
    shift = lambda a, fill: np.concatenate([np.full(pad, fill, a.dtype), a[keep]])
    return out_feats, shift(ids, pad_id), shift(mask, 0), shift(labels, -1)


def apply_subsets(rows: list[np.ndarray], kept: dict[int, np.ndarray], image_token_id: int, pad_id: int) -> None:
    """`apply_subset` on row i of the batch arrays `rows` (features, ids, mask, labels) for each i in `kept`,
    in place."""
    for i, indices in kept.items():
        for a, v in zip(rows, apply_subset(*(a[i] for a in rows), indices, image_token_id, pad_id)):
            a[i] = v
