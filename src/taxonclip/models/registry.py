"""Image encoders by name: OpenAI CLIP, UNICOM, open_clip and a tiny CLIP for tests and the demo.

    encoder = create_model("ViT-B/32")                  # OpenAI weights from ~/.cache/clip
    encoder = create_model("unicom:ViT-B/32", "none")   # the architecture, randomly initialised
    encoder = create_model("open_clip:ViT-B-16", "hf-hub:imageomics/bioclip")  # BioCLIP, cached
    embeddings = encoder(images)                        # (B, encoder.spec.embed_dim)

Each family is an adapter (`models/adapter.py`) in a module of its own; `ADAPTERS` maps a spec's
`source` to it. A checkpoint stores `{"model": encoder.config(), "state_dict": ...}`;
`encoder_from_config` rebuilds the encoder from it without any download.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

# the defaults of weights= and seed= are the configured ones
from taxonclip.config import DataConfig, ModelConfig
from taxonclip.errors import ModelError
from taxonclip.models import clip_models, open_clip_models, tiny, unicom
from taxonclip.models.adapter import ModelAdapter, missing_members
from taxonclip.models.encoder import Encoder, ModelSpec
from taxonclip.models.weights import is_checkpoint


def _registered(*adapters: ModelAdapter) -> dict[str, ModelAdapter]:
    """source -> adapter, refusing an adapter that leaves a member of the interface undefined."""
    for adapter in adapters:
        if missing := missing_members(adapter):
            raise TypeError(f"model adapter {adapter!r} does not define {', '.join(missing)}")
    return {adapter.source: adapter for adapter in adapters}


# A new family: its module, exporting ADAPTER, and one line here (listed in this order).
ADAPTERS = _registered(
    tiny.ADAPTER,
    clip_models.ADAPTER,
    unicom.ADAPTER,
    open_clip_models.ADAPTER,
)


def adapter_of(source: str) -> ModelAdapter:
    """The adapter of a spec's `source`; a ModelError names the known ones."""
    if source not in ADAPTERS:
        raise ModelError(f"model config names source {source!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[source]


def list_models() -> list[ModelSpec]:
    """Every model `create_model` knows by a listed name: tiny first, then CLIP, then UNICOM."""
    return [spec for adapter in ADAPTERS.values() for spec in adapter.specs]


def get_spec(name: str) -> ModelSpec:
    """The spec of a registry name (or of `open_clip:<architecture>`); a ModelError lists the
    known names."""
    for adapter in ADAPTERS.values():
        if (spec := adapter.spec_of(name)) is not None:
            return spec
    raise ModelError(f"unknown model {name!r}; known models: "
                     f"{', '.join(spec.name for spec in list_models())} "
                     f"(or a runs:/<run_id>/model URI of a logged model)")


def create_model(name: str, weights: str = ModelConfig.weights,
                 device: str | torch.device = "cpu", seed: int = DataConfig.seed) -> Encoder:
    """The encoder `name` (see `list_models`) in fp32 and eval mode on `device`.

    `weights`: `pretrained` (OpenAI's for CLIP, UNICOM's, tiny's fixed seed-0 init; `openai` and
    `unicom` are synonyms), `none` (a random init drawn from `seed` alone, so every process and
    every trial with one seed builds the same weights), or the path of a file: an OpenAI
    TorchScript archive, a plain state dict, or a taxonclip checkpoint of the same model.
    """
    return load_encoder(get_spec(name), weights, seed).to(device).eval()


def is_published(source: str, weights: str) -> bool:
    """Whether `weights` names the published weights of a model of `source` (`pretrained`)."""
    return weights.strip().lower() in adapter_of(source).weight_words


def load_encoder(spec: ModelSpec, weights: str = ModelConfig.weights,
                 seed: int = DataConfig.seed) -> Encoder:
    """The encoder of any spec, also one outside the registry; `weights` and `seed` as in
    `create_model`."""
    adapter = adapter_of(spec.source)
    word = weights.strip().lower()
    if word == "none":
        with torch.random.fork_rng(devices=[]):
            # a stream of its own, so that seed 0 is not tiny's published init
            torch.manual_seed(zlib.crc32(f"init:{seed}".encode()))
            return adapter.build(spec, "none")
    if word in adapter.weight_words:
        return adapter.pretrained(spec)
    referenced = adapter.referenced_file(weights)
    if referenced is not None:
        return _encoder_from_file(adapter, spec, referenced, label=weights)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"weights {weights!r} for {spec.name}: not a file; weights= takes "
                         f"{', '.join(adapter.weight_words + ('none',))} or the path of a "
                         f"weights file{adapter.weights_help}")
    return _encoder_from_file(adapter, spec, path)


def encoder_from_config(config: dict, state_dict: dict | None = None) -> Encoder:
    """Rebuild an encoder from `Encoder.config()` (as stored in a checkpoint's "model" key) with
    no download; with `state_dict` (the encoder's own), load it strictly, else random init."""
    spec = spec_from_config(config)
    weights = str(config.get("weights", "none"))
    adapter = adapter_of(spec.source)
    if state_dict is None:
        return adapter.build(spec, weights)
    return adapter.load(spec, weights, state_dict, "the checkpoint's state dict")


def spec_from_config(config: dict) -> ModelSpec:
    """The ModelSpec inside an `Encoder.config()` dict (lists from JSON become tuples again)."""
    try:
        fields = dict(config["spec"])
        spec = ModelSpec(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"model config is not one written by Encoder.config(): "
                         f"{type(error).__name__}: {error}") from None
    adapter_of(spec.source)
    return spec


def _encoder_from_file(adapter: ModelAdapter, spec: ModelSpec, path: Path,
                       label: str | None = None) -> Encoder:
    stored = adapter.read_weights(path)
    if is_checkpoint(stored):
        saved = spec_from_config(stored["model"])
        if saved.name != spec.name:
            raise ModelError(f"{path} is a checkpoint of model {saved.name}, not {spec.name}; "
                             f"use model={saved.name}")
        return adapter_of(saved.source).load(saved, str(path), stored["state_dict"], str(path))
    return adapter.load(spec, label or str(path), adapter.encoder_keys(stored), str(path))
