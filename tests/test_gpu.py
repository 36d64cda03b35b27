"""What only a CUDA device runs: JPEGs decoded on it, bf16 autocast, the fused AdamW, torch.compile,
NCCL's object collectives, and a training step on it against the same step on the CPU.

Marked `gpu`: `make test` deselects them (pyproject's addopts), `bench/device_check.sh` runs them
with `-m gpu`; without CUDA each is skipped, saying so."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from taxonclip.config import LossConfig, TrainConfig
from taxonclip.models import create_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size[0] * 4, size[1] * 4)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_decode_device_gives_the_images_the_cpu_decodes():
    """nvJPEG on the device and the decoder of the workers agree to within JPEG's rounding."""
    from taxonclip.data.streams import DeviceDecoder, Encoded

    encoder = create_model("tiny", "pretrained")
    identity = lambda image: image.float()  # noqa: E731 - the decode alone is compared
    jpegs = [_jpeg(seed, (40 + seed, 30)) for seed in range(3)]
    encoded = [Encoded()({"jpg": data}) for data in jpegs]
    on_device = [DeviceDecoder(identity, CUDA)([image])[0] for image in encoded]
    on_cpu = [torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
              for data in jpegs]

    for device_image, cpu_image in zip(on_device, on_cpu):
        assert device_image.device.type == "cuda" and device_image.shape == cpu_image.shape
        assert (device_image.cpu() - cpu_image.float()).abs().mean() < 2.0
    batch = DeviceDecoder(encoder.tensor_transform(train=False), CUDA)(encoded)
    assert batch.shape == (3, 3, encoder.spec.input_size, encoder.spec.input_size)


def test_bf16_autocast_runs_the_matrix_products_in_bf16_close_to_fp32():
    encoder = create_model("tiny", "pretrained").to(CUDA).eval()
    images = torch.randn(4, 3, encoder.spec.input_size, encoder.spec.input_size, device=CUDA)
    with torch.no_grad():
        full = encoder(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = encoder(images)
            product = images.flatten(1)[:, :8] @ images.flatten(1)[:, :8].T

    assert product.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(full, half.float()).min() > 0.99


def test_training_on_cuda_uses_the_fused_adamw():
    from taxonclip.training.loop import build_state

    state = build_state(create_model("tiny", "pretrained"), 8, TrainConfig(), 10, CUDA)

    assert all(group["fused"] for group in state.optimizer.param_groups)


def test_torch_compile_on_cuda_gives_the_eager_embeddings():
    encoder = create_model("tiny", "pretrained").to(CUDA).eval()
    images = torch.randn(4, 3, encoder.spec.input_size, encoder.spec.input_size, device=CUDA)
    with torch.no_grad():
        eager = encoder(images)
        compiled = torch.compile(encoder)(images)

    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_nccl_gathers_objects_in_a_group_of_one():
    from taxonclip import distributed

    torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:0", rank=0, world_size=1,
                                         device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        assert torch.distributed.get_backend() == "nccl"
        assert distributed.all_gather_objects({"rows": [1, 2]}) == [{"rows": [1, 2]}]
        assert distributed.gather_objects(np.arange(3))[0].tolist() == [0, 1, 2]
    finally:
        torch.distributed.destroy_process_group()


def test_a_cuda_train_step_is_the_cpu_step_within_bf16_tolerance():
    """The same weights, batch and seed: one step on each device gives the same loss and the same
    updated weights, to within what bf16 autocast and the fused AdamW change."""
    from taxonclip.training.loop import build_state, train_step

    config = TrainConfig(lr=1e-3, weight_decay=0.01, loss=LossConfig(s=16, m2=0.2, sample_rate=1.0))
    generator = torch.Generator().manual_seed(0)
    encoder = create_model("tiny", "pretrained")
    images = torch.randn(8, 3, encoder.spec.input_size, encoder.spec.input_size, generator=generator)
    labels = torch.randint(0, 6, (8,), generator=generator)
    results = []
    for device in (CPU, CUDA):
        torch.manual_seed(0)
        state = build_state(create_model("tiny", "pretrained"), 6, config, 10, device)
        before = _weights(state)
        loss = float(train_step(state, [(images, labels)], state.replica, device))
        results.append((loss, _weights(state) - before))

    (cpu_loss, cpu_update), (cuda_loss, cuda_update) = results
    assert cuda_loss == pytest.approx(cpu_loss, rel=2e-2)
    # Adam's first step moves each weight by about lr either way: the steps agree in direction,
    # and no weight moves further than the learning rate allows
    assert torch.nn.functional.cosine_similarity(cuda_update, cpu_update, dim=0) > 0.9
    assert (cuda_update - cpu_update).abs().max() <= 2.2 * config.lr


def _weights(state) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().flatten() for p in state.encoder.visual.parameters()])
