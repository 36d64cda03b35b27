"""Everything `torch.distributed`: start from the environment `torchrun` sets, gather and reduce
across ranks. Nothing happens at import; with no process group every helper is the one-process
identity, so the same code runs on a laptop CPU and on N GPUs. Rank-0-only logging is
`tracking.runs.tracked_run(main=info.is_main)`: other ranks get a run whose calls do nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from taxonclip.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among `world_size` processes and the device it computes
    on (with several processes on CUDA, the GPU its rank on this machine picks)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that logs, saves and prints."""
        return self.rank == 0


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group described by `torchrun`'s environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), or describe a single process when WORLD_SIZE is unset or 1.

    `device` is "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N". With several
    processes on CUDA each process takes GPU `LOCAL_RANK` and the group uses NCCL; on CPU it uses
    gloo. A group that is already initialised is reused."""
    world_size = _env_int("WORLD_SIZE", 1)
    chosen = resolve_device(device)
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, device=chosen)
    local_rank = _env_int("LOCAL_RANK", 0)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not is_distributed():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=chosen)


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group is initialised (collectives then talk to the other ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: 0 when there is no process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the group: 1 when there is no process group."""
    return dist.get_world_size() if is_distributed() else 1


def batch_sizes(size: int, device: torch.device) -> list[int]:
    """Every rank's `size` (its number of rows), in rank order: one exchange and one read back to
    the host, to share between gathers of tensors with the same rows. `[size]` without a group
    or in a group of one, which then waits for no device."""
    if world_size() == 1:
        return [size]
    count = torch.tensor([size], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return torch.cat(counts).tolist()


def all_gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order; ranks may hold different batch
    sizes (`sizes`, from `batch_sizes`, when already known). The backward pass sums the incoming
    gradient over ranks and returns this rank's slice, so the gradient reaching each rank's inputs
    is the full gradient of whatever every rank computed from the gathered tensor (summed over
    ranks, this is the single-process gradient). Without a process group, or in a group of one,
    it returns `x` itself."""
    if world_size() == 1:
        return x
    return _AllGather.apply(x, sizes)


def all_gather_no_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order, outside autograd (labels,
    counts, saved centres); `sizes` as for `all_gather_with_grad`. Without a process group, or
    in a group of one, it returns `x` itself."""
    if world_size() == 1:
        return x
    return torch.cat(_gather_parts(x.detach(), sizes))


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """Reduce `x` over ranks in place with "sum" or "max" and return it (no autograd: for values
    an autograd Function's own backward accounts for). Without a process group `x` is unchanged."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce op must be one of {', '.join(ops)}, got {op!r}")
    if is_distributed():
        dist.all_reduce(x, op=ops[op])
    return x


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel under a process group (NCCL on CUDA, gloo on
    the CPU), whose bucketed all-reduce overlaps the backward pass; without a group, `module`.

    DDP averages gradients over ranks; PartialFC's gathered backward already gives each rank the
    gradient of the global loss through its own images, so the ranks' gradients are summed
    instead (`sum_gradients_hook`): the sum is the single-process gradient. DDP starts every rank
    from rank 0's parameters."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    replica = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    replica.register_comm_hook(None, sum_gradients_hook)
    return replica


# no return annotation: DDP checks a hook's annotation against the object
# torch.futures.Future[torch.Tensor], and this module's annotations are strings
def sum_gradients_hook(process_group, bucket):
    """A DDP communication hook: all-reduce one bucket of gradients as a sum, not a mean;
    returns the future of the summed bucket."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` without a group."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` (picklable), in rank order, on rank `dst` alone; None on the others.
    `[obj]` without a group."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank receives rank `src`'s `obj` (any picklable value: a run id, a path).
    Without a process group it returns `obj`."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    """Wait until every rank reaches this point; nothing to wait for without a process group."""
    if is_distributed():
        dist.barrier()


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward all-reduces (sums) the gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int] | None) -> Tensor:
        parts = _gather_parts(x, sizes)
        ctx.start = sum(part.shape[0] for part in parts[: dist.get_rank()])
        ctx.size = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # all_reduce works in place: never write into a gradient autograd may still hold
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.start: ctx.start + ctx.size], None


def _gather_parts(x: Tensor, sizes: list[int] | None = None) -> list[Tensor]:
    """Each rank's `x`, in rank order. all_gather needs equal shapes, so the sizes are exchanged
    first (unless given) and shorter batches are padded to the longest, then trimmed."""
    sizes = sizes or batch_sizes(x.shape[0], x.device)
    longest = max(sizes)
    padded = x.contiguous()
    if x.shape[0] < longest:
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    return [buffer[:size] for buffer, size in zip(buffers, sizes)]


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA where a device exists, else the CPU; `cpu`, `cuda` and `cuda:N` are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"parameter 'device' is {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"parameter 'device' is {device!r} but no CUDA device is available; "
                          "use auto or cpu")
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"parameter 'device' is {device!r}; use auto, cpu, cuda or cuda:N")
    return chosen


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer "
                          "(it is set by torchrun)") from None
