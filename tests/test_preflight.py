"""launch/preflight.py: the checks before any cluster work, and the config it resolves once.

A real synthetic dataset (tests/conftest.py), the real registries, the real CLI in a subprocess for
the exit status; nothing here starts Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datasets.contract import DatasetError
from launch.preflight import (
    check_registries,
    evaluation_checkpoint,
    preflight,
    preflight_extract,
    preflight_predict,
    resumed,
    training_splits,
)
from trainer.config import ConfigError, load_config
from trainer.run_folder import RunRecord

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(synthetic) -> Path:
    return synthetic(0, 32, 8, train=16, val=8, test=8)  # two training shards


def config(data_url: str | Path, *overrides: str):
    return load_config(None, [f"data.url={data_url}", "data.image_size=32", *overrides])


@pytest.mark.parametrize(
    "override, key, known",
    [
        ("model.name=clip", "model.name", "lesa"),
        ("model.backbone=resnet50", "model.backbone", "small_cnn"),
        ("optim.name=sgd", "optim.name", "rmsprop_tf"),
    ],
)
def test_unknown_registry_names(override, key, known):
    cfg = config("/x", override)  # the values alone are valid: the registries are checked here
    with pytest.raises(ConfigError) as info:
        check_registries(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}:") and known in message


def test_preflight_resolves_paths_into_a_new_config(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    cfg = config("data", "eval.every=4")
    resolved = preflight(cfg, tmp_path / "out", training_splits(cfg))
    assert resolved.splits == ["train", "test", "val"] and resolved.out == tmp_path / "out"
    assert (tmp_path / "out").is_dir()
    assert resolved.cfg.data.url == str(data) and resolved.cfg.checkpoint.storage == str(
        tmp_path / "out" / "checkpoints"
    )
    assert cfg.data.url == "data" and cfg.checkpoint.storage is None  # the loaded config is left as it was
    assert resolved.info.splits and len(resolved.info.shards("train")) == 2

    # A URL is left as it is (memory://: reachable here, while s3:// would need credentials, check_storage)
    remote = preflight(config(data, "checkpoint.storage=memory://bucket/ck"), tmp_path / "o2", ["test"]).cfg
    assert remote.checkpoint.storage == "memory://bucket/ck"
    run = RunRecord("r", "run-id", "sqlite:///x.db", "s3://bucket/first")
    assert resumed(remote, run).checkpoint.storage == "s3://bucket/first" and resumed(remote, None) is remote


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scaling.num_workers=3"], "scaling.num_workers: 3 workers but the train split of .* has only 2 shards"),
        (["eval.every=4", "eval.val_split=dev"], "eval.val_split: .* has no 'dev' split"),
        (["data.train_split=extra"], "dataset.json: no split 'extra'"),
        (["model.name=clip"], "model.name: unknown model"),
    ],
)
def test_preflight_errors_leave_out_untouched(data, tmp_path, overrides, message):
    cfg = config(data, *overrides)
    with pytest.raises((ConfigError, DatasetError), match=message):  # both exit 2 from the CLI
        preflight(cfg, tmp_path / "out", training_splits(cfg))
    assert not (tmp_path / "out").exists()


def test_extract_preflight(data, tmp_path):
    with pytest.raises(ConfigError, match="small_cnn is trainable"):
        preflight_extract(config(data), str(tmp_path / "f"), None)
    frozen = config(data, "model.backbone=vgg19", f"model.backbone_weights={tmp_path / 'absent.pth'}")
    with pytest.raises(ConfigError, match="absent.pth does not exist"):
        preflight_extract(frozen, str(tmp_path / "f"), None)
    (tmp_path / "vgg.pth").write_bytes(b"")  # only whether it exists is checked before the cluster
    frozen = config(data, "model.backbone=vgg19", f"model.backbone_weights={tmp_path / 'vgg.pth'}")
    with pytest.raises(ConfigError, match="is data.url itself"):
        preflight_extract(frozen, str(data), None)
    resolved = preflight_extract(frozen, str(tmp_path / "f"), None)
    assert sorted(resolved.splits) == ["test", "train", "val"] and resolved.out == str(tmp_path / "f")


def test_predict_preflight(tmp_path):
    with pytest.raises(ConfigError, match="--top-k: must be at least 1"):
        preflight_predict(str(tmp_path), 0, "cpu")
    with pytest.raises(ConfigError, match="is not a model.pt nor a folder holding one"):
        preflight_predict(str(tmp_path), 5, "cpu")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="config.json: missing"):
        preflight_predict(str(tmp_path), 5, "cpu")
    (tmp_path / "config.json").write_text(json.dumps(config("/x", "model.name=clip").to_dict()))
    with pytest.raises(ConfigError, match=r"config.json: model.name: unknown model"):
        preflight_predict(str(tmp_path / "model.pt"), 5, "cpu")
    (tmp_path / "config.json").write_text(json.dumps(config("/x", "model.num_attentions=3").to_dict()))
    model_url, cfg = preflight_predict(str(tmp_path), 5, "cpu")
    assert model_url == str(tmp_path / "model.pt") and cfg.model.num_attentions == 3


@pytest.mark.parametrize(
    "command, setting, message",
    [
        ("train", "model.name=clip", "model.name: unknown model"),
        ("train", "scaling.num_workers=5", "scaling.num_workers: 5 workers"),
        ("evaluate", "model.backbone=resnet50", "model.backbone: unknown backbone"),
    ],
)
def test_the_cli_exits_2_before_ray_starts(data, tmp_path, command, setting, message):
    extra = ["--checkpoint", str(tmp_path)] if command == "evaluate" else []
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", command, str(REPO / "launch" / "synthetic.yaml"), "--out"]
        + [str(tmp_path / "out"), *extra, "--set", f"data.url={data}", "--set", "data.image_size=32", "--set", setting],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"lesa {command}: error: {message}")
    assert "ray" not in proc.stderr.lower() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "extract"])
def test_a_config_error_imports_none_of_the_heavy_modules(tmp_path, command):
    """A mistake in the YAML or a --set is reported before torch, Ray, MLflow or DeepSpeed are
    imported (13-15 s on a loaded 2-core machine before, under 1 s after)."""
    extra = ["--checkpoint", str(tmp_path)] if command == "evaluate" else []
    argv = [command, str(REPO / "launch" / "synthetic.yaml"), "--out", str(tmp_path / "out"), *extra]
    script = (
        "import sys; from launch.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv, "--set", "model.num_attentions=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stderr == f"lesa {command}: error: model.num_attentions: must be at least 1\n"
    assert proc.stdout == "2 []\n"


def saved_model(cfg, data: Path, path: Path) -> Path:
    """A model.pt as `lesa train` writes it (the model's state dict) for `cfg` over `data`."""
    import torch

    from datasets.contract import read_dataset
    from trainer.models.registry import build_model

    info = read_dataset(str(data))
    torch.save(build_model(cfg, info.embeddings, info.seen).state_dict(), path)
    return path


@pytest.mark.parametrize("model", ["lesa", "conse", "labelem", "fast0tag", "one_attention_per_label"])
def test_evaluate_checks_the_checkpoint_against_the_configured_model(data, tmp_path, model):
    cfg, out, info, _ = preflight(config(data, f"model.name={model}"), tmp_path / "out", ["test"])
    saved = saved_model(cfg, data, tmp_path / "model.pt")
    assert evaluation_checkpoint(str(tmp_path), cfg, info) == str(saved)  # the folder, or the file
    other = "model.name=fast0tag" if model != "fast0tag" else "model.name=labelem"
    with pytest.raises(ConfigError, match=rf"--checkpoint: {saved}: does not fit the configured model .*: missing"):
        evaluation_checkpoint(str(saved), config(data, other), info)


def test_evaluate_names_the_shapes_that_differ(data, tmp_path):
    cfg, out, info, _ = preflight(config(data, "model.num_attentions=10"), tmp_path / "out", ["test"])
    saved = saved_model(cfg, data, tmp_path / "model.pt")
    with pytest.raises(ConfigError) as caught:
        evaluation_checkpoint(str(saved), config(data, "model.num_attentions=5"), info)
    message = str(caught.value)
    assert "\n" not in message and "of another shape (file vs config) " in message
    assert "[10, " in message and "[5, " in message  # the attention weights as saved and as configured


def test_the_cli_refuses_a_checkpoint_that_does_not_fit_before_mlflow_and_ray(data, tmp_path):
    import time

    cfg = config(data, "model.num_attentions=10")
    saved = saved_model(cfg, data, tmp_path / "model.pt")
    (tmp_path / "corrupt.pt").write_bytes(saved.read_bytes()[:-100])
    for checkpoint, message in ((saved, "does not fit the configured model"), (tmp_path / "corrupt.pt", "damaged")):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "launch.cli", "evaluate", str(REPO / "launch" / "synthetic.yaml")]
            + ["--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--set", f"data.url={data}"]
            + ["--set", "data.image_size=32", "--set", "model.num_attentions=5"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"lesa evaluate: error: --checkpoint: {checkpoint}: ") and message in proc.stderr
        assert proc.stderr.count("\n") == 1 and time.monotonic() - started < 60
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
