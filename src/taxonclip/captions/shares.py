"""Which share of the rows this process captions: under torchrun its RANK of WORLD_SIZE, as a
SLURM array task its SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) of SLURM_ARRAY_TASK_COUNT,
else the one share of one.

The rows are ordered once (by image size, then id) and cut into batches; share k takes batches
k, k + count, k + 2 count, ... So the shares are disjoint, together cover every row, and one
process captions exactly the batches that several would: the captions do not depend on how many
processes made them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from taxonclip.errors import ConfigError

SINGLE, TORCHRUN, SLURM_ARRAY = "single", "torchrun", "slurm-array"


@dataclass(frozen=True)
class Share:
    """This process's share: its index, how many there are, and what set them."""

    index: int
    count: int
    kind: str = SINGLE

    @property
    def leads(self) -> bool:
        """Whether this process holds the run while captioning: the single process, or rank 0
        under torchrun (whose ranks run together; SLURM array tasks may not, so their run is
        opened by the merge)."""
        return self.kind == SINGLE or (self.kind == TORCHRUN and self.index == 0)


def from_env(env: dict | None = None) -> Share:
    """The share of this process, read from the launcher's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(_int(env, "RANK"), _int(env, "WORLD_SIZE"), TORCHRUN)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return _checked(_int(env, "SLURM_ARRAY_TASK_ID") - first,
                        _int(env, "SLURM_ARRAY_TASK_COUNT"), SLURM_ARRAY)
    return Share(0, 1)


def _checked(index: int, count: int, kind: str) -> Share:
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"{kind}: share {index} of {count} is not a share (the array's task ids "
                          f"must run from SLURM_ARRAY_TASK_MIN without gaps)")
    return Share(index, count, kind if count > 1 else SINGLE)


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not a number") from None


def batches_of_share(order: list[int], batch_size: int, share: Share) -> list[list[int]]:
    """The batches (lists of row positions, from `order`) that `share` captions."""
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return batches[share.index::share.count]
