"""The tiny family (source `tiny`): a CLIP architecture of 2 layers and width 64 on 32-pixel
images, for the tests and the demo. It has no published weights: its `pretrained` is a fixed
random init, the same from run to run, labelled `seed:0`."""

from __future__ import annotations

from taxonclip.models.clip_models import ClipAdapter, ClipArch
from taxonclip.models.encoder import Encoder, ModelSpec, arch_spec

# The seed of the tiny model's "pretrained" weights, which a fixed random init stands in for.
TINY_SEED = 0
TINY_WEIGHTS = f"seed:{TINY_SEED}"


class TinyAdapter(ClipAdapter):
    """CLIP's towers, tokenizer and key layout; a seeded init for its published weights."""

    source = "tiny"
    weight_words = ("pretrained",)
    specs = (arch_spec("tiny", "tiny", ClipArch(
        embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
        transformer_width=64, transformer_heads=1, transformer_layers=1)),)

    def init_seed(self, weights: str) -> int | None:
        return TINY_SEED if weights == TINY_WEIGHTS else None

    def pretrained(self, spec: ModelSpec) -> Encoder:
        return self.build(spec, TINY_WEIGHTS)


ADAPTER = TinyAdapter()
