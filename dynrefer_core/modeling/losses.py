"""Losses of DynRefer (spec 4.1, 4.2, 5.1).

L = L_caption + 0.01 * ASL_sum(tags) + 0.5 * L_rtc
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 7.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al.), SUMMED over regions x tags as in the release (no mean).

    L = -sum[ y (1-p)^gp log p + (1-y) p_m^gn log(1-p_m) ],  p = sigmoid(logit),  p_m = max(p - clip, 0).
    The focusing weights are computed without gradient, as in the release.
    """
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits.float())
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p  # 1 - p_m
    loss_pos = targets * torch.log(p.clamp(min=eps))
    loss_neg = (1 - targets) * torch.log(p_neg.clamp(min=eps))
    with torch.no_grad():
        pt = p * targets + p_neg * (1 - targets)
        gamma = gamma_pos * targets + gamma_neg * (1 - targets)
        weight = torch.pow(1 - pt, gamma)
    return -((loss_pos + loss_neg) * weight).sum()


def sigmoid_contrastive_loss(scores: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                             positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP-style loss on the (regions x texts) score matrix s of D_rtc; matching pairs on the diagonal.

    logits = s * exp(t) + b;  L = -sum log sigmoid(label * logits) / N with label +1 on the diagonal and
    -1 elsewhere. The release averages the region->text and text->region directions; on one process
    both are the same matrix, so they are equal and this is their mean. `positives` (N, N) bool marks
    extra +1 pairs (e.g. identical captions; the release has no such de-duplication).
    """
    n = scores.shape[0]
    if scores.shape != (n, n):
        raise ValueError(f"score matrix must be square (regions x their captions), got {tuple(scores.shape)}")
    positive = torch.eye(n, device=scores.device, dtype=torch.bool)
    if positives is not None:
        positive = positive | positives.to(scores.device)
    labels = 2 * positive.float() - 1
    logits = scores.float() * scale.float().exp() + bias.float()
    return -F.logsigmoid(labels * logits).sum() / n
