"""What a resume refuses (docs/reliability.md): a checkpoint that would run code, one whose bytes
changed since they were written, a model that does not hash to its saved digest; and a run whose
loss goes NaN stops at once instead of finishing "successfully" with chance-level metrics.

Each case is a real `lesa train` on real Ray (the session's cluster: the subject is the checkpoint,
not a fresh Ray) against a real checkpoint written by an earlier run, altered as an attacker or a
failing disk would. The planted pickle's payload only creates a marker file.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from run_cli import lesa, lesa_env

CONFIG = str(Path(__file__).resolve().parents[2] / "launch" / "synthetic.yaml")
SETTINGS = ("data.image_size=32", "data.batch_size=8", "eval.every=0", "eval.overlays=0", "train.log_every=3",
            "mlflow.log_model=false")  # fmt: skip


def train_args(out: Path, data: Path, *extra: str) -> list[str]:
    sets = [a for s in (*SETTINGS, f"data.url={data}", *extra) for a in ("--set", s)]
    return ["train", CONFIG, "--out", out, *sets]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic, shared_ray):
    """A 6-step run with checkpoints at steps 3 and 6; tests alter copies of it."""
    data = synthetic(3, 32, 16, train=64, test=32)
    work = tmp_path_factory.mktemp("audit-ckpt")
    proc = lesa(
        *train_args(work / "run", data, "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep=3"),
        cwd=work,
        env=lesa_env(**shared_ray),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "run", data


def copy_run(run: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the run folder whose run.json points at the copy's own checkpoints; (copy, its
    checkpoint of step 6)."""
    shutil.copytree(run, dest)
    meta = json.loads((dest / "run.json").read_text())
    meta["storage"] = str(dest / "checkpoints")
    (dest / "run.json").write_text(json.dumps(meta))
    steps = {json.loads(p.read_text())["step"]: p.parent for p in (dest / "checkpoints").rglob("lesa_state.json")}
    return dest, steps[6]


def rewrite_manifest(checkpoint: Path, name: str) -> None:
    """What an attacker with write access to the storage can also do: record the new file's digest."""
    manifest = checkpoint / "lesa_files_rank0.json"
    files = json.loads(manifest.read_text())
    files[name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    manifest.write_text(json.dumps(files))


class Plant:
    """Unpickling this calls open(marker, "w"): the marker file is the evidence that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(checkpoint: Path, marker: Path) -> None:
    name = "ds/mp_rank_00_model_states.pt"
    state = torch.load(checkpoint / name, weights_only=True)
    state["payload"] = Plant(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    (checkpoint / name).write_bytes(buffer.getvalue())
    rewrite_manifest(checkpoint, name)


def test_a_planted_pickle_never_runs_on_resume_path_or_latest(tmp_path, finished_run, shared_ray):
    run, data = finished_run
    copy, checkpoint = copy_run(run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    plant(checkpoint, marker)

    # --resume PATH: refused on the driver, before any cluster work
    proc = lesa(*train_args(tmp_path / "new", data, "train.max_steps=9"), "--resume", checkpoint, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mp_rank_00_model_states.pt: holds more than plain tensors" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not marker.exists()

    # --resume latest: every worker refuses it as it loads, and the error is not retried
    env = lesa_env(**shared_ray)
    proc = lesa(*train_args(copy, data, "train.max_steps=9"), "--resume", "latest", cwd=tmp_path, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not marker.exists()
    assert "holds more than plain tensors, refused unread" in log
    assert "a retry would fail again" in log


def test_flipped_bytes_in_a_checkpoint_are_refused_naming_the_file(tmp_path, finished_run):
    run, data = finished_run
    _, checkpoint = copy_run(run, tmp_path / "run")
    target = checkpoint / "ds" / "mp_rank_00_model_states.pt"
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    target.write_bytes(bytes(raw))
    proc = lesa(*train_args(tmp_path / "new", data, "train.max_steps=9"), "--resume", checkpoint, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{target}: sha256" in proc.stderr and "the checkpoint is damaged" in proc.stderr


def test_weights_that_do_not_hash_to_the_saved_digest_are_refused(tmp_path, finished_run, shared_ray):
    """Files consistent with their manifest but weights other than the ones saved (a checkpoint
    edited along with its digests): the model digest recorded at save catches it on load."""
    run, data = finished_run
    copy, checkpoint = copy_run(run, tmp_path / "run")
    name = "ds/mp_rank_00_model_states.pt"
    state = torch.load(checkpoint / name, weights_only=True)
    first = next(k for k, v in state["module"].items() if v.is_floating_point())
    state["module"][first] = state["module"][first] + 1.0
    torch.save(state, checkpoint / name)
    rewrite_manifest(checkpoint, name)
    proc = lesa(*train_args(copy, data, "train.max_steps=9"), "--resume", "latest", cwd=tmp_path,
                env=lesa_env(**shared_ray))  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "hashes to" in log and "when it was saved" in log


def test_a_nan_loss_stops_the_run_naming_the_step_and_reports_no_success(tmp_path, synthetic, shared_ray):
    data = synthetic(3, 32, 16, train=64, test=32)
    out = tmp_path / "run"
    proc = lesa(*train_args(out, data, "train.max_steps=12", "optim.lr=1e20"), cwd=tmp_path, env=lesa_env(**shared_ray))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "training stopped there, nothing of it was checkpointed" in log
    assert "at step 2" in log or "at step 3" in log, log[-3000:]
    assert "a retry would fail again" in log  # not retried checkpoint.max_failures times
    assert not (out / "metrics.json").exists()


def test_a_driver_killed_right_after_a_commit_leaves_no_gap_in_mlflow(tmp_path, synthetic, shared_ray):
    """The audit's driver kill during a checkpoint: the controller still committed it, and the
    steps since the last MLflow write were lost for good (they were flushed only after the commit).
    The killed driver has its own Ray (a killed driver of a shared cluster would leave its
    controller); the resume runs on the session's."""
    data = synthetic(3, 32, 16, train=64, test=32)
    out = tmp_path / "run"
    steps = ("train.max_steps=8", "checkpoint.every=4", "train.log_every=1")
    killed = lesa(*train_args(out, data, *steps, "train.debug_fault=driver@4"), cwd=tmp_path)
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert (out / ".fault-driver-4").exists()  # rank 0 killed it (its own line dies with the driver's log)
    resumed = lesa(*train_args(out, data, *steps), "--resume", "latest", cwd=tmp_path, env=lesa_env(**shared_ray))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout + resumed.stderr

    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "loss")
    assert sorted(m.step for m in logged) == list(range(1, 9)), "every step once: no gap, no duplicate"
