"""Decoding images for a model: a Dataset with a bad-image policy and the batch collation for it.

Under the `skip` policy an image that fails to decode is left out of its batch, and every batch
carries the dataset positions of the images it holds, so the caller knows exactly which images
came back: a failed image never becomes a hole inside an array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from taxonclip.config import DataConfig, check_missing
from taxonclip.errors import DataError

NO_LABEL = -1

Item = tuple[Tensor, int, int]


def decode_image(path: str) -> Image.Image:
    """The image at `path` in RGB, or a DataError naming the path and why PIL cannot read it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path}: {err or type(err).__name__}") from None


class ImageDataset(Dataset):
    """Images by path, each as `(transform(image), label, position)`; the label is -1 without
    labels. With `missing="skip"` an image that fails to decode gives None instead of an error."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], Tensor],
                 labels: Sequence[int] | None = None, missing: str = DataConfig.missing) -> None:
        check_missing(missing)  # bench scripts build one without a config
        if labels is not None and len(labels) != len(paths):
            raise DataError(f"{len(labels)} labels for {len(paths)} images")
        self.paths = list(paths)
        self.labels = None if labels is None else [int(label) for label in labels]
        self.transform = transform
        self.missing = missing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item | None:
        try:
            image = decode_image(self.paths[i])
        except DataError:
            if self.missing == "skip":
                return None
            raise
        label = NO_LABEL if self.labels is None else self.labels[i]
        return self.transform(image), label, i


def collate_skipping(batch: Sequence[Item | None]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack the decoded items of a batch into (images, labels, positions), leaving out the
    None of skipped images; a batch with nothing decoded gives three empty tensors."""
    items = [item for item in batch if item is not None]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    images, labels, positions = zip(*items)
    return (torch.stack(images), torch.tensor(labels, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long))
