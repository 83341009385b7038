"""One table of the CPU benchmarks' results against their goals, from the JSON files they wrote.

    .venv/bin/python benchmarks/summary.py DIR      # DIR holds loader.json, training.json,
                                                    # feature_cache.json, eval_metrics.json, metrics_cli.json

`make bench` writes those files to bench_results/ and ends with this table. A missing file is
reported as such; the other rows still print.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def loader_rows(rows: list[dict]) -> list[tuple]:
    by_stage = {row["stage"]: row for row in rows}
    out = []
    for stage, label in (
        ("reader, in-process", "loader in-process / decode ceiling"),
        ("reader, 1 loader process(es)", "loader, 1 loader process / ceiling"),
        ("reader, 2 loader process(es)", "loader, 2 loader processes / ceiling, per process"),
    ):
        if stage in by_stage:
            goal = "≥ 0.9" if "2 loader" not in stage else "-"  # 2 processes on 2 cores share them with the trainer
            out.append((label, f"{by_stage[stage]['ratio']:.2f}", goal))
    bound = next((row for row in rows if "handover_ms" in row), None)
    if bound:
        out.append(
            (
                f"  bound of a loader process (hand-over {bound['handover_ms']:.1f} ms/batch)",
                f"{bound['ratio']:.2f}",
                "-",
            )
        )
    return out


def training_rows(rows: list[dict]) -> list[tuple]:
    one, two = rows[1], rows[2]
    return [
        ("lesa train, 1 worker / bare PyTorch loop", f"{one['ratio']:.2f}", "≥ 0.9"),
        ("  data wait, 1 worker", f"{100 * one['data_wait']:.0f}%", "-"),
        ("2-worker scaling on this machine", f"{two['scaling']:.2f}x", "-"),
    ]


def feature_cache_rows(result: dict) -> list[tuple]:
    return [
        ("feature shards / image shards, head training", f"{result['ratio']:.1f}x", "-"),
        ("  cache paid back after (epochs)", f"{result['break_even_epochs']:.2f}", "-"),
    ]


def eval_rows(rows: list[dict]) -> list[tuple]:
    out = []
    for row in rows:
        where = f"{row['images']:,} x {row['labels']:,}, {row['workers']} worker(s)"
        full_size = row["images"] >= 125_436 and row["labels"] >= 7_586  # the Open Images test size
        out.append((f"evaluation / sklearn AP loop, {where}", f"{row['speedup']:.1f}x", "≥ 10" if full_size else "-"))
        out.append(("  AP alone", f"{row['ap_speedup']:.1f}x", "-"))
    return out


def metrics_cli_rows(row: dict) -> list[tuple[str, str, str]]:
    where = f"{row['images']:,} x {row['labels']:,}"
    return [
        (f"lesa metrics / reference, {where}", f"{row['speedup']:.1f}x", "-"),
        ("  peak memory, reference / lesa metrics", f"{row['memory_ratio']:.1f}x", "-"),
    ]


SOURCES = {
    "loader.json": loader_rows,
    "training.json": training_rows,
    "feature_cache.json": feature_cache_rows,
    "eval_metrics.json": eval_rows,
    "metrics_cli.json": metrics_cli_rows,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    lines = []
    for name, rows_of in SOURCES.items():
        path = folder / name
        if not path.exists():
            lines.append((f"({path}: missing; that benchmark did not finish)", "", ""))
            continue
        lines.extend(rows_of(json.loads(path.read_text())))
    width = max(len(line[0]) for line in lines)
    print(f"\n{'CPU benchmarks: ratio against the baseline of the same run':<{width}}  {'ratio':>7}  goal")
    for what, ratio, goal in lines:
        print(f"{what:<{width}}  {ratio:>7}  {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
