"""Deployment assets: compose files, Kubernetes manifests, the Dockerfile and the Grafana provisioning."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_SIM = DEPLOY / "docker-compose.sim.yml"
VERSIONS = DEPLOY / ".env"  # the one place that pins each image; compose reads it by itself
DOCKERFILE = DEPLOY / "Dockerfile"
K8S_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
DASHBOARD = REPO / "grafana" / "dashboards" / "glm-gateway.json"
DATASOURCE = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = REPO / "grafana" / "provisioning" / "dashboards" / "provider.yml"

# Kubernetes schema version to validate against (kubernetes-validate ships one set per minor version;
# it picks the newest it has that is not newer than this).
K8S_VERSION = "1.30.0"
DRAIN_TIMEOUT_S = 60


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that accepts Compose's merge tags (!reset, !override) and keeps their value."""


def _compose_tag(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_ComposeLoader.add_constructor("!reset", _compose_tag)
_ComposeLoader.add_constructor("!override", _compose_tag)


def _compose(path: Path) -> dict:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_ComposeLoader)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [
        (path, doc) for path in K8S_MANIFESTS for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc
    ]


def _k8s(kind: str, name: str) -> dict:
    found = [d for _, d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _pins() -> dict[str, str]:
    """deploy/.env's assignments (the image pins, and whatever an operator added below them)."""
    lines = [ln.strip() for ln in VERSIONS.read_text(encoding="utf-8").splitlines()]
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def _images() -> dict[str, str]:
    return {k: v for k, v in _pins().items() if k.endswith("_IMAGE")}


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return value


def _pod_specs() -> list[tuple[str, dict]]:
    docs = [d for _, d in _k8s_docs() if "template" in d.get("spec", {})]
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_SIM], ids=lambda p: p.name)
def test_compose_parses_and_mounts_exist(path: Path) -> None:
    compose = _compose(path)
    assert isinstance(compose.get("services"), dict) and compose["services"]
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (path.parent / build["context"]).resolve()
            assert context.is_dir(), (name, context)
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                assert (path.parent / source).resolve().exists(), (name, source)
            elif not source.startswith("/"):
                assert source in (_compose(COMPOSE).get("volumes") or {}), (name, source)


def test_compose_services() -> None:
    services = _compose(COMPOSE)["services"]
    assert {"vllm", "gateway", "prometheus", "grafana", "node-exporter"} <= set(services)


def test_compose_only_gateway_is_published() -> None:
    for name, service in _compose(COMPOSE)["services"].items():
        for port in service.get("ports", []):
            if name != "gateway":
                assert str(port).startswith("127.0.0.1:"), (name, port)
    assert _compose(COMPOSE)["services"]["gateway"]["ports"]


# ---- image pins


def test_each_image_is_pinned_once_in_deploy_env() -> None:
    images = _images()
    assert set(images) == {"VLLM_IMAGE", "PROMETHEUS_IMAGE", "GRAFANA_IMAGE", "NODE_EXPORTER_IMAGE"}
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", (name, image)
    assert images["VLLM_IMAGE"] == "vllm/vllm-openai:v0.33.0"
    # the releases of late 2026, not the year-old ones (Prometheus 2.53, Grafana 11.2, node-exporter 1.8)
    assert images["PROMETHEUS_IMAGE"].startswith("prom/prometheus:v3.")
    assert int(images["GRAFANA_IMAGE"].rpartition(":")[2].split(".")[0]) >= 12
    assert int(images["NODE_EXPORTER_IMAGE"].rpartition(":v")[2].split(".")[1]) >= 9


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_SIM], ids=lambda p: p.name)
def test_compose_images_come_from_deploy_env(path: Path) -> None:
    """No tag is written in a compose file: each image is ${X_IMAGE:?...}, failing loudly without deploy/.env."""
    images = _images()
    for name, service in _compose(path)["services"].items():
        image = service.get("image")
        if image is None or image.startswith("glm-gateway:"):  # the image built from deploy/Dockerfile
            continue
        match = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", image)
        assert match and match.group(1) in images, (name, image)
    text = path.read_text(encoding="utf-8")
    for image in images.values():
        assert image.rpartition(":")[2] not in text, f"{path.name} repeats the tag of {image}"


def test_k8s_manifests_use_the_pinned_images() -> None:
    pinned = set(_images().values())
    repositories = {image.rpartition(":")[0]: image for image in pinned}
    for name, spec in _pod_specs():
        for container in spec["containers"]:
            image = container["image"]
            if image.startswith("glm-gateway:"):
                continue
            assert image.rpartition(":")[0] in repositories, (name, image)
            assert image in pinned, f"{name}: {image}, but deploy/.env pins {repositories[image.rpartition(':')[0]]}"


def test_readme_names_the_pinned_images() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for image in _images().values():
        assert f"`{image}`" in readme, f"README does not say that deploy/.env pins {image}"


# ---- docker compose


def test_compose_vllm_serves_glm4_on_a_gpu() -> None:
    vllm = _compose(COMPOSE)["services"]["vllm"]
    assert vllm["image"] == "${VLLM_IMAGE:?pinned in deploy/.env}"
    args = " ".join(vllm["command"])
    for flag in (
        "--trust-remote-code",
        "--enforce-eager",
        "--enable-chunked-prefill",
        "--served-model-name=glm-4-9b-chat-1m",
        "THUDM/glm-4-9b-chat-1m",
        "--max-model-len=${MAX_MODEL_LEN:-",
        "--tensor-parallel-size=${TENSOR_PARALLEL_SIZE:-",
    ):
        assert flag in args, flag
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert any(str(v).endswith(":/root/.cache/huggingface") for v in vllm["volumes"])
    health = vllm["healthcheck"]
    assert "/health" in " ".join(health["test"])
    assert _seconds(health["start_period"]) >= 600


def test_compose_vllm_drains_and_shares_its_key_with_the_gateway() -> None:
    services = _compose(COMPOSE)["services"]
    vllm, gateway = services["vllm"], services["gateway"]
    # vLLM's default --shutdown-timeout of 0 aborts in-flight requests: drain as long as the gateway does
    assert _flag(vllm["command"], "--shutdown-timeout") == "${GATEWAY_DRAIN_TIMEOUT:-60}"
    assert gateway["environment"]["GATEWAY_DRAIN_TIMEOUT"] == "${GATEWAY_DRAIN_TIMEOUT:-60}"
    assert _seconds(vllm["stop_grace_period"]) > DRAIN_TIMEOUT_S
    # one engine key: vLLM reads VLLM_API_KEY (empty = none), the gateway sends it on requests, checks, scrapes
    assert vllm["environment"]["VLLM_API_KEY"] == "${VLLM_API_KEY:-}"
    assert gateway["environment"]["GATEWAY_UPSTREAM_API_KEY"] == "${VLLM_API_KEY:-}"
    sim = _compose(COMPOSE_SIM)["services"]["vllm"]
    assert sim["environment"] == {"GATEWAY_SIM_API_KEY": "${VLLM_API_KEY:-}"}


def test_compose_gateway_waits_for_vllm_and_drains() -> None:
    gateway = _compose(COMPOSE)["services"]["gateway"]
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
    assert gateway["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert gateway["environment"]["GATEWAY_UPSTREAM"] == "http://vllm:8000"
    assert _seconds(gateway["stop_grace_period"]) > DRAIN_TIMEOUT_S


def test_compose_gateway_keeps_one_engine_label() -> None:
    """One vLLM container: no DNS discovery, so its label stays the service's URL when it is recreated."""
    environment = _compose(COMPOSE)["services"]["gateway"]["environment"]
    assert environment["GATEWAY_UPSTREAM"] == "http://vllm:8000"
    assert environment["GATEWAY_DNS_INTERVAL"] == "${GATEWAY_DNS_INTERVAL:-0}"


def test_compose_sim_swaps_vllm_for_the_simulator() -> None:
    vllm = _compose(COMPOSE_SIM)["services"]["vllm"]
    assert vllm["entrypoint"] == ["glm-gateway"]
    assert vllm["command"][0] == "sim"
    assert "--max-model-len" in vllm["command"]
    assert vllm["deploy"] == {}
    assert "vllm/vllm-openai" not in vllm["image"]


def test_compose_mounts_match_grafana_provisioning() -> None:
    services = _compose(COMPOSE)["services"]
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load(PROVIDER.read_text(encoding="utf-8"))
    assert grafana_mounts["../grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert grafana_mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prom_mounts["../prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


# ---- Kubernetes


def test_k8s_manifests_validate() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _k8s_docs()
    assert {d["kind"] for _, d in docs} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    }
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {location}: {exc.message}")


def test_k8s_validation_catches_mistakes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    bad = _k8s("Service", "glm-gateway") | {"spek": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_k8s_gateway_deployment() -> None:
    deployment = _k8s("Deployment", "glm-gateway")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["timeoutSeconds"] >= 5
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    config = _k8s("ConfigMap", "glm-gateway")["data"]
    drain = int(config["GATEWAY_DRAIN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > int(prestop[1]) + drain
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert container["envFrom"][0]["configMapRef"]["name"] == "glm-gateway"
    assert all(key.startswith("GATEWAY_") for key in config)


def test_k8s_hpa_scales_on_queue_depth() -> None:
    hpa = _k8s("HorizontalPodAutoscaler", "glm-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "gateway_queue_depth"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "glm-gateway"


def test_k8s_vllm_example() -> None:
    deployment = _k8s("Deployment", "glm-engine")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "vllm/vllm-openai:v0.33.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert "--trust-remote-code" in container["args"]
    service = _k8s("Service", "glm-engine")
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    config = _k8s("ConfigMap", "glm-gateway")["data"]
    assert config["GATEWAY_UPSTREAM"] == "http://glm-engine:8000"
    # headless: the name resolves to every ready pod, each an engine of the gateway's, re-resolved while the
    # pod that leaves sleeps in its preStop
    assert service["spec"]["clusterIP"] == "None"
    interval = float(config["GATEWAY_DNS_INTERVAL"])
    assert interval > 0
    assert interval + 5 <= int(container["lifecycle"]["preStop"]["exec"]["command"][1])  # + CoreDNS's 5 s TTL
    # drains on SIGTERM as long as the gateway does, within the grace period
    drain = int(config["GATEWAY_DRAIN_TIMEOUT"])
    assert int(_flag(container["args"], "--shutdown-timeout")) == drain
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(prestop[1]) + drain


def test_k8s_engine_key_is_one_optional_secret() -> None:
    """vLLM 0.33's --api-key also guards /v1/models: the gateway must send the engine's key, read from the
    same Secret; without the Secret neither container gets the variable."""
    (engine,) = _k8s("Deployment", "glm-engine")["spec"]["template"]["spec"]["containers"]
    (gateway,) = _k8s("Deployment", "glm-gateway")["spec"]["template"]["spec"]["containers"]
    refs = {}
    for container, variable in ((engine, "VLLM_API_KEY"), (gateway, "GATEWAY_UPSTREAM_API_KEY")):
        (env,) = [e for e in container["env"] if e["name"] == variable]
        refs[variable] = env["valueFrom"]["secretKeyRef"]
        assert refs[variable]["optional"] is True
    assert refs["VLLM_API_KEY"] == refs["GATEWAY_UPSTREAM_API_KEY"]


def test_no_service_is_named_vllm() -> None:
    """A Service `vllm` makes Kubernetes inject VLLM_PORT=tcp://... into every pod of the namespace, and vLLM
    refuses to start; any name that becomes a VLLM_* variable prefix is as bad."""
    services = [d["metadata"]["name"] for _, d in _k8s_docs() if d["kind"] == "Service"]
    assert services
    for name in services:
        assert not name.replace("-", "_").upper().startswith("VLLM"), name
    for path in (COMPOSE, COMPOSE_SIM):  # compose makes no such variables; its `vllm` service stays
        assert "vllm" in _compose(path)["services"]


def test_k8s_pods_turn_service_links_off() -> None:
    specs = _pod_specs()
    assert {name for name, _ in specs} >= {"glm-engine", "glm-gateway"}
    for name, spec in specs:
        assert spec.get("enableServiceLinks") is False, name


# ---- Dockerfile


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    froms = [rest for k, rest in instructions if k == "FROM"]
    assert all(f.startswith("python:3.11-slim") for f in froms), froms
    final = len(keywords) - keywords[::-1].index("FROM")
    final_stage = instructions[final:]
    (entrypoint,) = [rest for k, rest in final_stage if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["glm-gateway"], "ENTRYPOINT must be the exec-form console script"
    (cmd,) = [rest for k, rest in final_stage if k == "CMD"]
    assert json.loads(cmd) == ["serve"]
    (healthcheck,) = [rest for k, rest in final_stage if k == "HEALTHCHECK"]
    assert "/health/live" in healthcheck and "curl" not in healthcheck
    users = [rest for k, rest in final_stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("EXPOSE", "8080") in final_stage
    copied = " ".join(rest for k, rest in instructions if k == "COPY")
    for needed in ("pyproject.toml", "README.md", "gateway/"):
        assert needed in copied, needed
    for k, rest in instructions:
        if k == "RUN" and "pip install" in rest:
            assert "--no-cache-dir" in shlex.split(rest), rest


# ---- Grafana


def test_dashboard_variables_and_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("model", "upstream"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] is True
        assert "label_values(" in json.dumps(variables[name]["query"])
    datasource = yaml.safe_load(DATASOURCE.read_text(encoding="utf-8"))["datasources"][0]
    pattern = r'"datasource": \{\s*"type": "prometheus",\s*"uid": "([^"]+)"'
    uids = set(re.findall(pattern, DASHBOARD.read_text(encoding="utf-8")))
    assert uids == {datasource["uid"]}
    titles = {p["title"] for p in dashboard["panels"]}
    fragments = ("KV cache", "Time to first token", "Queue depth", "GPU memory", "Host memory", "Upstream up")
    for fragment in fragments:
        assert any(fragment in t for t in titles), fragment


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
            taken[cell] = panel["title"]
