"""The pieces of `taxonclip caption` alone: templates, shares, part files, keyed captions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from taxonclip.captions import parts
from taxonclip.captions.shares import SINGLE, SLURM_ARRAY, TORCHRUN, Share, batches_of_share, from_env
from taxonclip.captions.templates import load_template
from taxonclip.errors import ConfigError, DataError


def test_the_shipped_templates_are_the_groups_two_prompts():
    named = load_template("named", None)
    assert named.fields == ("scientific_name",) and named.without_name.name == "describe"
    assert named.fill({"scientific_name": "Danaus plexippus"}).startswith(
        "This is an image of Danaus plexippus. Please provide a detailed one-sentence caption")
    assert not load_template("describe", None).names_label


@pytest.mark.parametrize("text, message", [
    ("A photo of {scientific_nmae}.", "unknown field(s) {scientific_nmae}"),
    ("A photo of {genus", "template 'bad'"),
])
def test_a_template_with_an_unknown_field_is_refused(tmp_path, text, message):
    file = tmp_path / "t.yaml"
    file.write_text(f"templates:\n  bad:\n    text: {text!r}\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("{", r"\{")):
        load_template("bad", str(file))


def test_a_named_template_needs_a_name_free_fallback(tmp_path):
    file = tmp_path / "t.yaml"
    file.write_text("templates:\n  a: {text: 'of {genus}'}\n  b: {text: 'of {genus}', "
                    "without_name: a}\n")
    with pytest.raises(ConfigError, match="without_name"):
        load_template("a", str(file))
    with pytest.raises(ConfigError, match="a name again"):
        load_template("b", str(file))
    with pytest.raises(ConfigError, match="no template 'c'"):
        load_template("c", str(file))


def test_shares_come_from_torchrun_or_a_slurm_array():
    assert from_env({}) == Share(0, 1, SINGLE)
    assert from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Share(1, 2, TORCHRUN)
    assert from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5",
                     "SLURM_ARRAY_TASK_COUNT": "3"}) == Share(2, 3, SLURM_ARRAY)
    with pytest.raises(ConfigError, match="not a share"):
        from_env({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert Share(0, 2, TORCHRUN).leads and not Share(0, 2, SLURM_ARRAY).leads


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shares_are_disjoint_cover_every_row_and_keep_the_batches(count):
    order = list(np.random.default_rng(0).permutation(50))
    shares = [batches_of_share(order, 4, Share(k, count)) for k in range(count)]
    rows = [row for share in shares for batch in share for row in batch]
    assert sorted(rows) == list(range(50))
    whole = batches_of_share(order, 4, Share(0, 1))
    assert sorted(map(tuple, (b for s in shares for b in s))) == sorted(map(tuple, whole))


def test_parts_are_written_whole_and_numbered_on(tmp_path):
    writer = parts.PartWriter(tmp_path, share=1, part_size=3)
    row = {"image_id": "x", "caption": "c", "template": "t", "model": "m", "revision": "r",
           "saw_name": False, "prompt": "p", "tokens": 2, "status": parts.OK}
    writer.add([{**row, "image_id": f"i{k}"} for k in range(7)])
    assert [p.name for p in parts.part_files(tmp_path)] == ["part-00001-000000.parquet",
                                                            "part-00001-000001.parquet"]
    writer.flush()
    again = parts.PartWriter(tmp_path, share=1, part_size=3)
    assert again.next_number == 3
    assert sorted(parts.read_parts(tmp_path)["image_id"]) == [f"i{k}" for k in range(7)]
    merged = parts.merge(tmp_path, {"k": 1}, [f"i{k}" for k in reversed(range(7))])
    assert merged["image_id"].tolist() == [f"i{k}" for k in reversed(range(7))]
    assert parts.read_metadata(tmp_path / parts.CAPTIONS_FILE) == {"k": 1}


def test_settings_that_differ_are_named(tmp_path):
    parts.check_settings(tmp_path, {"model": "a", "dtype": "float32"})
    parts.check_settings(tmp_path, {"model": "a", "dtype": "float32"})
    with pytest.raises(ConfigError, match="dtype: 'float32' there, 'bfloat16' now"):
        parts.check_settings(tmp_path, {"model": "a", "dtype": "bfloat16"})


def test_keyed_captions_need_every_image(specimens, tmp_path):
    from taxonclip.config import DataConfig
    from taxonclip.data.manifest import load_manifest

    ids = load_manifest(DataConfig(data=str(specimens))).table["image_id"]
    file = tmp_path / "captions.csv"
    pd.DataFrame({"image_id": ids[1:], "caption": "a text"}).to_csv(file, index=False)
    with pytest.raises(DataError, match=f"no caption for 1 of {len(ids)} images"):
        load_manifest(DataConfig(data=str(specimens), captions=str(file)))
    pd.DataFrame({"image_id": ids, "caption": [f"text {i}" for i in range(len(ids))]}).to_csv(
        file, index=False)
    table = load_manifest(DataConfig(data=str(specimens), captions=str(file))).table
    assert table["caption"].tolist() == [f"text {i}" for i in range(len(ids))]
    assert "caption_saw_name" not in table.columns  # not written by taxonclip caption


def test_train_reads_captions_keyed_by_image_and_checks_them(specimens, tmp_path):
    """train's data preparation joins per-image captions and refuses one a query saw."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from taxonclip.config import DataConfig, TrainConfig
    from taxonclip.data.manifest import load_manifest
    from taxonclip.data.splits import make_split
    from taxonclip.training.data import prepare_data

    table = load_manifest(DataConfig(data=str(specimens))).table
    test_rows = make_split(table, DataConfig(data=str(specimens))).test
    frame = pd.DataFrame({"image_id": table["image_id"], "caption": "words",
                          "template": "describe", "model": "m", "revision": "r",
                          "saw_name": False})
    frame.loc[test_rows[0], "saw_name"] = True
    metadata = {parts.METADATA_KEY: b'{"split": {"split": "seeded", "seed": 0, "test_size": 0.2,'
                                    b' "group_column": null, "val_size": 0.1}}'}
    file = tmp_path / "captions.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False)
                   .replace_schema_metadata(metadata), file)
    config = TrainConfig(data=DataConfig(data=str(specimens), captions=str(file)),
                         embedding="avg", batch_size=8)
    with pytest.raises(DataError, match=table["image_id"].iat[test_rows[0]]):
        prepare_data(config)
    frame["saw_name"] = False
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False)
                   .replace_schema_metadata(metadata), file)
    data = prepare_data(config)
    assert data.manifest.table["caption_saw_name"].dtype == bool


@pytest.mark.slow  # builds the model and starts the loop twice: seconds on a busy machine
def test_the_caption_benchmark_prints_its_table(capsys):
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("caption_throughput",
                                                  REPO / "bench" / "caption_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--images", "4", "--batch", "2", "--max-new-tokens", "2", "--workers", "0"])
    out = capsys.readouterr().out
    assert "| group's loop (1 image per call) |" in out and "| taxonclip caption (batch 2) |" in out


def test_generated_tokens_begin_after_the_repeated_prompt():
    import torch

    from taxonclip.captions.hf import _generated_count, _prompt_length

    prompt = torch.tensor([[0, 5, 6, 7], [8, 5, 6, 7]])
    decoder_only = torch.tensor([[0, 5, 6, 7, 9, 2], [8, 5, 6, 7, 9, 9]])
    assert _prompt_length(decoder_only, prompt) == 4
    blip = torch.tensor([[0, 5, 6, 9, 9], [8, 5, 6, 9, 2]])  # the separator 7 is dropped
    assert _prompt_length(blip, prompt) == 3
    assert _generated_count(torch.tensor([9, 9, 2, 0, 0]), {2}) == 3
    assert _generated_count(torch.tensor([9, 9, 9]), {2}) == 3
