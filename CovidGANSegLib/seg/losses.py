"""Segmenter losses (paper section 3.3): enhanced contrastive (eq. 4), sensitivity-enhanced (eq. 5), MSE.

How eq. 4 is read here
----------------------
The paper writes ``L = -log( sum_i exp(f_i . f_p / tau) / sum_i sum_j exp(f_i . f_j / tau) )``
with ``f_p`` "a positive sample" and the sums over all N samples. Taken literally the numerator
uses one positive and the denominator includes the trivial self-similarities ``f_i . f_i = 1``.
We implement the standard per-anchor reading (the "L_in" form of the supervised contrastive loss
of Khosla et al. 2020, which sums positives inside the log), which is what the equation's
structure and the text ("positives from the same severity group") describe:

    for each anchor i with P(i) = {p != i : y_p = y_i} not empty and A(i) = {j != i}:
        l_i = -log( sum_{p in P(i)} exp(f_i . f_p / tau) / sum_{j in A(i)} exp(f_i . f_j / tau) )
    L = mean of l_i over the anchors with at least one positive (0 if there are none),

with ``f`` L2-normalised, self-similarity excluded from both sums, and the denominator over all
other samples (positives included, so ``l_i >= 0``). Labels are the severity groups (1 = high
infection slice, 0 = low infection slice), so positives are slices of the SAME group and the
negatives are the other group; the seed's code drew its pairs from one class only, which this
does not reproduce. The temperature is learnable: the module stores ``log tau`` (initialised at
log 0.06, the paper's value) so tau stays positive; it is clamped to [TAU_MIN, TAU_MAX] when used.

How eq. 5 is read here
----------------------
``L = mean over pixels of BCE(p, t) * (1 + beta * FN(p, t))``: the N "samples" of eq. 5 are the
pixels of the batch. ``FN`` is the false-negative indicator. ``fn_mode="soft"`` (default) uses the
differentiable soft false negative ``FN = t * (1 - p)`` (1 for a missed lesion pixel, 0 for a found
one or a background pixel); ``fn_mode="hard"`` uses ``1[t >= 0.5 and p < threshold]``. The weight
is part of the loss (not detached), so for a lesion pixel the loss ``-log p * (1 + beta (1 - p))``
still falls monotonically as p rises; for background pixels it is plain BCE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TAU_MIN = 1e-3
TAU_MAX = 10.0


class EnhancedContrastiveLoss(nn.Module):
    """Enhanced contrastive loss (eq. 4) with a learnable temperature (stored as ``log_tau``)."""

    def __init__(self, tau_init: float = 0.06, *, learnable: bool = True) -> None:
        super().__init__()
        if not TAU_MIN <= tau_init <= TAU_MAX:
            raise ValueError(f"tau_init must be in [{TAU_MIN}, {TAU_MAX}], got {tau_init}")
        log_tau = torch.tensor(math.log(tau_init), dtype=torch.float32)
        if learnable:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(TAU_MIN, TAU_MAX)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``features`` (N, D) (normalised here), ``labels`` (N,) integer groups -> scalar loss."""
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be (N,) with N = {features.shape[0]}, got {tuple(labels.shape)}")
        n = features.shape[0]
        f = F.normalize(features.float(), dim=1)
        logits = f @ f.T / self.tau  # (N, N) similarities / tau
        self_mask = torch.eye(n, dtype=torch.bool, device=f.device)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (N, N)
        has_positive = positive.any(dim=1)
        if n < 2 or not bool(has_positive.any()):
            return (f.sum() + self.log_tau) * 0.0  # no anchor with a positive: zero, but keep the graph
        neg_inf = torch.finfo(logits.dtype).min
        log_denominator = torch.logsumexp(logits.masked_fill(self_mask, neg_inf), dim=1)  # over j != i
        log_numerator = torch.logsumexp(logits.masked_fill(~positive, neg_inf), dim=1)  # over positives
        per_anchor = log_denominator - log_numerator  # -log(num / den) >= 0
        return per_anchor[has_positive].mean()


class SensitivityEnhancedLoss(nn.Module):
    """Sensitivity-enhanced loss (eq. 5): per-pixel BCE x (1 + beta x FN), averaged over pixels."""

    def __init__(self, beta: float = 1.0, *, fn_mode: str = "soft", threshold: float = 0.5) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if fn_mode not in ("soft", "hard"):
            raise ValueError(f"fn_mode must be 'soft' or 'hard', got {fn_mode!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.beta = float(beta)
        self.fn_mode = fn_mode
        self.threshold = float(threshold)

    def false_negative(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.fn_mode == "soft":
            return target * (1.0 - prob)
        return ((target >= 0.5) & (prob < self.threshold)).to(prob.dtype)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` and ``target`` (values in [0, 1]) of the same shape -> scalar loss.

        With ``mask`` (same shape, bool), the mean runs over the masked pixels only (e.g. the lung).
        """
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        target = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # stable BCE(sigmoid(logits), t)
        weight = 1.0 + self.beta * self.false_negative(torch.sigmoid(logits), target)
        return masked_mean(bce * weight, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (all elements when None; 0 for an empty mask, graph kept)."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and values {tuple(values.shape)} differ in shape")
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def mse_to_pseudo_mask(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between sigmoid(logits) and the pseudo-mask (paper Algorithm 1, line 18)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    return masked_mean((torch.sigmoid(logits) - target.to(logits.dtype)) ** 2, mask)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice over the whole batch (monitoring only; not one of the paper's losses)."""
    p = torch.sigmoid(logits)
    t = target.to(p.dtype)
    return (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)
