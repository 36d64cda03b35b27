"""Images for the captioner: the rows ordered by image size (so a batch's images, and with
dynamic-resolution processors its prompts, pad little), decoded by DataLoader workers.

An image that does not decode comes back as None with the reason, so the caller decides: skip
it (counted, listed) or stop, naming the row, after saving what is already captioned.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from taxonclip.data.images import decode_image
from taxonclip.errors import DataError

SIZE_THREADS = 8  # reading image headers is I/O bound


def size_order(paths: list[str], ids: list[str]) -> list[int]:
    """Positions of the rows sorted by (height, width) of their image, then by image id; an
    image whose header cannot be read sorts first (its decode reports it)."""
    with ThreadPoolExecutor(SIZE_THREADS) as pool:
        sizes = list(pool.map(_size, paths))
    return sorted(range(len(paths)), key=lambda i: (sizes[i], ids[i]))


def _size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Exception:  # any failure is reported when the image is decoded
        return (0, 0)


class CaptionImages(Dataset):
    """Row position -> (position, RGB image or None, why it did not decode)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            return position, decode_image(self.paths[position]), ""
        except DataError as err:
            return position, None, str(err)


def _as_lists(items):
    return [list(column) for column in zip(*items)]


def image_batches(paths: list[str], batches: list[list[int]], workers: int) -> DataLoader:
    """A loader that yields `(positions, images, reasons)` for each batch of row positions, in
    the given order."""
    return DataLoader(CaptionImages(paths), batch_sampler=batches, num_workers=workers,
                      collate_fn=_as_lists, persistent_workers=False)
