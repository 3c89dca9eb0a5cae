"""deploy/: each kustomization renders with `kubectl kustomize`, every object validates offline against the
Kubernetes schemas that kubernetes-validate bundles, and the wiring holds: probes and ports, Prometheus
scraping, the HPA's metric through the prometheus-adapter rules down to a metric the server really exports,
GPU requests, the disruption budget, the OpenAI front's --triton, and the Dockerfiles against the Makefile
and the CLI."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = {"cpu": "overlays/cpu", "gpu": "overlays/gpu", "seed": "seed"}
OVERLAYS = ("cpu", "gpu")
OLDEST_K8S = (1, 29)  # validated against every bundled Kubernetes release from this one to the newest
SERVER, FRONT = "tessera-triton", "tessera-openai"  # Deployment and Service names
SERVER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# Triton's own per-model metrics (Triton 2.51 docs/user_guide/metrics.md), for adapter rules that use them.
TRITON_METRICS = {
    "nv_inference_request_success": "counter",
    "nv_inference_request_failure": "counter",
    "nv_inference_count": "counter",
    "nv_inference_exec_count": "counter",
    "nv_inference_pending_request_count": "gauge",
    "nv_inference_request_duration_us": "counter",
    "nv_inference_queue_duration_us": "counter",
    "nv_inference_compute_input_duration_us": "counter",
    "nv_inference_compute_infer_duration_us": "counter",
    "nv_inference_compute_output_duration_us": "counter",
}


# -- rendering ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render deploy/ with `kubectl kustomize`")
    out = {}
    for name, rel in KUSTOMIZATIONS.items():
        proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / rel)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize deploy/{rel} failed:\n{proc.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def docs(rendered, overlay) -> list[dict]:
    return rendered[overlay]


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(deployment: dict, name: str, init: bool = False) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    hits = [c for c in spec.get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(hits) == 1, f"{deployment['metadata']['name']}: expected one container {name!r}"
    return hits[0]


def port_number(c: dict, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert port in named, f"container {c['name']}: no port named {port!r} (has {sorted(named)})"
    return named[port]


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


# -- schemas ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_deploy_objects_validate_against_kubernetes_schemas(rendered, name):
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    release = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    versions = sorted({v.rsplit(".", 1)[0] for v in all_versions()}, key=release)
    versions = [v for v in versions if release(v) >= OLDEST_K8S]
    assert versions, "kubernetes-validate bundles no schema for the Kubernetes releases we support"
    problems = []
    for doc in rendered[name]:
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {e.message} "
                                f"at {'.'.join(map(str, e.path))}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']}: no schema ({e.message}); a CRD "
                                "cannot be validated offline here, keep it out of the overlays")
    assert not problems, "\n".join(problems)


def test_overlays_hold_every_object(docs):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {
        ("Namespace", "tessera"), ("PersistentVolumeClaim", "tessera-pipelines"),
        ("Deployment", SERVER), ("Service", SERVER), ("HorizontalPodAutoscaler", SERVER),
        ("PodDisruptionBudget", SERVER), ("Deployment", FRONT), ("Service", FRONT),
        ("ConfigMap", "tessera-adapter-rules"),
    }
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tessera-adapter-rules":
            assert d["metadata"]["namespace"] == "monitoring", "the adapter rules belong beside the adapter"
        elif d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "tessera", f"{d['kind']}/{d['metadata']['name']}"


# -- the server pod -----------------------------------------------------------------------------------------
def test_server_ports_and_probes(docs):
    from tessera.wire import ENGINE_MODEL

    c = container(find(docs, "Deployment", SERVER), "triton")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == SERVER_PORTS
    expected = {
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
        # the engine loads after every other model (explicit model control): ready only once it is
        "startupProbe": f"/v2/models/{ENGINE_MODEL}/ready",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, f"{probe}: {get['path']}"
        assert port_number(c, get["port"]) == 8000, f"{probe}: port {get['port']}"


def test_startup_allowance_covers_the_servers_own_ready_timeout(docs):
    deployment = find(docs, "Deployment", SERVER)
    c = container(deployment, "triton")
    probe = c["startupProbe"]
    allowance_s = probe["periodSeconds"] * probe["failureThreshold"]
    assert allowance_s >= 600, f"startup allowance {allowance_s} s: exporting and warming take minutes"
    ready_timeout_s = float(env(c)["TESSERA_READY_TIMEOUT"])
    # tessera serve gives up first and logs the server's own errors, before the kubelet kills it
    assert ready_timeout_s < allowance_s, f"TESSERA_READY_TIMEOUT {ready_timeout_s} >= {allowance_s}"
    export = container(deployment, "export", init=True)
    export_args = env(export).get("TESSERA_EXPORT_ARGS", "")
    assert "--prefix" not in export_args, "the startup probe names the unprefixed engine"


def test_export_init_container_writes_the_repository_the_server_serves(docs):
    deployment = find(docs, "Deployment", SERVER)
    export, server = container(deployment, "export", init=True), container(deployment, "triton")
    script = " ".join(export["command"] + export.get("args", []))
    assert "tessera export" in script and '--repo "$TESSERA_REPO"' in script
    repo = env(export)["TESSERA_REPO"]
    assert env(server)["TESSERA_REPO"] == repo
    mounts = lambda c: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}  # noqa: E731
    shared = [path for path in mounts(export) if repo.startswith(path.rstrip("/") + "/")]
    assert shared, f"the export writes {repo} outside its volumes"
    assert mounts(server).get(shared[0]) == mounts(export)[shared[0]], "export and server share no volume"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts(export)[shared[0]]], "each pod exports into its own emptyDir"
    pipeline_volume = volumes[mounts(export)["/pipelines"]]
    assert pipeline_volume["persistentVolumeClaim"]["claimName"] == "tessera-pipelines"
    shm = volumes[mounts(server)["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory", "Triton's Python backend needs more than the default 64 MiB /dev/shm"


def test_prometheus_scrapes_the_metrics_port(docs):
    deployment = find(docs, "Deployment", SERVER)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    metrics_port = port_number(container(deployment, "triton"), "metrics")
    assert int(annotations["prometheus.io/port"]) == metrics_port == 8002
    assert annotations["prometheus.io/path"] == "/metrics"


def test_resources_per_overlay(docs, overlay):
    deployment = find(docs, "Deployment", SERVER)
    for c in (container(deployment, "triton"), container(deployment, "export", init=True)):
        limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
        if overlay == "gpu":
            assert str(limits.get("nvidia.com/gpu")) == "1", f"{c['name']}: limits {limits}"
            assert env(c).get("TESSERA_TARGET", "gpu") == "gpu"
        else:
            assert "nvidia.com/gpu" not in {**limits, **requests}, f"{c['name']}: a GPU on the CPU overlay"
            assert str(requests.get("cpu")) == str(limits.get("cpu")) == "2", f"{c['name']}: {c['resources']}"
    image = container(deployment, "triton")["image"]
    assert image.endswith(f":{overlay}"), f"server image {image} on the {overlay} overlay"
    if overlay == "gpu":
        tolerations = deployment["spec"]["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
        surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        assert surge == 0, "a rollout must not need a spare GPU"


# -- Services, disruption budget, autoscaler ----------------------------------------------------------------
def test_services_route_to_their_own_pods(docs):
    server, front = find(docs, "Deployment", SERVER), find(docs, "Deployment", FRONT)
    service = find(docs, "Service", SERVER)
    assert selects(service["spec"]["selector"], pod_labels(server))
    assert not selects(service["spec"]["selector"], pod_labels(front))
    c = container(server, "triton")
    ports = {p["name"]: (p["port"], port_number(c, p["targetPort"])) for p in service["spec"]["ports"]}
    assert ports == {name: (n, n) for name, n in SERVER_PORTS.items()}
    front_service = find(docs, "Service", FRONT)
    assert selects(front_service["spec"]["selector"], pod_labels(front))
    assert not selects(front_service["spec"]["selector"], pod_labels(server))
    for p in front_service["spec"]["ports"]:
        assert port_number(container(front, "openai"), p["targetPort"]) == 9000


def test_pdb_selects_the_server_pods_only(docs):
    pdb = find(docs, "PodDisruptionBudget", SERVER)
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels(find(docs, "Deployment", SERVER)))
    assert not selects(selector, pod_labels(find(docs, "Deployment", FRONT)))
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def adapter_rules(docs: list[dict]) -> list[dict]:
    config = yaml.safe_load(find(docs, "ConfigMap", "tessera-adapter-rules")["data"]["config.yaml"])
    assert config.get("rules"), "the adapter config has no rules"
    return config["rules"]


def series_name(rule: dict) -> str:
    m = re.fullmatch(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*\{.*\}\s*", rule["seriesQuery"])
    assert m, f"seriesQuery should name its metric: {rule['seriesQuery']!r}"
    return m.group(1)


def custom_metric_name(rule: dict) -> str:
    """The name prometheus-adapter serves a rule's series under (`name.matches` / `name.as`)."""
    series = series_name(rule)
    naming = rule.get("name", {})
    pattern = re.compile(naming.get("matches") or "^(.*)$")
    m = pattern.search(series)
    assert m, f"name.matches {pattern.pattern!r} does not match {series}"
    template = naming.get("as") or ("$1" if pattern.groups == 1 else "$0")
    return re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g.group(1))), template)


def exported_metrics() -> dict[str, str]:
    """name -> counter/gauge/histogram of every tessera_* metric python_backends/tessera/triton/metrics.py
    creates (parsed from its source), plus Triton's own nv_inference_* metrics."""
    tree = ast.parse((ROOT / "python_backends/tessera/triton/metrics.py").read_text())
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        name = node.args[0].value
        if not (isinstance(name, str) and name.startswith("tessera_")):
            continue
        if func in ("counter", "_counter", "gauge", "_gauge"):
            found[name] = func.strip("_")
        elif func == "_family" and len(node.args) >= 3 and isinstance(node.args[2], ast.Attribute):
            found[name] = node.args[2].attr.lower()
    assert len(found) >= 10 and "gauge" in found.values(), f"metrics.py parse found too little: {found}"
    return found | TRITON_METRICS


def test_adapter_rules_read_metrics_the_server_exports(docs):
    exported = exported_metrics()
    for rule in adapter_rules(docs):
        series = series_name(rule)
        assert series in exported, f"adapter rule reads {series}, which the server does not export"
        overrides = rule["resources"]["overrides"]
        # the labels Prometheus's kubernetes-pods job adds to every scraped series
        assert overrides.get("namespace", {}).get("resource") == "namespace"
        assert overrides.get("pod", {}).get("resource") == "pod"
        query = rule["metricsQuery"]
        assert "<<.Series>>" in query and "<<.LabelMatchers>>" in query and "<<.GroupBy>>" in query
        if exported[series] == "counter":
            assert "rate(" in query, f"{series} is a counter: the adapter must serve its rate"
        else:
            assert "rate(" not in query, f"{series} is a {exported[series]}: rate() of it means nothing"


def test_hpa_scales_the_server_on_an_adapter_metric(docs):
    hpa = find(docs, "HorizontalPodAutoscaler", SERVER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", SERVER)
    assert "replicas" not in find(docs, "Deployment", SERVER)["spec"], "the HPA owns the replica count"
    served = {custom_metric_name(rule) for rule in adapter_rules(docs)}
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics, "no per-pod metric"
    for m in pods_metrics:
        name = m["metric"]["name"]
        assert name in served, f"HPA metric {name} is not served by the adapter ({served})"
        assert m["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


# -- the OpenAI front ---------------------------------------------------------------------------------------
def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_openai_front_points_at_the_server_grpc_port(docs):
    front = container(find(docs, "Deployment", FRONT), "openai")
    argv = front.get("command", []) + front.get("args", [])
    assert argv[:2] == ["tessera", "openai"], argv
    host, _, port = flag(argv, "--triton").rpartition(":")
    service = find(docs, "Service", SERVER)
    assert host.split(".")[0] == service["metadata"]["name"], f"--triton {host} is not the server Service"
    if "." in host:
        assert host.split(".")[1] == service["metadata"]["namespace"]
    grpc = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert int(port) == grpc, f"--triton port {port}, Service grpc port {grpc}"
    assert flag(argv, "--host") == "0.0.0.0"
    assert int(flag(argv, "--port")) == port_number(front, "http")
    assert front["readinessProbe"]["httpGet"]["path"] == "/health"
    assert port_number(front, front["readinessProbe"]["httpGet"]["port"]) == 9000
    assert "tcpSocket" in front["livenessProbe"], "a server that is down must not restart the front"


def test_openai_front_command_parses_with_the_real_cli(docs):
    from tessera.cli import build_parser

    front = container(find(docs, "Deployment", FRONT), "openai")
    argv = front.get("command", []) + front.get("args", [])
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "cmd").choices
    if "openai" not in commands:
        pytest.skip("`tessera openai` is not in the CLI yet: the front's flags are not checked against it")
    parser.parse_args(argv[1:])


# -- images -------------------------------------------------------------------------------------------------
def test_dockerfiles_install_as_the_makefile_does():
    makefile = (ROOT / "Makefile").read_text()
    open_clip = re.search(r"--no-deps (open_clip_torch==\S+)", makefile).group(1)
    bases = {"cpu": "python:3.11-slim-bookworm", "gpu": "nvcr.io/nvidia/tritonserver:24.10-py3"}
    for kind, base in bases.items():
        text = (DEPLOY / "docker" / f"Dockerfile.{kind}").read_text()
        assert re.search(rf"^FROM {re.escape(base)}\s*$", text, re.M) or (
            re.search(rf"^ARG BASE_IMAGE={re.escape(base)}\s*$", text, re.M)
            and re.search(r"^FROM \$\{BASE_IMAGE\}\s*$", text, re.M)), f"Dockerfile.{kind}: not FROM {base}"
        assert "pip install -r /src/requirements.txt" in text
        assert f"pip install --no-deps {open_clip}" in text, f"Dockerfile.{kind}: not Makefile's {open_clip}"
        assert "pip install --no-deps /src" in text, f"Dockerfile.{kind}: the project itself is not installed"
        assert re.search(r"^EXPOSE 8000 8001 8002$", text, re.M)
        assert 'ENTRYPOINT ["tessera-entrypoint"]' in text
        copied = re.findall(r"^COPY (?:--\S+ )*(\S+)", text, re.M)
        for src in copied:
            assert (ROOT / src).exists(), f"Dockerfile.{kind} copies {src}, which does not exist"


def entrypoint_argv() -> list[str]:
    """The serve command line of deploy/docker/entrypoint.sh, its shell variables replaced by placeholders."""
    script = (DEPLOY / "docker" / "entrypoint.sh").read_text()
    line = re.search(r"^exec \$\{TESSERA_SERVE:-([^}]*)\}(.*?)\"\$@\"", script, re.M | re.S)
    assert line, "entrypoint.sh: no `exec ${TESSERA_SERVE:-...} ... \"$@\"` line"
    rest = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line.group(2).replace("\\\n", " "))  # ${VAR:-default}
    rest = re.sub(r"\$\{?\w+\}?", "X", rest)
    return shlex.split(line.group(1)) + shlex.split(rest)


def test_container_commands_parse_with_the_real_cli(rendered):
    from tessera.cli import build_parser

    parser = build_parser()
    argv = entrypoint_argv()
    assert argv[:2] == ["tessera", "serve"], argv
    args = parser.parse_args(argv[1:])
    assert (args.address, args.http_port, args.grpc_port, args.metrics_port) == ("0.0.0.0", 8000, 8001, 8002)
    for overlay in OVERLAYS:
        export = container(find(rendered[overlay], "Deployment", SERVER), "export", init=True)
        script = " ".join(export["command"][2:] + export.get("args", [])).replace("\\\n", " ")
        line = re.search(r"^\s*exec (tessera export .*)$", script, re.M)
        assert line, f"{overlay}: the export init container does not exec `tessera export`"
        values = env(export)
        export_argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], line.group(1)))
        exported = parser.parse_args(export_argv[1:])
        assert exported.target == overlay and exported.repo == values["TESSERA_REPO"]
    job = next(d for d in rendered["seed"] if d["kind"] == "Job")
    seed = job["spec"]["template"]["spec"]["containers"][0]
    assert seed["command"][:2] == ["tessera", "build-tiny"]
    tiny = parser.parse_args(seed["command"][1:])
    assert Path(tiny.dir).parent.as_posix() == "/pipelines"
    default = env(export)["TESSERA_PIPELINE"]
    assert Path(tiny.dir).name == default, f"the seed Job writes {tiny.dir}, the overlays export {default}"


def test_gpu_serve_runs_tessera_serves_staged_start_on_the_containers_tritonserver(tmp_path, monkeypatch):
    import runpy

    import tessera.server
    from tessera.wire import WARMUP_SAMPLE

    monkeypatch.setattr(tessera.server, "triton_workspace", tessera.server.triton_workspace)  # restored after
    runpy.run_path(str(DEPLOY / "docker" / "container_serve.py"), run_name="container_serve")
    configs = {"txt2img": 'backend: "python"\n', "engine": f'backend: "python"\n# {WARMUP_SAMPLE}\n'}
    for model, config in configs.items():
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text(config)
    cmd = tessera.server.TritonServer(tmp_path, http_port=8000, grpc_port=8001, metrics_port=8002).command()
    assert cmd[0] == "/opt/tritonserver/bin/tritonserver"
    assert "--backend-directory=/opt/tritonserver/backends" in cmd
    assert "--model-control-mode=explicit" in cmd and "--load-model=txt2img" in cmd
    assert "--load-model=engine" not in cmd, "engines load once the server is ready, by the repository API"
    gpu = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    stub = "python_backend_stubs/3.11/triton_python_backend_stub"
    assert stub in gpu, "the container's own stub is for Python 3.10"
    assert re.search(r"^ENV TESSERA_SERVE=/opt/tessera/bin/tessera-container-serve", gpu, re.M)
