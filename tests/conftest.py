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
