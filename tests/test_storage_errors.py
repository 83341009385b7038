"""Storage and cluster mistakes end in one line naming the URL and the fix, exit 2, before any
cluster work (launch/storage.py `check_storage`, launch/submit.py): an s3:// URL without
credentials, a filesystem that is not installed or cannot run here (hdfs:// without Java and
Hadoop), `lesa submit` to an address where no Ray dashboard answers, and a relative path that a
job would resolve inside its temporary copy of the working directory.

The real CLI in this process and the real clients (s3fs and botocore, Ray's job client); no server
is needed: botocore looks for credentials before it sends anything.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from launch.cli import main
from launch.storage import check_storage
from trainer.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = str(REPO / "launch" / "synthetic.yaml")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """An environment where the AWS chain finds nothing: no variables, empty files, no EC2 metadata."""
    (tmp_path / "empty").write_text("")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def refused(capsys, *argv: str) -> str:
    """The one line `lesa ARGV` prints before exiting 2."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_s3_without_credentials_is_one_line(no_credentials, tmp_path, capsys):
    url = "s3://lesa-test-bucket/data"
    err = refused(capsys, "train", SYNTHETIC, "--out", str(tmp_path / "out"), "--set", f"data.url={url}")
    assert err.startswith(f"lesa train: error: data.url: {url}: no S3 credentials found; set AWS_ACCESS_KEY_ID")
    assert not (tmp_path / "out").exists()


def test_hdfs_without_java_and_hadoop_is_one_line(monkeypatch, tmp_path, capsys):
    for name in ("JAVA_HOME", "HADOOP_HOME", "ARROW_LIBHDFS_DIR"):
        monkeypatch.delenv(name, raising=False)
    url = "hdfs://namenode:8020/lesa/data"
    err = refused(capsys, "train", SYNTHETIC, "--out", str(tmp_path / "out"), "--set", f"data.url={url}")
    assert err.startswith(f"lesa train: error: data.url: {url}: hdfs:// reads through pyarrow's libhdfs")
    assert "set JAVA_HOME and HADOOP_HOME" in err and "dlopen" not in err


def test_a_filesystem_that_is_not_installed_names_the_package(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint.storage: foo://x/y: foo:// is not available here \(Protocol"):
        check_storage("foo://x/y", "checkpoint.storage")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ConfigError, match=r"gs:// is not available here .*; pip install 'lesa\[gcs\]'"):
            check_storage("gs://bucket/data", "data.url")
    check_storage(str(tmp_path), "data.url")  # a local path is not a store's


@pytest.mark.parametrize(
    "setting, key",
    [
        ("data.url=demo_out/data", "data.url"),
        ("checkpoint.storage=ckpt", "checkpoint.storage"),
        ("model.backbone_weights=weights/vgg19.pt", "model.backbone_weights"),
    ],
)
def test_submit_refuses_relative_paths_before_uploading(capsys, setting, key):
    value = setting.split("=", 1)[1]
    err = refused(capsys, "submit", SYNTHETIC, "--out", "/runs/x", "--set", "data.url=/data", "--set", setting)
    assert err.startswith(f"lesa submit: error: {key}: {value} is a relative path")
    assert err.rstrip().endswith("use an absolute path or a URL every node can read")


def test_submit_refuses_a_relative_out(capsys):
    err = refused(capsys, "submit", SYNTHETIC, "--out", "runs/x", "--set", "data.url=/data")
    assert err.startswith("lesa submit: error: submit.out (--out): runs/x is a relative path")


def test_submit_to_an_address_where_no_dashboard_answers(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what submit sets; restored after the test
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["submit", SYNTHETIC, "--out", "/runs/x", "--address", address, "--set", "data.url=/data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lesa submit: error: --address {address}: no Ray dashboard answers")
