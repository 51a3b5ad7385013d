"""Segmenter losses checked against hand-computed values (eqs. 4 and 5)."""

from __future__ import annotations

import math

import pytest
import torch

from CovidGANSegLib.seg.losses import EnhancedContrastiveLoss, SensitivityEnhancedLoss, mse_to_pseudo_mask


def test_contrastive_hand_computed():
    # normalised features f1=(1,0), f2=(0.6,0.8), f3=(0,1); groups 0, 0, 1; tau = 0.5
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    loss = EnhancedContrastiveLoss(0.5, learnable=False)
    # anchor 1: -log(e^{0.6/0.5} / (e^{0.6/0.5} + e^{0/0.5}));  anchor 2: -log(e^{1.2} / (e^{1.2} + e^{0.8/0.5}))
    # anchor 3 has no positive and is left out
    l1 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0)))
    l2 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    assert loss(f, labels).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    # features are normalised inside: scaling them changes nothing
    assert loss(f * torch.tensor([[2.0], [5.0], [0.1]]), labels).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def _reference(f, labels, tau):
    f = torch.nn.functional.normalize(f, dim=1)
    total, count = 0.0, 0
    for i in range(len(f)):
        pos = [p for p in range(len(f)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        num = sum(math.exp(float(f[i] @ f[p]) / tau) for p in pos)
        den = sum(math.exp(float(f[i] @ f[j]) / tau) for j in range(len(f)) if j != i)
        total += -math.log(num / den)
        count += 1
    return total / count


def test_contrastive_matches_loop_reference_several_positives():
    torch.manual_seed(0)
    f = torch.randn(7, 5)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 1])
    loss = EnhancedContrastiveLoss(0.06)
    assert loss.tau.item() == pytest.approx(0.06, rel=1e-6)
    assert loss(f, labels).item() == pytest.approx(_reference(f, labels, 0.06), rel=1e-5)


def test_contrastive_learnable_tau_and_no_positive():
    loss = EnhancedContrastiveLoss(0.06)
    f = torch.randn(4, 3, requires_grad=True)
    value = loss(f, torch.tensor([0, 0, 1, 1]))
    value.backward()
    assert loss.log_tau.grad is not None and loss.log_tau.grad.abs().item() > 0
    assert any(p is loss.log_tau for p in loss.parameters())
    zero = loss(torch.randn(3, 3, requires_grad=True), torch.tensor([0, 1, 2]))
    assert zero.item() == 0.0
    zero.backward()  # still differentiable
    with pytest.raises(ValueError):
        loss(torch.randn(3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        EnhancedContrastiveLoss(0.0)


def test_sensitivity_enhanced_hand_computed_soft():
    # logits 0 -> p = 0.5. t=1: BCE = log 2, soft FN = 0.5, beta = 2 -> weight 2. t=0: BCE = log 2, weight 1.
    loss = SensitivityEnhancedLoss(beta=2.0)
    value = loss(torch.zeros(1, 1, 1, 2), torch.tensor([[[[1.0, 0.0]]]]))
    assert value.item() == pytest.approx((2 * math.log(2) + math.log(2)) / 2, rel=1e-6)


def test_sensitivity_enhanced_hand_computed_hard_and_beta0():
    logits = torch.tensor([-1.0, 2.0, 0.5])
    target = torch.tensor([1.0, 1.0, 0.0])
    p = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-0.5))]
    bce = [-math.log(p[0]), -math.log(p[1]), -math.log(1 - p[2])]
    # hard FN: only the first pixel (t = 1, p < 0.5) is a false negative
    hard = SensitivityEnhancedLoss(beta=1.0, fn_mode="hard")
    assert hard(logits, target).item() == pytest.approx((bce[0] * 2 + bce[1] + bce[2]) / 3, rel=1e-6)
    soft = SensitivityEnhancedLoss(beta=1.0)
    expected = (bce[0] * (1 + (1 - p[0])) + bce[1] * (1 + (1 - p[1])) + bce[2]) / 3
    assert soft(logits, target).item() == pytest.approx(expected, rel=1e-6)
    plain = SensitivityEnhancedLoss(beta=0.0)
    assert plain(logits, target).item() == pytest.approx(sum(bce) / 3, rel=1e-6)
    with pytest.raises(ValueError):
        SensitivityEnhancedLoss(beta=-1)
    with pytest.raises(ValueError):
        soft(logits, target[:2])


def test_mse_to_pseudo_mask():
    assert mse_to_pseudo_mask(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]])).item() == pytest.approx((0.25 + 3 * 0.25) / 4)
    big = torch.tensor([[20.0, -20.0]])
    assert mse_to_pseudo_mask(big, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_losses_restricted_to_a_mask():
    # two pixels inside the mask (t=1 and t=0 at logit 0), one outside that must not count
    logits = torch.tensor([0.0, 0.0, 5.0])
    target = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.tensor([True, True, False])
    sel = SensitivityEnhancedLoss(beta=2.0)
    assert sel(logits, target, mask).item() == pytest.approx((2 * math.log(2) + math.log(2)) / 2, rel=1e-6)
    assert mse_to_pseudo_mask(logits, target, mask).item() == pytest.approx(0.25)
    empty = torch.zeros(3, dtype=torch.bool)
    assert sel(logits, target, empty).item() == 0.0
    with pytest.raises(ValueError):
        sel(logits, target, mask[:2])
