import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import Config
from losses import TrainLoss, class_weights, cross_entropy, focal_loss, loss_phase, soft_targets


def test_focal_matches_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    # by hand: p0 = e^2 / (e^2 + 1 + e^-1), FL = -(1 - p0)^2 * log(p0)
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    expected = -((1 - p0) ** 2) * math.log(p0)
    assert expected == pytest.approx(0.0041443, abs=1e-6)
    assert focal_loss(logits, torch.tensor([0]), gamma=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_focal_is_per_sample_not_on_the_batch_mean():
    torch.manual_seed(0)
    logits, target = torch.randn(8, 5) * 3, torch.randint(0, 5, (8,))
    batch = focal_loss(logits, target, gamma=1.5)
    one_by_one = torch.stack([focal_loss(logits[i:i + 1], target[i:i + 1], gamma=1.5) for i in range(8)]).mean()
    assert batch.item() == pytest.approx(one_by_one.item(), rel=1e-6)
    ce = F.cross_entropy(logits, target)
    seed_style = (1 - torch.exp(-ce)) ** 1.5 * ce  # the reference implementation's formula
    assert abs(batch.item() - seed_style.item()) > 1e-3


def test_gamma_zero_is_cross_entropy_with_smoothing_and_weights():
    torch.manual_seed(1)
    logits, target = torch.randn(16, 7), torch.randint(0, 7, (16,))
    weight = torch.rand(7) + 0.5
    ours = focal_loss(logits, target, gamma=0.0, smoothing=0.1, weight=weight)
    ref = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1, reduction="none").mean()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert cross_entropy(logits, target, 0.05).item() == pytest.approx(
        F.cross_entropy(logits, target, label_smoothing=0.05).item(), rel=1e-5)


def test_focal_is_float32_under_half_precision_logits():
    logits = torch.randn(4, 3).half()
    loss = focal_loss(logits, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_soft_targets_are_accepted_and_sum_to_one():
    q = soft_targets(torch.tensor([0, 2]), 3, smoothing=0.3)
    assert torch.allclose(q.sum(1), torch.ones(2))
    assert q[0].tolist() == pytest.approx([0.8, 0.1, 0.1])
    mixed = torch.tensor([[0.6, 0.4, 0.0]])
    logits = torch.tensor([[1.0, 0.5, -0.5]])
    expected = 0.6 * F.cross_entropy(logits, torch.tensor([0])) + 0.4 * F.cross_entropy(logits, torch.tensor([1]))
    assert cross_entropy(logits, mixed).item() == pytest.approx(expected.item(), rel=1e-6)


def test_schedule_phases_by_epoch():
    cfg = Config()  # s1 = 14, s2 = 17 as in the seed
    phases = [loss_phase(cfg, e) for e in range(20)]
    assert all(p == ("ce", 0.0) for p in phases[:14])
    assert [p[0] for p in phases[14:17]] == ["blend"] * 3
    assert [p[1] for p in phases[14:17]] == pytest.approx([0.25, 0.5, 0.75])
    assert all(p == ("focal", 1.0) for p in phases[17:])
    assert loss_phase(Config(loss="ce"), 50) == ("ce", 0.0)
    assert loss_phase(Config(loss="focal"), 0) == ("focal", 1.0)
    assert loss_phase(Config(loss="smooth-focal", focal_blend=0.3), 0) == ("smooth-focal", 0.3)


def test_train_loss_blends_and_applies_weights_from_focal_phase():
    torch.manual_seed(2)
    cfg = Config()
    logits, target = torch.randn(6, 4), torch.randint(0, 4, (6,))
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5])
    loss = TrainLoss(cfg, weights)
    assert loss(logits, target, 0).item() == pytest.approx(cross_entropy(logits, target, 0.05).item())
    blend = 0.5 * cross_entropy(logits, target, 0.05) + 0.5 * focal_loss(logits, target, 1.5, 0.05, weights)
    assert loss(logits, target, 15).item() == pytest.approx(blend.item(), rel=1e-6)
    assert loss(logits, target, 30).item() == pytest.approx(focal_loss(logits, target, 1.5, 0.05, weights).item())
    from_start = TrainLoss(Config(class_weights_from="start"), weights)
    assert from_start(logits, target, 0).item() == pytest.approx(cross_entropy(logits, target, 0.05, weights).item())


def test_class_weights_from_counts():
    counts = np.array([10, 30, 60])
    balanced = class_weights(counts, "balanced")
    assert balanced.tolist() == pytest.approx([100 / (3 * 10), 100 / (3 * 30), 100 / (3 * 60)])
    effective = class_weights(counts, "effective", beta=0.9)
    raw = [(1 - 0.9) / (1 - 0.9 ** n) for n in counts]
    assert effective.tolist() == pytest.approx([3 * r / sum(raw) for r in raw], rel=1e-5)
    assert class_weights(counts, "none") is None
    with_empty = class_weights(np.array([5, 0, 5]), "balanced")
    assert with_empty.tolist() == pytest.approx([1.0, 0.0, 1.0])
