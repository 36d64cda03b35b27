"""Training loop units: gradient accumulation, epoch order, checkpoint round trip."""

from __future__ import annotations

import copy

import torch

from taxonclip.config import LossConfig, TrainConfig
from taxonclip.distributed import DistInfo
from taxonclip.models import create_model
from taxonclip.training.checkpoint import checkpoint, restore
from taxonclip.training.data import EpochSampler
from taxonclip.training.loop import build_state, train_step


def _state(lr: float = 1e-2, classes: int = 6, sample_rate: float = 1.0):
    torch.manual_seed(0)
    encoder = create_model("tiny", "pretrained")
    config = TrainConfig(lr=lr, weight_decay=0.01, loss=LossConfig(s=16, m2=0.2, sample_rate=sample_rate))
    return build_state(encoder, classes, config, total_steps=10 * config.epochs, device=torch.device("cpu")), config


def _batch(n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 6, (n,), generator=generator)
    return images, labels


def _params(state):
    return [p.detach().clone() for p in [*state.encoder.visual.parameters(), *state.head.parameters()]]


def _grads(state):
    return [p.grad for p in [*state.encoder.visual.parameters(), *state.head.parameters()]]


def test_two_micro_batches_of_8_equal_one_batch_of_16():
    """The tiny ViT has no batch-dependent layers, so accumulation must not change the update."""
    images, labels = _batch(16, seed=1)
    whole, _ = _state()
    split, _ = _state()
    loss_whole = train_step(whole, [(images, labels)], whole.encoder, torch.device("cpu"))
    loss_split = train_step(split, [(images[:8], labels[:8]), (images[8:], labels[8:])],
                            split.encoder, torch.device("cpu"))
    assert abs(float(loss_whole) - float(loss_split)) < 1e-5
    # Compare the gradients the optimiser stepped with: Adam's first step divides by |g|, which
    # would blow float rounding in near-zero gradients up to a whole step.
    for a, b in zip(_grads(whole), _grads(split)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert whole.step == split.step == 1
    assert whole.scheduler.last_epoch == split.scheduler.last_epoch == 1


def test_optimizer_groups_use_per_group_max_lr():
    state, config = _state(lr=1e-3)
    backbone, centres = state.optimizer.param_groups
    assert centres["max_lr"] == config.lr * config.lr_pfc_weight
    assert backbone["max_lr"] == config.lr


def test_epoch_sampler_is_seeded_per_epoch_and_split_across_ranks():
    sampler = EpochSampler(10, seed=3, rank=0, world_size=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    ranks = [list(EpochSampler(10, 3, r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and not set(ranks[0]) & set(ranks[1])


def test_checkpoint_restores_the_exact_state():
    info = DistInfo(rank=0, world_size=1, device=torch.device("cpu"))
    state, config = _state(sample_rate=0.5)
    for seed in range(3):
        train_step(state, [_batch(8, seed)], state.encoder, torch.device("cpu"))
    saved = copy.deepcopy(checkpoint(state, config, [str(i) for i in range(6)]))
    expected_next = float(train_step(state, [_batch(8, 10)], state.encoder, torch.device("cpu")))
    expected_params = _params(state)

    fresh, _ = _state(sample_rate=0.5)
    restore(fresh, saved, info)
    assert fresh.step == 3
    assert float(train_step(fresh, [_batch(8, 10)], fresh.encoder, torch.device("cpu"))) == expected_next
    for a, b in zip(expected_params, _params(fresh)):
        torch.testing.assert_close(a, b)
