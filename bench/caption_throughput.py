"""Captioning throughput: `taxonclip caption`'s batched generation against the research group's
loop (one image per generate call), same model, same images, same device.

Ours: the images ordered by size and decoded by DataLoader workers, `--batch` images per
`generate` call with left padding, bf16 on CUDA. The group's: decode one image, caption it, then
the next (their script calls InternVL2's `model.chat` per image; here the same model as ours is
called with a batch of one, so only the batching and the input pipeline differ). Both generate
greedily up to `--max-new-tokens`; a random model rarely stops early, so both make about the
same number of tokens.

    python bench/caption_throughput.py                                   # CPU: tiny model, mechanics only
    python bench/caption_throughput.py --model 2b --device cuda --images 256 --batch 32

`--model`: tiny (the embedded random model), 2b (a random LLaVA of about 1.9 billion parameters,
built on the device: a CLIP ViT-L/14@336px-sized tower and a 28-layer 2048-wide Llama, the size
of the group's InternVL2-2B), or a model folder. Prints a Markdown table with the date, the
machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from taxonclip.captions.base import CaptionerOptions
from taxonclip.captions.loader import image_batches, size_order
from taxonclip.data.images import decode_image

PROMPT = "Please provide a detailed one-sentence caption describing what you see in this image."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, 2b, or a model folder")
    parser.add_argument("--images", type=int, default=24, help="images captioned by each method")
    parser.add_argument("--batch", type=int, default=8, help="images per generate call (ours)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers (ours)")
    return parser.parse_args(argv)


def write_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """JPEG photographs' stand-ins of a few sizes (as a real dataset mixes them)."""
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (640, 480), (512, 512), (600, 800)]
    paths = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"image_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def captioner(args):
    from taxonclip.captions import hf, tiny

    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    options = CaptionerOptions(device=args.device, dtype=dtype, max_new_tokens=args.max_new_tokens)
    if args.model in ("tiny", "2b"):
        sizes = tiny.TINY if args.model == "tiny" else tiny.TWO_B
        model, processor = tiny.build_model_and_processor(sizes, device=args.device)
        return hf.from_objects(model, processor, args.model, "random", options)
    return hf.build(args.model, options)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(model, paths: list[str], args) -> tuple[float, int]:
    """Seconds and generated tokens of the batched pipeline."""
    order = size_order(paths, paths)
    batches = [order[s:s + args.batch] for s in range(0, len(order), args.batch)]
    start, tokens = time.perf_counter(), 0
    for _, images, _ in image_batches(paths, batches, args.workers):
        tokens += sum(made.tokens for made in model.caption(images, [PROMPT] * len(images)))
    _sync(args.device)
    return time.perf_counter() - start, tokens


def groups_loop(model, paths: list[str], args) -> tuple[float, int]:
    """Seconds and generated tokens of one image per call, decoded in the loop."""
    start, tokens = time.perf_counter(), 0
    for path in paths:
        tokens += model.caption([decode_image(path)], [PROMPT])[0].tokens
    _sync(args.device)
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = captioner(args)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), args.images)
        warm = paths[:min(len(paths), args.batch)]
        model.caption([decode_image(p) for p in warm], [PROMPT] * len(warm))  # warm-up
        rows = [("group's loop (1 image per call)", *groups_loop(model, paths, args)),
                (f"taxonclip caption (batch {args.batch})", *ours(model, paths, args))]
    machine = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                    f"threads")
    print(f"{datetime.date.today().isoformat()}, {machine}, model {args.model} "
          f"({model.described.dtype}), {args.images} images, up to {args.max_new_tokens} new "
          f"tokens each")
    print(f"command: python bench/caption_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print()
    print("| method | images/s | generated tokens/s | x the loop |")
    print("|---|---:|---:|---:|")
    base = args.images / rows[0][1]
    for name, seconds, tokens in rows:
        print(f"| {name} | {args.images / seconds:.2f} | {tokens / seconds:.1f} | "
              f"{args.images / seconds / base:.2f} |")


if __name__ == "__main__":
    main()
