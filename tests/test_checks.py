"""Text scored for what it knows: the name check catches captions that name a row's label at
any rank, by its words, by its common name, in any case or punctuation; the caption-only gauge
scores the captions alone beside every text-mode table and refuses, before any run, captions in
a query that know the label better than the images do."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.checks import caption_vectors, label_revealing_captions
from taxonclip.cli import main
from taxonclip.config import DataConfig, EvalConfig, ModelConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.errors import DataError
from taxonclip.evaluation import evaluate
from taxonclip.models import create_model

MONARCH = {"scientific_name": "Danaus plexippus", "species": "Danaus plexippus",
           "genus": "Danaus", "commonName": "Monarch"}
ZEBRA = {"scientific_name": "Heliconius charitonius", "species": "Heliconius charitonius",
         "genus": "Heliconius", "commonName": "Zebra Longwing"}
HONEST = ["orange wings with black veins, photo 11", "resting on a leaf, photo 12",
          "wings spread, bright orange, photo 13", "black and yellow stripes, photo 14",
          "long narrow wings in flight, photo 15", "on a white flower, photo 16"]


def _butterflies(captions: list[str]) -> pd.DataFrame:
    return pd.DataFrame([MONARCH] * 3 + [ZEBRA] * 3).assign(caption=captions)


@pytest.mark.parametrize("leak", [
    "Monarch butterfly, photo 12",           # the common name, worded per image
    "a plexippus on a flower",               # the epithet alone
    "Danaus, wings spread",                  # the genus alone
    "DANAUS_PLEXIPPUS-3.jpg",                # case and punctuation
    "a danausplexippus in flight",           # the name run together
    "monarch!",                              # the common name in another case
])
def test_a_caption_naming_its_label_any_way_is_caught(leak):
    assert label_revealing_captions(_butterflies(HONEST)) is None
    captions = [leak, *HONEST[1:]]
    assert "names the image's own label in 1 of 6 rows (e.g. row 1" in label_revealing_captions(
        _butterflies(captions))


def test_another_species_common_name_words_and_short_words_are_not_names():
    # "zebra longwing" is ZEBRA's name, not MONARCH's; "a" and "sp" name nothing
    captions = ["like a zebra longwing, photo 1", "sp. a b, photo 2", *HONEST[2:]]
    assert label_revealing_captions(_butterflies(captions)) is None


def test_caption_vectors_are_unit_rows_of_words_and_character_grams():
    vectors = caption_vectors(["orange wings", "Orange-wings!", "blue body", ""])
    assert vectors.shape[0] == 4
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    assert float(unit[0] @ unit[1]) == pytest.approx(1.0)  # case and punctuation do not count
    assert float(unit[0] @ unit[2]) < 0.5


def _coded_manifest(specimens, tmp_path, captions_for, **extra) -> str:
    """The specimens as a manifest CSV whose captions `captions_for(species index, row)` write."""
    table = read_manifest(specimens).table
    codes = {name: i for i, name in enumerate(sorted(table["scientific_name"].unique()))}
    frame = pd.DataFrame({"fileNameAsDelivered": table["image_path"],
                          "scientificName": table["scientific_name"], "taxa": table["taxa"],
                          "caption": [captions_for(codes[name], row) for row, name in
                                      enumerate(table["scientific_name"])], **extra})
    path = tmp_path / "manifest.csv"
    frame.to_csv(path, index=False)
    return str(path)


def _code_words(species: int, row: int) -> str:
    """A different wording per image, and a per-species code that is no name."""
    code = f"kx{species}q"
    return (f"{code} specimen, photo {row}" if row % 2 else f"photo {row} shows a {code} at rest")


def _honest(species: int, row: int) -> str:
    """Words drawn per image, whatever the species."""
    rng = np.random.default_rng(row)
    words = rng.choice(["round", "long", "striped", "spotted", "dark", "pale", "small", "wide"], 3)
    return f"{' '.join(words)} shape, photo {row}"


def _config(manifest: str, embedding: str, **options) -> EvalConfig:
    return EvalConfig(data=DataConfig(data=manifest), model=ModelConfig("tiny", "none"),
                      embedding=embedding, workers=0, cache_embeddings=False, device="cpu",
                      **options)


@pytest.fixture(scope="module")
def random_tiny():
    return create_model("tiny", "none", seed=0)


def _all_species(table: pd.DataFrame, column: str) -> float:
    row = table[(table["taxa"] == names.ALL_TAXA) & (table["level"] == "species")]
    return float(row[column].item())


def test_captions_that_know_the_label_better_than_the_images_are_refused_naming_both(
        specimens, tmp_path, random_tiny):
    manifest = _coded_manifest(specimens, tmp_path, _code_words)
    visual = _all_species(evaluate(_config(manifest, "visual"), random_tiny).table, "top1_cos")
    for mode in ("text", "avg", "concat"):
        with pytest.raises(DataError, match=rf"embedding={mode}: .* alone find the species of "
                                            rf"100\.00% .*images alone {100 * visual:.2f}%"):
            evaluate(_config(manifest, mode), random_tiny)
    allowed = evaluate(_config(manifest, "avg", allow_label_text=True), random_tiny).table
    assert _all_species(allowed, names.CAPTION_ONLY_TOP1) == 1.0
    # on the gallery side only, the text carries nothing into a query: scored, not refused
    gallery = evaluate(_config(manifest, "gallery_avg"), random_tiny).table
    assert _all_species(gallery, names.CAPTION_ONLY_TOP1) == 1.0


def test_honest_per_image_captions_pass_with_their_caption_only_column(specimens, tmp_path,
                                                                      random_tiny):
    manifest = _coded_manifest(specimens, tmp_path, _honest)
    table = evaluate(_config(manifest, "avg"), random_tiny).table
    assert names.CAPTION_ONLY_TOP1 in table.columns
    assert _all_species(table, names.CAPTION_ONLY_TOP1) < 0.3
    visual = evaluate(_config(manifest, "visual"), random_tiny).table
    assert names.CAPTION_ONLY_TOP1 not in visual.columns


def test_captions_of_the_caption_command_are_scored_not_refused(specimens, tmp_path,
                                                               random_tiny):
    manifest = _coded_manifest(specimens, tmp_path, _code_words, caption_saw_name=False)
    table = evaluate(_config(manifest, "text"), random_tiny).table
    assert _all_species(table, names.CAPTION_ONLY_TOP1) == 1.0


def test_refused_captions_leave_no_run_and_an_allowed_run_is_tagged(specimens, tmp_path, tracking,
                                                                    monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "caption-gauge")
    manifest = _coded_manifest(specimens, tmp_path, _code_words)
    common = ["--model", "tiny", "--weights", "none", "--data", manifest, "--workers", "0",
              "--embedding", "concat"]
    assert main(["eval", *common]) == 1
    assert main(["train", *common, "--batch_size", "16", "--epochs", "1"]) == 1
    error = capsys.readouterr().err
    assert error.count("caption_only_top1") == 2 and "Traceback" not in error
    assert MlflowClient().get_experiment_by_name("caption-gauge") is None
    assert main(["eval", *common, "--allow_label_text", "true"]) == 0
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("caption-gauge").experiment_id])
    assert run.data.tags[names.TAG_ALLOW_LABEL_TEXT] == "true"
    assert run.data.metrics[names.eval_metric("All", "species", names.CAPTION_ONLY_TOP1)] == 1.0
