"""Benchmark: LESA head training on cached features against training on images with the frozen backbone.

    .venv/bin/python benchmarks/feature_cache.py [--steps 60] [--image-size 64] [--batch 16] [--tiny]

Both runs are `lesa train` (Ray Train, DeepSpeed engine, tar shards, one loader process) with the
same model (VGG-19 conv5_4, frozen, + the LESA head, M = 10), the same batch, steps, seed and
optimizer, on 1 worker of 1 CPU thread, measured in the same invocation: once on the synthetic
image shards (every step runs VGG-19 on the batch) and once on the feature shards that `lesa
extract` made from them first (every step runs the head alone). The throughput of a run is
measured by the run itself, after its first logging window. VGG-19 has random weights here (no
download): the cost does not depend on their values.

Both costs grow with the number of regions (VGG-19's with the pixels, the head's with the regions
= pixels / 256), so the ratio changes little with the image size; 64 px keeps VGG-19 affordable
on a CPU. The extraction's own rate says after how many epochs the cache has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets.makers.synthetic import write_synthetic  # noqa: E402
from trainer.models.backbones import VGG19Conv54  # noqa: E402


def random_vgg19(path: Path) -> None:
    """torchvision's init and key names, so activations have a realistic scale for float16."""
    torch.manual_seed(0)
    vgg = VGG19Conv54(weights=None)
    for m in vgg.features:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, path)


def lesa(args: list[str], work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=work, env=env, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-4000:])


def settings(work: Path, data: Path, args) -> list[str]:
    values = {
        "data.url": data,
        "data.image_size": args.image_size,
        "data.batch_size": args.batch,
        "model.backbone": "vgg19",
        "model.backbone_weights": work / "vgg19.pth",
        "optim.name": "rmsprop_tf",
        "train.max_steps": args.steps,
        "train.log_every": max(args.steps // 6, 1),
        "checkpoint.every": 0,
        "eval.overlays": 0,
        "scaling.num_workers": 1,
        "mlflow.experiment": "bench-feature-cache",
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def train(work: Path, data: Path, name: str, args) -> dict:
    out = work / name
    lesa(["train", str(REPO / "launch" / "synthetic.yaml"), "--out", str(out), *settings(work, data, args)], work)
    return json.loads((out / "metrics.json").read_text())["throughput"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a quick check: 32 px, 24 steps of 8")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.image_size, args.batch = 24, 32, 8
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images, features = work / "images", work / "features"
        # Half as many images as the run uses: both runs go through two epochs, 4 shards each.
        count = args.steps * args.batch // 2
        write_synthetic(
            str(images),
            seed=0,
            sizes={"train": count, "test": 64},
            image_size=args.image_size,
            shard_size=max(count // 4, 1),
            log=lambda *a: None,
        )
        random_vgg19(work / "vgg19.pth")
        lesa(
            [
                "extract",
                str(REPO / "launch" / "synthetic.yaml"),
                "--out",
                str(features),
                *settings(work, images, args),
                "--set",
                "scaling.num_workers=1",
            ],
            work,
        )
        extract = json.loads((features / "extract" / "report.json").read_text())
        on_images = train(work, images, "on_images", args)
        on_features = train(work, features, "on_features", args)
    rows = [
        {
            "stage": f"lesa train on image shards (VGG-19 every step), {args.image_size} px",
            "samples_per_s": on_images["samples_per_s"],
            "data_wait": on_images["data_wait_fraction"],
        },
        {
            "stage": f"lesa train on feature shards (head only), {extract['features']['shape']}",
            "samples_per_s": on_features["samples_per_s"],
            "data_wait": on_features["data_wait_fraction"],
        },
    ]
    print(f"{'stage':<62} {'steps/s':>8} {'samples/s':>10} {'data wait':>10}")
    for row in rows:
        row["steps_per_s"] = row["samples_per_s"] / args.batch
        print(
            f"{row['stage']:<62} {row['steps_per_s']:>8.2f} {row['samples_per_s']:>10.0f} "
            f"{100 * row['data_wait']:>9.0f}%"
        )
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(
        f"feature shards vs image shards: {ratio:.1f}x the training throughput "
        f"({args.steps} steps of {args.batch}, 1 worker, same model)"
    )
    # Per image: extracting costs 1/e, an epoch on images 1/i, an epoch on features 1/f seconds, so
    # the cache has paid for itself after E epochs where E (1/i - 1/f) = 1/e.
    e, i, f = extract["images_per_s"], rows[0]["samples_per_s"], rows[1]["samples_per_s"]
    break_even = (1 / e) / (1 / i - 1 / f) if f > i else float("inf")
    print(
        f"extraction (lesa extract, 1 worker): {e:.0f} images/s; the cache has paid for itself after "
        f"{break_even:.2f} epochs of training"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "ratio": ratio, "break_even_epochs": break_even, "extract": extract}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
