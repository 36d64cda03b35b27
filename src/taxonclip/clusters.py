"""UNICOM's cluster discrimination as a label source: k-means on the normalised embeddings of the
training images by the starting model, whose cluster ids the margin loss then trains on; and
how well the clusters match the true ranks (NMI and ARI).

The k-means is spherical (cosine): k-means++ seeding and Lloyd steps on unit vectors, centres
renormalised, every random draw from one generator seeded by the run's seed, so a seed gives
the same clusters on every process. A cluster left empty is given the point farthest from its
centre.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from taxonclip.progress import Progress

MAX_ITERATIONS = 100
_SEED_STREAM = 0x6B6D  # k-means draws its own numbers, apart from the model's init


def cluster_count(clusters: float, species: int, images: int) -> int:
    """The number of clusters `clusters` asks for: a fraction of `species` (0 < clusters <= 1),
    else a count; at least 2, at most `images`."""
    wanted = round(clusters * species) if clusters <= 1 else int(clusters)
    return max(2, min(wanted, images))


@torch.no_grad()
def kmeans(vectors: torch.Tensor, k: int, seed: int, progress: bool = True,
           max_iterations: int = MAX_ITERATIONS) -> tuple[np.ndarray, torch.Tensor]:
    """Spherical k-means of `vectors` (n x d) into `k` clusters: the cluster of each vector and
    the unit centres (k x d)."""
    points = F.normalize(vectors.float(), dim=1)
    generator = torch.Generator().manual_seed(seed * 100_003 + _SEED_STREAM)
    centres = _kmeans_plus_plus(points, k, generator)
    assignment = None
    bar = Progress(max_iterations, "k-means", "iterations", show=progress)
    for _ in range(max_iterations):
        bar.update()
        similarity = points @ centres.T
        new = similarity.argmax(dim=1)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centres = _centres(points, assignment, k, similarity)
    bar.close()
    return assignment.numpy(), centres


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with cosine distance (1 - cosine)."""
    first = torch.randint(len(points), (1,), generator=generator)
    chosen = [int(first)]
    distance = (1 - points @ points[chosen[0]]).clamp_min(0)
    for _ in range(1, k):
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        distance = torch.minimum(distance, (1 - points @ points[pick]).clamp_min(0))
    return points[chosen].clone()


def _centres(points: torch.Tensor, assignment: torch.Tensor, k: int,
             similarity: torch.Tensor) -> torch.Tensor:
    sums = points.new_zeros(k, points.shape[1]).index_add_(0, assignment, points)
    counts = torch.bincount(assignment, minlength=k)
    farthest = (similarity.gather(1, assignment[:, None])[:, 0]).argsort()
    for slot, cluster in enumerate(torch.nonzero(counts == 0).flatten().tolist()):
        sums[cluster] = points[farthest[slot]]
    return F.normalize(sums, dim=1)


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, a_codes = np.unique(a, return_inverse=True)
    _, b_codes = np.unique(b, return_inverse=True)
    table = np.zeros((a_codes.max() + 1, b_codes.max() + 1), dtype=np.int64)
    np.add.at(table, (a_codes, b_codes), 1)
    return table


def normalized_mutual_information(truth: np.ndarray, clusters: np.ndarray) -> float:
    """NMI with the arithmetic mean of the two entropies (scikit-learn's default); 1.0 where both
    partitions are a single set."""
    table = _contingency(truth, clusters).astype(np.float64)
    n = table.sum()
    joint = table[table > 0] / n
    rows, cols = table.sum(axis=1) / n, table.sum(axis=0) / n
    outer = np.outer(rows, cols)[table > 0]
    mutual = float((joint * np.log(joint / outer)).sum())
    entropies = [-float((p * np.log(p)).sum()) for p in (rows, cols)]
    if max(entropies) == 0:
        return 1.0
    return max(0.0, mutual / (sum(entropies) / 2))


def adjusted_rand_index(truth: np.ndarray, clusters: np.ndarray) -> float:
    """The Rand index adjusted for chance (Hubert and Arabie); 1.0 for identical partitions."""
    table = _contingency(truth, clusters)
    pairs = lambda counts: float((counts * (counts - 1) // 2).sum())  # noqa: E731
    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    total = math.comb(int(table.sum()), 2)
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)
