"""`taxonclip data prepare` and reading prepared shards: the folder train and eval read, its
tables against the unprepared images, byte-identical reruns after a kill, and the seeded,
disjoint split of shards across ranks and workers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import DataConfig, EvalConfig
from taxonclip.data.bioscan import write_fixture
from taxonclip.data.manifest import read_manifest
from taxonclip.data.prepare import PrepareSettings, encode_image, prepare
from taxonclip.data.shards import SHARD_FOLDER, shard_name
from taxonclip.data.streams import (Decoded, ShardedRows, ShardStream, batches_per_rank,
                                    epoch_shards, jpeg_decoder)
from taxonclip.data.synthetic import default_dataset, generate
from taxonclip.errors import DataError
from taxonclip.embed import embed_manifest
from taxonclip.evaluation import evaluate
from taxonclip.models import create_model
from tests.helpers import sqlite_tracking


def _prepared(source: Path, out: Path, **settings) -> Path:
    prepare(read_manifest(source), out, PrepareSettings(**settings), workers=1, progress=False)
    return out


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of every shard of a prepared folder."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted((folder / SHARD_FOLDER).glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples


def _eval_table(data: Path, encoder: torch.nn.Module | None = None) -> pd.DataFrame:
    config = EvalConfig(data=DataConfig(data=str(data)), workers=0, cache_embeddings=False)
    return evaluate(config, encoder or create_model("tiny", "pretrained")).table


def test_tiny_images_are_unchanged_by_a_size_at_least_theirs(specimens, tmp_path):
    folder = _prepared(specimens, tmp_path / "prepared", size=32, shard_size=10)
    source = read_manifest(specimens).table
    samples = _samples(folder)
    assert len(samples) == len(source)
    manifest = pd.read_parquet(folder / "manifest.parquet")
    for key, path in zip(manifest["key"], source["image_path"]):
        assert samples[key]["png"] == Path(path).read_bytes()
        assert json.loads(samples[key]["json"])["image_id"] == \
            source.set_index("image_path").loc[path, "image_id"]


def test_a_larger_image_is_resized_to_its_short_side_and_never_enlarged():
    image = Image.new("RGB", (300, 200), (10, 200, 30))
    data = io.BytesIO()
    image.save(data, format="JPEG")
    extension, encoded, resized = encode_image(data.getvalue(), PrepareSettings(size=50))
    assert (extension, resized) == ("jpg", True)
    assert Image.open(io.BytesIO(encoded)).size == (75, 50)
    kept = encode_image(data.getvalue(), PrepareSettings(size=200))
    assert kept == ("jpg", data.getvalue(), False)
    webp = encode_image(data.getvalue(), PrepareSettings(size=50, image_format="webp"))
    assert webp[0] == "webp" and Image.open(io.BytesIO(webp[1])).size == (75, 50)


class _MeanColours(torch.nn.Module):
    """A fixed encoder: the mean colour of each cell of an 8 x 8 grid. It tells the generated
    species apart well above chance, so its table moves only where the images do (a random
    model sits at chance among near-ties, where any change of a pixel swaps neighbours)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)


def test_prepared_table_is_within_a_point_of_the_unprepared_one(tmp_path):
    # the generated set's 64 px images prepared at 48 px: resized and re-encoded as JPEG
    source = default_dataset()
    folder = _prepared(source, tmp_path / "prepared", size=48, shard_size=500)
    tiny = create_model("tiny", "pretrained")
    config = EvalConfig(workers=0)
    original = embed_manifest(tiny, read_manifest(source), config, torch.device("cpu")).queries
    prepared = embed_manifest(tiny, read_manifest(folder), config, torch.device("cpu")).queries
    assert torch.nn.functional.cosine_similarity(original, prepared).min() > 0.999
    colours = create_model("tiny", "pretrained")
    colours.visual = _MeanColours()
    tables = [_eval_table(data, encoder=colours) for data in (source, folder)]
    assert tables[0]["top1_cos"].min() > 0.2, "the encoder must tell species apart"
    assert tables[1][["taxa", "level", *names.COUNT_COLUMNS]].equals(
        tables[0][["taxa", "level", *names.COUNT_COLUMNS]])
    difference = (tables[1][list(names.SCORES)] - tables[0][list(names.SCORES)]).abs()
    overall = (tables[0]["taxa"] == names.ALL_TAXA).to_numpy()
    assert difference[overall].to_numpy().max() <= 0.01, difference
    # a taxa row has 120 queries, and mean colours leave near ties at rank 3 (top3_cos): at most
    # three of its queries may change
    queries = tables[0]["n_test"].to_numpy()[~overall, None]
    assert (difference[~overall].to_numpy() * queries <= 3 + 1e-9).all(), difference


def test_prepare_then_eval_and_train_read_the_folder(specimens, tmp_path, monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path, "prepared")
    folder = tmp_path / "prepared"
    assert main(["data", "prepare", str(specimens), "--out", str(folder), "--size", "tiny",
                 "--shard_size", "16", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "shards: 6 written, 0 already up to date" in printed and "images: 96" in printed
    assert main(["data", "check", str(folder)]) == 0
    assert "images: 6 shards prepared from" in capsys.readouterr().out
    assert main(["eval", "--model", "tiny", "--data", str(folder), "--workers", "2"]) == 0
    shown = capsys.readouterr().out
    assert main(["eval", "--model", "tiny", "--data", str(specimens), "--workers", "0"]) == 0
    assert shown.split("MLflow run")[0] == capsys.readouterr().out.split("MLflow run")[0], \
        "images kept as they were must give the unprepared table exactly"
    assert main(["train", "--model", "tiny", "--data", str(folder), "--epochs", "2",
                 "--batch_size", "8", "--workers", "2", "--lr", "1e-3"]) == 0
    import mlflow

    run = mlflow.search_runs(experiment_names=["prepared"], filter_string="params.data != ''",
                             order_by=["start_time DESC"]).iloc[0]
    assert run["params.data"] == str(folder) and run["status"] == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run["run_id"], names.TRAIN_LOSS)
    # 76 of 96 rows are not test, 0.1 of them validate (68 train); 2 workers drop a partial batch each
    steps_per_epoch = 68 // 8
    assert len(history) in range(2 * (steps_per_epoch - 2), 2 * steps_per_epoch + 1)
    assert np.isfinite(run[f"metrics.eval/{names.HEADLINE_METRIC}"])


def test_a_rerun_keeps_what_is_up_to_date_and_refuses_other_settings(specimens, tmp_path):
    folder = _prepared(specimens, tmp_path / "prepared", size=32, shard_size=40)
    again = prepare(read_manifest(specimens), folder, PrepareSettings(size=32, shard_size=40),
                    workers=1, progress=False)
    assert (again.shards_written, again.shards_kept) == (0, 3)
    with pytest.raises(DataError, match="other settings.*settings"):
        prepare(read_manifest(specimens), folder, PrepareSettings(size=24, shard_size=40),
                workers=1, progress=False)


def test_a_changed_source_image_rewrites_its_shard_only(tmp_path):
    source = generate(tmp_path / "source", seed=0, taxa=1, genera=2, species=2, images=10, size=32)
    folder = _prepared(source, tmp_path / "prepared", size=32, shard_size=10)
    before = {p.name: p.read_bytes() for p in (folder / SHARD_FOLDER).glob("*.tar")}
    first = read_manifest(source).table["image_path"].iloc[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(first)
    result = prepare(read_manifest(source), folder, PrepareSettings(size=32, shard_size=10),
                     workers=1, progress=False)
    assert (result.shards_written, result.shards_kept) == (1, 3)
    after = {p.name: p.read_bytes() for p in (folder / SHARD_FOLDER).glob("*.tar")}
    assert [name for name in before if before[name] != after[name]] == [shard_name(0)]


def _prepare_command(source: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "taxonclip", "data", "prepare", str(source), "--out", str(out),
            "--size", "24", "--shard_size", "4", "--workers", str(workers)]


@pytest.fixture(scope="module")
def kill_source(tmp_path_factory) -> Path:
    """192 images of 128 px for 48 shards, and their prepare run straight through."""
    root = tmp_path_factory.mktemp("kill")
    source = generate(root / "source", seed=2, taxa=2, genera=2, species=3, images=16, size=128)
    prepare(read_manifest(source), root / "whole", PrepareSettings(size=24, shard_size=4),
            workers=1, progress=False)
    return source


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_prepare_killed_part_way_and_rerun_gives_the_same_shards(kill_source, tmp_path, workers):
    whole, resumed = kill_source.parent / "whole", tmp_path / "resumed"
    process = subprocess.Popen(_prepare_command(kill_source, resumed, workers),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((resumed / SHARD_FOLDER).glob("*.tar"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "the prepare wrote no shard in time"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list((resumed / SHARD_FOLDER).glob("*.tar")))
    assert 3 <= written < 48, f"the kill came after {written} of 48 shards"
    with pytest.raises(DataError, match="unfinished prepare"):
        read_manifest(resumed)
    time.sleep(0.5)  # a pool worker of the killed prepare is ended with it
    subprocess.run(_prepare_command(kill_source, resumed, workers), check=True, capture_output=True)
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    assert not any(name.suffix == ".partial" for name in files)
    for name in files:
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name


def test_a_changed_shard_is_refused_naming_it(specimens, tmp_path):
    folder = _prepared(specimens, tmp_path / "prepared", size=32, shard_size=40)
    with open(folder / SHARD_FOLDER / shard_name(1), "ab") as shard:
        shard.write(b"\0" * 512)
    with pytest.raises(DataError, match=r"shard-000001.tar has \d+ bytes, the record"):
        read_manifest(folder)


def test_a_shard_url_pattern_reads_as_the_prepared_folder(specimens, tmp_path):
    folder = _prepared(specimens, tmp_path / "prepared", size=32, shard_size=40)
    pattern = str(folder / SHARD_FOLDER / "shard-{000000..000002}.tar")
    by_pattern, by_folder = read_manifest(pattern), read_manifest(folder)
    columns = ["image_id", "scientific_name", "species", "genus", "taxa"]
    assert by_pattern.table[columns].equals(by_folder.table[columns])
    assert _eval_table(Path(pattern)).equals(_eval_table(folder))
    with pytest.raises(DataError, match="shard-000008.tar: No such file"):
        read_manifest(str(folder / SHARD_FOLDER / "shard-{000008..000009}.tar"))


def test_bioscan_prepared_keeps_every_rank_and_the_official_split(tmp_path):
    source = write_fixture(tmp_path / "bioscan", seed=0, size=32)
    folder = _prepared(source, tmp_path / "prepared", size=32, shard_size=25)
    manifest = read_manifest(folder)
    assert manifest.levels == names.BIOSCAN_LEVELS
    config = EvalConfig(data=DataConfig(data=str(folder), split="official"), workers=0,
                        cache_embeddings=False)
    table = evaluate(config, create_model("tiny", "pretrained")).table
    unprepared = evaluate(EvalConfig(data=DataConfig(data=str(source), split="official"),
                                     workers=0, cache_embeddings=False),
                          create_model("tiny", "pretrained")).table
    assert table.equals(unprepared)
    assert {"All:seen", "All:unseen"} <= set(table["taxa"])
    assert set(names.BIOSCAN_LEVELS.scored) == set(table.loc[table["taxa"] == "All", "level"])


def _stream_rows(per_shard: list[int]) -> ShardedRows:
    shard = np.repeat(np.arange(len(per_shard)), per_shard)
    return ShardedRows(tuple(f"s{i}" for i in range(len(per_shard))), shard,
                       np.array([f"{i:04d}" for i in range(len(shard))]), np.arange(len(shard)))


def test_epoch_shards_are_seeded_disjoint_and_cover_every_shard_with_rows():
    per_shard = np.array([5, 0, 7, 3, 9, 4, 6])
    ranks = epoch_shards(per_shard, seed=3, epoch=1, world_size=3)
    assert ranks == epoch_shards(per_shard, seed=3, epoch=1, world_size=3)
    assert ranks != epoch_shards(per_shard, seed=3, epoch=2, world_size=3)
    dealt = [s for shards in ranks for s in shards]
    assert sorted(dealt) == [0, 2, 3, 4, 5, 6]
    assert batches_per_rank(per_shard, ranks, workers=2, batch_size=2) == [
        sum(int(per_shard[shards[w::2]].sum()) // 2 for w in range(2)) for shards in ranks]


def test_each_worker_reads_its_own_shards_in_a_seeded_order(specimens, tmp_path):
    folder = _prepared(specimens, tmp_path / "prepared", size=32, shard_size=10)
    manifest = read_manifest(folder)
    wanted = np.arange(0, len(manifest.table), 2)
    rows = ShardedRows.of(manifest.table, manifest.shards, wanted, labels=wanted)
    stream = ShardStream(rows, Decoded(lambda image: torch.zeros(1)))

    def order(seed: str) -> list[int]:
        stream.select(range(len(manifest.shards)), shuffle_seed=seed)
        loader = DataLoader(stream, batch_size=4, num_workers=2)
        return [int(p) for _, _, positions in loader for p in positions]

    first = order("0:0:0")
    assert first == order("0:0:0") and first != order("0:1:0")
    assert sorted(first) == list(range(len(wanted))), "every wanted row once, no other row"
    planned = batches_per_rank(rows.per_shard(), [list(range(len(manifest.shards)))], 2, 4)
    stream.select(range(len(manifest.shards)), shuffle_seed="x")
    loader = DataLoader(stream, batch_size=4, num_workers=2, drop_last=True)
    assert sum(1 for _ in loader) == planned[0]


def test_decoding_on_the_device_gives_the_embeddings_of_decoding_in_workers(tmp_path):
    # JPEGs (96 px images prepared at 40 px): torchvision decodes and transforms them as tensors
    source = generate(tmp_path / "source", seed=3, taxa=1, genera=2, species=3, images=8, size=96)
    manifest = read_manifest(_prepared(source, tmp_path / "prepared", size=40, shard_size=16))
    tiny = create_model("tiny", "pretrained")
    in_workers = embed_manifest(tiny, manifest, EvalConfig(workers=2), torch.device("cpu"))
    on_device = embed_manifest(tiny, manifest, EvalConfig(workers=2, decode="device"),
                               torch.device("cpu"))
    assert np.array_equal(in_workers.kept, on_device.kept)
    similarity = torch.nn.functional.cosine_similarity(in_workers.queries, on_device.queries)
    assert similarity.min() > 0.9999


def test_train_decodes_on_the_device_and_refuses_it_for_image_files(specimens, tmp_path,
                                                                   monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path)
    folder = _prepared(specimens, tmp_path / "prepared", size=24, shard_size=16)
    args = ["--model", "tiny", "--epochs", "1", "--batch_size", "8", "--workers", "2",
            "--decode", "device"]
    assert main(["train", "--data", str(folder), *args]) == 0
    assert main(["train", "--data", str(specimens), *args]) == 1
    assert "decode=device decodes the JPEGs of prepared shards" in capsys.readouterr().err


def test_torchcodec_and_its_torchvision_fallback_decode_the_same_pixels(monkeypatch):
    image = Image.new("RGB", (40, 30))
    image.putdata([(x * 6 % 256, y * 8 % 256, (x + y) % 256) for y in range(30) for x in range(40)])
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=90)
    encoded = [torch.frombuffer(bytearray(data.getvalue()), dtype=torch.uint8)] * 2
    codec = jpeg_decoder()(encoded, mode="RGB", device="cpu")
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if it were not installed
    fallback = jpeg_decoder()
    assert fallback.__name__ == "_torchvision_decode_jpeg"
    vision = fallback(encoded, mode="RGB", device="cpu")
    assert len(codec) == len(vision) == 2
    assert all(torch.equal(a, b) for a, b in zip(codec, vision))
    assert codec[0].shape == (3, 30, 40)


@pytest.mark.slow
def test_bioscan_trains_from_its_shards_on_any_rank(tmp_path, monkeypatch):
    sqlite_tracking(monkeypatch, tmp_path, "bioscan-shards")
    folder = _prepared(write_fixture(tmp_path / "bioscan", seed=0, size=32), tmp_path / "prepared",
                       size=32, shard_size=20)
    assert main(["train", "--model", "tiny", "--data", str(folder), "--split", "official",
                 "--label", "family", "--epochs", "1", "--batch_size", "8", "--workers", "2",
                 "--metric", "All:unseen/genus/top1_cos"]) == 0
    import mlflow

    run = mlflow.search_runs(experiment_names=["bioscan-shards"]).iloc[0]
    assert run["params.label"] == "family" and run["status"] == "FINISHED"
    for cell in ("All/phylum/top1_cos", "All/species/top1_cos", "All:unseen/genus/top1_cos"):
        assert np.isfinite(run[f"metrics.eval/{cell}"]), cell


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def test_bad_shards_and_folders_are_named(specimens, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty and holds no prepare"):
        prepare(read_manifest(specimens), taken, PrepareSettings(size=32), workers=1, progress=False)
    assert (taken / "notes.txt").read_text() == "mine"
    unlabelled = _tar(tmp_path / "unlabelled.tar", {"a1.jpg": b"\xff\xd8", "a2.json": b"{}"})
    with pytest.raises(DataError, match=r"shard .*unlabelled.tar has the keys jpg: neither"):
        read_manifest(str(unlabelled))
    with pytest.raises(DataError, match=r"sample 'a1' of shard .*unlabelled.tar has no .json row"):
        read_manifest(str(unlabelled), format="prepared")
    no_taxa = _tar(tmp_path / "no_taxa.tar", {"a1.jpg": b"\xff\xd8",
                                               "a1.json": b'{"scientific_name": "Aus bus"}'})
    with pytest.raises(DataError, match="no 'taxa' in their .json rows; name the taxa"):
        read_manifest(str(no_taxa))
    assert read_manifest(str(no_taxa), taxa="Insects").table["genus"].tolist() == ["Aus"]


def test_the_rows_json_is_the_same_however_many_rows_a_block_holds(monkeypatch):
    from taxonclip.data import prepare as preparing

    table = pd.DataFrame({"image_path": [f"{i}.jpg" for i in range(23)],
                          "scientific_name": [f"Danaus sp{i % 4}" for i in range(23)],
                          "caption": [None if i % 3 else f"text {i}" for i in range(23)],
                          "size": np.arange(23, dtype=np.int64)})
    whole = preparing._json_rows(table)
    monkeypatch.setattr(preparing, "_JSON_BLOCK_ROWS", 5)

    assert preparing._json_rows(table) == whole
    assert [json.loads(row) for row in whole] == [
        {"scientific_name": f"Danaus sp{i % 4}", "caption": None if i % 3 else f"text {i}", "size": i}
        for i in range(23)]
