"""The training data: the rows a training learns from and their labels (`prepare_data`, which
refuses before anything is built a request that cannot train or score), the optimiser steps of
each epoch, and the batches of each epoch in their seeded order, from image files or shards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from taxonclip import distributed as dist
from taxonclip.captions.keyed import check_caption_split
from taxonclip.checks import check_decoder, check_has_test_images, check_no_label_in_queries
from taxonclip.config import CLUSTER_LABEL, TrainConfig, check_label
from taxonclip.data.images import ImageDataset
from taxonclip.data.manifest import Manifest, load_manifest
from taxonclip.data.splits import Split, make_split, validation_split
from taxonclip.data.streams import (Decoded, DeviceDecoder, Encoded, ShardedRows, ShardStream,
                                    batches_per_rank, collate_encoded, epoch_shards)
from taxonclip.data.subset import class_subset
from taxonclip.errors import ConfigError, DataError
from taxonclip.table import Seen, check_metric_cell, seen_of_split


@dataclass(frozen=True)
class TrainData:
    """The training rows, their class ids, the class names in id order, the seen classes (those
    kept when training on a fraction of them, or an official split's seen partitions), and the
    optimiser steps of each epoch (equal on every rank)."""

    manifest: Manifest
    split: Split
    rows: np.ndarray
    labels: np.ndarray
    classes: list[str]
    seen: Seen | None
    epoch_steps: tuple[int, ...]
    # what the per-epoch validation scores: the table of the gallery and val rows only, and its
    # split (val rows as queries); None without val rows
    validation: tuple[Manifest, Split] | None = None


def validation_data(manifest: Manifest, split: Split) -> tuple[Manifest, Split] | None:
    """The manifest restricted to what a training's validation embeds (never a test row) and
    its split, the val rows as queries; None when the split has no val rows."""
    if len(split.val) == 0:
        return None
    rows, val_split = validation_split(split)
    return replace(manifest, table=manifest.table.iloc[rows].reset_index(drop=True)), val_split


def prepare_data(config: TrainConfig, world_size: int = 1) -> TrainData:
    """Load the manifest, split it, keep the training rows that have a label at `config.label`
    (any rank of the data; genus-only names count at genus level) and belong to the selected
    classes, number the labels; refuse, before anything is built, a request that cannot train
    or score."""
    manifest = load_manifest(config.data)
    check_label(config.label, manifest.levels, manifest.report.source)
    check_no_label_in_queries(manifest, config.embedding, config.allow_label_text)
    check_decoder(manifest, config.decode)
    table = manifest.table
    split = make_split(table, config.data)
    check_has_test_images(manifest, split)
    check_caption_split(table, split, config.data)
    validation = validation_data(manifest, split)
    if validation is None and config.select == "best":
        raise DataError(f"{manifest.report.source}: select=best picks the epoch by its validation "
                        f"metric, and the split has no validation row (val_size "
                        f"{config.data.val_size:g}"
                        + (", no val or val_unseen partition" if split.protocol == "official"
                           else "") + "); use select=last")
    # clusters label every training image: the rows are those of the species kept, if not all
    level = "species" if config.label == CLUSTER_LABEL else config.label
    label_of = table[level]
    rows = split.training_rows
    if config.label != CLUSTER_LABEL:
        rows = rows[label_of.iloc[rows].notna().to_numpy()]
    seen = seen_of_split(split)
    subset = class_subset(table, config.data, level)
    if subset is not None:
        rows = rows[subset.rows[rows]]
        seen = Seen(level, subset.classes)
    if len(rows) == 0:
        raise DataError(f"no training image has a {config.label} label in {manifest.report.source}")
    check_metric_cell(config.metric, table["taxa"].unique(), seen is not None, manifest.levels)
    epoch_steps = _epoch_steps(manifest, rows, config, world_size)
    if config.label == CLUSTER_LABEL:  # labelled once the starting model has embedded them
        _check_cluster_count(config.clusters, table["species"].iloc[rows].nunique())
        return TrainData(manifest, split, rows, np.full(len(rows), -1), [], seen, epoch_steps,
                         validation)
    classes = sorted(label_of.iloc[rows].unique())
    labels = pd.Categorical(label_of.iloc[rows], categories=classes).codes.astype(np.int64)
    return TrainData(manifest, split, rows, labels, classes, seen, epoch_steps, validation)


def _check_cluster_count(asked: float, species: int) -> None:
    """Refuse a count of clusters above the training images' species: the run would train
    fewer clusters than its parameter says."""
    if asked > 1 and int(asked) > species:
        raise ConfigError(f"parameter 'clusters' is {int(asked)}, more than the {species} species "
                          f"of the training images; ask for at most {species} clusters, or a "
                          f"fraction of the species (0 < clusters <= 1)")


def steps_per_epoch(images: int, config: TrainConfig, world_size: int) -> int:
    """Optimiser steps in one epoch of image files: full batches per process, `grad_accum`
    batches a step."""
    return images // world_size // config.batch_size // config.grad_accum


def _epoch_steps(manifest: Manifest, rows: np.ndarray, config: TrainConfig,
                 world_size: int) -> tuple[int, ...]:
    """The optimiser steps of every epoch, refused when one would take none. From shards, a step
    count is what the rank with the fewest full batches in that epoch's shard order can give."""
    if not manifest.shards:
        steps = (steps_per_epoch(len(rows), config, world_size),) * config.epochs
        per_process = f"{len(rows) // world_size} per process"
    else:
        per_shard = ShardedRows.of(manifest.table, manifest.shards, rows).per_shard()
        steps = tuple(min(batches_per_rank(per_shard, epoch_shards(per_shard, config.data.seed, e,
                                                                   world_size),
                                           config.workers, config.batch_size)) // config.grad_accum
                      for e in range(config.epochs))
        per_process = (f"in {int((per_shard > 0).sum())} shards, dealt to {world_size} process(es) "
                       f"x {max(config.workers, 1)} worker(s), each worker dropping its last "
                       f"incomplete batch")
    if min(steps, default=1) == 0:
        needed = config.batch_size * config.grad_accum
        raise ConfigError(f"{len(rows)} training images ({per_process}) make no optimiser step in "
                          f"epoch {steps.index(0) + 1}: one step takes batch_size "
                          f"{config.batch_size} x grad_accum {config.grad_accum} = {needed} images "
                          f"per process; lower batch_size or grad_accum"
                          + (", or workers, or prepare smaller shards" if manifest.shards else ""))
    return steps


class EpochLoader:
    """The training batches: each epoch's seeded order (chosen by `choose_epoch`), exactly
    `steps[epoch]` optimiser steps of `grad_accum` micro-batches from a DataLoader, each batch's
    images made the model's input by `to_device` where they are decoded there."""

    def __init__(self, loader: DataLoader, choose_epoch: Callable[[int], None],
                 steps: tuple[int, ...], to_device: Callable | None = None) -> None:
        self.loader, self.choose_epoch, self.steps = loader, choose_epoch, steps
        self.to_device = to_device

    def micro_batches(self, epoch: int, grad_accum: int):
        """The (images, labels) micro-batches of each optimiser step of `epoch`."""
        self.choose_epoch(epoch)
        batches = iter(self.loader)
        for step in range(self.steps[epoch]):
            try:
                yield [self._input(*next(batches)[:2]) for _ in range(grad_accum)]
            except StopIteration:
                raise DataError(f"epoch {epoch + 1} ran out of training batches at step "
                                f"{step + 1} of {self.steps[epoch]}: the images read are fewer "
                                f"than the manifest lists (were shards changed?)") from None

    def _input(self, images, labels):
        return (images if self.to_device is None else self.to_device(images)), labels


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, every rank getting the same count."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order to give next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: len(self) * self.world_size]
        return iter(order[self.rank::self.world_size].tolist())


def make_loader(data: TrainData, encoder, config: TrainConfig, info: dist.DistInfo) -> EpochLoader:
    """The training batches: augmentation, seeded per-epoch order, full batches only; from image
    files (a seeded permutation of the rows) or from shards (see `taxonclip.data.streams`)."""
    if data.manifest.shards:
        return _shard_loader(data, encoder, config, info)
    paths = data.manifest.table["image_path"].iloc[data.rows].tolist()
    dataset = ImageDataset(paths, encoder.train_transform(), labels=data.labels.tolist())
    sampler = EpochSampler(len(dataset), config.data.seed, info.rank, info.world_size)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.workers, pin_memory=info.device.type == "cuda",
                        persistent_workers=False)
    return EpochLoader(loader, sampler.set_epoch, data.epoch_steps)


def _shard_loader(data: TrainData, encoder, config: TrainConfig, info: dist.DistInfo) -> EpochLoader:
    rows = ShardedRows.of(data.manifest.table, data.manifest.shards, data.rows, data.labels)
    per_shard = rows.per_shard()
    on_device = config.decode == "device"
    stream = ShardStream(rows, Encoded() if on_device else Decoded(encoder.train_transform()))

    def choose_epoch(epoch: int) -> None:
        shards = epoch_shards(per_shard, config.data.seed, epoch, info.world_size)[info.rank]
        stream.select(shards, shuffle_seed=f"{config.data.seed}:{epoch}:{info.rank}")

    loader = DataLoader(stream, batch_size=config.batch_size, drop_last=True,
                        num_workers=config.workers, persistent_workers=False,
                        pin_memory=info.device.type == "cuda" and not on_device,
                        collate_fn=collate_encoded if on_device else None)
    to_device = DeviceDecoder(encoder.tensor_transform(train=True), info.device) if on_device else None
    return EpochLoader(loader, choose_epoch, data.epoch_steps, to_device)
