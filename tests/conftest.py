import os
import sys
from pathlib import Path

import pytest

# Tests import the project from the checkout and keep Ray and MLflow quiet and local.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """`synthetic(seed, image_size, shard_size, train=.., test=..)`: the dataset `lesa synth` writes
    (datasets/makers/synthetic.py), made once a session and shared by every test asking for the same one,
    so tests must not write into it (a test that adds shards makes its own)."""
    from datasets.makers.synthetic import write_synthetic

    made = {}

    def make(seed: int, image_size: int, shard_size: int, **sizes: int) -> Path:
        key = (seed, image_size, shard_size, tuple(sorted(sizes.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"synthetic-seed{seed}") / "data"
            write_synthetic(
                str(root), seed=seed, sizes=sizes, image_size=image_size, shard_size=shard_size, log=lambda *_: None
            )
            made[key] = root
        return made[key]

    return make


# With `make test`'s several pytest processes (pytest-xdist, whole files per process) the suite
# ends when its longest file does, so the Ray files start first, the longest of them (as last
# measured) at the head, and the many short unit files fill the gaps at the end. Order only:
# every test still runs, and a file missing from the list just starts after the listed ones.
LONGEST_FIRST = (
    "integration/test_audit_checkpoint.py",
    "integration/test_resume.py",
    "integration/test_zero_e2e.py",
    "integration/test_clip_e2e.py",
    "integration/test_remote_storage.py",
    "integration/test_audit_launch_runs.py",
    "integration/test_submit.py",
    "integration/test_e2e.py",
    "integration/test_compare_e2e.py",
    "integration/test_feature_cache.py",
    "integration/test_schedule_e2e.py",
    "integration/test_resume_faults.py",
    "integration/test_train_real_formats.py",
)


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).resolve().parent

    def rank(item) -> tuple[int, int]:
        path = Path(item.fspath).resolve().relative_to(tests).as_posix()
        if path in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(path)
        return (1 if path.startswith("integration/") else 2), 0

    items.sort(key=rank)  # stable: a file's tests keep their order


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` that hands out files in the order above, one at a time. xdist's own
    reorders files by their number of tests and gives a process its next file while more than two
    of its tests are pending; our Ray files hold 1-6 tests of minutes each, so one process would
    queue several long files while another idles."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneFileAhead(LoadFileScheduling):
        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            # A process holds back its last test until it has a next one (pytest's teardown needs
            # it), so a file is handed out when one test is left, not before.
            if self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return OneFileAhead(config, log)
