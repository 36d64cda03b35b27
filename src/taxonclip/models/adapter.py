"""The interface of a model family. Each family (clip, tiny, unicom, open_clip) is one module
exporting one `ModelAdapter` as `ADAPTER`; `registry.py` maps each adapter's `source` to it.

An adapter says which models it lists, builds their towers, maps weights files onto its key
layout, loads its published weights and tokenizes captions for its text tower. Building an
encoder, seeded or from a state dict, is the same for every family and lives here.

To add a family: a module with a `ModelAdapter` subclass (its class attributes set, its abstract
methods defined), `ADAPTER = TheAdapter()`, and one line in `registry.ADAPTERS`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taxonclip.errors import ModelError
from taxonclip.models.encoder import Encoder, ModelSpec, Tokenizer
from taxonclip.models.weights import Release, cached_release, check_state_dict, read_weights_file

SAFETENSORS_SUFFIX = ".safetensors"


class ModelAdapter(abc.ABC):
    """One model family. Subclasses set the class attributes below and define the abstract
    methods; the other methods have defaults that most families keep."""

    source: str  # the family's name in ModelSpec.source, as checkpoints store it
    has_text: bool  # whether its encoders have a text tower (zero-shot, caption embeddings)
    # what `weights=` accepts for the published weights, `pretrained` first, then the label the
    # published weights load under (an encoder's `weights`)
    weight_words: tuple[str, ...]
    specs: tuple[ModelSpec, ...]  # the models `taxonclip models` lists, in order

    # Text added to the message for a `weights=` that is no file: the family's other references.
    weights_help: str = ""
    # Whether the towers may be built on the meta device and allocated uninitialised before a
    # state dict fills them: False where a tower keeps buffers outside its state dict.
    loads_uninitialised: bool = True

    @abc.abstractmethod
    def towers(self, spec: ModelSpec) -> tuple[nn.Module, nn.Module | None]:
        """The image tower and the text tower (None without one) of `spec`, randomly initialised
        from torch's default generator, in fp32."""

    @abc.abstractmethod
    def tokenizer(self, spec: ModelSpec) -> Tokenizer | None:
        """Captions -> the token ids `spec`'s text tower takes (None without a text tower)."""

    @abc.abstractmethod
    def encoder_keys(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A published or plain state dict of the family in the encoder's key layout
        (`visual.*`, `text.*`)."""

    @abc.abstractmethod
    def pretrained(self, spec: ModelSpec) -> Encoder:
        """The encoder of `spec` with the family's published weights, or a ModelError saying
        where they come from."""

    def spec_of(self, name: str) -> ModelSpec | None:
        """The spec of `name` if it is one of this family's models, else None (a family that
        builds models by pattern, like `open_clip:<architecture>`, overrides it)."""
        return next((spec for spec in self.specs if spec.name == name), None)

    def init_seed(self, weights: str) -> int | None:
        """The seed of the fixed init that a `weights` label stands for (tiny's `seed:0`), or
        None: an init from torch's generator as it is."""
        return None

    def referenced_file(self, weights: str) -> Path | None:
        """The weights file that a `weights=` reference other than a path names (open_clip's
        `hf-hub:<org>/<name>`), or None."""
        return None

    def read_weights(self, path: Path) -> dict[str, Any]:
        """The dict stored in a weights file: safetensors, or what `read_weights_file` reads."""
        return read_weights(path)

    def build(self, spec: ModelSpec, weights: str) -> Encoder:
        """A freshly initialised encoder of `spec` labelled `weights`; the fixed init of
        `init_seed(weights)` where there is one, leaving torch's generator as it was."""
        seed = self.init_seed(weights)
        if seed is None:
            return Encoder(spec, weights, *self.towers(spec), self.tokenizer(spec))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Encoder(spec, weights, *self.towers(spec), self.tokenizer(spec))

    def load(self, spec: ModelSpec, weights: str, state_dict: Mapping[str, Any],
             origin: str) -> Encoder:
        """The encoder of `spec` with `state_dict` (in the encoder's layout, from `origin`),
        loaded strictly after a check that names any key that does not fit."""
        if not self.loads_uninitialised:
            encoder = Encoder(spec, weights, *self.towers(spec), self.tokenizer(spec))
            check_state_dict(encoder.state_dict(), state_dict, origin, spec.name)
            encoder.load_state_dict(state_dict)
            return encoder
        # Built on the meta device and then allocated without initialisation: a random init of
        # the large models would take seconds only to be overwritten.
        with torch.device("meta"):
            encoder = Encoder(spec, weights, *self.towers(spec), self.tokenizer(spec))
        check_state_dict(encoder.state_dict(), state_dict, origin, spec.name)
        encoder.to_empty(device="cpu")
        encoder.load_state_dict(state_dict)
        return encoder

    def load_release(self, spec: ModelSpec, releases: Mapping[str, Release],
                     folder: Path) -> Encoder:
        """`spec` with its file of `releases` from `folder` (downloaded there first where it is
        not), labelled with the family's published label (the last of `weight_words`)."""
        if spec.name not in releases:
            raise ModelError(f"model {spec.name} has no published weights; pass weights=none "
                             f"or a path")
        path = cached_release(spec.name, releases[spec.name], folder)
        state_dict = self.encoder_keys(self.read_weights(path))
        return self.load(spec, self.weight_words[-1], state_dict, str(path))


def read_weights(path: Path) -> dict[str, Any]:
    """The dict stored in a weights file: a `.safetensors` file's tensors, or what
    `read_weights_file` reads (a TorchScript archive's state dict, a torch.save dict)."""
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        from taxonclip.models.weights import unreadable_weights

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors reports a damaged file under several types
            raise unreadable_weights(path, error) from None
    return read_weights_file(path)


def missing_members(adapter: ModelAdapter | type) -> list[str]:
    """The members of the interface that an adapter (or its class) leaves undefined: abstract
    methods it does not define and class attributes it does not set."""
    cls = adapter if isinstance(adapter, type) else type(adapter)
    if not issubclass(cls, ModelAdapter):
        return ["(not a ModelAdapter)"]
    declared = {name for klass in ModelAdapter.__mro__ for name in vars(klass).get(
        "__annotations__", {})}
    unset = sorted(name for name in declared if not hasattr(cls, name))
    return sorted(getattr(cls, "__abstractmethods__", ())) + unset
