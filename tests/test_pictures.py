"""The kept-token picture shows the pixels the tower read: the CLIP processor's resize + centre crop, checked
against the processor's own output (transformers' `CLIPImageProcessorPil`, un-normalised) as the reference."""
import json

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from svdprune_jax.convert.hf_config import processor_path
from svdprune_jax.inference.pictures import OUTLINE, CropGeometry, kept_overlay
from svdprune_jax.synthetic.bundled import MODEL_DIR

IMAGE_SIZE, PATCH, SCALE = 112, 8, 4  # the bundled model's geometry: a 14 x 14 grid
GRID = IMAGE_SIZE // PATCH


def stripes(width: int, height: int) -> Image.Image:
    """Stripes 4 px wide in both directions, every cell of them another colour: any shift, squash or flip of
    the picture against the processor's crop changes the pixels under some patch."""
    y, x = np.mgrid[:height, :width]
    cells = (x // 4) * 7919 + (y // 4) * 104729  # distinct per 4 px cell
    rgb = np.stack([cells * 37 % 251, cells * 91 % 241, cells * 13 % 239], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def processor_crop(processor, image: Image.Image) -> np.ndarray:
    """What the processor fed the tower, as uint8 RGB (H, W, 3): its pixel_values un-normalised."""
    px = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0], np.float64)  # (3, H, W)
    rgb = px.transpose(1, 2, 0) * np.asarray(OPENAI_CLIP_STD) + np.asarray(OPENAI_CLIP_MEAN)
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
