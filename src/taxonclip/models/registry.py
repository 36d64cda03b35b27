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
    """What a registry name stands for; `arch` rebuilds the architecture without any weights."""

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


def _clip_spec(name: str, embed_dim: int, resolution: int, layers: int, width: int, patch: int,
               text_width: int, text_heads: int, text_layers: int,
               source: str = "clip") -> ModelSpec:
    arch = dict(embed_dim=embed_dim, image_resolution=resolution, vision_layers=layers,
                vision_width=width, vision_patch_size=patch, context_length=77, vocab_size=49408,
                transformer_width=text_width, transformer_heads=text_heads,
                transformer_layers=text_layers)
    return ModelSpec(name, source, embed_dim, resolution, arch)


def _unicom_spec(name: str, embed_dim: int, resolution: int, layers: int, width: int, patch: int,
                 heads: int) -> ModelSpec:
    arch = dict(image_size=resolution, patch_size=patch, width=width, layers=layers, heads=heads,
                embed_dim=embed_dim)
    return ModelSpec(name, "unicom", embed_dim, resolution, arch)


_SPECS = {spec.name: spec for spec in (
    _clip_spec("tiny", 64, 32, 2, 64, 8, 64, 1, 1, source="tiny"),
    _clip_spec("ViT-B/32", 512, 224, 12, 768, 32, 512, 8, 12),
    _clip_spec("ViT-B/16", 512, 224, 12, 768, 16, 512, 8, 12),
    _clip_spec("ViT-L/14", 768, 224, 24, 1024, 14, 768, 12, 12),
    _clip_spec("ViT-L/14@336px", 768, 336, 24, 1024, 14, 768, 12, 12),
    _unicom_spec("unicom:ViT-B/32", 512, 224, 12, 768, 32, 12),
    _unicom_spec("unicom:ViT-B/16", 768, 224, 12, 768, 16, 12),
    _unicom_spec("unicom:ViT-L/14", 768, 224, 24, 1024, 14, 16),
    _unicom_spec("unicom:ViT-L/14@336px", 768, 336, 24, 1024, 14, 16),
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
