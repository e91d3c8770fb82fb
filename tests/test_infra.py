"""infra/ checked statically (no Docker engine or kubectl here): every YAML parses, the `ray up`
config passes Ray's own validation, the KubeRay, MLflow and Docker files hold what the platform
relies on (token auth, a GPU worker group, PostgreSQL + S3, constraints, a non-root user)."""

from __future__ import annotations

import base64
import copy
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(path: Path, name: str) -> dict:
    (found,) = [d for d in documents(path) if d.get("kind") == name]
    return found


def test_the_expected_files_exist():
    for relative in ("docker/Dockerfile", "docker/.dockerignore", "ray/cluster.yaml",
                     "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                     "mlflow/docker-compose.yml", "mlflow/.env.example", "README.md"):
        assert (INFRA / relative).is_file(), relative
    assert list((INFRA / "mlflow" / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses_into_mappings(path):
    docs = documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# -- ray up ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())


def test_the_cluster_config_passes_rays_own_validation(cluster):
    """What `ray up` does before launching: fill the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError when invalid
    assert prepared["available_node_types"]["gpu"]["max_workers"] == cluster["max_workers"]


def test_rays_validation_does_reject_a_broken_copy(cluster):
    """The check above can fail: an unknown key and a min_workers sum over max_workers."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster) | {"not_a_ray_key": 1}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu"]["min_workers"] = cluster["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(broken))


def test_the_cluster_has_a_gpu_worker_type_and_token_auth(cluster):
    gpu = cluster["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] > gpu["min_workers"]
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["GPU"] == 0
    options = " ".join(cluster["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "RAY_AUTH_TOKEN_PATH=" in options
    # The launcher runs `docker run IMAGE bash`: the image's dynroute entrypoint must be reset.
    assert '--entrypoint=""' in cluster["docker"]["run_options"]
    token_dir = next(iter(cluster["file_mounts"]))
    assert options.split("RAY_AUTH_TOKEN_PATH=")[1].split()[0].endswith(
        token_dir.removeprefix("~/") + "/auth_token")


def test_the_start_commands_load_the_endpoint_env_before_ray_start(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert start.index("cluster.env") < start.index("ray start"), key
    assert "--head" in cluster["head_start_ray_commands"][-1]
    assert "$RAY_HEAD_IP" in cluster["worker_start_ray_commands"][-1]


# -- KubeRay -----------------------------------------------------------------------------------


def _cluster_specs() -> dict[str, dict]:
    raycluster = kind(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")
    rayjob = kind(INFRA / "kuberay" / "rayjob.yaml", "RayJob")
    return {"RayCluster": raycluster["spec"], "RayJob": rayjob["spec"]["rayClusterSpec"]}


def test_kuberay_manifests_use_the_v1_api():
    for name, kind_name in (("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")):
        doc = kind(INFRA / "kuberay" / name, kind_name)
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["metadata"]["name"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_kuberay_cluster_specs_have_token_auth_and_a_gpu_worker_group(owner):
    spec = _cluster_specs()[owner]
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(c["resources"]["limits"].get("nvidia.com/gpu") == 1
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and all(g["maxReplicas"] >= g["minReplicas"] for g in gpu_groups)
    pods = [spec["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            refs = {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
            assert {"dynroute-aws", "dynroute-mlflow"} <= refs
            assert not container.get("env"), "secrets come from Secrets, never inline values"


def test_the_rayjob_runs_dynroute_tune_and_cleans_up():
    spec = kind(INFRA / "kuberay" / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["dynroute", "tune"]
    assert argv[argv.index("--params") + 1] == "/app/params.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert "/app/params.yaml" in mounts  # the params the entrypoint reads


def test_the_rayjob_and_raycluster_run_the_same_image():
    images = {c["image"] for spec in _cluster_specs().values()
              for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in pod["template"]["spec"]["containers"]}
    assert len(images) == 1


def test_kubernetes_secret_examples_hold_only_placeholders():
    for path in [*INFRA.rglob("*secret*.yaml")]:
        for doc in documents(path):
            if doc.get("kind") == "Secret":
                for key, value in doc["stringData"].items():
                    if _SECRET_KEY.search(key):
                        assert "change-me" in value, f"{path}: {key}"


_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|STORAGE", re.I)


# -- MLflow -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "mlflow" / "docker-compose.yml").read_text())


def _command(service: dict) -> str:
    command = service["command"]
    return " ".join(command) if isinstance(command, list) else command


def test_compose_has_mlflow_postgres_and_s3_with_healthchecks(compose):
    services = compose["services"]
    assert {"mlflow", "postgres", "minio", "minio-bucket"} <= set(services)
    for name in ("mlflow", "postgres", "minio"):
        assert services[name]["healthcheck"]["test"], name
    assert services["mlflow"]["image"].endswith(":v3.17.2")
    depends = services["mlflow"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["minio-bucket"]["condition"] == "service_completed_successfully"
    assert "mc mb" in _command(services["minio-bucket"])


def test_the_mlflow_server_uses_postgresql_and_proxied_s3_artifacts(compose):
    command = _command(compose["services"]["mlflow"])
    backend = re.search(r'--backend-store-uri\s+"?(\S+?)"?\s', command).group(1)
    assert backend.startswith("postgresql")
    assert re.search(r'--artifacts-destination\s+"?s3://', command)
    assert "--serve-artifacts" in command


def test_compose_takes_credentials_from_the_env_file_only(compose):
    text = (INFRA / "mlflow" / "docker-compose.yml").read_text()
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if _SECRET_KEY.search(key) or key.endswith("_USER") or key == "AWS_ACCESS_KEY_ID":
                assert str(value).startswith("${"), f"{name}.{key} must come from .env"
                if _SECRET_KEY.search(key):  # no default a forgotten .env would fall back to
                    assert ":-" not in str(value), f"{name}.{key}"
    assert "POSTGRES_PASSWORD:?" in text  # compose refuses to start without it
    example = (INFRA / "mlflow" / ".env.example").read_text()
    for line in example.splitlines():
        key, _, value = line.partition("=")
        if _SECRET_KEY.search(key) and not line.startswith("#"):
            assert "change-me" in value, key


def test_mlflow_k8s_manifests_point_at_postgres_and_an_s3_bucket():
    docs = [d for p in sorted((INFRA / "mlflow" / "k8s").glob("*.yaml")) for d in documents(p)]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "Secret", "ConfigMap"} <= kinds
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "postgresql" in args and "--serve-artifacts" in args
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert container["image"].endswith(":v3.17.2")


def test_the_shared_mlflow_server_asks_for_a_user_in_compose_and_kubernetes(compose):
    service = compose["services"]["mlflow"]
    assert "--app-name basic-auth" in _command(service)
    assert "flask-wtf==" in _command(service)  # the auth app's CSRF check needs it
    assert service["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/auth-config/basic_auth.ini"
    assert "./basic_auth.ini:/auth-config/basic_auth.ini:ro" in service["volumes"]
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert f"{key}:?" in service["environment"][key]  # compose refuses to start without
    docs = [d for p in sorted((INFRA / "mlflow" / "k8s").glob("*.yaml")) for d in documents(p)]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name basic-auth" in " ".join(container["args"])
    assert {"secretRef": {"name": "mlflow-auth"}} in container["envFrom"]
    (ini,) = [d["data"]["basic_auth.ini"] for d in docs
              if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth-config"]
    assert ini.strip() == (INFRA / "mlflow" / "basic_auth.ini").read_text().strip()
    secrets = [d for d in documents(INFRA / "mlflow" / "k8s" / "secret.example.yaml")
               if d["kind"] == "Secret" and d["metadata"]["name"] == "mlflow-auth"]
    assert secrets and all("change-me" in v for v in secrets[0]["stringData"].values())


@pytest.mark.slow
def test_the_auth_config_refuses_anonymous_clients_and_serves_users(tmp_path):
    """The committed basic_auth.ini in a real `mlflow server --app-name basic-auth` on 127.0.0.1,
    started as the compose service starts it (the auth database moved to a temporary folder):
    a client without a user is refused, one with MLFLOW_TRACKING_USERNAME/PASSWORD tracks a run,
    and a wrong password is refused without being printed."""
    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert "sqlite:////auth/basic_auth.db" in ini
    (tmp_path / "basic_auth.ini").write_text(
        ini.replace("sqlite:////auth/", f"sqlite:///{tmp_path}/"))
    password = "admin-pass-" + "x" * 8
    port = _free_port()
    env = os.environ | {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
                        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key"}
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--artifacts-destination", str(tmp_path / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _status(f"{uri}/health"):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the auth server did not start"
            time.sleep(0.5)
        assert _status(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1") == 401

        track = ("from dynroute.platform.tracking.tracker import Tracker\n"
                 f"t = Tracker(uri={uri!r}, experiment='auth')\n"
                 "with t.run(run_name='r') as run_id:\n"
                 "    t.log_metrics({'miou': 0.5}, step=0)\n"
                 "print(run_id)\n")
        user = {"MLFLOW_TRACKING_USERNAME": "admin"}
        ok = subprocess.run([sys.executable, "-c", track], capture_output=True, text=True,
                            timeout=120, env=os.environ | user |
                            {"MLFLOW_TRACKING_PASSWORD": password})
        assert ok.returncode == 0, ok.stderr[-3000:]
        run_id = ok.stdout.split()[-1]
        got = _status(f"{uri}/api/2.0/mlflow/runs/get?run_id={run_id}",
                      user=("admin", password))
        assert got == 200

        wrong = subprocess.run([sys.executable, "-c", track], capture_output=True, text=True,
                               timeout=120, env=os.environ | user |
                               {"MLFLOW_TRACKING_PASSWORD": "not-the-password-42"})
        assert wrong.returncode != 0 and "401" in wrong.stderr
        assert "not-the-password-42" not in wrong.stdout + wrong.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # our own server's process group
        server.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(url: str, *, user: tuple[str, str] | None = None) -> int | None:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


# -- the image --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "docker" / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_installs_the_project_with_the_constraints_and_cuda_torch(dockerfile):
    runs = [line for line in dockerfile if line.startswith("RUN ")]
    project = next(r for r in runs if re.search(r"pip install .*/app(\s|$)", r))
    assert "-c /app/constraints.cuda.txt" in project
    swap = next(r for r in runs if "constraints.cuda.txt" in r and "sed" in r)
    assert "torch==${TORCH_VERSION}+${TORCH_CUDA}" in swap
    assert any("download.pytorch.org/whl/${TORCH_CUDA}" in r for r in runs)
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert re.match(r"FROM \S+", next(line for line in dockerfile if line.startswith("FROM")))


def test_the_torch_swap_rewrites_the_constraints_line():
    """Run the Dockerfile's sed expression on the real constraints.txt."""
    import subprocess

    out = subprocess.run(["sed", "-E", "s/^torch==.*/torch==2.13.0+cu128/",
                          str(ROOT / "constraints.txt")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "torch==2.13.0+cu128" in out and "torch==2.13.0" not in out
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert 's/^torch==.*/torch==${TORCH_VERSION}+${TORCH_CUDA}/' in dockerfile


def test_the_image_runs_as_a_non_root_user_with_the_dynroute_entrypoint(dockerfile):
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert dockerfile.index(f"USER {users[-1]}") > max(
        i for i, line in enumerate(dockerfile) if line.startswith("RUN "))
    entrypoint = next(line for line in dockerfile if line.startswith("ENTRYPOINT"))
    assert entrypoint.rstrip().endswith('"dynroute"]')


def test_the_dockerignore_keeps_secrets_and_data_out_of_the_context():
    for name in (".dockerignore", "Dockerfile.dockerignore"):
        lines = (INFRA / "docker" / name).read_text().splitlines()
        assert next(x for x in lines if not x.startswith("#")) == "**"
        allowed = {x.lstrip("!") for x in lines if x.startswith("!")}
        assert {"pyproject.toml", "constraints.txt", "models/**", "platform/**",
                "pipelines/**"} <= allowed
        assert not any(x.startswith(("!.env", "!.venv", "!data", "!mlruns")) for x in lines)
