"""Nearest-neighbour evaluation: taxonclip.knn against the research group's pandas method.

Both label the same random clustered embeddings (test split against train split). The group's
method, re-implemented here only as the baseline, builds the full cosine and Euclidean matrices
with numpy, flattens every test x train pair into a pandas DataFrame with the label strings and
groups it by label. Ours compares chunks of queries with the gallery by matrix products in torch.

    python bench/eval_knn.py                 # 2,000 x 8,000, then ours alone at 50,000 x 200,000
    python bench/eval_knn.py --skip-big      # the small case only

Prints a Markdown table (for the README) and whether both methods give identical accuracies.
A further row times only our float32 matrix products, made as ours makes them. Every metric
needs all test x train products (`mean_l2` averages every distance), so that row bounds the
speed-up on the processor at hand.
Timings at the small size are the best of --repeat runs of each method. Ours runs in a child
process, which regenerates the same embeddings from the seed: its memory is measured there alone.
There, ours, its products alone and torch's products of the same chunks in one call each also
run in turns (--repeat times each, one after the other, so that other work on a shared machine
slows all alike): the table gives the minimum and the median of each and ours' ratios to both
products, from that one run. Torch's column shows whether ours makes its products as fast.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd
import torch

from taxonclip import knn_scan, products
from taxonclip.config import EvalConfig
from taxonclip.knn import BLOCK_ELEMENTS, knn_metrics

GENERATION_BLOCK = 16384
NORM_SIGMA = 0.1  # log-normal spread of the norms, so that Euclidean and cosine neighbours differ


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=2000, help="test embeddings (queries)")
    parser.add_argument("--train", type=int, default=8000, help="train embeddings (gallery)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--spread", type=float, default=4.0, help="noise around each class centre")
    parser.add_argument("--big-test", type=int, default=50_000)
    parser.add_argument("--big-train", type=int, default=200_000)
    parser.add_argument("--skip-big", action="store_true", help="skip ours at --big-test x --big-train")
    parser.add_argument("--chunk-size", type=int, default=EvalConfig().chunk_size, help="queries per chunk in ours")
    parser.add_argument("--device", default="cpu", help="device for ours (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5, help="timings are the best of this many runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of ours and its products (default: torch's choice); on a "
                             "machine shared with other work, 1 spares each operation waiting for "
                             "a thread the others have descheduled")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--products", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def clustered_embeddings(n_test: int, n_train: int, dim: int, classes: int, spread: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Test and train embeddings around random class centres, with varied norms; every class has
    train items, so no test embedding is lone and both methods score the same queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    train_labels = rng.integers(0, classes, n_train)
    train_labels[:classes] = np.arange(classes)
    test_labels = rng.integers(0, classes, n_test)
    return (_around(centres, test_labels, spread, rng), test_labels,
            _around(centres, train_labels, spread, rng), train_labels)


def _around(centres: np.ndarray, labels: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    # filled block by block so that no temporary as large as the result raises the peak memory
    out = np.empty((len(labels), centres.shape[1]), dtype=np.float32)
    for start in range(0, len(labels), GENERATION_BLOCK):
        part = labels[start:start + GENERATION_BLOCK]
        noise = rng.standard_normal((len(part), centres.shape[1]), dtype=np.float32)
        norms = rng.lognormal(0.0, NORM_SIGMA, (len(part), 1)).astype(np.float32)
        out[start:start + len(part)] = (centres[part] + spread * noise) * norms
    return out


def group_method(test: np.ndarray, test_labels: np.ndarray, train: np.ndarray,
                 train_labels: np.ndarray) -> dict[str, float]:
    """The research group's evaluation (the baseline): full matrices, then one DataFrame row per
    test x train pair, grouped by label string. Lone test labels would count as errors (fault 3)
    and `distance_individual` repeats the cosine argmax (fault 1), as in the original."""
    n_labels = max(train_labels.max(), test_labels.max()) + 1
    names = np.array([f"species_{label:04d}" for label in range(n_labels)], dtype=object)
    unit_test = test / np.linalg.norm(test, axis=1, keepdims=True)
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    cosine = unit_test @ unit_train.T
    squared = (test * test).sum(1)[:, None] + (train * train).sum(1)[None, :] - 2 * test @ train.T
    distance = np.sqrt(np.maximum(squared, 0))
    pairs = pd.DataFrame({"test": np.repeat(np.arange(len(test)), len(train)),
                          "label": np.tile(names[train_labels], len(test)),
                          "cosine": cosine.ravel(), "distance": distance.ravel()})
    individual = pairs.loc[pairs.groupby("test")["cosine"].idxmax(), "label"].to_numpy()
    means = pairs.groupby(["test", "label"])[["cosine", "distance"]].mean()
    accuracy_avg = [label for _, label in means["cosine"].groupby(level="test").idxmax()]
    distance_avg = [label for _, label in means["distance"].groupby(level="test").idxmin()]
    truth = names[test_labels]
    return {"accuracy_individual": float(np.mean(individual == truth)),
            "accuracy_avg": float(np.mean(np.array(accuracy_avg, dtype=object) == truth)),
            "distance_individual": float(np.mean(individual == truth)),
            "distance_avg": float(np.mean(np.array(distance_avg, dtype=object) == truth))}


def ours(test: np.ndarray, test_labels: np.ndarray, train: np.ndarray, train_labels: np.ndarray,
         chunk_size: int, device: str) -> dict[str, float]:
    """taxonclip.knn.knn_metrics on the same embeddings."""
    result = knn_metrics(torch.from_numpy(test), torch.from_numpy(test_labels), torch.from_numpy(train),
                         torch.from_numpy(train_labels), chunk_size=chunk_size, device=device)
    return result.metrics


def products_only(test: np.ndarray, test_labels: np.ndarray, train: np.ndarray, train_labels: np.ndarray,
                  chunk_size: int, device: str) -> dict[str, float]:
    """Only the float32 matrix products of ours (each chunk of queries with the whole gallery),
    the way it computes them: on CPUs where knn_scan makes them, by its kernel's BLAS calls,
    tile by tile, with nothing else done (`knn_scan.fused` with `products_only`); elsewhere by
    `products.block_products`. The part no ranking or counting can save, since `mean_l2` needs
    every test x train distance."""
    query, gallery = torch.from_numpy(test).to(device), torch.from_numpy(train).to(device)
    if knn_scan.supports(query.device, query.dtype) and knn_scan.gemm(query.dtype) is not None:
        kernel_products(query, gallery, chunk_size)
        return {}
    for start in range(0, len(query), chunk_size):
        for _ in products.block_products(query[start:start + chunk_size], gallery):
            pass
    if query.device.type == "cuda":
        torch.cuda.synchronize()
    return {}


def kernel_products(query: torch.Tensor, gallery: torch.Tensor, chunk_size: int) -> None:
    """The products of knn_scan's kernel alone, in knn's chunks and gallery blocks, with buffers
    allocated once per call, as knn_metrics allocates them."""
    block = min(len(gallery), max(1, BLOCK_ELEMENTS // chunk_size))
    rows = min(chunk_size, len(query))
    buffers = knn_scan.buffers(rows, 1, 1, block, query.dtype)
    classes, counts = torch.zeros(len(gallery), dtype=torch.int64), torch.tensor([len(gallery)])
    norms = torch.ones(len(gallery), dtype=query.dtype)
    for start in range(0, len(query), chunk_size):
        chunk = query[start:start + chunk_size]
        state = knn_scan.start(buffers, norms[:len(chunk)], 1, classes[:len(chunk)], classes, counts)
        for first in range(0, len(gallery), block):
            stop = min(first + block, len(gallery))
            items = knn_scan.block(first, norms[first:stop], norms[first:stop], classes[first:stop],
                                   last=stop == len(gallery))
            knn_scan.fused(state, knn_scan.padded(chunk), gallery[first:stop], items, products_only=True)


def torch_products(test: np.ndarray, test_labels: np.ndarray, train: np.ndarray, train_labels: np.ndarray,
                   chunk_size: int, device: str) -> dict[str, float]:
    """The same products by torch, a chunk of queries with the whole gallery in one call
    (`products.dot_products`: oneDNN on CPUs): whether ours makes its products as fast."""
    query, gallery = torch.from_numpy(test).to(device), torch.from_numpy(train).to(device)
    for start in range(0, len(query), chunk_size):
        products.dot_products(query[start:start + chunk_size], gallery)
    if query.device.type == "cuda":
        torch.cuda.synchronize()
    return {}


def timed(method, *args, repeat: int = 1) -> tuple[dict[str, float], float]:
    """The method's result and its best wall-clock time over `repeat` runs."""
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        metrics = method(*args)
        seconds.append(time.perf_counter() - start)
    return metrics, min(seconds)


def traced_peak(method, *args) -> int:
    """Peak bytes of Python, numpy and pandas allocations while `method` runs (tracemalloc)."""
    tracemalloc.start()
    try:
        method(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far. Linux's VmHWM where there is one: a child's
    ru_maxrss can include the memory its parent held when it forked."""
    return _proc_status_bytes("VmHWM") or _ru_maxrss_bytes()


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux's VmRSS), else its peak so far."""
    return _proc_status_bytes("VmRSS") or _ru_maxrss_bytes()


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            lines = [line for line in status if line.startswith(field + ":")]
    except OSError:
        return None
    return int(lines[0].split()[1]) * 1024 if lines else None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def run_child(args: argparse.Namespace) -> None:
    """Ours alone in this (child) process: prints its metrics, best seconds, the RSS before the
    runs, the peak RSS after them, and on CUDA the peak device memory, as one JSON line."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = clustered_embeddings(args.test, args.train, args.dim, args.classes, args.spread, args.seed)
    before = current_rss_bytes()
    metrics, seconds = timed(ours, *data, args.chunk_size, args.device, repeat=args.repeat)
    cuda = torch.cuda.max_memory_allocated() if torch.device(args.device).type == "cuda" else None
    peak = peak_rss_bytes()
    products = turns = None
    if args.products:
        products = timed(products_only, *data, args.chunk_size, args.device, repeat=args.repeat)[1]
        turns = in_turns(data, args)
    print(json.dumps({"seconds": seconds, "products_seconds": products, "rss_before": before,
                      "peak_after": peak, "cuda_peak": cuda, "metrics": metrics, "turns": turns}))


def in_turns(data, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of ours, of its products alone and of torch's, run one after the other --repeat
    times."""
    turns = {"ours": [], "products": [], "torch": []}
    for _ in range(args.repeat):
        for name, method in (("ours", ours), ("products", products_only), ("torch", torch_products)):
            turns[name].append(timed(method, *data, args.chunk_size, args.device)[1])
    return turns


def print_ratio(child: dict) -> None:
    """The table of ours against its products alone and torch's, from the runs in turns."""
    ours_s, products_s, torch_s = (child["turns"][name] for name in ("ours", "products", "torch"))
    print(f"\n| {len(ours_s)} runs in turns | ours s | its products s | torch's products s | "
          f"ours / its products | ours / torch's products |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, pick in (("min", min), ("median", statistics.median)):
        print(f"| {name} | {pick(ours_s):.4f} | {pick(products_s):.4f} | {pick(torch_s):.4f} | "
              f"{pick(ours_s) / pick(products_s):.2f} | {pick(ours_s) / pick(torch_s):.2f} |")


def measure_in_child(args: argparse.Namespace, n_test: int, n_train: int, repeat: int,
                     products: bool = False) -> dict:
    """Ours in a fresh process: its memory is its own, and no BLAS threads of the baseline's
    numpy still spin on the cores it times on. With `products`, its matrix products alone are
    timed there too, after the memory is read."""
    command = [sys.executable, __file__, "--child", "--test", str(n_test), "--train", str(n_train),
               "--dim", str(args.dim), "--classes", str(args.classes), "--spread", str(args.spread),
               "--chunk-size", str(args.chunk_size), "--device", args.device, "--seed", str(args.seed),
               "--repeat", str(repeat)] + (["--products"] if products else []) + (
                   [] if args.threads is None else ["--threads", str(args.threads)])
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.splitlines()[-1])


def dataframe_bytes_per_row(n_train: int) -> int:
    """Bytes per row of the baseline's DataFrame: test index, label pointer, cosine, distance."""
    sample = pd.DataFrame({"test": np.zeros(n_train, dtype=np.int64),
                           "label": np.full(n_train, "species_0000", dtype=object),
                           "cosine": np.zeros(n_train, dtype=np.float32),
                           "distance": np.zeros(n_train, dtype=np.float32)})
    return round(sample.memory_usage(index=False, deep=False).sum() / n_train)


def gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def measured_memory(child: dict, whole_process: bool) -> str:
    """The memory a child run of ours reports: CUDA's peak on a GPU, else its peak RSS."""
    if child["cuda_peak"]:
        return f"{gigabytes(child['cuda_peak'])} (CUDA peak allocated)"
    if whole_process:
        return f"{gigabytes(child['peak_after'])} (peak RSS of the whole process)"
    return f"{gigabytes(child['peak_after'] - child['rss_before'])} (peak RSS increase)"


def print_report(args: argparse.Namespace, baseline: dict, child_small: dict,
                 child_big: dict | None) -> None:
    pairs = f"{args.test:,} x {args.train:,}"
    big_pairs = f"{args.big_test:,} x {args.big_train:,}"
    ours_name = f"taxonclip.knn (torch, {args.device}, chunk {args.chunk_size})"
    ours_memory = measured_memory(child_small, whole_process=False)
    threads = torch.get_num_threads() if args.threads is None else args.threads
    print(f"\ntorch threads: {threads}; seconds: best of {args.repeat} runs "
          f"at {pairs}, one run at {big_pairs}\n")
    print("| method | test x train | seconds | speed-up | peak memory |")
    print("|---|---|---|---|---|")
    print(f"| group's method (numpy + pandas DataFrame) | {pairs} | {baseline['seconds']:.2f} | 1x | "
          f"{gigabytes(baseline['peak'])} (tracemalloc peak) |")
    print(f"| {ours_name} | {pairs} | {child_small['seconds']:.3f} | "
          f"{baseline['seconds'] / child_small['seconds']:.0f}x | {ours_memory} |")
    print(f"| its float32 matrix products alone | {pairs} | {child_small['products_seconds']:.3f} | "
          f"{baseline['seconds'] / child_small['products_seconds']:.0f}x | |")
    if child_big is not None:
        estimate = args.big_test * args.big_train * dataframe_bytes_per_row(args.big_train)
        print(f"| group's method (numpy + pandas DataFrame) | {big_pairs} | not run | | over "
              f"{gigabytes(estimate)} (estimate: DataFrame rows x bytes per row, matrices not counted) |")
        print(f"| {ours_name} | {big_pairs} | {child_big['seconds']:.1f} | | "
              f"{measured_memory(child_big, whole_process=True)} |")
    share = child_small["products_seconds"] / child_small["seconds"]
    print_ratio(child_small)
    print(f"\nThe matrix products take {100 * share:.0f}% of ours: every metric needs them, so the "
          f"speed-up on this processor can reach at most the products' row, whatever the rest costs.")
    print("\nMemory: tracemalloc counts every numpy and pandas allocation during the group's method; "
          "'peak RSS increase' is the peak resident memory of a child process running only ours minus "
          "its resident memory just before the runs; 'peak RSS of the whole process' includes Python, "
          "torch and the embeddings.")


def print_agreement(baseline: dict[str, float], ours_metrics: dict[str, float]) -> None:
    for theirs, mine in (("accuracy_individual", "top1_cos"), ("accuracy_avg", "mean_cos")):
        same = "yes" if baseline[theirs] == ours_metrics[mine] else "no"
        print(f"identical {mine} ({theirs}): {same} ({ours_metrics[mine]:.4f} vs {baseline[theirs]:.4f})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    data = clustered_embeddings(args.test, args.train, args.dim, args.classes, args.spread, args.seed)
    baseline_metrics, baseline_seconds = timed(group_method, *data, repeat=args.repeat)
    baseline = {"seconds": baseline_seconds, "peak": traced_peak(group_method, *data)}
    child_small = measure_in_child(args, args.test, args.train, repeat=args.repeat, products=True)
    child_big = None if args.skip_big else measure_in_child(args, args.big_test, args.big_train, repeat=1)
    print_agreement(baseline_metrics, child_small["metrics"])
    print_report(args, baseline, child_small, child_big)
    print("\nOurs at " + f"{args.test:,} x {args.train:,}: "
          + ", ".join(f"{name} {value:.4f}" for name, value in child_small["metrics"].items()))


if __name__ == "__main__":
    main()
