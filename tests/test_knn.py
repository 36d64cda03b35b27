"""Nearest-neighbour metrics against a plain per-query reference, and the faults of RECIPE §2."""

from __future__ import annotations

import math

import pytest
import torch

from taxonclip import knn, products
from taxonclip.config import EvalConfig
from taxonclip.errors import ConfigError, DataError
from taxonclip.knn import METRICS, KnnResult, knn_metrics
from tests.helpers import LargestOutput

CHUNK = EvalConfig().chunk_size


def reference_metrics(query, query_labels, gallery, gallery_labels) -> dict:
    """Every metric computed one query at a time with Python loops, from the definitions.

    Ties: the lowest gallery index among equally near items, the lowest label among equal
    class means. Returns the metrics, the counts and the `top1_cos` prediction of each query.
    """
    queries, items = query.tolist(), gallery.tolist()
    labels, item_labels = query_labels.tolist(), gallery_labels.tolist()
    classes = sorted(set(item_labels))
    hits = {name: [] for name in METRICS if not name.startswith("macro_")}
    per_class, per_class_top5 = {}, {}
    predictions, n_lone = [], 0
    for q, label in zip(queries, labels):
        cos = [dot(q, g) / math.sqrt(dot(q, q)) / math.sqrt(dot(g, g)) for g in items]
        dist = [math.dist(q, g) for g in items]
        ranking = sorted(range(len(items)), key=lambda j: (-cos[j], j))
        predictions.append(item_labels[ranking[0]])
        if label not in classes:
            n_lone += 1
            continue
        members = {c: [j for j in range(len(items)) if item_labels[j] == c] for c in classes}
        mean_cos = {c: mean([cos[j] for j in members[c]]) for c in classes}
        mean_l2 = {c: mean([dist[j] for j in members[c]]) for c in classes}
        nearest_l2 = min(range(len(items)), key=lambda j: (dist[j], j))
        hits["top1_cos"].append(item_labels[ranking[0]] == label)
        hits["top3_cos"].append(label in [item_labels[j] for j in ranking[:3]])
        hits["top5_cos"].append(label in [item_labels[j] for j in ranking[:5]])
        hits["mean_cos"].append(max(classes, key=lambda c: (mean_cos[c], -c)) == label)
        hits["top1_l2"].append(item_labels[nearest_l2] == label)
        hits["mean_l2"].append(min(classes, key=lambda c: (mean_l2[c], c)) == label)
        hits["map_at_r"].append(average_precision([item_labels[j] == label for j in ranking],
                                                  len(members[label])))
        per_class.setdefault(label, []).append(item_labels[ranking[0]] == label)
        per_class_top5.setdefault(label, []).append(hits["top5_cos"][-1])
    metrics = {name: mean(values) for name, values in hits.items()}
    metrics["macro_top1_cos"] = mean([mean(values) for values in per_class.values()])
    metrics["macro_top5_cos"] = mean([mean(values) for values in per_class_top5.values()])
    return {"metrics": metrics, "n_test": len(queries), "n_lone": n_lone,
            "n_classes": len(per_class), "predictions": predictions}


def dot(a, b):
    total = 0.0
    for x, y in zip(a, b):
        total += x * y
    return total


def mean(values):
    if not values:
        return float("nan")
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


def average_precision(relevant_in_order, r):
    found, total = 0, 0.0
    for position, relevant in enumerate(relevant_in_order[:r], start=1):
        if relevant:
            found += 1
            total += found / position
    return total / r


def integer_embeddings_with_ties(seed: int):
    """Small integer vectors (exact dot products), duplicated gallery items under other labels,
    queries equal to gallery items, lone query labels and gallery-only labels; ids not 0..K-1."""
    generator = torch.Generator().manual_seed(seed)
    gallery = torch.randint(-3, 4, (40, 6), generator=generator).double()
    gallery[30:40] = gallery[0:10]
    gallery_labels = torch.randint(0, 6, (40,), generator=generator) * 10 - 20
    gallery_labels[30:40] = (gallery_labels[0:10] + 10) % 60 - 20
    gallery_labels[20] = 70
    query = torch.randint(-3, 4, (30, 6), generator=generator).double()
    query[:8] = gallery[:8]
    query_labels = torch.randint(0, 8, (30,), generator=generator) * 10 - 20
    for vectors in (gallery, query):
        vectors[vectors.abs().sum(dim=1) == 0, 0] = 1.0
    return query, query_labels, gallery, gallery_labels


def assert_matches_reference(result: KnnResult, expected: dict) -> None:
    assert (result.n_test, result.n_lone, result.n_classes) == (
        expected["n_test"], expected["n_lone"], expected["n_classes"])
    assert result.predictions.tolist() == expected["predictions"]
    for name in METRICS:
        assert result.metrics[name] == pytest.approx(expected["metrics"][name], rel=1e-12, abs=1e-12), name


@pytest.mark.parametrize("chunk_size", [1, 7, 30, 1000])
def test_matches_reference_with_ties_lone_queries_and_gallery_only_labels(chunk_size):
    data = integer_embeddings_with_ties(seed=0)
    expected = reference_metrics(*data)
    assert expected["n_lone"] > 0 and 0 < expected["metrics"]["top1_cos"] < 1

    assert_matches_reference(knn_metrics(*data, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_reference_on_other_seeds(seed):
    data = integer_embeddings_with_ties(seed)

    assert_matches_reference(knn_metrics(*data, chunk_size=8), reference_metrics(*data))


def test_matches_reference_on_gaussian_embeddings_of_different_norms():
    generator = torch.Generator().manual_seed(4)
    gallery = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    gallery *= torch.rand(60, 1, generator=generator, dtype=torch.float64) * 5
    query = torch.randn(25, 5, generator=generator, dtype=torch.float64) * 3
    gallery_labels = torch.randint(0, 5, (60,), generator=generator)
    query_labels = torch.randint(0, 6, (25,), generator=generator)
    expected = reference_metrics(query, query_labels, gallery, gallery_labels)

    assert expected["metrics"]["top1_cos"] != expected["metrics"]["top1_l2"]
    result = knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=6)

    assert_matches_reference(result, expected)


def test_matches_reference_when_the_gallery_spans_many_blocks():
    """Nearest items are found block by block past 64 gallery items: ties between blocks, and a
    last block shorter than the others, must still go to the lowest index."""
    query, query_labels, gallery, gallery_labels = integer_embeddings_with_ties(seed=10)
    gallery = torch.cat([gallery.flip(0), gallery, gallery[:27] * 2, gallery])
    gallery_labels = torch.cat([gallery_labels.flip(0), (gallery_labels + 10) % 60,
                                gallery_labels[:27], (gallery_labels + 20) % 60])

    assert_matches_reference(knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=11),
                             reference_metrics(query, query_labels, gallery, gallery_labels))


@pytest.mark.parametrize("items", [1, 63, 64, 65, 128, 1000, 8001])
def test_first_smallest_is_the_first_occurrence_argmin_gives(items):
    generator = torch.Generator().manual_seed(items)
    values = torch.randint(0, 4, (50, items), generator=generator).float()
    values[0] = 7.0
    values[1, -1] = -1.0
    values[2:10] = torch.randn(8, items, generator=generator)  # one smallest value a row

    assert torch.equal(knn._first_smallest(values), values.argmin(dim=1))


def test_float32_agrees_with_float64_reference():
    query, query_labels, gallery, gallery_labels = integer_embeddings_with_ties(seed=5)
    expected = reference_metrics(query, query_labels, gallery, gallery_labels)

    result = knn_metrics(query.float(), query_labels, gallery.float(), gallery_labels, chunk_size=9)

    assert result.predictions.tolist() == expected["predictions"]
    for name in METRICS:
        assert result.metrics[name] == pytest.approx(expected["metrics"][name], rel=1e-6), name


def test_results_identical_for_every_chunk_size_and_run():
    generator = torch.Generator().manual_seed(6)
    gallery, query = torch.randn(500, 16, generator=generator), torch.randn(100, 16, generator=generator)
    gallery_labels = torch.randint(0, 20, (500,), generator=generator)
    query_labels = torch.randint(0, 22, (100,), generator=generator)
    runs = [knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=size)
            for size in (1, 13, 100, 10_000, 13)]

    for run in runs[1:]:
        assert run.metrics == runs[0].metrics
        assert torch.equal(run.predictions, runs[0].predictions)


def test_query_order_changes_only_the_order_of_predictions():
    query, query_labels, gallery, gallery_labels = integer_embeddings_with_ties(seed=9)
    shuffled = torch.randperm(len(query), generator=torch.Generator().manual_seed(9))

    straight = knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=4)
    permuted = knn_metrics(query[shuffled], query_labels[shuffled], gallery, gallery_labels, chunk_size=4)

    assert permuted.metrics == straight.metrics
    assert torch.equal(permuted.predictions, straight.predictions[shuffled])


@pytest.mark.skipif(products._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN (mkldnn) on the CPU")
def test_onednn_dot_products_are_float32_exact_and_agree_with_torch_matmul(monkeypatch):
    generator = torch.Generator().manual_seed(10)
    query, gallery = torch.randn(300, 64, generator=generator), torch.randn(1200, 64, generator=generator)
    gallery *= torch.rand(1200, 1, generator=generator) * 3
    labels = torch.randint(0, 40, (1200,), generator=generator)
    exact = query.double() @ gallery.double().T

    error = (products.dot_products(query, gallery).double() - exact).abs().max()
    assert error <= 64 * torch.finfo(torch.float32).eps * exact.abs().max()

    with_onednn = knn_metrics(query, labels[:300], gallery, labels, chunk_size=128)
    monkeypatch.setattr(products, "_ONEDNN_LINEAR", None)
    with_matmul = knn_metrics(query, labels[:300], gallery, labels, chunk_size=128)
    assert torch.equal(with_onednn.predictions, with_matmul.predictions)
    assert with_onednn.metrics == pytest.approx(with_matmul.metrics, rel=1e-6)


def test_a_private_op_that_fails_or_differs_leaves_the_public_matmul():
    def raises(*args):
        raise RuntimeError("mkldnn::_linear_pointwise() expected 5 arguments")

    def transposed(query, gallery, *rest):
        return gallery @ query.T

    def off_by_one(query, gallery, *rest):
        return query @ gallery.T + 1

    for broken in (raises, transposed, off_by_one, lambda *args: None):
        assert products.working_linear(broken) is None
    assert products.working_linear(None) is None
    exact = lambda query, gallery, *rest: query @ gallery.T  # noqa: E731
    assert products.working_linear(exact) is (exact if torch.backends.mkldnn.is_available() else None)


def test_this_torch_s_onednn_linear_passes_the_check_and_is_used():
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN linear operator: the kNN runs on torch.matmul")
    assert products._ONEDNN_LINEAR is op


def test_nearest_item_ties_go_to_lowest_gallery_index_and_class_ties_to_lowest_label():
    same = [[1.0, 2.0]]
    gallery, gallery_labels = torch.tensor(same * 2), torch.tensor([5, 3])

    result = knn_metrics(torch.tensor(same), torch.tensor([3]), gallery, gallery_labels, chunk_size=CHUNK)

    assert result.predictions.tolist() == [5]
    assert result.metrics["top1_cos"] == result.metrics["top1_l2"] == 0.0
    assert result.metrics["mean_cos"] == result.metrics["mean_l2"] == 1.0


@pytest.mark.parametrize("position, expected", [(4, 1.0), (5, 0.0), (6, 0.0)])
def test_top5_among_equal_items_keeps_the_lowest_indices(position, expected):
    gallery = torch.ones(8, 3)
    gallery_labels = torch.zeros(8, dtype=torch.int64)
    gallery_labels[position] = 1

    result = knn_metrics(torch.ones(1, 3), torch.tensor([1]), gallery, gallery_labels, chunk_size=CHUNK)

    assert result.metrics["top5_cos"] == expected


def test_map_at_r_of_a_known_ranking():
    angles = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1).double()
    gallery_labels = torch.tensor([7, 8, 7, 7, 8])

    result = knn_metrics(torch.tensor([[1.0, 0.0]]).double(), torch.tensor([7]), gallery, gallery_labels, chunk_size=CHUNK)

    # the 3 nearest are 7, 8, 7: precision 1/1 at position 1 and 2/3 at position 3, over R = 3
    assert result.metrics["map_at_r"] == pytest.approx((1 + 2 / 3) / 3)


def test_fault_1_top1_l2_uses_euclidean_distance_not_the_cosine_argmax():
    gallery = torch.tensor([[10.0, 5.0], [0.5, 0.4]])

    result = knn_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), gallery, torch.tensor([0, 1]), chunk_size=CHUNK)

    assert result.metrics["top1_cos"] == 0.0
    assert result.metrics["top1_l2"] == 1.0


def test_fault_3_lone_queries_are_counted_and_excluded_from_every_metric():
    query, query_labels, gallery, gallery_labels = integer_embeddings_with_ties(seed=7)
    known = torch.isin(query_labels, gallery_labels)
    assert 0 < int((~known).sum()) < len(known)

    with_lone = knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=CHUNK)
    without = knn_metrics(query[known], query_labels[known], gallery, gallery_labels, chunk_size=CHUNK)

    assert with_lone.n_lone == int((~known).sum()) and without.n_lone == 0
    assert with_lone.n_test == len(query)
    assert with_lone.metrics == without.metrics
    assert with_lone.n_classes == without.n_classes == len(set(query_labels[known].tolist()))


def test_labels_only_in_the_gallery_compete_as_predictions():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    result = knn_metrics(torch.tensor([[0.9, 0.1]]), torch.tensor([2]), gallery, torch.tensor([1, 2]), chunk_size=CHUNK)

    assert result.predictions.tolist() == [1]
    assert result.metrics["top1_cos"] == 0.0 and result.n_classes == 1


@pytest.mark.parametrize("n_classes", [30, 2])
def test_fault_4_memory_is_bounded_by_the_chunk_not_by_test_x_train(n_classes, one_thread):
    generator = torch.Generator().manual_seed(8)
    query, gallery = torch.randn(300, 8, generator=generator), torch.randn(1000, 8, generator=generator)
    labels = torch.randint(0, n_classes, (1000,), generator=generator)
    chunk = 64

    with LargestOutput(lambda tensor: tensor.numel() * tensor.element_size()) as recorder:
        chunked = knn_metrics(query, labels[:300], gallery, labels, chunk_size=chunk)

    # the products and cosines of one chunk with the gallery are the largest tensors (bytes; with
    # one thread, as the kernel's scratch is one per thread and grows with the ranking's depth)
    assert recorder.largest <= 2 * chunk * len(gallery) * 4 < len(query) * len(gallery) * 4
    assert chunked.metrics == knn_metrics(query, labels[:300], gallery, labels, chunk_size=300).metrics


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fault_6_metrics_are_floats_in_the_unit_interval():
    result = knn_metrics(*integer_embeddings_with_ties(seed=9), chunk_size=CHUNK)

    assert list(result.metrics) == list(METRICS)
    for name, value in result.metrics.items():
        assert type(value) is float and 0.0 <= value <= 1.0, name
    assert all(type(count) is int for count in (result.n_test, result.n_classes, result.n_lone))


def test_no_valid_query_gives_nan_metrics():
    gallery, gallery_labels = torch.eye(3), torch.tensor([0, 1, 2])
    lone = knn_metrics(torch.eye(3)[:2], torch.tensor([9, 9]), gallery, gallery_labels, chunk_size=CHUNK)
    empty = knn_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.int64), gallery, gallery_labels, chunk_size=CHUNK)

    assert (lone.n_lone, lone.n_test, lone.n_classes) == (2, 2, 0)
    assert (empty.n_lone, empty.n_test, empty.n_classes) == (0, 0, 0)
    for result in (lone, empty):
        assert all(math.isnan(value) for value in result.metrics.values())


@pytest.mark.parametrize("change, error, message", [
    ({"chunk_size": 0}, ConfigError, "chunk_size"),
    ({"query": torch.ones(2, 4)}, DataError, "differ in size"),
    ({"query_labels": torch.tensor([0.0, 1.0])}, DataError, "integer class ids"),
    ({"gallery_labels": torch.tensor([0])}, DataError, "one id per embedding"),
    ({"gallery": torch.empty(0, 3), "gallery_labels": torch.empty(0, dtype=torch.int64)}, DataError, "empty"),
    ({"gallery": torch.tensor([[0.0, float("nan"), 1.0], [1.0, 1.0, 1.0]])}, DataError, "NaN"),
])
def test_bad_input_gets_one_clear_error(change, error, message):
    arguments = {"query": torch.ones(2, 3), "query_labels": torch.tensor([0, 1]),
                 "gallery": torch.ones(2, 3), "gallery_labels": torch.tensor([0, 1]),
                 "chunk_size": CHUNK, **change}

    with pytest.raises(error, match=message):
        knn_metrics(**arguments)


def test_top3_and_macro_top5_of_a_known_ranking():
    # one query per row: class 7 is 2nd nearest for the first, 4th for the second, absent for the
    # third; a fourth query of class 8 finds its class first
    angles = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1).double()
    query = torch.tensor([[1.0, 0.0]]).double().repeat(4, 1)
    gallery_labels = [torch.tensor(labels) for labels in
                      ([1, 7, 2, 3, 4, 5], [1, 2, 3, 7, 4, 5], [1, 2, 3, 4, 5, 6], [8, 1, 2, 3, 4, 5])]
    hits = []
    for labels, query_label in zip(gallery_labels, (7, 7, 6, 8)):
        hits.append(knn_metrics(query[:1], torch.tensor([query_label]), gallery, labels, chunk_size=CHUNK).metrics)

    assert [h["top3_cos"] for h in hits] == [1.0, 0.0, 0.0, 1.0]
    assert [h["top5_cos"] for h in hits] == [1.0, 1.0, 0.0, 1.0]
    # macro: each class's accuracy weighs the same, whatever its number of queries; class 9 is
    # the 6th nearest item of its query
    labels = torch.tensor([7, 1, 2, 3, 4, 9])
    result = knn_metrics(query, torch.tensor([7, 7, 7, 9]), gallery, labels, chunk_size=CHUNK)
    assert result.metrics["top5_cos"] == result.metrics["top1_cos"] == 3 / 4
    assert result.metrics["macro_top5_cos"] == result.metrics["macro_top1_cos"] == (1 + 0) / 2
    assert result.metrics["top3_cos"] == 3 / 4


def random_store(seed: int, rows: int = 900, dim: int = 12):
    """Float32 embeddings with exact duplicates (ties) and 30 classes."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(rows, dim, generator=generator) * torch.rand(rows, 1, generator=generator) * 3
    vectors[rows // 2:rows // 2 + 40] = vectors[:40]
    labels = torch.randint(0, 30, (rows,), generator=generator)
    return vectors, labels


@pytest.mark.parametrize("block_elements", [1 << 25, 40 * 64, 40 * 7])
def test_rows_of_a_store_score_as_their_copies_in_any_block_size(monkeypatch, block_elements):
    """Queries and gallery picked by index from one store, the gallery read in blocks of several
    sizes, give exactly the metrics of copies of those rows in one block."""
    vectors, labels = random_store(seed=11)
    gallery_rows = torch.arange(0, 900, 3)
    query_rows = torch.tensor(sorted(set(range(900)) - set(gallery_rows.tolist())))[::2]
    copied = knn_metrics(vectors[query_rows], labels[query_rows], vectors[gallery_rows],
                         labels[gallery_rows], chunk_size=40)
    monkeypatch.setattr(knn, "BLOCK_ELEMENTS", block_elements)

    picked = knn_metrics(vectors, labels[query_rows], vectors, labels[gallery_rows], chunk_size=40,
                         query_rows=query_rows, gallery_rows=gallery_rows)

    assert picked.metrics == copied.metrics
    assert torch.equal(picked.predictions, copied.predictions)


def test_gallery_in_many_blocks_matches_reference_with_ties(monkeypatch):
    monkeypatch.setattr(knn, "BLOCK_ELEMENTS", 7 * 6)  # blocks of 6 items for chunks of 7
    query, query_labels, gallery, gallery_labels = integer_embeddings_with_ties(seed=12)

    assert_matches_reference(knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=7),
                             reference_metrics(query, query_labels, gallery, gallery_labels))


def test_deep_rankings_go_in_smaller_chunks_with_the_same_results(monkeypatch):
    vectors, labels = random_store(seed=13)
    labels[:600] = 0  # one class of 600 gallery items: MAP@R ranks 600 deep
    whole = knn_metrics(vectors[:200], labels[:200], vectors, labels, chunk_size=64)
    monkeypatch.setattr(knn, "RANK_ELEMENTS", 4000)

    assert knn._chunks(torch.full((5,), 600), 64, 900)[0].tolist() == [0, 1, 2]
    small = knn_metrics(vectors[:200], labels[:200], vectors, labels, chunk_size=64)
    assert small.metrics == whole.metrics


@pytest.mark.parametrize("seed", range(4))
def test_screened_ranking_is_the_stable_descending_sort(seed):
    """Rows screened by group maxima rank exactly as a stable sort: ties at the cut, ties inside
    and outside the kept groups, a short last group."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 400, (64, 1000 + seed), generator=generator).float()
    values[:8] = torch.randn(8, 1000 + seed, generator=generator)  # no ties: screened, not sorted
    values[8:16] = torch.randint(0, 3, (8, 1000 + seed), generator=generator).float()  # many ties
    for depth in (1, 5, 12):
        ranked_values, indices = knn._ranked(values, depth)
        expected = values.sort(dim=1, descending=True, stable=True).indices[:, :depth]
        assert torch.equal(indices, expected), depth
        assert torch.equal(ranked_values, values.gather(1, expected))


def test_float16_store_is_compared_in_float32():
    vectors, labels = random_store(seed=14)
    half = vectors.half()
    rows = torch.arange(300, 900)

    stored = knn_metrics(half, labels[:300], half, labels[rows], gallery_rows=rows,
                         query_rows=torch.arange(300), chunk_size=CHUNK)
    widened = knn_metrics(half[:300].float(), labels[:300], half[rows].float(), labels[rows], chunk_size=CHUNK)

    assert stored.metrics == widened.metrics


def test_rows_outside_the_store_are_refused():
    with pytest.raises(DataError, match="gallery rows must lie in 0..2"):
        knn_metrics(torch.ones(2, 3), torch.tensor([0, 1]), torch.ones(3, 3), torch.tensor([0]),
                    gallery_rows=torch.tensor([3]), chunk_size=CHUNK)
