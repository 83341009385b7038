"""The run folder (`lesa train/evaluate --out DIR`), every file by what it is, and `run.json`.

run.json              RunRecord: what `--resume latest` needs to continue the run here
config.json           the resolved config the run started with (also in MLflow)
.lock                 held by the driver while the run goes on (launch/run_lock.py)
checkpoints/          Ray Train's storage, unless checkpoint.storage names another
ledger/               data.ledger: one line per sample whose gradient is in the model
metrics.json          the results, with per_label_zsl.tsv, per_label_gzsl.tsv, model.pt,
model_best.pt         model_best.pt and attention/*.png: copied from the final checkpoint
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SETTINGS = ("zsl", "gzsl")
METRICS_FILE = "metrics.json"
PER_LABEL_FILES = tuple(f"per_label_{setting}.tsv" for setting in SETTINGS)
MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "model_best.pt"
RESULT_FILES = (METRICS_FILE, *PER_LABEL_FILES, MODEL_FILE, BEST_MODEL_FILE)
ATTENTION_DIR = "attention"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def attention(self) -> Path:
        return self.root / ATTENTION_DIR


@dataclass(frozen=True)
class RunRecord:
    """run.json: the Ray Train run (its name in the checkpoint storage) and the MLflow run."""

    run_name: str
    mlflow_run_id: str
    tracking_uri: str | None  # None for a checkpoint from elsewhere: the user's store decides
    storage: str | None  # the checkpoint storage the run was started with

    def write(self, folder: RunFolder) -> None:
        folder.run_record.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, folder: RunFolder) -> RunRecord:
        return cls(**json.loads(folder.run_record.read_text()))
