"""Zero-shot classification by class texts: the hits against a brute force on fixed embeddings,
the table's zs columns against a recomputation from the encoder's own text and image towers,
the templates (common names, captions), and the refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import DataConfig, EvalConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.errors import ConfigError
from taxonclip.embed import embed_images
from taxonclip.evaluation import evaluate
from taxonclip.table import scope_masks
from taxonclip.models import create_model
from taxonclip.zero_shot import class_texts, prototypes, zero_shot_hits
from tests.helpers import sqlite_tracking


def _brute_force_hits(queries, labels, class_prototypes, candidates):
    top1, top5 = [], []
    for query, label in zip(queries.tolist(), labels.tolist()):
        scored = []
        for c in candidates.tolist():
            p = class_prototypes[c].tolist()
            cosine = sum(a * b for a, b in zip(query, p)) / (sum(a * a for a in query) ** 0.5)
            scored.append((-cosine, c))  # ties: the lower class index first
        ranked = [c for _, c in sorted(scored)]
        top1.append(ranked[0] == label)
        top5.append(label in ranked[:5])
    return top1, top5


def test_zero_shot_hits_equal_a_brute_force_on_fixed_embeddings():
    generator = torch.Generator().manual_seed(0)
    class_prototypes = F.normalize(torch.randn(12, 6, generator=generator, dtype=torch.float64), dim=1)
    class_prototypes[7] = class_prototypes[3]  # a tie, broken towards class 3
    candidates = torch.tensor([0, 2, 3, 5, 7, 8, 9, 11])
    labels = candidates[torch.randint(0, len(candidates), (40,), generator=generator)]
    queries = class_prototypes[labels] + 0.9 * torch.randn(40, 6, generator=generator, dtype=torch.float64)
    top1, top5 = zero_shot_hits(queries, labels, class_prototypes.float(), candidates)
    expected1, expected5 = _brute_force_hits(queries, labels, class_prototypes, candidates)
    assert top1.tolist() == expected1 and top5.tolist() == expected5
    assert 0 < sum(expected1) < len(expected1) and sum(expected5) > sum(expected1)


def test_prototypes_are_normalised_means_of_normalised_texts():
    texts = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, -5.0]])
    out = prototypes(texts, np.array([0, 0, 1]), 2)
    assert torch.allclose(out, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]]))


def test_class_texts_use_names_taxa_common_names_and_one_caption_per_species():
    table = pd.DataFrame({
        "species": ["Danaus plexippus", "Danaus plexippus", "Vanessa atalanta", None],
        "genus": ["Danaus", "Danaus", "Vanessa", "Vanessa"],
        "taxa": ["Butterfly"] * 4,
        "commonName": ["Monarch", "Monarch", None, None],
        "caption": ["orange wings", "orange wings", "red bands", "seen at dusk"]})
    species = class_texts(table, "species")
    assert species["Danaus plexippus"] == ["a photo of Danaus plexippus.",
                                           "a photo of Butterfly Danaus plexippus.",
                                           "a photo of Monarch.", "orange wings"]
    assert species["Vanessa atalanta"][-1] == "red bands" and len(species["Vanessa atalanta"]) == 3
    assert class_texts(table, "genus")["Vanessa"] == ["a photo of Vanessa.",
                                                      "a photo of Butterfly Vanessa."]
    assert class_texts(table, "taxa") == {"Butterfly": ["a photo of Butterfly."]}


def test_eval_zero_shot_columns_equal_a_recomputation(specimens):
    encoder = create_model("tiny", "pretrained")
    config = EvalConfig(data=DataConfig(data=str(specimens)), workers=0, zero_shot=True,
                        cache_embeddings=False)
    result = evaluate(config, encoder)
    table, rows = result.table, result.manifest.table
    visual, _ = embed_images(encoder, rows["image_path"].tolist(), batch_size=64, workers=0,
                             device=torch.device("cpu"))
    is_test = np.zeros(len(rows), bool)
    is_test[result.split.test] = True
    for row in table.itertuples(index=False):
        texts = class_texts(rows, row.level)
        with torch.no_grad():
            class_vectors = torch.stack([F.normalize(F.normalize(encoder.encode_text(t), dim=1).mean(0), dim=0)
                                         for t in texts.values()])
        index = {name: i for i, name in enumerate(texts)}
        in_scope, queries = scope_masks(row.taxa, rows, None)
        candidates = torch.tensor(sorted(index[n] for n in rows[row.level][in_scope].dropna().unique()))
        picked = np.flatnonzero(queries & is_test & rows[row.level].notna().to_numpy())
        labels = torch.tensor([index[n] for n in rows[row.level].iloc[picked]])
        top1, top5 = _brute_force_hits(visual[picked], labels, class_vectors, candidates)
        assert row.zs_top1 == pytest.approx(np.mean(top1), abs=1e-12), (row.taxa, row.level)
        assert row.zs_top5 == pytest.approx(np.mean(top5), abs=1e-12), (row.taxa, row.level)
    assert set(result.class_texts["level"]) == set(names.LEVELS)


def test_taxonclip_eval_zero_shot_logs_the_columns_and_the_texts(specimens, tmp_path, monkeypatch,
                                                                capsys):
    sqlite_tracking(monkeypatch, tmp_path, "zero-shot")
    assert main(["eval", "--model", "tiny", "--data", str(specimens), "--zero_shot", "true",
                 "--workers", "0"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[-2:] == list(names.ZERO_SHOT_SCORES)
    import mlflow

    run = mlflow.search_runs(experiment_names=["zero-shot"]).iloc[0]
    assert 0 <= run["metrics.eval/All/species/zs_top1"] <= run["metrics.eval/All/species/zs_top5"] <= 1
    texts = mlflow.artifacts.load_text(f"runs:/{run['run_id']}/{names.ZERO_SHOT_TEXTS}")
    assert "a photo of " in texts and texts.startswith("level,class,text")


def test_leeds_zero_shot_uses_the_common_names(leeds):
    texts = class_texts(read_manifest(leeds / "metadata.csv").table, "species")
    assert "a photo of Monarch." in texts["Danaus plexippus"]
    assert len(texts) == 10 and all(len(t) == 3 for t in texts.values())


def test_zero_shot_is_refused_without_a_text_tower_or_with_text_in_the_queries(specimens, tmp_path,
                                                                              monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path, "zero-shot-refused")
    assert main(["eval", "--model", "unicom:ViT-B/32", "--weights", "none", "--zero_shot", "true",
                 "--data", str(specimens), "--workers", "0"]) == 1
    assert "has none (UNICOM models are image encoders only)" in capsys.readouterr().err
    import mlflow

    assert mlflow.search_runs(experiment_names=["zero-shot-refused"]).empty
    with pytest.raises(ConfigError, match="embedding=avg puts text into the queries"):
        EvalConfig(zero_shot=True, embedding="avg")
    with pytest.raises(ConfigError, match="zero-shot scores come from"):
        from taxonclip.config import TrainConfig

        TrainConfig(metric="All/species/zs_top1")


@pytest.mark.slow
def test_vit_b32_zero_shot_runs_on_the_butterflies(leeds, tmp_path, monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path, "zero-shot-leeds")
    assert main(["eval", "--model", "ViT-B/32", "--weights", "none", "--zero_shot", "true",
                 "--data", str(leeds / "metadata.csv")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert ["All", "species"] in [row[:2] for row in rows]
    import mlflow

    run = mlflow.search_runs(experiment_names=["zero-shot-leeds"]).iloc[0]
    texts = mlflow.artifacts.load_text(f"runs:/{run['run_id']}/{names.ZERO_SHOT_TEXTS}")
    assert "species,Danaus plexippus,a photo of Monarch." in texts
