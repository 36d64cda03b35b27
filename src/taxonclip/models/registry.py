"""Image encoders by name: OpenAI CLIP, UNICOM, open_clip and a tiny CLIP for tests and the demo.

    encoder = create_model("ViT-B/32")                  # OpenAI weights from ~/.cache/clip
    encoder = create_model("unicom:ViT-B/32", "none")   # the architecture, randomly initialised
    encoder = create_model("open_clip:ViT-B-16", "hf-hub:imageomics/bioclip")  # BioCLIP, cached
    embeddings = encoder(images)                        # (B, encoder.spec.embed_dim)

A checkpoint stores `{"model": encoder.config(), "state_dict": encoder.state_dict(), ...}`;
`encoder_from_config` rebuilds the encoder from it without any download.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taxonclip.errors import ModelError
from taxonclip.models import open_clip_models
from taxonclip.models.clip_models import clip_towers, to_encoder_keys, tokenize
from taxonclip.models.transforms import (CLIP_MEAN, CLIP_STD, ImageTransform, TensorTransform,
                                         eval_transform, tensor_eval_transform,
                                         tensor_train_transform, train_transform)
from taxonclip.models.unicom import UnicomViT
from taxonclip.models.weights import (CLIP_RELEASES, UNICOM_RELEASES, cached_release,
                                      check_state_dict, clip_cache_dir, is_checkpoint,
                                      read_weights_file, unicom_cache_dir)

SOURCES = ("clip", "unicom", "tiny", "open_clip")
# The seed of the tiny model's "pretrained" weights: it has no published ones, so a fixed
# random init stands in for them and stays the same from run to run.
TINY_SEED = 0
TINY_WEIGHTS = f"seed:{TINY_SEED}"


@dataclass(frozen=True)
class ModelSpec:
    """What a registry name stands for; `arch` rebuilds the architecture without any weights (a
    ClipArch or UnicomArch as a dict, or open_clip's architecture name)."""

    name: str
    source: str
    embed_dim: int
    input_size: int
    arch: dict = field(hash=False)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


class Encoder(nn.Module):
    """An image encoder (`visual`), with CLIP's text tower (`text`) where the model has one."""

    def __init__(self, spec: ModelSpec, weights: str, visual: nn.Module,
                 text: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weights = weights
        self.visual = visual
        self.text = text

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, embed_dim), not normalised, of images (B, 3, input_size, input_size)."""
        return self.visual(images)

    @property
    def has_text(self) -> bool:
        """Whether `encode_text` works (CLIP and tiny models)."""
        return self.text is not None

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (len(texts), embed_dim) of captions; texts over 77 tokens are truncated."""
        if self.text is None:
            raise ModelError(f"model {self.spec.name} has no text tower; use embedding=visual")
        tokens = tokenize(texts, self.spec.arch["context_length"])
        return self.text(tokens.to(self.text.text_projection.device))

    def eval_transform(self) -> ImageTransform:
        """PIL image -> tensor for embedding: bicubic resize, centre crop, normalise."""
        return eval_transform(self.spec.input_size, self.spec.mean, self.spec.std)

    def train_transform(self) -> ImageTransform:
        """PIL image -> tensor for training: random resized crop, horizontal flip, normalise."""
        return train_transform(self.spec.input_size, self.spec.mean, self.spec.std)

    def tensor_transform(self, train: bool) -> TensorTransform:
        """The eval or train transform for a uint8 image tensor on the model's device."""
        make = tensor_train_transform if train else tensor_eval_transform
        return make(self.spec.input_size, self.spec.mean, self.spec.std)

    def config(self) -> dict:
        """JSON-serialisable description that `encoder_from_config` rebuilds the encoder from."""
        return {"spec": asdict(self.spec), "weights": self.weights}


@dataclass(frozen=True, kw_only=True)
class ClipArch:
    """An OpenAI CLIP architecture: the keyword arguments of `clip.model.CLIP`, in its order. A
    spec's `arch` is this as a dict, as checkpoints store it, so the names stay CLIP's."""

    embed_dim: int  # of the joint image-text embedding
    image_resolution: int  # the side of the square input images
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int = 77  # text tokens
    vocab_size: int = 49408  # CLIP's byte-pair vocabulary
    transformer_width: int  # of the text tower, as are its heads and layers
    transformer_heads: int
    transformer_layers: int

    @property
    def input_size(self) -> int:
        """The side of the square images the model takes."""
        return self.image_resolution


@dataclass(frozen=True, kw_only=True)
class UnicomArch:
    """A UNICOM vision transformer: the keyword arguments of `UnicomViT`, in its order (a spec's
    `arch` is this as a dict, as checkpoints store it)."""

    image_size: int  # the side of the square input images (the head is tied to it)
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int

    @property
    def input_size(self) -> int:
        """The side of the square images the model takes."""
        return self.image_size


def _spec(name: str, source: str, arch: ClipArch | UnicomArch) -> ModelSpec:
    """A registry model: its embedding and input sizes are those of its architecture."""
    return ModelSpec(name, source, arch.embed_dim, arch.input_size, asdict(arch))


_SPECS = {spec.name: spec for spec in (
    _spec("tiny", "tiny", ClipArch(
        embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
        transformer_width=64, transformer_heads=1, transformer_layers=1)),
    _spec("ViT-B/32", "clip", ClipArch(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
        vision_patch_size=32, transformer_width=512, transformer_heads=8, transformer_layers=12)),
    _spec("ViT-B/16", "clip", ClipArch(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
        vision_patch_size=16, transformer_width=512, transformer_heads=8, transformer_layers=12)),
    _spec("ViT-L/14", "clip", ClipArch(
        embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
        vision_patch_size=14, transformer_width=768, transformer_heads=12, transformer_layers=12)),
    _spec("ViT-L/14@336px", "clip", ClipArch(
        embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
        vision_patch_size=14, transformer_width=768, transformer_heads=12, transformer_layers=12)),
    # per the published checkpoints' head shapes, only UNICOM's B/32 embeds in 512 dimensions
    _spec("unicom:ViT-B/32", "unicom", UnicomArch(
        image_size=224, patch_size=32, width=768, layers=12, heads=12, embed_dim=512)),
    _spec("unicom:ViT-B/16", "unicom", UnicomArch(
        image_size=224, patch_size=16, width=768, layers=12, heads=12, embed_dim=768)),
    _spec("unicom:ViT-L/14", "unicom", UnicomArch(
        image_size=224, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768)),
    _spec("unicom:ViT-L/14@336px", "unicom", UnicomArch(
        image_size=336, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768)),
)}
# Per source: the published files, their cache folder, and the `weights` label they load under.
_PUBLISHED = {"clip": (CLIP_RELEASES, clip_cache_dir, "openai"),
              "unicom": (UNICOM_RELEASES, unicom_cache_dir, "unicom")}


def _open_clip_spec(name: str) -> ModelSpec:
    arch = open_clip_models.architecture(name)
    facts = open_clip_models.facts(arch)
    return ModelSpec(f"{open_clip_models.PREFIX}{arch}", "open_clip", facts["embed_dim"],
                     facts["input_size"],
                     {"architecture": arch, "context_length": facts["context_length"]},
                     mean=facts["mean"], std=facts["std"])


def _weight_words(source: str) -> tuple[str, ...]:
    """What `weights=` accepts for a source's own weights: `pretrained`, or the published label."""
    published = _PUBLISHED.get(source)
    return ("pretrained",) if published is None else ("pretrained", published[2])


def list_models() -> list[ModelSpec]:
    """Every model `create_model` knows, tiny first, then CLIP, then UNICOM."""
    return list(_SPECS.values())


def get_spec(name: str) -> ModelSpec:
    """The spec of a registry name (or of `open_clip:<architecture>`); a ModelError lists the
    known names."""
    if name.startswith(open_clip_models.PREFIX):
        return _open_clip_spec(name)
    if name not in _SPECS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(_SPECS)} "
                         f"(or a runs:/<run_id>/model URI of a logged model)")
    return _SPECS[name]


def create_model(name: str, weights: str = "pretrained", device: str | torch.device = "cpu",
                 seed: int = 0) -> Encoder:
    """The encoder `name` (see `list_models`) in fp32 and eval mode on `device`.

    `weights`: `pretrained` (OpenAI's for CLIP, UNICOM's, tiny's fixed seed-0 init; `openai` and
    `unicom` are synonyms), `none` (a random init drawn from `seed` alone, so every process and
    every trial with one seed builds the same weights), or the path of a file: an OpenAI
    TorchScript archive, a plain state dict, or a taxonclip checkpoint of the same model.
    """
    return load_encoder(get_spec(name), weights, seed).to(device).eval()


def is_published(source: str, weights: str) -> bool:
    """Whether `weights` names the published weights of a model of `source` (`pretrained`)."""
    return weights.strip().lower() in _weight_words(source)


def load_encoder(spec: ModelSpec, weights: str = "pretrained", seed: int = 0) -> Encoder:
    """The encoder of any spec, also one outside the registry; `weights` and `seed` as in
    `create_model`."""
    word = weights.strip().lower()
    words = _weight_words(spec.source)
    if word == "none":
        with torch.random.fork_rng(devices=[]):
            # a stream of its own, so that seed 0 is not tiny's published init
            torch.manual_seed(zlib.crc32(f"init:{seed}".encode()))
            return _random_encoder(spec, "none")
    if word in words:
        return _pretrained_encoder(spec)
    if spec.source == "open_clip" and weights.startswith(open_clip_models.HUB_PREFIX):
        return _encoder_from_file(spec, open_clip_models.hub_file(weights), label=weights)
    path = Path(weights).expanduser()
    if not path.is_file():
        hub = (f", or hf-hub:<org>/<name> of the Hugging Face cache (BioCLIP: weights="
               f"hf-hub:imageomics/bioclip, or the path of its {open_clip_models.WEIGHT_FILES[0]})"
               if spec.source == "open_clip" else "")
        raise ModelError(f"weights {weights!r} for {spec.name}: not a file; weights= takes "
                         f"{', '.join(words + ('none',))} or the path of a weights file{hub}")
    return _encoder_from_file(spec, path)


def encoder_from_config(config: dict, state_dict: dict | None = None) -> Encoder:
    """Rebuild an encoder from `Encoder.config()` (as stored in a checkpoint's "model" key) with
    no download; with `state_dict` (the encoder's own), load it strictly, else random init."""
    spec = spec_from_config(config)
    weights = str(config.get("weights", "none"))
    if state_dict is None:
        return _random_encoder(spec, weights)
    return _loaded_encoder(spec, weights, state_dict, "the checkpoint's state dict")


def spec_from_config(config: dict) -> ModelSpec:
    """The ModelSpec inside an `Encoder.config()` dict (lists from JSON become tuples again)."""
    try:
        fields = dict(config["spec"])
        spec = ModelSpec(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"model config is not one written by Encoder.config(): "
                         f"{type(error).__name__}: {error}") from None
    if spec.source not in SOURCES:
        raise ModelError(f"model config names source {spec.source!r}; known: {', '.join(SOURCES)}")
    return spec


def _towers(spec: ModelSpec) -> tuple[nn.Module, nn.Module | None]:
    if spec.source == "unicom":
        return UnicomViT(**spec.arch), None
    if spec.source == "open_clip":
        return open_clip_models.towers(spec.arch["architecture"])
    return clip_towers(spec.arch)


def _random_encoder(spec: ModelSpec, weights: str) -> Encoder:
    if spec.source == "tiny" and weights == TINY_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            return Encoder(spec, weights, *_towers(spec))
    return Encoder(spec, weights, *_towers(spec))


def _loaded_encoder(spec: ModelSpec, weights: str, state_dict: dict, origin: str) -> Encoder:
    if spec.source == "open_clip":
        # open_clip keeps buffers outside the state dict (the text attention mask), which an
        # allocation without initialisation would leave as garbage
        encoder = Encoder(spec, weights, *_towers(spec))
        check_state_dict(encoder.state_dict(), state_dict, origin, spec.name)
        encoder.load_state_dict(state_dict)
        return encoder
    # Built on the meta device and then allocated without initialisation: a random init of the
    # large models would take seconds only to be overwritten.
    with torch.device("meta"):
        encoder = Encoder(spec, weights, *_towers(spec))
    check_state_dict(encoder.state_dict(), state_dict, origin, spec.name)
    encoder.to_empty(device="cpu")
    encoder.load_state_dict(state_dict)
    return encoder


def _pretrained_encoder(spec: ModelSpec) -> Encoder:
    if spec.source == "tiny":
        return _random_encoder(spec, TINY_WEIGHTS)
    if spec.source == "open_clip":
        raise ModelError(f"{spec.name}: open_clip weights come from a file or the Hugging Face "
                         f"cache: weights=/path/{open_clip_models.WEIGHT_FILES[0]} or "
                         f"weights=hf-hub:<org>/<name> (BioCLIP: hf-hub:imageomics/bioclip)")
    releases, cache_dir, label = _PUBLISHED[spec.source]
    if spec.name not in releases:
        raise ModelError(f"model {spec.name} has no published weights; pass weights=none or a path")
    path = cached_release(spec.name, releases[spec.name], cache_dir())
    state_dict = _encoder_keys(spec, read_weights_file(path))
    return _loaded_encoder(spec, label, state_dict, str(path))


def _encoder_from_file(spec: ModelSpec, path: Path, label: str | None = None) -> Encoder:
    stored = (open_clip_models.read_weights(path) if path.suffix == ".safetensors"
              else read_weights_file(path))
    if is_checkpoint(stored):
        saved = spec_from_config(stored["model"])
        if saved.name != spec.name:
            raise ModelError(f"{path} is a checkpoint of model {saved.name}, not {spec.name}; "
                             f"use model={saved.name}")
        return _loaded_encoder(saved, str(path), stored["state_dict"], str(path))
    return _loaded_encoder(spec, label or str(path), _encoder_keys(spec, stored), str(path))


def _encoder_keys(spec: ModelSpec, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A published or plain state dict in the encoder's key layout (`visual.*`, `text.*`)."""
    if spec.source == "unicom":
        return {key if key.startswith("visual.") else f"visual.{key}": value
                for key, value in state_dict.items()}
    if spec.source == "open_clip":
        return open_clip_models.to_encoder_keys(state_dict)
    return to_encoder_keys(state_dict)
