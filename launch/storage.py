"""Remote storage for the driver: datasets, checkpoints and MLflow artifacts may live at any fsspec
URL (`s3://`, `gs://`, ...) once the filesystem package is installed (`pip install 'lesa[s3]'`,
`'lesa[gcs]'`).

Credentials and endpoints come from the environment, as each store's own client reads it, never
from the YAML: s3fs (datasets, `model.pt`) and pyarrow (Ray Train's checkpoint storage) both
honour AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL and the rest of the AWS chain;
MLflow's S3 artifact store reads MLFLOW_S3_ENDPOINT_URL, which `trainer/tracking.py` defaults from
AWS_ENDPOINT_URL. Ray Train workers on other machines do not inherit the driver's environment, so
the driver hands them the variables named here (`storage_env`), values straight from its own
environment; nothing here prints or logs a value.
"""

from __future__ import annotations

import os
import shutil

import fsspec

from trainer.config import ConfigError

# Variables passed from the driver's environment to the Ray Train workers, when set.
STORAGE_ENV_PREFIXES = ("AWS_", "MLFLOW_S3_")
STORAGE_ENV_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS",)
# What a store's client raises when it cannot be used at all, by class name (its package may not
# be installed), and the fix.
STORE_PROBLEMS = {
    "NoCredentialsError": "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(or AWS_PROFILE), plus AWS_ENDPOINT_URL for a store other than AWS (docs/storage.md)",
    "EndpointConnectionError": "the S3 endpoint does not answer; check AWS_ENDPOINT_URL and the network",
    "DefaultCredentialsError": "no Google Cloud credentials found; set GOOGLE_APPLICATION_CREDENTIALS "
    "or run `gcloud auth application-default login` (docs/storage.md)",
}


def is_url(path: str) -> bool:
    return "://" in path


def check_storage(url: str, key: str) -> None:
    """That `url` (the value of config key or flag `key`) can be used from here, before any cluster
    work: its filesystem package installed, hdfs's Java runtime and Hadoop there, the store's
    credentials found. Otherwise one ConfigError naming the key, the URL and the fix, instead of a
    driver traceback (botocore's NoCredentialsError) or a JVM's dlopen lines. Local paths pass."""
    if not is_url(url):
        return
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:  # "Install gcsfs to access ...", "Protocol not known: foo"
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        fix = f"pip install 'lesa[{extra}]'" if extra else "install the fsspec package for it, or use a local path"
        raise ConfigError(f"{key}: {url}: {protocol}:// is not available here ({exc}); {fix}") from None
    if protocol in ("hdfs", "viewfs"):
        missing = hdfs_missing()
        if missing:  # pyarrow's libhdfs would print a line per JVM it looked for, then fail
            raise ConfigError(
                f"{key}: {url}: hdfs:// reads through pyarrow's libhdfs, which needs a Java runtime and "
                f"Hadoop: set {' and '.join(missing)} (or ARROW_LIBHDFS_DIR and CLASSPATH=$(hadoop classpath "
                f"--glob) for HADOOP_HOME), or copy the data to S3/GCS"
            )
        return  # an hdfs connection starts a JVM: leave it to the first read
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - each store's client has its own exception types
        problem = STORE_PROBLEMS.get(type(exc).__name__)
        if problem is None:
            raise
        raise ConfigError(f"{key}: {url}: {problem}") from None


def hdfs_missing() -> list[str]:
    """What pyarrow's HadoopFileSystem lacks here: JAVA_HOME, and HADOOP_HOME unless libhdfs
    (ARROW_LIBHDFS_DIR) and the Hadoop jars (CLASSPATH, or the `hadoop` command that lists them) are
    found without it."""
    env = os.environ.get
    missing = [] if env("JAVA_HOME") else ["JAVA_HOME"]
    if not env("HADOOP_HOME") and not (env("ARROW_LIBHDFS_DIR") and (env("CLASSPATH") or shutil.which("hadoop"))):
        missing.append("HADOOP_HOME")
    return missing


def storage_env() -> dict[str, str]:
    """The storage variables set in this process, for the workers' runtime env (not for printing)."""
    return {
        name: value
        for name, value in os.environ.items()
        if name.startswith(STORAGE_ENV_PREFIXES) or name in STORAGE_ENV_NAMES
    }


def ray_storage(url: str) -> tuple[str, object | None]:
    """(path, filesystem) for Ray Train (RunConfig's storage_path/storage_filesystem, Checkpoint's
    path/filesystem). Ray resolves local paths and the URLs pyarrow knows (s3, gs, abfs, hdfs,
    file) itself, so those come back unchanged with no filesystem; any other fsspec URL is served
    through pyarrow's fsspec handler, with the path stripped of its protocol as Ray then expects."""
    if not is_url(url):
        return url, None
    import pyarrow
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(url)
        return url, None
    except pyarrow.ArrowInvalid:  # "Unrecognized filesystem type in URI"
        pass
    fs, path = fsspec.core.url_to_fs(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def checkpoint_url(storage: str, path: str) -> str:
    """A Ray Train checkpoint's location as a URL to pass back to `--resume` or `lesa evaluate`:
    Ray reports paths on remote storage without their scheme (`bucket/ckpt/...`)."""
    if not is_url(storage) or is_url(path):
        return path
    return f"{storage.split('://', 1)[0]}://{path}"


def read_text(url: str) -> str | None:
    """A small file's text at a path or URL, or None if it does not exist."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path).decode("utf-8") if fs.isfile(path) else None


def model_file(checkpoint: str) -> str | None:
    """`lesa evaluate --checkpoint`: a `model.pt` itself or a folder holding one, at a path or URL;
    the file's path or URL, or None if there is none."""
    fs, path = fsspec.core.url_to_fs(checkpoint)
    if fs.isdir(path):
        checkpoint, path = f"{checkpoint.rstrip('/')}/model.pt", f"{path.rstrip('/')}/model.pt"
    return checkpoint if fs.isfile(path) else None


def has_checkpoint(storage: str, run_name: str, state_file: str) -> bool:
    """Whether Ray Train's run folder `storage/run_name` (a path or URL) holds a checkpoint this
    system wrote: a `checkpoint_*` folder with `state_file` in it."""
    fs, path = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{run_name}")
    return bool(fs.glob(f"{path.rstrip('/')}/checkpoint_*/{state_file}"))


def newest_checkpoint_text(storage: str, run_name: str, file: str) -> str | None:
    """`file`'s text in the newest `checkpoint_*` folder of Ray Train's `storage/run_name` (their
    names are timestamps), or None without one."""
    fs, path = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{run_name}")
    found = sorted(fs.glob(f"{path.rstrip('/')}/checkpoint_*/{file}"))
    return fs.cat_file(found[-1]).decode("utf-8") if found else None
