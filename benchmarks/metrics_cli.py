"""Benchmark: `lesa metrics` (memory-mapped row blocks through the evaluation's fast path) against
the single-process reference it used to call (`compute_metrics`: the whole matrix as float64, a
stable argsort of every row, a Python loop over labels), on the same .npy files in the same run.

    .venv/bin/python benchmarks/metrics_cli.py --images 20000 --labels 7586

Each side runs in a fresh process that reports its own peak RSS (ru_maxrss) and wall time; the
two print the same metrics (checked to 1e-9). Scores are float32, labels int8 with a few
annotated cells per image (8 positives and 8 negatives at random), every other cell unknown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = """
import json, resource, sys, time
import numpy as np
from trainer.evaluation.metrics import compute_metrics
start = time.perf_counter()
scores, labels = np.load(sys.argv[1]), np.load(sys.argv[2])
metrics = compute_metrics(scores, labels.astype(np.int8), [3, 5])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "metrics": metrics}))
"""
CLI = """
import contextlib, io, json, resource, sys, time
from launch.cli import main
start = time.perf_counter()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    main(["metrics", "--scores", sys.argv[1], "--labels", sys.argv[2], "--k", "3", "5"])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "metrics": json.loads(out.getvalue())}))
"""


def write_problem(folder: Path, images: int, labels: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    scores = np.lib.format.open_memmap(folder / "S.npy", mode="w+", dtype=np.float32, shape=(images, labels))
    y = np.lib.format.open_memmap(folder / "Y.npy", mode="w+", dtype=np.int8, shape=(images, labels))
    for start in range(0, images, 4096):
        n = min(4096, images - start)
        scores[start : start + n] = rng.standard_normal((n, labels), dtype=np.float32)
        block = np.zeros((n, labels), np.int8)
        rows = np.arange(n)[:, None]
        block[rows, rng.integers(0, labels, (n, 8))] = -1
        block[rows, rng.integers(0, labels, (n, 8))] = 1
        y[start : start + n] = block
    scores.flush(), y.flush()
    return folder / "S.npy", folder / "Y.npy"


def run(script: str, scores: Path, labels: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, str(scores), str(labels)], capture_output=True, text=True,
                          cwd=REPO, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--labels", type=int, default=7586)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scores, labels = write_problem(Path(tmp), args.images, args.labels)
        reference, cli = run(REFERENCE, scores, labels), run(CLI, scores, labels)
    same = all(abs(reference["metrics"][k] - cli["metrics"][k]) < 1e-9 for k in reference["metrics"])
    result = {
        "images": args.images,
        "labels": args.labels,
        "reference": {k: reference[k] for k in ("seconds", "peak_rss_mb")},
        "lesa_metrics": {k: cli[k] for k in ("seconds", "peak_rss_mb")},
        "speedup": reference["seconds"] / cli["seconds"],
        "memory_ratio": reference["peak_rss_mb"] / cli["peak_rss_mb"],
        "same_metrics": same,
    }
    print(f"{args.images} x {args.labels}: reference {reference['seconds']:.1f} s, {reference['peak_rss_mb']:.0f} MB; "
          f"lesa metrics {cli['seconds']:.1f} s, {cli['peak_rss_mb']:.0f} MB ({result['speedup']:.1f}x faster, "
          f"{result['memory_ratio']:.1f}x less memory); same metrics: {same}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
