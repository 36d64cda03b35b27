"""Sharded images for a model: the wanted rows of WebDataset shards as a stream of
`(image, label, position)`, and the seeded order in which training reads them.

Streams split shards across ranks and DataLoader workers, never rows, so that each process reads
whole shards. The training order of an epoch is a shuffle of the shards seeded by (seed, epoch),
dealt to the ranks round-robin, each rank's shards dealt to its workers round-robin, then a
buffer shuffle of the samples inside each worker seeded by (seed, epoch, rank, worker): a
function of the seed, the epoch and the process layout alone, so a resumed run reads the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from taxonclip.data.shards import decode_sample, iter_samples
from taxonclip.errors import DataError
from taxonclip.names import KEY_COLUMN, SHARD_COLUMN

SHUFFLE_BUFFER = 1000  # samples a worker shuffles among
Sample = tuple[torch.Tensor, int, int]


@dataclass(frozen=True)
class ShardedRows:
    """Which sample of which shard each wanted row is, with its label: what a stream reads."""

    urls: tuple[str, ...]
    shard: np.ndarray  # per wanted row, its shard index
    key: np.ndarray  # per wanted row, its key
    labels: np.ndarray  # per wanted row, its label (-1 without)

    @classmethod
    def of(cls, table: pd.DataFrame, urls: Sequence[str], rows: np.ndarray,
           labels: Sequence[int] | None = None) -> ShardedRows:
        """The rows `rows` of a sharded table (labels default to -1)."""
        labels = np.full(len(rows), -1) if labels is None else np.asarray(labels)
        return cls(tuple(urls), table[SHARD_COLUMN].to_numpy()[rows].astype(np.int64),
                   table[KEY_COLUMN].astype(str).to_numpy()[rows], labels.astype(np.int64))

    def per_shard(self) -> np.ndarray:
        """How many wanted rows each shard holds."""
        return np.bincount(self.shard, minlength=len(self.urls))

    def lookup(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(shard, key) -> (label, position among the wanted rows)."""
        return {(int(s), str(k)): (int(label), i)
                for i, (s, k, label) in enumerate(zip(self.shard, self.key, self.labels))}


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class Decoded:
    """A sample's image decoded by PIL and transformed (in the DataLoader worker)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> torch.Tensor:
        return self.transform(decode_sample(sample))


class Encoded:
    """A sample's image left for `DeviceDecoder`: a JPEG's bytes as a uint8 tensor, any other
    image decoded here as a uint8 (3, H, W) tensor."""

    def __call__(self, sample: dict) -> torch.Tensor:
        key = next((ext for ext in ("jpg", "jpeg") if ext in sample), None)
        if key is not None:
            return torch.frombuffer(bytearray(sample[key]), dtype=torch.uint8)
        return torch.from_numpy(np.array(decode_sample(sample))).permute(2, 0, 1)


def collate_encoded(batch: Sequence[Sample | None]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch of `Encoded` items: the images as a list (their sizes differ), labels, positions;
    the None of a skipped image is left out."""
    items = [item for item in batch if item is not None]
    if not items:
        return [], torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    images, labels, positions = zip(*items)
    return list(images), torch.tensor(labels, dtype=torch.long), torch.tensor(positions, dtype=torch.long)


def jpeg_decoder() -> Callable:
    """A batch JPEG decoder `decode(list_of_encoded, mode="RGB", device=...)`: TorchCodec's
    (nvJPEG on CUDA), or where TorchCodec is not installed torchvision's, which has the same
    call and is deprecated since torchvision 0.29."""
    try:
        from torchcodec.decoders import decode_jpeg
    except ImportError:
        return _torchvision_decode_jpeg
    return decode_jpeg


def _torchvision_decode_jpeg(sources: list[torch.Tensor], mode: str, device) -> list[torch.Tensor]:
    import warnings

    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(sources, mode=mode, device=device)


class DeviceDecoder:
    """Decode a batch of `Encoded` images on `device` (nvJPEG on CUDA, one call per batch) and
    transform each there; returns the (B, 3, size, size) batch."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.transform, self.device = transform, device
        self.decode_jpeg = jpeg_decoder()

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        jpegs = [i for i, image in enumerate(images) if image.ndim == 1]
        decoded = list(images)
        if jpegs:
            try:
                out = self.decode_jpeg([images[i] for i in jpegs], mode="RGB", device=self.device)
            except RuntimeError as err:
                raise DataError(f"a JPEG of this batch does not decode on {self.device}: {err}; "
                                f"`taxonclip data check` finds it with decode=workers") from None
            for i, image in zip(jpegs, out):
                decoded[i] = image
        return torch.stack([self.transform(image.to(self.device, non_blocking=True))
                            for image in decoded])


class ShardStream(IterableDataset):
    """The wanted rows of some shards as `(load(sample), label, position)` (`load`: `Decoded` or
    `Encoded`), each worker reading its share of the shards (`shards[worker::workers]`); with
    `shuffle_seed`, a seeded buffer shuffle of the samples (per epoch and worker). A wanted
    sample whose image does not decode raises, naming its shard and key, or with
    `skip_undecodable` gives None."""

    def __init__(self, rows: ShardedRows, load: Callable[[dict], torch.Tensor],
                 shards: Sequence[int] | None = None, shuffle_seed: int | None = None,
                 skip_undecodable: bool = False) -> None:
        self.rows = rows
        self.load = load
        self.shards = list(range(len(rows.urls))) if shards is None else list(shards)
        self.shuffle_seed = shuffle_seed
        self.skip_undecodable = skip_undecodable
        self._lookup = rows.lookup()
        self._index = {url: i for i, url in enumerate(rows.urls)}

    def select(self, shards: Sequence[int], shuffle_seed: int | None) -> None:
        """Read these shards next, in this order, shuffled by this seed (None: in order)."""
        self.shards, self.shuffle_seed = list(shards), shuffle_seed

    def __iter__(self) -> Iterator[Sample | None]:
        worker, workers = _worker()
        mine = [self.rows.urls[s] for s in self.shards[worker::workers]]
        samples = self._wanted(iter_samples(mine)) if mine else iter(())
        if self.shuffle_seed is not None:
            samples = _buffer_shuffle(samples, random.Random(f"{self.shuffle_seed}:{worker}"))
        for sample, (label, position) in samples:
            try:
                image = self.load(sample)
            except DataError:
                if self.skip_undecodable:
                    yield None
                    continue
                raise
            yield image, label, position

    def _wanted(self, samples: Iterator[dict]) -> Iterator[tuple[dict, tuple[int, int]]]:
        for sample in samples:
            found = self._lookup.get((self._index[sample["__url__"]], sample["__key__"]))
            if found is not None:
                yield sample, found


def _buffer_shuffle(items: Iterator, rng: random.Random, size: int = SHUFFLE_BUFFER) -> Iterator:
    """Items in a random order drawn from a buffer of `size` (reproducible with one rng)."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def epoch_shards(per_shard: np.ndarray, seed: int, epoch: int, world_size: int) -> list[list[int]]:
    """Per rank, the shards it trains on in `epoch`: those with training rows, in an order
    seeded by (seed, epoch), dealt round-robin."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = [s for s in torch.randperm(len(per_shard), generator=generator).tolist()
             if per_shard[s] > 0]
    return [order[rank::world_size] for rank in range(world_size)]


def batches_per_rank(per_shard: np.ndarray, rank_shards: list[list[int]], workers: int,
                     batch_size: int) -> list[int]:
    """The full batches each rank's DataLoader gives: each worker batches its own shards and
    drops its last incomplete batch."""
    workers = max(workers, 1)
    return [sum(int(per_shard[shards[w::workers]].sum()) // batch_size for w in range(workers))
            for shards in rank_shards]
