"""The launch side of the audit, without Ray: the `--out` lock, `--resume latest` with its
checkpoints gone, which MLflow store a resumed checkpoint reports to, and what `lesa submit`
uploads. Real components throughout: flock between processes, a real MLflow sqlite store, the
synthetic dataset, Ray's own packaging function. (tests/integration/test_audit_launch_runs.py
runs the same guarantees through real training runs.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from datasets.makers.synthetic import write_synthetic
from datasets.position import DataPosition
from launch.driver import open_tracking, resume_target, run_training
from launch.run_lock import LOCK_FILE, hold
from launch.submit import job_spec
from trainer.checkpointing import write_manifest
from trainer.config import ConfigError, load_config
from trainer.state import STATE_FILE, TrainState
from trainer.tracking import RunLogger, open_run

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "launch" / "synthetic.yaml"
HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from launch.run_lock import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit") / "data"
    write_synthetic(
        str(root), seed=3, sizes={"train": 16, "test": 16}, image_size=32, shard_size=8, log=lambda *_: None
    )
    return root


def start_holder(out: Path) -> subprocess.Popen:
    """Another process holding the lock of `out`, as a running driver does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(REPO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_a_held_out_folder_is_refused_at_once_naming_the_holder(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    holder = start_holder(out)
    try:
        cfg = load_config(
            CONFIG, [f"data.url={data}", "data.image_size=32", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
        )
        started = time.time()
        with pytest.raises(ConfigError) as refused:
            run_training(cfg, out, resume="latest")
        assert time.time() - started < 10
        message = str(refused.value)
        assert str(out) in message and f"pid {holder.pid}" in message and "--resume latest" in message
        assert "\n" not in message
        assert not (tmp_path / "m.db").exists(), "refused before any MLflow work"
    finally:
        holder.kill()
        holder.wait()


def test_a_sigkilled_holder_leaves_the_folder_free(tmp_path):
    holder = start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid), "the stale pid stays, the lock does not"
    with hold(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_the_lock_is_released_when_the_run_ends_even_by_an_error(tmp_path):
    with pytest.raises(RuntimeError), hold(tmp_path):
        raise RuntimeError("a failed run")
    with hold(tmp_path):  # the same process (lesa compare runs many) takes it again
        pass


def write_run(out: Path, tracking_uri: str, run_id: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    storage = out / "checkpoints"
    (storage / "lesa-1").mkdir(parents=True)
    run = {"run_name": "lesa-1", "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "storage": str(storage)}
    (out / "run.json").write_text(json.dumps(run))


def test_resume_latest_with_the_checkpoints_gone_is_an_error_once_steps_are_logged(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = open_run(uri, None, "audit", "lesa-1", {})
    RunLogger(uri, run_id).log({"loss": 1.0}, step=10)
    write_run(tmp_path / "run", uri, run_id)
    with pytest.raises(ConfigError) as gone:
        resume_target(tmp_path / "run", "latest")
    message = str(gone.value)
    assert str(tmp_path / "run" / "checkpoints" / "lesa-1") in message and "new --out" in message
    assert "--resume PATH" in message and "\n" not in message


def test_resume_latest_before_the_first_checkpoint_restarts_the_same_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = open_run(uri, None, "audit", "lesa-1", {})  # crashed before any step reached MLflow
    write_run(tmp_path / "run", uri, run_id)
    run, resume_from = resume_target(tmp_path / "run", "latest")
    assert run.mlflow_run_id == run_id and resume_from is None


def test_resume_latest_with_a_checkpoint_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = open_run(uri, None, "audit", "lesa-1", {})
    RunLogger(uri, run_id).log({"loss": 1.0}, step=10)
    write_run(tmp_path / "run", uri, run_id)
    ckpt = tmp_path / "run" / "checkpoints" / "lesa-1" / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text("{}")
    assert resume_target(tmp_path / "run", "latest")[0].mlflow_run_id == run_id


def foreign_checkpoint(folder: Path, run_id: str, tracking_uri: str) -> Path:
    """A checkpoint folder from elsewhere, as the trainer writes one (its TrainState and file
    digests; no DeepSpeed files: the driver does not load them), naming `tracking_uri`."""
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(TrainState(4, DataPosition([8, 8]), run_id, tracking_uri).to_json())
    write_manifest(folder, rank=0)
    return folder


def test_a_checkpoint_never_redirects_tracking_it_continues_in_a_new_run_of_the_users_store(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere.db"  # the URI a tampered (or foreign) checkpoint names
    ckpt = foreign_checkpoint(tmp_path / "ckpt", "f" * 32, f"sqlite:///{elsewhere}")
    mine = f"sqlite:///{tmp_path}/mine.db"
    cfg = load_config(CONFIG, ["data.url=/unused", f"mlflow.tracking_uri={mine}", "mlflow.experiment=audit"])
    out = tmp_path / "run"
    out.mkdir()
    run, resume_from = resume_target(out, str(ckpt))
    assert resume_from == str(ckpt)
    tracking_uri, _, logger = open_tracking(cfg, out, "lesa", resume=run)
    assert tracking_uri == mine and logger.run_id != "f" * 32
    assert not elsewhere.exists(), "the checkpoint's store was never contacted"
    assert "is not in" in capsys.readouterr().out


def test_a_checkpoint_whose_run_is_in_the_users_store_continues_that_run(tmp_path):
    mine = f"sqlite:///{tmp_path}/mine.db"
    run_id = open_run(mine, None, "audit", "lesa-1", {})
    ckpt = foreign_checkpoint(tmp_path / "ckpt", run_id, "http://127.0.0.1:9/")
    cfg = load_config(CONFIG, ["data.url=/unused", f"mlflow.tracking_uri={mine}", "mlflow.experiment=audit"])
    out = tmp_path / "run"
    out.mkdir()
    run, _ = resume_target(out, str(ckpt))
    tracking_uri, _, logger = open_tracking(cfg, out, "lesa", resume=run)
    assert (tracking_uri, logger.run_id) == (mine, run_id)


SECRETS = [
    ".env",
    ".env.production",
    "deploy/server.pem",
    "deploy/tls.key",
    "id_rsa",
    "keys/id_ed25519.pub",
    ".aws/credentials",
    ".aws/config",
    ".ssh/known_hosts",
    ".gcloud/token",
    ".config/gcloud/application_default_credentials.json",
    "gcp-credentials.json",
    "my-service-account.json",
    "conf/project-1234.json",  # a service-account key under an ordinary name: found by content
    ".netrc",
    ".npmrc",
    ".pypirc",
]
KEPT = ["exp.yaml", "launch/identity.py", "id_mapping.py", "conf/labels.json", "README.md"]


def test_submit_never_ships_credentials(tmp_path, capsys):
    from ray._private.runtime_env.packaging import create_package

    work = tmp_path / "work"
    for name in SECRETS + KEPT:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("harmless test content\n")
    (work / "conf/project-1234.json").write_text('{"type": "service_account", "project_id": "x"}')
    (work / "conf/labels.json").write_text('{"type": "labels"}')
    (work / "exp.yaml").write_text(
        f"data: {{url: /data}}\nsubmit: {{working_dir: {work}, out: /runs/x, runtime_env: {{excludes: [README.md]}}}}\n"
    )
    _, runtime_env, _ = job_spec(str(work / "exp.yaml"), [], None)
    warning = capsys.readouterr().err
    # The same call Ray's job client makes before uploading (dashboard_sdk._upload_package).
    create_package(str(work), tmp_path / "pkg.zip", include_gitignore=True, excludes=runtime_env["excludes"])
    shipped = {n.rstrip("/") for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist()}
    assert not [s for s in SECRETS if s in shipped], shipped
    assert {"exp.yaml", "launch/identity.py", "id_mapping.py", "conf/labels.json"} <= shipped
    assert "README.md" not in shipped, "the user's own excludes still apply, added to ours"
    assert warning.count("\n") == 1 and warning.startswith("warning: not shipping")
    for name in ["conf/project-1234.json", ".env", ".aws/", "deploy/tls.key", ".netrc"]:
        assert name in warning


def test_fail_fast_stops_the_retries_of_every_deterministic_error_and_no_other():
    from trainer.failures import FailFast, NotRetryable, deterministic_errors

    callback = FailFast()
    for kind in deterministic_errors():
        with pytest.raises(NotRetryable, match=f"rank 1 failed and a retry would fail again: {kind.__name__}: "):
            callback.after_exception(None, {0: RuntimeError("a flaky failure"), 1: kind("it recurs")})
    for flaky in (RuntimeError("a lost connection"), OSError("a node went away"), MemoryError()):
        assert callback.after_exception(None, {0: flaky, 1: flaky}) is None  # Ray Train retries these
