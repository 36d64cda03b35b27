"""open_clip models: `open_clip:<architecture>` has open_clip's own parameter names and shapes,
loads open_clip's weights files (and a Hugging Face cache folder) to the same outputs as open_clip,
and names what to place where when the weights are missing."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from taxonclip.cli import main  # noqa: E402
from taxonclip.errors import ModelError  # noqa: E402
from taxonclip.models import create_model, get_spec  # noqa: E402
from taxonclip.models.clip_models import tokenize  # noqa: E402
from tests.helpers import sqlite_tracking  # noqa: E402

ARCH = "ViT-B-32"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return open_clip.create_model(ARCH, pretrained=None).eval()


def test_parameter_names_and_shapes_are_open_clips(reference):
    encoder = create_model(f"open_clip:{ARCH}", "none")
    ours = {k: v.shape for k, v in encoder.state_dict().items()}
    theirs = {(k if k.startswith("visual.") else f"text.model.{k}"): v.shape
              for k, v in reference.state_dict().items()}
    assert ours == theirs
    spec = get_spec(f"open_clip:{ARCH}")
    assert (spec.embed_dim, spec.input_size, spec.source) == (512, 224, "open_clip")


@pytest.mark.slow
def test_a_weights_file_and_a_hub_cache_give_open_clips_outputs(reference, tmp_path, monkeypatch):
    file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), file)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    texts = ["a photo of Danaus plexippus.", "a photo of a fish."]
    with torch.no_grad():
        expected_images = reference.encode_image(images)
        expected_texts = reference.encode_text(tokenize(texts, 77))
    snapshot = tmp_path / "hub" / "models--org--bioclip-like" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for weights in (str(file), "hf-hub:org/bioclip-like"):
        encoder = create_model(f"open_clip:{ARCH}", weights)
        with torch.no_grad():
            assert torch.allclose(encoder(images), expected_images, atol=1e-5)
            assert torch.allclose(encoder.encode_text(texts), expected_texts, atol=1e-5)
        assert encoder.weights == weights


def test_the_tokenizer_is_open_clips_own(monkeypatch):
    from taxonclip.models import open_clip_models
    from taxonclip.models.registry import adapter_of

    spec = get_spec("open_clip:ViT-B-16")
    tokenize_as_family = adapter_of(spec.source).tokenizer(spec)
    texts = ["a photo of Danaus plexippus.", "Pieris rapae on a leaf " * 40]
    expected = open_clip.get_tokenizer("ViT-B-16")(texts)
    assert torch.equal(tokenize_as_family(texts), expected)
    assert torch.equal(expected, tokenize(texts, 77).long())  # BioCLIP's is CLIP's encoding

    def not_cached(*args, **kwargs):
        raise OSError("not in the Hugging Face cache")

    monkeypatch.setattr(open_clip, "get_tokenizer", not_cached)
    open_clip_models._tokenizer.cache_clear()
    try:
        with pytest.raises(ModelError, match="tokenizer of open_clip:ViT-B-16 is not available"):
            tokenize_as_family(texts)
    finally:
        open_clip_models._tokenizer.cache_clear()


def test_missing_weights_name_what_to_place_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match=r"no open_clip_pytorch_model.bin .* under .*models--imageomics--bioclip"):
        create_model("open_clip:ViT-B-16", "hf-hub:imageomics/bioclip")
    with pytest.raises(ModelError, match="open_clip weights come from a file or the Hugging Face cache"):
        create_model("open_clip:ViT-B-16", "pretrained")
    with pytest.raises(ModelError, match="unknown open_clip architecture 'ViT-Q-99'"):
        get_spec("open_clip:ViT-Q-99")
    assert main(["eval", "--model", "open_clip:ViT-B-16", "--weights", str(tmp_path / "none.bin")]) == 1
    assert "hf-hub:imageomics/bioclip" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_an_open_clip_model_runs(specimens, tmp_path, monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path, "open-clip")
    assert main(["eval", "--model", f"open_clip:{ARCH}", "--weights", "none", "--data",
                 str(specimens), "--workers", "0", "--zero_shot", "true"]) == 0
    assert "zs_top1" in capsys.readouterr().out


@pytest.mark.slow
def test_an_open_clip_model_fine_tunes_and_its_logged_model_evaluates(specimens, tmp_path,
                                                                      monkeypatch):
    sqlite_tracking(monkeypatch, tmp_path, "open-clip-train")
    assert main(["train", "--model", f"open_clip:{ARCH}", "--weights", "none", "--data",
                 str(specimens), "--epochs", "1", "--batch_size", "16", "--workers", "0"]) == 0
    import mlflow

    run = mlflow.search_runs(experiment_names=["open-clip-train"]).iloc[0]
    assert run["status"] == "FINISHED" and run["params.model"] == f"open_clip:{ARCH}"
    assert main(["eval", "--model", f"runs:/{run['run_id']}/model", "--data", str(specimens),
                 "--workers", "0"]) == 0
