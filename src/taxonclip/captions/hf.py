"""The transformers captioner: any image-text-to-text model that transformers' own auto classes
load (`AutoModelForImageTextToText` + `AutoProcessor`), prompted through the processor's chat
template, generating greedily for a batch of images at once with left padding.

The model comes from a local folder, or by its Hugging Face id from `$HF_HUB_CACHE`; nothing is
downloaded. `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from PIL import Image

from taxonclip.captions.base import CaptionerOptions, Described, Generated
from taxonclip.errors import ModelError

GENERATION = {"do_sample": False, "num_beams": 1}  # greedy: the same caption on every run


def hub_cache() -> Path:
    """Where Hugging Face models are cached: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return home / "hub"


def locate(reference: str) -> tuple[Path, str]:
    """The folder of the model `reference` (a folder, or an id `org/name` in the hub cache) and
    its revision (the cache's snapshot hash, else a digest of the folder's files)."""
    folder = Path(reference).expanduser()
    if folder.is_dir():
        return folder.resolve(), _revision(folder.resolve())
    cached = hub_cache() / f"models--{reference.replace('/', '--')}"
    snapshot = _snapshot(cached)
    if snapshot is not None:
        return snapshot, snapshot.name
    raise ModelError(
        f"captioning model {reference!r} not found: no folder {folder.resolve()} and no "
        f"{cached}. Place the model's folder (config.json, its weights, and the processor's "
        f"files: tokenizer, image processor, chat template) there and pass its path, or on a "
        f"machine online run `hf download {reference}` and copy its models--"
        f"{reference.replace('/', '--')} folder into {hub_cache()} ($HF_HUB_CACHE)")


def _snapshot(cached: Path) -> Path | None:
    """The snapshot `refs/main` points to, else the newest one; None when there is none."""
    main = cached / "refs" / "main"
    if main.is_file() and (cached / "snapshots" / main.read_text().strip()).is_dir():
        return cached / "snapshots" / main.read_text().strip()
    snapshots = sorted((cached / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def _revision(folder: Path) -> str:
    """A snapshot's hash (a folder inside a hub cache), else a digest of the folder's config
    and the names and sizes of its files: a changed model gets another revision."""
    if folder.parent.name == "snapshots":
        return folder.name
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}\n".encode())
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return f"files-{digest.hexdigest()[:16]}"


class TransformersCaptioner:
    """A loaded model and processor; `caption` runs one batch."""

    def __init__(self, model, processor, described: Described, device: torch.device) -> None:
        self.model, self.processor, self.described, self.device = model, processor, described, device
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ModelError(f"{described.model}: its processor has no tokenizer to write the "
                             f"prompts and read the captions")
        # a processor without a chat template (BLIP) continues the prompt as the caption's start
        self.chat = getattr(processor, "chat_template", None) is not None
        tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.tokenizer = tokenizer
        self.max_new_tokens = int(described.generation["max_new_tokens"])

    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[Generated]:
        """Greedy captions of a batch of images, one prompt each."""
        texts = ([self.processor.apply_chat_template(_messages(prompt), add_generation_prompt=True)
                  for prompt in prompts] if self.chat else list(prompts))
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **GENERATION)
        new = out[:, _prompt_length(out, inputs["input_ids"]):].cpu()
        texts_out = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [Generated(text.strip(), _generated_count(row, self._stop_ids()))
                for text, row in zip(texts_out, new)]

    def _stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids or {self.tokenizer.pad_token_id}


def _prompt_length(out: torch.Tensor, input_ids: torch.Tensor) -> int:
    """Where the generated tokens begin: after the prompt that `generate` repeats, all of it
    (decoder-only models) or without its closing separator (BLIP)."""
    length = min(input_ids.shape[1], out.shape[1])
    same = (out[:, :length] == input_ids[:, :length]).all(dim=0).tolist()
    return same.index(False) if False in same else length


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def _generated_count(row: torch.Tensor, stop_ids: set[int]) -> int:
    """Tokens generated for one row: up to and including its first stop token (the rest of a
    batch's rows are padding once a row stops)."""
    for position, token in enumerate(row.tolist()):
        if token in stop_ids:
            return position + 1
    return len(row)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def from_objects(model, processor, name: str, revision: str,
                 options: CaptionerOptions, note: str = "") -> TransformersCaptioner:
    """A captioner of a model and processor already built (the tiny model's path)."""
    device = torch.device(options.device)
    model = model.to(device=device, dtype=torch_dtype(options.dtype)).eval()
    described = Described(model=name, revision=revision, dtype=options.dtype,
                          generation={"max_new_tokens": options.max_new_tokens, **GENERATION},
                          note=note)
    return TransformersCaptioner(model, processor, described, device)


def build(reference: str, options: CaptionerOptions) -> TransformersCaptioner:
    """Load the model `reference` names, offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, revision = locate(reference)
    trust = options.trust_remote_code
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=trust,
                                                            dtype=torch_dtype(options.dtype))
    except ValueError as err:  # transformers' word for "no such head for this config"
        raise ModelError(_no_head_message(reference, folder, err, trust)) from None
    except (OSError, KeyError) as err:
        raise ModelError(f"cannot load the captioning model {reference!r} from {folder}: "
                         f"{str(err).splitlines()[0]}") from None
    return from_objects(model, processor, reference, revision, options)


def _no_head_message(reference: str, folder: Path, err: Exception, trust: bool) -> str:
    first = str(err).splitlines()[0]
    if "trust_remote_code" in first and not trust:
        return (f"{reference!r} ({folder}) needs its own Python code to load: pass "
                f"trust_remote_code=true if you trust it, or use a model native to transformers")
    return (f"{reference!r} ({folder}) has no image-text-to-text head: transformers' "
            f"AutoModelForImageTextToText and AutoProcessor do not take it ({first}); use a "
            f"vision-language model such as SmolVLM, Qwen2-VL, InternVL3 (-hf) or BLIP")
