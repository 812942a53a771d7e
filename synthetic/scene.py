"""Scenes of the synthetic fine-detail benchmark: geometry, placement and rendering (numpy + PIL).

A scene is a list of placed objects over a pre-drawn background (texture + clutter) and a fixed pixel
noise, so rendering is a pure function of the scene: removing an object from a scene and rendering again
changes exactly that object's pixels (the tests use this to check masks against the image).
"""

import dataclasses
import math

import numpy as np
from jaxtyping import Bool, Float32, UInt8
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow")
PALETTE = np.array([[215, 40, 40], [40, 165, 60], [45, 85, 215], [230, 200, 35]], np.float32)
SHAPES = ("circle", "square", "triangle")
GLYPH_SHAPES = ("circle", "square")  # a triangle has no room for a glyph
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")

# 5x7 bitmaps drawn for this project, chosen to be pairwise distinct at a glance.
_GLYPH_ROWS = {
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
}
GLYPHS = tuple(_GLYPH_ROWS)
GLYPH_BITMAPS = {g: np.array([[c == "#" for c in row] for row in rows]) for g, rows in _GLYPH_ROWS.items()}

# A patch belongs to an object when the object covers at least this share of its pixels.
MIN_COVERAGE = 0.25
# A patch shows a glyph when at least this share of its pixels are glyph strokes.
MIN_GLYPH_COVERAGE = 1 / 16


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Image geometry. Object sizes are in patches, so the scene scales with the patch grid."""

    image_size: int = 112  # pixels; 112 / 8 = 14x14 = 196 patch tokens
    patch_size: int = 8
    object_sizes: tuple[float, ...] = (2.5, 3.0, 3.5)  # bounding-box side in patches (20, 24, 28 px at patch 8)

    def __post_init__(self):
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.grid < 4:
            raise ValueError(f"grid {self.grid}x{self.grid} is too small for quadrant questions; need >= 4x4")
        if not self.object_sizes or min(self.object_sizes) < 2 or max(self.object_sizes) * 2 > self.grid / 2:
            raise ValueError(f"object_sizes {self.object_sizes} must be >= 2 patches and fit two to a quadrant")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: int  # index into SHAPES
    colour: int  # index into COLOURS
    quadrant: int  # index into QUADRANTS; the quadrant holding the centre
    glyph: int = -1  # index into GLYPHS, -1 for none
    size: int = 0  # bounding-box side, pixels
    cx: int = 0  # centre, pixels
    cy: int = 0
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # jittered palette colour


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Float32[np.ndarray, "H W 3"]  # texture with clutter drawn in
    clutter: Bool[np.ndarray, "H W"]  # clutter pixels
    noise: Float32[np.ndarray, "H W 3"]  # pixel noise added over everything


def sample_scene(rng: np.random.Generator, objects: list[SceneObject], cfg: SceneConfig) -> Scene:
    """Sizes, places and colours `objects` (attributes already fixed) and draws a background."""
    rgbs = np.clip(PALETTE[[o.colour for o in objects]] + rng.uniform(-20, 20, (len(objects), 3)), 0, 255)
    placed = None
    while placed is None:  # crowded draws of many large objects rarely fit: draw the sizes again
        sizes = rng.choice(np.round(np.array(cfg.object_sizes) * cfg.patch_size).astype(int), len(objects))
        sized = [dataclasses.replace(o, size=int(s), rgb=tuple(map(float, c))) for o, s, c in zip(objects, sizes, rgbs)]
        placed = _place(rng, sized, cfg)
    background, clutter = _background(rng, cfg)
    noise = rng.normal(0, 4, background.shape).astype(np.float32)
    return Scene(tuple(placed), background, clutter, noise)


def _place(rng: np.random.Generator, objects: list[SceneObject], cfg: SceneConfig, restarts: int = 20,
           tries: int = 256) -> list[SceneObject] | None:
    """Rejection-samples centres: inside the object's quadrant (at least a quarter of its size away from the
    midlines, so most of it lies there), fully inside the image, bounding boxes at least a quarter patch apart.
    None when no layout was found."""
    half, gap = cfg.image_size // 2, max(1, cfg.patch_size // 4)
    order = sorted(range(len(objects)), key=lambda i: -objects[i].size)
    for _ in range(restarts):
        placed = {}
        for i in order:
            o = objects[i]
            c = rng.integers(o.size // 2 + 1, half - math.ceil(o.size / 4) + 1, (tries, 2))
            c[:, 0] = c[:, 0] if o.quadrant % 2 == 0 else cfg.image_size - c[:, 0]
            c[:, 1] = c[:, 1] if o.quadrant < 2 else cfg.image_size - c[:, 1]
            ok = np.ones(tries, bool)
            for p in placed.values():
                ok &= np.abs(c - (p.cx, p.cy)).max(1) * 2 - o.size - p.size >= 2 * gap
            if not ok.any():
                break
            cx, cy = c[ok.argmax()]
            placed[i] = dataclasses.replace(o, cx=int(cx), cy=int(cy))
        if len(placed) == len(objects):
            return [placed[i] for i in range(len(objects))]
    return None


def _background(rng: np.random.Generator,
                cfg: SceneConfig) -> tuple[Float32[np.ndarray, "H W 3"], Bool[np.ndarray, "H W"]]:
    """Desaturated base tone + smooth blotches + two gratings, then clutter: thin lines and dots in the
    object colours (salient like the objects, but irrelevant to every question)."""
    n = cfg.image_size
    base = (rng.uniform(85, 170) + rng.uniform(-15, 15, 3)).astype(np.float32)
    low = rng.normal(0, 18, (6, 6, 3)).astype(np.float32)
    blotches = np.stack([np.asarray(Image.fromarray(low[..., c], "F").resize((n, n), Image.BICUBIC))
                         for c in range(3)], -1)
    x = np.arange(n, dtype=np.float32)
    gratings = sum(rng.uniform(5, 15) * np.cos((math.cos(t) * x[None, :] + math.sin(t) * x[:, None])
                                               * (2 * math.pi / rng.uniform(5, 16)) + rng.uniform(0, 2 * math.pi))
                   for t in rng.uniform(0, math.pi, 2).tolist())
    background = base + blotches + gratings[..., None]

    layer, mask = Image.new("RGB", (n, n)), Image.new("L", (n, n))
    draw_layer, draw_mask = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    p = cfg.patch_size
    lines = rng.integers(cfg.num_patches // 16, cfg.num_patches // 8 + 1)  # 12-24 and 16-32 at 14x14 patches
    dots = rng.integers(cfg.num_patches // 12, cfg.num_patches // 6 + 1)
    for k in range(lines + dots):
        colour = tuple(int(v) for v in np.clip(PALETTE[rng.integers(len(COLOURS))] + rng.uniform(-20, 20, 3), 0, 255))
        x, y = rng.uniform(0, n, 2)
        if k < lines:
            t, length = rng.uniform(0, 2 * np.pi), rng.uniform(1, 4) * p
            xy, width = [(x, y), (x + length * np.cos(t), y + length * np.sin(t))], int(rng.integers(1, 3))
            draw_layer.line(xy, fill=colour, width=width)
            draw_mask.line(xy, fill=255, width=width)
        else:
            r = rng.uniform(0.1, 0.3) * p
            draw_layer.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            draw_mask.ellipse([x - r, y - r, x + r, y + r], fill=255)
    clutter = np.asarray(mask) > 0
    background[clutter] = np.asarray(layer, np.float32)[clutter]
    return background, clutter


def object_pixels(o: SceneObject, n: int) -> Bool[np.ndarray, "n n"]:
    """Pixels whose centre lies inside the object's shape."""
    dx, dy, h = np.arange(n)[None, :] + 0.5 - o.cx, np.arange(n)[:, None] + 0.5 - o.cy, o.size / 2
    if SHAPES[o.shape] == "circle":
        return dx**2 + dy**2 <= h**2
    if SHAPES[o.shape] == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)  # upright triangle, apex at the top


def glyph_pixels(o: SceneObject, n: int) -> Bool[np.ndarray, "n n"]:
    """The glyph's strokes, centred in the object; scaled to about half its size."""
    out = np.zeros((n, n), bool)
    if o.glyph < 0:
        return out
    scale = max(1, round(o.size / 12))
    bitmap = np.kron(GLYPH_BITMAPS[GLYPHS[o.glyph]], np.ones((scale, scale), bool))
    top, left = o.cy - bitmap.shape[0] // 2, o.cx - bitmap.shape[1] // 2
    out[top:top + bitmap.shape[0], left:left + bitmap.shape[1]] = bitmap
    return out


def glyph_rgb(o: SceneObject) -> tuple[float, float, float]:
    """Black on light objects, white on dark ones, so the glyph is readable on every colour."""
    return (20.0, 20.0, 20.0) if np.dot(o.rgb, (0.299, 0.587, 0.114)) > 140 else (245.0, 245.0, 245.0)


def render(scene: Scene) -> UInt8[np.ndarray, "H W 3"]:
    n = scene.background.shape[0]
    img = scene.background.copy()
    for o in scene.objects:
        img[object_pixels(o, n)] = o.rgb
        img[glyph_pixels(o, n)] = glyph_rgb(o)
    return np.clip(np.round(img + scene.noise), 0, 255).astype(np.uint8)


def patch_shares(pixels: Bool[np.ndarray, "*b H W"], patch: int) -> Float32[np.ndarray, "*b g g"]:
    """Share of each patch's pixels that are set. Patches in row-major order are the vision tower's tokens."""
    *lead, h, w = pixels.shape
    return pixels.reshape(*lead, h // patch, patch, w // patch, patch).mean((-3, -1), dtype=np.float32)
