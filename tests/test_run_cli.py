"""The integration tests' runner (tests/run_cli.py): a command that hangs fails with the stack of
every Python process under it, the way a hung distributed run would be reported."""

from __future__ import annotations

import sys

import pytest
from run_cli import run_cli

# The child renames itself, as a DataLoader process does (pt_data_worker).
CHILD = """import ctypes, time
ctypes.CDLL(None).prctl(15, b"pt_data_worker", 0, 0, 0)
def waiting_child(): time.sleep(60)
waiting_child()"""
HANGS = f"""import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {CHILD!r}])
def waiting_parent(): time.sleep(60)
waiting_parent()"""


def test_a_hung_command_fails_with_every_process_stack():
    with pytest.raises(AssertionError) as failure:
        run_cli([sys.executable, "-c", HANGS], timeout=3)
    report = str(failure.value)
    assert "still running after 3 s" in report
    # frames as py-spy prints them (the command lines in the report name these functions too)
    assert "waiting_parent (<string>:" in report and "waiting_child (<string>:" in report


def test_a_finished_command_returns_its_output():
    proc = run_cli(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], timeout=60
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
