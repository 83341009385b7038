"""Per-label reports: one TSV per setting (label, AP, positives, annotated images) and a console
summary of the best and worst labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from datasets.contract import DatasetInfo
from trainer.evaluation.metrics import LabelStats

COLUMNS = ["index", "id", "name", "role", "AP", "positives", "annotated"]


def write_per_label(path: Path, info: DatasetInfo, stats: LabelStats, cols: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")
        out.writerow(COLUMNS)
        for j in cols:
            lab = info.labels[j]
            out.writerow(
                [
                    lab.index,
                    lab.id,
                    lab.name,
                    lab.role,
                    f"{100 * stats.ap[j]:.4f}",
                    int(stats.positives[j]),
                    int(stats.annotated[j]),
                ]
            )


def summarise_per_label(path: Path, show: int = 3) -> str:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rows.sort(key=lambda r: float(r["AP"]), reverse=True)
    fmt = lambda r: f"{r['name']} {float(r['AP']):.1f} ({r['positives']}/{r['annotated']})"  # noqa: E731
    without = sum(int(r["positives"]) == 0 for r in rows)
    return f"best: {', '.join(fmt(r) for r in rows[:show])}; worst: {', '.join(fmt(r) for r in rows[-show:])}" + (
        f"; {without} labels without positives count as AP 0" if without else ""
    )
