"""The trained model as an MLflow model in the training run, so `mlflow models` tooling, the model
registry and `mlflow.pyfunc.load_model` work with it.

It is logged with mlflow.pytorch in torch.export's "pt2" format: a traced graph and its weights,
which loading never unpickles (MLflow's "pickle" format would run whatever code the file names).
Input: uint8 images [batch, image_size, image_size, 3] (RGB, as `lesa predict` decodes them);
output: float scores [batch, labels], one column per label of the dataset in dataset.json's
order; the label names are the model's metadata (`labels`) and rank its columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datasets.contract import read_dataset
from trainer.config import Config
from trainer.models.registry import build_model

MODEL_NAME = "model"  # the name of the logged model in the run


class LabelScores(torch.nn.Module):
    """A trained model scoring images against every label of its dataset."""

    def __init__(self, model: torch.nn.Module, num_labels: int):
        super().__init__()
        self.model = model
        self.register_buffer("label_ids", torch.arange(num_labels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.label_ids).scores


def log_trained_model(tracking_uri: str, run_id: str, cfg: Config, model_file: Path) -> str | None:
    """Log model.pt (read as tensors only) into run `run_id` as an MLflow model; its URI, or None
    for a model trained on cached features (its input is feature rows, not images)."""
    import mlflow

    info = read_dataset(cfg.data.url)
    if info.features is not None:
        return None
    model = build_model(cfg, info.embeddings, info.seen, info.features)
    model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
    scorer = LabelScores(model.eval(), info.num_labels).eval()
    size = cfg.data.image_size
    example = np.zeros((2, size, size, 3), np.uint8)  # a batch of 2: the exported batch size stays free
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        logged = mlflow.pytorch.log_model(
            scorer,
            name=MODEL_NAME,
            input_example=example,
            serialization_format="pt2",
            # named, not inferred: inferring them loads the model again in a subprocess
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            metadata={"labels": [label.name for label in info.labels], "model.name": cfg.model.name},
        )
    return logged.model_uri
