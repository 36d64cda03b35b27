"""The embedded captioner: a tiny LLaVA (a 2-layer CLIP vision tower, a 2-layer Llama) with random
weights of a fixed seed and a word-level vocabulary, built in code, so that the command, the demo
and the tests run with no download. Its captions are nonsense words (w0 ... w55)."""

from __future__ import annotations

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
WORDS = tuple(f"w{i}" for i in range(56))
# the chat template of the processor: the image's tokens, the prompt, then the answer's start
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}<s>{% endif %}")


def build_model_and_processor():
    """The tiny random LLaVA and its processor (the same weights on every call)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    vocab = {word: i for i, word in enumerate((*SPECIAL, *WORDS))}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}, padding_side="left")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer,
                               chat_template=CHAT_TEMPLATE, patch_size=PATCH,
                               vision_feature_select_strategy="full",
                               num_additional_image_tokens=1)
    return model, processor


def build(reference: str, options: CaptionerOptions) -> TransformersCaptioner:
    """The tiny captioner on `options.device`."""
    model, processor = build_model_and_processor()
    return from_objects(model, processor, NAME, REVISION, options, note=NOTE)
