"""Fine-tuning: margin-based softmax over PartialFC class centres, validated every few epochs.

Every choice of a training reads the validation rows only (`data.splits.validation_split`: the
val rows as queries, the other non-test rows as the gallery; no test image is embedded): the
per-epoch metrics `val/<taxa>/<level>/<score>`, the best epoch, a sweep's pruning and objective.
At the end the selected epoch's weights (`select`: the best by validation, or the last) are the
run's model: they are scored once on the test split, and that table (`eval/...` metrics, the
per-taxa table artifacts) is the run's result.

Batches: `batch_size` images per micro-batch per process; with `grad_accum` k, one optimiser
step sees k micro-batches (each loss divided by k, so the step follows the mean loss of the
k·batch_size images) and the scheduler steps once per optimiser step. Training batches have
equal size (the last incomplete batch of an epoch is dropped), which makes k micro-batches of
size b give the same update as one batch of size k·b for a model without batch-dependent layers.

Resume: a checkpoint is written at the end of every epoch; `resume=<run_id>` restarts from the
last one into the same MLflow run, with the same step numbers and the same data order (each
epoch's order and augmentation are seeded by (seed, epoch)); steps already logged are not
logged again.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from taxonclip import clusters, names
from taxonclip import distributed as dist
from taxonclip.config import (CLUSTER_LABEL, TRAIN_PARAMS, TrainConfig, check_label, flat_fields,
                              from_params, to_params)
from taxonclip.data.audit import report_for_run
from taxonclip.diskio import tensor_bytes
from taxonclip.data.images import ImageDataset
from taxonclip.captions.keyed import check_caption_split
from taxonclip.data.manifest import Manifest, load_manifest
from taxonclip.data.shards import is_sharded
from taxonclip.data.splits import Split, make_split, split_name_parts, validation_split
from taxonclip.data.subset import class_subset
from taxonclip.data.streams import (Decoded, DeviceDecoder, Encoded, ShardedRows, ShardStream,
                                    batches_per_rank, collate_encoded, epoch_shards)
from taxonclip.errors import ConfigError, DataError, TrainingDiverged
from taxonclip.formats import percent
from taxonclip.checks import (check_decoder, check_has_test_images, check_no_label_in_queries,
                              gauges_captions)
from taxonclip.embed import embed_visual
from taxonclip.evaluation import evaluate
from taxonclip.table import (EvalResult, Seen, check_metric_cell, scored_note, seen_of_split,
                             split_csv, table_cell)
from taxonclip.losses import CombinedMarginLoss, PartialFC
from taxonclip.progress import Progress, say
from taxonclip.tracking.run_logging import NullRun, Run
from taxonclip.tracking.tables import table_counts, table_metrics

LOG_EVERY_STEPS = 50
EpochCallback = Callable[[int, EvalResult], None]


@dataclass
class TrainState:
    """Everything a checkpoint holds, the backbone replica the steps run, and the loop's
    counters."""

    encoder: torch.nn.Module
    head: PartialFC
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # the backbone the steps run: encoder.visual, in DistributedDataParallel under torchrun
    replica: torch.nn.Module | None = None
    step: int = 0
    epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    # the validation table of the selected epoch so far (rank 0; not kept by a checkpoint)
    selected_table: pd.DataFrame | None = None
    last_metric: float = math.nan  # the validation metric of the last validated epoch
    # select=best: the best epoch's weights and this rank's centres, on the CPU (not kept by a
    # checkpoint: a resumed run reads them from the best epoch's checkpoint)
    best_weights: tuple[dict, torch.Tensor] | None = None


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


WARMUP_FRACTION = 0.1  # OneCycleLR's pct_start, as in UNICOM's recipe


def warmup_fraction(total_steps: int) -> float:
    """OneCycleLR's pct_start for a schedule of `total_steps`: WARMUP_FRACTION, except where that
    leaves the warm-up phase zero-length."""
    # torch's warm-up phase ends at step pct_start * total_steps - 1, and it divides by that
    # length: 0.1 of exactly 10 steps ends it at step 0 (ZeroDivisionError). There it ends at
    # step 1 instead, as 0.1 of 20 steps does, and the anneal phase runs from step 1 to step 9.
    if WARMUP_FRACTION * total_steps == 1:
        return 2 / total_steps
    return WARMUP_FRACTION


def build_state(encoder, num_classes: int, config: TrainConfig, total_steps: int,
                device: torch.device) -> TrainState:
    """Model, PartialFC head, AdamW with two groups and OneCycleLR with per-group max_lr."""
    loss = config.loss
    margin = CombinedMarginLoss(s=loss.s, m1=loss.m1, m2=loss.m2, m3=loss.m3, filter=loss.filter)
    head = PartialFC(margin, encoder.spec.embed_dim, num_classes, loss.sample_rate).to(device)
    encoder = encoder.to(device).train()
    groups = [{"params": [p for p in encoder.visual.parameters() if p.requires_grad],
               "lr": config.lr},
              {"params": list(head.parameters()), "lr": config.lr * config.lr_pfc_weight}]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    # A scalar max_lr would give the centres the backbone's rate: pass one per group.
    total_steps = max(1, total_steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[config.lr, config.lr * config.lr_pfc_weight],
        total_steps=total_steps, pct_start=warmup_fraction(total_steps))
    return TrainState(encoder, head, optimizer, scheduler, dist.data_parallel(encoder.visual, device))


def train_step(state: TrainState, micro_batches, forward, device: torch.device,
               grad_clip: float = 0.0) -> torch.Tensor:
    """One optimiser step over `micro_batches` [(images, labels)]; returns the mean loss as a
    device tensor (reading it would wait for the GPU, so the caller reads losses in batches).
    `forward` runs `state.replica`; under DDP, every micro-batch but the last skips the
    backbone's all-reduce (`no_sync`), and the last sends the accumulated gradients."""
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    last = len(micro_batches) - 1
    for index, (images, labels) in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with _gradient_sync(state.replica, index == last):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                embeddings = forward(images)
            loss = state.head(embeddings.float(), labels) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.encoder.visual.parameters(), grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return total


def _gradient_sync(replica: torch.nn.Module | None, sync: bool):
    """DDP's `no_sync()` where the gradients of this micro-batch are not to be sent yet."""
    if sync or not hasattr(replica, "no_sync"):
        return contextlib.nullcontext()
    return replica.no_sync()


def train_epoch(state: TrainState, loader: EpochLoader, forward, ctx: TrainContext) -> str:
    """One pass over the training data. Loss, lr and images/s are read back and logged every
    `LOG_EVERY_STEPS` steps (and at the end of the epoch), so the GPU never waits for the log;
    returns the epoch's steps, seconds and the last of those values as text."""
    config = ctx.config
    progress = Progress(loader.steps[state.epoch], f"epoch {state.epoch + 1}/{config.epochs}",
                        "steps", show=ctx.info.is_main, every=LOG_EVERY_STEPS, last_line=False)
    pending: list[tuple[int, float, torch.Tensor]] = []
    window_start = time.perf_counter()
    for micro_batches in loader.micro_batches(state.epoch, config.grad_accum):
        lr = state.scheduler.get_last_lr()[0]
        pending.append((state.step + 1, lr,
                        train_step(state, micro_batches, forward, ctx.device, config.grad_clip)))
        if len(pending) == LOG_EVERY_STEPS:
            _log_steps(pending, window_start, ctx, progress)
            pending, window_start = [], time.perf_counter()
        progress.update()
    if pending:
        _log_steps(pending, window_start, ctx, progress)
    progress.close()
    state.epoch += 1
    return f"{progress.done} steps in {progress.seconds:.1f} s, {progress.values}"


def _log_steps(pending, window_start: float, ctx: TrainContext, progress: Progress) -> None:
    """Read a window of step losses back (one device sync), stop on a non-finite loss, log."""
    losses = torch.stack([loss for _, _, loss in pending]).tolist()
    for (step, _, _), loss in zip(pending, losses):
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss is {loss} at step {step}: training diverged; lower lr (now "
                f"{ctx.config.lr:g}), set grad_clip (e.g. 1.0), or check the data for broken "
                f"images or wrong labels")
    images = len(pending) * ctx.config.batch_size * ctx.config.grad_accum * ctx.info.world_size
    img_per_s = images / max(time.perf_counter() - window_start, 1e-9)
    ctx.run.log_metric_history([
        (step, {names.TRAIN_LOSS: loss, names.TRAIN_LR: lr, names.TRAIN_IMG_PER_S: img_per_s})
        for (step, lr, _), loss in zip(pending, losses) if step > ctx.logged.last_step])
    progress.note(**{"loss": f"{losses[-1]:.4f}", "lr": f"{pending[-1][1]:.2e}",
                     "img/s": f"{img_per_s:.0f}"})


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """The random states a checkpoint restores, so a resumed run draws the same numbers."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    # Tensors and plain values only, so checkpoints load with torch.load(weights_only=True).
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint(state: TrainState, config: TrainConfig, classes: list[str]) -> dict:
    """The checkpoint of `state` (gathered on every rank: the centres are sharded)."""
    head_shards = dist.all_gather_objects(
        {"weight": state.head.weight.detach().cpu(),
         "moments": {k: v.cpu() for k, v in state.optimizer.state.get(state.head.weight, {}).items()},
         "rng": rng_states()})
    return {"model": state.encoder.config(), "state_dict": state.encoder.state_dict(),
            "head_shards": head_shards, "optimizer": _optimizer_without_head(state),
            "scheduler": state.scheduler.state_dict(), "step": state.step, "epoch": state.epoch,
            "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "classes": classes, "train_params": to_params(config, TRAIN_PARAMS)}


def _optimizer_without_head(state: TrainState) -> dict:
    saved = state.optimizer.state_dict()
    head_index = len(state.optimizer.param_groups[0]["params"])
    saved["state"] = {k: v for k, v in saved["state"].items() if k != head_index}
    return saved


def restore(state: TrainState, saved: dict, info: dist.DistInfo) -> None:
    """Load a checkpoint into `state` (this rank's shard of the centres and their moments)."""
    if len(saved["head_shards"]) != info.world_size:
        raise ConfigError(f"the checkpoint was written by {len(saved['head_shards'])} processes; "
                          f"resume with the same number (now {info.world_size})")
    state.encoder.load_state_dict(saved["state_dict"])
    shard = saved["head_shards"][info.rank]
    with torch.no_grad():
        state.head.weight.copy_(shard["weight"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if shard["moments"]:
        device = state.head.weight.device
        state.optimizer.state[state.head.weight] = {k: v.to(device) for k, v in shard["moments"].items()}
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step, state.epoch = saved["step"], saved["epoch"]
    state.best_metric, state.best_epoch = saved["best_metric"], saved["best_epoch"]
    set_rng_states(shard["rng"])


@dataclass(frozen=True)
class TrainResult:
    """What a training produced: the selected model's one evaluation on the test split (None off
    rank 0), its run, the selected epoch (`select`) with its validation `metric` value and
    validation table, and where that epoch's checkpoint is kept."""

    evaluation: EvalResult | None
    run_id: str | None
    experiment_id: str | None
    metric: str
    epochs: int  # the run's own (a resume's request names none)
    selected_epoch: int
    selected_metric: float  # validation; NaN without val rows
    selected_checkpoint: str | None
    validation: pd.DataFrame | None = None  # the selected epoch's validation table
    select: str = "best"

    @property
    def table(self) -> pd.DataFrame:
        """The final per-taxa table: the selected model on the test split."""
        return self.evaluation.table


def run_name(config: TrainConfig) -> str:
    """The run's name in the MLflow UI, which tells runs apart at a glance:
    "train ViT-B/32 species lr=1e-05 m2=0.3"."""
    loss = config.loss
    parts = ["train", config.model.name, config.label, f"lr={config.lr:g}",
             f"m3={loss.m3:g}" if loss.m3 > 0 else f"m2={loss.m2:g}"]
    if config.model.weights != "pretrained":
        parts.append(f"weights={Path(config.model.weights).name}")
    if loss.sample_rate < 1:
        parts.append(f"sample_rate={loss.sample_rate:g}")
    if config.data.class_fraction < 1:
        parts.append(f"class_fraction={config.data.class_fraction:g}")
    parts += [part for part in split_name_parts(config.data) if not part.startswith("class_fraction")]
    if config.select != "best":
        parts.append(f"select={config.select}")
    return " ".join(parts)


def check_captions_before_run(config: TrainConfig, data: TrainData, encoder) -> None:
    """Refuse, before any run is created, captions that the caption gauge catches in a
    query-side text embedding: scored alone, they find the label of more validation queries
    than the starting model's images do (see `taxonclip.checks`). Without val rows the check
    scores the test split instead: a refusal chooses nothing, and nothing has been trained."""
    eval_config = config.eval_config()
    if not gauges_captions(data.manifest, eval_config):
        return
    manifest, split = data.validation or (data.manifest, data.split)
    reason = None
    try:
        evaluate(eval_config, encoder, manifest, split, seen=data.seen, spread=True)
    except DataError as error:  # raised on rank 0, which scores: every rank must stop
        reason = str(error)
    reason = dist.broadcast_object(reason)
    if reason is not None:
        raise DataError(reason)


def run_training(config: TrainConfig, parent_run_id: str | None = None,
                 on_epoch: EpochCallback | None = None, run_tags: dict | None = None) -> TrainResult:
    """Train and evaluate one model, logging to MLflow from rank 0; returns the final evaluation
    with its run and best epoch.

    `on_epoch(epoch, result)` is called on rank 0 after each evaluation (a sweep reports to its
    pruner there; raising `tracking.runs.RunKilled` ends the run as KILLED). With
    `config.resume`, the run's own parameters are used (see `resume_config`).
    """
    from taxonclip.tracking.models import resolve_model
    from taxonclip.tracking.runs import tracked_run

    info = dist.init_from_env(config.device)
    try:
        if config.resume:
            config = dist.broadcast_object(resume_config(config) if info.is_main else None)
        data = prepare_data(config, info.world_size)
        # a resumed run logged its data report when it started
        fresh_run = info.is_main and not config.resume
        report = report_for_run(data.manifest, data.split) if fresh_run else ""
        encoder = resolve_model(config.model, str(info.device), seed=config.data.seed)
        if not config.resume:  # a resumed run passed the check when it started
            check_captions_before_run(config, data, encoder)
        with tracked_run("train", main=info.is_main, resume_run_id=config.resume,
                         parent_run_id=parent_run_id, tags=run_tags,
                         run_name=run_name(config)) as run:
            if not config.resume:
                # the first thing a new run holds, in one call: a run is resumable once it has them
                run.log_params(to_params(config, TRAIN_PARAMS))
                run.log_text(report, names.DATA_SUMMARY)
            context = TrainContext(config, data, run, info, on_epoch)
            return _train_in_run(context, encoder)
    finally:
        dist.shutdown()


# What a resume may change: where and how fast the run computes, not what it computes (and
# not the worker count of a sharded dataset).
RESUME_MAY_CHANGE = ("resume", "device", "workers", "compile", "register_as")


def resume_config(requested: TrainConfig) -> TrainConfig:
    """The configuration a resume of run `requested.resume` continues with: the run's own
    parameters, and from `requested` only those of RESUME_MAY_CHANGE.

    Only an unfinished train run can be resumed. A parameter that `requested` sets to a value
    other than its default and other than the run's own would change the result: refused,
    naming it. (A parameter at its default counts as not given, since `mlflow run` passes every
    parameter with its MLproject default.)"""
    from taxonclip.tracking.queries import get_run

    record = get_run(requested.resume)
    if record.entry != "train" or record.status == "FINISHED":
        kind = record.entry or "unknown"
        # only a train run logs a model to train further from
        further = (f" To train a finished model further, start a new run from its weights: "
                   f"taxonclip train --model {record.params.get('model', '<model>')} --weights "
                   f"runs:/{record.run_id}/model ..." if kind == "train" else
                   f" A {kind} run logs no model; start a new train run.")
        raise ConfigError(
            f"run {record.run_id} is a {record.status} {kind} run; only an unfinished train run "
            f"can be resumed, and that run is left as it is.{further}")
    logged = {name: value for name, value in record.params.items() if name in TRAIN_PARAMS}
    _check_resumable(record, logged)
    own = from_params(TrainConfig, {**logged, "resume": requested.resume}, TRAIN_PARAMS)
    asked, kept, default = (flat_fields(c) for c in (requested, own, TrainConfig()))
    # from shards, each worker batches its own shards: the worker count shapes the batches
    may_change = tuple(name for name in RESUME_MAY_CHANGE
                       if name != "workers" or not is_sharded(own.data.data))
    for name, path in TRAIN_PARAMS.items():
        if name in may_change or asked[path] in (kept[path], default[path]):
            continue
        why = " (from shards, the worker count shapes the batches)" if name == "workers" else ""
        raise ConfigError(f"parameter {name!r} is {asked[path]!r}, but run {record.run_id} was "
                          f"trained with {kept[path]!r}{why}; a resume continues the run with its "
                          f"own parameters (leave {name} out, or start a new run)")
    changes = {name: to_params(requested, TRAIN_PARAMS)[name] for name in may_change}
    return from_params(TrainConfig, {**to_params(own, TRAIN_PARAMS), **changes}, TRAIN_PARAMS)


def _check_resumable(record, logged: dict[str, str]) -> None:
    """Refuse a run whose parameters are not all logged: a resume takes every parameter from
    the run, never a default. A run that holds none (stopped between its start and its first
    call, which logs them all at once) did no work to keep: it is ended KILLED, saying why."""
    missing = [name for name in TRAIN_PARAMS if name not in logged and name not in RESUME_MAY_CHANGE]
    if not missing:
        return
    if not logged:
        from taxonclip.tracking.sweeps import end_killed

        end_killed(record.run_id, "stopped before it logged its parameters; it cannot be resumed")
        raise ConfigError(f"run {record.run_id} holds no parameters: it was stopped before it "
                          f"logged them, so what it was to train is unknown and it cannot be "
                          f"resumed; it is ended KILLED. Start the training anew (taxonclip "
                          f"train with its parameters, without --resume)")
    raise ConfigError(f"run {record.run_id} lacks the parameter(s) {', '.join(missing)}, which a "
                      f"resume would have to guess; it is left as it is. Start the training anew "
                      f"(taxonclip train with its parameters, without --resume)")


@dataclass(frozen=True)
class Logged:
    """What a run already holds when it is resumed, so that nothing is logged twice: the last
    step of the training curves, the last epoch with eval metrics, and whether the model is in."""

    last_step: int = -1
    last_eval_epoch: int = -1  # the last epoch with validation metrics
    has_model: bool = False
    has_test_metrics: bool = False  # the final evaluation's eval/ metrics


@dataclass(frozen=True)
class TrainContext:
    """What the epoch loop works with besides the state: the typed config, the data, the run it
    logs to (a no-op run off rank 0), this process's place among the ranks, the per-epoch
    callback, and what a resumed run had logged already. Frozen: a change (the cluster labels,
    what a resumed run holds) is a new context, made with `dataclasses.replace`."""

    config: TrainConfig
    data: TrainData
    run: Run | NullRun
    info: dist.DistInfo
    on_epoch: EpochCallback | None = None
    logged: Logged = Logged()

    @property
    def device(self) -> torch.device:
        """The device this process trains on."""
        return self.info.device


def _train_in_run(ctx: TrainContext, encoder) -> TrainResult:
    config = ctx.config
    seed_everything(config.data.seed)
    if config.label == CLUSTER_LABEL:
        ctx = replace(ctx, data=_with_cluster_labels(ctx, encoder))
    loader = make_loader(ctx.data, encoder, config, ctx.info)
    state = build_state(encoder, len(ctx.data.classes), config, sum(ctx.data.epoch_steps), ctx.device)
    forward = torch.compile(state.replica) if config.compile else state.replica
    ctx = replace(ctx, logged=_resume(state, ctx))
    if state.epoch == 0:
        ctx.run.log_params({**to_params(config, TRAIN_PARAMS), **_sizes(state, ctx.data)})
    while state.epoch < config.epochs:
        summary = train_epoch(state, loader, forward, ctx)
        if ctx.data.validation is not None and (state.epoch % config.eval_every == 0
                                                or state.epoch == config.epochs):
            result = _validate_epoch(state, ctx)
            summary = f"{summary}; {_headline(result, state, config)}"
        if ctx.info.is_main:
            say(f"epoch {state.epoch}/{config.epochs}: {summary}")
        _save_checkpoint(state, ctx)
    selected = _select(state, ctx)
    # the selected model scored once on the test split: the run's result
    result = evaluate(config.eval_config(), state.encoder, ctx.data.manifest, ctx.data.split,
                      seen=ctx.data.seen, spread=True, refuse_label_text=False)
    _finish(state, ctx, result, selected)
    checkpoint = ctx.run.artifact_location(f"{names.CHECKPOINT_DIR}/{_checkpoint_name(selected)}")
    metric = state.best_metric if config.select == "best" else state.last_metric
    return TrainResult(result, ctx.run.run_id, ctx.run.experiment_id, config.metric, config.epochs,
                       selected, metric, checkpoint, state.selected_table, config.select)


def _headline(result: EvalResult | None, state: TrainState, config: TrainConfig) -> str:
    """The epoch's validation metric and the best so far, in percent (rank 0 only)."""
    if result is None:
        return ""
    value = table_cell(result.table, config.metric)
    return (f"validation {config.metric} {percent(value)}% (best {percent(state.best_metric)}% "
            f"at epoch {state.best_epoch})")


def _select(state: TrainState, ctx: TrainContext) -> int:
    """The epoch whose weights are the run's model (`select`), loaded into the encoder and the
    centres where it is not the last; with its validation table on rank 0 where the run has
    validation rows (scored again when a resumed run no longer holds it)."""
    config = ctx.config
    selected = state.epoch
    if config.select == "best" and 0 < state.best_epoch < state.epoch:
        selected = state.best_epoch
        weights = dist.broadcast_object(state.best_weights is not None)
        if not weights:  # a resumed run: from the best epoch's checkpoint
            saved = _checkpoint_of(ctx.run, _checkpoint_name(selected)) if ctx.info.is_main else None
            saved = dist.broadcast_object(saved)
            if saved is None:
                raise DataError(f"the checkpoint of the best epoch {selected} is not in run "
                                f"{ctx.run.run_id}; resume it with select=last")
            state.best_weights = (saved["state_dict"],
                                  saved["head_shards"][ctx.info.rank]["weight"])
        state.encoder.load_state_dict(state.best_weights[0])
        with torch.no_grad():
            state.head.weight.copy_(state.best_weights[1])
    # rank 0 holds the tables: every rank learns whether all of them must validate again
    again = dist.broadcast_object(ctx.data.validation is not None and state.selected_table is None)
    if again:
        validation = _validate(state, ctx)
        if validation is not None:
            state.selected_table = validation.table
            state.last_metric = _selection_metric(validation, config.metric)
    return selected


def _with_cluster_labels(ctx: TrainContext, encoder) -> TrainData:
    """The training rows labelled by k-means clusters of the starting model's embeddings (or
    those of the run it resumes, which rank 0 reads); every rank receives them."""
    logged = _logged_assignment(ctx) if ctx.info.is_main and ctx.config.resume else None
    logged = dist.broadcast_object(logged)
    assignment = logged if logged is not None else dist.broadcast_object(_cluster(ctx, encoder))
    return replace(ctx.data, labels=assignment.astype(np.int64),
                   classes=[f"cluster {i}" for i in range(int(assignment.max()) + 1)])


def _cluster(ctx: TrainContext, encoder) -> np.ndarray | None:
    """Embed the training images (every rank its share), cluster them on rank 0, and log the
    k-means seconds, the clusters' NMI and ARI against species and genus, and each image's
    cluster; the assignment on rank 0, None on the other ranks."""
    data, config = ctx.data, ctx.config
    rows = data.manifest.table.iloc[data.rows].reset_index(drop=True)
    k = clusters.cluster_count(config.clusters, rows["species"].nunique(), len(rows))
    vectors, kept = embed_visual(encoder.to(ctx.device), replace(data.manifest, table=rows),
                                 config.eval_config(), ctx.device, spread=True)
    if len(kept) < len(rows):
        raise DataError(f"{len(rows) - len(kept)} training images did not decode; label=cluster "
                        f"clusters every training image (fix them, or drop them from the manifest)")
    if vectors is None:  # another rank than 0: its share went to rank 0
        return None
    start = time.perf_counter()
    assignment, _ = clusters.kmeans(vectors, k, config.data.seed)
    metrics = {names.CLUSTER_COUNT: k, names.CLUSTER_KMEANS_SECONDS: time.perf_counter() - start}
    for level in ("species", "genus"):
        known = rows[level].notna().to_numpy()
        if known.any():
            truth = rows[level].to_numpy()[known]
            metrics[names.cluster_purity("nmi", level)] = clusters.normalized_mutual_information(
                truth, assignment[known])
            metrics[names.cluster_purity("ari", level)] = clusters.adjusted_rand_index(
                truth, assignment[known])
    ctx.run.log_metrics(metrics)
    ctx.run.log_text(pd.DataFrame({"image_id": rows["image_id"], "cluster": assignment})
                     .to_csv(index=False), names.CLUSTER_ASSIGNMENT)
    return assignment


def _logged_assignment(ctx: TrainContext) -> np.ndarray | None:
    """The clusters a resumed run trained on, in the order of the training rows."""
    folder = Path(names.CLUSTER_ASSIGNMENT).parent.as_posix()
    if names.CLUSTER_ASSIGNMENT not in ctx.run.list_artifacts(folder):
        return None
    with _scratch() as scratch:
        logged = pd.read_csv(ctx.run.download(names.CLUSTER_ASSIGNMENT, scratch))
    by_image = logged.set_index("image_id")["cluster"]
    return by_image.loc[ctx.data.manifest.table["image_id"].iloc[ctx.data.rows]].to_numpy()


def _sizes(state: TrainState, data: TrainData) -> dict:
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"params_backbone": count(state.encoder.visual), "params_centres": count(state.head),
            "num_classes": len(data.classes), "train_images": len(data.rows)}


def _validate(state: TrainState, ctx: TrainContext) -> EvalResult | None:
    """Score the validation rows (every rank embeds its share, rank 0 scores): no test row is
    embedded."""
    manifest, split = ctx.data.validation
    return evaluate(ctx.config.eval_config(), state.encoder, manifest, split,
                    seen=ctx.data.seen, spread=True, refuse_label_text=False)


def _validate_epoch(state: TrainState, ctx: TrainContext) -> EvalResult | None:
    """Validate, log the epoch's `val/` metrics unless a resumed run holds them, and keep the
    best epoch by `config.metric` of the validation table."""
    result = _validate(state, ctx)
    if ctx.info.is_main:
        if state.epoch > ctx.logged.last_eval_epoch:
            # one call, so that a kill leaves the epoch's metrics all logged or none
            ctx.run.log_metrics({**table_metrics(result.table, names.val_metric),
                                 names.VAL_EMBED_IMG_PER_S: result.img_per_s}, step=state.epoch)
            ctx.run.log_params(table_counts(result.table, names.val_metric))
        metric = _selection_metric(result, ctx.config.metric)
        state.last_metric = metric
        state.selected_table = result.table if ctx.config.select == "last" else state.selected_table
        if metric > state.best_metric:
            state.best_metric, state.best_epoch = metric, state.epoch
            if ctx.config.select == "best":
                state.selected_table = result.table
        if ctx.on_epoch is not None:
            ctx.on_epoch(state.epoch, result)
    best = dist.broadcast_object((state.best_metric, state.best_epoch))
    state.best_metric, state.best_epoch = best
    if ctx.config.select == "best" and state.best_epoch == state.epoch:
        state.best_weights = ({k: v.detach().cpu().clone() for k, v in
                               state.encoder.state_dict().items()},
                              state.head.weight.detach().cpu().clone())
    return result


def _selection_metric(result: EvalResult, key: str) -> float:
    """The table cell `key` that picks the best checkpoint; an empty cell ranks lowest."""
    value = table_cell(result.table, key)
    return value if math.isfinite(value) else -math.inf


def _checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


def _save_checkpoint(state: TrainState, ctx: TrainContext) -> None:
    saved = checkpoint(state, ctx.config, ctx.data.classes)
    if not ctx.info.is_main:
        return
    # written to the run's spool first: the local copy stays until its upload succeeds; whole
    # or not at all, a full disk stopping the run resumably (tracked_run)
    path = ctx.run.stage(_checkpoint_name(state.epoch), lambda partial: torch.save(saved, partial),
                         tensor_bytes(saved))
    ctx.run.log_artifact(path, names.CHECKPOINT_DIR)
    _prune_checkpoints(state, ctx)


def _prune_checkpoints(state: TrainState, ctx: TrainContext) -> None:
    """Delete every checkpoint but the last `keep_checkpoints` and the best."""
    keep = {_checkpoint_name(state.best_epoch)}
    keep |= {_checkpoint_name(e) for e in
             range(state.epoch - ctx.config.keep_checkpoints + 1, state.epoch + 1)}
    ctx.run.prune_artifacts(names.CHECKPOINT_DIR, keep)


def _scratch() -> tempfile.TemporaryDirectory:
    """A scratch folder for files on their way to or from the artifact store."""
    return tempfile.TemporaryDirectory(prefix="taxonclip-")


def _resume(state: TrainState, ctx: TrainContext) -> Logged:
    """Load the run's last readable checkpoint when resuming; returns what the run holds."""
    if not ctx.config.resume:
        return Logged()
    saved, logged = None, Logged()
    if ctx.info.is_main:
        saved = _last_checkpoint(ctx.run)
        logged = Logged(ctx.run.last_step(names.TRAIN_LOSS),
                        ctx.run.last_step(names.VAL_EMBED_IMG_PER_S), ctx.run.has_logged_model(),
                        ctx.run.last_step(names.EVAL_EMBED_IMG_PER_S) >= 0)
    saved, logged = dist.broadcast_object((saved, logged))
    if saved is not None:
        restore(state, saved, ctx.info)
    return logged


def _checkpoint_of(run, name: str) -> dict | None:
    """The run's checkpoint `name`, None when the run does not hold it: the copy in the run's
    spool while its upload waits for the server, else the one in the artifact store."""
    local = run.local_copy(name)
    if local is not None:
        return torch.load(local, map_location="cpu", weights_only=True)
    if name not in {Path(p).name for p in run.list_artifacts(names.CHECKPOINT_DIR)}:
        return None
    with _scratch() as folder:
        path = run.download(f"{names.CHECKPOINT_DIR}/{name}", folder)
        return torch.load(path, map_location="cpu", weights_only=True)


def _last_checkpoint(run) -> dict | None:
    """The newest checkpoint that loads; one that does not (a truncated upload) is passed over
    with a warning for the one before it."""
    files = sorted(Path(p).name for p in run.list_artifacts(names.CHECKPOINT_DIR))
    for name in reversed(files):
        with _scratch() as folder:
            path = run.download(f"{names.CHECKPOINT_DIR}/{name}", folder)
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
                print(f"warning: checkpoint {name} of run {run.run_id} cannot be read "
                      f"({type(error).__name__}: {error}); resuming from the one before it",
                      file=sys.stderr)
    return None


def _finish(state: TrainState, ctx: TrainContext, result: EvalResult, selected: int) -> None:
    """The selected model's test table (the run's result: its `eval/` metrics and table
    artifacts), the validation table of its epoch, the split and its fingerprint, centroids with
    their class order, and the model (registered if asked); each written so that a resume after
    a kill in the middle of it leaves no duplicate."""
    from taxonclip.data.splits import split_fingerprint

    centres = state.head.full_centres().detach().cpu().numpy()
    if not ctx.info.is_main:
        return
    run, data = ctx.run, ctx.data
    if not ctx.logged.has_test_metrics:
        run.log_metrics({**table_metrics(result.table),
                         names.EVAL_EMBED_IMG_PER_S: result.img_per_s})
    run.log_params(table_counts(result.table))
    run.log_eval_table(result.table)
    if state.selected_table is not None:
        run.log_text(state.selected_table.to_csv(index=False), names.VAL_TABLE_CSV)
    split_text = split_csv(result)
    run.log_text(split_text, names.SPLIT_ARTIFACT)
    run.set_tags({names.TAG_SPLIT_FINGERPRINT: split_fingerprint(split_text),
                  names.TAG_SELECTED_EPOCH: selected,
                  names.TAG_SCORED: scored_note(result.manifest.table, result.split),
                  **({names.TAG_ALLOW_LABEL_TEXT: "true"} if ctx.config.allow_label_text else {})})
    with _scratch() as folder:
        centroids, classes = Path(folder, names.CENTROIDS), Path(folder, names.CENTROID_CLASSES)
        centroids.parent.mkdir(parents=True)
        np.save(centroids, centres)
        pd.DataFrame({"row": range(len(data.classes)), ctx.config.label: data.classes}).to_csv(
            classes, index=False)
        for path, artifact in ((centroids, names.CENTROIDS), (classes, names.CENTROID_CLASSES)):
            run.log_artifact(path, Path(artifact).parent.as_posix())
    _prune_checkpoints(state, ctx)
    if not ctx.logged.has_model:
        state.encoder.weights = f"runs:/{run.run_id}/{names.MODEL_ARTIFACT}"
        run.log_model(state.encoder, register_as=ctx.config.register_as)
