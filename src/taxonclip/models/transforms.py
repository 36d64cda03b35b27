"""Image transforms: PIL image -> normalised tensor, as CLIP and UNICOM were trained; and the
same on uint8 image tensors, for images decoded on the model's device."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageTransform = Callable[[Image.Image], torch.Tensor]
TensorTransform = Callable[[torch.Tensor], torch.Tensor]


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


def tensor_eval_transform(size: int, mean: tuple[float, float, float] = CLIP_MEAN,
                          std: tuple[float, float, float] = CLIP_STD) -> TensorTransform:
    """`eval_transform` for a uint8 (3, H, W) tensor on any device: antialiased bicubic resize
    (close to PIL's), centre crop, values clipped to [0, 1] as PIL's uint8 result is, normalise."""
    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        _clip_unit,
        v2.Normalize(mean, std),
    ])


def tensor_train_transform(size: int, mean: tuple[float, float, float] = CLIP_MEAN,
                           std: tuple[float, float, float] = CLIP_STD) -> TensorTransform:
    """`train_transform` for a uint8 (3, H, W) tensor on any device; its random crop and flip are
    drawn from torch's CPU generator, which a checkpoint restores."""
    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        _clip_unit,
        v2.Normalize(mean, std),
    ])


def _clip_unit(image: torch.Tensor) -> torch.Tensor:
    return image.clamp_(0.0, 1.0)
