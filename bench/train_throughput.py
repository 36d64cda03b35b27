"""Training throughput: the full taxonclip train step (backbone + PartialFC + AdamW) against the
research group's loop (fp32, autocast off), on random images of the model's input size.

Prints images/s, step time and model FLOPs utilisation (FLOPs of one step counted with
torch.utils.flop_counter; the peak is a bf16 matrix product measured in the same run).

With `--from-shards DIR` (a folder of `taxonclip data prepare`), a further row times the whole
training loop on its images: shards read, decoded (`--decode workers` in `--workers` DataLoader
workers, or `--decode device`), augmented and stepped, against the in-memory step above it.

    python bench/train_throughput.py --model ViT-B/32 --batch 256
    python bench/train_throughput.py --model ViT-L/14@336px --batch 64 --compile
    python bench/train_throughput.py --model ViT-B/32 --batch 256 --from-shards prepared/set \
        --workers 16 --decode device --no-baseline
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from taxonclip.config import DataConfig, LossConfig, ModelConfig, TrainConfig  # noqa: E402
from taxonclip.distributed import DistInfo, resolve_device  # noqa: E402
from taxonclip.models import create_model  # noqa: E402
from taxonclip.train import build_state, make_loader, prepare_data, train_step  # noqa: E402


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


def ours(model: str, batch_size: int, classes: int, device: torch.device, compile_model: bool):
    """The taxonclip step: bf16 autocast on CUDA, fused AdamW, PartialFC with margin loss."""
    encoder = create_model(model, "none", device=device)
    config = TrainConfig(batch_size=batch_size, lr=1e-5, loss=LossConfig(sample_rate=1.0))
    state = build_state(encoder, classes, config, total_steps=10_000 * config.epochs, device=device)
    forward = torch.compile(state.encoder) if compile_model else state.encoder

    def step(batch):
        return train_step(state, [batch], forward, device)

    return step, encoder.spec.input_size


def baseline(model: str, batch_size: int, classes: int, device: torch.device, compile_model: bool):
    """The group's loop: fp32 everywhere, autocast off, unfused AdamW, full-softmax margin head."""
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


def from_shards(args, device: torch.device, compile_model: bool) -> tuple[float, int]:
    """Seconds per step of the training loop on a prepared folder, and the steps timed (at
    most one epoch's, after `warmup`)."""
    config = TrainConfig(data=DataConfig(data=args.from_shards), model=ModelConfig(args.model, "none"),
                         batch_size=args.batch, workers=args.workers, decode=args.decode, epochs=1,
                         loss=LossConfig(sample_rate=1.0))
    data = prepare_data(config)
    encoder = create_model(args.model, "none", device=device)
    loader = make_loader(data, encoder, config, DistInfo(0, 1, device))
    state = build_state(encoder, len(data.classes), config, sum(data.epoch_steps), device)
    forward = torch.compile(state.encoder) if compile_model else state.encoder
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


def run(method: str, args, device: torch.device, peak: float, flops: int | None) -> dict:
    """Build and time one method (counting the FLOPs of a step unless `flops` is given: the
    model and batch are the same for every method); returns one row of the table."""
    if "shards" in method:
        seconds, _ = from_shards(args, device, "compile" in method)
    else:
        build = ours if method.startswith("taxonclip") else baseline
        step, size = build(args.model, args.batch, args.classes, device, "compile" in method)
        images = torch.randn(args.batch, 3, size, size, device=device)
        labels = torch.randint(0, args.classes, (args.batch,), device=device)
        if flops is None:
            flops = count_step_flops(step, (images, labels))
        seconds = time_steps(step, (images, labels), device, args.warmup, args.steps)
    mfu = flops / seconds / (peak * 1e12) if peak and flops else float("nan")
    return {"method": method, "img_s": args.batch / seconds, "step_ms": 1000 * seconds,
            "tflop_step": flops / 1e12, "mfu": mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--from-shards", metavar="DIR", help="also time the loop on a prepared folder")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (--from-shards)")
    parser.add_argument("--decode", default="workers", choices=("workers", "device"),
                        help="where --from-shards decodes its JPEGs")
    args = parser.parse_args()
    device = resolve_device("auto")
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = measure_peak_tflops(device) if device.type == "cuda" else 0.0
    methods = ["taxonclip bf16"] + (["taxonclip bf16 compile"] if args.compile else [])
    if args.from_shards:
        methods.append(f"taxonclip bf16{' compile' if args.compile else ''}, from shards "
                       f"(decode {args.decode}, {args.workers} workers)")
    methods += [] if args.no_baseline else ["group loop fp32"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.model}, batch {args.batch}, {args.classes} classes, {name}, "
          f"bf16 peak {peak:.0f} TFLOP/s\n")
    print("| method | images/s | step ms | TFLOP/step | MFU |")
    print("|---|---:|---:|---:|---:|")
    flops = None
    for method in methods:
        row = run(method, args, device, peak, flops)
        flops = int(row["tflop_step"] * 1e12)
        print(f"| {row['method']} | {row['img_s']:.0f} | {row['step_ms']:.1f} | "
              f"{row['tflop_step']:.2f} | {100 * row['mfu']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
