"""The margin softmax UNICOM fine-tunes with. `CombinedMarginLoss` turns cosines into scaled logits
with a margin on the target class; `PartialFC` holds the class centres (split across ranks when
there are several processes), samples them each step and computes the exact softmax
cross-entropy over all of them. With one process it is plain margin softmax cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taxonclip import distributed
from taxonclip.config import LossConfig
from taxonclip.config_checks import check_margins, check_sample_rate
from taxonclip.errors import ConfigError, DataError


class CombinedMarginLoss(nn.Module):
    """Cosine logits to scaled logits with an additive margin on the target class.

    The target logit becomes `s·cos(θ+m2)` (ArcFace, m2 > 0), `s·(cos θ − m3)` (CosFace, m3 > 0)
    or `s·cos θ` (m2 = m3 = 0); every other logit is `s·cos θ`. Only m1 = 1 is supported, with at
    most one of m2, m3 non-zero; any other combination raises ConfigError here, at construction.

    Gradient: straight-through, as in UNICOM's recipe. The margin's change to the target logit is
    added as a constant, so the gradient with respect to the cosines is the one of `s·cos θ`: the
    margin acts through the softmax probabilities only. (The true derivative of cos(θ+m2) with
    respect to cos θ, sin(θ+m2)/sin θ, grows without bound as θ → 0.) For CosFace both agree.

    Past π: θ+m2 is capped at π, so a target with θ ≥ π − m2 gets the logit −s. Without the cap
    cos(θ+m2) would rise again and the margin would lift the target above s·cos θ; with it the
    target logit never exceeds s·cos θ and never increases as θ grows.

    `filter` τ > 0: non-target cosines above τ (possible label noise or look-alike classes) are
    replaced by 0. They get no gradient but still count, as exp(0), in the softmax denominator.

    `forward(logits, labels)`: `logits` are cosines (N × C), `labels` (N) index their columns, −1
    for a row whose class is not among these columns (it then gets no margin). It returns a new
    tensor and leaves `logits` unchanged.

    Every parameter is required: their defaults are `LossConfig`'s (`from_config`)."""

    def __init__(self, *, s: float, m1: float, m2: float, m3: float, filter: float) -> None:
        super().__init__()
        check_margins(s, m1, m2, m3, filter)
        self.s, self.m1, self.m2, self.m3, self.filter = s, m1, m2, m3, filter

    @classmethod
    def from_config(cls, loss: LossConfig) -> CombinedMarginLoss:
        """The margin loss of the configured s, m1, m2, m3 and filter."""
        return cls(s=loss.s, m1=loss.m1, m2=loss.m2, m3=loss.m3, filter=loss.filter)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        columns = torch.arange(logits.shape[1], device=logits.device)
        is_target = labels[:, None] == columns[None, :]
        cosines = logits
        if self.filter > 0:
            filtered = (logits > self.filter) & ~is_target
            cosines = torch.where(filtered, torch.zeros_like(logits), logits)
        with torch.no_grad():
            target = logits.gather(1, labels.clamp(min=0)[:, None])
            shift = torch.where(is_target, self._margined(target) - target, 0.0)
        return self.s * (cosines + shift)

    def _margined(self, cosine: Tensor) -> Tensor:
        if self.m2 > 0:
            theta = torch.arccos(cosine.clamp(-1.0, 1.0))
            return torch.cos((theta + self.m2).clamp(max=math.pi))
        return cosine - self.m3

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, filter={self.filter}"


class PartialFC(nn.Module):
    """Class centres with a sampled, sharded margin softmax (UNICOM's PartialFC).

    Each rank holds a contiguous block of the classes (`class_shard`), as `weight`
    (local classes × embedding_size, initialised N(0, 0.01)). Build it after
    `distributed.init_from_env`, so it knows its rank. Each step it gathers the embeddings (with
    gradient) and labels of every rank, keeps every class of its block that is a label in the
    global batch plus uniformly random other classes of the block, `max(positives,
    int(sample_rate · local classes), 1)` in all, and computes cosine logits against those centres
    only, applies `margin_loss`, and returns the softmax cross-entropy over the sampled classes of
    all ranks, averaged over the global batch (the same scalar on every rank). With sample_rate 1
    nothing is sampled: the softmax is over every class, exactly as in one process.

    Gradients: each rank's centres get their exact gradient. Each rank's embeddings get the full
    gradient of the global-mean loss for its own rows, so backbone gradients summed over ranks
    equal the single-process gradient. DistributedDataParallel averages over ranks instead, which
    gives 1/world_size of it: sum the backbone gradients to keep the single-process gradient
    (`distributed.data_parallel` registers a DDP communication hook that does), or account for
    the factor (AdamW's update barely changes under a constant gradient scale; a
    gradient-clipping threshold is affected).

    Sampling uses torch's default generator on the weight's device: seed it with
    `torch.manual_seed` for reproducible runs. After each step `last_sampled_classes` holds the
    global class indices of the centres used, in increasing order."""

    def __init__(self, margin_loss: Callable[[Tensor, Tensor], Tensor], embedding_size: int,
                 num_classes: int, sample_rate: float) -> None:
        super().__init__()
        world_size, rank = distributed.world_size(), distributed.rank()
        _check_partial_fc(embedding_size, num_classes, sample_rate, world_size)
        self.margin_loss = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.world_size = world_size
        self.class_start, local_classes = class_shard(num_classes, world_size, rank)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (local_classes, embedding_size)))
        self._last_index: Tensor | None = None

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean margin softmax cross-entropy over the global batch, from this rank's `embeddings`
        (B × embedding_size) and integer class `labels` (B); B may differ between steps and ranks."""
        self._check_inputs(embeddings, labels)
        sizes = distributed.batch_sizes(len(labels), labels.device)
        labels = distributed.all_gather_no_grad(labels, sizes)
        self._check_labels(labels)
        embeddings = distributed.all_gather_with_grad(embeddings, sizes)
        index, sampled_labels = self._sample(self._local_labels(labels))
        centres = self.weight if index is None else self.weight[index]
        cosines = F.linear(F.normalize(embeddings), F.normalize(centres)).float()
        logits = self.margin_loss(cosines, sampled_labels)
        return _ShardedCrossEntropy.apply(logits, sampled_labels)

    @torch.no_grad()
    def full_centres(self) -> Tensor:
        """Every class centre (num_classes × embedding_size), in class order, on every rank:
        a detached copy, for saving centroids. With several processes every rank must call it."""
        return distributed.all_gather_no_grad(self.weight.detach().clone())

    def _local_labels(self, labels: Tensor) -> Tensor:
        """Labels as rows of this rank's block, −1 where the class lives on another rank."""
        local = labels - self.class_start
        in_block = (local >= 0) & (local < self.weight.shape[0])
        return torch.where(in_block, local, -1)

    def _sample(self, local_labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """The block rows to use (None: all of them) and the labels as columns of those rows."""
        local_classes = self.weight.shape[0]
        device = self.weight.device
        if int(self.sample_rate * local_classes) >= local_classes:
            return self._use_all(local_labels)
        positives = torch.unique(local_labels[local_labels >= 0])
        wanted = max(int(self.sample_rate * local_classes), positives.numel(), 1)
        if wanted >= local_classes:
            return self._use_all(local_labels)
        scores = torch.rand(local_classes, device=device)
        scores[positives] = 2.0  # above any rand() draw: positives always come first in topk
        index = torch.topk(scores, wanted).indices.sort().values
        column = torch.full((local_classes,), -1, dtype=torch.long, device=device)
        column[index] = torch.arange(wanted, device=device)
        sampled_labels = torch.where(local_labels >= 0, column[local_labels.clamp(min=0)], -1)
        self._last_index = index
        return index, sampled_labels

    def _use_all(self, local_labels: Tensor) -> tuple[None, Tensor]:
        self._last_index = None
        return None, local_labels

    @property
    def last_sampled_classes(self) -> Tensor:
        """The global class ids whose centres the last step used, from this rank's block."""
        rows = (self._last_index if self._last_index is not None else
                torch.arange(self.weight.shape[0], device=self.weight.device))
        return rows + self.class_start

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> None:
        if distributed.world_size() != self.world_size:
            raise RuntimeError(f"PartialFC was built for {self.world_size} process(es) but the "
                               f"process group has {distributed.world_size()}: build it after "
                               "distributed.init_from_env")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ConfigError(f"PartialFC expects embeddings of size {self.embedding_size} "
                              f"(embedding_size) but the model gives shape {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1] or labels.is_floating_point():
            raise ValueError(f"labels must be integers of shape ({embeddings.shape[0]},), "
                             f"got {labels.dtype} of shape {tuple(labels.shape)}")

    def _check_labels(self, labels: Tensor) -> None:
        outside = (labels < 0) | (labels >= self.num_classes)
        if labels.is_cuda:
            # Checked on the device: reading the answer back would stall every step.
            torch._assert_async(~outside.any(), f"class label outside [0, {self.num_classes})")
            return
        if outside.any():
            label = int(labels[outside][0])
            raise DataError(f"class label {label} is outside the {self.num_classes} classes "
                            f"of PartialFC (num_classes): labels must be in [0, {self.num_classes})")

    def extra_repr(self) -> str:
        end = self.class_start + self.weight.shape[0]
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, classes=[{self.class_start}, {end})")


def class_shard(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The block of classes rank `rank` holds: (first class, number of classes). Blocks are
    contiguous, in rank order, and differ in size by at most one (the first ranks get the extra)."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows whose columns (classes) are split across ranks.

    Each rank passes its own columns of the logits (N × its classes, N the global batch) and the
    labels as its column indices, −1 where the row's class is on another rank. The row maximum is
    all-reduced with MAX, the exp-sums and the target logits with SUM; every rank returns the same
    loss. The backward gives each rank the exact gradient of its own columns, (p − onehot) / N."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor) -> Tensor:
        row_max = distributed.all_reduce(logits.max(dim=1, keepdim=True).values, "max")
        exp = (logits - row_max).exp()
        exp_sum = distributed.all_reduce(exp.sum(dim=1, keepdim=True), "sum")
        owned = labels >= 0
        target = logits.gather(1, labels.clamp(min=0)[:, None]) - row_max
        target = distributed.all_reduce(torch.where(owned[:, None], target, 0.0), "sum")
        ctx.save_for_backward(exp.div_(exp_sum), labels)
        return (exp_sum.log() - target).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None]:
        probs, labels = ctx.saved_tensors
        owned = (labels >= 0).to(probs.dtype)
        grad = probs.scatter_add(1, labels.clamp(min=0)[:, None], -owned[:, None])
        return grad * (grad_loss / probs.shape[0]), None


def _check_partial_fc(embedding_size: int, num_classes: int, sample_rate: float,
                      world_size: int) -> None:
    if embedding_size < 1:
        raise ConfigError(f"PartialFC 'embedding_size' must be at least 1, got {embedding_size}")
    if num_classes < 1:
        raise ConfigError(f"PartialFC 'num_classes' must be at least 1, got {num_classes}")
    if num_classes < world_size:
        raise ConfigError(f"PartialFC 'num_classes'={num_classes} is fewer than the "
                          f"{world_size} process(es) it is split across")
    check_sample_rate(sample_rate)
