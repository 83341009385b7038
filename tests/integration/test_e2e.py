"""End to end as a user runs it: `lesa synth`, then `lesa train` on a real local Ray cluster with 2
workers, a real DeepSpeed engine, real tar shards (one of them holding bad samples) and a real
MLflow sqlite store; then the recorded run is checked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from browser import CHROMIUM, Chromium, free_port, wait_http
from run_cli import REPO, lesa, lesa_env

from datasets.contract import read_dataset, write_metadata
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels
from datasets.makers.synthetic import SyntheticBenchmark, write_synthetic

CONFIG = REPO / "launch" / "synthetic.yaml"
# `make ui`'s server: one web worker, no GenAI job runner (Makefile)
UI_FLAGS = ["--host", "127.0.0.1", "--workers", "1"]
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
STEPS, LOG_EVERY = 24, 8


def add_bad_shard(root: Path) -> None:
    """Append a training shard with 2 good and 3 bad samples, and list it in dataset.json."""
    bench = SyntheticBenchmark(seed=3, image_size=48)
    with SplitWriter(str(root), "badtrain", maxcount=100) as writer:
        for i in range(2):
            image, pos, neg = bench.sample("train", i)
            writer.write(f"good{i}", {"jpg": encode_jpeg(image), "labels.json": encode_labels(pos, neg)})
        writer.write("corrupt", {"jpg": b"\xff\xd8 not a jpeg", "labels.json": encode_labels([0], [1])})
        writer.write("nolabels", {"jpg": encode_jpeg(image)})
        writer.write("outofrange", {"jpg": encode_jpeg(image), "labels.json": b'{"pos": [999], "neg": []}'})
    info = read_dataset(str(root))
    meta = json.loads((root / "dataset.json").read_text())
    splits = {name: [(s["path"], s["samples"]) for s in entry["shards"]] for name, entry in meta["splits"].items()}
    splits["train"] += writer.shards
    write_metadata(str(root), meta["name"], meta["kind"], info.labels, info.embeddings, splits)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    data = work / "data"
    # eval.every validates on the val split (trainer/schedule.py): the best model comes back too
    write_synthetic(str(data), seed=1, sizes={"train": 256, "val": 32, "test": 96}, image_size=48, shard_size=64)
    add_bad_shard(data)
    # its own local Ray, started by `lesa train` as a user's first run starts it
    proc = lesa(
        "train",
        CONFIG,
        "--out",
        work / "run",
        "--set",
        f"data.url={data}",
        "--set",
        "data.image_size=48",
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        f"train.log_every={LOG_EVERY}",
        "--set",
        "eval.every=16",
        "--set",
        "mlflow.experiment=e2e",
        timeout=600,
        cwd=work,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    (work / "stdout.txt").write_text(proc.stdout)
    return work, log


def test_train_writes_metrics_for_zsl_and_gzsl(trained):
    work, log = trained
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    for setting in ("zsl", "gzsl"):
        assert set(metrics[setting]) == {f"{m}@{k}" for m in "P R F1".split() for k in (3, 5)} | {"mAP"}
        assert all(0.0 <= v <= 100.0 for v in metrics[setting].values())
    assert metrics["num_test_images"] == 96
    assert metrics["step"] == STEPS
    assert "[rank 1/2] on node" in log
    assert "ZSL" in log and "GZSL" in log and "mAP" in log
    assert (work / "run" / "model.pt").stat().st_size > 0
    assert metrics["best"]["step"] == 16 and (work / "run" / "model_best.pt").stat().st_size > 0


def test_console_holds_our_lines_and_warnings_only(trained):
    """No Ray INFO chatter, no error-level Ray line, no traceback, nothing after our last line. The
    one traceback allowed is Ray's own warning that a resource request timed out on an
    overloaded machine (docs/troubleshooting.md), which a loaded CI machine can produce."""
    work, log = trained
    stdout = (work / "stdout.txt").read_text()
    assert stdout.rstrip().splitlines()[-1].startswith(f"results in {work / 'run'}")
    assert "  in the MLflow UI: http://127.0.0.1:5000/#/experiments/" in stdout  # the store `make ui` serves
    for noise in ("PreemptionWatcher", "TrainingReport(", "Reporting training result", "multiple active Ray",
                  "Started training worker group", "Requesting resources", "INFO mlflow"):  # fmt: skip
        assert noise not in log, noise
    lines = log.splitlines()
    errors = [line for line in lines if re.search(r"\bE \d+ \d+\]|\sERROR\s", line)]
    assert not errors, errors
    tracebacks = [
        i for i, line in enumerate(lines)
        if "Traceback (most recent call last)" in line and "Failed to send resource request" not in lines[i - 1]
    ]  # fmt: skip
    assert not tracebacks, "\n".join(lines[tracebacks[0] - 1 : tracebacks[0] + 30]) if tracebacks else ""


# Three Ray workers print the same line: Ray shows it once and holds the repeats for 5 s.
REPEATS = """import time, ray
from datasets.ray_start import worker_lines_flushed
ray.init(logging_level="WARNING")

@ray.remote(num_cpus=1)
def skip():
    for _ in range(4):
        print("[rank 1] skipped bad sample: key corrupt", flush=True)
        time.sleep(0.2)

with worker_lines_flushed():
    ray.get([skip.remote() for _ in range(3)])
    time.sleep(2)  # the lines reach the driver
print("results in the run folder", flush=True)
"""


def test_rays_repeated_line_summary_comes_before_the_report(shared_ray):
    """A run that ends within Ray's 5 s deduplication window printed "[repeated Nx across
    cluster]" after the driver's last line (test_console_holds_our_lines_and_warnings_only met it
    on a quiet machine); run_workers flushes it when the workers are done."""
    proc = subprocess.run(
        [sys.executable, "-c", REPEATS], capture_output=True, text=True, timeout=300, env=lesa_env(**shared_ray)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1] == "results in the run folder", lines
    assert any("repeated" in line and "across cluster" in line for line in lines[:-1]), lines


def test_bad_samples_are_skipped_counted_and_reported(trained):
    work, log = trained
    bad = json.loads((work / "run" / "metrics.json").read_text())["bad_samples"]["train"]
    # The bad shard may be read in several epochs; each pass skips the same three samples.
    assert bad["count"] >= 3 and bad["count"] % 3 == 0
    assert set(bad["by_kind"]) == {"corrupt image", "missing labels.json", "label index out of range"}
    keys = {e["key"] for e in bad["examples"]}
    assert keys == {"corrupt", "nolabels", "outofrange"}
    assert all(e["shard"].endswith("badtrain/badtrain-000000.tar") for e in bad["examples"])
    assert "skipped bad sample: shard" in log and "key corrupt" in log


def test_mlflow_run_holds_params_losses_and_eval_metrics(trained):
    from mlflow.tracking import MlflowClient

    work, _ = trained
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one MLflow run per training job"
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "lesa" and run.data.params["scaling.num_workers"] == "2"
    for key in ("loss", "loss/rank", "loss/dist", "loss/rel", "loss/div", "lr", "samples_per_s", "data_wait_fraction"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), key
    zsl_map = client.get_metric_history(run.info.run_id, "zsl/mAP")
    assert [m.step for m in zsl_map] == [16, STEPS]
    assert zsl_map[-1].value == pytest.approx(metrics["zsl"]["mAP"])
    assert run.data.metrics["bad_samples/train"] == metrics["bad_samples"]["train"]["count"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.json", "model.pt"} <= artifacts
    assert exp.artifact_location.startswith((work / "mlartifacts").as_uri())
    assert (work / "mlartifacts").is_dir()


def test_mlflow_run_is_a_traceable_training_run_with_its_model(trained):
    """The experiment kind, the code and command, the dataset, every node's system metrics, and the
    trained model as an MLflow model that scores images as model.pt does."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from trainer.config import config_from_dict
    from trainer.models.registry import build_model

    work, _ = trained
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags["mlflow.source.git.commit"])
    assert run.data.tags["lesa.command"].startswith(f"lesa train {CONFIG} --out {work / 'run'}")
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "synthetic-seed1" and json.loads(dataset.source) == {"uri": str(work / "data")}
    assert json.loads(dataset.profile)["seen_labels"] == 49 and json.loads(dataset.profile)["train_images"] == 261
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    assert "system/node_0/cpu_utilization_percentage" in run.data.metrics
    assert "system/node_0/system_memory_usage_megabytes" in run.data.metrics

    (output,) = run.outputs.model_outputs
    mlflow.set_tracking_uri(uri)
    logged = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    assert len(logged.metadata.metadata["labels"]) == 64
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    cfg = config_from_dict(json.loads((work / "run" / "config.json").read_text()))
    info = read_dataset(str(work / "data"))
    model = build_model(cfg, info.embeddings, info.seen)
    model.load_state_dict(torch.load(work / "run" / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images), torch.arange(64)).scores.numpy()
    assert np.allclose(logged.predict(images), expected, atol=1e-4)


# The UI's own words and parts on the run's pages (MLflow 3.17.2); each check is a JavaScript
# expression, polled until `ready`, that says what the page shows.
CHART_POINTS = """(key) => {
  const search = document.querySelector('input[placeholder="Search metric charts"]');
  if (search && search.value !== key) {  // only the charts whose names match are drawn
    Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(search, key);
    search.dispatchEvent(new Event('input', {bubbles: true}));
    return 0;
  }
  const title = [...document.querySelectorAll('[title]')].find(e => e.getAttribute('title') === key);
  let card = title;
  while (card && !card.querySelector('.js-plotly-plot')) card = card.parentElement;
  const line = card && card.querySelector('path.js-line');
  return line ? (line.getAttribute('d').match(/[ML]/g) || []).length : 0;
}"""
OVERVIEW = """(() => { const text = document.body.innerText;
  return {ready: text.includes('Logged models') && text.includes('synthetic-seed1') && text.includes('Ready'),
          text}; })()"""
LOSS_CURVE = f"""(() => {{ const points = ({CHART_POINTS})('loss'); return {{ready: points >= 3, points}}; }})()"""
PICTURE = """(() => { const img = [...document.querySelectorAll('img')].find(i => i.alt.startsWith('attention/'));
  return {ready: Boolean(img && img.complete && img.naturalWidth > 0), width: img ? img.naturalWidth : 0}; })()"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_mlflow_ui_in_a_browser_shows_the_run(trained, tmp_path):
    """`make ui`'s server on the run's store, read by headless Chromium as a user reads it: the
    classic-ML view, the metrics (system ones too), the dataset, the logged model, the loss curve
    and an attention overlay. A failing check leaves a screenshot."""
    work, _ = trained
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    run_id = metrics["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(run_id).info.experiment_id
    port = free_port()
    ui = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", *UI_FLAGS, "--backend-store-uri",
         f"sqlite:///{work / 'mlflow.db'}", "--port", str(port)],
        env={**lesa_env(), **UI_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, ui)
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{run_id}"
        view = "?workflowType=machine_learning"
        with Chromium() as browser:
            overview = browser.wait_for(page + view, OVERVIEW, screenshot=tmp_path / "overview.png")
            assert overview.get("ready"), f"{tmp_path / 'overview.png'}: {overview.get('text', '')[:2000]}"
            assert "Evaluation runs" not in overview["text"] and "Model registry" in overview["text"]
            for name in ("loss", "zsl/mAP", "bad_samples/train", "system/node_0/cpu_utilization_percentage"):
                assert name in overview["text"], name
            loss = browser.wait_for(f"{page}/model-metrics{view}", LOSS_CURVE, screenshot=tmp_path / "loss.png")
            assert loss.get("ready"), (tmp_path / "loss.png", loss)
            picture = sorted((work / "run" / "attention").glob("*.png"))[0].name
            shown = browser.wait_for(
                f"{page}/artifacts/attention/{picture}{view}", PICTURE, screenshot=tmp_path / "png.png"
            )
            assert shown.get("ready"), (tmp_path / "png.png", shown)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)


def test_config_error_names_the_key_before_any_cluster_work(tmp_path):
    proc = lesa("train", CONFIG, "--out", tmp_path, "--set", "train.max_stepz=3", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr
    assert "ray" not in proc.stderr.lower()


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = lesa(
        "train", CONFIG, "--out", tmp_path / "o", "--set", f"data.url={tmp_path / 'nowhere'}", cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2
    assert "nowhere/dataset.json: missing" in proc.stderr


def test_evaluate_checkpoint_on_another_number_of_workers_gives_the_same_metrics(trained, shared_ray):
    """`lesa evaluate` with 3 workers reproduces the 2-worker training's final metrics exactly (on
    the session's Ray: its subject is the checkpoint, not a fresh cluster)."""
    work, _ = trained
    trained_metrics = json.loads((work / "run" / "metrics.json").read_text())
    proc = lesa(
        "evaluate",
        CONFIG,
        "--checkpoint",
        work / "run",
        "--out",
        work / "eval3",
        "--set",
        f"data.url={work / 'data'}",
        "--set",
        "data.image_size=48",
        "--set",
        "scaling.num_workers=3",
        "--set",
        "mlflow.experiment=e2e-eval",
        timeout=600,
        cwd=work,
        env=lesa_env(**shared_ray),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    metrics = json.loads((work / "eval3" / "metrics.json").read_text())
    for setting in ("zsl", "gzsl"):
        for key, value in trained_metrics[setting].items():
            assert metrics[setting][key] == pytest.approx(value, abs=1e-6), (setting, key)
    assert metrics["num_test_images"] == 96
    for setting in ("zsl", "gzsl"):
        rows = (work / "eval3" / f"per_label_{setting}.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["index", "id", "name", "role", "AP", "positives", "annotated"]
        assert len(rows) - 1 == (15 if setting == "zsl" else 64)
        assert (work / "eval3" / f"per_label_{setting}.tsv").read_text() == (
            work / "run" / f"per_label_{setting}.tsv"
        ).read_text()
    assert "ZSL per label: best:" in proc.stdout
