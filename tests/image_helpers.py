"""Small PNG images for data-pipeline tests."""

import io

import numpy as np


def patterned_png(color, row: int, columns: slice = slice(16, 48)) -> bytes:
    """A 64 px image of ``color`` with an inverted patch at rows ``row*8 .. row*8+24`` and ``columns``
    (an off-centre patch makes the image differ from its mirror image)."""
    from PIL import Image

    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[...] = color
    pixels[row * 8: row * 8 + 24, columns] = 255 - np.asarray(color, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
