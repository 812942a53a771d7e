"""Pictures people would rather look at than read: which patches were kept, accuracy against budget."""
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUTLINE = (255, 40, 200)  # kept patches' frame colour: magenta, rare in photographs and in the synthetic scenes


@dataclasses.dataclass(frozen=True)
class CropGeometry:
    """How a CLIP image processor turns an image into the tower's input, so a picture can show what the model saw.

    transformers' CLIPImageProcessor(Pil): resize (bicubic by default) so the short side is `shortest_edge` and
    the long side int(shortest_edge * long / short), or to `size` (h, w) exactly when the config gives height and
    width; then the centre `crop` (h, w), offset (resized - crop) // 2 on each axis and zero-filled where the
    resized image is smaller. A non-square image thus loses the ends of its long side: squashing it whole to a
    square would put the patch outlines on other pixels than the ones the tower read."""
    shortest_edge: int | None = None
    size: tuple[int, int] | None = None   # (height, width) when the processor resizes to a fixed size
    crop: tuple[int, int] | None = None   # (height, width); None: no centre crop
    resample: int = Image.BICUBIC

    @classmethod
    def square(cls, image_size: int) -> "CropGeometry":
        """LLaVA-1.5's CLIP processor (and the bundled model's): short side to image_size, centre square."""
        return cls(shortest_edge=image_size, crop=(image_size, image_size))

    @classmethod
    def of(cls, processor) -> "CropGeometry":
        """From a transformers image processor's settings (do_resize, size, do_center_crop, crop_size, resample)."""
        def field(d, key):  # processors hold plain dicts or transformers' SizeDict
            return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

        size, crop = processor.size, processor.crop_size
        resize = getattr(processor, "do_resize", True)
        shortest = field(size, "shortest_edge") if resize else None
        fixed = (field(size, "height"), field(size, "width")) if resize and shortest is None else None
        if fixed is not None and None in fixed:
            raise ValueError(f"processor size {size!r}: expected shortest_edge or height and width")
        centre = (field(crop, "height"), field(crop, "width")) if getattr(processor, "do_center_crop", True) else None
        resample = getattr(processor, "resample", None)
        return cls(shortest, fixed, centre, Image.BICUBIC if resample is None else int(resample))

    def apply(self, image: Image.Image) -> Image.Image:
        """The RGB image the processor hands on to rescaling and normalisation."""
        image = image.convert("RGB")
        w, h = image.size
        if self.shortest_edge is not None:
            short, long = (w, h) if w <= h else (h, w)
            long = int(self.shortest_edge * long / short)
            image = image.resize((self.shortest_edge, long) if w <= h else (long, self.shortest_edge), self.resample)
        elif self.size is not None:
            image = image.resize((self.size[1], self.size[0]), self.resample)
        if self.crop is None:
            return image
        (ch, cw), (w, h) = self.crop, image.size
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))  # PIL fills outside the image with zeros, as transformers


def kept_overlay(image: Image.Image, kept: Sequence[int] | None, image_size: int, patch_size: int,
                 scale: int = 4, geometry: CropGeometry | None = None) -> Image.Image:
    """The image as the model sees it (the processor's resize and centre crop, `geometry`; default
    `CropGeometry.square(image_size)`), pruned patches dimmed, kept ones outlined.

    kept: patch indices in row-major grid order (None: all kept)."""
    grid = image_size // patch_size
    seen = (geometry or CropGeometry.square(image_size)).apply(image)
    if seen.size != (image_size, image_size):
        raise ValueError(f"the processor's crop is {seen.size[0]}x{seen.size[1]} px, not the tower's "
                         f"{image_size}x{image_size}: the patch grid would not line up")
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
        draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=OUTLINE, width=2)
    return out


def kept_grid(images: Sequence[Image.Image], kept: dict[str, Sequence[Sequence[int] | None]], image_size: int,
              patch_size: int, title: str = "", scale: int = 2, geometry: CropGeometry | None = None) -> Image.Image:
    """One row of `kept_overlay` panels per method (its name on the left, its kept-token count on each panel),
    one column per image: kept[method][i] are the patches kept of images[i]; geometry as in `kept_overlay`."""
    cell, label, top = image_size * scale, 6 * max(map(len, kept), default=0) + 12, 20
    grid = Image.new("RGB", (label + cell * len(images), top + cell * len(kept)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for row, (method, per_image) in enumerate(kept.items()):
        y = top + row * cell
        draw.text((4, y + cell // 2 - 6), method, fill=(0, 0, 0))
        for col, (image, k) in enumerate(zip(images, per_image)):
            grid.paste(kept_overlay(image, k, image_size, patch_size, scale, geometry), (label + col * cell, y))
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
