"""Datasets that ship with an installed dependency, so the quickstart runs offline.

`digits`: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, 10 classes; UCI ML hand-written digits,
Alpaydin & Kaynak 1998), scaled to 8-bit, upsampled with bicubic interpolation to the requested size and replicated to
three channels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from ldm.data.sources import ArraySource


@lru_cache(maxsize=4)
def digits_arrays(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 images and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    big = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), resample=Image.BICUBIC))
                    for im in small])
    images = np.repeat(big[..., None], 3, axis=-1)
    images.setflags(write=False)
    return images, digits.target.astype(np.int64)


def digits_source(image_size: int = 32) -> ArraySource:
    images, labels = digits_arrays(image_size)
    return ArraySource(images, labels, f"digits{image_size}")
