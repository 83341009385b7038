"""Remote storage against a real S3-protocol server on loopback: moto's standalone server, run as a
subprocess and spoken to over HTTP by s3fs, pyarrow and boto3 exactly as they would speak to S3.

Fast tests: a dataset written to s3:// and streamed back (also through a DataLoader process), and
the driver's storage helpers. Integration tests: `lesa synth` to s3://, then `lesa train` with its
data, checkpoints and MLflow artifacts on s3://, stopped, and resumed from the checkpoint there on
an existing Ray cluster started without the AWS variables, which its processes then get from the
driver only. Credentials come from the environment and never show up in a log."""

from __future__ import annotations

import json
import multiprocessing.forkserver
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

s3fs = pytest.importorskip("s3fs", reason="remote storage tests need the s3 extra: pip install -e '.[test]'")
pytest.importorskip("moto", reason="remote storage tests need moto[server]: pip install -e '.[test]'")

from run_cli import REPO, lesa, lesa_env  # noqa: E402

from datasets.contract import read_dataset  # noqa: E402
from datasets.makers.synthetic import write_synthetic  # noqa: E402
from datasets.position import DataPosition  # noqa: E402
from datasets.stream import ShardStream, StreamSpec, fork_server, make_loader  # noqa: E402
from trainer.checkpointing import write_manifest  # noqa: E402
from trainer.state import TrainState  # noqa: E402

BUCKET = "lesa-test"
SECRET = "not-a-real-secret-7f3a"  # must never appear in a log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port, up until the module's tests are done."""
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:  # an HTTP answer of any kind: it is serving
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"moto server on {endpoint} did not answer within 60 s")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(s3_endpoint, tmp_path_factory):
    """This process's environment pointed at the server (dummy credentials, no AWS config files),
    a fresh bucket, and an s3fs filesystem to look into it; the environment is restored after.
    The loaders' fork server starts before, so their processes must get this environment from
    make_loader rather than inherit it."""
    fork_server()
    multiprocessing.forkserver.ensure_running()
    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("AWS_", "MLFLOW_S3_")):
                mp.delenv(name)
        for name, value in {
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": "lesa-test-key",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        }.items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()


def stream_all(shards, num_labels: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    spec = StreamSpec(shards=shards, num_labels=num_labels, image_size=32, batch_size=5, train=False)
    out = {}
    for batch in ShardStream(spec):
        assert not batch.skipped
        for i, key in enumerate(batch.keys):
            out[key] = (batch.images[i].numpy(), batch.labels[i].numpy())
    return out


def test_dataset_written_to_and_streamed_from_s3(s3, tmp_path):
    url = f"s3://{BUCKET}/tiny"
    write_synthetic(url, seed=2, sizes={"train": 24, "test": 12}, image_size=32, shard_size=8, log=lambda *_: None)
    write_synthetic(
        str(tmp_path / "tiny"),
        seed=2,
        sizes={"train": 24, "test": 12},
        image_size=32,
        shard_size=8,
        log=lambda *_: None,
    )
    assert s3.isfile(f"{BUCKET}/tiny/dataset.json") and s3.isfile(f"{BUCKET}/tiny/train/train-000002.tar")

    info, local = read_dataset(url), read_dataset(str(tmp_path / "tiny"))
    assert [s.url for s in info.shards("train")] == [f"{url}/train/train-{i:06d}.tar" for i in range(3)]
    assert [s.samples for s in info.shards("train")] == [8, 8, 8]
    assert info.labels == local.labels and np.array_equal(info.embeddings, local.embeddings)

    remote_samples = stream_all(info.shards("test"), info.num_labels)
    local_samples = stream_all(local.shards("test"), local.num_labels)
    assert len(remote_samples) == 12 and remote_samples.keys() == local_samples.keys()
    for key, (image, labels) in remote_samples.items():
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(image, local_samples[key][0]) and np.array_equal(labels, local_samples[key][1])

    # Training reads shards in DataLoader processes (started after s3fs is in use here), endlessly.
    spec = StreamSpec(
        shards=info.shards("train"), num_labels=info.num_labels, image_size=32, batch_size=8, seed=0, shuffle_buffer=16
    )
    batches = []
    for batch in make_loader(spec, loader_workers=1):
        if batch.has_samples:
            batches.append(batch)
        if len(batches) == 4:  # one epoch of 24 samples and the start of the next
            break
    assert all(b.images.shape == (8, 32, 32, 3) for b in batches)
    assert sorted(k for b in batches[:3] for k in b.keys) == sorted(
        k for shard in range(3) for k in _shard_keys(s3, f"{BUCKET}/tiny/train/train-{shard:06d}.tar")
    )


def _shard_keys(fs, path: str) -> list[str]:
    import tarfile

    with fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def test_driver_storage_helpers_on_s3(s3, tmp_path, monkeypatch):
    import pyarrow.fs
    from ray.train import Checkpoint

    from launch.driver import absolute, resume_target
    from launch.storage import checkpoint_url, model_file, ray_storage, storage_env
    from trainer.config import ConfigError
    from trainer.tracking import s3_endpoint_for_mlflow

    assert absolute("s3://b/x") == "s3://b/x" and absolute("gs://b/x") == "gs://b/x"

    # Ray Train storage: pyarrow resolves s3:// itself (and finds the endpoint in AWS_ENDPOINT_URL);
    # a URL only fsspec knows (s3a:// is s3fs's alias) goes through pyarrow's fsspec handler.
    assert ray_storage(f"s3://{BUCKET}/ckpt") == (f"s3://{BUCKET}/ckpt", None)
    assert ray_storage(str(tmp_path)) == (str(tmp_path), None)
    native, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}/x")
    with native.open_output_stream(f"{BUCKET}/pyarrow/native.txt") as f:
        f.write(b"native")
    path, wrapped = ray_storage(f"s3a://{BUCKET}/wrapped")
    assert path == f"{BUCKET}/wrapped" and isinstance(wrapped, pyarrow.fs.PyFileSystem)
    with wrapped.open_output_stream(f"{path}/fsspec.txt") as f:
        f.write(b"wrapped")
    s3.invalidate_cache()
    assert s3.cat(f"{BUCKET}/pyarrow/native.txt") == b"native" and s3.cat(f"{path}/fsspec.txt") == b"wrapped"

    reported = f"{BUCKET}/ckpt/run/checkpoint_1"  # as Ray reports a checkpoint on s3
    assert checkpoint_url(f"s3://{BUCKET}/ckpt", reported) == f"s3://{reported}"
    assert checkpoint_url(str(tmp_path), str(tmp_path / "run")) == str(tmp_path / "run")

    # `lesa evaluate --checkpoint` and `lesa train --resume PATH` accept checkpoint folders on s3.
    s3.pipe(f"{BUCKET}/ck/checkpoint_1/model.pt", b"weights")
    s3.pipe(
        f"{BUCKET}/ck/checkpoint_1/lesa_state.json",
        TrainState(4, DataPosition([8]), "abc", "sqlite:///x.db").to_json().encode(),
    )
    assert model_file(f"s3://{BUCKET}/ck/checkpoint_1/") == f"s3://{BUCKET}/ck/checkpoint_1/model.pt"
    assert model_file(f"s3://{BUCKET}/ck/checkpoint_1/model.pt") == f"s3://{BUCKET}/ck/checkpoint_1/model.pt"
    assert model_file(f"s3://{BUCKET}/ck/nothing") is None
    run, start = resume_target(tmp_path, f"s3://{BUCKET}/ck/checkpoint_1/")
    assert start == f"s3://{BUCKET}/ck/checkpoint_1"
    assert run.mlflow_run_id == "abc" and run.storage is None
    for url in (start, f"s3a://{BUCKET}/ck/checkpoint_1"):  # what run_workers hands Ray Train to resume from
        with Checkpoint(*ray_storage(url)).as_directory() as folder:
            assert Path(folder, "model.pt").read_bytes() == b"weights"
    with pytest.raises(ConfigError, match="lesa_state.json is missing"):
        resume_target(tmp_path, f"s3://{BUCKET}/ck")

    # Workers get the storage variables by name; MLflow's endpoint follows AWS_ENDPOINT_URL unless set.
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    s3_endpoint_for_mlflow()
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://elsewhere:9000")
    s3_endpoint_for_mlflow()
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://elsewhere:9000"
    passed = storage_env()
    assert {
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "MLFLOW_S3_ENDPOINT_URL",
    } <= passed.keys()
    assert passed["AWS_SECRET_ACCESS_KEY"] == SECRET and "PATH" not in passed and "HOME" not in passed


def test_driver_storage_helpers_keep_local_paths(tmp_path, monkeypatch):
    from ray.train import Checkpoint

    from launch.driver import resume_target
    from launch.storage import model_file, ray_storage

    folder = tmp_path / "checkpoint_1"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "model.pt")
    weights = (folder / "model.pt").read_bytes()
    (folder / "lesa_state.json").write_text(TrainState(4, DataPosition([8]), "abc", "sqlite:///x.db").to_json())
    write_manifest(folder, rank=0)  # --resume PATH checks a local checkpoint's digests and tensors
    assert model_file(str(folder)) == str(folder / "model.pt")
    assert model_file(str(folder / "model.pt")) == str(folder / "model.pt")
    assert model_file(str(tmp_path / "nothing")) is None
    monkeypatch.chdir(tmp_path)
    run, start = resume_target(tmp_path / "out", "checkpoint_1")
    assert start == str(folder) and run.mlflow_run_id == "abc"
    with Checkpoint(*ray_storage(start)).as_directory() as local:
        assert Path(local, "model.pt").read_bytes() == weights


def run_lesa(work: Path, *args: str, env_extra: dict | None = None) -> str:
    # lesa_env drops MLFLOW_S3_ENDPOINT_URL: MLflow must find the endpoint through AWS_ENDPOINT_URL alone
    proc = lesa(*args, timeout=600, cwd=work, env=lesa_env(**(env_extra or {})))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert SECRET not in log
    return log


@pytest.mark.integration
def test_train_and_resume_on_a_cluster_without_credentials_with_everything_on_s3(s3, ray_head, tmp_path):
    """The first run starts a local Ray from this environment; the resume runs on ray_head, whose
    processes (Ray Train's controller writing checkpoints, the workers reading data and writing
    shards) never saw the credentials or the endpoint: the driver hands them over."""
    from mlflow.tracking import MlflowClient

    data, ckpt, artifacts = f"s3://{BUCKET}/data", f"s3://{BUCKET}/ckpt", f"s3://{BUCKET}/mlartifacts"
    run_lesa(
        tmp_path,
        "synth",
        data,
        "--seed",
        "1",
        "--train",
        "128",
        "--val",
        "0",
        "--test",
        "48",
        "--image-size",
        "32",
        "--shard-size",
        "32",
        "--workers",
        "2",
    )
    common = [
        "train",
        str(REPO / "launch" / "synthetic.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"data.url={data}",
        "--set",
        f"checkpoint.storage={ckpt}",
        "--set",
        "data.image_size=32",
        "--set",
        "data.batch_size=8",
        "--set",
        "checkpoint.every=4",
        "--set",
        "mlflow.experiment=s3test",
        "--set",
        "mlflow.log_model=false",  # test_e2e.py checks the logged model
        "--set",
        f"mlflow.artifact_location={artifacts}",
    ]
    first = run_lesa(tmp_path, *common, "--set", "train.max_steps=8")
    assert "checkpoint at step 8" in first
    existing = {"RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "disabled"}
    second = run_lesa(tmp_path, *common, "--resume", "latest", "--set", "train.max_steps=12", env_extra=existing)
    assert "resumed from step 8" in second

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["num_test_images"] == 48
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["storage"] == ckpt
    assert not (tmp_path / "run" / "checkpoints").exists()

    # The checkpoints are objects in the bucket: the last `checkpoint.keep` (2), the latest at step 12.
    s3.invalidate_cache()
    prefix = f"{BUCKET}/ckpt/{run['run_name']}"
    folders = sorted(
        entry["name"]
        for entry in s3.ls(prefix, detail=True)
        if entry["type"] == "directory" and entry["name"].rsplit("/", 1)[-1].startswith("checkpoint_")
    )
    assert len(folders) == 2, s3.ls(prefix)
    assert metrics["checkpoint"] == f"s3://{folders[-1]}"
    for folder in folders:
        assert s3.isfile(f"{folder}/ds/mp_rank_00_model_states.pt")
    assert json.loads(s3.cat(f"{folders[-1]}/lesa_state.json"))["step"] == 12
    assert s3.isfile(f"{folders[-1]}/model.pt")

    # The MLflow run's artifacts are in the bucket, under the experiment's artifact location.
    mlflow_run = MlflowClient(run["tracking_uri"]).get_run(run["mlflow_run_id"])
    assert mlflow_run.info.artifact_uri.startswith(f"{artifacts}/")
    stored = s3.ls(mlflow_run.info.artifact_uri[len("s3://") :])
    assert {"metrics.json", "config.json", "per_label_zsl.tsv"} <= {p.rsplit("/", 1)[-1] for p in stored}
    assert json.loads(s3.cat(f"{mlflow_run.info.artifact_uri}/metrics.json"))["step"] == 12


def descendants(root: int) -> list[int]:
    """Every process below `root` (Ray's workers start their own sessions, so not its group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def ray_head(tmp_path):
    """A one-node Ray cluster (`ray start --head --block`, its own process group) started from an
    environment without any AWS or MLflow S3 variable, on free ports; its address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_", "RAY_"))}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    ports = {
        flag: free_port()
        for flag in (
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="lesa-s3-ray-")  # short: Ray's socket paths must fit 107 bytes
    cmd = [
        ray,
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"--{flag}={value}" for flag, value in ports.items()),
    ]
    log = tmp_path / "ray_head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:  # up once the node's CPUs are registered
            status = subprocess.run([ray, "status", f"--address={address}"], env=env, capture_output=True, text=True)
            if status.returncode == 0 and "2.0 CPU" in status.stdout:
                break
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start --head did not come up: {log.read_text()[-3000:]}")
            time.sleep(1)
        assert b"AWS_ENDPOINT_URL" not in Path(f"/proc/{proc.pid}/environ").read_bytes()
        yield address
    finally:  # kill this cluster's processes by id (a graceful `ray stop` of one cluster takes 30 s)
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
