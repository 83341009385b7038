"""LESA's losses (docs/protocol.md) and the TF-style RMSprop against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import LossConfig
from trainer.models.lesa import LESAHead
from trainer.models.losses import LOSSES, distribution_loss, diversity_loss, ranking_loss, relevance_loss, total_loss
from trainer.models.output import HeadOutput
from trainer.optim import RMSpropTF, build_optimizer


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------- ranking

# Image 0: labels 0, 1 positive (s = 2.0, 0.5), labels 2, 3 negative (s = 1.0, -0.2), label 4 unknown
#          with the highest score of all (3.0).
#   (p0, n2): 1 + 1.0 - 2.0 = 0.0   -> hinge 0, NOT violating (needs > 0)
#   (p0, n3): 1 - 0.2 - 2.0 = -1.2  -> 0
#   (p1, n2): 1 + 1.0 - 0.5 = 1.5   -> violating
#   (p1, n3): 1 - 0.2 - 0.5 = 0.3   -> violating
#   image 0 = (1.5 + 0.3) / 2 = 0.9   (averaged over the 2 violating pairs, not the 4 pairs)
# Image 1: label 0 positive (3.0), labels 1, 2 negative (0.0), labels 3, 4 unknown.
#   (p0, n1) = (p0, n2): 1 + 0 - 3 = -2 -> 0; no violating pair -> contributes 0, still counts in B.
# L_rank = (0.9 + 0) / 2 = 0.45
RANK_SCORES = [[2.0, 0.5, 1.0, -0.2, 3.0], [3.0, 0.0, 0.0, 0.5, 0.0]]
RANK_Y = [[1, 1, -1, -1, 0], [1, -1, -1, 0, 0]]


def test_ranking_loss_by_hand():
    loss = ranking_loss(HeadOutput(scores=t(RANK_SCORES)), t(RANK_Y))
    assert loss.item() == pytest.approx(0.45, rel=1e-5)


def test_ranking_loss_single_images():
    assert ranking_loss(HeadOutput(scores=t(RANK_SCORES[:1])), t(RANK_Y[:1])).item() == pytest.approx(0.9, rel=1e-5)
    assert ranking_loss(HeadOutput(scores=t(RANK_SCORES[1:])), t(RANK_Y[1:])).item() == 0.0


def test_ranking_loss_ignores_unknown_labels():
    # If label 4 of image 0 were a verified negative (s = 3.0), it would add
    #   (p0, n4): 1 + 3 - 2 = 2.0 and (p1, n4): 1 + 3 - 0.5 = 3.5
    #   image 0 = (1.5 + 0.3 + 2.0 + 3.5) / 4 = 1.825; image 1 (p0, n4): 1 + 0 - 3 < 0 -> still 0
    #   L = 1.825 / 2 = 0.9125
    y = t(RANK_Y)
    y[0, 4] = -1
    assert ranking_loss(HeadOutput(scores=t(RANK_SCORES)), y).item() == pytest.approx(0.9125, rel=1e-5)
    # Changing the score of an unknown label changes nothing.
    scores = t(RANK_SCORES)
    scores[0, 4], scores[1, 3], scores[1, 4] = 100.0, 50.0, -7.0
    assert ranking_loss(HeadOutput(scores=scores), t(RANK_Y)).item() == pytest.approx(0.45, rel=1e-5)


def test_ranking_loss_image_without_positives_counts_in_batch():
    # A third image with only negatives (and unknowns): no pair, contributes 0, B = 3.
    scores = t(RANK_SCORES + [[5.0, 5.0, 5.0, 5.0, 5.0]])
    y = t(RANK_Y + [[-1, -1, 0, 0, -1]])
    # (0.9 + 0 + 0) / 3 = 0.3
    assert ranking_loss(HeadOutput(scores=scores), y).item() == pytest.approx(0.3, rel=1e-5)


def test_ranking_loss_gradient_only_from_violating_pairs():
    # s0 = 2.5 instead of 2.0 keeps (p0, n2) = 1 + 1.0 - 2.5 = -0.5 off the hinge's kink (at exactly
    # 0 the subgradient is a convention); the loss value is unchanged (still 0.45).
    scores = t(RANK_SCORES)
    scores[0, 0] = 2.5
    scores.requires_grad_(True)
    loss = ranking_loss(HeadOutput(scores=scores), t(RANK_Y))
    assert loss.item() == pytest.approx(0.45, rel=1e-5)
    loss.backward()
    # image 0: d/ds of (hinge(p1,n2) + hinge(p1,n3)) / 2 / B with B = 2:
    #   s0 (p0) in no violating pair -> 0; s1 (p1) -> -2 * 1/4 = -0.5; s2, s3 -> +1/4 each; s4 unknown -> 0
    #   image 1: no violating pair -> all 0
    expected = [[0.0, -0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(scores.grad, t(expected))


# ------------------------------------------------------------------------------------ distribution


def test_distribution_loss_by_hand():
    # attention_scores [B=2, M=2, K=3]; pi = softmax over the M attentions for each label.
    # Image 0, y = [+1, +1, -1]:
    #   label 0: (0, 0)        -> pi = (0.5, 0.5)
    #   label 1: (ln 3, 0)     -> pi = (3/4, 1/4)
    #   label 2: negative, (5, -5) -> excluded
    #   Q = (0.5 + 0.75, 0.5 + 0.25) = (1.25, 0.75); squares 1.5625 + 0.5625 = 2.125
    # Image 1, y = [0, -1, +1]:
    #   label 2: (0, 0)        -> pi = (0.5, 0.5); labels 0 (unknown, 9 vs 1), 1 (negative) excluded
    #   Q = (0.5, 0.5); squares 0.25 + 0.25 = 0.5
    # L_dist = (2.125 + 0.5) / (B * M = 4) = 0.65625
    ln3 = math.log(3.0)
    attention_scores = t([[[0.0, ln3, 5.0], [0.0, 0.0, -5.0]], [[9.0, 9.0, 0.0], [1.0, -3.0, 0.0]]])
    y = t([[1, 1, -1], [0, -1, 1]])
    out = HeadOutput(None, attention_scores=attention_scores)
    assert distribution_loss(out, y).item() == pytest.approx(0.65625, rel=1e-6)
    # image 0 alone: 2.125 / 2 = 1.0625
    assert distribution_loss(HeadOutput(None, attention_scores=attention_scores[:1]), y[:1]).item() == pytest.approx(
        1.0625, rel=1e-6
    )


def test_distribution_loss_not_normalised_by_number_of_positives():
    # M = 2, one image, 4 positives all with equal scores over attentions: pi = 0.5 each,
    # Q = (2, 2) -> (4 + 4) / 2 = 4 (it would be 0.25 if Q were divided by |P| = 4).
    out = HeadOutput(None, attention_scores=torch.zeros(1, 2, 4))
    assert distribution_loss(out, t([[1, 1, 1, 1]])).item() == pytest.approx(4.0)
    # No positives -> 0.
    assert distribution_loss(out, t([[-1, 0, -1, 0]])).item() == 0.0


# --------------------------------------------------------------------------------------- relevance


def test_relevance_loss_by_hand():
    # Image 0: s = [1.0, 2.0, 1.5, 3.0], g = [2.0, 1.5, 1.0, -4.0], y = [+1, +1, -1, 0]
    #   k0 (+): -(1.0 - 2.0) = 1.0      k1 (+): -(2.0 - 1.5) = -0.5 -> 0
    #   k2 (-): +(1.5 - 1.0) = 0.5      k3 unknown: ignored
    #   sum = 1.5
    # Image 1: s = [0, 0, 0, 0], g = [1, 1, 1, 1], y = [+1, 0, 0, -1]
    #   k0 (+): -(0 - 1) = 1.0          k3 (-): +(0 - 1) = -1 -> 0
    #   sum = 1.0
    # L_rel = 1.5 + 1.0 = 2.5 (summed over the batch, not averaged: the mean would be 1.25)
    out = HeadOutput(
        scores=t([[1.0, 2.0, 1.5, 3.0], [0.0, 0.0, 0.0, 0.0]]),
        global_scores=t([[2.0, 1.5, 1.0, -4.0], [1.0, 1.0, 1.0, 1.0]]),
    )
    y = t([[1, 1, -1, 0], [1, 0, 0, -1]])
    assert relevance_loss(out, y).item() == pytest.approx(2.5, rel=1e-6)
    # Integer labels work the same.
    assert relevance_loss(out, y.to(torch.int8)).item() == pytest.approx(2.5, rel=1e-6)


def test_relevance_loss_ignores_unknowns_with_margin():
    # delta = 0.25 makes an unknown label visible if it were not masked.
    # Image 0: k0 1.0 + 0.25 = 1.25; k1 -0.5 + 0.25 = -0.25 -> 0; k2 0.5 + 0.25 = 0.75; k3 unknown -> 0
    #   = 2.0   (an unmasked k3 would add max(0, -0 * 7 + 0.25) = 0.25)
    # Image 1: k0 1 + 0.25 = 1.25; k1, k2 unknown -> 0; k3 -1 + 0.25 -> 0
    #   = 1.25
    # total 3.25
    out = HeadOutput(
        scores=t([[1.0, 2.0, 1.5, 3.0], [0.0, 0.0, 0.0, 0.0]]),
        global_scores=t([[2.0, 1.5, 1.0, -4.0], [1.0, 1.0, 1.0, 1.0]]),
    )
    y = t([[1, 1, -1, 0], [1, 0, 0, -1]])
    assert relevance_loss(out, y, delta=0.25).item() == pytest.approx(3.25, rel=1e-6)


# --------------------------------------------------------------------------------------- diversity


def test_diversity_loss_by_hand():
    # Logits e [B=2, M=2, R=3] (pre-softmax, not attention weights).
    # Image 0: e0 = (3, 4, 0) / 5 = (0.6, 0.8, 0); e1 = (0, 4, 3) / 5 = (0, 0.8, 0.6)
    #   cos = 0.8 * 0.8 = 0.64; two off-diagonal entries -> 2 * 0.64^2 = 0.8192
    # Image 1: e0 = (2, 0, 0) -> (1, 0, 0); e1 = (-1, -1, 0) -> -(1, 1, 0)/sqrt 2
    #   cos = -1/sqrt 2; two entries -> 2 * 0.5 = 1.0
    # L_div = sqrt(0.8192 + 1.0) = sqrt(1.8192)   (one Frobenius norm over the whole batch)
    e = t([[[3.0, 4.0, 0.0], [0.0, 4.0, 3.0]], [[2.0, 0.0, 0.0], [-1.0, -1.0, 0.0]]])
    expected = math.sqrt(1.8192)  # = 1.34877...
    out = HeadOutput(None, attention_logits=e, attention=e.softmax(dim=-1))
    assert diversity_loss(out, None).item() == pytest.approx(expected, rel=1e-5)
    # not the mean of per-image norms: (sqrt(0.8192) + 1) / 2 = 0.9525...
    assert diversity_loss(out, None).item() != pytest.approx((math.sqrt(0.8192) + 1.0) / 2, rel=1e-3)
    # computed on the logits: scaling a logit row changes the softmax but not the loss
    out2 = HeadOutput(None, attention_logits=e * t([[[10.0], [1.0]], [[0.5], [3.0]]]))
    assert diversity_loss(out2, None).item() == pytest.approx(expected, rel=1e-5)


def test_diversity_loss_three_attentions():
    # One image, M = 3, R = 2: e0 = (1, 0), e1 = (0, 1), e2 = (1, 1)/sqrt 2
    #   G offdiag: (0,1) = 0, (0,2) = (1,2) = 1/sqrt 2, each twice -> 4 * 0.5 = 2 -> sqrt 2
    e = t([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    assert diversity_loss(HeadOutput(None, attention_logits=e), None).item() == pytest.approx(math.sqrt(2.0), rel=1e-5)
    # Orthogonal logits -> 0
    e = t([[[1.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, 0.5]]])
    assert diversity_loss(HeadOutput(None, attention_logits=e), None).item() == pytest.approx(0.0, abs=1e-5)


def test_diversity_loss_single_attention_is_zero_with_finite_gradient():
    e = torch.randn(3, 1, 7, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss = diversity_loss(HeadOutput(None, attention_logits=e), None)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    assert e.grad is not None and torch.isfinite(e.grad).all()
    # and through a real head with M = 1
    torch.manual_seed(0)
    head = LESAHead(4, 3, num_attentions=1)
    out = head(torch.rand(2, 4, 3, 3), torch.eye(3))
    loss = diversity_loss(out, None)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    for p in head.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


# ------------------------------------------------------------------------------------------- total


def test_spec_log_row_arithmetic():
    # docs/protocol.md, Losses: the released NUS log.csv row 0.
    rank, dist, rel, div = 1.11435, 0.74215, 5818.38, 16.5616
    w = LossConfig()
    assert (w.rank, w.dist, w.rel, w.div) == (1.0, 0.1, 0.001, 0.01)
    total = w.rank * rank + w.dist * dist + w.rel * rel + w.div * div
    # 1.11435 + 0.074215 + 5.81838 + 0.165616 = 7.172561
    assert total == pytest.approx(7.172561, abs=1e-9)
    assert round(total, 4) == 7.1726


def test_total_loss_weights_real_components():
    torch.manual_seed(0)
    head = LESAHead(6, 4, num_attentions=3)
    v = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    out = head(torch.rand(2, 6, 3, 3), v)
    y = t([[1, -1, 0, 1, -1], [-1, 1, -1, 0, 1]])
    weights = {"rank": 1.0, "dist": 0.1, "rel": 0.001, "div": 0.01}
    total, parts = total_loss(out, y, weights)
    rank = ranking_loss(out, y).item()
    dist = distribution_loss(out, y).item()
    rel = relevance_loss(out, y).item()
    div = diversity_loss(out, y).item()
    assert {k: v.item() for k, v in parts.items()} == pytest.approx(
        {"rank": rank, "dist": dist, "rel": rel, "div": div}, rel=1e-6
    )
    assert total.item() == pytest.approx(1.0 * rank + 0.1 * dist + 0.001 * rel + 0.01 * div, rel=1e-5)
    assert not any(value.requires_grad for value in parts.values())  # logged, never back-propagated
    assert total.requires_grad


def test_total_loss_skips_zero_weights():
    # A loss with weight 0 is neither computed nor logged: these outputs have no attention logits.
    out = HeadOutput(scores=t(RANK_SCORES), global_scores=torch.zeros(2, 5))
    y = t(RANK_Y)
    total, parts = total_loss(out, y, {"rank": 2.0, "rel": 0.5, "div": 0.0, "dist": 0.0})
    assert set(parts) == {"rank", "rel"}
    # rank = 0.45 (above); rel with g = 0, delta = 0:
    #   image 0: k0 (+): -(2.0) -> 0; k1 (+): -(0.5) -> 0; k2 (-): +1.0 = 1.0; k3 (-): -0.2 -> 0  = 1.0
    #   image 1: k0 (+): -3 -> 0; k1, k2 (-): 0 -> 0  = 0
    #   rel = 1.0; total = 2 * 0.45 + 0.5 * 1.0 = 1.4
    assert parts["rank"].item() == pytest.approx(0.45, rel=1e-5)
    assert parts["rel"].item() == pytest.approx(1.0, rel=1e-6)
    assert total.item() == pytest.approx(1.4, rel=1e-5)
    assert set(LOSSES) == {"rank", "dist", "rel", "div", "seen_logistic"}


# ----------------------------------------------------------------------------------------- RMSprop


def test_rmsprop_tf_two_steps_by_hand():
    # theta = (1.0, -2.0), constant gradient g = (0.5, -1.0), lr 0.1, alpha 0.9, momentum 0.9, eps 1.
    # Step 1 (ms starts at 1, mom at 0):
    #   ms  = 0.9 * 1 + 0.1 * g^2        = (0.925, 1.0)
    #   mom = 0 + 0.1 * g / sqrt(ms + 1) = (0.05 / sqrt(1.925), -0.1 / sqrt(2.0))
    #   theta -= mom
    # Step 2:
    #   ms  = 0.9 * ms + 0.1 * g^2       = (0.9 * 0.925 + 0.025, 0.9 * 1.0 + 0.1) = (0.8575, 1.0)
    #   mom = 0.9 * mom + 0.1 * g / sqrt(ms + 1)
    p = torch.nn.Parameter(t([1.0, -2.0]))
    opt = RMSpropTF([p], lr=0.1, alpha=0.9, momentum=0.9, eps=1.0)
    g = t([0.5, -1.0])

    p.grad = g.clone()
    opt.step()
    mom1 = (0.05 / math.sqrt(1.925), -0.1 / math.sqrt(2.0))  # (0.036037..., -0.070710...)
    theta1 = (1.0 - mom1[0], -2.0 - mom1[1])  # (0.963962..., -1.929289...)
    assert p.tolist() == pytest.approx(theta1, rel=1e-6)
    state = opt.state[p]
    assert state["exp_avg_sq"].tolist() == pytest.approx([0.925, 1.0], rel=1e-6)
    assert state["exp_avg"].tolist() == pytest.approx(mom1, rel=1e-6)

    p.grad = g.clone()
    opt.step()
    mom2 = (0.9 * mom1[0] + 0.05 / math.sqrt(1.8575), 0.9 * mom1[1] - 0.1 / math.sqrt(2.0))
    theta2 = (theta1[0] - mom2[0], theta1[1] - mom2[1])
    assert state["exp_avg_sq"].tolist() == pytest.approx([0.8575, 1.0], rel=1e-6)
    assert p.tolist() == pytest.approx(theta2, rel=1e-6)

    # torch.optim.RMSprop (ms from 0, eps outside the sqrt, lr after momentum) moves differently.
    q = torch.nn.Parameter(t([1.0, -2.0]))
    ref = torch.optim.RMSprop([q], lr=0.1, alpha=0.9, momentum=0.9, eps=1.0)
    q.grad = g.clone()
    ref.step()
    assert q.tolist() != pytest.approx(theta1, rel=1e-3)


def test_rmsprop_tf_updates_many_parameters_at_once_as_each_alone():
    # The update runs as multi-tensor operations over all parameters; each parameter must still
    # follow the single-parameter rule checked by hand above, over steps and an lr change.
    torch.manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2, 2), (1,)]
    together = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    alone = [torch.nn.Parameter(q.detach().clone()) for q in together]
    opt = RMSpropTF(together, lr=0.05)
    singles = [RMSpropTF([q], lr=0.05) for q in alone]
    for step in range(4):
        if step == 2:
            for o in (opt, *singles):
                o.param_groups[0]["lr"] = 0.02  # as the adaptive schedule does
        grads = [torch.randn(shape) for shape in shapes]
        for q, r, g in zip(together, alone, grads):
            q.grad, r.grad = g.clone(), g.clone()
        opt.step()
        for o in singles:
            o.step()
    for q, r, o in zip(together, alone, singles):
        assert torch.equal(q, r)
        assert torch.equal(opt.state[q]["exp_avg_sq"], o.state[r]["exp_avg_sq"])
        assert torch.equal(opt.state[q]["exp_avg"], o.state[r]["exp_avg"])


def test_rmsprop_tf_skips_params_without_grad_and_registry():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = RMSpropTF([a, b])  # defaults lr 1e-3, alpha 0.9, momentum 0.9, eps 1.0
    a.grad = t([1.0, 0.0])
    opt.step()
    assert b not in opt.state and b.tolist() == [1.0, 1.0]
    # ms = 0.9 + 0.1 = 1.0 for the first element: mom = 1e-3 * 1 / sqrt(2); second element grad 0
    assert a.tolist() == pytest.approx([1.0 - 1e-3 / math.sqrt(2.0), 1.0], rel=1e-7)

    class Cfg:
        name, lr, weight_decay = "rmsprop_tf", 0.05, 0.0

    built = build_optimizer([torch.nn.Parameter(torch.zeros(1))], Cfg)
    assert isinstance(built, RMSpropTF)
    group = built.param_groups[0]
    assert (group["lr"], group["alpha"], group["momentum"], group["eps"]) == (0.05, 0.9, 0.9, 1.0)
