"""deploy/docker, docker-compose.yml and deploy/k8s: linted where the linters are installed
(hadolint, the compose-spec schema, kubernetes-validate, yamllint) and cross-checked against each
other and against the service's own options, ports and health service name.

No image is built and nothing is deployed here (no container engine, no cluster): these tests
catch what breaks a build or a rollout without running one.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.config import OPTIONS, ServeConfig
from service.server import SERVICE_NAME

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = {
    "cpu": DEPLOY / "docker" / "Dockerfile.cpu",
    "cuda": DEPLOY / "docker" / "Dockerfile.cuda",
}
K8S = DEPLOY / "k8s"
OPTION_ENVS = {option.env for option in OPTIONS}
DEFAULTS = ServeConfig(bundle=Path("unused"))
TOOLS_HINT = "run `make deploy-tools`"


# --- helpers ---------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A linter from the virtualenv (make deploy-tools puts them there) or from PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed: {TOOLS_HINT}")
    return path


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def yaml_docs(path: Path) -> list[Any]:
    yaml = pytest.importorskip("yaml", reason=f"PyYAML not installed: {TOOLS_HINT}")
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def yaml_doc(path: Path) -> Any:
    (doc,) = yaml_docs(path)
    return doc


@dataclass
class Stage:
    """One stage of a Dockerfile: its base, name and instructions (continuations joined)."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        pairs = " ".join(self.all("ENV"))
        return dict(re.findall(r"(\w+)=(\S+)", pairs))


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip()))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def stage(stages: list[Stage], name: str) -> Stage:
    (found,) = [s for s in stages if s.name == name]
    return found


def copy_sources(args: str) -> tuple[list[str], str]:
    words = [w for w in args.split() if not w.startswith("--")]
    return words[:-1], words[-1]


def allowed_by_dockerignore(dockerfile: Path, source: str) -> bool:
    """Whether the Dockerfile's own allowlist (``*`` then ``!path``) lets ``source`` in."""
    lines = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text(encoding="utf-8")
    patterns = [line.strip() for line in lines.splitlines() if line.strip()[:1] not in ("", "#")]
    assert patterns[0] == "*", "the dockerignore should start by excluding everything"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    return any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed)


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object under deploy/k8s, keyed ``Kind/name``."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (found,) = objects["Deployment/anomaly-service"]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = found
    return result


# --- Dockerfiles -------------------------------------------------------------------------------


def test_hadolint_passes_both_dockerfiles() -> None:
    hadolint = tool("hadolint")
    result = run(hadolint, *(str(p) for p in DOCKERFILES.values()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    """A negative control: a Dockerfile with textbook mistakes must fail."""
    hadolint = tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install .\n", encoding="utf-8")
    result = run(hadolint, str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the "latest" tag


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runtime_is_non_root_with_grpc_health_check(kind: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[kind])
    assert [s.name for s in stages] == ["build", "base", "serve-baked", "serve"]
    base = stage(stages, "base")
    (user,) = base.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    (healthcheck,) = base.all("HEALTHCHECK")
    assert '"python", "/opt/anomaly/healthcheck.py"' in healthcheck
    assert re.search(r"--start-period=\d+s", healthcheck)
    assert any(
        "deploy/docker/healthcheck.py" in c and "/opt/anomaly/" in c for c in base.all("COPY")
    )
    assert base.all("ENTRYPOINT") == ['["python", "-m", "service"]']
    assert base.all("STOPSIGNAL") == ["SIGTERM"]
    baked = stage(stages, "serve-baked")
    assert any(c.endswith("${BUNDLE} /models/bundle") for c in baked.all("COPY"))
    assert stage(stages, "serve").instructions == []


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_configures_the_server_with_real_options(kind: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[kind])
    env = stage(stages, "base").env()
    anomaly = {k: v for k, v in env.items() if k.startswith("ANOMALY_")}
    assert set(anomaly) <= OPTION_ENVS, set(anomaly) - OPTION_ENVS
    assert anomaly["ANOMALY_BUNDLE"] == "/models/bundle"
    assert anomaly["ANOMALY_DEVICE"] == kind
    assert float(anomaly["ANOMALY_GRACE_PERIOD"]) == DEFAULTS.grace_period
    exposed = " ".join(stage(stages, "base").all("EXPOSE")).split()
    assert sorted(exposed) == sorted([anomaly["ANOMALY_PORT"], anomaly["ANOMALY_METRICS_PORT"]])


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copies_only_files_that_exist_and_the_context_lets_in(kind: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[kind])
    for current in stages:
        for args in current.all("COPY"):
            if "--from=" in args:
                continue
            sources, _ = copy_sources(args)
            for source in sources:
                if source.startswith("${"):
                    continue  # the bundle to bake, given at build time
                assert (REPO / source).exists(), f"{kind}: COPY {source}: no such file"
                assert allowed_by_dockerignore(DOCKERFILES[kind], source), source


def test_cuda_dockerfile_matches_the_cuda_major_of_onnxruntime_gpu() -> None:
    """The CUDA base image and the CUDA wheels ONNX Runtime loads must be the same major."""
    args, stages = parse_dockerfile(DOCKERFILES["cuda"])
    image = args["CUDA_IMAGE"]
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", image
    )
    assert match, image
    requirements = importlib.metadata.requires("onnxruntime-gpu") or []
    runtime = [r for r in requirements if r.startswith("nvidia-cuda-runtime")]
    assert runtime, requirements
    ort_major = re.search(r"(?:-cu|~=|==|>=)(\d+)", runtime[0])
    assert ort_major and ort_major.group(1) == match.group(1), (image, runtime)
    assert all(s.base == "${CUDA_IMAGE}" for s in stages if s.name in ("build", "base"))
    installs = " ".join(stage(stages, "build").all("RUN"))
    assert '"onnxruntime-gpu[cuda,cudnn]' in installs and "pip install" in installs


# --- docker compose ----------------------------------------------------------------------------


def test_compose_files_match_the_compose_spec() -> None:
    checker = tool("check-jsonschema")
    files = [DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.gpu.yml"]
    result = run(checker, "--builtin-schema", "vendor.compose-spec", *(str(f) for f in files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wires_service_prometheus_and_grafana_together() -> None:
    compose = yaml_doc(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"anomaly-service", "loadgen", "prometheus", "grafana"}
    service = services["anomaly-service"]
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    metrics_port = str(DEFAULTS.metrics_port)
    # Prometheus scrapes the service by its compose name on the metrics port.
    scrape = yaml_doc(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "anomaly-service"]
    assert job["static_configs"][0]["targets"] == [f"anomaly-service:{metrics_port}"]
    # The load generator talks to the service by its compose name, once it is healthy.
    loadgen = services["loadgen"]
    assert f"--target=anomaly-service:{DEFAULTS.port}" in loadgen["command"]
    assert loadgen["depends_on"]["anomaly-service"]["condition"] == "service_healthy"
    assert loadgen["entrypoint"] == ["python", "/opt/anomaly/loadgen.py"]
    # Config and dashboards come from this repository.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            if isinstance(volume, dict) and volume["type"] == "bind":
                assert (DEPLOY / volume["source"]).is_dir(), volume
                assert volume["read_only"] is True
    # Published on loopback only.
    for name, spec in services.items():
        for port in spec.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    # docker stop waits longer than the server's grace period.
    grace = float(service["environment"]["ANOMALY_GRACE_PERIOD"])
    assert float(service["stop_grace_period"].rstrip("s")) > grace
    assert set(service["environment"]) <= OPTION_ENVS


def test_compose_gpu_override_uses_the_cuda_image_and_reserves_a_gpu() -> None:
    override = yaml_doc(DEPLOY / "docker-compose.gpu.yml")["services"]["anomaly-service"]
    assert override["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
    assert override["environment"]["ANOMALY_DEVICE"] == "cuda"
    (device,) = override["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# --- Kubernetes --------------------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    validate = tool("kubernetes-validate")
    core = [K8S / "deployment.yaml", K8S / "service.yaml", K8S / "pdb.yaml"]
    result = run(validate, "--strict", "--kubernetes-version", "1.30.0", *(str(p) for p in core))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == 4, result.stdout  # Deployment, 2 Services, PDB


def test_kubernetes_validation_is_really_validating(tmp_path: Path) -> None:
    """A negative control: a misspelt field in the Deployment must be refused."""
    validate = tool("kubernetes-validate")
    text = (K8S / "deployment.yaml").read_text(encoding="utf-8")
    assert "terminationGracePeriodSeconds:" in text
    broken = tmp_path / "deployment.yaml"
    broken.write_text(text.replace("terminationGracePeriodSeconds:", "terminationGracePeriod:"))
    result = run(validate, "--strict", "--kubernetes-version", "1.30.0", str(broken))
    assert result.returncode != 0


def test_deployment_requests_a_gpu_and_runs_the_cuda_image_as_its_user() -> None:
    objects = k8s_objects()
    pod = objects["Deployment/anomaly-service"]["spec"]["template"]["spec"]
    spec = container(objects)
    resources = spec["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    env = {e["name"]: e["value"] for e in spec["env"]}
    assert set(env) <= OPTION_ENVS, set(env) - OPTION_ENVS
    assert env["ANOMALY_DEVICE"] == "cuda"
    _, stages = parse_dockerfile(DOCKERFILES["cuda"])
    (user,) = stage(stages, "base").all("USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    assert mounts[env["ANOMALY_BUNDLE"]]["readOnly"] is True
    assert "/tmp" in mounts  # bundle archives unpack there on a read-only root


def test_deployment_probes_use_the_grpc_health_service_on_the_grpc_port() -> None:
    spec = container(k8s_objects())
    env = {e["name"]: e["value"] for e in spec["env"]}
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {"grpc": int(env["ANOMALY_PORT"]), "metrics": int(env["ANOMALY_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"]["port"] == ports["grpc"], probe
    assert spec["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert spec["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "time to load the bundle"


def test_termination_grace_covers_pre_stop_and_the_servers_grace_period() -> None:
    objects = k8s_objects()
    pod = objects["Deployment/anomaly-service"]["spec"]["template"]["spec"]
    spec = container(objects)
    env = {e["name"]: e["value"] for e in spec["env"]}
    pre_stop = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(env["ANOMALY_GRACE_PERIOD"])
    assert pre_stop >= 1
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 1


def test_services_select_the_pods_and_the_servicemonitor_scrapes_one_of_them() -> None:
    objects = k8s_objects()
    deployment = objects["Deployment/anomaly-service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(objects)["ports"]}
    services = {k: v for k, v in objects.items() if k.startswith("Service/")}
    assert set(services) == {"Service/anomaly-service", "Service/anomaly-service-headless"}
    for name, service in services.items():
        assert service["spec"]["selector"].items() <= pod_labels.items(), name
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)
    assert services["Service/anomaly-service-headless"]["spec"]["clusterIP"] == "None"
    pdb = objects["PodDisruptionBudget/anomaly-service"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = objects["ServiceMonitor/anomaly-service"]
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [n for n, s in services.items() if wanted <= s["metadata"]["labels"].items()]
    assert selected == ["Service/anomaly-service"], "pods must be scraped exactly once"
    (endpoint,) = monitor["spec"]["endpoints"]
    service_ports = {p["name"] for p in services["Service/anomaly-service"]["spec"]["ports"]}
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"


def test_pod_scrape_annotations_match_the_metrics_port_and_the_kubernetes_scrape_config() -> None:
    objects = k8s_objects()
    template = objects["Deployment/anomaly-service"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    metrics = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}["metrics"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics)
    assert annotations["prometheus.io/path"] == "/metrics"
    config = yaml_doc(DEPLOY / "prometheus" / "prometheus-kubernetes.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "anomaly-service"  # the job the alerts select
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    name_label = template["metadata"]["labels"]["app.kubernetes.io/name"]
    assert re.fullmatch(keep[0]["regex"], name_label)
    assert keep[0]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]


def test_prometheusrule_holds_exactly_the_tested_rule_files() -> None:
    rule = yaml_doc(K8S / "prometheusrule.yaml")
    groups = [
        group
        for name in ("recording.yml", "alerts.yml")
        for group in yaml_doc(DEPLOY / "prometheus" / "rules" / name)["groups"]
    ]
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == groups, "run `python deploy/k8s/make_prometheusrule.py`"


# --- YAML hygiene ------------------------------------------------------------------------------


def test_yamllint_passes_everything_under_deploy() -> None:
    yamllint = tool("yamllint")
    result = run(yamllint, "--strict", "-c", str(DEPLOY / ".yamllint.yml"), str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr
