"""The embedded captioner: a tiny LLaVA (a 2-layer CLIP vision tower, a 2-layer Llama) with random
weights of a fixed seed and a word-level vocabulary, built in code, so that the command, the demo
and the tests run with no download. Its captions are nonsense words (w0 ... w55). The same
builder makes a random model of about 2 billion parameters for throughput measurements."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taxonclip.captions.base import CaptionerOptions
from taxonclip.captions.hf import TransformersCaptioner, from_objects

NAME = "tiny"
REVISION = "tiny-random-v1"  # changes when what `build_model` builds changes
NOTE = ("model=tiny is a tiny random image-text-to-text model: its captions are nonsense words, "
        "for trying the command; give a model folder for real captions")
SEED = 0
IMAGE_SIZE, PATCH = 32, 8
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


@dataclass(frozen=True)
class Sizes:
    """The shape of a random LLaVA: vision tower, language model and vocabulary."""

    vision_width: int = 32
    vision_mlp: int = 64
    vision_layers: int = 2
    image_size: int = IMAGE_SIZE
    patch: int = PATCH
    text_width: int = 32
    text_layers: int = 2
    text_mlp: int = 64
    heads: int = 2
    words: int = 56


TINY = Sizes()
# about 1.9 billion parameters: a CLIP ViT-L/14@336px-sized tower and a 28-layer, 2048-wide Llama
# (the size of the research group's InternVL2-2B), for throughput measurements
TWO_B = Sizes(vision_width=1024, vision_mlp=4096, vision_layers=24, image_size=336, patch=14, text_width=2048,
              text_layers=28, text_mlp=5632, heads=16, words=32000)
# the chat template of the processor: the image's tokens, the prompt, then the answer's start
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}<s>{% endif %}")


def build_model_and_processor(sizes: Sizes = TINY, device: str = "cpu"):
    """A random LLaVA of `sizes` (the tiny one by default) and its processor, built on `device`;
    the same weights on every call."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    vocab = {word: i for i, word in enumerate((*SPECIAL, *(f"w{i}" for i in range(sizes.words))))}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}, padding_side="left")
    vision = CLIPVisionConfig(hidden_size=sizes.vision_width,
                              intermediate_size=sizes.vision_mlp,
                              num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.heads,
                              image_size=sizes.image_size, patch_size=sizes.patch,
                              projection_dim=sizes.vision_width)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=sizes.text_width,
                       intermediate_size=sizes.text_mlp, num_hidden_layers=sizes.text_layers,
                       num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads,
                       max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    images = CLIPImageProcessor(size={"shortest_edge": sizes.image_size},
                                crop_size={"height": sizes.image_size, "width": sizes.image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer,
                               chat_template=CHAT_TEMPLATE, patch_size=sizes.patch,
                               vision_feature_select_strategy="full",
                               num_additional_image_tokens=1)
    return model, processor


def build(reference: str, options: CaptionerOptions) -> TransformersCaptioner:
    """The tiny captioner on `options.device`."""
    model, processor = build_model_and_processor()
    return from_objects(model, processor, NAME, REVISION, options, note=NOTE)
