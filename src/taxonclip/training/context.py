"""What a training's steps work with besides its state: the typed config, the data, the run it
logs to, this process's place among the ranks, the per-epoch callback, and what a resumed run
had logged already."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from taxonclip import distributed as dist
from taxonclip.config import TrainConfig
from taxonclip.table import EvalResult
from taxonclip.tracking.run_logging import NullRun, Run
from taxonclip.training.data import TrainData

EpochCallback = Callable[[int, EvalResult], None]


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
