"""Pictures people would rather look at than read: which patches were kept, accuracy against budget."""
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from svdprune_jax.models import anyres
from svdprune_jax.models.llava_next import LlavaNextConfig

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

    kept: patch indices in row-major grid order (None: all kept; ValueError for an index outside the grid)."""
    grid = image_size // patch_size
    seen = (geometry or CropGeometry.square(image_size)).apply(image)
    if seen.size != (image_size, image_size):
        raise ValueError(f"the processor's crop is {seen.size[0]}x{seen.size[1]} px, not the tower's "
                         f"{image_size}x{image_size}: the patch grid would not line up")
    big = seen.resize((image_size * scale, image_size * scale), Image.NEAREST)
    r, c = np.divmod(np.arange(grid * grid), grid)
    return shade(big, np.stack([c, r, c + 1, r + 1], 1) * (patch_size * scale), keep_mask(kept, grid * grid))


def anyres_panels(image: Image.Image, kept: Sequence[int] | None, pinpoints, tile: int, patch_size: int,
                  scale: int | None = None) -> tuple[Image.Image, Image.Image]:
    """LLaVA-NeXT's kept tokens on the original image, in two panels of one size: the base view's (a coarse
    side x side grid over the whole image) and the crops' (the fine grid of the unpadded crops, white lines
    between crops), pruned tokens dimmed and kept ones outlined. Each token's region is `anyres.patch_boxes`, so
    wide and tall images map exactly; the strips that unpadding drops (under one token wide) are dimmed as well.

    kept: image-token numbers in packed order (`Answer.kept_indices`; None: all kept). The panels show the image
    at the size it has on the crops' canvas times `scale` (default: a crop patch at least 12 px), so a fine
    patch is a whole number of pixels."""
    image = image.convert("RGB")
    size = (image.height, image.width)
    side = tile // patch_size
    boxes = anyres.patch_boxes(size, pinpoints, tile, side)
    keep = keep_mask(kept, len(boxes))
    is_base = anyres.image_tokens(size, pinpoints, tile, side).tokens < side * side
    scale = scale or -(-12 // patch_size)
    ph, pw = anyres.best_resolution(size, pinpoints)
    h, w = anyres.resized_size(size, (ph, pw))
    shown = image.resize((w * scale, h * scale), Image.BICUBIC)
    at = boxes * np.array([w / size[1], h / size[0]] * 2) * scale
    width = 2 if patch_size * scale >= 24 else 1  # a 2 px frame would cover half of a 14 px patch
    base, crops = (shade(shown, at[part], None if keep is None else keep[part], width) for part in (is_base, ~is_base))
    draw = ImageDraw.Draw(crops)
    for i in range(1, ph // tile):  # crop edges on the canvas, less the padding above (left of) the image
        y = (i * tile - (ph - h) // 2) * scale
        draw.line([(0, y), (crops.width, y)], fill=(255, 255, 255))
    for i in range(1, pw // tile):
        x = (i * tile - (pw - w) // 2) * scale
        draw.line([(x, 0), (x, crops.height)], fill=(255, 255, 255))
    return base, crops


def anyres_overlay(image: Image.Image, kept: Sequence[int] | None, pinpoints, tile: int, patch_size: int,
                   scale: int | None = None) -> Image.Image:
    """`anyres_panels` side by side (stacked for a wide image, so the picture stays near square) under a caption:
    the tokens kept of each view."""
    size = (image.height, image.width)
    side = tile // patch_size
    tokens = anyres.image_tokens(size, pinpoints, tile, side)
    view = tokens.tokens // (side * side)
    keep = keep_mask(kept, len(view))
    total = np.bincount(view, minlength=tokens.views)
    kept_of = total if keep is None else np.bincount(view[keep], minlength=tokens.views)
    (gh, gw), (ph, pw) = tokens.grid, anyres.best_resolution(size, pinpoints)
    wide = size[1] > size[0]
    first, second = ("top", "bottom") if wide else ("left", "right")
    lines = [f"{first}: base view (the whole image at {tile}x{tile}), {kept_of[0]} of {total[0]} tokens kept",
             f"{second}: {gh}x{gw} crops (the image at {pw}x{ph}, unpadded), {kept_of[1:].sum()} of "
             f"{total[1:].sum()} kept",
             "per crop, row by row: " + "  ".join(f"{k}/{n}" for k, n in zip(kept_of[1:], total[1:]))]
    base, crops = anyres_panels(image, kept, pinpoints, tile, patch_size, scale)
    gap, line = 8, 14
    second_at = (0, base.height + gap) if wide else (base.width + gap, 0)
    draw = ImageDraw.Draw(base)
    top = line * len(lines) + 6
    width = max(second_at[0] + crops.width, max(int(draw.textlength(t)) for t in lines) + 8)
    out = Image.new("RGB", (width, top + second_at[1] + crops.height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((4, 3 + i * line), text, fill=(0, 0, 0))
    out.paste(base, (0, top))
    out.paste(crops, (second_at[0], top + second_at[1]))
    return out


def kept_picture(image: Image.Image, kept: Sequence[int] | None, config, processor) -> Image.Image:
    """The kept-token picture of either model, from its config and image processor: LLaVA-NeXT's two panels
    (`anyres_overlay`), LLaVA-1.5's processor crop (`kept_overlay`)."""
    vision = config.vision
    if isinstance(config, LlavaNextConfig):
        return anyres_overlay(image, kept, config.image_grid_pinpoints, vision.image_size, vision.patch_size)
    return kept_overlay(image, kept, vision.image_size, vision.patch_size, geometry=CropGeometry.of(processor))


def keep_mask(kept: Sequence[int] | None, n: int) -> np.ndarray | None:
    """(n,) bool of the kept indices (None: all kept, so nothing to dim or outline). ValueError for an index that
    is no token of the image."""
    if kept is None:
        return None
    kept = np.asarray(kept, int).ravel()
    if kept.size and not (0 <= kept.min() and kept.max() < n):
        raise ValueError(f"kept indices {kept.min()}..{kept.max()} outside the image's {n} tokens")
    return np.isin(np.arange(n), kept)


def shade(picture: Image.Image, boxes: np.ndarray, keep: np.ndarray | None, width: int = 2) -> Image.Image:
    """`picture` with every pixel outside the kept boxes dimmed and each kept box framed (`width` px, inside it).
    boxes (n, 4): x0, y0, x1, y1 in the picture's pixels, rounded to whole pixels: neighbouring patches share
    their edge, so they tile without gaps or overlaps. keep (n,) bool; None: all kept, nothing dimmed or framed."""
    out = np.asarray(picture.convert("RGB"), np.float32)
    if keep is None:
        return Image.fromarray(out.astype(np.uint8))
    edges = np.rint(boxes[keep]).astype(int)
    lit = np.zeros(out.shape[:2], bool)
    for x0, y0, x1, y1 in edges:
        lit[y0:y1, x0:x1] = True
    out[~lit] = out[~lit] * 0.25 + 40
    framed = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(framed)
    for x0, y0, x1, y1 in edges:
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=OUTLINE, width=width)
    return framed


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
