"""`taxonclip caption` end to end on the generated specimens: a tiny random image-text-to-text
model saved to a folder (no download), captions keyed by image, the run's record, resuming after
a crash, refused settings, bad input, and eval reading the result."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest

from taxonclip.captions import parts
from taxonclip.cli import main
from taxonclip.config import DataConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random LLaVA built from its config and saved as a model folder."""
    from taxonclip.captions.tiny import build_model_and_processor

    folder = tmp_path_factory.mktemp("tiny-vlm")
    model, processor = build_model_and_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _experiment(monkeypatch) -> str:
    name = f"caption-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return name


def _runs(experiment: str):
    import mlflow

    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def _caption(out, data, *extra) -> int:
    return main(["caption", "--out", str(out), "--data", str(data), "--workers", "0",
                 "--max_new_tokens", "6", "--batch_size", "8", *extra])


@pytest.fixture(scope="module")
def captioned(model_folder, specimens, mlflow_server, tmp_path_factory):
    """The specimens captioned once by the model folder, in a run of its own experiment."""
    out = tmp_path_factory.mktemp("captions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        experiment = _experiment(mp)
        assert _caption(out, specimens, "--model", str(model_folder), "--part_size", "20") == 0
    return out, experiment


def test_captions_are_keyed_by_image_one_row_each(captioned, specimens):
    from taxonclip.data.manifest import read_manifest

    out, _ = captioned
    table = pd.read_parquet(out / parts.CAPTIONS_FILE)
    ids = read_manifest(specimens).table["image_id"]
    assert list(table.columns[:6]) == list(parts.COLUMNS)
    assert sorted(table["image_id"]) == sorted(ids)
    assert table["image_id"].is_unique
    assert (table["template"] == "describe").all() and not table["saw_name"].any()
    assert table["caption"].str.len().gt(0).all()
    # parts of at most part_size rows, every row in exactly one of them
    sizes = [len(pd.read_parquet(p)) for p in parts.part_files(out)]
    assert max(sizes) <= 20 and sum(sizes) == len(ids)
    metadata = parts.read_metadata(out / parts.CAPTIONS_FILE)
    assert metadata["name_in_prompt"] == "none" and metadata["split"]["seed"] == 0
    assert metadata["generation"]["max_new_tokens"] == 6


def test_the_run_logs_what_it_says(captioned, mlflow_server, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    out, experiment = captioned
    mlflow.set_tracking_uri(mlflow_server)
    (run,) = _runs(experiment)
    params, metrics = run.data.params, run.data.metrics
    assert run.data.tags["taxonclip.entry"] == "caption"
    assert params["template_text"].startswith("Please provide a detailed one-sentence caption")
    assert params["revision"].startswith("files-") and params["dtype_used"] == "float32"
    assert json.loads(params["generation"])["max_new_tokens"] == 6
    assert params["split.seed"] == "0" and params["split.test_size"] == "0.2"
    table = pd.read_parquet(out / parts.CAPTIONS_FILE)
    assert metrics["caption/captions"] == metrics["caption/rows"] == len(table)
    assert metrics["caption/captioned_now"] == len(table) and metrics["caption/empty"] == 0
    assert metrics["caption/images_per_s"] > 0
    assert metrics["caption/tokens_per_s"] == pytest.approx(
        table["tokens"].sum() / metrics["caption/seconds"])
    assert metrics["caption/tokens_p50"] == np.percentile(table["tokens"], 50)
    client = MlflowClient()
    assert "caption/captions.parquet" in [a.path for a in client.list_artifacts(run.info.run_id,
                                                                                "caption")]
    sample = json.loads(open(client.download_artifacts(run.info.run_id, "caption/sample.json"))
                        .read())
    assert sample["columns"] == ["image_id", "species", "caption"]
    assert len(sample["data"]) == min(50, len(table))


def test_eval_avg_runs_on_the_captions(captioned, specimens, tracking, monkeypatch, capsys):
    out, _ = captioned
    _experiment(monkeypatch)
    assert main(["eval", "--data", str(specimens), "--embedding", "avg", "--captions",
                 str(out / parts.CAPTIONS_FILE), "--workers", "0"]) == 0
    assert "All species" in " ".join(capsys.readouterr().out.split())


def test_a_rerun_with_the_same_settings_captions_nothing_again(captioned, specimens, model_folder,
                                                               tracking, monkeypatch, capsys):
    out, _ = captioned
    before = [p.name for p in parts.part_files(out)]
    _experiment(monkeypatch)
    assert _caption(out, specimens, "--model", str(model_folder), "--part_size", "20") == 0
    assert [p.name for p in parts.part_files(out)] == before
    assert "(0 captioned now)" in capsys.readouterr().out


def test_other_settings_into_the_same_folder_are_refused(captioned, specimens, model_folder,
                                                         tracking, monkeypatch, capsys):
    out, experiment = captioned
    assert _caption(out, specimens, "--model", str(model_folder), "--max_new_tokens", "7") == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "max_new_tokens" in err and err.count("\n") == 1
    assert len(_runs(experiment)) == 1  # refused before a run


def test_a_crash_midway_keeps_what_was_captioned_and_a_rerun_fills_the_rest(
        specimens, tmp_path, tracking, monkeypatch):
    from taxonclip.captions import hf

    _experiment(monkeypatch)
    real, calls = hf.TransformersCaptioner.caption, []

    def crashing(self, images, prompts):
        calls.append(len(images))
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(self, images, prompts)

    monkeypatch.setattr(hf.TransformersCaptioner, "caption", crashing)
    with pytest.raises(RuntimeError):
        _caption(tmp_path, specimens, "--part_size", "16")
    kept = parts.read_parts(tmp_path)
    assert len(kept) == 24  # the 3 batches captioned before the crash are all kept
    assert not list((tmp_path / parts.PARTS).glob(".*"))  # no temporary file left
    monkeypatch.setattr(hf.TransformersCaptioner, "caption", real)
    assert _caption(tmp_path, specimens, "--part_size", "16") == 0
    table = pd.read_parquet(tmp_path / parts.CAPTIONS_FILE)
    assert table["image_id"].is_unique and len(table) == 96
    assert parts.read_parts(tmp_path)["image_id"].is_unique  # nothing captioned twice
    # (that a resumed job's captions are an uninterrupted job's: the slow SIGKILL test)


def _queries(specimens) -> set[str]:
    """The test and validation image ids of eval's split, computed here independently."""
    from taxonclip.data.manifest import read_manifest
    from taxonclip.data.splits import make_split

    table = read_manifest(specimens).table
    split = make_split(table, DataConfig(data=str(specimens)))
    rows = np.union1d(split.test, getattr(split, "val", np.empty(0, int)))
    return set(table["image_id"].iloc[rows])


def test_gallery_names_never_reach_a_query_prompt(specimens, tmp_path, tracking, monkeypatch):
    from taxonclip.data.manifest import read_manifest

    _experiment(monkeypatch)
    assert _caption(tmp_path, specimens, "--template", "named",
                    "--name_in_prompt", "gallery") == 0
    table = pd.read_parquet(tmp_path / parts.CAPTIONS_FILE)
    names = read_manifest(specimens).table.set_index("image_id")["scientific_name"]
    named = [names[i] in prompt for i, prompt in zip(table["image_id"], table["prompt"])]
    table = table.assign(named=named, query=table["image_id"].isin(_queries(specimens)))
    assert table["query"].any() and not table.loc[table["query"], "named"].any()
    assert not table.loc[table["query"], "saw_name"].any()
    assert table.loc[~table["query"], "named"].all()  # every gallery row did see its name
    assert (table["named"] == table["saw_name"]).all()


def test_eval_refuses_a_file_where_a_query_saw_its_name(specimens, tmp_path, tracking,
                                                        monkeypatch, capsys):
    _experiment(monkeypatch)
    assert _caption(tmp_path, specimens, "--template", "named",
                    "--name_in_prompt", "gallery") == 0
    file = tmp_path / parts.CAPTIONS_FILE
    eval_args = ["eval", "--data", str(specimens), "--embedding", "avg", "--workers", "0"]
    assert main([*eval_args, "--captions", str(file), "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert "seed=0" in err and "seed=3" in err  # both splits named
    # a file doctored so that one query row saw its name
    import pyarrow.parquet as pq

    table = pq.read_table(file)
    frame = table.to_pandas()
    query = sorted(_queries(specimens))[0]
    frame.loc[frame["image_id"] == query, "saw_name"] = True
    doctored = tmp_path / "doctored.parquet"
    pq.write_table(pa_table(frame, table.schema.metadata), doctored)
    assert main([*eval_args, "--captions", str(doctored)]) == 1
    assert query in capsys.readouterr().err


def pa_table(frame, metadata):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(metadata)


def test_gallery_needs_a_split(specimens, tmp_path, capsys):
    assert _caption(tmp_path, specimens, "--template", "named", "--name_in_prompt", "gallery",
                    "--split", "official") == 1
    err = capsys.readouterr().err
    assert "name_in_prompt=gallery" in err and "split" in err
    assert not (tmp_path / parts.SETTINGS_FILE).exists()


def test_a_named_template_without_gallery_is_refused(specimens, tmp_path, capsys):
    assert _caption(tmp_path, specimens, "--template", "named") == 1
    assert "name_in_prompt=none" in capsys.readouterr().err


def test_an_undecodable_image_stops_naming_its_row_or_is_skipped(specimens, tmp_path, tracking,
                                                                 monkeypatch, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(specimens, data)
    broken = sorted(data.glob("*/images/*.png"))[-1]  # in the last batch
    broken.write_bytes(broken.read_bytes()[:120])  # the header reads, the pixels do not
    image_id = broken.relative_to(data).as_posix()
    out = tmp_path / "out"
    _experiment(monkeypatch)
    assert _caption(out, data, "--part_size", "8") == 1
    err = capsys.readouterr().err
    assert image_id in err and "missing=skip" in err
    # the truncated file is found when the data is read, before any image is captioned
    assert parts.read_parts(out).empty
    assert _caption(out, data, "--part_size", "8", "--missing", "skip") == 0
    table = pd.read_parquet(out / parts.CAPTIONS_FILE)
    assert image_id not in set(table["image_id"]) and len(table) == 95


def test_empty_captions_are_counted_and_listed(specimens, tmp_path, tracking, monkeypatch,
                                               capsys):
    from taxonclip.captions import hf
    from taxonclip.captions.base import Generated

    experiment = _experiment(monkeypatch)
    real = hf.TransformersCaptioner.caption

    def some_empty(self, images, prompts):
        made = real(self, images, prompts)
        return [Generated("", 1), *made[1:]]

    monkeypatch.setattr(hf.TransformersCaptioner, "caption", some_empty)
    assert _caption(tmp_path, specimens) == 0
    assert "12 of 96 captions are empty" in capsys.readouterr().err
    (run,) = _runs(experiment)
    assert run.data.metrics["caption/empty"] == 12
    table = pd.read_parquet(tmp_path / parts.CAPTIONS_FILE)
    assert (table["caption"] == "").sum() == 12


def test_a_missing_model_says_what_to_place_where(specimens, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _caption(tmp_path / "out", specimens, "--model", "HuggingFaceTB/SmolVLM-256M") == 1
    err = capsys.readouterr().err
    assert "models--HuggingFaceTB--SmolVLM-256M" in err and str(tmp_path / "hub") in err


def test_a_model_without_an_image_text_to_text_head_is_refused(specimens, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(folder)
    assert _caption(tmp_path / "out", specimens, "--model", str(folder)) == 1
    err = capsys.readouterr().err
    assert "no image-text-to-text head" in err or "cannot load" in err
    assert err.count("\n") == 1


def test_slurm_array_tasks_caption_their_shares_and_the_last_one_merges(
        specimens, tmp_path, tracking, monkeypatch):
    experiment = _experiment(monkeypatch)
    out = tmp_path / "array"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert _caption(out, specimens) == 0
    assert not (out / parts.CAPTIONS_FILE).exists() and not _runs(experiment)
    assert {p.name.split("-")[1] for p in parts.part_files(out)} == {"00001"}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert _caption(out, specimens, "--workers", "1") == 0  # a DataLoader worker decodes
    (run,) = _runs(experiment)  # the merge's run
    assert run.data.params["launcher"] == "slurm-array" and run.data.params["shares"] == "2"
    for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name)
    single = tmp_path / "single"
    assert _caption(single, specimens) == 0
    a = pd.read_parquet(out / parts.CAPTIONS_FILE)
    b = pd.read_parquet(single / parts.CAPTIONS_FILE)
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert a["caption"].tolist() == b["caption"].tolist()


def test_treeoflife_shards_are_captioned_by_key_without_a_prepare(tmp_path, tracking, monkeypatch):
    """TreeOfLife-10M's shards are read directly: each image by its key in its shard."""
    from taxonclip.data import treeoflife
    from taxonclip.data.manifest import read_manifest

    train, _ = treeoflife.fixture_patterns(treeoflife.write_fixture(tmp_path / "tol", size=16))
    _experiment(monkeypatch)
    out = tmp_path / "out"
    assert _caption(out, train) == 0
    table = pd.read_parquet(out / parts.CAPTIONS_FILE)
    ids = read_manifest(train).table["image_id"]
    assert sorted(table["image_id"]) == sorted(ids) and table["image_id"].is_unique
    assert table["caption"].str.len().gt(0).all()
