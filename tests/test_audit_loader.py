"""Loader processes never outlive the process that made them (docs/reliability.md, Data path).

An audit found a loader process spinning after its run had gone: PyTorch's own parent check runs
between batches, not while the dataset's iterator is stuck in a read. Here the loader process is
stuck for real: its shard is a FIFO nobody writes, so the open blocks in the kernel (as a stalled
storage read would). The process that made the loader is then SIGKILLed; every process it had
started (fork server, loader process) must be gone within a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

MAKER = """
import json, sys, time
import psutil
from datasets.contract import Shard
from datasets.stream import StreamSpec, make_loader

if __name__ == "__main__":
    spec = StreamSpec([Shard(sys.argv[1], 10)], num_labels=2, image_size=8, batch_size=2, train=False)
    batches = iter(make_loader(spec, loader_workers=1))  # starts the loader process; it blocks opening the FIFO
    deadline = time.time() + 60
    while time.time() < deadline:
        loaders = [p for p in psutil.Process().children(recursive=True) if p.name() == "pt_data_worker"]
        if loaders:
            break
        time.sleep(0.1)
    time.sleep(1.0)  # the loader process is inside the dataset's iterator, blocked in open()
    descendants = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"loaders": [p.pid for p in loaders], "descendants": descendants}), flush=True)
    time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_loader_process_blocked_in_a_read_exits_when_its_maker_is_killed(tmp_path):
    fifo = tmp_path / "stalled.tar"
    os.mkfifo(fifo)
    script = tmp_path / "maker.py"
    script.write_text(MAKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    line = ""
    maker = subprocess.Popen(
        [sys.executable, str(script), str(fifo)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    try:
        line = maker.stdout.readline()
        assert line, "the maker printed nothing (did the loader process start?)"
        started = json.loads(line)
        assert started["loaders"] and set(started["loaders"]) <= set(started["descendants"])
        assert not any(gone(pid) for pid in started["loaders"])  # stuck, not finished
        maker.send_signal(signal.SIGKILL)
        maker.wait(timeout=10)
        deadline = time.time() + 5
        while time.time() < deadline and not all(gone(pid) for pid in started["descendants"]):
            time.sleep(0.1)
        left = [pid for pid in started["descendants"] if not gone(pid)]
        assert not left, f"processes of the killed maker still running after 5 s: {left}"
    finally:
        for pid in [maker.pid, *json.loads(line or "{}").get("descendants", [])]:
            try:
                os.kill(pid, signal.SIGKILL)  # only ours: the maker and what it started
            except ProcessLookupError:
                pass
