"""MLflow: one run per training job. The driver opens it and logs params and artifacts; rank 0 of
the workers logs per-step losses, throughput and evaluation metrics into the same run by id.

Default store: sqlite in the working directory with artifacts in ./mlartifacts (the experiment
is created with an explicit artifact location; a relative default would land in Ray's ephemeral
worker directory). `MLFLOW_TRACKING_URI` or `mlflow.tracking_uri` overrides it.

Artifacts may go to an object store (`mlflow.artifact_location: s3://bucket/prefix`); MLflow's S3
client takes its credentials from the AWS environment and its endpoint from MLFLOW_S3_ENDPOINT_URL,
which `s3_endpoint_for_mlflow` defaults from the endpoint the other S3 clients use.

What the UI shows besides metrics: the experiment is marked a model-training one (MLflow 3 files
an unmarked one under GenAI evaluations), the run names the git commit and the command line, the
dataset is the run's input, and every node logs its system metrics (CPU, memory, disk, network;
GPU with pynvml) under system/node_N/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

# MLflow's INFO lines (creating the sqlite tables, starting the system-metrics monitor) are noise
# on a run's console; its warnings are not. MLFLOW_LOGGING_LEVEL still chooses.
logging.getLogger("mlflow").setLevel(os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING").upper())
# The UI's experiment kind; without it MLflow 3 may show a training run among GenAI evaluations.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SYSTEM_METRICS_INTERVAL_S = 10.0


def s3_endpoint_for_mlflow() -> None:
    """The one place MLflow learns of a custom S3 endpoint (MinIO, Ceph, a test server): unless
    MLFLOW_S3_ENDPOINT_URL is set, it is taken from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, which
    s3fs and pyarrow read. The driver passes the result on to the workers with the AWS variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint


def resolve_tracking(mlflow_cfg) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment), absolute so Ray workers agree."""
    s3_endpoint_for_mlflow()
    uri = mlflow_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    artifacts = mlflow_cfg.artifact_location
    if artifacts is None and uri.startswith("sqlite:///"):
        artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    elif artifacts is not None and "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    return uri, artifacts


def metric_key(name: str) -> str:
    """MLflow keys allow only [A-Za-z0-9_-. :/]: 'zsl/F1@3' becomes 'zsl/F1_at_3'."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name.replace("@", "_at_"))


def open_run(
    tracking_uri: str,
    artifact_location: str | None,
    experiment: str,
    run_name: str | None,
    params: dict,
    parent_run_id: str | None = None,
) -> str:
    """A new run; with `parent_run_id` it is nested under that run (`lesa compare`), which is
    what MLflow's tag mlflow.parentRunId means to its UI and search."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    else:  # an experiment made before the kind was set, or by someone else: marked unless it has a kind
        exp_id = exp.experiment_id
        for key, value in EXPERIMENT_KIND.items():
            if key not in exp.tags:
                client.set_experiment_tag(exp_id, key, value)
    tags = source_tags() | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def source_tags() -> dict[str, str]:
    """Where the run came from, in the tags MLflow's UI shows: the command line and, in a git
    checkout, the commit of this code (with `lesa.git_dirty` when it has uncommitted changes)."""
    tags = {
        "mlflow.source.name": "lesa",
        "mlflow.source.type": "LOCAL",
        "lesa.command": shlex.join(["lesa", *sys.argv[1:]]),
    }
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:  # not a checkout (an installed package, a Ray job's working directory): no commit
        tags["mlflow.source.git.commit"] = commit
        tags["lesa.git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    return tags


def log_dataset(
    tracking_uri: str, run_id: str, url: str, name: str, metadata_text: str, profile: dict, context: str
) -> None:
    """The dataset as the run's input: its URL, name, a digest of dataset.json (the same digest for
    the same shards and labels) and `profile` (label and image counts), in `context` (training)."""
    scheme = url.split("://", 1)[0] if "://" in url else "local"
    dataset = Dataset(
        name=name,
        digest=hashlib.sha256(metadata_text.encode()).hexdigest()[:16],
        source_type=scheme,
        source=json.dumps({"uri": url}),
        profile=json.dumps(profile),
    )
    tags = [InputTag("mlflow.data.context", context)]
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])


def system_metrics(tracking_uri: str, run_id: str, node_rank: int):
    """MLflow's system-metrics monitor of this node, started: metrics system/node_N/... every
    SYSTEM_METRICS_INTERVAL_S until `.finish()` or the run ends (GPU ones when pynvml is
    installed and sees a GPU). A restarted or resumed run continues the steps it logged."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class NodeMetricsMonitor(SystemMetricsMonitor):
        def finish(self) -> None:
            # MLflow's monitor drops the samples of its last, unfinished interval: a worker that
            # ran for less than one interval (a short run, a retry that failed fast) logged none.
            super().finish()
            last_interval = self.aggregate_metrics()
            if last_interval:
                self.publish_metrics(last_interval)
                self.mlflow_logger.flush()

    monitor = NodeMetricsMonitor(
        run_id,
        sampling_interval=SYSTEM_METRICS_INTERVAL_S,
        resume_logging=True,
        node_id=f"node_{node_rank}",
        tracking_uri=tracking_uri,
    )
    monitor.start()
    return monitor


def run_page(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, in its classic-ML view (MLflow 3.17 opens on its GenAI
    view, which lists training runs under "Evaluation runs"): on a tracking server, or on `make ui`
    for the default sqlite store of this folder; None otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
    elif tracking_uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}":
        base = "http://127.0.0.1:5000"  # `make ui`
    else:
        return None
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


class RunLogger:
    """Buffers metrics and writes them in batches (one DB round trip per flush).

    A training worker passes `after_step` (the restored step) and `skip_logged`: steps up to the
    restored one or the last one already in the run are dropped, so each metric's steps stay
    strictly increasing across restarts, including one from before the first checkpoint.
    """

    def __init__(self, tracking_uri: str, run_id: str, after_step: int = 0, skip_logged: bool = False):
        self.client, self.run_id, self.tracking_uri = MlflowClient(tracking_uri), run_id, tracking_uri
        self.pending: list[Metric] = []
        self.floor = after_step
        if skip_logged:
            logged = self.client.get_metric_history(run_id, "loss")
            self.floor = max([after_step] + [m.step for m in logged])

    def log(self, metrics: dict[str, float], step: int, flush: bool = True) -> None:
        if step <= self.floor:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()]
        if flush:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def finish(self, ok: bool) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def find_run(tracking_uri: str, run_id: str):
    """The run `run_id` in the store at `tracking_uri`, or None if that store has no such run
    (an id from a checkpoint written elsewhere)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        missing = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
        if exc.error_code in missing:
            return None
        raise
