"""Model registry: names and sizes, architectures against the published UNICOM keys, weights files
(plain state dicts, TorchScript archives, checkpoints, fp16 UNICOM files), clear errors, and the
named architectures (ClipArch, UnicomArch) against their modules and the stored checkpoint form."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import warnings
from dataclasses import asdict, fields

import pytest
import torch
from PIL import Image

from tests.helpers import UNICOM_REFERENCE
from taxonclip.errors import ModelError
from taxonclip.models import (Encoder, ModelSpec, create_model, encoder_from_config, get_spec,
                              list_models, load_encoder)
from taxonclip.models import weights as published
from taxonclip.models.clip_models import CLIP, ClipArch, clip
from taxonclip.models.transforms import CLIP_MEAN, CLIP_STD
from taxonclip.models.unicom import UnicomArch, UnicomViT

SMALL_UNICOM = dict(image_size=16, patch_size=8, width=8, layers=2, heads=2, embed_dim=6)
SMALL_UNICOM_SPEC = ModelSpec("unicom:small", "unicom", 6, 16, SMALL_UNICOM)
CAPTIONS = ["a photograph of Vanessa atalanta", "Pieris rapae on a leaf " * 40]


def meta_encoder(spec: ModelSpec) -> Encoder:
    """The encoder of `spec` on the meta device: shapes only, no memory, no init time."""
    with torch.device("meta"):
        return encoder_from_config({"spec": asdict(spec), "weights": "none"})


def tiny_clip(seed: int) -> CLIP:
    """A full clip.model.CLIP with the tiny model's hyper-parameters."""
    torch.manual_seed(seed)
    return CLIP(**get_spec("tiny").arch).eval()


def with_random_batchnorm_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics, so that eval-mode BatchNorm is really exercised."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


# ---------------------------------------------------------------------------------- registry


def test_list_models_names_sources_and_sizes():
    expected = {
        "tiny": ("tiny", 64, 32),
        "ViT-B/32": ("clip", 512, 224), "ViT-B/16": ("clip", 512, 224),
        "ViT-L/14": ("clip", 768, 224), "ViT-L/14@336px": ("clip", 768, 336),
        # Per the published checkpoints' head shapes: only UNICOM B/32 embeds in 512 dimensions.
        "unicom:ViT-B/32": ("unicom", 512, 224), "unicom:ViT-B/16": ("unicom", 768, 224),
        "unicom:ViT-L/14": ("unicom", 768, 224), "unicom:ViT-L/14@336px": ("unicom", 768, 336),
    }
    listed = {spec.name: (spec.source, spec.embed_dim, spec.input_size) for spec in list_models()}
    assert listed == expected


@pytest.mark.parametrize("spec", list_models(), ids=lambda spec: spec.name)
def test_every_architecture_embeds_at_its_listed_size(spec):
    encoder = meta_encoder(spec).eval()
    images = torch.empty(2, 3, spec.input_size, spec.input_size, device="meta")
    assert encoder(images).shape == (2, spec.embed_dim)
    assert encoder.has_text == (spec.source != "unicom")


@pytest.mark.parametrize("name", [s.name for s in list_models() if s.source == "unicom"])
def test_unicom_state_dict_keys_and_shapes_match_the_published_checkpoints(name):
    release = published.UNICOM_RELEASES[name]
    stem = release.file.removeprefix("FP16-").removesuffix(".pt")
    reference = UNICOM_REFERENCE / f"{stem}.state_dict.json"
    if not reference.exists():
        pytest.skip(f"UNICOM reference key list not found at {reference}")
    published_shapes = json.loads(reference.read_text())
    with torch.device("meta"):
        model = UnicomViT(**get_spec(name).arch)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert published_shapes["checkpoint_file"] == release.file
    assert list(shapes) == list(published_shapes["tensors"])
    assert shapes == published_shapes["tensors"]


@pytest.mark.parametrize("name, width, patch, text_width",
                         [("ViT-B/32", 768, 32, 512), ("ViT-B/16", 768, 16, 512),
                          ("ViT-L/14", 1024, 14, 768), ("ViT-L/14@336px", 1024, 14, 768)])
def test_clip_architectures_have_the_published_shapes(name, width, patch, text_width):
    spec = get_spec(name)
    shapes = {key: tuple(value.shape) for key, value in meta_encoder(spec).state_dict().items()}
    grid = spec.input_size // patch
    assert shapes["visual.conv1.weight"] == (width, 3, patch, patch)
    assert shapes["visual.positional_embedding"] == (grid * grid + 1, width)
    assert shapes["visual.proj"] == (width, spec.embed_dim)
    assert shapes["text.token_embedding.weight"] == (49408, text_width)
    assert shapes["text.text_projection"] == (text_width, spec.embed_dim)
    assert "logit_scale" not in shapes


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelError, match="ViT-L/14@336px") as error:
        create_model("ViT-H/14")
    assert "'ViT-H/14'" in str(error.value) and "unicom:ViT-B/32" in str(error.value)
    assert "runs:/" in str(error.value)


# ------------------------------------------------------------------------------ UNICOM forward


def reference_unicom(state: dict[str, torch.Tensor], images: torch.Tensor, patch: int,
                     heads: int, layers: int) -> torch.Tensor:
    """UNICOM's forward written with explicit loops over patches, heads and blocks (eval mode)."""

    def linear(values, name, bias=True):
        out = values @ state[f"{name}.weight"].reshape(state[f"{name}.weight"].shape[0], -1).T
        return out + state[f"{name}.bias"] if bias else out

    def layer_norm(values, name, eps=1e-5):
        centred = values - values.mean(-1, keepdim=True)
        scaled = centred / torch.sqrt((centred ** 2).mean(-1, keepdim=True) + eps)
        return scaled * state[f"{name}.weight"] + state[f"{name}.bias"]

    def batch_norm(values, name, eps=2e-5):
        scaled = (values - state[f"{name}.running_mean"]) / torch.sqrt(
            state[f"{name}.running_var"] + eps)
        return scaled * state[f"{name}.weight"] + state[f"{name}.bias"]

    batch, _, size, _ = images.shape
    tokens = []
    for row in range(size // patch):
        for col in range(size // patch):
            pixels = images[:, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch]
            tokens.append(linear(pixels.reshape(batch, -1), "patch_embed.proj"))
    x = torch.stack(tokens, dim=1) + state["pos_embed"]
    width = x.shape[-1]
    head_dim = width // heads
    for i in range(layers):
        block = f"blocks.{i}"
        qkv = linear(layer_norm(x, f"{block}.norm1"), f"{block}.attn.qkv", bias=False)
        q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
        outputs = []
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(head_dim)
            outputs.append(scores.softmax(-1) @ v[..., cols])
        x = x + linear(torch.cat(outputs, -1), f"{block}.attn.proj")
        hidden = linear(layer_norm(x, f"{block}.norm2"), f"{block}.mlp.fc1").clamp(0, 6)
        x = x + linear(hidden, f"{block}.mlp.fc2")
    flat = layer_norm(x, "norm").reshape(batch, -1)
    hidden = batch_norm(linear(flat, "feature.0", bias=False), "feature.1")
    return batch_norm(linear(hidden, "feature.2", bias=False), "feature.3")


def test_unicom_forward_matches_a_loop_reference():
    torch.manual_seed(0)
    model = with_random_batchnorm_stats(UnicomViT(**SMALL_UNICOM))
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        embeddings = model(images)
        expected = reference_unicom(model.state_dict(), images, patch=8, heads=2, layers=2)
    assert embeddings.shape == (3, 6)
    torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)


def test_unicom_rejects_images_of_another_size():
    with pytest.raises(ModelError, match="16x16 images, got 32x32"):
        UnicomViT(**SMALL_UNICOM).eval()(torch.zeros(1, 3, 32, 32))


def test_unicom_has_no_text_tower():
    encoder = load_encoder(SMALL_UNICOM_SPEC, "none")
    with pytest.raises(ModelError, match="no text tower"):
        encoder.encode_text(["Danaus plexippus"])


# ------------------------------------------------------------------------------ weights files


def test_tiny_clip_loads_from_a_plain_state_dict_file(tmp_path):
    model = tiny_clip(seed=1)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    encoder = create_model("tiny", weights=str(path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(encoder.encode_text(CAPTIONS),
                                   model.encode_text(clip.tokenize(CAPTIONS, truncate=True)),
                                   rtol=0, atol=0)
    assert encoder.weights == str(path)
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    assert not encoder.training


def test_tiny_clip_loads_from_a_torchscript_archive(tmp_path):
    model = tiny_clip(seed=2)
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(CAPTIONS[:1] * 2)
    path = tmp_path / "tiny-archive.pt"
    with warnings.catch_warnings():
        # Tracing warns about deprecation and about traced shape checks: neither matters here.
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (images, tokens)), str(path))
    assert published.is_torchscript(path)
    encoder = create_model("tiny", weights=str(path))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encode_image(images), rtol=0, atol=0)


def test_checkpoint_round_trip_through_file_and_config(tmp_path):
    encoder = create_model("tiny", weights="none")
    checkpoint = {"model": encoder.config(), "state_dict": encoder.state_dict(), "epoch": 3}
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    assert not published.is_torchscript(path)
    from_file = create_model("tiny", weights=str(path))
    config = json.loads(json.dumps(encoder.config()))
    from_config = encoder_from_config(config, encoder.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for rebuilt in (from_file, from_config):
            assert rebuilt.spec == encoder.spec
            torch.testing.assert_close(rebuilt(images), encoder(images), rtol=0, atol=0)
        # The rebuilt encoder owns its tensors: training it leaves the original untouched.
        from_config.visual.proj.add_(1.0)
        assert not torch.equal(from_config.visual.proj, encoder.visual.proj)
    assert from_config.weights == "none" and from_file.weights == str(path)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    encoder = create_model("tiny", weights="none")
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": encoder.config(), "state_dict": encoder.state_dict()}, path)
    with pytest.raises(ModelError, match="checkpoint of model tiny, not ViT-B/32; use model=tiny"):
        create_model("ViT-B/32", weights=str(path))


def test_unicom_fp16_state_dict_loads_strictly_in_fp32(tmp_path):
    torch.manual_seed(3)
    source = with_random_batchnorm_stats(UnicomViT(**SMALL_UNICOM))
    half = {key: value.half() if value.is_floating_point() else value
            for key, value in source.state_dict().items()}
    path = tmp_path / "FP16-small.pt"
    torch.save(half, path)
    encoder = load_encoder(SMALL_UNICOM_SPEC, str(path)).eval()
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    for key, value in half.items():
        torch.testing.assert_close(encoder.state_dict()[f"visual.{key}"], value.to(torch.float32
                                   if value.is_floating_point() else value.dtype), rtol=0, atol=0)
    expected = UnicomViT(**SMALL_UNICOM).eval()
    expected.load_state_dict({key: value.float() if value.is_floating_point() else value
                              for key, value in half.items()})
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), expected(images), rtol=0, atol=0)


def test_unicom_pretrained_weights_come_from_unicom_cache(tmp_path, monkeypatch):
    torch.manual_seed(4)
    source = UnicomViT(**SMALL_UNICOM)
    release = published.Release("FP16-small.pt", "https://unreachable.invalid/FP16-small.pt", "0")
    monkeypatch.setitem(published.UNICOM_RELEASES, SMALL_UNICOM_SPEC.name, release)
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path))
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    torch.save(half, tmp_path / release.file)
    encoder = load_encoder(SMALL_UNICOM_SPEC, "pretrained")
    assert encoder.weights == "unicom"
    torch.testing.assert_close(encoder.visual.pos_embed, source.pos_embed.detach().half().float())


@pytest.mark.slow
def test_real_size_unicom_b32_loads_from_an_fp16_file(tmp_path):
    shapes = meta_encoder(get_spec("unicom:ViT-B/32")).visual.state_dict()
    half = {key: (torch.zeros(()) if value.dtype == torch.long else torch.rand(value.shape))
            .to(value.dtype if value.dtype == torch.long else torch.float16)
            for key, value in shapes.items()}
    path = tmp_path / "FP16-ViT-B-32.pt"
    torch.save(half, path)
    encoder = create_model("unicom:ViT-B/32", weights=str(path))
    torch.testing.assert_close(encoder.visual.feature[0].weight, half["feature.0.weight"].float())
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 224, 224)).shape == (2, 512)


# ---------------------------------------------------------------------------- tiny's weights


def test_tiny_pretrained_is_a_fixed_init_that_leaves_the_rng_alone():
    rng = torch.get_rng_state()
    first, second = create_model("tiny"), create_model("tiny")
    assert torch.equal(torch.get_rng_state(), rng)
    assert first.weights == "seed:0"
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    rebuilt = encoder_from_config(first.config())
    assert torch.equal(rebuilt.visual.proj, first.visual.proj)
    assert not torch.equal(create_model("tiny", "none").visual.proj, first.visual.proj)


# --------------------------------------------------------------------------- offline and bad input


def test_offline_clip_names_the_file_to_place_and_the_path_option(offline):
    with pytest.raises(ModelError) as error:
        create_model("ViT-L/14@336px")
    message = str(error.value)
    folder = offline / ".cache" / "clip"
    assert "ViT-L-14-336px.pt" in message and str(folder) in message
    assert "weights=/path/to/file" in message and "name resolution" in message
    assert list(folder.iterdir()) == []


def test_offline_unicom_names_the_file_to_place_and_the_path_option(offline):
    with pytest.raises(ModelError) as error:
        create_model("unicom:ViT-B/16")
    message = str(error.value)
    folder = offline / ".cache" / "unicom"
    assert "FP16-ViT-B-16.pt" in message and str(folder) in message
    assert "weights=/path/to/file" in message
    assert list(folder.iterdir()) == []


def test_download_checks_the_checksum(tmp_path):
    payload = tmp_path / "served.bin"
    payload.write_bytes(b"weights" * 1000)
    sha256 = hashlib.sha256(payload.read_bytes()).hexdigest()
    good = published.Release("w.pt", payload.as_uri(), sha256)
    cache = tmp_path / "cache"
    assert published.cached_release("m", good, cache).read_bytes() == payload.read_bytes()
    bad = published.Release("v.pt", payload.as_uri(), "0" * 64)
    with pytest.raises(ModelError, match="corrupt"):
        published.cached_release("m", bad, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["w.pt"]


def test_weights_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match=f"weights '{missing}' for tiny: not a file; "
                                         f"weights= takes pretrained, none or the path"):
        create_model("tiny", weights=str(missing))


def test_openai_is_not_a_weights_word_for_unicom():
    with pytest.raises(ModelError, match="weights 'openai' for unicom:small: not a file; "
                                         "weights= takes pretrained, unicom, none or the path"):
        load_encoder(SMALL_UNICOM_SPEC, "openai")


def test_pretrained_needs_published_weights():
    with pytest.raises(ModelError, match="unicom:small has no published weights"):
        load_encoder(SMALL_UNICOM_SPEC, "pretrained")


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=f"cannot read weights file {path}") as error:
        create_model("tiny", weights=str(path))
    # torch's own text would advise weights_only=False, which runs whatever the file carries
    assert "weights_only" not in str(error.value)


def test_weights_file_of_pickled_objects_is_refused_in_our_words(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(tiny_clip(seed=6), path)
    with pytest.raises(ModelError) as error:
        create_model("tiny", weights=str(path))
    message = str(error.value)
    assert f"weights file {path} holds pickled Python objects (clip.model.CLIP)" in message
    assert "taxonclip does not load" in message and "weights_only" not in message
    assert "plain state dict or a taxonclip checkpoint" in message


def test_state_dict_of_another_architecture_names_the_keys(tmp_path):
    state = tiny_clip(seed=5).state_dict()
    state["visual.proj"] = torch.zeros(64, 32)
    del state["ln_final.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as error:
        create_model("tiny", weights=str(path))
    message = str(error.value)
    assert f"{path} does not fit model tiny" in message
    assert "missing keys: text.ln_final.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "visual.proj (64, 32) (model has (64, 64))" in message


def test_config_that_is_not_an_encoder_config():
    with pytest.raises(ModelError, match="not one written by Encoder.config"):
        encoder_from_config({"weights": "none"})
    spec = asdict(get_spec("tiny")) | {"source": "timm"}
    with pytest.raises(ModelError, match="source 'timm'"):
        encoder_from_config({"spec": spec})


# ------------------------------------------------------------------------------- transforms


def test_eval_transform_matches_clip_preprocessing():
    encoder = create_model("tiny")
    image = Image.linear_gradient("L").resize((50, 40)).convert("RGBA")
    tensor = encoder.eval_transform()(image)
    assert tensor.shape == (3, 32, 32)
    torch.testing.assert_close(tensor, clip.clip._transform(32)(image), rtol=0, atol=0)


def test_train_transform_shape():
    image = Image.new("RGB", (70, 45), (200, 30, 10))
    torch.manual_seed(0)
    tensor = create_model("tiny").train_transform()(image)
    assert tensor.shape == (3, 32, 32)
    expected_red = (200 / 255 - 0.48145466) / 0.26862954
    torch.testing.assert_close(tensor[0], torch.full((32, 32), expected_red), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- architectures as data


@pytest.mark.parametrize("arch, module", [(ClipArch, CLIP), (UnicomArch, UnicomViT)])
def test_an_architecture_names_the_arguments_of_its_module_in_order(arch, module):
    wanted = [name for name, parameter in inspect.signature(module).parameters.items()
              if parameter.default is inspect.Parameter.empty]
    assert [f.name for f in fields(arch)] == wanted


def test_a_checkpoint_config_as_stored_before_the_architectures_were_named_still_loads():
    stored = {"spec": {"name": "tiny", "source": "tiny", "embed_dim": 64, "input_size": 32,
                       "arch": {"embed_dim": 64, "image_resolution": 32, "vision_layers": 2,
                                "vision_width": 64, "vision_patch_size": 8, "context_length": 77,
                                "vocab_size": 49408, "transformer_width": 64,
                                "transformer_heads": 1, "transformer_layers": 1},
                       "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
              "weights": "seed:0"}
    encoder = create_model("tiny")
    rebuilt = encoder_from_config(stored, encoder.state_dict())
    assert rebuilt.spec == get_spec("tiny") and json.loads(json.dumps(encoder.config())) == stored
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), encoder(images), rtol=0, atol=0)
