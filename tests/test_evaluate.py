"""The evaluation pipeline: embedding, the per-taxa table, and the faults of the group's script
(RECIPE §2) that concern the pipeline rather than the metric math (tested in test_knn.py)."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
import torch

from taxonclip.config import DataConfig, EvalConfig, ModelConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.data.splits import split_manifest
from taxonclip.errors import DataError
from taxonclip import embed as embed_module
from taxonclip import table as table_module
from taxonclip.embed import embed_images, fuse
from taxonclip.evaluation import evaluate
from taxonclip.table import TABLE_COLUMNS, Seen, evaluation_table
from taxonclip import knn, names
from taxonclip.knn import METRICS
from taxonclip.models import create_model
from taxonclip.names import Levels
from tests.helpers import LargestOutput


def _config(specimens, **overrides) -> EvalConfig:
    data = DataConfig(data=str(specimens), seed=overrides.pop("seed", 0))
    return EvalConfig(data=data, model=ModelConfig("tiny"), workers=0, batch_size=16,
                      cache_embeddings=False, device="cpu", **overrides)


@pytest.fixture(scope="module")
def tiny():
    return create_model("tiny", "pretrained")


def test_table_has_a_row_per_taxa_and_level(specimens, tiny):
    result = evaluate(_config(specimens), tiny)
    table = result.table
    assert list(table.columns) == list(TABLE_COLUMNS)
    taxa = sorted(result.manifest.table["taxa"].unique())
    expected = [(t, level) for t in taxa for level in ("species", "genus")]
    expected += [("All", "species"), ("All", "genus"), ("All", "taxa")]
    assert list(zip(table["taxa"], table["level"])) == expected


def test_one_split_shared_by_every_row(specimens, tiny):
    """Fault 2: one seeded split for all rows, so the taxa rows add up to the All row."""
    table = evaluate(_config(specimens), tiny).table
    species = table[table["level"] == "species"]
    per_taxa = species[species["taxa"] != "All"]["n_test"].sum()
    assert per_taxa == species[species["taxa"] == "All"]["n_test"].item()


def test_same_seed_same_table_other_seed_other_split(specimens, tiny):
    """Fault 2: results are reproducible for a seed and move with it."""
    first = evaluate(_config(specimens, seed=3), tiny)
    again = evaluate(_config(specimens, seed=3), tiny)
    other = evaluate(_config(specimens, seed=4), tiny)
    pd.testing.assert_frame_equal(first.table, again.table)
    assert not np.array_equal(first.split.test, other.split.test)


def test_metrics_are_floats_not_strings(specimens, tiny):
    """Fault 6: accuracies are numbers in [0, 1]."""
    table = evaluate(_config(specimens), tiny).table
    for metric in METRICS:
        assert table[metric].dtype == np.float64
        assert table[metric].between(0, 1).all()


class CountingEncoder(torch.nn.Module):
    """Wraps an encoder and records the batch size of every forward call."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.batch_sizes = []

    def forward(self, images):
        self.batch_sizes.append(len(images))
        return self.encoder(images)

    def eval_transform(self):
        return self.encoder.eval_transform()


def test_images_are_embedded_in_batches(specimens, tiny):
    """Fault 5: never one image at a time."""
    manifest = read_manifest(specimens)
    counting = CountingEncoder(tiny)
    paths = manifest.table["image_path"].tolist()
    vectors, kept = embed_images(counting, paths, batch_size=16, workers=0,
                                 device=torch.device("cpu"), progress=False)
    assert vectors.shape == (len(paths), tiny.spec.embed_dim)
    assert np.array_equal(kept, np.arange(len(paths)))
    assert max(counting.batch_sizes) == 16 and len(counting.batch_sizes) == -(-len(paths) // 16)


def test_undecodable_image_is_named_or_skipped(specimens, tiny, tmp_path):
    """Fault 5: a failed image is reported by path (error) or left out and counted (skip),
    never a None in the array."""
    paths = read_manifest(specimens).table["image_path"].tolist()[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths[2] = str(broken)
    with pytest.raises(DataError, match="broken.png"):
        embed_images(tiny, paths, batch_size=4, workers=0, device=torch.device("cpu"),
                     progress=False)
    vectors, kept = embed_images(tiny, paths, batch_size=4, workers=0, device=torch.device("cpu"),
                                 missing="skip", progress=False)
    assert list(kept) == [0, 1, 3, 4, 5] and vectors.shape[0] == 5


def test_lone_queries_are_counted_per_row():
    """Fault 3 through the table: a test species with no train image is counted, not scored."""
    table = pd.DataFrame({
        "image_id": [f"{i}" for i in range(6)], "image_path": [""] * 6,
        "scientific_name": ["A a", "A a", "A b", "A b", "A c", "B d"],
        "species": ["A a", "A a", "A b", "A b", "A c", "B d"],
        "genus": ["A", "A", "A", "A", "A", "B"], "taxa": ["T"] * 6})
    vectors = torch.eye(6)
    vectors[1] = vectors[0]
    vectors[3] = vectors[2]
    split = split_manifest(table, 0.5, 0)
    split = type(split)(np.array([0, 2, 5]), np.array([1, 3, 4]), 0, 0, 0.5)
    result = evaluation_table(vectors, table, split, chunk_size=EvalConfig().chunk_size)
    row = result[(result["taxa"] == "All") & (result["level"] == "species")].iloc[0]
    assert row["n_lone"] == 1 and row["n_test"] == 3
    assert row["top1_cos"] == 1.0


def test_fused_embeddings():
    visual = torch.tensor([[3.0, 4.0]])
    text = torch.tensor([[0.0, 2.0]])
    assert torch.allclose(fuse(visual, text, "avg"), torch.tensor([[0.3, 0.9]]))
    assert torch.allclose(fuse(visual, text, "concat"), torch.tensor([[0.6, 0.8, 0.0, 1.0]]))
    assert fuse(visual, text, "visual") is visual and fuse(visual, text, "text") is text


@pytest.mark.parametrize("cache", [False, True])
def test_text_embedding_needs_a_caption_column(specimens, tiny, tmp_path, monkeypatch, cache):
    monkeypatch.setenv("TAXONCLIP_CACHE", str(tmp_path / "cache"))
    manifest = read_manifest(specimens)
    without = manifest.table.drop(columns=[c for c in ("caption",) if c in manifest.table])
    csv = tmp_path / "manifest.csv"
    without.assign(fileNameAsDelivered=without["image_path"],
                   scientificName=without["scientific_name"])[
        ["fileNameAsDelivered", "scientificName", "taxa"]].to_csv(csv, index=False)
    config = EvalConfig(data=DataConfig(data=str(csv)), embedding="avg", workers=0,
                        cache_embeddings=cache, device="cpu")
    with pytest.raises(DataError, match="needs captions"):
        evaluate(config, tiny)


def _per_image_captions(specimens, tmp_path, column: str = "caption"):
    """A manifest of the specimens whose caption is written from each image (its file and
    position), so that it says nothing of the species."""
    table = read_manifest(specimens).table
    csv = tmp_path / "per_image.csv"
    notes = [f"photo {i} of the series, shot {('indoors', 'outdoors', 'at dusk')[i % 3]}"
             for i in range(len(table))]
    table.assign(fileNameAsDelivered=table["image_path"], scientificName=table["scientific_name"],
                 **{column: notes})[["fileNameAsDelivered", "scientificName", "taxa", column]].to_csv(
        csv, index=False)
    return csv


def test_captions_written_from_each_image_feed_the_text_tower(specimens, tiny, tmp_path):
    config = EvalConfig(data=DataConfig(data=str(_per_image_captions(specimens, tmp_path))),
                        embedding="concat", workers=0, cache_embeddings=False, device="cpu")
    assert evaluate(config, tiny).table["n_test"].gt(0).all()


def test_caption_column_named_by_caption_column_feeds_the_text_tower(specimens, tiny, tmp_path):
    csv = _per_image_captions(specimens, tmp_path, column="notes")
    config = EvalConfig(data=DataConfig(data=str(csv), caption_column="notes"), embedding="text",
                        workers=0, cache_embeddings=False, device="cpu")
    assert evaluate(config, tiny).table["n_test"].gt(0).all()


def _leeds_text_config(leeds, captions, cache: bool) -> EvalConfig:
    return EvalConfig(data=DataConfig(data=str(leeds), captions=str(captions)),
                      embedding="gallery_avg", workers=0, cache_embeddings=cache, device="cpu")


def test_leeds_field_guide_captions_shape_the_gallery_each_embedded_once(leeds, tiny, monkeypatch):
    """One description per species shapes the gallery only; each distinct description goes
    through the text tower once."""
    embedded = []
    encode_text = tiny.encode_text
    monkeypatch.setattr(tiny, "encode_text", lambda texts: embedded.extend(texts) or encode_text(texts))
    table = evaluate(_leeds_text_config(leeds, leeds / "descriptions.csv", cache=False), tiny).table
    assert len(embedded) == 10 and len(set(embedded)) == 10
    species = table[(table["taxa"] == "All") & (table["level"] == "species")]
    assert species["n_classes"].item() == 10


def test_gallery_fusion_keeps_queries_visual_and_fuses_the_gallery(specimens, tiny, monkeypatch):
    """gallery_avg: the table equals one computed by hand from visual queries and a gallery of
    each image averaged with its caption."""
    config = _config(specimens, embedding="gallery_avg")
    result = evaluate(config, tiny)
    manifest = result.manifest
    visual, _ = embed_images(tiny, manifest.table["image_path"].tolist(), batch_size=16, workers=0,
                             device=torch.device("cpu"))
    captions = manifest.table["caption"].tolist()
    text = tiny.encode_text(captions).float()
    expected = evaluation_table(visual, manifest.table, result.split, chunk_size=EvalConfig().chunk_size,
                                gallery_vectors=fuse(visual, text, "avg"))
    # beside the table, the captions scored alone (taxonclip.checks): one text per species here
    assert (result.table.pop(names.CAPTION_ONLY_TOP1) == 1.0).all()
    pd.testing.assert_frame_equal(result.table, expected, check_exact=False, atol=1e-6)
    visual_only = evaluate(_config(specimens), tiny).table
    assert not result.table["top1_cos"].equals(visual_only["top1_cos"])


def test_cached_text_embeddings_follow_the_captions(leeds, tiny, tmp_path, monkeypatch):
    guide = pd.read_csv(leeds / "descriptions.csv")
    other = tmp_path / "other.csv"
    guide.assign(description=guide["commonName"]).to_csv(other, index=False)
    monkeypatch.setenv("TAXONCLIP_CACHE", str(tmp_path / "cache"))
    tiny_cached = create_model("tiny", "pretrained")
    calls = []
    real = embed_module.embed_manifest
    monkeypatch.setattr(embed_module, "embed_manifest", lambda *a, **k: calls.append(1) or real(*a, **k))

    for captions in (leeds / "descriptions.csv", other, leeds / "descriptions.csv"):
        evaluate(_leeds_text_config(leeds, captions, cache=True), tiny_cached)

    assert len(calls) == 2


def test_second_evaluation_reuses_cached_embeddings(specimens, tiny, monkeypatch):
    config = EvalConfig(data=DataConfig(data=str(specimens)), workers=0, device="cpu",
                        cache_embeddings=True)
    first = evaluate(config, tiny)
    monkeypatch.setattr("taxonclip.embed.embed_manifest",
                        lambda *a, **k: pytest.fail("embedded again instead of reusing the cache"))
    again = evaluate(config, tiny)
    pd.testing.assert_frame_equal(first.table, again.table)


def test_class_fraction_evaluates_a_seeded_subset_of_species(specimens, tiny):
    config = EvalConfig(data=DataConfig(data=str(specimens), class_fraction=0.5), workers=0,
                        cache_embeddings=False, device="cpu")
    result = evaluate(config, tiny)
    species = result.table[(result.table["taxa"] == "All") & (result.table["level"] == "species")]
    assert species["n_classes"].item() == 6
    assert result.manifest.table["species"].nunique() == 6


def test_seen_and_unseen_rows_after_training_on_a_fraction(specimens, tiny):
    manifest = read_manifest(specimens)
    seen = set(sorted(manifest.table["species"].unique())[:4])
    config = EvalConfig(data=DataConfig(data=str(specimens), class_fraction=0.5), workers=0,
                        cache_embeddings=False, device="cpu")
    table = evaluate(config, tiny, manifest, split_manifest(manifest.table, 0.2, 0),
                     seen=Seen("species", frozenset(seen))).table
    rows = {(t, level): n for t, level, n in zip(table["taxa"], table["level"], table["n_test"])}
    assert rows[("All:seen", "species")] + rows[("All:unseen", "species")] == rows[("All", "species")]
    assert rows[("All:seen", "species")] == 4 * 2


def test_chunk_size_has_its_one_default_in_eval_config():
    """knn and evaluation_table take the chunk size as a required argument: its one default is
    EvalConfig's."""
    assert inspect.signature(knn.knn_metrics).parameters["chunk_size"].default is inspect.Parameter.empty
    assert inspect.signature(evaluation_table).parameters["chunk_size"].default is inspect.Parameter.empty


def _scale_table(rows: int, seed: int) -> pd.DataFrame:
    """Rows of 3 taxa, 12 genera and 40 species, and a few rows without a genus."""
    rng = np.random.default_rng(seed)
    species = rng.integers(0, 40, rows)
    genus = pd.Series([f"g{s % 12}" for s in species], dtype=object)
    genus[rng.random(rows) < 0.05] = None
    return pd.DataFrame({"image_id": [str(i) for i in range(rows)], "image_path": [""] * rows,
                         "scientific_name": [f"s{s}" for s in species],
                         "species": [f"s{s}" for s in species], "genus": genus,
                         "taxa": [f"T{s % 3}" for s in species]})


def _in_memory_table(vectors: torch.Tensor, table: pd.DataFrame, split, seen) -> pd.DataFrame:
    """The per-taxa table as scoring computed it before the store was read in place: each row's
    queries and gallery copied out of an in-memory tensor, all at once."""
    is_train, is_test = np.zeros(len(table), bool), np.zeros(len(table), bool)
    is_train[split.train], is_test[split.test] = True, True
    is_seen = table[seen.level].isin(seen.classes).to_numpy()
    rows = []
    for scope, level in table_module.table_cells(table["taxa"].unique(), True, FEW_LEVELS):
        in_gallery, in_queries = table_module.scope_masks(scope, table, is_seen)
        known = table[level].notna().to_numpy()
        codes = torch.as_tensor(pd.factorize(table[level])[0], dtype=torch.long)
        gallery = np.flatnonzero(in_gallery & is_train & known)
        queries = np.flatnonzero(in_queries & is_test & known)
        result = knn.knn_metrics(vectors[queries], codes[queries], vectors[gallery], codes[gallery],
                                 chunk_size=EvalConfig().chunk_size)
        rows.append({"taxa": scope, "level": level, "n_test": result.n_test,
                     "n_classes": result.n_classes, "n_lone": result.n_lone, **result.metrics})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


@pytest.fixture
def one_thread():
    """Torch on one thread: many small operations, which on a busy machine would each wait for
    the slowest of the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_table_of_a_memory_mapped_store_equals_the_in_memory_reference(tmp_path, monkeypatch, dtype,
                                                                         one_thread):
    """Rows read in place from a memory-mapped store, the gallery in many blocks, give the table
    of in-memory copies, and no tensor as large as the store is ever made."""
    table = _scale_table(300, seed=3)
    vectors = torch.randn(len(table), DIM, generator=torch.Generator().manual_seed(3)).to(
        getattr(torch, np.dtype(dtype).name))
    vectors[200:230] = vectors[:30]  # exact duplicates: ties
    store = np.lib.format.open_memmap(tmp_path / "store.npy", mode="w+", dtype=dtype,
                                      shape=tuple(vectors.shape))
    store[:] = vectors.numpy()
    store.flush()
    split = split_manifest(table, 0.3, 0)
    seen = Seen("species", frozenset(f"s{s}" for s in range(0, 40, 2)))
    expected = _in_memory_table(vectors.float(), table, split, seen)
    monkeypatch.setattr(knn, "BLOCK_ELEMENTS", 32 * 50)  # chunks of 32 queries, blocks of 50 items

    mapped = torch.from_numpy(np.load(tmp_path / "store.npy", mmap_mode="r+"))
    # the most embeddings (rows of DIM values) any torch operation returns at once
    with LargestOutput(lambda t: t.shape[0] if t.ndim == 2 and t.shape[1] == DIM else None) as recorder:
        result = evaluation_table(mapped, table, split, seen=seen, chunk_size=32, levels=FEW_LEVELS)

    pd.testing.assert_frame_equal(result, expected, check_exact=True)
    assert recorder.largest <= 50  # a block of the gallery, not the 210 rows of its train split


DIM = 24  # a size no other tensor of the scoring has
FEW_LEVELS = Levels(scored=("species", "genus"), within_taxa=("species",))


def test_skipped_images_leave_the_kept_rows_in_place_in_the_store(tmp_path):
    store = np.lib.format.open_memmap(tmp_path / "store.npy", mode="w+", dtype=np.float32,
                                      shape=(10, 3))
    store[:] = np.arange(30, dtype=np.float32).reshape(10, 3)
    kept = np.array([0, 2, 3, 7, 9])
    expected = store[kept].copy()

    compacted = embed_module._compacted(store, kept, block=2)

    assert np.array_equal(compacted, expected)
    assert np.shares_memory(compacted, store)
