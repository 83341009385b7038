"""What a run hands back to the driver: metrics.json, per-label TSVs, model.pt, attention overlays.

Rank 0 writes these files into the run's final checkpoint; the driver copies them into `--out`
and the MLflow run (launch/driver.py). The other ranks report only their flat metrics.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from trainer.evaluation.evaluate import EvalResult, settings_of
from trainer.evaluation.report import write_per_label


def flat_eval_metrics(settings: dict[str, dict[str, float]]) -> dict[str, float]:
    """`zsl/mAP`, `gzsl/F1@3`, ...: the metric names of MLflow and Ray Train's reports, from
    {"zsl": {...}, "gzsl": {...}} (EvalResult.settings(), or metrics.json's "best")."""
    return {f"{setting}/{name}": value for setting in ("zsl", "gzsl") for name, value in settings[setting].items()}


def final_metrics(results: EvalResult, step: int, **extra) -> dict:
    """metrics.json: zsl and gzsl first, then what else the run knows (docs/training.md)."""
    return {
        **results.settings(),
        "chance_mAP": results.chance_map,
        "step": step,
        "num_test_images": results.num_images,
        **extra,
    }


def result_files(metrics: dict, results: EvalResult, info, weights: dict | None = None) -> dict:
    """{file name: writer(path)}: metrics.json, one per-label TSV per setting and, after training,
    model.pt: `weights`, the model's whole state dict on the CPU (tensors only, so loading it never
    runs code)."""
    files = {"metrics.json": lambda path: path.write_text(json.dumps(metrics, indent=1))}
    for name, cols in settings_of(info).items():
        files[f"per_label_{name}.tsv"] = lambda path, cols=cols: write_per_label(path, info, results.per_label, cols)
    if weights is not None:
        files["model.pt"] = lambda path: torch.save(weights, path)
    return files


def publish(rank: int, metrics: dict, results: EvalResult, info, extra_files: dict | None = None) -> None:
    """Report evaluation results to the driver (rank 0 through a checkpoint of result files)."""
    import ray.train

    flat = flat_eval_metrics(results.settings())
    if rank != 0:
        ray.train.report(flat)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in {**result_files(metrics, results, info), **(extra_files or {})}.items():
            write(Path(tmp, name))
        ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(tmp))
