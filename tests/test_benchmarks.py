"""The benchmark scripts still run: gpu.sh in its tiny CPU mode, head_ab.py on the CPU, and
make bench's summary table over real (small) benchmark outputs. Their figures are not asserted: timings belong in
docs/performance.md, not in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_script_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run(["bash", "benchmarks/gpu.sh", "--tiny", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    for key in (
        "bf16_matmul_tflops",
        "vgg19_images_per_s_eager",
        "head_steps_per_s_b4_eager",
        "loader_images_per_s",
        "end_to_end_images_per_s_eager",
    ):
        assert result[key] > 0, key
    assert "end-to-end training from JPEG shards" in proc.stdout


def test_head_ab_times_both_trees_and_names_a_bad_baseline(tmp_path):
    out = tmp_path / "ab.json"
    proc = run(
        [
            sys.executable,
            "benchmarks/head_ab.py",
            "--baseline",
            str(REPO),
            "--batches",
            "2",
            "--rounds",
            "1",
            "--iters",
            "1",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    (round_,) = json.loads(out.read_text())
    assert round_["baseline"]["2"] > 0 and round_["this"]["2"] > 0
    assert "batch 2:" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "benchmarks/head_ab.py", "--baseline", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode != 0 and f"{tmp_path}: no benchmarks/gpu_bench.py" in bad.stderr


def test_bench_summary_prints_one_table_from_the_benchmarks_outputs(tmp_path):
    run(
        [
            sys.executable,
            "benchmarks/loader.py",
            "--images",
            "96",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "loader.json"),
        ],
        tmp_path,
    )
    run(
        [
            sys.executable,
            "benchmarks/eval_metrics.py",
            "--images",
            "3000",
            "--labels",
            "2100",
            "--workers",
            "1",
            "2",
            "--json",
            str(tmp_path / "eval_metrics.json"),
        ],
        tmp_path,
    )
    proc = run([sys.executable, "benchmarks/summary.py", str(tmp_path)], tmp_path)
    table = proc.stdout
    assert "loader, 1 loader process / ceiling" in table and "bound of a loader process" in table
    assert "evaluation / sklearn AP loop, 3,000 x 2,100, 2 worker(s)" in table
    # training and the feature cache did not run here: named as missing, the rest still printed
    assert "training.json: missing" in table and "feature_cache.json: missing" in table
    starts = [row for row in json.loads((tmp_path / "loader.json").read_text()) if "first_batch_s" in row]
    assert [row["stage"] for row in starts] == [
        "start: fork of this process (baseline)",
        "start: fork server (make_loader)",
    ]
    assert starts[0]["ratio"] == 1.0 and all(row["first_batch_s"] > 0 for row in starts)
    exact = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert all(row["mAP_abs_diff"] == 0 for row in exact)


def test_metrics_cli_benchmark_runs_both_paths_and_they_agree(tmp_path):
    out = tmp_path / "metrics_cli.json"
    run(
        [sys.executable, "benchmarks/metrics_cli.py", "--images", "600", "--labels", "40", "--json", str(out)], tmp_path
    )
    result = json.loads(out.read_text())
    assert result["same_metrics"] is True
    assert result["reference"]["seconds"] > 0 and result["lesa_metrics"]["peak_rss_mb"] > 0
    table = run([sys.executable, "benchmarks/summary.py", str(tmp_path)], tmp_path).stdout
    assert "lesa metrics / reference, 600 x 40" in table and "loader.json: missing" in table
