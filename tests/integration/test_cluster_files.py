"""cluster/: the Ray cluster launcher config, the KubeRay manifests, the runtime image, the MLflow
server recipe and the local two-node recipe.

The file checks are offline and take seconds: every YAML parses, the launcher config has what
`ray up` needs and passes Ray's own schema, the KubeRay manifests ask for GPUs and keep token
auth on, every file names the same image, the Dockerfile copies files that exist and keeps the
base image's torch, the scripts parse. The integration test starts cluster/local-multinode.sh's
two Ray nodes on this machine and checks that both are alive and used, that a `ray job submit`
driver reaches them, that the dashboard binds to loopback and refuses callers without the token,
and that `stop` leaves no process behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE = "lesa:latest"  # what cluster/Dockerfile builds and cluster/README.md documents
SECRET = "lesa-ray-auth"  # the Kubernetes Secret holding the Ray token (referenced, never inlined)
LAUNCHER = "ray-cluster-gpu.yaml"


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def constraint_pin(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(rf"\s*{re.escape(package)}\s*==\s*(\S+)\s*", line)
        if m:
            return m.group(1)
    raise AssertionError(f"constraints.txt pins no {package}")


def ray_cluster_specs():
    """(where, RayCluster spec) for the RayCluster and the RayJob's own cluster."""
    return [
        ("kuberay-raycluster.yaml", load("kuberay-raycluster.yaml")["spec"]),
        ("kuberay-rayjob.yaml", load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]),
    ]


def ray_containers():
    """(where, container) for every Ray container (head and workers) of both manifests."""
    out = []
    for where, spec in ray_cluster_specs():
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            out.append((f"{where} head", c))
        for group in spec["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                out.append((f"{where} {group['groupName']}", c))
    return out


def env_of(entries) -> dict:
    return {e["name"]: e for e in entries or []}


# ---------------------------------------------------------------------------------------------
# every file


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses_to_one_mapping(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path.name}: expected one YAML mapping"


def test_the_files_the_readme_promises_exist():
    for name in (
        "ray-cluster-gpu.yaml",
        "kuberay-raycluster.yaml",
        "kuberay-rayjob.yaml",
        "kuberay-storage.yaml",
        "Dockerfile",
        "mlflow-server.sh",
        "local-multinode.sh",
    ):
        assert (CLUSTER / name).is_file(), name
        assert name in (CLUSTER / "README.md").read_text(), f"cluster/README.md does not describe {name}"


@pytest.mark.parametrize("name", ["local-multinode.sh", "mlflow-server.sh"])
def test_shell_scripts_parse_and_are_strict(name):
    path = CLUSTER / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK), f"{name} is not executable"
    assert "set -euo pipefail" in path.read_text()


def test_no_secret_values_in_cluster_files():
    patterns = {
        "AWS access key id": r"AKIA[0-9A-Z]{16}",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        "Ray token (64 hex digits)": r"\b[0-9a-f]{64}\b",
        "inline password": r"(?i)(password|secret_access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}",
    }
    for path in sorted(CLUSTER.iterdir()):
        text = path.read_text()
        for what, pattern in patterns.items():
            assert not re.search(pattern, text), f"{path.name} holds what looks like a {what}"


def test_every_file_names_the_same_image():
    images = {"ray-cluster-gpu.yaml docker.image": load(LAUNCHER)["docker"]["image"]}
    for where, c in ray_containers():
        images[where] = c["image"]
    for c in load("kuberay-rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        images["kuberay-rayjob.yaml submitter"] = c["image"]
    assert set(images.values()) == {IMAGE}, images
    # ... and that is the tag the build commands in the Dockerfile and the README produce.
    for doc in ("Dockerfile", "README.md"):
        tags = re.findall(r"docker build [^\n]*-t (\S+)", (CLUSTER / doc).read_text())
        assert tags and set(tags) == {IMAGE}, f"cluster/{doc} builds {tags}, the YAMLs run {IMAGE}"


def test_lesa_train_commands_name_configs_under_launch():
    """Every `lesa train CONFIG` in cluster/ names a launch/*.yaml that exists and validates."""
    from launch.cli import build_parser
    from trainer.config import load_config

    commands = []
    for path in sorted(CLUSTER.iterdir()):
        for m in re.finditer(r"lesa train (\S+\.ya?ml)\b", path.read_text()):
            commands.append((path.name, m.group(1)))
    assert commands
    for where, config in commands:
        assert re.fullmatch(r"launch/[A-Za-z0-9_.-]+\.yaml", config), f"{where}: lesa train {config}"
        assert (REPO / config).is_file(), f"{where}: {config} does not exist"
        load_config(REPO / config)
    assert (REPO / "launch" / "synthetic.yaml").is_file()
    # The RayJob's entrypoint is a valid `lesa train` command line.
    entrypoint = load("kuberay-rayjob.yaml")["spec"]["entrypoint"]
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["lesa", "train"]
    args = build_parser().parse_args(argv[1:])
    assert args.config == "launch/openimages.yaml" and args.out == "/mnt/runs/openimages"


# ---------------------------------------------------------------------------------------------
# the cluster launcher (ray up)


def test_launcher_has_what_ray_up_requires():
    c = load(LAUNCHER)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers", "docker", "auth"):
        assert key in c, f"{LAUNCHER}: no {key}"
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    for name, t in types.items():
        assert "resources" in t and t["node_config"]["InstanceType"], name
    head = types[c["head_node_type"]]
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head should be a CPU instance"
    workers = {n: t for n, t in types.items() if n != c["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if re.match(r"(g[4-6]|p[3-6])", t["node_config"]["InstanceType"])}
    assert gpu, f"no GPU worker type in {sorted(workers)}"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= c["max_workers"], name
    assert c["docker"]["image"] == IMAGE


def test_launcher_keeps_token_auth_loopback_dashboard_and_no_usage_stats():
    c = load(LAUNCHER)
    head = " ".join(c["head_start_ray_commands"])
    workers = " ".join(c["worker_start_ray_commands"])
    for cmd in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmd and "--disable-usage-stats" in cmd
        assert "RAY_USAGE_STATS_ENABLED=0" in cmd and "MLFLOW_DISABLE_TELEMETRY=true" in cmd
        assert "RAY_AUTH_MODE=disabled" not in cmd
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    # Every node gets the token from the user's ~/.ray/auth_token, and checks it arrived.
    assert c["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("~/.ray/auth_token" in cmd for cmd in c["setup_commands"])


def test_launcher_passes_rays_schema_and_config_checks():
    """The JSON schema shipped with the installed ray, then the checks `ray up` runs on the
    config before it touches the cloud (fill in defaults, validate)."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip(f"this ray ships no {schema_path.name}")
    config = load(LAUNCHER)
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private API: gone in another ray version
        return
    validate_config(prepare_config(config))


# ---------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_manifests_are_a_raycluster_and_a_rayjob_of_our_ray_version():
    rc, rj = load("kuberay-raycluster.yaml"), load("kuberay-rayjob.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == constraint_pin("ray"), where


def test_kuberay_gpu_worker_groups_request_gpus():
    for where, spec in ray_cluster_specs():
        gpu_groups = 0
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            for c in group["template"]["spec"]["containers"]:
                limits = c["resources"]["limits"]
                if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                    gpu_groups += 1
                    requests = c["resources"].get("requests", {})
                    # Kubernetes requires request == limit for extended resources.
                    assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == int(
                        limits["nvidia.com/gpu"]
                    )
        assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), f"{where}: GPU on the head"


def test_kuberay_token_auth_on_with_the_token_from_a_secret():
    targets = list(ray_containers())
    rj = load("kuberay-rayjob.yaml")
    targets += [("kuberay-rayjob.yaml submitter", c) for c in rj["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    targets.append(("kuberay-raycluster.yaml autoscaler", load("kuberay-raycluster.yaml")["spec"]["autoscalerOptions"]))
    for where, c in targets:
        env = env_of(c.get("env"))
        assert env["RAY_AUTH_MODE"].get("value") == "token", where
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{where}: the token must come from the Secret, not inline"
        assert token["valueFrom"]["secretKeyRef"]["name"] == SECRET, where
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0", where
        for name, e in env.items():
            if re.search(r"TOKEN|PASSWORD|SECRET|_KEY", name):
                assert "value" not in e, f"{where}: {name} has an inline value"
    for where, c in ray_containers():
        assert env_of(c["env"])["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true", where
        assert c.get("workingDir") == "/app", f"{where}: entrypoints resolve launch/... from /app"


def test_kuberay_runs_dir_is_the_shared_claim():
    pvc = load("kuberay-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    out = shlex.split(load("kuberay-rayjob.yaml")["spec"]["entrypoint"])
    out_dir = out[out.index("--out") + 1]
    for where, spec in ray_cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert claims.get(mounts.get("/mnt/runs")) == pvc["metadata"]["name"], where
    assert out_dir.startswith("/mnt/runs/")


# ---------------------------------------------------------------------------------------------
# the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (CLUSTER / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        lines.append(current.strip())
        current = ""
    return [tuple(line.split(None, 1)) for line in lines]


def test_dockerfile_base_is_a_cuda_pytorch_runtime_image():
    instructions = dockerfile_instructions()
    base = next(args for op, args in instructions if op == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    assert ("FROM", "${BASE_IMAGE}") in instructions


def test_dockerfile_copies_files_that_exist():
    copies = [args for op, args in dockerfile_instructions() if op in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"


def test_dockerfile_installs_under_constraints_without_replacing_torch():
    runs = " ".join(args for op, args in dockerfile_instructions() if op == "RUN")
    install = re.search(r"pip install -c (\S+) -e \.", runs)
    assert install, "the project is installed with pip install -c CONSTRAINTS -e ."
    constraints_file = install.group(1)
    assert constraints_file != "constraints.txt", "constraints.txt pins the CPU torch"
    assert not re.search(r"pip install[^&]*\btorch\b", runs), "the image must keep the base image's torch"
    # The file is constraints.txt filtered by this grep, plus the image's own torch version.
    grep = re.search(rf"grep -vE '([^']+)' constraints.txt > {re.escape(constraints_file)}", runs)
    assert grep, f"{constraints_file} is not made from constraints.txt by grep -vE"
    filtered = subprocess.run(
        ["grep", "-vE", grep.group(1), str(REPO / "constraints.txt")], capture_output=True, text=True, check=True
    ).stdout
    assert not re.search(r"(?m)^\s*torch\s*(==|$)", filtered), "torch survived the filter"
    for pin in ("deepspeed", "ray", "mlflow", "webdataset", "numpy"):
        assert f"{pin}=={constraint_pin(pin)}" in filtered, f"{pin} was filtered out"
    assert re.search(rf"print\('torch==' \+ torch.__version__\)\"\s*>> {re.escape(constraints_file)}", runs), (
        "the image's torch version is not pinned in the constraints"
    )


def test_dockerfile_sets_the_privacy_and_auth_defaults():
    env = " ".join(args for op, args in dockerfile_instructions() if op == "ENV")
    for setting in ("RAY_USAGE_STATS_ENABLED=0", "MLFLOW_DISABLE_TELEMETRY=true", "RAY_AUTH_MODE=token"):
        assert setting in env, setting
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# ---------------------------------------------------------------------------------------------
# the MLflow server recipe


def test_mlflow_server_defaults_to_loopback_sqlite_and_a_local_artifact_dir(tmp_path):
    """Runs the script with `echo` standing in for mlflow: the command it would exec."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(LESA_MLFLOW_BIN="echo", MLFLOW_DATA_DIR=str(tmp_path))
    out = subprocess.run(
        [str(CLUSTER / "mlflow-server.sh")], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "server"
    args = dict(zip(out[1::2], out[2::2]))
    assert args == {
        "--backend-store-uri": f"sqlite:///{tmp_path}/mlflow.db",
        "--artifacts-destination": f"{tmp_path}/artifacts",
        "--host": "127.0.0.1",
        "--port": "5000",
        "--workers": "1",
    }
    env.update(
        MLFLOW_BACKEND_STORE_URI="postgresql://mlflow@db:5432/mlflow",
        MLFLOW_ARTIFACTS_DESTINATION="s3://bucket/mlflow",
        MLFLOW_PORT="5055",
    )
    out = subprocess.run(
        [str(CLUSTER / "mlflow-server.sh"), "--allowed-hosts", "mlflow.example.com"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    args = dict(zip(out[1::2], out[2::2]))
    assert args["--backend-store-uri"] == "postgresql://mlflow@db:5432/mlflow"
    assert args["--artifacts-destination"] == "s3://bucket/mlflow"
    assert args["--port"] == "5055" and args["--allowed-hosts"] == "mlflow.example.com"
    assert not (tmp_path / "s3:").exists(), "an object store URI was taken for a local folder"


# ---------------------------------------------------------------------------------------------
# the local two-node recipe (a real Ray cluster)


def client_env(cluster_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(cluster_env)
    return env


def read_env_file(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"export (\w+)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def live_session_processes(sessions: list[str]) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,comm="], capture_output=True, text=True, check=True)
    return [
        line
        for line in ps.stdout.splitlines()
        if len(line.split()) >= 3 and line.split()[1] in sessions and not line.split()[2].startswith("Z")
    ]


@pytest.fixture
def two_node_cluster(tmp_path):
    """cluster/local-multinode.sh start in a short temp dir (Unix socket paths stay under 107
    bytes), with a token of its own; stop in teardown, checking no process is left."""
    state = Path(tempfile.mkdtemp(prefix="lesa-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "auth_token")
    script = str(CLUSTER / "local-multinode.sh")
    try:
        start = subprocess.run([script, "start", str(state)], env=env, capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, f"start failed:\n{start.stdout}\n{start.stderr}"
        cluster_env = read_env_file(state / "cluster.env")
        yield {"state": state, "env": cluster_env, "stdout": start.stdout, "script": script, "script_env": env}
    finally:
        sessions = []
        if (state / "sessions").exists():
            sessions = [line.split("=", 1)[1] for line in (state / "sessions").read_text().split()]
        if (state / "cluster.env").exists():
            stop = subprocess.run([script, "stop", str(state)], env=env, capture_output=True, text=True, timeout=60)
            assert stop.returncode == 0, f"stop failed:\n{stop.stdout}\n{stop.stderr}"
        for _ in range(50):
            if not live_session_processes(sessions):
                break
            time.sleep(0.1)
        left = live_session_processes(sessions)
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"processes left after stop: {left}"


CLIENT = r"""
import json, os, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address=os.environ["RAY_GCS_ADDRESS"], logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
# One task on each node: a strict spread of two 1-CPU bundles over two 1-CPU nodes.
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=60)
@ray.remote(num_cpus=1)
def node_id():
    return ray.get_runtime_context().get_node_id()
ids = ray.get([node_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
               for i in range(2)], timeout=60)
print(json.dumps({"alive": len(alive), "task_nodes": len(set(ids)),
                  "ips": sorted({n["NodeManagerAddress"] for n in alive})}))
"""


@pytest.mark.integration
def test_local_multinode_cluster_runs_two_nodes_with_token_auth(two_node_cluster):
    t0 = time.monotonic()
    env = two_node_cluster["env"]
    assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).is_file()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", env["RAY_ADDRESS"])
    assert f"export RAY_ADDRESS={env['RAY_ADDRESS']}" in two_node_cluster["stdout"]

    # Two alive nodes, and work lands on both.
    client = subprocess.run(
        [sys.executable, "-c", CLIENT], env=client_env(env), capture_output=True, text=True, timeout=90
    )
    assert client.returncode == 0, client.stderr[-3000:]
    seen = json.loads(client.stdout.strip().splitlines()[-1])
    assert seen["alive"] == 2 and seen["task_nodes"] == 2, seen

    # `status` shows both nodes as active; it reads the autoscaler's view, which lags the GCS by
    # a few seconds, so it is asked again until it catches up.
    deadline = time.monotonic() + 45
    while True:
        status = subprocess.run(
            [two_node_cluster["script"], "status", str(two_node_cluster["state"])],
            env=two_node_cluster["script_env"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        active = status.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        if len(re.findall(r"node_[0-9a-f]+", active)) == 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(re.findall(r"node_[0-9a-f]+", active)) == 2, status.stdout

    # A job driver reaches the cluster the way `lesa train` does under `ray job submit`:
    # ray.init() with the RAY_ADDRESS that Ray sets for the job, and the token from the nodes' env.
    job = subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "job",
            "submit",
            "--",
            sys.executable,
            "-c",
            "import ray; ray.init(); print('JOB-NODES', sum(n['Alive'] for n in ray.nodes()))",
        ],
        env=client_env(env),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "JOB-NODES 2" in job.stdout

    # The jobs API refuses callers without the token, and answers the token's holder.
    jobs_url = env["RAY_ADDRESS"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(jobs_url, timeout=10)
    assert refused.value.code == 401
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(jobs_url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as ok:
        assert ok.status == 200

    # The dashboard listens on loopback only: the node's own network address refuses it.
    port = int(env["RAY_ADDRESS"].rsplit(":", 1)[1])
    for ip in seen["ips"]:
        if ip.startswith("127."):
            continue
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=3).close()
    assert time.monotonic() - t0 < 120


def token_command(path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(path)
    return subprocess.run(
        ["bash", str(CLUSTER / "local-multinode.sh"), "token"], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_generated_token_is_private_from_its_first_byte(tmp_path):
    path = tmp_path / "new" / "ray" / "auth_token"
    done = token_command(path)
    assert done.returncode == 0, done.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == oct(path.parent.parent.stat().st_mode & 0o777) == "0o700"
    assert len(path.read_text()) == 64  # 256 random bits, hex


def test_an_existing_token_readable_by_others_is_made_private_and_kept(tmp_path):
    path = tmp_path / "auth_token"
    path.write_text("a" * 64)
    path.chmod(0o644)  # what `ray get-auth-token --generate` leaves under the usual umask
    done = token_command(path)
    assert done.returncode == 0, done.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600" and path.read_text() == "a" * 64
    assert "was mode 644" in done.stderr and done.stderr.count("\n") == 1
