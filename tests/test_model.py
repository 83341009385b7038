"""The LESA head, the backbones and TaggingModel (docs/protocol.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.models.backbones import FrozenSmallCNN, SmallCNN, VGG19Conv54, build_backbone
from trainer.models.lesa import Adapter, LESAHead
from trainer.models.losses import total_loss
from trainer.models.registry import TaggingModel, build_model

B, C, H, W_, DIM, M, K = 2, 8, 3, 4, 5, 3, 6
WEIGHTS = {"rank": 1.0, "dist": 0.1, "rel": 0.001, "div": 0.01}


def unit_rows(k: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, dim, generator=g)
    return v / v.norm(dim=1, keepdim=True)


def labels_for(batch: int, k: int) -> torch.Tensor:
    """Every image has positives, verified negatives and an unknown label."""
    base = torch.tensor([1, -1, 1, -1, 0, -1, 1, -1], dtype=torch.float32)[:k]
    return torch.stack([base.roll(i) for i in range(batch)])


@pytest.fixture
def head_out():
    torch.manual_seed(0)
    head = LESAHead(C, DIM, num_attentions=M)
    fmap = torch.rand(B, C, H, W_)
    return head, fmap, head(fmap, unit_rows(K, DIM))


def test_head_output_shapes(head_out):
    _, _, out = head_out
    R = H * W_
    expected = {
        "scores": (B, K),
        "attention_scores": (B, M, K),
        "attention_logits": (B, M, R),
        "attention": (B, M, R),
        "global_scores": (B, K),
    }
    assert {k for k, v in out._asdict().items() if v is not None} == set(expected)
    for key, shape in expected.items():
        assert tuple(getattr(out, key).shape) == shape, key
        assert torch.isfinite(getattr(out, key)).all(), key


def test_attention_is_a_softmax_over_regions(head_out):
    _, _, out = head_out
    a = out.attention
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(dim=2), torch.ones(B, M))
    # ... of the pre-softmax logits that are also returned (the diversity loss uses those).
    torch.testing.assert_close(a, out.attention_logits.softmax(dim=2))


def test_scores_are_max_over_attentions(head_out):
    _, _, out = head_out
    s = out.attention_scores
    for i in range(B):
        for k in range(K):
            assert out.scores[i, k].item() == max(s[i, m, k].item() for m in range(M))


def test_head_without_adapter_matches_the_spec_formulas():
    """With adapter=False, x_r is the raw region feature; recompute everything region by region."""
    torch.manual_seed(1)
    head = LESAHead(C, DIM, num_attentions=M, adapter=False)
    fmap = torch.randn(1, C, H, W_)
    v = unit_rows(K, DIM, seed=3)
    out = head(fmap, v)
    with torch.no_grad():
        regions = [fmap[0, :, row, col] for row in range(H) for col in range(W_)]  # r = W*row + col
        h = [torch.tanh(head.W1.weight @ x + head.W1.bias) for x in regions]
        e = torch.stack([torch.stack([head.W2.weight[m] @ hr + head.W2.bias[m] for hr in h]) for m in range(M)])
        alpha = torch.exp(e) / torch.exp(e).sum(dim=1, keepdim=True)
        for m in range(M):
            z = sum(alpha[m, r] * regions[r] for r in range(len(regions)))
            projected = head.W.T @ z  # into the word space
            for k in range(K):
                assert out.attention_scores[0, m, k].item() == pytest.approx(
                    float(projected @ v[k]), rel=1e-4, abs=1e-5
                )
        mean = sum(regions) / len(regions)
        for k in range(K):
            assert out.global_scores[0, k].item() == pytest.approx(float((head.W.T @ mean) @ v[k]), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(out.attention_logits[0], e, rtol=1e-4, atol=1e-5)


def test_adapter_pads_like_tf_same():
    """2x2 kernel, TF 'SAME': 0 rows/cols before, 1 after, so out[i,j] sees x[i..i+1, j..j+1]."""
    adapter = Adapter(1)
    a, b, c, d = 1.0, 2.0, 3.0, 4.0
    with torch.no_grad():
        adapter.conv.weight.copy_(torch.tensor([[[[a, b], [c, d]]]]))
    adapter.eval()  # BN with running mean 0, var 1: y = x / sqrt(1 + 1e-3)
    x = torch.arange(1.0, 13.0).view(1, 1, 3, 4)  # positive, so the ReLU is the identity
    y = adapter(x)
    assert y.shape == x.shape
    grid = x[0, 0].tolist()

    def at(i, j):
        return grid[i][j] if i < 3 and j < 4 else 0.0

    for i in range(3):
        for j in range(4):
            expected = (a * at(i, j) + b * at(i, j + 1) + c * at(i + 1, j) + d * at(i + 1, j + 1)) / math.sqrt(1.001)
            assert y[0, 0, i, j].item() == pytest.approx(expected, rel=1e-5)
    # e.g. bottom-right: only x[2,3] = 12 is inside -> 1 * 12
    assert y[0, 0, 2, 3].item() == pytest.approx(12.0 / math.sqrt(1.001), rel=1e-5)


def test_adapter_keeps_spatial_size_and_tf_bn_settings():
    adapter = Adapter(C)
    assert adapter.conv.bias is None
    assert adapter.bn.eps == pytest.approx(1e-3) and adapter.bn.momentum == pytest.approx(0.01)
    for h, w in [(3, 4), (14, 14), (1, 1), (5, 2)]:
        assert adapter(torch.rand(2, C, h, w)).shape == (2, C, h, w)


def nonzero_grad(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).any())


def test_gradient_reaches_head_and_trainable_backbone():
    torch.manual_seed(0)
    backbone = SmallCNN()
    assert backbone.trainable
    head = LESAHead(backbone.out_channels, DIM, num_attentions=M)
    model = TaggingModel(backbone, head, unit_rows(K, DIM).numpy())
    model.train()
    images = torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8)
    out = model(images, torch.arange(K))
    assert out.attention.shape == (B, M, 16)  # 32 -> 4x4 regions
    loss, parts = total_loss(out, labels_for(B, K), WEIGHTS)
    assert set(parts) == set(WEIGHTS) and loss.item() > 0
    loss.backward()
    for name, p in [
        ("W", head.W),
        ("W1.weight", head.W1.weight),
        ("W1.bias", head.W1.bias),
        ("W2.weight", head.W2.weight),
        ("W2.bias", head.W2.bias),
        ("adapter.conv", head.adapter.conv.weight),
    ]:
        assert nonzero_grad(p), name
    convs = [m for m in backbone.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    for conv in convs:
        assert nonzero_grad(conv.weight)
    assert model.label_vectors.grad is None and not model.label_vectors.requires_grad


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return VGG19Conv54(weights=None)


def test_vgg19_is_frozen_conv54(vgg):
    assert vgg.out_channels == 512 and not vgg.trainable
    assert all(not p.requires_grad for p in vgg.parameters())
    convs = [m for m in vgg.features if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in vgg.features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 16 and len(pools) == 4  # conv5_4 + ReLU, no pool5
    assert isinstance(vgg.features[-1], torch.nn.ReLU)
    vgg.train()
    assert not vgg.training and not any(m.training for m in vgg.modules())


def test_vgg19_gradient_does_not_flow_to_backbone(vgg):
    torch.manual_seed(0)
    head = LESAHead(512, DIM, num_attentions=M)
    model = TaggingModel(vgg, head, unit_rows(K, DIM).numpy())
    model.train()
    images = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    fmap = vgg(images)
    assert fmap.shape == (1, 512, 14, 14)
    assert (fmap >= 0).all()  # after the ReLU
    out = model(images, torch.arange(K))
    assert out.attention.shape == (1, M, 196)
    loss, _ = total_loss(out, labels_for(1, K), WEIGHTS)
    loss.backward()
    assert all(p.grad is None for p in vgg.parameters())
    assert nonzero_grad(head.W) and nonzero_grad(head.W1.weight) and nonzero_grad(head.adapter.conv.weight)


def test_vgg19_normalises_with_slim_means(vgg):
    images = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 123, 117, 104
    x = vgg.normalise(images)
    assert x.shape == (1, 3, 2, 2)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([123 - 123.68, 117 - 116.78, 104 - 103.94]))


def test_vgg19_load_weights_reads_torchvision_state_dict(tmp_path, vgg):
    torch.manual_seed(5)
    source = VGG19Conv54(weights=None)
    state = {f"features.{k}": v.clone() for k, v in source.features.state_dict().items()}
    # torchvision's full VGG-19 also has the classifier (and features up to pool5): ignored.
    state["classifier.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    assert {"features.0.weight", "features.0.bias", "features.34.weight", "features.34.bias"} <= set(state)

    loaded = VGG19Conv54(weights=str(path))
    for k, v in source.features.state_dict().items():
        torch.testing.assert_close(loaded.features.state_dict()[k], v, rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.parameters())
    # differs from an independently initialised network, so the weights really were read
    assert not torch.equal(vgg.features[0].weight, loaded.features[0].weight)

    # and the method on an existing instance
    vgg2 = VGG19Conv54(weights=None)
    vgg2.load_weights(str(path))
    torch.testing.assert_close(vgg2.features[34].bias, source.features[34].bias, rtol=0, atol=0)


def test_vgg19_load_weights_missing_keys_names_the_file(tmp_path, vgg):
    state = {f"features.{k}": v for k, v in vgg.features.state_dict().items() if k != "34.bias"}
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="truncated.pth") as info:
        vgg.load_weights(str(path))
    assert "features.34.bias" in str(info.value)

    other = tmp_path / "not_vgg.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not_vgg.pth"):
        VGG19Conv54(weights=str(other))


def test_small_cnn_frozen_takes_a_trained_model_pt(tmp_path):
    """small_cnn_frozen: the backbone of a model.pt that lesa train wrote (head keys and label
    vectors beside it are ignored), no gradient, BatchNorm on its trained statistics."""
    torch.manual_seed(3)
    trained = TaggingModel(SmallCNN(), LESAHead(128, DIM, num_attentions=M), unit_rows(K, DIM).numpy())
    for bn in (m for m in trained.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)  # statistics a training run would have moved
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)

    cfg = load_config(
        base={"data": {"url": "unused"}, "model": {"backbone": "small_cnn_frozen", "backbone_weights": str(path)}}
    )
    frozen = build_backbone(cfg.model)
    assert isinstance(frozen, FrozenSmallCNN) and not frozen.trainable
    assert not any(m.training for m in frozen.modules())  # from the start, not only after train()
    for k, v in trained.backbone.state_dict().items():
        torch.testing.assert_close(frozen.state_dict()[k], v, rtol=0, atol=0)
    frozen.train()
    assert not any(m.training for m in frozen.modules())
    images = torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8)
    trained.backbone.eval()
    torch.testing.assert_close(frozen(images), trained.backbone(images))

    model = TaggingModel(frozen, LESAHead(128, DIM, num_attentions=M), unit_rows(K, DIM).numpy())
    model.train()
    loss, _ = total_loss(model(images, torch.arange(K)), labels_for(B, K), WEIGHTS)
    loss.backward()
    assert all(p.grad is None for p in frozen.parameters()) and nonzero_grad(model.head.W)

    # its random init does not move the global stream: the head starts the same with or without it
    torch.manual_seed(9)
    FrozenSmallCNN(str(path))
    after_backbone = torch.rand(1)
    torch.manual_seed(9)
    assert torch.equal(after_backbone, torch.rand(1))


def test_small_cnn_frozen_needs_weights_of_its_shape(tmp_path):
    cfg = load_config(base={"data": {"url": "unused"}, "model": {"backbone": "small_cnn_frozen"}})
    with pytest.raises(ConfigError, match="model.backbone_weights"):
        build_backbone(cfg.model)
    vgg_path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in VGG19Conv54(weights=None).features.state_dict().items()}, vgg_path)
    with pytest.raises(ValueError, match="vgg19.pth: not a small_cnn_frozen state dict"):
        FrozenSmallCNN(str(vgg_path))


def test_label_vectors_are_l2_normalised_buffer():
    raw = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [1.0, 1.0, 1.0], [10.0, 0.0, 0.0]], dtype=np.float64)
    model = TaggingModel(torch.nn.Identity(), LESAHead(4, 3, num_attentions=2, adapter=False), raw)
    lv = model.label_vectors
    assert lv.dtype == torch.float32 and lv.shape == (4, 3)
    torch.testing.assert_close(lv.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(lv[0], torch.tensor([0.6, 0.8, 0.0]))
    torch.testing.assert_close(lv[1], torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(lv[2], torch.full((3,), 1 / math.sqrt(3)))
    assert "label_vectors" in model.state_dict()  # saved with the model
    assert "label_vectors" not in dict(model.named_parameters())


def test_label_ids_select_rows():
    torch.manual_seed(2)
    head = LESAHead(4, DIM, num_attentions=M, adapter=False)
    model = TaggingModel(torch.nn.Identity(), head, unit_rows(K, DIM).numpy() * 7)
    model.eval()
    fmap = torch.rand(B, 4, H, W_)
    full = model(fmap, torch.arange(K))
    ids = torch.tensor([4, 1, 1, 5])
    part = model(fmap, ids)
    assert part.scores.shape == (B, 4)
    torch.testing.assert_close(part.scores, full.scores[:, ids])
    torch.testing.assert_close(part.global_scores, full.global_scores[:, ids])
    torch.testing.assert_close(part.attention_scores, full.attention_scores[:, :, ids])
    torch.testing.assert_close(part.attention, full.attention)  # attention is label-agnostic
    direct = head(fmap, model.label_vectors[ids])
    torch.testing.assert_close(part.scores, direct.scores)


def test_build_model_from_config():
    cfg = load_config(
        base={"data": {"url": "unused"}, "model": {"backbone": "small_cnn", "num_attentions": 3, "adapter": False}}
    )
    vectors = np.random.default_rng(0).normal(size=(K, DIM)).astype(np.float32)
    model = build_model(cfg, vectors)
    assert isinstance(model.backbone, SmallCNN)
    assert isinstance(model.head.adapter, torch.nn.Identity)
    assert model.head.W2.out_features == 3 and model.head.W.shape == (128, DIM)
    torch.testing.assert_close(model.label_vectors.norm(dim=1), torch.ones(K))
    assert isinstance(build_backbone(cfg.model), SmallCNN)


def test_compiled_model_matches_eager_and_keeps_checkpoint_keys():
    """model.compile: torch.compile in place (inductor, a C++ build on the CPU), so a compiled
    run's checkpoint loads into an eager model and back."""
    base = {"data": {"url": "unused"}, "model": {"backbone": "small_cnn", "num_attentions": 3}}
    vectors = np.random.default_rng(0).normal(size=(K, DIM)).astype(np.float32)
    eager = build_model(load_config(base=base), vectors)
    compiled = build_model(load_config(base=base, overrides=["model.compile=true"]), vectors)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    images = torch.randint(0, 255, (B, 32, 32, 3), dtype=torch.uint8)
    y = labels_for(B, K)
    losses = []
    for model in (eager, compiled):
        out = model(images, torch.arange(K))
        loss, _ = total_loss(out, y, WEIGHTS)
        loss.backward()
        losses.append((out, loss, [p.grad.clone() for p in model.head.parameters()]))
    (out_e, loss_e, grads_e), (out_c, loss_c, grads_c) = losses
    torch.testing.assert_close(out_c.scores, out_e.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-5)
