"""LLaVA-NeXT's any-resolution geometry, on the host (NumPy): which grid of crops an image gets, which of the
crops' patch tokens survive unpadding, and where `image_newline` goes, as static-shape index arrays.

transformers' processor (`LlavaNextImageProcessorPil`) resizes an image of (H, W) into the best of
`image_grid_pinpoints` (padding the rest), cuts it into gh x gw crops of the tower's size s, and prepends the
whole image resized to s x s: views = [base, crop (0,0), crop (0,1), ...], row-major. Each view gives the
tower's h x w patch tokens (h = w = s / patch). transformers' model then packs an image's tokens as:
    the base view's h*w tokens (row-major), then the crops' tokens arranged as one (gh*h) x (gw*w) grid,
    cropped to the rows (or columns) the image covers (`unpad`), row by row, each row followed by one
    `image_newline`.
`Layout` holds that order as indices, so the device program gathers instead of branching on the grid: one
program serves every grid and aspect ratio with the same number of views (the processor pads a batch to its
largest view count).
"""
import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np


def best_resolution(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that shows most of an image of `size` (H, W) at its own scale, least area
    wasted among equals: transformers' `select_best_resolution` rule."""
    H, W = size
    best, most, least = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / W, ph / H)
        effective = min(int(W * scale) * int(H * scale), W * H)
        wasted = ph * pw - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (ph, pw), effective, wasted
    return best


def grid_shape(size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """Crops (rows, columns) of an image of `size` (H, W): its best pinpoint in tiles of the tower's size."""
    ph, pw = best_resolution(size, pinpoints)
    return ph // tile, pw // tile


def unpad(size: tuple[int, int], rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a (rows x cols) token grid that the image of `size` (H, W) covers after the
    processor's aspect-preserving resize and centred padding (transformers' `unpad_image`)."""
    H, W = size
    if W / H > cols / rows:  # wider than the grid: padding above and below
        pad = (rows - int(round(H * (cols / W), 7))) // 2
        return slice(pad, rows - pad), slice(0, cols)
    pad = (cols - int(round(W * (rows / H), 7))) // 2
    return slice(0, rows), slice(pad, cols - pad)


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """One image's tokens in packed order. `tokens[t]`: the view-major index (view * N + patch) of image token t
    (newlines not counted); `packed[j]`: the token at prompt slot j, -1 for an `image_newline`."""
    grid: tuple[int, int]
    tokens: np.ndarray
    packed: np.ndarray

    @property
    def views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


def image_tokens(size: tuple[int, int], pinpoints, tile: int, side: int) -> ImageTokens:
    """The packed order for an image of `size` (H, W); `side` patches per view side (tile / patch size)."""
    gh, gw = grid_shape(size, pinpoints, tile)
    n = side * side
    rows, cols = unpad(size, gh * side, gw * side)
    r, c = np.mgrid[rows, cols]
    crop = (r // side) * gw + (c // side)
    crops = (1 + crop) * n + (r % side) * side + (c % side)  # (kept rows, kept cols), view-major indices
    t = n + np.arange(crops.size).reshape(crops.shape)  # image-token number of each crop token
    rows_nl = np.concatenate([t, np.full((t.shape[0], 1), -1)], axis=1)  # a newline after every row
    return ImageTokens((gh, gw), np.concatenate([np.arange(n), crops.ravel()]),
                       np.concatenate([np.arange(n), rows_nl.ravel()]))


def resized_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of `size` (H, W) resized into the pinpoint `target` (h, w) keeping its aspect
    ratio: transformers' `get_patch_output_size`, float for float (its ceil of H * (w / W) decides a pixel)."""
    (H, W), (th, tw) = size, target
    if tw / W < th / H:
        return min(math.ceil(H * (tw / W)), th), tw
    return th, min(math.ceil(W * (th / H)), tw)


def patch_boxes(size: tuple[int, int], pinpoints, tile: int, side: int) -> np.ndarray:
    """The region of the original image (H, W) each image token saw, in packed order (`image_tokens(...).tokens`,
    the order of the kept indices): (T, 4) float pixel edges x0, y0, x1, y1.

    The base view is the whole image resized to tile x tile, so its patch (r, c) saw the (r, c) cell of a
    side x side grid over the image. The crops cut the pinpoint canvas, which holds the image resized into it
    (`resized_size`) and zero-padded equally on both sides (the odd pixel after); a crop token's canvas square is
    clipped to the image there (unpadding works in whole tokens, so edge tokens can hold some padding) and mapped
    back by each axis's own resize ratio. PIL's resize maps output edge e to input edge e * input / output, so
    these are the edges a resampling of the region would use."""
    H, W = size
    p = tile // side  # pixels per patch side
    img = image_tokens(size, pinpoints, tile, side)
    view, patch = np.divmod(img.tokens, side * side)
    r, c = np.divmod(patch, side)
    base = np.stack([c * p * W / tile, r * p * H / tile, (c + 1) * p * W / tile, (r + 1) * p * H / tile], 1)
    ph, pw = best_resolution(size, pinpoints)
    h, w = resized_size(size, (ph, pw))
    top, left = (ph - h) // 2, (pw - w) // 2
    crop_r, crop_c = np.divmod(np.maximum(view - 1, 0), img.grid[1])
    x0, y0 = crop_c * tile + c * p, crop_r * tile + r * p
    # whole numbers until the one division: the image's far edge comes out as exactly W (H), a valid PIL box
    x = (np.clip(np.stack([x0, x0 + p], 1), left, left + w) - left) * W / w
    y = (np.clip(np.stack([y0, y0 + p], 1), top, top + h) - top) * H / h
    crops = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
    return np.where((view == 0)[:, None], base, crops)


def bounds(pinpoints, tile: int, side: int, views: int | None = None) -> tuple[int, int, int]:
    """(most views, most image tokens, most prompt slots) of any image under these pinpoints (of at most `views`
    views): unpadding only removes tokens, so a full grid of crops is the largest."""
    n = side * side
    grids = [(ph // tile, pw // tile) for ph, pw in pinpoints]
    grids = [(gh, gw) for gh, gw in grids if views is None or 1 + gh * gw <= views] or [(0, 0)]  # base view only
    return (max(1 + gh * gw for gh, gw in grids), max(n + gh * gw * n for gh, gw in grids),
            max(n + gh * gw * n + gh * side for gh, gw in grids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AnyresImages:
    """A batch of any-resolution images for the device: the processor's tiles and the packing as indices.
    Every array has a leading batch axis B; V (views) follows the batch's largest grid, T the config's bound and
    L the bound of V views (`bounds`), so one program serves every grid and aspect ratio with V views.

    pixel_values (B, V, C, s, s)  base view then crops; views past an image's own are zero padding
    tokens (B, T) int32           view-major index (view * N + patch) of each image token, packed order
    token_mask (B, T) bool        real image tokens (the rest pad T)
    packed (B, L) int32           prompt slot -> image token, T for `image_newline` (and padding); L the most
                                  slots an image of V views fills (FastV's static image span)
    position (B, V * N) int32     view-major token -> its image-token number, T for tokens unpadding drops
    lengths (B,) int32            prompt slots (image tokens + newlines) each image fills unpruned
    """
    pixel_values: np.ndarray
    tokens: np.ndarray
    token_mask: np.ndarray
    packed: np.ndarray
    position: np.ndarray
    lengths: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """Image tokens per image (newlines not counted), on the host."""
        return np.asarray(self.token_mask).sum(axis=1)


def layout(pixel_values: np.ndarray, image_sizes, pinpoints, tile: int, side: int) -> AnyresImages:
    """`AnyresImages` from the processor's pixel_values (B, V, C, s, s) and image_sizes (B, 2) as (H, W).
    ValueError when an image's grid needs more views than pixel_values holds."""
    B, V = pixel_values.shape[:2]
    if len(image_sizes) != B:
        raise ValueError(f"{len(image_sizes)} image sizes for {B} images of pixel_values")
    _, T, _ = bounds(pinpoints, tile, side)
    L = bounds(pinpoints, tile, side, views=V)[2]
    n = side * side
    tokens, mask = np.zeros((B, T), np.int32), np.zeros((B, T), bool)
    packed, position = np.full((B, L), T, np.int32), np.full((B, V * n), T, np.int32)
    lengths = np.zeros(B, np.int32)
    for b, size in enumerate(image_sizes):
        img = image_tokens(tuple(int(x) for x in size), pinpoints, tile, side)
        if img.views > V:
            raise ValueError(f"image {b} of size {tuple(size)} has {img.views} views (grid {img.grid}); "
                             f"pixel_values holds {V}")
        tokens[b, :img.tokens.size], mask[b, :img.tokens.size] = img.tokens, True
        packed[b, :img.packed.size] = np.where(img.packed < 0, T, img.packed)
        position[b, img.tokens] = np.arange(img.tokens.size)
        lengths[b] = img.packed.size
    return AnyresImages(np.asarray(pixel_values, np.float32), tokens, mask, packed, position, lengths)
