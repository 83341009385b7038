"""The baselines of LESA's tables (trainer/models/baselines.py) and the model registry that gives every
model its head and its loss (trainer/models/registry.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.models.baselines import CONSEHead, Fast0TagHead, LabelEMHead, OneAttentionPerLabelHead, holistic
from trainer.models.losses import seen_logistic_loss, total_loss
from trainer.models.output import HeadOutput
from trainer.models.registry import MODELS, build_model, loss_weights
from trainer.weights import load_model_state

B, C, H, W_, DIM, K = 2, 8, 3, 4, 5, 6
BASELINES = ["fast0tag", "labelem", "conse", "one_attention_per_label"]


def unit_rows(k: int, dim: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(k, dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=1, keepdim=True)


def labels_for(batch: int, k: int) -> torch.Tensor:
    """Every image has positives, verified negatives and an unknown label."""
    base = torch.tensor([1, -1, 1, -1, 0, -1, 1, -1], dtype=torch.float32)[:k]
    return torch.stack([base.roll(i) for i in range(batch)])


def heads() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "fast0tag": Fast0TagHead(C, DIM),
        "labelem": LabelEMHead(C, DIM),
        "conse": CONSEHead(C, unit_rows(K, DIM, seed=5), top=3),
        "one_attention_per_label": OneAttentionPerLabelHead(C, DIM),
    }


@pytest.mark.parametrize("name", BASELINES)
def test_head_scores_every_label_and_learns_from_its_loss(name):
    head = heads()[name]
    fmap = torch.rand(B, C, H, W_, requires_grad=True)
    out = head(fmap, unit_rows(K, DIM))
    assert out.scores.shape == (B, K) and torch.isfinite(out.scores).all()
    weights = {"seen_logistic": 1.0} if name == "conse" else {"rank": 1.0}
    loss, _ = total_loss(out, labels_for(B, K), weights)
    loss.backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert fmap.grad.abs().sum() > 0  # the backbone is trained through every head


def test_fast0tag_is_an_mlp_of_the_mean_feature_dotted_with_the_label_vector():
    head = heads()["fast0tag"]
    fmap, v = torch.randn(B, C, H, W_), unit_rows(K, DIM)
    mean = fmap.flatten(2).mean(dim=2)
    mapped = head.mlp[2](torch.relu(head.mlp[0](mean)))
    torch.testing.assert_close(head(fmap, v).scores, mapped @ v.T)


def test_labelem_is_bilinear_in_the_mean_feature_and_the_label_vector():
    head = heads()["labelem"]
    fmap, v = torch.randn(B, C, H, W_), unit_rows(K, DIM)
    f = holistic(fmap)
    for i in range(B):
        for k in range(K):
            expected = sum(f[i, c] * head.W[c, d] * v[k, d] for c in range(C) for d in range(DIM))
            assert head(fmap, v).scores[i, k].item() == pytest.approx(expected.item(), abs=1e-5)


def test_one_attention_per_label_matches_its_equations_label_by_label():
    """a_{k,r} = softmax_r((U x_r) . v_k), z_k = sum_r a_{k,r} x_r, s_k = (W^T z_k) . v_k, with z_k built."""
    head = heads()["one_attention_per_label"]
    fmap, v = torch.randn(B, C, H, W_), unit_rows(K, DIM)
    x = fmap.flatten(2).transpose(1, 2)  # [B, R, C]
    scores = head(fmap, v).scores
    for i in range(B):
        for k in range(K):
            logits = torch.stack([head.U.weight @ x[i, r] @ v[k] for r in range(H * W_)])
            a = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            z = (a[:, None] * x[i]).sum(dim=0)
            assert scores[i, k].item() == pytest.approx((head.W.T @ z @ v[k]).item(), abs=1e-5)


def test_one_attention_per_label_scores_thousands_of_labels_in_chunks():
    head = heads()["one_attention_per_label"]
    fmap, v = torch.randn(B, C, H, W_), unit_rows(7586, DIM)
    whole = head(fmap, v).scores
    assert whole.shape == (B, 7586)
    head.label_chunk = 7  # many chunks, the last one short
    torch.testing.assert_close(head(fmap, v).scores, whole)
    torch.testing.assert_close(head(fmap, v[:10]).scores, whole[:, :10])


def test_conse_embedding_by_hand():
    """Seen vectors (1,0), (0,1), (-1,0); logits ln 3, 0, -ln 3 -> p = 0.75, 0.5, 0.25. With T = 2:
    e = (0.75 (1,0) + 0.5 (0,1)) / 1.25 = (0.6, 0.4), |e| = sqrt(0.52); every label is ranked by
    cos(e, v): unseen (1,1)/sqrt 2 -> 1/sqrt(1.04) = 0.98058, seen (-1,0) -> -0.6/sqrt(0.52)."""
    seen = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    head = CONSEHead(channels=1, seen_vectors=seen, top=2)
    with torch.no_grad():
        head.classifier.weight.zero_()
        head.classifier.bias.copy_(torch.tensor([math.log(3), 0.0, -math.log(3)]))
    fmap = torch.randn(1, 1, 2, 2)
    torch.testing.assert_close(head.embed(head.classifier(holistic(fmap))), torch.tensor([[0.6, 0.4]]))
    labels = torch.cat([torch.tensor([[1.0, 1.0]]) / math.sqrt(2), seen])
    out = head(fmap, labels)
    expected = torch.tensor(
        [[1 / math.sqrt(1.04), 0.6 / math.sqrt(0.52), 0.4 / math.sqrt(0.52), -0.6 / math.sqrt(0.52)]]
    )
    torch.testing.assert_close(out.scores, expected)
    torch.testing.assert_close(out.seen_logits, head.classifier.bias[None])


def test_conse_with_fewer_seen_labels_than_t_mixes_them_all():
    head = CONSEHead(channels=2, seen_vectors=unit_rows(3, DIM), top=10)
    assert head.top == 3
    assert head(torch.randn(B, 2, H, W_), unit_rows(K, DIM)).scores.shape == (B, K)


def test_seen_logistic_loss_by_hand():
    """Logits 0 and ln 3 for a positive, ln 3 for a negative, anything for an unknown:
    (ln 2 + ln(4/3) + ln 4) / 3."""
    out = HeadOutput(None, seen_logits=torch.tensor([[0.0, math.log(3), math.log(3), 123.0]]))
    y = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    expected = (math.log(2) + math.log(4 / 3) + math.log(4)) / 3
    assert seen_logistic_loss(out, y).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="seen labels"):
        seen_logistic_loss(out, y[:, :3])


# ------------------------------------------------------------------------------------- the registry


def config(name: str, **model) -> object:
    return load_config(base={"data": {"url": "unused"}, "model": {"name": name, **model}})


@pytest.mark.parametrize(
    "name", [name for name, entry in MODELS.items() if entry.trains]
)  # clip_zeroshot: tests/test_clip.py
def test_every_model_trains_from_uint8_images_with_its_own_loss(name):
    vectors = np.random.default_rng(0).normal(size=(12, DIM)).astype(np.float32)
    seen = np.array([0, 2, 3, 5, 7, 8, 10, 11])
    model = build_model(config(name), vectors, seen)
    images = torch.randint(0, 256, (B, 48, 48, 3), dtype=torch.uint8)
    out = model(images, torch.as_tensor(seen))
    loss, parts = total_loss(out, labels_for(B, len(seen)), loss_weights(config(name)))
    loss.backward()
    assert set(parts) == set(loss_weights(config(name)))
    assert all(p.grad is not None for p in model.backbone.parameters())
    model.eval()
    assert model(images, torch.arange(12)).scores.shape == (B, 12)  # GZSL: every label


def test_losses_per_model():
    assert loss_weights(config("lesa")) == {"rank": 1.0, "dist": 0.1, "rel": 0.001, "div": 0.01}
    for name in ("fast0tag", "labelem", "one_attention_per_label"):
        assert loss_weights(config(name)) == {"rank": 1.0}
    assert loss_weights(config("conse")) == {"seen_logistic": 1.0}


def test_unknown_model_and_bad_conse_top_fail_before_any_work():
    from launch.preflight import check_registries

    with pytest.raises(ConfigError, match="model.name: unknown model .*one_attention_per_label"):
        check_registries(config("fast1tag"))
    with pytest.raises(ConfigError, match="model.conse_top"):
        config("conse", conse_top=0)


def test_conse_needs_the_seen_labels():
    with pytest.raises(ValueError, match="seen label ids"):
        build_model(config("conse"), np.ones((4, DIM), np.float32))


@pytest.mark.parametrize("name", BASELINES)
def test_saved_model_scores_the_same_after_loading(name, tmp_path):
    """`lesa evaluate` loads model.pt into a freshly built model: CONSE's seen vectors come from the
    dataset again (not saved), like the label vectors."""
    vectors = np.random.default_rng(1).normal(size=(9, DIM)).astype(np.float32)
    seen = np.arange(6)
    torch.manual_seed(0)
    trained = build_model(config(name, conse_top=4), vectors, seen).eval()
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    fresh = build_model(config(name, conse_top=4), vectors, seen).eval()
    load_model_state(fresh, str(tmp_path / "model.pt"))
    images = torch.randint(0, 256, (B, 48, 48, 3), dtype=torch.uint8)
    torch.testing.assert_close(fresh(images, torch.arange(9)).scores, trained(images, torch.arange(9)).scores)


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": {"dist": 0}},
        {"loss": {"rel": 0}},
        {"loss": {"div": 0}},
        {"model": {"num_attentions": 1}},
        {"model": {"num_attentions": 5}},
    ],
)
def test_lesa_ablations_are_config_only(overrides):
    base = {"data": {"url": "unused"}, **overrides}
    cfg = load_config(base=base)
    vectors = np.random.default_rng(0).normal(size=(8, DIM)).astype(np.float32)
    model = build_model(cfg, vectors, np.arange(6))
    out = model(torch.randint(0, 256, (B, 48, 48, 3), dtype=torch.uint8), torch.arange(6))
    loss, parts = total_loss(out, labels_for(B, 6), loss_weights(cfg))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    off = [name for name, w in loss_weights(cfg).items() if w == 0]
    assert not set(off) & set(parts)
    assert out.attention_scores.shape[1] == cfg.model.num_attentions
