"""ASL (summed) and the SigLIP sigmoid loss, against hand-computed values."""
import math

import pytest
import torch

from dynrefer_core.modeling.losses import asymmetric_loss, sigmoid_contrastive_loss


def test_asl_hand_computed():
    # Positive with logit 0: p = 0.5, gamma_pos = 0 -> -log 0.5.
    # Negative with logit 2: p = 0.880797, 1 - p_m = 1 - p + 0.05 = 0.169203, weight = p_m^7 = 0.830797^7.
    loss = asymmetric_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    p = 1 / (1 + math.exp(-2))
    expected = -math.log(0.5) - (p - 0.05) ** 7 * math.log(1 - p + 0.05)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_asl_clips_easy_negatives_and_sums():
    # p < 0.05 for a negative: p_m = 0, no loss at all.
    assert asymmetric_loss(torch.tensor([[-5.0]]), torch.tensor([[0.0]])).item() == 0.0
    one = asymmetric_loss(torch.tensor([[0.3, -1.0]]), torch.tensor([[1.0, 0.0]]))
    two = asymmetric_loss(torch.tensor([[0.3, -1.0]] * 2), torch.tensor([[1.0, 0.0]] * 2))
    assert two.item() == pytest.approx(2 * one.item())  # summed, not averaged


def test_asl_focus_weight_has_no_gradient():
    logits = torch.tensor([[1.0]], requires_grad=True)
    asymmetric_loss(logits, torch.tensor([[0.0]])).backward()
    p = 1 / (1 + math.exp(-1))
    w = (p - 0.05) ** 7
    # d/dx [-w log(1 - p + 0.05)] with w constant = w * p (1 - p) / (1 - p + 0.05)
    assert logits.grad.item() == pytest.approx(w * p * (1 - p) / (1 - p + 0.05), rel=1e-5)


def test_siglip_hand_computed():
    s = torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    logits = [[10 * 1.0 - 10, 10 * 0.5 - 10], [0.0 - 10, 10 * 2.0 - 10]]
    labels = [[1, -1], [-1, 1]]
    expected = -sum(math.log(1 / (1 + math.exp(-labels[i][j] * logits[i][j]))) for i in range(2) for j in range(2)) / 2
    assert sigmoid_contrastive_loss(s, t, b).item() == pytest.approx(expected, rel=1e-5)


def test_siglip_needs_square_scores():
    with pytest.raises(ValueError, match="square"):
        sigmoid_contrastive_loss(torch.zeros(2, 3), torch.tensor(0.0), torch.tensor(0.0))


def test_siglip_extra_positives():
    s = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    t, b = torch.tensor(0.0), torch.tensor(0.0)
    # All four pairs positive: each term is -log sigmoid(1).
    both = sigmoid_contrastive_loss(s, t, b, positives=torch.ones(2, 2, dtype=torch.bool))
    assert both.item() == pytest.approx(-4 * math.log(1 / (1 + math.exp(-1))) / 2, rel=1e-6)
