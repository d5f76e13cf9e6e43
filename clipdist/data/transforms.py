"""CLIP's evaluation preprocessing, in PIL + numpy + torch (no torchvision).

``clip_preprocess`` equals ``open_clip.image_transform(size, is_train=False)`` bitwise on RGB
and greyscale images: bicubic resize of the shortest side, centre crop, scale to [0, 1],
normalise with the CLIP statistics (PIL's bicubic filter and torchvision's float32 arithmetic).
Other modes are converted to RGB first; open_clip converts after resizing, which resizes palette
images by nearest neighbour.

``load_image`` is the loaders' path from encoded bytes. It gives the same result, except that
a JPEG whose short side is at least twice the target is decoded by libjpeg at 1/2, 1/4 or 1/8
scale (the short side staying >= the target) and resized from there. Decoding and resizing then
cost a fraction, and the resize covers the same source region as the full-resolution path, so
only pixel values differ: by a mean absolute 0.01-0.05 in normalised units on photos (a grey
level is about 0.015); at 224 px about as much as re-encoding the JPEG at quality 85 would
(tests/test_transforms.py, benchmarks/data_throughput.py)."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.array(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shortest side set to ``short_side``; truncation as in torchvision."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def source_region(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The box of a width × height image that resize-shortest-side-then-centre-crop maps onto
    the size × size output, in that image's pixel coordinates."""
    resized_width, resized_height = resized_size(width, height, size)
    left, top, right, bottom = center_crop_box(resized_width, resized_height, size)
    # Products first: right == resized_width then gives exactly width (PIL rejects a box past the edge).
    return (
        left * width / resized_width,
        top * height / resized_height,
        right * width / resized_width,
        bottom * height / resized_height,
    )


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    resized = resized_size(image.width, image.height, size)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    if image.size != (size, size):
        image = image.crop(center_crop_box(image.width, image.height, size))
    return image


def to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as float32 [3, H, W], (pixel / 255 - mean) / std."""
    pixels = np.asarray(image)  # [H, W, 3] uint8
    planes = np.empty((3, image.height, image.width), dtype=np.float32)
    # Convert while transposing, once, so that the arithmetic below runs in place on contiguous
    # planes: 3-4x faster than the same ops on a strided channels-last tensor. The operations
    # and their float32 order are torchvision's (ToTensor, Normalize), so results are bitwise equal.
    planes[...] = pixels.transpose(2, 0, 1)
    planes /= np.float32(255.0)
    planes -= _MEAN
    planes /= _STD
    return torch.from_numpy(planes)


def clip_preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """Turn a PIL image into a normalised float tensor [3, image_size, image_size]. An image
    straight from Image.open is decoded at full scale; load_image decodes JPEGs reduced."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return to_normalised_tensor(resize_and_crop(image, image_size))


def decode_for_size(data: bytes, image_size: int) -> tuple[Image.Image, Optional[tuple[float, float, float, float]]]:
    """Decode image bytes to RGB for an image_size × image_size output. A JPEG is decoded at the
    smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps its short side >= image_size; then the
    second value is the region of the reduced image that the full-resolution resize-and-crop
    would cover (else None)."""
    image = Image.open(io.BytesIO(data))
    full_width, full_height = image.size
    # A no-op returning None for formats other than JPEG. For JPEG it returns the full image's
    # box in the reduced pixel grid, which has ceil(full / scale) pixels.
    drafted = image.draft("RGB", (image_size, image_size))
    image = image.convert("RGB") if image.mode != "RGB" else image
    image.load()
    if drafted is None or image.size == (full_width, full_height):
        return image, None
    scale = round(full_width / drafted[1][2])
    return image, tuple(c / scale for c in source_region(full_width, full_height, image_size))


def fit_to_square(image: Image.Image, region: Optional[tuple[float, float, float, float]], size: int) -> Image.Image:
    if region is None:
        return resize_and_crop(image, size)
    # Resize the mapped region rather than crop the reduced grid, whose rounded-up size would
    # put the crop a fraction of a pixel off.
    return image.resize((size, size), Image.Resampling.BICUBIC, box=region)


def load_image(data: bytes, image_size: int) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, WebP, ...) as a normalised float tensor
    [3, image_size, image_size]. Raises PIL's errors (OSError, ValueError, ...) for bytes that
    do not decode."""
    image, region = decode_for_size(data, image_size)
    return to_normalised_tensor(fit_to_square(image, region, image_size))
