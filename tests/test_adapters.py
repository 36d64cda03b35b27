"""Model families as adapters: every registered adapter implements the whole interface, an
incomplete one is named and refused, and a new family needs its module and one registry entry
only (names, random and loaded encoders, checkpoints and its own tokenizer all follow)."""

from __future__ import annotations

import json

import pytest
import torch

from taxonclip.errors import ModelError
from taxonclip.models import create_model, encoder_from_config, get_spec, list_models, registry
from taxonclip.models.adapter import ModelAdapter, missing_members
from taxonclip.models.clip_models import ClipArch
from taxonclip.models.encoder import arch_spec
from taxonclip.models.tiny import TinyAdapter

MINI = ClipArch(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=64,
                vision_patch_size=8, transformer_width=32, transformer_heads=1,
                transformer_layers=1)


class MiniAdapter(TinyAdapter):
    """A family of its own for the tests: a smaller CLIP under the source `mini`, whose
    tokenizer maps every caption to the same ids."""

    source = "mini"
    specs = (arch_spec("mini", "mini", MINI),)

    def tokenizer(self, spec):
        def same_tokens(texts):
            return torch.tensor([[49406, 320, 49407] + [0] * 74] * len(texts))
        return same_tokens


@pytest.fixture
def mini(monkeypatch) -> MiniAdapter:
    adapter = MiniAdapter()
    monkeypatch.setattr(registry, "ADAPTERS", registry._registered(
        *registry.ADAPTERS.values(), adapter))
    return adapter


@pytest.mark.parametrize("source", list(registry.ADAPTERS))
def test_every_registered_adapter_implements_the_whole_interface(source):
    adapter = registry.ADAPTERS[source]
    assert isinstance(adapter, ModelAdapter)
    assert missing_members(adapter) == []
    assert adapter.source == source and adapter.weight_words[0] == "pretrained"
    for spec in adapter.specs:
        assert spec.source == source and adapter.spec_of(spec.name) is spec


@pytest.mark.parametrize("spec", list_models(), ids=lambda spec: spec.name)
def test_an_adapter_says_whether_its_encoders_have_a_text_tower(spec):
    adapter = registry.adapter_of(spec.source)
    with torch.device("meta"):
        encoder = adapter.build(spec, "none")
    assert encoder.has_text == adapter.has_text
    assert (adapter.tokenizer(spec) is None) == (not adapter.has_text)


def test_an_adapter_missing_a_member_is_named_and_refused():
    class NoTokenizer(ModelAdapter):
        source, has_text, weight_words, specs = "notok", True, ("pretrained",), ()
        towers = encoder_keys = pretrained = TinyAdapter.towers

    assert missing_members(NoTokenizer) == ["tokenizer"]
    with pytest.raises(TypeError, match="tokenizer"):
        NoTokenizer()

    class NoText(ModelAdapter):
        source, weight_words, specs = "notext", ("pretrained",), ()
        towers = tokenizer = encoder_keys = pretrained = None

    assert missing_members(NoText) == ["has_text"]
    with pytest.raises(TypeError, match="does not define has_text"):
        registry._registered(NoText())
    assert missing_members(object()) == ["(not a ModelAdapter)"]


def test_a_new_family_is_its_module_and_one_registry_entry(mini, tmp_path):
    assert get_spec("mini") is mini.specs[0] and list_models()[-1].name == "mini"
    encoder = create_model("mini", "none", seed=3)
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 16)
    assert registry.is_published("mini", "pretrained")
    assert create_model("mini").weights == "seed:0"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": encoder.config(), "state_dict": encoder.state_dict()}, path)
    rebuilt = [create_model("mini", str(path)),
               encoder_from_config(json.loads(json.dumps(encoder.config())), encoder.state_dict())]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for other in rebuilt:
            assert other.spec.source == "mini"
            torch.testing.assert_close(other(images), encoder(images), rtol=0, atol=0)


def test_encode_text_uses_the_familys_tokenizer(mini):
    encoder = create_model("mini", "none")
    with torch.no_grad():
        different = encoder.encode_text(["Danaus plexippus", "a photo of a fish"])
    # the family's tokenizer gives both captions the same ids, so the same embedding
    torch.testing.assert_close(different[0], different[1], rtol=0, atol=0)
    with torch.no_grad():
        tiny = create_model("tiny").encode_text(["Danaus plexippus", "a photo of a fish"])
    assert not torch.equal(tiny[0], tiny[1])


def test_an_unknown_source_names_the_known_ones():
    with pytest.raises(ModelError, match="source 'timm'; known: tiny, clip, unicom, open_clip"):
        registry.adapter_of("timm")
