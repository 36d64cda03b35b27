"""Evaluation at scale: `taxonclip eval` of the tiny model on a generated prepared folder whose
gallery is 200,000 images, and the peak memory of the process that runs it.

    python bench/eval_scale.py                          # 250,000 images: gallery 200,000, queries 50,000
    python bench/eval_scale.py --images 20000           # a quick run
    python bench/eval_scale.py --keep /tmp/eval-scale   # keep the generated set, reuse it next time

The test split is 20% of each species, and the gallery is the train split, so --images 250,000
(1,000 images of each of 250 species) gives a gallery of exactly 200,000 and 50,000 queries.

The images are generated specimens (`taxonclip.data.synthetic.render`) of --image-size px:
each species is drawn in a few poses, and every image is one of them with its own noise and
flip, written as a JPEG file of about 1 kB; `prepare` then writes them into shards (they are
below its size, so they keep their bytes) and the files are deleted. Every query has images
of its own pose in the gallery, so the accuracies are near 100%: the set measures scale, not
the model. Generation runs in a
child process, so that this process stays small (a child's ru_maxrss starts from the memory
of the process that launched it).

The evaluation is the command line itself, `python -m taxonclip eval --model tiny --data
<folder> --workers W`, in a child process with MLFLOW_TRACKING_URI on a temporary sqlite file and
TAXONCLIP_CACHE on a temporary folder (so no cached embeddings are found). Reported:

- peak RSS: ru_maxrss of that child (os.wait4: getrusage(RUSAGE_CHILDREN) for this one child),
  the peak of the largest single process, which is the eval process itself (its DataLoader
  workers are smaller, and not added to it);
- peak RSS sum: the resident memory of the eval process and all its descendants (DataLoader
  workers, their forkserver) summed, sampled every 0.25 s; an upper bound of what they held
  together, as pages they share count once in each;
- wall seconds and images per second end to end, and the embedding speed that the run logged
  to MLflow (`eval/embed_img_per_s`).

Prints a Markdown table (for the README), then the child's own table of accuracies.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

TAXA, GENERA, SPECIES = 5, 10, 5  # 250 species
POSES = 8  # renders per species; every image is one of them with its own noise
NOISE_SIGMA = 6.0
JPEG_QUALITY = 90
BLOCK = 10_000  # images per generation job and per folder of files
SETTINGS_FILE = "eval_scale.json"
SAMPLE_SECONDS = 0.25
LIMIT_BYTES = 4e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=250_000,
                        help="images in all; the gallery (train split) is 80%% of them")
    parser.add_argument("--image-size", type=int, default=32, help="px of the generated images")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the eval")
    parser.add_argument("--keep", type=Path, default=None,
                        help="generate the set into this folder and reuse it when it holds the same one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generate", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def settings_of(args: argparse.Namespace) -> dict:
    return {"images": args.images, "image_size": args.image_size, "seed": args.seed,
            "species": TAXA * GENERA * SPECIES, "poses": POSES, "noise": NOISE_SIGMA}


# --- generation (in a child process) ---------------------------------------------------------

@cache
def catalogue(seed: int) -> list:
    from taxonclip.data.synthetic import taxonomy

    return [sp for taxon in range(TAXA) for sp in taxonomy(seed, taxon, TAXA, GENERA, SPECIES)]


@cache
def pose(seed: int, species: int, index: int, size: int):
    """One render of a species, as a float array."""
    import numpy as np

    from taxonclip.data.synthetic import render

    rng = np.random.default_rng([seed, species, index])
    return np.asarray(render(catalogue(seed)[species], rng, size), np.float32)


def write_block(job: tuple[str, int, int, int, int]) -> list[tuple[str, str, str]]:
    """Images start..stop-1 as JPEG files in `folder`; their manifest rows."""
    import numpy as np
    from PIL import Image

    folder, start, stop, size, seed = job
    n_species = len(catalogue(seed))
    rng = np.random.default_rng([seed, start])
    rows = []
    for i in range(start, stop):
        species = i % n_species
        pixels = pose(seed, species, int(rng.integers(POSES)), size)
        pixels = pixels + NOISE_SIGMA * rng.standard_normal(pixels.shape, dtype=np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        name = f"{start // BLOCK:03d}/{i:07d}.jpg"
        image.save(Path(folder, name), "JPEG", quality=JPEG_QUALITY)
        sp = catalogue(seed)[species]
        rows.append((name, sp.name, sp.genus.taxon))
    return rows


def generate(folder: Path, args: argparse.Namespace) -> None:
    """Write the images as files, prepare them into `folder`/prepared, delete the files; prints
    the seconds of each step as JSON."""
    from taxonclip.data.manifest import read_manifest
    from taxonclip.data.prepare import prepare

    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix="images-", dir=folder))
    jobs = [(str(staging), s, min(s + BLOCK, args.images), args.image_size, args.seed)
            for s in range(0, args.images, BLOCK)]
    for _, first, *_ in jobs:
        (staging / f"{first // BLOCK:03d}").mkdir()
    with ProcessPoolExecutor() as pool:
        rows = [row for block in pool.map(write_block, jobs) for row in block]
    with open(staging / "manifest.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("image_path", "scientific_name", "taxa"))
        writer.writerows(rows)
    written = time.perf_counter()
    result = prepare(read_manifest(staging / "manifest.csv"), folder / "prepared", progress=False)
    shutil.rmtree(staging)
    print(json.dumps({"write_seconds": written - start, "prepare_seconds": time.perf_counter() - written,
                      "bytes": result.output_bytes}))


def dataset(folder: Path, args: argparse.Namespace) -> tuple[Path, dict | None]:
    """The prepared folder of the set, generated in a child process unless `folder` holds it;
    with the child's timings when it was generated now."""
    prepared, record = folder / "prepared", folder / SETTINGS_FILE
    if record.is_file():
        if json.loads(record.read_text()) != settings_of(args):
            sys.exit(f"{folder} holds another generated set ({record.read_text()}); choose another --keep")
        if (prepared / "prepared.json").is_file():
            return prepared, None
    record.write_text(json.dumps(settings_of(args)))
    command = [sys.executable, __file__, "--generate", str(folder), "--images", str(args.images),
               "--image-size", str(args.image_size), "--seed", str(args.seed)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        sys.exit(f"generation failed:\n{finished.stderr}")
    return prepared, json.loads(finished.stdout.splitlines()[-1])


# --- measurement ------------------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def rss_bytes(pids: list[int]) -> int:
    """The summed resident memory of these processes (those still alive): an upper bound of
    their memory, as the pages the forked workers share are counted once in each."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024
        except (OSError, StopIteration):
            continue
    return total


def run_eval(data: Path, scratch: Path, workers: int) -> dict:
    """`taxonclip eval` in a child process: its exit status, wall seconds, ru_maxrss (bytes),
    the peak summed RSS of its process tree, and its output."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}",
           "TAXONCLIP_CACHE": str(scratch / "cache")}
    command = [sys.executable, "-m", "taxonclip", "eval", "--model", "tiny", "--data", str(data),
               "--workers", str(workers)]
    with open(scratch / "stdout.txt", "w+") as out, open(scratch / "stderr.txt", "w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, cwd=scratch, stdout=out, stderr=err)
        peak_tree, pid = 0, 0
        while pid == 0:
            peak_tree = max(peak_tree, rss_bytes(process_tree(child.pid)))
            time.sleep(SAMPLE_SECONDS)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"status": child.returncode, "seconds": seconds, "peak_rss": usage.ru_maxrss * 1024,
                "peak_tree": peak_tree, "stdout": out.read(), "stderr": err.read(),
                "embed_img_per_s": logged_metric(scratch / "mlflow.db", "eval/embed_img_per_s")}


def logged_metric(database: Path, key: str) -> float | None:
    """The last value of a metric in an MLflow sqlite store."""
    with sqlite3.connect(database) as store:
        row = store.execute("SELECT value FROM metrics WHERE key = ? ORDER BY step DESC, "
                            "timestamp DESC LIMIT 1", (key,)).fetchone()
    return None if row is None else row[0]


def all_species_counts(table: str) -> tuple[int, int]:
    """(n_test, n_classes) of the `All species` row of the eval's printed table."""
    for line in table.splitlines():
        words = line.split()
        if words[:2] == ["All", "species"]:
            return int(words[2]), int(words[3])
    raise ValueError("the eval printed no 'All species' row")


# --- report -----------------------------------------------------------------------------------

def gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def print_report(args: argparse.Namespace, made: dict | None, result: dict) -> None:
    queries, classes = all_species_counts(result["stdout"])
    gallery = args.images - queries
    embed = result["embed_img_per_s"]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if made is not None:
        print(f"\ngenerated {args.images:,} images in {made['write_seconds']:.0f} s, prepared in "
              f"{made['prepare_seconds']:.0f} s ({made['bytes'] / 1e6:.0f} MB of shards)")
    print(f"\nmachine: {machine()}; {args.images:,} images of {args.image_size} px, {classes} "
          f"species; test split 20%: gallery (train split) {gallery:,}, queries (test split) "
          f"{queries:,}; this process's own peak RSS {gigabytes(own)}\n")
    print("| command | images | gallery | queries | wall s | img/s end to end | embed img/s | "
          "peak RSS (ru_maxrss) | peak RSS sum (eval + workers) | ru_maxrss under 4 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| `taxonclip eval --model tiny --workers {args.workers}` | {args.images:,} | {gallery:,} | "
          f"{queries:,} | {result['seconds']:.0f} | {args.images / result['seconds']:.0f} | "
          f"{'-' if embed is None else f'{embed:.0f}'} | {gigabytes(result['peak_rss'])} | "
          f"{gigabytes(result['peak_tree'])} | {'yes' if result['peak_rss'] < LIMIT_BYTES else 'no'} |")
    print("\n" + result["stdout"])


def measure(folder: Path, args: argparse.Namespace) -> None:
    data, made = dataset(folder, args)
    with tempfile.TemporaryDirectory(prefix="eval-run-") as scratch:
        result = run_eval(data, Path(scratch), args.workers)
    if result["status"] != 0:
        sys.exit(f"taxonclip eval failed (exit status {result['status']}):\n{result['stderr']}")
    print_report(args, made, result)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.generate is not None:
        generate(args.generate, args)
    elif args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        measure(args.keep, args)
    else:
        with tempfile.TemporaryDirectory(prefix="eval-scale-") as folder:
            measure(Path(folder), args)


if __name__ == "__main__":
    main()
