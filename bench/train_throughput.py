"""Training throughput: the full taxonclip train step (backbone + PartialFC + AdamW) against the
research group's loop (fp32, autocast off), on random images of the model's input size.

Prints images/s, step time and model FLOPs utilisation (FLOPs of one step counted with
torch.utils.flop_counter; the peak is a bf16 matrix product measured in the same run).

With `--from-shards DIR` (a folder of `taxonclip data prepare`), a further row times the whole
training loop on its images: shards read, decoded (`--decode workers` in `--workers` DataLoader
workers, or `--decode device`), augmented and stepped, against the in-memory step above it.

With `--ddp`, a further row times the same step as training runs it in a process group: the
backbone in DistributedDataParallel (`distributed.data_parallel`) and the class centres sharded
over the ranks. Under torchrun every rank times it, rank 0 prints, and its images/s is the
global rate (per-rank batch x world size); in a plain process the group is of this process
alone, to measure what DDP costs one GPU. The other rows run after the group is left (under
torchrun, on every rank at once, each on its own device). Under the table, each DDP row's step
time is compared with the same step outside a group. `--compile-mode` is torch.compile's mode
for the compile rows (reduce-overhead and max-autotune capture CUDA graphs).

    python bench/train_throughput.py --model ViT-B/32 --batch 256
    python bench/train_throughput.py --model ViT-L/14@336px --batch 64 --compile
    python bench/train_throughput.py --model ViT-B/32 --batch 256 --from-shards prepared/set \
        --workers 16 --decode device --no-baseline
    python bench/train_throughput.py --model ViT-B/32 --batch 256 --ddp --no-baseline
    torchrun --nproc_per_node 8 bench/train_throughput.py --model ViT-B/32 --batch 256 --ddp \
        --compile --compile-mode reduce-overhead --no-baseline
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from taxonclip import distributed  # noqa: E402
from taxonclip.config import DataConfig, LossConfig, ModelConfig, TrainConfig  # noqa: E402
from taxonclip.distributed import DistInfo  # noqa: E402
from taxonclip.models import create_model  # noqa: E402
from taxonclip.training.data import make_loader, prepare_data  # noqa: E402
from taxonclip.training.loop import build_state, train_step  # noqa: E402

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Method:
    """One row of the table: the step it times (`taxonclip`, `shards` or `group`), the
    torch.compile mode of its backbone (None: not compiled) and whether it runs in DDP."""

    step: str
    compile_mode: str | None = None
    ddp: bool = False

    def name(self, args) -> str:
        """The row's name, as the table shows it."""
        if self.step == "group":
            return "group loop fp32"
        name = "taxonclip bf16" + (" DDP" if self.ddp else "")
        if self.compile_mode is not None:
            name += " compile" + ("" if self.compile_mode == "default" else f" ({self.compile_mode})")
        if self.step == "shards":
            name += f", from shards (decode {args.decode}, {args.workers} workers)"
        return name


def measure_peak_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """bf16 matrix-product throughput of this device, in TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_step_flops(step, batch) -> int:
    """FLOPs of one training step (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return counter.get_total_flops()


def compiled(module: torch.nn.Module, compile_mode: str | None):
    """`module` under torch.compile in `compile_mode`, or itself when that is None."""
    return module if compile_mode is None else torch.compile(module, mode=compile_mode)


def ours(model: str, batch_size: int, classes: int, device: torch.device, compile_mode: str | None):
    """The taxonclip step as training builds it: bf16 autocast on CUDA, fused AdamW, PartialFC
    with margin loss; in a process group, `build_state` puts the backbone in DDP and shards the
    centres, and the step runs `state.replica` as `run_training` does."""
    encoder = create_model(model, "none", device=device)
    config = TrainConfig(batch_size=batch_size, lr=1e-5, loss=LossConfig(sample_rate=1.0))
    state = build_state(encoder, classes, config, total_steps=10_000 * config.epochs, device=device)
    forward = compiled(state.replica, compile_mode)

    def step(batch):
        return train_step(state, [batch], forward, device)

    return step, encoder.spec.input_size


def baseline(model: str, batch_size: int, classes: int, device: torch.device, compile_mode: str | None):
    """The group's loop: fp32 everywhere, autocast off, unfused AdamW, full-softmax margin head
    (never compiled: `compile_mode` is taken for the same call as `ours`)."""
    encoder = create_model(model, "none", device=device).train()
    centres = torch.nn.Parameter(torch.randn(classes, encoder.spec.embed_dim, device=device) * 0.01)
    optimizer = torch.optim.AdamW([*encoder.visual.parameters(), centres], lr=1e-5)

    def step(batch):
        images, labels = batch
        optimizer.zero_grad()
        embeddings = torch.nn.functional.normalize(encoder(images))
        cosine = embeddings @ torch.nn.functional.normalize(centres).T
        theta = torch.acos(cosine.clamp(-1 + 1e-7, 1 - 1e-7))
        target = torch.cos(theta + 0.3)
        logits = torch.where(torch.nn.functional.one_hot(labels, classes).bool(), target, cosine)
        loss = torch.nn.functional.cross_entropy(32 * logits, labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, encoder.spec.input_size


def time_steps(step, batch, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step(batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    _sync(device)
    return (time.perf_counter() - start) / steps


def from_shards(args, device: torch.device, compile_mode: str | None) -> tuple[float, int]:
    """Seconds per step of the training loop on a prepared folder, and the steps timed (at
    most one epoch's, after `warmup`)."""
    config = TrainConfig(data=DataConfig(data=args.from_shards), model=ModelConfig(args.model, "none"),
                         batch_size=args.batch, workers=args.workers, decode=args.decode, epochs=1,
                         loss=LossConfig(sample_rate=1.0))
    data = prepare_data(config)
    encoder = create_model(args.model, "none", device=device)
    loader = make_loader(data, encoder, config, DistInfo(0, 1, device))
    state = build_state(encoder, len(data.classes), config, sum(data.epoch_steps), device)
    forward = compiled(state.replica, compile_mode)
    batches = loader.micro_batches(0, grad_accum=1)
    steps = min(args.steps, data.epoch_steps[0] - args.warmup)
    if steps < 1:
        raise SystemExit(f"{args.from_shards} gives {data.epoch_steps[0]} steps of batch "
                         f"{args.batch}: fewer than --warmup {args.warmup} + 1")
    for _ in range(args.warmup):
        train_step(state, next(batches), forward, device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(state, next(batches), forward, device)
    _sync(device)
    return (time.perf_counter() - start) / steps, steps


def slowest(seconds: float, device: torch.device) -> float:
    """The longest of every rank's `seconds`: the ranks step together, at the slowest one's pace."""
    return distributed.all_reduce(torch.tensor(seconds, device=device), "max").item()


def run(method: Method, args, info: DistInfo, peak: float, flops: int | None) -> dict:
    """Build and time one method (counting the FLOPs of a step unless `flops` is given: the
    model and per-rank batch are the same for every method); returns one row of the table."""
    device = info.device
    if method.step == "shards":
        seconds, _ = from_shards(args, device, method.compile_mode)
    else:
        build = ours if method.step == "taxonclip" else baseline
        step, size = build(args.model, args.batch, args.classes, device, method.compile_mode)
        images = torch.randn(args.batch, 3, size, size, device=device)
        labels = torch.randint(0, args.classes, (args.batch,), device=device)
        if flops is None:
            flops = count_step_flops(step, (images, labels))
        seconds = time_steps(step, (images, labels), device, args.warmup, args.steps)
    ranks = info.world_size if method.ddp else 1
    if method.ddp:
        seconds = slowest(seconds, device)
    mfu = flops / seconds / (peak * 1e12) if peak and flops else float("nan")
    return {"method": method.name(args), "img_s": args.batch * ranks / seconds,
            "step_ms": 1000 * seconds, "tflop_step": flops / 1e12, "mfu": mfu}


def join_group_of_one(device: torch.device) -> DistInfo:
    """A process group of this process alone (NCCL on CUDA, gloo on the CPU), at MASTER_ADDR and
    MASTER_PORT where set (else 127.0.0.1 and any port the system gives its store, since no other
    process has to find it): in it a plain process runs the DDP row with the wrapper and
    collectives every rank of a training runs."""
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # DDP's device_ids need an index
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT") or 0
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://{address}:{port}", rank=0, world_size=1)
    return DistInfo(rank=0, world_size=1, device=device)


def methods(args) -> tuple[list[Method], list[Method]]:
    """The rows to time in the process group (DDP) and out of it."""
    modes = [None] + ([args.compile_mode] if args.compile else [])
    in_group = [Method("taxonclip", mode, ddp=True) for mode in modes] if args.ddp else []
    alone = [Method("taxonclip", mode) for mode in modes]
    if args.from_shards:
        alone.append(Method("shards", modes[-1]))
    return in_group, alone + ([] if args.no_baseline else [Method("group")])


def show(info: DistInfo, text: str) -> None:
    """Print `text` on rank 0 only: every rank runs the benchmark, one prints it."""
    if info.is_main:
        print(text, flush=True)


def show_row(info: DistInfo, row: dict) -> None:
    """One row of the table."""
    show(info, f"| {row['method']} | {row['img_s']:.0f} | {row['step_ms']:.1f} | "
               f"{row['tflop_step']:.2f} | {100 * row['mfu']:.1f}% |")


def show_header(args, info: DistInfo, peak: float) -> None:
    """The setting of the run (the world size and backend of the DDP rows) and the table's head."""
    name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    ddp = ""
    if args.ddp:
        ddp = (f", DDP rows: world size {info.world_size} ({torch.distributed.get_backend()}), "
               f"images/s = batch x {info.world_size} / step")
    show(info, f"\n{args.model}, batch {args.batch} per rank, {args.classes} classes, {name}, "
               f"bf16 peak {peak:.0f} TFLOP/s{ddp}\n")
    show(info, "| method | images/s | step ms | TFLOP/step | MFU |")
    show(info, "|---|---:|---:|---:|---:|")


def show_slowdowns(info: DistInfo, rows: dict[Method, dict]) -> None:
    """Each DDP row's step time against the same step outside a process group."""
    show(info, "")
    for method, row in rows.items():
        if method.ddp:
            alone = rows[replace(method, ddp=False)]
            slowdown = 100 * (row["step_ms"] / alone["step_ms"] - 1)
            show(info, f"{row['method']}: step time {slowdown:+.1f}% against {alone['method']} "
                       f"(world size {info.world_size})")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch", type=int, default=256, help="images per step on each rank")
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode for the --compile rows")
    parser.add_argument("--ddp", action="store_true",
                        help="also time the step with the backbone in DDP, as training runs it")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--from-shards", metavar="DIR", help="also time the loop on a prepared folder")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (--from-shards)")
    parser.add_argument("--decode", default="workers", choices=("workers", "device"),
                        help="where --from-shards decodes its JPEGs")
    args = parser.parse_args()
    if args.compile_mode != "default" and not args.compile:
        parser.error("--compile-mode is the mode of the --compile rows: add --compile")
    return args


def main() -> None:
    args = parse_args()
    in_group, alone = methods(args)
    info = distributed.init_from_env()
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = measure_peak_tflops(info.device) if info.device.type == "cuda" else 0.0
    rows: dict[Method, dict] = {}
    flops = None
    # The DDP rows come first, in the group; the others after leaving it, where build_state keeps
    # the backbone unwrapped and PartialFC whole: the step of one process, on this rank's device.
    try:
        if args.ddp and not distributed.is_distributed():
            info = join_group_of_one(info.device)
        show_header(args, info, peak)
        for method in in_group:
            rows[method] = run(method, args, info, peak, flops)
            flops = int(rows[method]["tflop_step"] * 1e12)
            show_row(info, rows[method])
    finally:
        distributed.shutdown()
    for method in alone:
        rows[method] = run(method, args, info, peak, flops)
        flops = int(rows[method]["tflop_step"] * 1e12)
        show_row(info, rows[method])
    if args.ddp:
        show_slowdowns(info, rows)


if __name__ == "__main__":
    main()
