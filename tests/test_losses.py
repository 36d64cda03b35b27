"""CombinedMarginLoss and PartialFC (one process) against formulas written out plainly here."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from taxonclip.config import LossConfig
from taxonclip.errors import ConfigError, DataError
from taxonclip.losses import CombinedMarginLoss, PartialFC, class_shard


def expected_logits(cosines: torch.Tensor, labels: list[int], s: float, m2: float = 0.0,
                    m3: float = 0.0, filter: float = 0.0) -> torch.Tensor:
    """The margin logits, one element at a time."""
    rows, columns = cosines.shape
    out = torch.zeros(rows, columns, dtype=torch.float64)
    for i in range(rows):
        for j in range(columns):
            c = float(cosines[i, j])
            if j == labels[i] and m2 > 0:
                out[i, j] = s * math.cos(min(math.acos(c) + m2, math.pi))
            elif j == labels[i]:
                out[i, j] = s * (c - m3)
            elif filter > 0 and c > filter:
                out[i, j] = 0.0
            else:
                out[i, j] = s * c
    return out


def margin_loss(**given: float) -> CombinedMarginLoss:
    """The margin loss with LossConfig's default for every parameter not given."""
    defaults = LossConfig()
    return CombinedMarginLoss(**{name: given.get(name, getattr(defaults, name))
                                 for name in ("s", "m1", "m2", "m3", "filter")})


def random_cosines(rows: int = 5, columns: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, columns, generator=generator) * 2 - 1


@pytest.mark.parametrize("margins", [dict(m2=0.5), dict(m2=0.3), dict(m2=0.0, m3=0.35),
                                     dict(m2=0.0), dict(m2=0.5, filter=0.4),
                                     dict(m2=0.0, m3=0.2, filter=0.1)])
def test_margin_logits_match_the_formula(margins):
    cosines = random_cosines()
    labels = [3, 0, 6, 3, 1]
    loss = margin_loss(s=30.0, **margins)
    got = loss(cosines, torch.tensor(labels))
    want = expected_logits(cosines, labels, 30.0, **margins)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_rows_whose_class_is_elsewhere_get_no_margin_but_are_filtered():
    cosines = random_cosines(3, 4)
    cosines[1, 2] = 0.9
    cosines[2, 1] = 0.95
    labels = [-1, 2, -1]
    got = margin_loss(s=10.0, m2=0.5, filter=0.8)(cosines, torch.tensor(labels))
    assert got[0].tolist() == pytest.approx((10.0 * cosines[0]).tolist())
    assert got[1, 2].item() == pytest.approx(10.0 * math.cos(math.acos(0.9) + 0.5), abs=1e-5)
    assert got[2, 1].item() == 0.0


def test_input_cosines_are_left_unchanged():
    cosines = random_cosines()
    before = cosines.clone()
    margin_loss(s=8.0, m2=0.5, filter=0.2)(cosines, torch.tensor([0, 1, 2, 3, 4]))
    assert torch.equal(cosines, before)


def test_margin_gradient_is_straight_through():
    """The gradient is that of s·cos θ everywhere, not the true derivative of s·cos(θ+m2)."""
    cosines = random_cosines(4, 5, seed=1).mul(0.9).requires_grad_()
    labels = [2, 0, 4, 2]
    upstream = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    (margin_loss(s=16.0, m2=0.5)(cosines, torch.tensor(labels)) * upstream).sum().backward()
    torch.testing.assert_close(cosines.grad, 16.0 * upstream)
    for i, j in enumerate(labels):
        theta = math.acos(float(cosines.detach()[i, j]))
        true_derivative = 16.0 * math.sin(theta + 0.5) / math.sin(theta) * float(upstream[i, j])
        assert abs(true_derivative - float(cosines.grad[i, j])) > 1e-3


def test_filtered_cosines_get_no_gradient():
    cosines = torch.tensor([[0.9, 0.1, 0.7], [0.2, 0.95, -0.3]], requires_grad=True)
    labels = [0, 2]
    margin_loss(s=4.0, m2=0.0, filter=0.5)(cosines, torch.tensor(labels)).sum().backward()
    for i in range(2):
        for j in range(3):
            zeroed = j != labels[i] and float(cosines.detach()[i, j]) > 0.5
            assert cosines.grad[i, j].item() == (0.0 if zeroed else 4.0)


def test_arcface_target_is_capped_at_pi():
    """Past θ = π − m2 the target logit is −s; it never rises with θ nor exceeds s·cos θ."""
    s, m2 = 20.0, 0.5
    thetas = torch.linspace(0.0, math.pi, 200, dtype=torch.float64)
    cosines = torch.cos(thetas)[:, None]
    targets = margin_loss(s=s, m2=m2)(cosines, torch.zeros(200, dtype=torch.long))[:, 0]
    for theta, cosine, target in zip(thetas.tolist(), cosines[:, 0].tolist(), targets.tolist()):
        if theta >= math.pi - m2 + 1e-6:
            assert target == pytest.approx(-s, abs=1e-9)
        assert target <= s * cosine + 1e-9
    assert all(later <= earlier + 1e-9 for earlier, later in zip(targets, targets[1:]))


@pytest.mark.parametrize("bad, name", [(dict(m1=0.9), "m1"), (dict(m2=0.3, m3=0.2), "m3"),
                                       (dict(m2=-0.1), "m2"), (dict(m2=0.0, m3=-0.1), "m3"),
                                       (dict(m2=4.0), "m2"), (dict(s=0.0), "'s'"),
                                       (dict(filter=1.5), "filter"), (dict(filter=-0.1), "filter")])
def test_unsupported_margins_are_a_config_error(bad, name):
    with pytest.raises(ConfigError, match=name):
        margin_loss(**bad)
    with pytest.raises(ConfigError, match=name):
        LossConfig(**bad)


def hand_loss(embeddings, centres, labels, s, m2=0.0, m3=0.0, filter=0.0):
    """F.cross_entropy of the margin logits, the margin shift computed without gradient."""
    cosines = F.normalize(embeddings) @ F.normalize(centres).T
    values = cosines.detach()
    rows, columns = cosines.shape
    shift = torch.zeros(rows, columns)
    keep = torch.ones(rows, columns)
    for i in range(rows):
        for j in range(columns):
            c = float(values[i, j])
            if j == labels[i]:
                margined = math.cos(min(math.acos(c) + m2, math.pi)) if m2 > 0 else c - m3
                shift[i, j] = margined - c
            elif filter > 0 and c > filter:
                keep[i, j] = 0.0
    return F.cross_entropy(s * (cosines * keep + shift), torch.tensor(labels))


def partial_fc(num_classes=7, size=5, sample_rate=1.0, seed=0, **margins):
    torch.manual_seed(seed)
    margin = margin_loss(**({"s": 16.0, "m2": 0.3} | margins))
    return PartialFC(margin, size, num_classes, sample_rate)


@pytest.mark.parametrize("margins", [dict(s=16.0, m2=0.3), dict(s=8.0, m2=0.0, m3=0.35),
                                     dict(s=16.0, m2=0.5, filter=0.3)])
def test_full_softmax_equals_hand_cross_entropy(margins):
    module = partial_fc(**margins)
    module.weight.data.normal_(0, 1)
    embeddings = torch.randn(6, 5, requires_grad=True)
    labels = [0, 3, 6, 3, 2, 5]
    loss = module(embeddings, torch.tensor(labels))
    loss.backward()
    centres = module.weight.detach().clone().requires_grad_()
    reference_embeddings = embeddings.detach().clone().requires_grad_()
    want = hand_loss(reference_embeddings, centres, labels, **margins)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(embeddings.grad, reference_embeddings.grad)
    torch.testing.assert_close(module.weight.grad, centres.grad)


@pytest.mark.parametrize("batch", [8, 3, 1])
def test_any_batch_size_including_one(batch):
    module = partial_fc(num_classes=4)
    embeddings = torch.randn(batch, 5)
    labels = [i % 4 for i in range(batch)]
    loss = module(embeddings, torch.tensor(labels))
    torch.testing.assert_close(loss, hand_loss(embeddings, module.weight.detach(), labels, 16.0, 0.3))


def test_sampling_keeps_every_positive_and_the_sampled_count():
    module = partial_fc(num_classes=1000, size=8, sample_rate=0.05)
    many = torch.arange(0, 800, 10)  # 80 distinct classes: more than int(0.05 * 1000)
    module(torch.randn(80, 8), many)
    assert module.last_sampled_classes.tolist() == many.tolist()
    few = torch.tensor([5, 999, 5, 300, 0, 300, 7, 7])
    module(torch.randn(8, 8), few)
    sampled = module.last_sampled_classes.tolist()
    assert len(sampled) == 50 and len(set(sampled)) == 50
    assert set(few.tolist()) <= set(sampled)


def test_sampled_loss_is_cross_entropy_over_the_sampled_centres():
    module = partial_fc(num_classes=40, sample_rate=0.25)
    embeddings = torch.randn(6, 5)
    labels = [3, 17, 3, 39, 22, 0]
    loss = module(embeddings, torch.tensor(labels))
    sampled = module.last_sampled_classes.tolist()
    assert len(sampled) == 10
    columns = [sampled.index(label) for label in labels]
    centres = module.weight.detach()[sampled]
    torch.testing.assert_close(loss, hand_loss(embeddings, centres, columns, 16.0, 0.3))


def test_sampling_follows_torch_manual_seed():
    module = partial_fc(num_classes=100, sample_rate=0.1)
    embeddings, labels = torch.randn(4, 5), torch.tensor([1, 2, 3, 4])

    def sampled_after_seed(seed: int) -> list[int]:
        torch.manual_seed(seed)
        module(embeddings, labels)
        return module.last_sampled_classes.tolist()

    assert sampled_after_seed(3) == sampled_after_seed(3)
    assert sampled_after_seed(3) != sampled_after_seed(4)


def test_negatives_are_drawn_uniformly():
    module = partial_fc(num_classes=20, sample_rate=0.25)
    counts = [0] * 20
    steps = 100
    for _ in range(steps):
        module(torch.randn(2, 5), torch.tensor([0, 0]))
        for c in module.last_sampled_classes.tolist():
            counts[c] += 1
    assert counts[0] == steps
    expected = steps * 4 / 19  # 4 negatives drawn from the 19 other classes
    assert all(0.3 * expected < count < 1.7 * expected for count in counts[1:])


def test_centres_start_as_normal_0_01():
    module = partial_fc(num_classes=1000, size=64)
    assert module.weight.shape == (1000, 64)
    assert abs(module.weight.mean().item()) < 1e-3
    assert module.weight.std().item() == pytest.approx(0.01, rel=0.03)


def test_full_centres_is_a_copy_of_the_weight_in_one_process():
    module = partial_fc()
    centres = module.full_centres()
    assert torch.equal(centres, module.weight.detach())
    centres += 1.0
    assert not torch.equal(centres, module.weight.detach())


@pytest.mark.parametrize("num_classes", [1, 2, 9, 10, 23])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_class_shards_are_contiguous_and_even(num_classes, world_size):
    if num_classes < world_size:
        return
    owners = []
    for rank in range(world_size):
        start, count = class_shard(num_classes, world_size, rank)
        owners += [rank] * count
        assert start == len(owners) - count
    assert len(owners) == num_classes
    sizes = [owners.count(rank) for rank in range(world_size)]
    assert max(sizes) - min(sizes) <= 1


def test_label_outside_the_classes_is_a_data_error():
    with pytest.raises(DataError, match="label 7 .*num_classes"):
        partial_fc(num_classes=7)(torch.randn(2, 5), torch.tensor([1, 7]))


def test_embedding_size_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="embedding_size"):
        partial_fc(size=5)(torch.randn(2, 4), torch.tensor([1, 2]))


@pytest.mark.parametrize("kwargs, name", [(dict(sample_rate=0.0), "sample_rate"),
                                          (dict(sample_rate=1.5), "sample_rate"),
                                          (dict(num_classes=0), "num_classes"),
                                          (dict(size=0), "embedding_size")])
def test_bad_partial_fc_parameters_are_a_config_error(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        partial_fc(**kwargs)


@pytest.mark.parametrize("module", [CombinedMarginLoss, PartialFC])
def test_the_loss_keeps_no_defaults_of_its_own(module):
    # its parameters' defaults are LossConfig's alone: a default here could differ from them
    defaults = [name for name, parameter in inspect.signature(module).parameters.items()
                if parameter.default is not inspect.Parameter.empty]
    assert defaults == []


def test_the_configured_margin_loss_and_sample_rate_check_are_configs():
    config = LossConfig()
    assert CombinedMarginLoss.from_config(config).extra_repr() == (
        f"s={config.s}, m1={config.m1}, m2={config.m2}, m3={config.m3}, filter={config.filter}")
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError) as from_loss:
            partial_fc(sample_rate=bad)
        with pytest.raises(ConfigError) as from_config:
            LossConfig(sample_rate=bad)
        assert str(from_loss.value) == str(from_config.value)


def test_runs_under_bf16_autocast_with_float32_gradients():
    module = partial_fc(num_classes=20, size=8, sample_rate=0.5, filter=0.4)
    backbone = torch.nn.Linear(12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(backbone(torch.randn(5, 12)), torch.tensor([1, 2, 3, 19, 1]))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert module.weight.grad.dtype == torch.float32 and torch.isfinite(module.weight.grad).all()
    assert torch.isfinite(backbone.weight.grad).all()
