"""Images for the captioner: the rows ordered by image size (so a batch's images, and with
dynamic-resolution processors its prompts, pad little), decoded by DataLoader workers.

An image is a file, or a member of a local WebDataset shard (TreeOfLife-10M, prepared shards:
an `image_path` of the form `<shard>#<key>`), read by its key from the shard's index.

An image that does not decode comes back as None with the reason, so the caller decides: skip
it (counted, listed) or stop, naming the row, after saving what is already captioned.
"""

from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from taxonclip.errors import DataError

SIZE_THREADS = 8  # reading image headers is I/O bound
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # a shard sample's image member, by its suffix
# (process id, shard) -> the open shard and its members by name: a forked DataLoader worker
# opens its own, since a file offset shared across processes would mix their reads
_SHARDS: dict[tuple[int, str], tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}


def open_image(path: str) -> Image.Image:
    """The image of `path` (lazily decoded, as `Image.open` gives it): a file, or the image
    member of key `<key>` in the local shard `<shard>` of a `<shard>#<key>` path."""
    shard, hash_sign, key = path.rpartition("#")
    if not hash_sign or os.path.isfile(path) or not os.path.isfile(shard):
        return Image.open(path)
    tar, members = _shard(shard)
    for suffix in IMAGE_SUFFIXES:
        member = members.get(f"{key}.{suffix}")
        if member is not None:
            return Image.open(io.BytesIO(tar.extractfile(member).read()))
    raise FileNotFoundError(f"shard {shard} has no image of key {key!r}")


def _shard(shard: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    opened = _SHARDS.get((os.getpid(), shard))
    if opened is None:
        tar = tarfile.open(shard)
        opened = _SHARDS[(os.getpid(), shard)] = tar, {m.name: m for m in tar.getmembers()}
    return opened


def decode(path: str) -> Image.Image:
    """The image of `path` (see `open_image`) in RGB, or a DataError naming it and why."""
    try:
        with open_image(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path}: {err or type(err).__name__}") from None


def size_order(paths: list[str], ids: list[str]) -> list[int]:
    """Positions of the rows sorted by (height, width) of their image, then by image id; an
    image whose header cannot be read sorts first (its decode reports it)."""
    with ThreadPoolExecutor(SIZE_THREADS) as pool:
        sizes = list(pool.map(_size, paths))
    return sorted(range(len(paths)), key=lambda i: (sizes[i], ids[i]))


def _size(path: str) -> tuple[int, int]:
    try:
        with open_image(path) as image:
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
            return position, decode(self.paths[position]), ""
        except DataError as err:
            return position, None, str(err)


def _as_lists(items):
    return [list(column) for column in zip(*items)]


def image_batches(paths: list[str], batches: list[list[int]], workers: int) -> DataLoader:
    """A loader that yields `(positions, images, reasons)` for each batch of row positions, in
    the given order."""
    return DataLoader(CaptionImages(paths), batch_sampler=batches, num_workers=workers,
                      collate_fn=_as_lists, persistent_workers=False)
