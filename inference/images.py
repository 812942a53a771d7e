"""Image files in, RGB PIL images out, as transformers' processors would see them."""
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.image_transforms import convert_to_rgb

log = logging.getLogger(__name__)


def read_image(path: str | Path, *, convert: bool = True) -> Image.Image:
    """An image file as RGB. Other modes (grayscale, RGBA, palette, ...) are converted the way transformers'
    processors convert them (transparency composited onto white), with a one-line note naming the file;
    `convert=False` refuses them instead. Unreadable, truncated or oversized files are a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode safely: {e}") from None
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some malformed headers
        raise ValueError(f"image {path} cannot be read: {e}") from None
    if image.mode == "RGB":
        return image
    if not convert:
        raise ValueError(f"image {path} is {image.mode}, not RGB")
    log.warning("note: image %s is %s; converted to RGB as transformers' processors do", path, image.mode)
    return Image.fromarray(np.asarray(convert_to_rgb(image, return_numpy=True)))
