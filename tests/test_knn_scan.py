"""knn_scan's C kernel against knn's torch operations and the plain reference of test_knn.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from taxonclip import knn, knn_scan
from taxonclip.config import EvalConfig
from taxonclip.knn import knn_metrics
from tests.test_knn import assert_matches_reference, integer_embeddings_with_ties, reference_metrics

CHUNK = EvalConfig().chunk_size
needs_kernel = pytest.mark.skipif(knn_scan.native() is None, reason="no C compiler builds knn_scan's kernel")


@pytest.fixture(params=["kernel", "torch"])
def products_by(request, monkeypatch):
    """Products made by the kernel's BLAS calls (knn_scan.fused) where it has a BLAS, or by torch
    (the pieces knn_scan.scan takes), as where it has none."""
    if request.param == "kernel" and knn_scan.native() is not None and knn_scan.gemm(torch.float64) is None:
        pytest.skip("torch links no BLAS ?gemm that passes knn_scan's check")
    if request.param == "torch":
        monkeypatch.setattr(knn_scan, "gemm", lambda dtype: None)
    return request.param


def _ties_across_blocks(seed: int, dtype: torch.dtype = torch.float64):
    """Integer vectors (exact products) whose duplicates sit on both sides of block and chunk
    boundaries, a class whose members span every block, and a class larger than the ranking."""
    query, query_labels, gallery, gallery_labels = integer_embeddings_with_ties(seed)
    gallery = torch.cat([gallery, gallery.flip(0), gallery[:13]])
    gallery_labels = torch.cat([gallery_labels, (gallery_labels.flip(0) + 10) % 60, gallery_labels[:13]])
    gallery_labels[::3] = 50  # one class in every block, with more items than top-5 ranks
    return query.to(dtype), query_labels, gallery.to(dtype), gallery_labels


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # small integers: exact in both
@pytest.mark.parametrize("block_elements, chunk_size", [(7 * 6, 7), (5 * 17, 5), (1 << 22, 30)])
def test_kernel_matches_reference_with_ties_across_blocks_and_chunks(monkeypatch, products_by, dtype,
                                                                     block_elements, chunk_size):
    monkeypatch.setattr(knn, "BLOCK_ELEMENTS", block_elements)
    data = _ties_across_blocks(seed=20, dtype=dtype)

    assert_matches_reference(knn_metrics(*data, chunk_size=chunk_size), reference_metrics(*data))


@needs_kernel
@pytest.mark.parametrize("seed", [21, 22])
def test_kernel_and_torch_operations_give_the_same_table(monkeypatch, products_by, seed):
    """float32 at a size where the kernel screens by group maxima (items over 16 x depth)."""
    generator = torch.Generator().manual_seed(seed)
    gallery = torch.randn(3000, 16, generator=generator)
    gallery[1500:1600] = gallery[:100]  # duplicates: ties in both rankings
    query = torch.randn(300, 16, generator=generator)
    query[:20] = gallery[:20]
    gallery_labels = torch.randint(0, 40, (3000,), generator=generator)
    query_labels = torch.randint(0, 40, (300,), generator=generator)
    kernel = knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=64)
    monkeypatch.setenv(knn_scan.ENABLE_VARIABLE, "0")

    passes = knn_metrics(query, query_labels, gallery, gallery_labels, chunk_size=64)

    assert torch.equal(kernel.predictions, passes.predictions)
    for name in knn.METRICS:  # distances may differ in the last bit: torch's sqrt is approximate
        assert kernel.metrics[name] == pytest.approx(passes.metrics[name], abs=2 / 300), name


@needs_kernel
@pytest.mark.parametrize("items, depth, values", [
    (40, 12, 9), (1000, 5, 9), (1000, 70, 9), (1003, 12, 9),
    (3000, 100, 9),  # over 128 kept and candidates: sorted, not counted
    (2000, 5, 1), (2000, 70, 1)])  # every product equal: candidate buffers fill and are merged
def test_kernel_ranking_is_the_stable_descending_sort_over_blocks(items, depth, values):
    """The kept items of two blocks are the first `depth` of a stable descending sort of their
    cosines; the nearest item is the first smallest distance; the sums add every distance."""
    generator = torch.Generator().manual_seed(items + depth)
    products = torch.randint(-(values // 2), values // 2 + 1, (32, items), generator=generator).double()
    products[:8] = torch.randn(8, items, generator=generator, dtype=torch.float64)
    products[8:10] = 3.0  # every item tied, in every block
    squared_norms = torch.full((items,), 100.0, dtype=torch.float64)
    inverse_norms = torch.ones(items, dtype=torch.float64)
    classes = torch.randint(0, 7, (items,), generator=generator)
    query_squared_norms = torch.full((32,), 100.0, dtype=torch.float64)
    half = items // 2
    state = knn_scan.start(knn_scan.buffers(32, depth, 7, items - half, torch.float64), query_squared_norms, depth,
                           torch.zeros(32, dtype=torch.int64), classes, torch.bincount(classes, minlength=7))
    for start, stop in ((0, half), (half, items)):
        block = knn_scan.block(start, squared_norms[start:stop], inverse_norms[start:stop], classes[start:stop],
                               last=stop == items)
        for first in (0, 16):  # two strips of queries, one at a time
            knn_scan.scan(state, [(first, products[first:first + 16, start:stop].T)], block)

    expected = products.sort(dim=1, descending=True, stable=True).indices[:, :depth]
    values, indices = state.ranked()
    assert torch.equal(indices, expected)
    assert torch.equal(values, products.gather(1, expected))
    distances = (200 - 2 * products).clamp(min=0).sqrt()
    assert torch.equal(state.nearest()[1], distances.argmin(dim=1))
    sums = torch.zeros(32, 7, dtype=torch.float64).index_add_(1, classes, distances)
    assert torch.allclose(state.distance_sums(), sums, rtol=1e-12)
    cosine_sums = torch.zeros(32, 7, dtype=torch.float64).index_add_(1, classes, products)
    assert torch.allclose(state.cosine_sums(), cosine_sums, rtol=1e-12)


def test_without_the_kernel_knn_keeps_its_torch_operations(monkeypatch):
    monkeypatch.setenv(knn_scan.ENABLE_VARIABLE, "0")
    data = _ties_across_blocks(seed=23)

    assert not knn_scan.supports(data[0].device, data[0].dtype)
    assert_matches_reference(knn_metrics(*data, chunk_size=CHUNK), reference_metrics(*data))


@needs_kernel
def test_kernel_without_openmp_splits_the_rows_among_python_threads(monkeypatch, products_by):
    """Where the compiler has no OpenMP, the kernel's parts run on a pool of Python threads."""
    monkeypatch.setattr(knn_scan.native(), "with_openmp", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    query, query_labels, gallery, gallery_labels = _ties_across_blocks(seed=24)
    data = (query.repeat(3, 1), query_labels.repeat(3), gallery, gallery_labels)  # rows for 5 parts

    assert_matches_reference(knn_metrics(*data, chunk_size=90), reference_metrics(*data))


@pytest.mark.parametrize("rows", [16, 32, 64, 176, 464, 512, 1024, 16 * 125])
def test_pieces_cover_the_rows_in_order_with_an_odd_number_of_strips_each(rows):
    pieces = knn_scan.pieces(rows)

    assert [first for first, _ in pieces] == list(itertools.accumulate([0] + [size for _, size in pieces[:-1]]))
    assert sum(size for _, size in pieces) == rows
    assert all(size % knn_scan.LANES == 0 and size // knn_scan.LANES % 2 == 1 for _, size in pieces)
    assert all(size <= (knn_scan.PIECE_STRIPS + 2) * knn_scan.LANES for _, size in pieces)


@needs_kernel
def test_knn_makes_its_products_in_the_kernel_where_torch_links_a_blas(monkeypatch):
    if knn_scan.gemm(torch.float32) is None:
        pytest.skip("torch links no BLAS ?gemm that passes knn_scan's check")
    calls = []
    fused = knn_scan.fused
    monkeypatch.setattr(knn_scan, "fused", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    monkeypatch.setattr(knn_scan, "scan", lambda *args: pytest.fail("products taken from torch"))
    data = _ties_across_blocks(seed=25, dtype=torch.float32)

    assert_matches_reference(knn_metrics(*data, chunk_size=CHUNK), reference_metrics(*data))
    assert calls


@pytest.mark.parametrize("rows, threads", [(16, 2), (32, 2), (464, 2), (512, 1), (512, 16), (48, 4)])
def test_shares_split_the_strips_among_the_threads_in_order(rows, threads):
    shares = knn_scan.shares(rows, threads)
    sizes = [size for _, size in shares]

    assert [first for first, _ in shares] == [sum(sizes[:i]) for i in range(len(shares))]
    assert sum(sizes) == rows and all(size % knn_scan.LANES == 0 and size > 0 for size in sizes)
    assert len(shares) == min(threads, rows // knn_scan.LANES)
    assert max(sizes) - min(sizes) <= knn_scan.LANES


@pytest.mark.parametrize("width, size", [(272, 4), (528, 4), (16, 8), (100_000, 4)])
def test_tiles_hold_whole_groups_within_the_tile_bytes(width, size):
    tile = knn_scan.tile_items(width, size)

    assert tile % knn_scan.GROUP == 0 and tile >= knn_scan.GROUP
    assert tile * width * size <= knn_scan.TILE_BYTES or tile == knn_scan.GROUP


def test_no_blas_of_that_name_leaves_the_products_to_torch():
    assert knn_scan._gemm("taxonclip_no_such_gemm_", torch.float32) is None
