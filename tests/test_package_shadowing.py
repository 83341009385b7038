"""Our top-level `datasets` package shadows Hugging Face `datasets` in the same process (docs/development.md).
This keeps true that the stack we import alongside it does not need the Hugging Face one."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stack_imports_with_our_datasets_package_first():
    code = (
        "import datasets, ray, ray.train, ray.train.torch, deepspeed, mlflow, webdataset\n"
        "from pathlib import Path\n"
        f"assert Path(datasets.__file__).resolve().parent == Path({str(REPO / 'datasets')!r})\n"
        "import mlflow.tracking; mlflow.tracking.MlflowClient\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
