"""CLIP's evaluation preprocessing, in PIL + torch (no torchvision).

Matches ``open_clip.image_transform(size, is_train=False)``: bicubic resize of the shortest
side, centre crop, scale to [0, 1], normalise with the CLIP statistics. Both use PIL's bicubic
filter, so RGB images that are not JPEG-drafted come out identical.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shortest side set to ``short_side``; truncation as in torchvision."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def clip_preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """Turn a PIL image into a normalised float tensor [3, image_size, image_size]."""
    if image.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= image_size:
        # far cheaper than decoding a multi-megapixel photo only to shrink it.
        image.draft("RGB", (2 * image_size, 2 * image_size))
    image = image.convert("RGB")
    size = resized_size(image.width, image.height, image_size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    if image.size != (image_size, image_size):
        image = image.crop(center_crop_box(image.width, image.height, image_size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (pixels.float().div_(255.0) - _MEAN) / _STD
