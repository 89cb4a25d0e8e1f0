"""Photos -> model input with Pillow and numpy only: the pixels of training's eval transform (torchvision's
Resize((s, s)) + ToTensor + Normalize, tests/test_serving_package.py holds them equal), so a served model needs
no torch."""
from __future__ import annotations

import base64
import binascii

import numpy as np
from PIL import Image

from bin_counter.core.abid import read_image


def decode_base64_image(text: str) -> Image.Image:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty image field")
    try:
        # MIME's line breaks are whitespace to skip (Spark's base64() writes them by default); other bytes are errors
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image field is not valid base64") from None
    return read_image(raw)


class EvalPixels:
    """An RGB image (`read_image` gives no other) -> (3, size, size) float32: squashed to a square as in the
    study, bilinear as torchvision resizes a PIL image, scaled to [0, 1], normalised by the backbone's mean/std."""

    def __init__(self, image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float]):
        self.size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> np.ndarray:
        resized = image.resize((self.size, self.size), Image.BILINEAR)
        array = np.asarray(resized, dtype=np.float32) / np.float32(255)
        return np.ascontiguousarray(((array - self.mean) / self.std).transpose(2, 0, 1))
