"""The training loop: the state a training updates (model, PartialFC centres, AdamW, OneCycleLR,
counters), one optimiser step over `grad_accum` micro-batches, and one epoch of steps with its
losses read back and logged every `LOG_EVERY_STEPS` steps.

Batches: `batch_size` images per micro-batch per process; with `grad_accum` k, one optimiser
step sees k micro-batches (each loss divided by k, so the step follows the mean loss of the
k·batch_size images) and the scheduler steps once per optimiser step. Training batches have
equal size (the last incomplete batch of an epoch is dropped), which makes k micro-batches of
size b give the same update as one batch of size k·b for a model without batch-dependent layers.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch

from taxonclip import distributed as dist
from taxonclip import names
from taxonclip.config import TrainConfig
from taxonclip.errors import TrainingDiverged
from taxonclip.losses import CombinedMarginLoss, PartialFC
from taxonclip.progress import Progress
from taxonclip.training.context import TrainContext
from taxonclip.training.data import EpochLoader

LOG_EVERY_STEPS = 50


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
