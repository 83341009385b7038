"""Everything in this folder starts a real local Ray cluster or runs the `lesa` CLI as a subprocess:
`make test-unit` leaves it out, `make test` runs it."""

import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from run_cli import lesa_env

HERE = Path(__file__).resolve().parent

# The session's Ray head: a driver that starts a local cluster (the way `lesa train` does without
# RAY_ADDRESS), prints its address and holds it until its stdin closes; the cluster dies with it.
HEAD = """import sys, ray
ray.init(num_cpus=int(sys.argv[1]), _temp_dir=sys.argv[2], include_dashboard=True, dashboard_host="127.0.0.1",
         logging_level="WARNING")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def shared_ray():
    """The environment (RAY_ADDRESS and a token of its own) of one real local Ray cluster for the
    whole session, for runs whose subject is not a fresh cluster: lesa_env(**shared_ray), and
    launch/driver.py's start_ray connects instead of starting one. Its processes have this
    environment, PYTHONPATH the checkout, as a run's own cluster has; 8 logical CPUs, since
    start_ray gives a local cluster at least the CPUs its workers ask for."""
    temp = tempfile.mkdtemp(prefix="lesa-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD, "8", temp],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=lesa_env(**auth),
    )
    try:
        address = head.stdout.readline().strip()
        assert address, f"the session's Ray head exited with {head.wait(timeout=60)}"
        yield {"RAY_ADDRESS": address, **auth}
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)
