"""The captioner interface and its registry: a model that writes one text per image, given a
prompt per image. A new captioner is one module with a `build(model, options)` and one line in
`CAPTIONERS`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

# captioner name -> module holding `build(reference, options) -> Captioner`
CAPTIONERS = {
    "tiny": "taxonclip.captions.tiny",
    "transformers": "taxonclip.captions.hf",
}
DEFAULT_CAPTIONER = "transformers"  # a model named by a folder or id alone


@dataclass(frozen=True)
class CaptionerOptions:
    """How a captioner is loaded and run (from CaptionConfig)."""

    device: str
    dtype: str  # float32, bfloat16 or float16, resolved from `auto` by the caller
    max_new_tokens: int
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Generated:
    """One caption and how many tokens were generated for it."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Described:
    """What a captioner is, for the run's record and the captions file's metadata."""

    model: str
    revision: str
    dtype: str
    generation: dict = field(default_factory=dict)
    note: str = ""  # said once before captioning (the tiny model's: its captions are nonsense)


class Captioner(Protocol):
    """Writes one caption per image; `prompts[i]` is the question asked of `images[i]`."""

    described: Described

    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[Generated]:
        """One generated caption per image, in order."""
        ...


def parse_model(model: str) -> tuple[str, str]:
    """(captioner, reference) of a `model` parameter: `tiny`, `<captioner>:<reference>`, or a
    folder or id alone (the transformers captioner)."""
    if model in CAPTIONERS:
        return model, ""
    kind, sep, reference = model.partition(":")
    if sep and kind in CAPTIONERS:
        return kind, reference
    return DEFAULT_CAPTIONER, model


def build_captioner(model: str, options: CaptionerOptions) -> Captioner:
    """The captioner `model` names, loaded (a bad model ends in one ModelError)."""
    kind, reference = parse_model(model)
    return importlib.import_module(CAPTIONERS[kind]).build(reference, options)
