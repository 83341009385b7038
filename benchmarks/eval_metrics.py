"""Benchmark: exact distributed evaluation at Open Images test size against a plain sklearn loop.

    .venv/bin/python benchmarks/eval_metrics.py                       # 125,436 x {400, 7586}, 1 and 2 workers
    .venv/bin/python benchmarks/eval_metrics.py --images 20000 --labels 400 --workers 1 2   # quick

Matrices with Open Images' sparsity: each image has a few annotated labels (Poisson, mean 8,
popularity Zipf-like over labels), about 40% of them positive; every other label is unknown.
Scores are float32 rounded through float16, so every label has many ties. Rows are generated in
fixed blocks from the seed, so any split over workers reproduces the same matrix.

Measured in the same run on the same machine:
- baseline: one process holding the dense matrices, AP per label with sklearn's
  average_precision_score over the annotated images (labels without positives: 0), columns
  pre-transposed so each label's scores are contiguous (its best case);
- ours: W gloo processes, each handed its rows' scores one evaluation batch (--batch rows) at a
  time on --device, as the model produces them: the label-sharded AP alone (label_statistics
  over the annotated cells) and the whole evaluation (StreamingMetrics: per batch the K-th
  scores of every row for top-K P/R/F1 at K = 10, 20 and the annotated cells' scores, then AP).
  With --device cuda the scores are put on the GPU before the clock starts, where a model
  would have produced them.
Memory: what the evaluation adds to a worker (its peak RSS during the evaluation, VmHWM reset
just before, minus its RSS holding the scores), next to 1/W of the dense matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 4096
KS = (10, 20)


def make_block(block: int, num_images: int, num_labels: int, seed: int):
    """Scores [rows, labels] of one block and its annotated cells (row, label, +1/-1)."""
    start = block * BLOCK
    rows = min(BLOCK, num_images - start)
    rng = np.random.default_rng([seed, num_labels, block])
    scores = rng.random((rows, num_labels), dtype=np.float32).astype(np.float16).astype(np.float32)
    per_image = rng.poisson(8, rows)
    popularity = 1.0 / np.arange(1, num_labels + 1) ** 0.8
    cols = rng.choice(num_labels, size=per_image.sum(), p=popularity / popularity.sum())
    image = np.repeat(np.arange(rows), per_image)
    cells, first = np.unique(image * num_labels + cols, return_index=True)  # one value per cell
    values = np.where(rng.random(len(cols)) < 0.4, 1, -1).astype(np.int8)[first]
    return scores, cells // num_labels, (cells % num_labels).astype(np.int32), values


def make_rows(blocks, num_images, num_labels, seed):
    """Scores of the given blocks, filled in place (no second copy), and their Annotations."""
    from trainer.evaluation.metrics import Annotations

    sizes = [min(BLOCK, num_images - b * BLOCK) for b in blocks]
    scores = np.empty((sum(sizes), num_labels), dtype=np.float32)
    parts, offset = [], 0
    for b, size in zip(blocks, sizes):
        block_scores, rows, cols, values = make_block(b, num_images, num_labels, seed)
        scores[offset : offset + size] = block_scores
        parts.append(Annotations(rows + offset, cols, values))
        offset += size
    return scores, Annotations.concatenate(parts)


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM), so evaluation's own peak can be read.

    False where the kernel refuses (sandboxed kernels such as gVisor do): the memory column is
    then left out rather than reporting the peak of the data generation as the evaluation's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_gb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def sklearn_baseline(num_images, num_labels, seed, out):
    from sklearn.metrics import average_precision_score

    blocks = range((num_images + BLOCK - 1) // BLOCK)
    scores, ann = make_rows(blocks, num_images, num_labels, seed)
    scores_t = np.ascontiguousarray(scores.T)
    del scores
    labels_t = np.zeros((num_labels, num_images), dtype=np.int8)
    labels_t[ann.cols, ann.rows] = ann.values
    start = time.perf_counter()
    ap = np.zeros(num_labels)
    for j in range(num_labels):
        annotated = labels_t[j] != 0
        y = labels_t[j][annotated] > 0
        if y.any():
            ap[j] = average_precision_score(y, scores_t[j][annotated])
    seconds = time.perf_counter() - start
    out.put({"seconds": seconds, "mAP": 100 * ap.mean(), "peak_rss_gb": peak_rss_gb()})


def our_worker(rank, world, num_images, num_labels, seed, store_path, batch, device_name, out):
    import torch
    import torch.distributed as dist

    from trainer.evaluation.metrics import Annotations, Entries, StreamingMetrics, label_statistics

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    device = torch.device(device_name)
    num_blocks = (num_images + BLOCK - 1) // BLOCK
    mine = range(rank * num_blocks // world, (rank + 1) * num_blocks // world)
    scores, ann = make_rows(mine, num_images, num_labels, seed)
    # The scores as the model hands them over, one evaluation batch at a time, on its device.
    batches = []
    for start in range(0, len(scores), batch):
        lo, hi = np.searchsorted(ann.rows, [start, start + batch])
        batches.append(
            (
                torch.from_numpy(scores[start : start + batch]).to(device),
                Annotations(ann.rows[lo:hi] - start, ann.cols[lo:hi], ann.values[lo:hi]),
            )
        )
    entries = Entries(ann.cols, scores[ann.rows, ann.cols], ann.values > 0)
    before_gb = rss_gb()

    def whole():
        metrics = StreamingMetrics({"all": np.arange(num_labels)}, num_labels, KS)
        for block_scores, cells in batches:
            metrics.add(block_scores, cells)
        return metrics.result()

    timings = {}
    for name, run in (("ap", lambda: label_statistics(entries, num_labels)), ("all", whole)):
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak_was_reset = reset_peak_rss()
        start = time.perf_counter()
        result = run()
        if world > 1:
            dist.barrier()
        timings[name] = time.perf_counter() - start
    out.put(
        {
            "rank": rank,
            "seconds": timings["all"],
            "ap_seconds": timings["ap"],
            "metrics": result[0]["all"],
            "rows": len(scores),
            "peak_rss_gb": peak_rss_gb(),
            "data_gb": before_gb,
            "eval_gb": peak_rss_since_reset_gb() - before_gb if peak_was_reset else None,
        }
    )
    if world > 1:
        dist.destroy_process_group()


def run_processes(target, args_list):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue)) for args in args_list]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"benchmark process failed with exit code {p.exitcode}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=125_436)
    parser.add_argument("--labels", type=int, nargs="+", default=[400, 7586])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=512, help="evaluation batch: rows handed over at once")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the scores are produced, and so where the K-th scores are found: cpu or cuda",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    rows = []
    for num_labels in args.labels:
        dense_gb = args.images * num_labels * 4 / 2**30
        print(f"\n{args.images} images x {num_labels} labels (dense float32 scores {dense_gb:.2f} GiB)", flush=True)
        (base,) = run_processes(sklearn_baseline, [(args.images, num_labels, args.seed)])
        print(
            f"  sklearn loop, 1 process: AP {base['seconds']:.1f} s, mAP {base['mAP']:.4f}, "
            f"peak RSS {base['peak_rss_gb']:.2f} GiB",
            flush=True,
        )
        for world in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                parts = run_processes(
                    our_worker,
                    [
                        (
                            r,
                            world,
                            args.images,
                            num_labels,
                            args.seed,
                            os.path.join(tmp, "store"),
                            args.batch,
                            args.device,
                        )
                        for r in range(world)
                    ],
                )
            parts.sort(key=lambda p: p["rank"])
            seconds = max(p["seconds"] for p in parts)
            ap_seconds = max(p["ap_seconds"] for p in parts)
            ours = parts[0]["metrics"]
            assert all(p["metrics"] == ours for p in parts), "ranks disagree"
            exact = abs(ours["mAP"] - base["mAP"])
            row = {
                "images": args.images,
                "labels": num_labels,
                "workers": world,
                "device": args.device,
                "batch": args.batch,
                "seconds": seconds,
                "ap_seconds": ap_seconds,
                "sklearn_ap_seconds": base["seconds"],
                "ap_speedup": base["seconds"] / ap_seconds,
                "speedup": base["seconds"] / seconds,
                "peak_rss_gb_per_worker": [p["peak_rss_gb"] for p in parts],
                "rss_before_eval_gb_per_worker": [p["data_gb"] for p in parts],
                "dense_gb": dense_gb,
                "eval_peak_extra_gb_per_worker": [p["eval_gb"] for p in parts],
                "sklearn_peak_rss_gb": base["peak_rss_gb"],
                "mAP_abs_diff": exact,
                "metrics": ours,
            }
            rows.append(row)
            print(
                f"  ours, {world} worker(s): AP {ap_seconds:.2f} s = {row['ap_speedup']:.1f}x the sklearn loop's speed; "
                f"whole evaluation (AP + P/R/F1@{KS}) {seconds:.2f} s = {row['speedup']:.1f}x; "
                f"|mAP - sklearn| = {exact:.1e}; memory the evaluation adds per worker (peak RSS during it "
                "- RSS holding the scores) "
                + ", ".join("n/a" if p["eval_gb"] is None else f"{p['eval_gb']:.3f}" for p in parts)
                + f" GiB, against {dense_gb / world:.2f} GiB for 1/W of the dense matrix",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
