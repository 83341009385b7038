"""One duration format for every console line: conversion, extraction and training progress."""

from __future__ import annotations

import numpy as np
from PIL import Image

from datasets.makers.convert import ImageOptions, ShardJob, SplitReport, run_shards
from datasets.progress import format_duration
from trainer import progress


def test_format_duration_is_hours_minutes_seconds():
    assert format_duration(62) == "0:01:02"
    assert format_duration(3725.9) == "1:02:05"  # whole seconds, not rounded up
    assert format_duration(100_000) == "27:46:40"  # hours do not wrap into days
    assert format_duration(-3) == "0:00:00"
    assert progress.format_duration is format_duration  # training's lines use the same one


def test_a_conversion_prints_its_progress_in_that_format(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / f"{name}.jpg")
    job = ShardJob("train", 0, ["a", "b"], [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], [b"{}", b"{}"])
    lines: list[str] = []
    report = {"train": SplitReport(planned=2)}
    written = run_shards(iter([job]), 1, str(tmp_path / "out"), ImageOptions(), report, log=lines.append, use_ray=False)
    assert written == {"train": [("train/train-000000.tar", 2)]}
    assert lines[-1].startswith("  convert: 1/1 shards, 2 images written") and lines[-1].endswith("ETA 0:00:00")
