"""Image transforms: PIL image -> normalised tensor, as CLIP and UNICOM were trained."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageTransform = Callable[[Image.Image], torch.Tensor]


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB (greyscale, palette and RGBA photographs occur in real collections)."""
    return image.convert("RGB")


def eval_transform(size: int, mean: tuple[float, float, float] = CLIP_MEAN,
                   std: tuple[float, float, float] = CLIP_STD) -> ImageTransform:
    """Bicubic resize of the short side to `size`, centre crop to `size` x `size`, normalise."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        to_rgb,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def train_transform(size: int, mean: tuple[float, float, float] = CLIP_MEAN,
                    std: tuple[float, float, float] = CLIP_STD) -> ImageTransform:
    """Random resized crop to `size` (bicubic) and horizontal flip, then normalise."""
    return T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        to_rgb,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
