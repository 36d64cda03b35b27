"""Input pipeline: images per second per core for decode + CLIP transform, from the original
photographs against the same images prepared once (`taxonclip data prepare`).

    python bench/input_pipeline.py                       # 48 images of 3000 x 2000, shards of 336 px
    python bench/input_pipeline.py --images 16 --seconds 2
    python bench/input_pipeline.py --keep /tmp/pipeline  # keep (and reuse) the generated photographs

The photographs are generated specimens (`taxonclip.data.synthetic.render`) scaled up to
--width x --height, with a fine texture and sensor-like noise added so that they compress like
photographs (a few MB each as JPEG quality 95), listed in a manifest CSV. `prepare` then writes
them as shards of --size px (short side) on every core, timed, with its bytes in and out.

Each reading path is measured in this one process with one torch thread, without a DataLoader:
the originals through `ImageDataset` (full JPEG decode, then the transform), the shards through
`ShardStream` with `Decoded` (tar read, PIL JPEG decode, then the transform: what the
DataLoader workers do with the default decode=workers). Both go through the CLIP eval transform
(bicubic resize, centre crop) and the train transform (random resized crop, flip) at --input px.
A few images are read first as a warm-up; the timed part then reads whole passes over the
dataset until --seconds have gone by. All files are fresh in the page cache, so disk speed is not
part of any figure. `CPU/wall` near 1.00 shows a figure is the work of one core.

Prints a Markdown table (for the README) headed by the machine. Speed is only printed, never
checked.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import PIL.features
import torch
from PIL import Image

from taxonclip.data.images import ImageDataset
from taxonclip.data.manifest import read_manifest
from taxonclip.data.prepare import PrepareResult, PrepareSettings, prepare
from taxonclip.data.streams import Decoded, ShardedRows, ShardStream
from taxonclip.data.synthetic import render, taxonomy
from taxonclip.models.transforms import eval_transform, train_transform

RENDER_SIZE = 512  # the specimen is drawn at this size, then scaled up to the photograph's
TEXTURE_CELL = 64  # px of the photograph per cell of the random texture
TEXTURE_STRENGTH = 0.2
NOISE_SIGMA = 9.0
JPEG_QUALITY = 95
WARM_UP = 3  # images read before the clock starts
TAXA = 3
SETTINGS_FILE = "photographs.json"


@dataclass(frozen=True)
class Measurement:
    """Images read, wall and CPU seconds of one reading path."""

    images: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.images / self.seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="photographs to generate")
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--size", type=int, default=336, help="short side of the prepared images")
    parser.add_argument("--input", type=int, default=224, help="model input size of the transforms")
    parser.add_argument("--shard-size", type=int, default=8,
                        help="images per shard (small, so that prepare has shards for every core)")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per path")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the photographs in this folder and reuse them when it holds the "
                             "same ones (the timed prepare is always written afresh)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def machine() -> str:
    """The CPU model, the number of cores and the decoder library."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    turbo = " (libjpeg-turbo)" if PIL.features.check_feature("libjpeg_turbo") else ""
    return (f"{model}, {os.cpu_count()} cores; Pillow {PIL.__version__}{turbo}, "
            f"torch {torch.__version__}")


def write_photograph(job: tuple[str, object, int, int, int]) -> None:
    """One generated photograph as a JPEG file: a specimen scaled up, textured and noisy."""
    path, species, seed, width, height = job
    rng = np.random.default_rng(seed)
    picture = render(species, rng, RENDER_SIZE).resize((width, height), Image.Resampling.BICUBIC)
    cells = rng.integers(0, 256, (height // TEXTURE_CELL, width // TEXTURE_CELL, 3), dtype=np.uint8)
    texture = Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)
    pixels = (np.asarray(picture, np.float32)
              + TEXTURE_STRENGTH * (np.asarray(texture, np.float32) - 127.5)
              + NOISE_SIGMA * rng.standard_normal((height, width, 3), dtype=np.float32))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=JPEG_QUALITY)


def photographs(folder: Path, args: argparse.Namespace) -> Path:
    """The manifest CSV of --images photographs in `folder`, generated on every core unless the
    folder already holds these very ones."""
    settings = {"images": args.images, "width": args.width, "height": args.height,
                "seed": args.seed, "noise": NOISE_SIGMA, "texture": [TEXTURE_CELL, TEXTURE_STRENGTH],
                "quality": JPEG_QUALITY}
    manifest, record = folder / "manifest.csv", folder / SETTINGS_FILE
    if record.is_file() and json.loads(record.read_text()) == settings and manifest.is_file():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    catalogue = [sp for taxon in range(TAXA) for sp in taxonomy(args.seed, taxon, TAXA, 4, 5)]
    rows = [(f"photo_{i:05d}.jpg", catalogue[i % len(catalogue)]) for i in range(args.images)]
    jobs = [(str(folder / name), sp, args.seed * 1_000_003 + i, args.width, args.height)
            for i, (name, sp) in enumerate(rows)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_photograph, jobs))
    with open(manifest, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("image_path", "scientific_name", "taxa"))
        writer.writerows((name, sp.name, sp.genus.taxon) for name, sp in rows)
    record.write_text(json.dumps(settings))
    return manifest


def timed_passes(read_pass, seconds: float) -> Measurement:
    """Images per second of `read_pass()` (an iterator over the whole dataset): a warm-up of a
    few images, then whole passes until `seconds` have gone by."""
    for _ in itertools.islice(read_pass(), WARM_UP):
        pass
    images, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for _ in read_pass():
            images += 1
    return Measurement(images, time.perf_counter() - start, time.process_time() - cpu_start)


def original_pass(paths: list[str], transform):
    dataset = ImageDataset(paths, transform)
    return lambda: (dataset[i] for i in range(len(dataset)))


def prepared_pass(folder: Path, transform):
    manifest = read_manifest(folder)
    rows = ShardedRows.of(manifest.table, manifest.shards, np.arange(len(manifest.table)))
    return lambda: iter(ShardStream(rows, Decoded(transform)))


def mean_file_bytes(paths: list[str]) -> float:
    return sum(os.path.getsize(p) for p in paths) / len(paths)


def measure_all(manifest_csv: Path, made: PrepareResult, args: argparse.Namespace) -> list[tuple]:
    """(source, transform, measurement, speed-up) for both sources under both transforms."""
    paths = read_manifest(manifest_csv).table["image_path"].tolist()
    original_name = (f"original {args.width}x{args.height} JPEG q{JPEG_QUALITY} "
                     f"({mean_file_bytes(paths) / 1e6:.1f} MB each)")
    prepared_name = (f"prepared {args.size} px shards "
                     f"({made.output_bytes / made.images / 1e3:.0f} kB of shard each)")
    results = []
    for transform_name, make in (("eval", eval_transform), ("train", train_transform)):
        torch.manual_seed(args.seed)
        original = timed_passes(original_pass(paths, make(args.input)), args.seconds)
        torch.manual_seed(args.seed)
        shard = timed_passes(prepared_pass(made.folder, make(args.input)), args.seconds)
        label = f"{transform_name} {args.input}"
        results.append((original_name, label, original, None))
        results.append((prepared_name, label, shard, shard.per_second / original.per_second))
    return results


def print_report(args: argparse.Namespace, reads: list[tuple], made: PrepareResult,
                 settings: PrepareSettings) -> None:
    print(f"\nmachine: {machine()}; reading: one process, torch threads "
          f"{torch.get_num_threads()}, no DataLoader; {args.images} images\n")
    print("| source | transform | images timed | seconds | CPU/wall | img/s per core | vs original |")
    print("|---|---|---|---|---|---|---|")
    for source, transform, m, ratio in reads:
        vs = "1x" if ratio is None else f"{ratio:.1f}x"
        print(f"| {source} | {transform} | {m.images} | {m.seconds:.2f} | "
              f"{m.cpu_seconds / m.seconds:.2f} | {m.per_second:.1f} | {vs} |")
    cores = os.cpu_count() or 1
    rate = made.images / made.seconds
    print("\n| prepare | cores | images | seconds | img/s | img/s per core | source MB | output MB | "
          "output / source |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| short side {settings.size} px, {settings.image_format} q{settings.quality}, "
          f"{made.shards_written} shards of {settings.shard_size} | {cores} | {made.images} | "
          f"{made.seconds:.2f} | {rate:.1f} | {rate / cores:.1f} | {made.source_bytes / 1e6:.1f} | "
          f"{made.output_bytes / 1e6:.2f} | {100 * made.output_bytes / made.source_bytes:.1f}% |")
    print("\nTarget: prepared >= 8x original per core (the 'vs original' column).")


def run(folder: Path, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    manifest_csv = photographs(folder / "photographs", args)
    print(f"photographs ready in {time.perf_counter() - start:.1f} s ({manifest_csv})")
    settings = PrepareSettings(size=args.size, shard_size=args.shard_size)
    with tempfile.TemporaryDirectory(prefix="prepared-", dir=folder) as prepared:
        made = prepare(read_manifest(manifest_csv), prepared, settings, progress=False)
        torch.set_num_threads(1)
        reads = measure_all(manifest_csv, made, args)
    print_report(args, reads, made, settings)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.keep, args)
        return
    with tempfile.TemporaryDirectory(prefix="input-pipeline-") as folder:
        run(Path(folder), args)


if __name__ == "__main__":
    main()
