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


def kept_grid(images: Sequence[Image.Image], kept: dict[str, Sequence[Sequence[int] | None]], image_size: int,
              patch_size: int, title: str = "", scale: int = 2) -> Image.Image:
    """One row of `kept_overlay` panels per method (its name on the left, its kept-token count on each panel),
    one column per image: kept[method][i] are the patches kept of images[i]."""
    cell, label, top = image_size * scale, 6 * max(map(len, kept), default=0) + 12, 20
    grid = Image.new("RGB", (label + cell * len(images), top + cell * len(kept)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for row, (method, per_image) in enumerate(kept.items()):
        y = top + row * cell
        draw.text((4, y + cell // 2 - 6), method, fill=(0, 0, 0))
        for col, (image, k) in enumerate(zip(images, per_image)):
            grid.paste(kept_overlay(image, k, image_size, patch_size, scale), (label + col * cell, y))
            draw.text((label + col * cell + 3, y + 2), "all" if k is None else str(len(k)), fill=(255, 255, 0))
    return grid


def accuracy_plot(rows: Sequence[dict], path: str | Path, title: str, x: str = "keep"):
    """Accuracy vs kept image tokens (`x`: the row key on the x axis, e.g. "mean_keep" for adaptive budgets),
    one line per method (rows: method, x, accuracy). Rows with ci_low/ci_high get them as error bars; rows with
    an adaptive target are drawn dashed with square markers, so fixed and adaptive budgets share the axes."""
    from matplotlib.figure import Figure  # no pyplot: no backend switched under a caller (a notebook's inline one)

    fig = Figure(figsize=(7.2, 4.6))
    ax = fig.subplots()
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r[x], r["accuracy"], r.get("ci_low"), r.get("ci_high")) for r in rows if r["method"] == method)
        xs, ys, lows, highs = zip(*pts)
        err = None if None in lows + highs else [np.subtract(ys, lows), np.subtract(highs, ys)]
        adaptive = any(r.get("adaptive") is not None for r in rows if r["method"] == method)
        cycle = i // 10  # past ten methods the colours repeat: another marker and line style tell them apart
        ax.errorbar(xs, ys, yerr=err, color=f"C{i % 10}", marker="s" if adaptive else "o^"[cycle % 2],
                    linestyle="--" if adaptive else "-:"[cycle % 2], capsize=3, markersize=4, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image tokens kept" + (" (mean over images)" if x == "mean_keep" else ""))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
