"""Token-subset augmentation: training sequences whose image tokens are a subset of the grid, fed exactly as
inference feeds pruned tokens (kept features in spatial order, one image token each, at contiguous positions).

The subsets are drawn without looking at the image, the question or any score, so they favour no selector under
test: the size k is log-uniform over [min_tokens, N] (every budget the benchmark uses, from ~2% to 100%, gets
about the same weight per factor of two), and the shape is, with equal odds among a stage's `SHAPES`,
  - uniform: k patches drawn uniformly without replacement (the scattered subsets of random pruning, and of
    score-based selectors on cluttered images),
  - regions: a union of random axis-aligned rectangles (sides 1 .. ~sqrt(k)) grown until it holds k patches,
    trimmed at random within the last rectangle (the compact blobs of object-centred selectors and of an oracle),
  - objects: whole objects of the scene taken in a random order (each object's patches, the last trimmed at
    random; background patches drawn uniformly once the objects run out): object-only sequences, as an oracle
    or a selector that concentrates on objects produces them, with the objects chosen blind to the question.
A share of rows keeps the full grid, so the unpruned reader is trained on as before.
"""
import numpy as np
from scipy import ndimage

SHAPES = ("uniform", "regions", "objects")


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


def object_labels(kind: np.ndarray, background: int) -> np.ndarray:
    """Objects of a patch map of kinds (e.g. colour-shape bindings, `background` for none): each 4-connected
    patch region of one kind gets its own label 0, 1, ...; background -1."""
    labels = np.full(kind.shape, -1)
    for value in np.unique(kind[kind != background]):
        parts, n = ndimage.label(kind == value)
        labels[parts > 0] = labels.max() + parts[parts > 0]
    return labels


def object_subset(rng: np.random.Generator, labels: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of k patches: whole objects of `labels` (`object_labels`) in a random order, the last one
    trimmed at random, then background patches drawn uniformly if the objects hold fewer than k."""
    flat = labels.ravel()
    objects = [np.flatnonzero(flat == o) for o in rng.permutation(np.unique(flat[flat >= 0]))]
    taken = np.concatenate([*objects, rng.permutation(np.flatnonzero(flat < 0))]).astype(int)
    last = taken[:k]
    # the object that straddles the k-th slot loses random patches rather than its tail in raster order
    cut = next((o for o in objects if np.isin(o, last).any() and not np.isin(o, last).all()), None)
    if cut is not None:
        whole = last[~np.isin(last, cut)]
        last = np.concatenate([whole, rng.choice(cut, size=k - len(whole), replace=False)])
    return np.sort(last)


def draw_subset(rng: np.random.Generator, grid: int, min_tokens: int, shapes: tuple[str, ...] = SHAPES[:2],
                objects: np.ndarray | None = None) -> np.ndarray:
    """Sorted kept indices into the grid*grid patches: a log-uniform size, a shape drawn from `shapes` with equal
    odds ("objects" needs the image's `objects`, an `object_labels` map)."""
    k = draw_size(rng, grid * grid, min_tokens)
    shape = shapes[int(rng.random() * len(shapes))]
    if shape == "objects":
        if objects is None:
            raise ValueError("the 'objects' subset shape needs the image's object labels")
        return object_subset(rng, objects, k)
    return {"uniform": uniform_subset, "regions": region_subset}[shape](rng, grid, k)


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
