"""Pictures people would rather look at than read: which patches were kept, accuracy against budget."""
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def kept_overlay(image: Image.Image, kept: Sequence[int] | None, image_size: int, patch_size: int,
                 scale: int = 4) -> Image.Image:
    """The image as the model sees it (resized to image_size), pruned patches dimmed, kept ones outlined.

    kept: patch indices in row-major grid order (None: all kept)."""
    grid = image_size // patch_size
    seen = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    big = seen.resize((image_size * scale, image_size * scale), Image.NEAREST)
    keep = np.ones(grid * grid, bool) if kept is None else np.isin(np.arange(grid * grid), np.asarray(kept))
    dim = np.asarray(big, np.float32)
    cell = patch_size * scale
    mask = np.kron(keep.reshape(grid, grid), np.ones((cell, cell), bool))
    dim[~mask] = dim[~mask] * 0.25 + 40
    out = Image.fromarray(dim.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i in np.flatnonzero(keep) if kept is not None else ():
        r, c = divmod(int(i), grid)
        draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 40, 200), width=2)
    return out


def accuracy_plot(rows: Sequence[dict], path: str | Path, title: str):
    """Accuracy vs kept image tokens, one line per method (rows: method, keep, accuracy)."""
    from matplotlib.figure import Figure  # no pyplot: no backend switched under a caller (a notebook's inline one)

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["keep"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image tokens kept")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
