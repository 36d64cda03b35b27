"""UNICOM's cluster discrimination: NMI and ARI against plain reference computations, a seeded
spherical k-means that finds clear clusters, and `train --label cluster` training on them while
the table scores the true labels."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from taxonclip import names
from taxonclip.cli import main
from taxonclip.clusters import (adjusted_rand_index, cluster_count, kmeans,
                                normalized_mutual_information)
from taxonclip.config import DataConfig, TrainConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.data.splits import make_split, split_manifest
from taxonclip.errors import ConfigError
from tests.helpers import sqlite_tracking


def _reference_nmi(a: list, b: list) -> float:
    n = len(a)
    pa, pb, pab = Counter(a), Counter(b), Counter(zip(a, b))
    mutual = sum(c / n * math.log((c / n) / (pa[x] / n * pb[y] / n)) for (x, y), c in pab.items())
    entropy = lambda counts: -sum(c / n * math.log(c / n) for c in counts.values())  # noqa: E731
    return mutual / ((entropy(pa) + entropy(pb)) / 2)


def _reference_ari(a: list, b: list) -> float:
    pairs = list(combinations(range(len(a)), 2))
    same_a = [a[i] == a[j] for i, j in pairs]
    same_b = [b[i] == b[j] for i, j in pairs]
    both = sum(x and y for x, y in zip(same_a, same_b))
    expected = sum(same_a) * sum(same_b) / len(pairs)
    return (both - expected) / ((sum(same_a) + sum(same_b)) / 2 - expected)


def test_nmi_and_ari_equal_reference_computations():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth, found = rng.integers(0, 4, 40), rng.integers(0, 6, 40)
        assert normalized_mutual_information(truth, found) == pytest.approx(
            _reference_nmi(truth.tolist(), found.tolist()), abs=1e-12)
        assert adjusted_rand_index(truth, found) == pytest.approx(
            _reference_ari(truth.tolist(), found.tolist()), abs=1e-12)
    # scikit-learn's documented example, and identical partitions under other names
    assert adjusted_rand_index(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2])) == \
        pytest.approx(0.24242424, abs=1e-8)
    labels = np.array(["a", "a", "b", "c", "c"])
    assert normalized_mutual_information(labels, np.array([7, 7, 1, 3, 3])) == pytest.approx(1.0)
    assert adjusted_rand_index(labels, np.array([7, 7, 1, 3, 3])) == pytest.approx(1.0)


def test_kmeans_finds_clear_clusters_and_repeats_with_its_seed():
    generator = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)
    truth = torch.arange(200) % 5
    points = centres[truth] + 0.05 * torch.randn(200, 16, generator=generator)
    found, unit_centres = kmeans(points, 5, seed=3, progress=False)
    assert adjusted_rand_index(truth.numpy(), found) == pytest.approx(1.0)
    assert torch.allclose(unit_centres.norm(dim=1), torch.ones(5))
    assert np.array_equal(found, kmeans(points, 5, seed=3, progress=False)[0])


def test_cluster_counts_and_their_checks():
    assert cluster_count(0.1, species=60, images=1000) == 6
    assert cluster_count(1.0, species=60, images=1000) == 60
    assert cluster_count(0.01, species=60, images=1000) == 2  # never fewer than two
    assert cluster_count(500, species=60, images=100) == 100  # never more than the images
    with pytest.raises(ConfigError, match="a count is a whole number"):
        TrainConfig(label="cluster", clusters=2.5)
    with pytest.raises(ConfigError, match="'clusters' must be a finite number above 0"):
        TrainConfig(label="cluster", clusters=0)


def test_train_on_clusters_logs_their_purity_and_scores_the_true_labels(specimens, tmp_path,
                                                                        monkeypatch):
    sqlite_tracking(monkeypatch, tmp_path, "clusters")
    assert main(["train", "--model", "tiny", "--data", str(specimens), "--label", "cluster",
                 "--clusters", "0.5", "--epochs", "2", "--batch_size", "16", "--workers", "0",
                 "--lr", "2e-3", "--margin_s", "16", "--margin_m2", "0.2"]) == 0
    import mlflow

    run = mlflow.search_runs(experiment_names=["clusters"]).iloc[0]
    assert run["status"] == "FINISHED" and run["params.label"] == "cluster"
    assert run[f"metrics.{names.CLUSTER_COUNT}"] == 6  # half of the 12 species
    assert int(run["params.num_classes"]) == 6
    for level in ("species", "genus"):
        for score in ("nmi", "ari"):
            assert np.isfinite(run[f"metrics.{names.cluster_purity(score, level)}"])
    assert run[f"metrics.{names.CLUSTER_KMEANS_SECONDS}"] >= 0
    assignment = mlflow.artifacts.load_text(f"runs:/{run['run_id']}/{names.CLUSTER_ASSIGNMENT}")
    # the training rows: the train split without its validation rows
    train_rows = len(make_split(read_manifest(specimens).table, DataConfig()).training_rows)
    assert assignment.startswith("image_id,cluster") and len(assignment.splitlines()) == 1 + train_rows
    # the table scores the true labels, with 12 species and 4 genera, not the 6 clusters
    table = mlflow.MlflowClient().load_table(run["experiment_id"], names.PER_TAXA_TABLE,
                                             run_ids=[run["run_id"]])
    classes = table.set_index(["taxa", "level"])["n_classes"]
    assert classes[("All", "species")] == 12 and classes[("All", "genus")] == 4
