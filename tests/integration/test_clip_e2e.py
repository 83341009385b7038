"""The `clip` backbone through the CLI on a real local Ray cluster (2 workers, real DeepSpeed, real
shards, an MLflow sqlite store), with the tiny random CLIP of tests/tiny_clip.py on the synthetic
benchmark: `lesa extract` caches its regions, `lesa train` on the images and on the cache follow
each other (frozen tower), the tower trains too (model.freeze_backbone false, activation checkpointing; its
gradients against a plain backward: tests/test_clip.py), fine-tuned as a big tower would be: at ZeRO
stage 3 with every parameter partitioned and its own lr multiplier, and `lesa compare` has clip_zeroshot (no
training) as a row. One module fixture runs every command in this process, so one Ray cluster
serves them all (as tests/integration/test_feature_cache.py,
whose reasoning about why the two runs are comparable holds here too: building the frozen tower
draws from a forked RNG, so the head starts from the same weights either way).

A random tower scores at chance level; these runs show that the pieces run, not CLIP's accuracy.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_clip import GRID, IMAGE_SIZE, JOINT_DIM, write_tiny_clip

from datasets.contract import read_dataset
from datasets.makers.synthetic import write_synthetic
from datasets.stream import decode_image
from launch import cli
from trainer.models.backbones import ClipVision

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def overrides(work: Path, data: str, **extra) -> list[str]:
    values = {
        "data.url": str(work / data),
        "data.image_size": IMAGE_SIZE,
        "data.batch_size": 4,
        "data.loader_workers": 0,
        "data.shuffle_buffer": 16,
        "model.backbone": "clip",
        "model.backbone_weights": str(work / "clip"),
        "optim.name": "rmsprop_tf",
        "train.max_steps": STEPS,
        "train.log_every": 1,
        "train.seed": 3,
        "checkpoint.every": 0,
        "eval.batch_size": 16,
        "eval.overlays": 0,
        "eval.val_split": "null",
        "optim.adaptive_lr": "false",
        "scaling.num_workers": 2,
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.experiment": "clip",
        "mlflow.log_model": "false",  # the export of a tower takes long; test_e2e.py checks it
        **extra,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def lesa(*argv: str) -> int:
    return cli.main([argv[0], str(REPO / "launch" / "synthetic.yaml"), *argv[1:]])


def losses(work: Path, out: Path) -> tuple[dict, list[float]]:
    from mlflow.tracking import MlflowClient

    metrics = json.loads((out / "metrics.json").read_text())
    history = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_metric_history(metrics["mlflow_run_id"], "loss")
    return metrics, [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    import ray

    work = tmp_path_factory.mktemp("clip")
    write_synthetic(
        str(work / "images"),
        seed=2,
        sizes={"train": 32, "test": 16},
        image_size=IMAGE_SIZE,
        shard_size=8,
        log=lambda *a: None,
    )
    write_tiny_clip(work / "clip")
    assert lesa("extract", "--out", str(work / "features"), *overrides(work, "images")) == 0
    assert lesa("train", "--out", str(work / "on_images"), *overrides(work, "images")) == 0
    # the cached regions stand in for the tower, whose weights the feature run therefore does not name
    assert lesa("train", "--out", str(work / "on_features"), *overrides(work, "features", **{"model.backbone_weights": "null"})) == 0  # fmt: skip
    trained = {"model.freeze_backbone": "false", "model.activation_checkpointing": "true", "train.max_steps": 2}
    trained |= {"deepspeed.zero_stage": 3, "deepspeed.stage3_param_persistence_threshold": 0}
    trained |= {"optim.backbone_lr_scale": 0.5}
    assert lesa("train", "--out", str(work / "trained"), *overrides(work, "images", **trained)) == 0
    compare = ["--models", "clip_zeroshot", "--out", str(work / "compare")]
    assert cli.main(["compare", str(REPO / "launch" / "synthetic.yaml"), *compare, *overrides(work, "images")]) == 0
    yield work
    ray.shutdown()


def test_extract_caches_the_towers_regions(work):
    features = read_dataset(str(work / "features"))
    spec = features.features
    assert (spec.backbone, spec.image_size, spec.grid, spec.channels) == ("clip", IMAGE_SIZE, (GRID, GRID), JOINT_DIM)
    shard = read_dataset(str(work / "images")).shards("train")[0]
    with tarfile.open(shard.url) as tar:
        images = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    with tarfile.open(features.shards("train")[0].url) as tar:
        cached = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".feat.npy")}
    name = sorted(images)[0]
    rows = np.load(io.BytesIO(cached[name.replace(".jpg", ".feat.npy")]), allow_pickle=False)
    with torch.no_grad():
        image = torch.from_numpy(decode_image(images[name], IMAGE_SIZE, resample="bicubic").copy())[None]
        expected = ClipVision(str(work / "clip"))(image).flatten(2).transpose(1, 2)[0].numpy()
    assert rows.dtype == np.float16 and rows.shape == (GRID * GRID, JOINT_DIM)
    np.testing.assert_allclose(rows.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_training_on_the_cache_follows_training_on_images(work):
    (m_images, on_images), (m_features, on_features) = (
        losses(work, work / "on_images"),
        losses(work, work / "on_features"),
    )
    assert len(on_images) == len(on_features) == STEPS and all(np.isfinite(on_images))
    # Same samples in the same order, same initial head; the maps differ by float16 rounding only.
    np.testing.assert_allclose(on_features, on_images, rtol=5e-3)
    assert m_images["num_test_images"] == m_features["num_test_images"] == 16
    model = torch.load(work / "on_images" / "model.pt", weights_only=True)
    start = ClipVision(str(work / "clip")).state_dict()
    for key in ("tower.embeddings.patch_embedding.weight", "projection.weight"):
        torch.testing.assert_close(model[f"backbone.{key}"].float(), start[key])  # frozen: as the folder has it


def test_a_tower_fine_tuned_at_zero_stage_3_moves_on_two_workers(work):
    metrics, history = losses(work, work / "trained")
    assert metrics["step"] == 2 and len(history) == 2 and all(np.isfinite(history))
    model = torch.load(work / "trained" / "model.pt", weights_only=True)
    start = ClipVision(str(work / "clip")).state_dict()
    for key in ("tower.embeddings.patch_embedding.weight", "projection.weight"):
        assert not torch.equal(model[f"backbone.{key}"].float(), start[key]), f"{key} did not train"


def test_compare_has_clip_zeroshot_as_a_row_without_training(work):
    table = json.loads((work / "compare" / "table.json").read_text())
    (row,) = table["rows"]
    assert row["status"] == "ok" and row["name"] == "clip_zeroshot" and row["step"] == 0
    assert 0 <= row["zsl"]["mAP"] <= 100 and row["num_test_images"] == 16
    assert "CLIP zero-shot (no training)" in (work / "compare" / "table.md").read_text()
    assert not (work / "compare" / "clip_zeroshot" / "model.pt").exists()
