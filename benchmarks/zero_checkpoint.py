"""Benchmark: DeepSpeed ZeRO stages 0-3 on the same model in the same run, against stage 0.

    .venv/bin/python benchmarks/zero_checkpoint.py [--width 1024 --layers 6 --json FILE]

One model (an MLP of `layers` square layers, `width` wide, about width^2 * layers parameters, a
stand-in for a trainable backbone) trained with AdamW on 2 CPU processes (gloo), as our workers
are, at ZeRO stages 0, 1, 2 and 3. For each stage: the mean step time; the checkpoint save time
(every rank saving into a folder of its own, as trainer/checkpointing.py does before Ray merges
them) and the bytes each rank wrote; the native load on 2 processes (tensors-only loads, as a
restore does); and for stages 1-3 the conversion to DeepSpeed's universal format and its load on 1
process (a resume on another world size, trainer/zero.py). Times are the slowest rank's. The
engines get lesa's DeepSpeed config (trainer/engine.py), stage 3 with its default persistence
threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine(stage: int, world: int, width: int, layers: int, universal: bool = False):
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    from trainer.config import load_config
    from trainer.engine import deepspeed_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    cfg = load_config(None, ["data.url=unused", "data.batch_size=8", f"deepspeed.zero_stage={stage}"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world, universal))[0]


def slowest(seconds: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(rank: int, world: int, port: int, phase: str, stage: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from trainer.checkpointing import tensors_only_loads

    root = Path(out)
    universal = phase == "universal"
    e = engine(stage, world, args.width, args.layers, universal)
    result = {}
    if phase == "train":
        x = torch.randn(8, args.width)
        times = []
        for _ in range(args.steps + 2):
            start = time.perf_counter()
            e.backward(e(x).pow(2).mean())
            e.step()
            times.append(time.perf_counter() - start)
        result["step_s"] = slowest(sum(times[2:]) / args.steps)
        mine = root / f"rank{rank}"
        start = time.perf_counter()
        e.save_checkpoint(str(mine), tag="ds")
        result["save_s"] = slowest(time.perf_counter() - start)
        result[f"bytes_rank{rank}"] = sum(p.stat().st_size for p in mine.rglob("*.pt"))
        torch.distributed.barrier()
        if rank == 0:  # what Ray Train does with the reported folders
            for r in range(world):
                shutil.copytree(root / f"rank{r}", root / "merged", dirs_exist_ok=True)
        torch.distributed.barrier()
    else:
        folder = root / ("universal" if universal else "merged")
        start = time.perf_counter()
        with tensors_only_loads():
            e.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True)
        result[f"{phase}_load_s"] = slowest(time.perf_counter() - start)
    all_results = [None] * world
    torch.distributed.all_gather_object(all_results, result)
    if rank == 0:
        merged = {k: v for r in all_results for k, v in r.items()}
        Path(root, f"{phase}.json").write_text(json.dumps(merged))
    # a process that exits with its gloo group open may abort ("terminate called without an active exception")
    torch.distributed.destroy_process_group()


def convert(root: Path) -> float:
    from deepspeed.checkpoint import ds_to_universal

    from trainer.checkpointing import tensors_only_loads

    args = argparse.Namespace(
        input_folder=str(root / "merged" / "ds"),
        output_folder=str(root / "universal" / "ds"),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    start = time.perf_counter()
    with tensors_only_loads():
        ds_to_universal.main(args)
    return time.perf_counter() - start


def run(phase: str, world: int, stage: int, args, root: Path) -> dict:
    mp.spawn(worker, args=(world, free_port(), phase, stage, args, str(root)), nprocs=world)
    return json.loads(Path(root, f"{phase}.json").read_text())


def measure(stage: int, args) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"zero{stage}-"))
    try:
        row = {"stage": stage, **run("train", 2, stage, args, root), **run("native", 2, stage, args, root)}
        if stage > 0:
            row["convert_s"] = convert(root)
            row.update(run("universal", 1, stage, args, root))
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| stage | step (ms) | save (s) | MB rank 0 / rank 1 | native load 2 (s) | convert (s) | universal load 1 (s) "
        "| step / stage 0 | save / stage 0 | load / stage 0 | rank-0 bytes / stage 0 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mb = f"{r['bytes_rank0'] / 1e6:.1f} / {r['bytes_rank1'] / 1e6:.1f}"
        conv = f"{r['convert_s']:.2f}" if "convert_s" in r else "-"
        uni = f"{r['universal_load_s']:.2f}" if "universal_load_s" in r else "-"
        lines.append(
            f"| {r['stage']} | {r['step_s'] * 1e3:.1f} | {r['save_s']:.2f} | {mb} | {r['native_load_s']:.2f} | {conv} "
            f"| {uni} | {r['step_s'] / base['step_s']:.2f} | {r['save_s'] / base['save_s']:.2f} "
            f"| {r['native_load_s'] / base['native_load_s']:.2f} | {r['bytes_rank0'] / base['bytes_rank0']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rows = [measure(stage, args) for stage in args.stages]
    params = args.layers * (args.width * args.width + args.width)
    print(f"{params / 1e6:.1f} M parameters, AdamW, 2 CPU processes (gloo), times of the slowest rank")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": params, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
