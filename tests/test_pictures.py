"""The kept-token picture shows the pixels the tower read: the CLIP processor's resize + centre crop, checked
against the processor's own output (transformers' `CLIPImageProcessorPil`, un-normalised) as the reference; for
LLaVA-NeXT, each token's region of the original image against what `LlavaNextImageProcessorPil` fed the tower, and
the picture's lit area against a marked region the kept tokens were picked by."""
import json

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from svdprune_jax.convert.hf_config import processor_path
from svdprune_jax.inference.pictures import OUTLINE, CropGeometry, anyres_overlay, anyres_panels, kept_overlay
from svdprune_jax.models import anyres
from svdprune_jax.models.llava_next import PINPOINTS
from svdprune_jax.synthetic.bundled import MODEL_DIR
from tiny_hf import TINY_PINPOINTS

IMAGE_SIZE, PATCH, SCALE = 112, 8, 4  # the bundled model's geometry: a 14 x 14 grid
GRID = IMAGE_SIZE // PATCH


def stripes(width: int, height: int, cell: int = 4, low: int = 0) -> Image.Image:
    """Stripes `cell` px wide in both directions, every cell of them another colour: any shift, squash or flip of
    the picture against the processor's crop changes the pixels under some patch. Levels in [low, 255 - low]: above
    0, a NeXT processor's padding stays the only black, and bicubic overshoot is not clipped (PIL clips its
    first pass, which would part a box's resampling from the whole image's)."""
    y, x = np.mgrid[:height, :width]
    cells = (x // cell) * 7919 + (y // cell) * 104729  # distinct per cell
    rgb = np.stack([cells * 37 % 251, cells * 91 % 241, cells * 13 % 239], -1) * (255 - 2 * low) // 255 + low
    return Image.fromarray(rgb.astype(np.uint8))


def processor_crop(processor, image: Image.Image) -> np.ndarray:
    """What the processor fed the tower, as uint8 RGB (..., H, W, 3): its pixel_values un-normalised (LLaVA-NeXT:
    one per view)."""
    px = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0], np.float64)  # (..., 3, H, W)
    rgb = np.moveaxis(px, -3, -1) * np.asarray(OPENAI_CLIP_STD) + np.asarray(OPENAI_CLIP_MEAN)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def expected_picture(reference: np.ndarray, kept: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The picture the reference crop should give: dropped patches dimmed, kept ones as they are, a 2 px outline
    inside each kept patch; and the mask of the outline pixels."""
    big = np.kron(reference.astype(np.float64), np.ones((SCALE, SCALE, 1)))
    cell = PATCH * SCALE
    keep = np.isin(np.arange(GRID * GRID), kept).reshape(GRID, GRID)
    kept_px = np.kron(keep, np.ones((cell, cell), bool))
    picture = np.where(kept_px[..., None], big, big * 0.25 + 40)
    ring = np.ones((cell, cell), bool)
    ring[2:-2, 2:-2] = False
    outline = np.kron(keep, ring)
    picture[outline] = OUTLINE
    return picture, outline


def bundled_processor():
    return CLIPImageProcessorPil.from_pretrained(processor_path(MODEL_DIR))


def wider_resize_processor():  # short side to 128, then the centre 112: the crop also cuts the short side
    return CLIPImageProcessorPil(size={"shortest_edge": 128}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def padding_processor():  # short side to 100 < 112: transformers zero-pads the crop
    return CLIPImageProcessorPil(size={"shortest_edge": 100}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.mark.parametrize("make_processor", [bundled_processor, wider_resize_processor, padding_processor])
@pytest.mark.parametrize("size", [(336, 112), (112, 336), (500, 150), (97, 203)])
def test_picture_is_the_processors_crop_with_kept_patches_outlined(make_processor, size):
    processor = make_processor()
    image = stripes(*size)
    reference = processor_crop(processor, image)
    assert reference.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    kept = [0, 5, 13, 20, 97, 98, 111, 160, 182, 195]  # corners, edges and the middle of the 14 x 14 grid
    picture = np.asarray(kept_overlay(image, kept, IMAGE_SIZE, PATCH, SCALE, CropGeometry.of(processor)), np.float64)
    want, outline = expected_picture(reference, kept)
    assert picture.shape == want.shape
    assert (picture[outline] == OUTLINE).all()
    # the reference went through float normalisation and back (1 grey level of rounding), and the picture
    # truncates its dimmed pixels to integers (under 1 more)
    np.testing.assert_allclose(picture[~outline], want[~outline], atol=1.5)


def test_squashing_the_whole_image_would_put_the_outlines_on_other_pixels():
    """The check above can fail: the old picture (the whole 336 x 112 image squashed to a square) differs from
    the processor's crop under the kept patches."""
    processor = bundled_processor()
    image = stripes(336, 112)
    squashed = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), np.float64)
    assert np.abs(squashed - processor_crop(processor, image)).max() > 10


def test_geometry_from_the_processor_settings():
    assert CropGeometry.of(bundled_processor()) == CropGeometry.square(IMAGE_SIZE)
    fixed = CLIPImageProcessorPil(size={"height": 120, "width": 90}, crop_size={"height": 80, "width": 80},
                                  resample=Image.BILINEAR)
    assert CropGeometry.of(fixed) == CropGeometry(None, (120, 90), (80, 80), Image.BILINEAR)
    assert CropGeometry.of(CLIPImageProcessorPil(do_center_crop=False)).crop is None


def test_a_crop_that_is_not_the_towers_input_size_is_refused():
    geometry = CropGeometry(shortest_edge=96, crop=(96, 96))
    with pytest.raises(ValueError, match="96x96 px, not the tower's 112x112"):
        kept_overlay(stripes(200, 100), [0], IMAGE_SIZE, PATCH, geometry=geometry)


def test_run_with_fastv_writes_no_picture_and_says_why(tmp_path, capsys):
    """FastV prunes inside the language model, after every patch went through its first layers: no picture of
    "kept patches" would be true, so `run` writes none and names the reason where the picture's path would be.
    On the bundled model: FastV's layer 2 needs a decoder deeper than the tiny test model's."""
    from svdprune_jax.cli import main as cli

    picture = tmp_path / "kept.png"
    cli.main(["run", "--model", str(MODEL_DIR), "--method", "fastv", "--keep", "8", "--max-new-tokens", "2",
              "--out", str(picture), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["kept_indices"] is None and not picture.exists()
    assert out["overlay"] is None
    cli.main(["run", "--model", str(MODEL_DIR), "--method", "fastv", "--keep", "8", "--max-new-tokens", "2",
              "--out", str(picture)])
    assert "picture   none: fastv keeps every patch" in capsys.readouterr().out and not picture.exists()


# --- LLaVA-NeXT: two panels over the original image -----------------------------------------------------------------

TINY = TINY_PINPOINTS  # the tiny NeXT models': 32 px tiles of 4 x 4 patches
# (height, width) -> grid: 1x3, 2x1, 2x2, 1x2, 3x1 crops under TINY; at the hub geometry 2x2 (padded above and
# below), 2x2 (padded left and right), 1x3, 3x1
NEXT_CASES = [(TINY, 32, 8, size) for size in ((30, 85), (60, 29), (50, 47), (30, 58), (100, 30), (17, 123))] + [
    (PINPOINTS, 336, 14, size) for size in ((480, 640), (640, 427), (300, 1000), (1000, 250))]
NEXT_IDS = [f"{t}px-{h}x{w}" for _, t, _, (h, w) in NEXT_CASES]


def next_processor(pinpoints, tile: int) -> LlavaNextImageProcessorPil:
    """llava-hf's processor settings (base view and crops at the tower's size), at this tile size."""
    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=[list(p) for p in pinpoints])


def seen_patches(pinpoints, tile: int, patch: int, image: Image.Image) -> list[np.ndarray]:
    """The pixels each image token saw (packed order), from the processor's views: the token's patch less the
    canvas padding (zeros, which the test images never hold), as (h, w, 3) uint8."""
    views = processor_crop(next_processor(pinpoints, tile), image)
    side = tile // patch
    out = []
    for t in anyres.image_tokens((image.height, image.width), pinpoints, tile, side).tokens:
        view, (r, c) = t // side ** 2, divmod(t % side ** 2, side)
        px = views[view, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        out.append(px[px.any(axis=(1, 2))][:, px.any(axis=(0, 2))])
    return out


@pytest.mark.parametrize("pinpoints, tile, patch, size", NEXT_CASES, ids=NEXT_IDS)
def test_anyres_patch_boxes_are_the_regions_the_processor_fed_the_tower(pinpoints, tile, patch, size):
    """Resampling each token's claimed region of the original (PIL's resize of a box, the processor's filter)
    gives the pixels transformers' processor put in that token's patch: a box a quarter pixel off misses by
    ~60 grey levels on these 3 px stripes."""
    h, w = size
    image = stripes(w, h, cell=3, low=40)
    boxes = anyres.patch_boxes(size, pinpoints, tile, tile // patch)
    seen = seen_patches(pinpoints, tile, patch, image)
    assert len(seen) == len(boxes) and all(px.size for px in seen)
    assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    for box, px in zip(boxes, seen):
        want = np.asarray(image.resize(px.shape[1::-1], Image.BICUBIC, box=tuple(box)), np.float64)
        # the processor rescales and normalises in float and back (1 grey level), PIL's fixed-point weights
        # differ by one more between a box and the whole image
        np.testing.assert_allclose(px, want, atol=2)


BACKGROUND, MARK = np.array([60, 120, 200]), np.array([230, 60, 40])


def lit(panel: Image.Image, image: Image.Image) -> np.ndarray:
    """1 where a panel shows the image as it is (or framed), 0 where dimmed, -1 where it cannot tell: crop lines
    (white, which the test images never hold) and the rare grey that dimming leaves as it is (~53)."""
    got = np.asarray(panel, np.int16)
    shown = np.asarray(image.resize(panel.size, Image.BICUBIC), np.int16)
    bright = (np.abs(got - shown) <= 1).all(-1) | (got == OUTLINE).all(-1)
    unclear = (got == 255).all(-1) | (np.abs((shown * 0.25 + 40).astype(int) - shown) <= 1).all(-1)
    return np.where(unclear, -1, bright.astype(np.int8))


@pytest.mark.parametrize("pinpoints, tile, patch, size", NEXT_CASES, ids=NEXT_IDS)
def test_anyres_picture_lights_the_region_its_kept_tokens_saw(pinpoints, tile, patch, size):
    """A marked rectangle; the kept tokens are picked by what the processor fed them (tokens that saw only the
    mark, then tokens that saw any of it), not by our geometry. Each panel must light exactly the mark: only it
    in the first case, all of it in the second, up to the processor's resampling blur at its edge (1.5 pixels
    of the view) and a display pixel. Both panels: the base view's coarse grid and the crops' fine one."""
    h, w = size
    # off centre, from the top edge: the crops of a wide image must light it down from the padding above it
    x0, y0, x1, y1 = int(0.2 * w), 0, int(0.75 * w), int(0.8 * h)
    rgb = np.tile(BACKGROUND.astype(np.uint8), (h, w, 1))
    rgb[y0:y1, x0:x1] = MARK
    image = Image.fromarray(rgb)
    marked = [np.linalg.norm(px - MARK, axis=-1) < np.linalg.norm(px - BACKGROUND, axis=-1)
              for px in seen_patches(pinpoints, tile, patch, image)]
    only = [i for i, m in enumerate(marked) if m.all()]
    some = [i for i, m in enumerate(marked) if m.any()]
    ph, pw = anyres.best_resolution(size, pinpoints)
    crop_h, crop_w = anyres.resized_size(size, (ph, pw))
    for kept, inside in ((only, True), (some, False)):
        for panel, view_px in zip(anyres_panels(image, kept, pinpoints, tile, patch), ((h / tile, w / tile),
                                                                                     (h / crop_h, w / crop_w))):
            on = lit(panel, image)
            ys, xs = (np.arange(n) + 0.5 for n in on.shape)  # display pixel centres, in the original's pixels
            ys, xs = ys * h / on.shape[0], xs * w / on.shape[1]
            my, mx = 1.5 * view_px[0] + h / on.shape[0], 1.5 * view_px[1] + w / on.shape[1]
            if inside:  # lit -> within the mark
                near = ((ys > y0 - my) & (ys < y1 + my))[:, None] & ((xs > x0 - mx) & (xs < x1 + mx))[None]
                assert (on == 1).any() and not ((on == 1) & ~near).any()
            else:  # the mark -> lit
                deep = ((ys > y0 + my) & (ys < y1 - my))[:, None] & ((xs > x0 + mx) & (xs < x1 - mx))[None]
                assert deep.any() and (on == 0).any() and not ((on == 0) & deep).any()


@pytest.mark.parametrize("pinpoints, tile, patch, size", NEXT_CASES, ids=NEXT_IDS)
def test_anyres_panels_light_exactly_the_kept_boxes(pinpoints, tile, patch, size):
    """Pixel for pixel: a panel is lit on the kept tokens' regions scaled to it (the regions checked against the
    processor above), dimmed elsewhere, each kept region framed by a 1 px line inside its edge (at these sizes a
    patch is 14-16 px)."""
    h, w = size
    image = stripes(w, h, cell=3, low=40)
    boxes = anyres.patch_boxes(size, pinpoints, tile, tile // patch)
    is_base = anyres.image_tokens(size, pinpoints, tile, tile // patch).tokens < (tile // patch) ** 2
    kept = np.sort(np.random.default_rng(0).choice(len(boxes), len(boxes) // 3, replace=False))
    for panel, part in zip(anyres_panels(image, kept.tolist(), pinpoints, tile, patch), (is_base, ~is_base)):
        on = lit(panel, image)
        want = np.zeros(on.shape, bool)
        frame = np.zeros(on.shape, bool)
        for t in kept[part[kept]]:
            x0, y0, x1, y1 = np.rint(boxes[t] * np.divide(panel.size * 2, (w, h, w, h))).astype(int)
            want[y0:y1, x0:x1] = True
            frame[y0:y1, x0:x1] = True
            frame[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = False
        shown = on >= 0
        np.testing.assert_array_equal(on[shown] == 1, want[shown])
        framed = (np.asarray(panel) == OUTLINE).all(-1)  # a colour the image never holds (no level above 215)
        np.testing.assert_array_equal(framed[shown], frame[shown])


def test_anyres_overlay_is_both_panels_under_a_caption():
    """A wide image's panels stacked, a tall one's side by side; all kept (None): nothing dimmed."""
    for size, stacked in (((30, 85), True), ((60, 29), False)):
        image = stripes(size[1], size[0], cell=3, low=40)
        base, crops = anyres_panels(image, [0, 5, 20], TINY, 32, 8)
        out = np.asarray(anyres_overlay(image, [0, 5, 20], TINY, 32, 8))
        at = (out.shape[0] - crops.height, 0 if stacked else base.width + 8)
        np.testing.assert_array_equal(out[at[0]:, at[1]:at[1] + crops.width], np.asarray(crops))
        top = at[0] - (base.height + 8 if stacked else 0)
        np.testing.assert_array_equal(out[top:top + base.height, :base.width], np.asarray(base))
        everything = anyres_panels(image, None, TINY, 32, 8)
        assert (lit(everything[0], image) == 1).all() and (lit(everything[1], image) != 0).all()


def test_anyres_kept_index_outside_the_image_is_refused():
    with pytest.raises(ValueError, match=r"kept indices 0..64 outside the image's 64 tokens"):
        anyres_overlay(stripes(85, 30), [0, 64], TINY, 32, 8)
