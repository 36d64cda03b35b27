"""Scoring at scale: the per-taxa table of a memory-mapped store of synthetic embeddings, and the
peak memory of the process that scores it against the size of the store.

    python bench/eval_scale.py --gallery 2000000 --queries 50000     # 4.2 GB store of 512-d float32
    python bench/eval_scale.py --gallery 20000 --queries 2000 --check   # also the in-memory table

No images and no model: the store holds --gallery + --queries random 512-d vectors around the
centres of --species classes (float32, or float16 as a GPU embeds), written block by block by a
child process into an `.npy` file. Queries and gallery items are interleaved in the store, as a
seeded split leaves them. The species fall into --taxa taxa, and the table is scored at species
level: one row per taxa and the `All` row, as `taxonclip eval` scores them
(`table.evaluation_table` on the memory-mapped array).

The scoring runs in a child process of its own, which opens the store with `np.load(mmap_mode)`;
its peak RSS (Linux's VmHWM) counts the pages of the store it has read and not yet released as
well as its own memory, so the goal is peak RSS <= the store's size + 1 GB. With --check (small sizes only) the
child also computes the table from an in-memory copy of the store, each row's queries and gallery
copied out, and says whether the two tables are identical.

The last line reads `peak_rss_gb=<x> store_gb=<y>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from taxonclip.config import EvalConfig

WRITE_BLOCK = 1 << 16  # rows generated and written at a time
SPREAD = 2.0  # noise around each class centre, against centres of unit variance per dimension
CHECK_LIMIT = 200_000  # rows up to which --check may copy the store into memory
GOAL_SLACK_GB = 1.0
PROGRESS_SECONDS = 60.0  # between the scoring child's progress lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=2_000_000, help="gallery (train) embeddings")
    parser.add_argument("--queries", type=int, default=50_000, help="query (test) embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--species", type=int, default=10_000)
    parser.add_argument("--taxa", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="of the store: float32 as the CPU embeds, float16 as a GPU does")
    parser.add_argument("--chunk-size", type=int, default=EvalConfig().chunk_size, help="queries per chunk")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the store into this folder and reuse it when it holds the same one")
    parser.add_argument("--check", action="store_true",
                        help=f"also the table of an in-memory copy (up to {CHECK_LIMIT:,} rows)")
    parser.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--score", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check and args.gallery + args.queries > CHECK_LIMIT:
        parser.error(f"--check copies the store into memory: at most {CHECK_LIMIT:,} rows")
    return args


def settings_of(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("gallery", "queries", "dim", "species", "taxa",
                                                   "dtype", "seed")}


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


# --- the store (written by a child process) --------------------------------------------------

def write_store(folder: Path, args: argparse.Namespace) -> None:
    """The store `embeddings.npy` and `labels.npz` (species of each row, query rows) in `folder`."""
    rows = args.gallery + args.queries
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.species, args.dim), dtype=np.float32)
    # every species has gallery items; the rest of the rows are drawn at random
    species = np.concatenate([np.arange(args.species), rng.integers(0, args.species, rows - args.species)])
    rng.shuffle(species)
    queries = np.sort(rng.choice(rows, args.queries, replace=False))
    is_query = np.zeros(rows, bool)
    is_query[queries] = True
    # a species' items may all have been drawn as queries: give it one back as a gallery item
    missing = np.setdiff1d(np.arange(args.species), species[~is_query])
    for label in missing:
        is_query[np.flatnonzero((species == label) & is_query)[0]] = False
    store = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=args.dtype,
                                      shape=(rows, args.dim))
    for start in range(0, rows, WRITE_BLOCK):
        part = species[start:start + WRITE_BLOCK]
        noise = rng.standard_normal((len(part), args.dim), dtype=np.float32)
        store[start:start + len(part)] = centres[part] + SPREAD * noise
    store.flush()
    del store
    np.savez(folder / "labels.npz", species=species, queries=np.flatnonzero(is_query))


def store_ready(folder: Path, args: argparse.Namespace) -> bool:
    record = folder / "eval_scale.json"
    return (record.is_file() and json.loads(record.read_text()) == settings_of(args)
            and (folder / "labels.npz").is_file())


def ensure_store(folder: Path, args: argparse.Namespace) -> float | None:
    """Write the store in a child process unless `folder` holds it; the seconds it took."""
    if store_ready(folder, args):
        return None
    start = time.perf_counter()
    run_child(args, "--write", folder)
    (folder / "eval_scale.json").write_text(json.dumps(settings_of(args)))
    return time.perf_counter() - start


# --- scoring (in a child process) --------------------------------------------------------------

def scoring_inputs(folder: Path, args: argparse.Namespace, mmap_mode: str | None = "r+"):
    """The store (memory-mapped, or read into memory), its table and split, and the levels.

    Mapped shared ("r+", and only read), as `taxonclip eval` maps its store (a np.memmap): knn
    then releases the pages it has read (taxonclip.mapped), which in a private (copy-on-write)
    mapping it cannot tell from changed ones."""
    import pandas as pd
    import torch

    from taxonclip.data.splits import split_manifest
    from taxonclip.names import Levels

    labels = np.load(folder / "labels.npz")
    species = labels["species"]
    # categories, as a reader's string columns would cost more memory than the scoring measured
    names = pd.Categorical.from_codes(species, [f"species {i:05d}" for i in range(args.species)])
    taxa = pd.Categorical.from_codes(species % args.taxa, [f"taxon {i}" for i in range(args.taxa)])
    table = pd.DataFrame({"species": names, "taxa": taxa})
    is_query = np.zeros(len(species), bool)
    is_query[labels["queries"]] = True
    # the split's own type from its own constructor, with these rows on each side
    template = split_manifest(pd.DataFrame({"species": ["a", "a"], "scientific_name": ["a", "a"],
                                            "taxa": ["t", "t"], "image_id": ["0", "1"]}), 0.5, args.seed)
    split = replace(template, train=np.flatnonzero(~is_query), test=labels["queries"],
                    test_size=args.queries / len(species))
    vectors = np.load(folder / "embeddings.npy", mmap_mode=mmap_mode)
    return torch.from_numpy(vectors), table, split, Levels(scored=("species",), within_taxa=("species",))


def in_memory_table(vectors, table, split, levels, args: argparse.Namespace):
    """The table as scoring computed it before it read the store in place: every row's queries
    and gallery copied out of the store in memory."""
    import pandas as pd
    import torch

    from taxonclip import knn
    from taxonclip.table import TABLE_COLUMNS, scope_masks, table_cells

    vectors = vectors.float()
    is_train, is_test = np.zeros(len(table), bool), np.zeros(len(table), bool)
    is_train[split.train], is_test[split.test] = True, True
    rows = []
    for scope, level in table_cells(table["taxa"].unique(), False, levels):
        in_gallery, in_queries = scope_masks(scope, table, None)
        codes = torch.as_tensor(pd.factorize(table[level])[0], dtype=torch.long)
        gallery, queries = np.flatnonzero(in_gallery & is_train), np.flatnonzero(in_queries & is_test)
        result = knn.knn_metrics(vectors[queries], codes[queries], vectors[gallery], codes[gallery],
                                 chunk_size=args.chunk_size, device=args.device)
        rows.append({"taxa": scope, "level": level, "n_test": result.n_test,
                     "n_classes": result.n_classes, "n_lone": result.n_lone, **result.metrics})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def score(folder: Path, args: argparse.Namespace) -> dict:
    """The table of the memory-mapped store, the seconds it took and this process's memory
    (with --check, whether the in-memory copy gives the same table)."""
    from taxonclip.table import evaluation_table

    vectors, table, split, levels = scoring_inputs(folder, args)
    before = rss_bytes("VmRSS")
    start = time.perf_counter()
    result = evaluation_table(vectors, table, split, chunk_size=args.chunk_size, device=args.device,
                              levels=levels)
    seconds = time.perf_counter() - start
    outcome = {"seconds": seconds, "rss_before": before, "peak_rss": rss_bytes("VmHWM"),
               "table": result.to_json(orient="records")}
    if args.check:
        reference = in_memory_table(*scoring_inputs(folder, args, mmap_mode=None)[:1], table, split,
                                    levels, args)
        outcome["same_as_in_memory"] = bool(result.equals(reference))
    return outcome


def report_progress(every: float) -> None:
    """Every `every` seconds, a line on stderr: the seconds so far, the queries scored (over
    every row of the table) and the RSS now and at its peak, so that a long run shows how far
    it got."""
    import threading

    from taxonclip import knn

    scored, start = [0], time.perf_counter()
    outcomes = knn._chunk_outcomes

    def counted(query, *rest):
        result = outcomes(query, *rest)
        scored[0] += len(query)
        return result

    knn._chunk_outcomes = counted  # the count only: a bench-local wrapper of the same function

    def loop() -> None:
        while True:
            time.sleep(every)
            print(f"progress: {time.perf_counter() - start:.0f} s, {scored[0]:,} queries scored, "
                  f"rss_gb={rss_bytes('VmRSS') / 1e9:.2f} peak_rss_gb={rss_bytes('VmHWM') / 1e9:.2f}",
                  file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True).start()


def rss_bytes(field: str) -> int:
    """This process's VmRSS (now) or VmHWM (peak) from /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) * 1024


def run_child(args: argparse.Namespace, mode: str, folder: Path) -> str:
    command = [sys.executable, __file__, mode, str(folder), "--gallery", str(args.gallery),
               "--queries", str(args.queries), "--dim", str(args.dim), "--species", str(args.species),
               "--taxa", str(args.taxa), "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
               "--device", args.device, "--seed", str(args.seed)] + (["--check"] if args.check else [])
    # the child's progress lines and errors go to this process's stderr as they come
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if finished.returncode != 0:
        sys.exit(f"{mode[2:]} failed (its error is above)")
    return finished.stdout


# --- report -----------------------------------------------------------------------------------

def report(args: argparse.Namespace, written: float | None, outcome: dict, store_bytes: int) -> str:
    import pandas as pd

    from taxonclip.table import format_table

    peak, store = outcome["peak_rss"] / 1e9, store_bytes / 1e9
    lines = [f"machine: {machine()}; store {args.gallery + args.queries:,} x {args.dim} {args.dtype} "
             f"({store:.2f} GB){'' if written is None else f', written in {written:.0f} s'}", "",
             "| command | gallery | queries | store GB | scoring s | RSS before GB | peak RSS GB | "
             "goal (store + 1 GB) |",
             "|---|---:|---:|---:|---:|---:|---:|---|",
             f"| `python bench/eval_scale.py --gallery {args.gallery} --queries {args.queries}"
             f"{' --dtype float16' if args.dtype == 'float16' else ''}` | {args.gallery:,} | "
             f"{args.queries:,} | {store:.2f} | {outcome['seconds']:.0f} | "
             f"{outcome['rss_before'] / 1e9:.2f} | {peak:.2f} | "
             f"{'met' if peak <= store + GOAL_SLACK_GB else 'missed'} |", "",
             format_table(pd.read_json(__import__('io').StringIO(outcome["table"]), orient="records"))]
    if "same_as_in_memory" in outcome:
        lines.append(f"same table as the in-memory reference: "
                     f"{'yes' if outcome['same_as_in_memory'] else 'no'}")
    lines.append(f"peak_rss_gb={peak:.2f} store_gb={store:.2f}")
    return "\n".join(lines)


def measure(folder: Path, args: argparse.Namespace) -> None:
    written = ensure_store(folder, args)
    outcome = json.loads(run_child(args, "--score", folder).splitlines()[-1])
    print(report(args, written, outcome, (folder / "embeddings.npy").stat().st_size))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write is not None:
        write_store(args.write, args)
    elif args.score is not None:
        report_progress(PROGRESS_SECONDS)  # in the scoring child only: it wraps a knn function
        print(json.dumps(score(args.score, args)))
    elif args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        measure(args.keep, args)
    else:
        with tempfile.TemporaryDirectory(prefix="eval-scale-") as folder:
            measure(Path(folder), args)


if __name__ == "__main__":
    main()
