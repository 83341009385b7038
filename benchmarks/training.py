"""Benchmark: the full training path against a bare PyTorch loop over the same model and batch.

    .venv/bin/python benchmarks/training.py [--steps 150]

Baseline: one process, one thread (what a 1-CPU Ray worker gets), the LESA model of
launch/synthetic.yaml (small CNN + head, M = 10), batches of 32 synthetic images already decoded
in memory, the same losses and optimizer. Ours: `lesa train` with 1 worker (Ray Train, DeepSpeed
engine, WebDataset shards read, decoded and shuffled by one loader process), and with 2 workers
of 16 images (the same 32 per step) for the scaling on this machine. The throughput of a run is
measured by the run itself (steps after the first logging window, so Ray start-up and the first
steps are not counted against it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets.contract import read_dataset  # noqa: E402
from datasets.makers.synthetic import write_synthetic  # noqa: E402
from datasets.stream import StreamSpec, make_loader  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.models.losses import total_loss  # noqa: E402
from trainer.models.registry import build_model  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402


def bare_loop(data: str, steps: int, batch: int) -> float:
    torch.set_num_threads(1)
    cfg = load_config(REPO / "launch" / "synthetic.yaml", [f"data.url={data}"])
    info = read_dataset(data)
    spec = StreamSpec(
        shards=info.shards("train"), num_labels=info.num_labels, image_size=96, batch_size=batch, train=False
    )
    batches = [(b.images, b.labels) for b in make_loader(spec, 0) if len(b.keys) == batch]
    model = build_model(cfg, info.embeddings)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    seen = torch.as_tensor(info.seen)
    weights = {name: getattr(cfg.loss, name) for name in ("rank", "dist", "rel", "div")}

    def step(i):
        images, labels = batches[i % len(batches)]
        loss, _ = total_loss(model(images, seen), labels[:, seen], weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(5):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - start)


def full_path(data: str, work: Path, steps: int, workers: int) -> dict:
    out = work / f"run{workers}"
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        str(REPO / "launch" / "synthetic.yaml"),
        "--out",
        str(out),
        "--set",
        f"data.url={data}",
        "--set",
        f"scaling.num_workers={workers}",
        "--set",
        f"data.batch_size={32 // workers}",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "train.log_every=25",
        "--set",
        "checkpoint.every=0",
        "--set",
        "mlflow.experiment=bench",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-4000:])
    return json.loads((out / "metrics.json").read_text())["throughput"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = str(work / "data")
        write_synthetic(data, seed=0, sizes={"train": 1600, "test": 64}, shard_size=200, log=lambda *a: None)
        base = bare_loop(data, args.steps, 32)
        one = full_path(data, work, args.steps, 1)
        two = full_path(data, work, args.steps, 2)
    rows = [
        {"stage": "bare PyTorch loop, data in memory, 1 thread", "samples_per_s": base, "ratio": 1.0},
        {
            "stage": "lesa train, 1 worker (Ray + DeepSpeed + shards)",
            "samples_per_s": one["samples_per_s"],
            "ratio": one["samples_per_s"] / base,
            "data_wait": one["data_wait_fraction"],
        },
        {
            "stage": "lesa train, 2 workers x 16 (2 cores)",
            "samples_per_s": two["samples_per_s"],
            "ratio": two["samples_per_s"] / base,
            "data_wait": two["data_wait_fraction"],
            "scaling": two["samples_per_s"] / one["samples_per_s"],
        },
    ]
    print(f"{'stage':<52} {'samples/s':>10} {'vs bare':>8} {'data wait':>10}")
    for row in rows:
        wait = f"{100 * row['data_wait']:.0f}%" if "data_wait" in row else "-"
        print(f"{row['stage']:<52} {row['samples_per_s']:>10.0f} {row['ratio']:>8.2f} {wait:>10}")
    print(f"2-worker scaling on this machine: {rows[2]['scaling']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
