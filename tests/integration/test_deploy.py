"""deploy/: the Kubernetes manifests validate against pinned Kubernetes API schemas, and they
agree with camserve's own CLI, with each other and with deploy/Dockerfile. Offline and fast:
nothing here talks to a cluster or builds an image."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from camserve.cli import build_parser

# Newest Kubernetes release whose schemas kubernetes-validate (pinned in pyproject.toml)
# bundles, and the oldest release the manifests support: the preStop `sleep` action is beta
# and on by default from 1.30 (alpha in 1.29, GA in 1.34). Everything else they use is older
# (gRPC probes GA 1.27, autoscaling/v2 1.23, policy/v1 PDBs 1.21).
KUBERNETES_VERSION = "1.37"
OLDEST_KUBERNETES_VERSION = "1.30"

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

GPU = "nvidia.com/gpu"
EXPLAINER_SERVICE = "camserve.v1.Explainer"


def _load() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(K8S)), doc))
    return docs


DOCS = _load()


def _id(entry: tuple[str, dict]) -> str:
    path, doc = entry
    return f"{path}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc.get("kind") == kind]


DEPLOYMENTS = _of_kind("Deployment")
SERVICES = _of_kind("Service")
CONFIGMAPS = {doc["metadata"]["name"]: doc.get("data", {}) for doc in _of_kind("ConfigMap")}


def _pod_specs() -> list[tuple[str, dict, dict]]:
    """(name, pod metadata, pod spec) of every pod the manifests make."""
    pods = []
    for _, doc in DOCS:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "Job"):
            template = doc["spec"]["template"]
            pods.append((f"{kind}/{name}", template.get("metadata", {}), template["spec"]))
        elif kind == "Pod":
            pods.append((f"Pod/{name}", doc["metadata"], doc["spec"]))
    return pods


PODS = _pod_specs()


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it, from the manifests alone."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in CONFIGMAPS, f"envFrom names a ConfigMap that is not here: {ref}"
        env.update({source.get("prefix", "") + k: v for k, v in CONFIGMAPS[ref].items()})
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = _expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = CONFIGMAPS.get(ref["name"])
            assert data is not None, f"{name}: no ConfigMap {ref['name']!r} in deploy/k8s"
            assert ref["key"] in data, f"{name}: ConfigMap {ref['name']!r} has no {ref['key']!r}"
            env[name] = data[ref["key"]]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, resource = ref["resource"].split(".")
            assert resource == "cpu", f"{name}: only CPU resource fields are resolved here"
            amount = container["resources"][kind][resource]
            # the kubelet rounds up to a whole multiple of the divisor
            env[name] = str(math.ceil(_cpu(amount) / _cpu(ref.get("divisor", "1"))))
        else:
            pytest.fail(f"{name}: this test cannot resolve {sorted(source)}")
    return env


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command, args and env values: $$ is a literal $, an
    unknown $(VAR) stays as written."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, text)


def _camserve_args(container: dict) -> list[str] | None:
    """The argv `camserve` gets in this container, $(VAR)s expanded; None when the container
    runs something else."""
    command = container.get("command")
    if command not in (None, ["camserve"]):
        return None
    env = _env(container)
    args = [_expand(arg, env) for arg in container.get("args", [])]
    unresolved = [arg for arg in args if "$(" in arg]
    assert not unresolved, f"{container['name']}: unresolved variables in {unresolved}"
    return args


def _parse(argv: list[str]):
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"camserve rejects {shlex.join(argv)} (exit {exc.code})")


def _server(deployment: dict) -> tuple[dict, dict, object]:
    """(pod spec, the camserve container, its parsed `camserve serve` arguments)."""
    spec = deployment["spec"]["template"]["spec"]
    servers = [c for c in spec["containers"] if (_camserve_args(c) or [None])[0] == "serve"]
    assert len(servers) == 1, f"{deployment['metadata']['name']}: one `camserve serve` container"
    return spec, servers[0], _parse(_camserve_args(servers[0]))


def _port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert name in ports, f"{container['name']}: no container port named {name!r}"
    return ports[name]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _is_gpu(container: dict) -> bool:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0)) > 0


def _project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


# --- schemas ---------------------------------------------------------------------------------

def test_manifests_were_found() -> None:
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim",
            "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert len(DEPLOYMENTS) >= 2  # CPU and GPU


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES_VERSION, KUBERNETES_VERSION])
@pytest.mark.parametrize("entry", DOCS, ids=_id)
def test_manifest_validates_strictly_against_pinned_kubernetes(entry, version) -> None:
    """Strict: an unknown or misspelt field fails too. A kind without a schema (a CRD, a
    kustomization) fails, rather than being skipped with a warning as the CLI does."""
    _, doc = entry
    used, error = None, None
    try:
        used = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top level)"
        error = f"{_id(entry)} against Kubernetes {exc.version}: {where}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        error = exc.message
    if error:  # outside the except block: no chained traceback printing the whole schema
        pytest.fail(error, pytrace=False)
    # validate() falls back to the newest bundled schema not newer than the one asked for
    assert used == version, f"kubernetes-validate has no {version} schemas (used {used})"


# --- the server's command line ---------------------------------------------------------------

@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_deployment_args_parse_with_camserve_cli(deployment) -> None:
    spec, container, args = _server(deployment)
    assert args.command == "serve"
    assert args.host == "0.0.0.0", "serve on the pod's address, not loopback"
    assert args.metrics_port is not None, "--metrics-port: Prometheus scrapes every pod"
    assert args.intra_op_threads == math.ceil(_cpu(container["resources"]["limits"]["cpu"]))


def test_job_and_pod_args_parse_with_camserve_cli() -> None:
    checked = 0
    for name, _, spec in PODS:
        if name.startswith("Deployment/"):
            continue
        for container in spec["containers"]:
            argv = _camserve_args(container)
            if argv is not None:
                _parse(argv)
                checked += 1
    assert checked, "the export Job runs camserve"


def test_configmap_keys_exist_and_are_all_used() -> None:
    used: set[tuple[str, str]] = set()
    for _, _, spec in PODS:
        for container in spec["containers"]:
            _env(container)  # fails on a missing ConfigMap or key
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    used.add((ref["name"], ref["key"]))
            for source in container.get("envFrom", []):
                name = source["configMapRef"]["name"]
                used |= {(name, key) for key in CONFIGMAPS[name]}
    unused = {(n, k) for n, data in CONFIGMAPS.items() for k in data} - used
    assert not unused, f"ConfigMap keys no container reads: {sorted(unused)}"


# --- ports, probes, Services -----------------------------------------------------------------

@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_probes_ports_and_metrics_annotations_agree(deployment) -> None:
    spec, container, args = _server(deployment)
    grpc_port = _port(container, "grpc")
    assert grpc_port == args.port
    assert _port(container, "metrics") == args.metrics_port
    # probes go to the health-only port: on the gRPC port a saturated pod refuses them
    health_port = _port(container, "health")
    assert health_port == args.health_port != grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{probe} missing"
        action = container[probe].get("grpc")
        assert action, f"{probe}: use the native gRPC probe (grpc.health.v1)"
        assert action["port"] == health_port, f"{probe} checks port {action['port']}"
        # the server registers health for "" and the Explainer service (server/app.py)
        assert action.get("service", "") in ("", EXPLAINER_SERVICE), probe
    assert container["readinessProbe"]["grpc"].get("service") == EXPLAINER_SERVICE
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(args.metrics_port)


def test_explainer_service_name_is_the_protos() -> None:
    from camserve.v1 import explainer_pb2 as pb

    assert pb.DESCRIPTOR.services_by_name["Explainer"].full_name == EXPLAINER_SERVICE


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s["metadata"]["name"])
def test_service_selects_server_pods_and_targets_their_ports(service) -> None:
    selected = [d for d in DEPLOYMENTS
                if _selects({"matchLabels": service["spec"]["selector"]},
                            d["spec"]["template"]["metadata"]["labels"])]
    assert selected, "the Service selects no Deployment's pods"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"].get("appProtocol") == "grpc"
    for deployment in selected:
        _, container, args = _server(deployment)
        for port in ports.values():
            target = port.get("targetPort", port["port"])
            number = _port(container, target) if isinstance(target, str) else target
            assert number in {p["containerPort"] for p in container["ports"]}, port["name"]
        grpc_target = ports["grpc"].get("targetPort", ports["grpc"]["port"])
        assert grpc_target in ("grpc", args.port)
    for _, labels, _ in PODS:  # the export Job and the upload pod stay out of it
        if labels.get("app.kubernetes.io/component") != "server":
            assert not _selects({"matchLabels": service["spec"]["selector"]}, labels)


# --- lifecycle, placement, resources ---------------------------------------------------------

@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_termination_grace_outlasts_prestop_and_drain(deployment) -> None:
    spec, container, args = _server(deployment)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    assert "sleep" in pre_stop, "a preStop sleep lets endpoints go before the drain"
    assert "exec" not in pre_stop, "the kubelet's sleep action needs no shell in the image"
    needed = pre_stop["sleep"]["seconds"] + args.grace_seconds
    # the kubelet counts terminationGracePeriodSeconds from the start of preStop
    assert spec.get("terminationGracePeriodSeconds", 30) > needed


def test_gpu_variant_asks_for_cuda_and_a_gpu() -> None:
    gpu = [d for d in DEPLOYMENTS if _is_gpu(_server(d)[1])]
    cpu = [d for d in DEPLOYMENTS if not _is_gpu(_server(d)[1])]
    assert gpu and cpu
    for deployment in gpu:
        spec, container, args = _server(deployment)
        assert args.device == "cuda", "a GPU pod must not fall back to the CPU silently"
        assert int(container["resources"]["limits"][GPU]) == 1
        assert any(t.get("key") == GPU for t in spec.get("tolerations", []))
        assert spec.get("nodeSelector"), "GPU pods go to GPU nodes"
        assert "cuda" in container["image"].rsplit(":", 1)[-1], "the CUDA build of the image"
    for deployment in cpu:
        assert _server(deployment)[2].device == "cpu"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_models_volume_is_the_claim_mounted_read_only(deployment) -> None:
    spec, container, args = _server(deployment)
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert str(args.models) in mounts, f"nothing mounted at --models {args.models}"
    mount = mounts[str(args.models)]
    assert mount.get("readOnly") is True
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim.get("readOnly") is True
    claims = {doc["metadata"]["name"] for doc in _of_kind("PersistentVolumeClaim")}
    assert claim["claimName"] in claims


@pytest.mark.parametrize("pod", PODS, ids=lambda p: p[0])
def test_pods_run_as_non_root_on_a_read_only_root(pod) -> None:
    _, _, spec = pod
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec.get("automountServiceAccountToken") is False
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "limits" in container["resources"] and "requests" in container["resources"]


# --- HPA and PDB -----------------------------------------------------------------------------

def test_hpas_target_deployments_by_name() -> None:
    hpas = _of_kind("HorizontalPodAutoscaler")
    deployments = {d["metadata"]["name"]: d for d in DEPLOYMENTS}
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == set(deployments)
    for hpa in hpas:
        spec = hpa["spec"]
        target = spec["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        deployment = deployments[target["name"]]
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
        cpu = [m for m in spec["metrics"]
               if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
        assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
        # utilisation is measured against requests: without one the HPA cannot compute it
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert "cpu" in container["resources"]["requests"], container["name"]


def test_each_deployment_has_exactly_one_pdb() -> None:
    """A pod covered by two PodDisruptionBudgets cannot be evicted at all."""
    pdbs = _of_kind("PodDisruptionBudget")
    for deployment in DEPLOYMENTS:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [p["metadata"]["name"] for p in pdbs if _selects(p["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{deployment['metadata']['name']}: PDBs {covering}"
        assert _selects(deployment["spec"]["selector"], labels)


# --- image -----------------------------------------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, rest) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored() -> None:
    rules = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore lists what the build needs (an allow-list)"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copies = [rest.split() for op, rest in _dockerfile() if op.upper() == "COPY"]
    sources = [src for words in copies if not any(w.startswith("--from") for w in words)
               for src in words[:-1] if not src.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
    # what setuptools needs to build the package: the readme and every package folder
    pyproject = (ROOT / "pyproject.toml").read_text()
    folders = set(re.findall(r'"camserve[.\w]*" = "([^"]+)"', pyproject))
    for folder in folders:
        top = folder.split("/")[0]
        assert top in {s.rstrip("/") for s in sources}, f"package folder {folder} not copied"


def test_dockerfile_runs_camserve_as_the_manifests_user() -> None:
    instructions = _dockerfile()
    entrypoint = [json.loads(rest) for op, rest in instructions if op.upper() == "ENTRYPOINT"]
    assert entrypoint[-1] == ["camserve"]
    cmd = [json.loads(rest) for op, rest in instructions if op.upper() == "CMD"][-1]
    assert _parse(cmd).command == "serve"
    user = [rest for op, rest in instructions if op.upper() == "USER"][-1]
    uid = int(user.split(":")[0])  # numeric, so that runAsNonRoot can check it
    assert uid != 0
    assert any(op.upper() == "FROM" and rest.startswith("python:3.11-slim")
               for op, rest in instructions)
    for name, _, spec in PODS:
        assert spec["securityContext"]["runAsUser"] == uid, name


def test_images_are_tagged_with_the_project_version() -> None:
    version = _project_version()
    for name, _, spec in PODS:
        for container in spec["containers"]:
            repository, _, tag = container["image"].rpartition(":")
            assert repository.endswith("camserve"), f"{name}: {container['image']}"
            assert tag == version or tag.startswith(version + "-"), f"{name}: {tag}"
