"""Attention overlays (trainer/evaluation/attention_maps.py): which attention each label selected, the sheet
PNG, and the eval.overlays files that the end of a run hands to the driver."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.contract import read_dataset
from datasets.makers.synthetic import write_synthetic
from trainer.config import load_config, replaced
from trainer.evaluation.attention_maps import (
    TRUE_LABELS,
    ImageAttention,
    attention_items,
    eval_overlay_files,
    region_grid,
    render_sheet,
    selected_attention,
    sheet_captions,
    sheet_size,
    top_labels,
    truth_lines,
)
from trainer.models.output import HeadOutput
from trainer.models.registry import build_model


def constructed_head_output() -> tuple[dict, torch.Tensor]:
    """A head output for 2 images, M = 3 attentions, K = 4 labels, 2x2 regions, built by hand."""
    attention_scores = torch.tensor(
        [
            [
                [0.1, 2.0, 0.3, -1.0],  # image 0, attention 0
                [0.9, 0.5, 0.2, -2.0],  # attention 1
                [0.4, 0.1, 0.8, -0.5],
            ],  # attention 2
            [[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 6.0]],
        ]
    )
    attention = torch.softmax(torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4), dim=-1)
    out = HeadOutput(scores=attention_scores.max(dim=1).values, attention_scores=attention_scores, attention=attention)
    return out, torch.zeros(2, 8, 8, 3, dtype=torch.uint8)


def test_selected_attention_is_the_argmax_over_attentions_of_each_label():
    out, images = constructed_head_output()
    items = attention_items(out, images)
    # By hand: image 0 labels 0..3 take attentions 1, 0, 2, 2; image 1 takes 0, 1, 2, 2.
    assert selected_attention(items[0].attention_scores).tolist() == [1, 0, 2, 2]
    assert selected_attention(items[1].attention_scores).tolist() == [0, 1, 2, 2]
    # The score is the selected attention's score (s_k = max_m s_{m,k}).
    for item in items:
        chosen = selected_attention(item.attention_scores)
        np.testing.assert_array_equal(item.scores, item.attention_scores[chosen, np.arange(4)])


def test_captions_put_each_top_label_under_the_attention_it_selected():
    out, images = constructed_head_output()
    item = attention_items(out, images)[0]
    names = ["cat", "dog", "tree", "car"]
    captions = sheet_captions(item, names, "photo", top_k=3)
    assert len(captions) == 1 + 3
    # Top 3 of image 0: dog 2.0 (a0), cat 0.9 (a1), tree 0.8 (a2); car (-0.5) is not shown.
    assert captions[0] == [("photo", ""), ("dog", "2.00 a0"), ("cat", "0.90 a1"), ("tree", "0.80 a2")]
    assert captions[1] == [("attention a0", ""), ("dog", "2.00")]
    assert captions[2] == [("attention a1", ""), ("cat", "0.90")]
    assert captions[3] == [("attention a2", ""), ("tree", "0.80")]


def test_the_image_tile_names_every_true_label_with_its_score_and_rank():
    out, images = constructed_head_output()
    item = attention_items(out, images)[0]  # scores: cat 0.9, dog 2.0, tree 0.8, car -0.5
    captions = sheet_captions(item, ["cat", "dog", "tree", "car"], "photo", top_k=2, truth=np.array([0, 3]))
    assert captions[0] == [
        ("photo", ""),
        ("dog", "2.00 a0"),
        ("cat", "0.90 a1"),
        ("true labels: 2", "rank"),
        ("cat", "0.90 #2"),
        ("car", "-0.50 #4"),  # true, and outside the top 2: named all the same
    ]
    scores = np.arange(20, dtype=np.float64)  # label 19 ranks #1
    many = ImageAttention(np.zeros((8, 8, 3), np.uint8), np.ones((1, 4)) / 4, scores, scores[None])
    lines = truth_lines(many, [f"l{k}" for k in range(20)], np.arange(0, 20, 2))  # 10 true labels
    assert len(lines) == 1 + TRUE_LABELS  # so a sheet's size does not depend on its image
    assert lines[1] == ("l18", "18.00 #2") and lines[-1] == (f"and {10 - TRUE_LABELS + 1} more", "")


def test_top_labels_break_ties_by_label_order():
    assert top_labels(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]


def test_a_head_without_attention_gives_no_items():
    assert attention_items(HeadOutput(scores=torch.zeros(1, 4)), torch.zeros(1, 8, 8, 3, dtype=torch.uint8)) is None


def test_region_grid_must_be_square():
    assert region_grid(144) == 12
    with pytest.raises(ValueError, match="12 attention regions"):
        region_grid(12)


def test_sheet_is_a_decodable_png_of_the_stated_size(tmp_path):
    rng = np.random.default_rng(0)
    num_maps, regions, labels = 10, 144, 20
    attention = rng.random((num_maps, regions)) ** 4
    per_attention = rng.normal(size=(num_maps, labels))
    item = ImageAttention(
        rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
        attention / attention.sum(1, keepdims=True),
        per_attention.max(0),
        per_attention,
    )
    sheet = render_sheet(item, [f"a rather long label name {k}" for k in range(labels)], "test-000001", top_k=5)
    path = tmp_path / "sheet.png"
    sheet.save(path)
    assert path.stat().st_size > 1000
    with Image.open(path) as decoded:
        assert decoded.format == "PNG" and decoded.mode == "RGB"
        assert decoded.size == sheet_size(num_maps, 5) == (6 * 164 + 4, 2 * (164 + 6 * 15 + 4) + 4)
        pixels = np.asarray(decoded)
    # The first map's tile is the image with heat on it: neither the plain image nor blank.
    tile = pixels[4:164, 168:328]
    assert tile.std() > 5
    assert not np.array_equal(tile, pixels[4:164, 4:164])


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    data = tmp_path_factory.mktemp("overlays") / "data"
    write_synthetic(str(data), seed=1, sizes={"test": 5}, image_size=48, log=lambda *a: None)
    cfg = load_config(
        base={
            "data": {"url": str(data), "image_size": 48},
            "model": {"num_attentions": 3},
            "eval": {"overlays": 3, "k": [2, 4]},
        }
    )
    info = read_dataset(str(data))
    torch.manual_seed(0)
    return cfg, info, build_model(cfg, info.embeddings)


def test_eval_overlays_are_png_files_named_by_image_key(tiny_eval, tmp_path):
    cfg, info, model = tiny_eval
    model.train()
    files = eval_overlay_files(model, info, cfg, torch.device("cpu"))
    assert model.training  # rendered in inference mode, then left as it was
    assert len(files) == 3 and all(name.startswith("attention/") and name.endswith(".png") for name in files)
    for name, write in files.items():
        write(tmp_path / name)  # as checkpointing.save does: the folder is created by the writer
        data = (tmp_path / name).read_bytes()
        with Image.open(io.BytesIO(data)) as sheet:
            assert sheet.size == sheet_size(3, min(cfg.eval.k), with_truth=True)


def test_eval_overlays_off_or_without_attention_give_nothing(tiny_eval):
    cfg, info, model = tiny_eval
    assert eval_overlay_files(model, info, replaced(cfg, {"eval.overlays": 0}), torch.device("cpu")) == {}
    cfg = replaced(cfg, {"eval.overlays": 2})

    class Holistic(torch.nn.Module):  # a baseline's shape of output: scores only
        def forward(self, images, label_ids):
            return HeadOutput(scores=torch.zeros(len(images), len(label_ids)))

    assert eval_overlay_files(Holistic(), info, cfg, torch.device("cpu")) == {}


def test_config_rejects_negative_overlays():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="eval.overlays"):
        load_config(base={"data": {"url": "x"}, "eval": {"overlays": -1}})


def test_scoring_a_split_prints_progress_with_rate_and_eta(tiny_eval, capsys, monkeypatch):
    """Evaluation's scoring loop reports on rank 0: every SCORING_EVERY_S seconds (0 here) and at
    the end."""
    import trainer.progress
    from trainer.bad_samples import BadSampleLog
    from trainer.evaluation.evaluate import score_split
    from trainer.evaluation.metrics import StreamingMetrics

    cfg, info, model = tiny_eval
    cfg = replaced(cfg, {"eval.batch_size": 2})
    metrics = StreamingMetrics({"all": np.arange(info.num_labels)}, info.num_labels, [2])
    monkeypatch.setattr(trainer.progress, "SCORING_EVERY_S", 0.0)
    score_split(model, info, "test", cfg, 0, 1, torch.device("cpu"), BadSampleLog(0), metrics)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" images")[0] for line in lines] == [
        "scoring test: 2/5",
        "scoring test: 4/5",
        "scoring test: 5/5",
        "scored test: 5",
    ]
    assert "images/s, ETA 0:00:00" in lines[-2] and "images/s)" in lines[-1]
    assert metrics.result()[0]["all"]["mAP"] > 0
