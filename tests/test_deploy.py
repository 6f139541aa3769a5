"""deploy/, checked offline. Both Kustomize overlays (deploy/k8s/overlays/dev and prod, over
deploy/k8s/base) are rendered here in Python, and compared with `kubectl kustomize` where
kubectl is installed. Every rendered manifest is valid against the Kubernetes 1.32 API's own
schemas (kubernetes-validate, strict: no unknown fields), the KEDA ScaledObject against its
CRD's schema vendored in deploy/schemas/. And they say what the services need: task_svc
as a StatefulSet of shard owners that never runs two pods of one name, each advertising its
own address; a grace longer than each drain; NATS_STREAM_REPLICAS for the NATS there is;
autoscalers whose targets exist; network policies under which only the gateway is reachable
from outside and only persistence_svc reaches PostgreSQL. The Helm values of NATS and
PostgreSQL (deploy/helm/) have the settings the project relies on, and docs/deploy.md
installs the chart versions they were written for."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev extras
import kubernetes_validate
import pytest
import yaml

from gateway_svc.config import Settings as GatewaySettings
from llm_svc.config import Settings as LlmSettings
from persistence_svc.config import Settings as PersistenceSettings
from svckit.nats import JOBS_STREAM
from task_svc.config import Settings as TaskSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
HELM = DEPLOY / "helm"
DOCS_DEPLOY = ROOT / "docs" / "deploy.md"
SCALED_OBJECT_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject-v1alpha1.json"
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ("dev", "prod")
NAMESPACE = "switchboard"
NATS_RELEASE = "nats"  # the Helm release name docs/deploy.md installs NATS as
Doc = dict[str, Any]


def shard_count() -> int:
    """svckit/shards.py's SHARD_COUNT (64 until that module is there)."""
    try:
        shards = importlib.import_module("svckit.shards")
    except ModuleNotFoundError:
        return 64
    return int(shards.SHARD_COUNT)


# ---------------------------------------------------------------------------------------------
# A Kustomize renderer for the fields the kustomizations use, and no others (it refuses the
# rest): resources (files and directories), patches (strategic merge, by path), replicas,
# images. Where kubectl is installed, its output is compared with this one's.

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "replicas", "images"}
# The lists a strategic-merge patch merges item by item on `name` (their patchMergeKey in
# the Kubernetes API). A list of scalars (command, args) a patch gives replaces the
# original; any other list of objects is refused (`merge`).
MERGED_BY_NAME = {"containers", "initContainers", "env", "volumes"}
SCALABLE = {"Deployment", "StatefulSet"}


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def identity(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


def merge(original: Any, patch: Any, field: str = "") -> Any:
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = dict(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)  # `key: null` deletes
            else:
                merged[key] = merge(merged[key], value, key) if key in merged else value
        return merged
    if field in MERGED_BY_NAME and isinstance(original, list) and isinstance(patch, list):
        items = list(original)
        for item in patch:
            same = [i for i, old in enumerate(items) if old["name"] == item["name"]]
            if same:
                items[same[0]] = merge(items[same[0]], item)
            else:
                items.append(item)
        return items
    if isinstance(original, list) and any(isinstance(item, dict) for item in original + patch):
        # Kubernetes merges these by a key of their own (ports by port, volumeMounts by
        # mountPath...): replacing them here would silently differ from kustomize.
        raise AssertionError(f"the test's renderer does not know how to patch `{field}`")
    return patch


def pod_containers(doc: Doc) -> list[Doc]:
    if doc["kind"] not in SCALABLE:
        return []
    pod = doc["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def image_name(ref: str) -> str:
    """An image reference without its tag or digest (what kustomize `images:` matches)."""
    ref = ref.split("@")[0]
    head, slash, last = ref.rpartition("/")
    return head + slash + last.split(":")[0]


def render(directory: Path) -> list[Doc]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZATION_FIELDS, set(kustomization) - KUSTOMIZATION_FIELDS
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else load(path)
    docs = copy.deepcopy(docs)
    for ref in kustomization.get("patches", []):
        assert set(ref) == {"path"}, ref  # a strategic-merge patch file, its target by identity
        for patch in load(directory / ref["path"]):
            (index,) = [i for i, d in enumerate(docs) if identity(d) == identity(patch)]
            docs[index] = merge(docs[index], patch)
    for count in kustomization.get("replicas", []):
        targets = [
            d for d in docs if d["kind"] in SCALABLE and d["metadata"]["name"] == count["name"]
        ]
        assert len(targets) == 1, count
        targets[0]["spec"]["replicas"] = count["count"]
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for container in [c for d in docs for c in pod_containers(d)]:
            ref = container["image"]
            if image_name(ref) == image["name"]:
                tag = image.get("newTag") or (ref.split(":")[-1] if ":" in ref else None)
                new = image.get("newName", image["name"])
                container["image"] = f"{new}:{tag}" if tag else new
    return docs


RENDERED = {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}
ALL = [(overlay, doc) for overlay in OVERLAYS for doc in RENDERED[overlay]]


def doc_id(case: tuple[str, Doc]) -> str:
    overlay, doc = case
    return f"{overlay}:{doc['kind']}/{doc['metadata']['name']}"


def kind_of(overlay: str, kind: str) -> list[Doc]:
    return [d for d in RENDERED[overlay] if d["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> Doc:
    found = [d for d in kind_of(overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, (overlay, kind, name)
    return found[0]


def workloads(overlay: str) -> list[Doc]:
    return [d for d in RENDERED[overlay] if d["kind"] in SCALABLE]


def config(overlay: str) -> dict[str, str]:
    data: dict[str, str] = named(overlay, "ConfigMap", "switchboard-config")["data"]
    return data


def container(workload: Doc) -> Doc:
    only: Doc
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # $(VAR) in an env value


def environment(overlay: str, workload: Doc, pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it for a pod named `pod_name`:
    envFrom first (the ConfigMap; the Secret is not in the repo), then env in order, each
    $(VAR) expanded from the variables defined before it."""
    spec = container(workload)
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "switchboard-config"
            env.update(config(overlay))
    fields = {"metadata.name": pod_name, "metadata.namespace": workload["metadata"]["namespace"]}
    for var in spec.get("env", []):
        if "valueFrom" in var:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
            continue
        for ref in VAR_REF.findall(var["value"]):
            assert ref in env, f"{var['name']} uses $({ref}) before it is defined"
        env[var["name"]] = VAR_REF.sub(lambda m: env[m[1]], var["value"])
    return env


# ---------------------------------------------------------------------------------------------
# Valid, and rendered as kubectl renders it.

SCALED_OBJECT_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads(SCALED_OBJECT_SCHEMA.read_text())
)


@pytest.mark.parametrize("case", ALL, ids=doc_id)
def test_each_manifest_is_valid_against_its_schema(case: tuple[str, Doc]) -> None:
    _, doc = case
    if doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject":
        errors = [e.message for e in SCALED_OBJECT_VALIDATOR.iter_errors(doc)]
        assert not errors
        spec = doc["spec"]  # the CRD's CEL rule, which JSON Schema cannot say
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    else:  # anything else must be a Kubernetes kind: an unknown one raises SchemaNotFoundError
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_vendored_schema_is_strict() -> None:
    jsonschema.Draft202012Validator.check_schema(SCALED_OBJECT_VALIDATOR.schema)
    scaled = copy.deepcopy(named("prod", "ScaledObject", "task-svc"))
    scaled["spec"]["triggers"][0]["metdata"] = scaled["spec"]["triggers"][0].pop("metadata")
    scaled["spec"]["maxReplicaCount"] = "8"
    messages = " ".join(e.message for e in SCALED_OBJECT_VALIDATOR.iter_errors(scaled))
    assert "'metdata' was unexpected" in messages and "is not of type 'integer'" in messages


KUBECTL = shutil.which("kubectl")

if KUBECTL is not None:  # CI machines may not have it: the tests above need only Python

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_the_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
        assert KUBECTL is not None
        out = subprocess.run(
            [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        theirs = {identity(d): d for d in yaml.safe_load_all(out) if d}
        ours = {identity(d): d for d in RENDERED[overlay]}
        assert sorted(ours) == sorted(theirs)
        for key, doc in ours.items():
            assert doc == theirs[key], key


def test_every_overlay_renders_the_whole_base() -> None:
    base = {identity(d) for d in render(K8S / "base")}
    for overlay in OVERLAYS:
        assert base <= {identity(d) for d in RENDERED[overlay]}, overlay
    assert not (K8S / "kustomization.yaml").exists()  # no third, stale, entry point


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_pins_its_images(overlay: str) -> None:
    images = {c["image"] for d in workloads(overlay) for c in pod_containers(d)}
    for image in images:
        assert ":" in image.rsplit("/", 1)[-1] or "@" in image, image
        assert not image.endswith(":latest"), image
    ours = {i for i in images if image_name(i).endswith("switchboard")}
    assert len(ours) == 1, ours  # one image, one tag, for the four services


# ---------------------------------------------------------------------------------------------
# task_svc: shard owners, one pod per name, each at its own address.


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_task_svc_is_a_statefulset_that_replaces_one_pod_at_a_time(overlay: str) -> None:
    assert not [d for d in kind_of(overlay, "Deployment") if d["metadata"]["name"] == "task-svc"]
    spec = named(overlay, "StatefulSet", "task-svc")["spec"]
    # Scaling adds and removes one node at a time, each removed only once it has terminated.
    assert spec["podManagementPolicy"] == "OrderedReady"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    rolling = spec["updateStrategy"].get("rollingUpdate", {})
    assert rolling.get("maxUnavailable", 1) == 1 and rolling.get("partition", 0) == 0
    # The new node takes its shards back before the rollout stops the next one.
    assert spec["minReadySeconds"] > float(config(overlay)["TASK_HANDOFF_GRACE_S"])
    pod = spec["template"]["spec"]
    assert "lifecycle" not in container(named(overlay, "StatefulSet", "task-svc"))  # no preStop
    assert pod["terminationGracePeriodSeconds"] > 20


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_task_svc_pod_advertises_its_own_address(overlay: str) -> None:
    statefulset = named(overlay, "StatefulSet", "task-svc")
    headless = named(overlay, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    # A node's DNS name exists while it is not ready too: ownership is the lease's business.
    assert headless["spec"]["publishNotReadyAddresses"] is True
    (node_id,) = [v for v in container(statefulset)["env"] if v["name"] == "TASK_NODE_ID"]
    assert node_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (port,) = [p["containerPort"] for p in container(statefulset)["ports"] if p["name"] == "grpc"]
    for ordinal in range(3):
        pod = f"task-svc-{ordinal}"
        env = environment(overlay, statefulset, pod)
        assert env["TASK_NODE_ID"] == pod
        assert env["TASK_ADVERTISE_ADDR"] == (
            f"{pod}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
        )
        assert env["TASK_SVC_LISTEN"] == f"0.0.0.0:{port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_falls_back_to_the_task_svc_service(overlay: str) -> None:
    host, _, port = config(overlay)["TASK_SVC_ADDR"].partition(":")
    service = named(overlay, "Service", host)
    assert service["spec"].get("clusterIP") != "None"  # any ready node, not one of them
    assert service["spec"]["selector"] == {"app": "task-svc"}
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize(
    ("overlay", "replicas"),
    [("dev", "1"), ("prod", "3")],
)
def test_streams_are_replicated_on_the_nats_servers_there_are(overlay: str, replicas: str) -> None:
    assert config(overlay)["NATS_STREAM_REPLICAS"] == replicas
    for kind, name in [("StatefulSet", "task-svc"), ("Deployment", "persistence-svc")]:
        env = environment(overlay, named(overlay, kind, name), f"{name}-0")
        assert env["NATS_STREAM_REPLICAS"] == replicas
    if overlay == "dev":
        servers = named("dev", "StatefulSet", "nats")["spec"]["replicas"]
    else:
        servers = helm_values("nats-values.yaml")["config"]["cluster"]["replicas"]
    assert int(replicas) == servers


@pytest.mark.parametrize(
    ("kind", "name", "drain_s"),
    [
        ("Deployment", "gateway-svc", GatewaySettings().gateway_shutdown_grace_s),
        ("Deployment", "llm-svc", LlmSettings().llm_shutdown_grace_s),
        ("Deployment", "persistence-svc", PersistenceSettings().persistence_shutdown_grace_s),
    ],
)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_outlasts_the_drain(overlay: str, kind: str, name: str, drain_s: float) -> None:
    grace = named(overlay, kind, name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_task_svc_grace_outlasts_the_handoff_and_the_drain(overlay: str) -> None:
    settings = config(overlay)
    # Both set in the ConfigMap: the grace is sized for these values, not for a default.
    drain_s = float(settings["TASK_HANDOFF_GRACE_S"]) + float(settings["TASK_SHUTDOWN_GRACE_S"])
    assert float(settings["TASK_SHUTDOWN_GRACE_S"]) == TaskSettings().task_shutdown_grace_s
    spec = named(overlay, "StatefulSet", "task-svc")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > drain_s + 5.0  # + the lifecycle events


@pytest.mark.parametrize(
    ("kind", "name", "ready_on"),
    [
        ("StatefulSet", "task-svc", "switchboard.v1.TaskService"),
        ("Deployment", "persistence-svc", "switchboard.v1.HistoryService"),
        ("Deployment", "gateway-svc", None),
        ("Deployment", "llm-svc", None),
    ],
)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readiness_asks_the_service_entry_and_liveness_the_process(
    overlay: str, kind: str, name: str, ready_on: str | None
) -> None:
    spec = container(named(overlay, kind, name))
    assert spec["readinessProbe"]["grpc"].get("service") == ready_on
    assert "service" not in spec["livenessProbe"]["grpc"]  # "": alive


# ---------------------------------------------------------------------------------------------
# Replicas and autoscaling.


def test_dev_runs_one_of_each_and_no_autoscaler() -> None:
    for workload in workloads("dev"):
        assert workload["spec"]["replicas"] == 1, workload["metadata"]["name"]
    assert not kind_of("dev", "HorizontalPodAutoscaler") and not kind_of("dev", "ScaledObject")


def test_prod_runs_several_of_each_serving_service() -> None:
    assert named("prod", "StatefulSet", "task-svc")["spec"]["replicas"] == 3
    for name in ("gateway-svc", "llm-svc"):
        replicas = named("prod", "Deployment", name)["spec"]["replicas"]
        assert replicas >= 2, name
        assert named("prod", "PodDisruptionBudget", name)["spec"]["maxUnavailable"] < replicas
    budget = named("prod", "PodDisruptionBudget", "task-svc")["spec"]
    assert budget["maxUnavailable"] == 1  # one shard owner drains at a time
    # NATS comes from its Helm chart: task_svc is the only StatefulSet here.
    assert [d["metadata"]["name"] for d in kind_of("prod", "StatefulSet")] == ["task-svc"]


def autoscaled(overlay: str) -> list[tuple[str, str]]:
    targets = [
        (d["spec"]["scaleTargetRef"]["kind"], d["spec"]["scaleTargetRef"]["name"])
        for d in kind_of(overlay, "HorizontalPodAutoscaler") + kind_of(overlay, "ScaledObject")
    ]
    assert len(targets) == len(set(targets)), targets  # two autoscalers would fight
    return targets


def test_the_gateway_and_llm_svc_scale_on_cpu() -> None:
    hpas = kind_of("prod", "HorizontalPodAutoscaler")
    assert sorted(h["spec"]["scaleTargetRef"]["name"] for h in hpas) == ["gateway-svc", "llm-svc"]
    for hpa in hpas:
        spec = hpa["spec"]
        ref = spec["scaleTargetRef"]
        target = named("prod", ref["kind"], ref["name"])
        assert ref["apiVersion"] == target["apiVersion"]
        assert 2 <= spec["minReplicas"] == target["spec"]["replicas"] < spec["maxReplicas"]
        (metric,) = spec["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert 0 < metric["resource"]["target"]["averageUtilization"] <= 90
        # Utilization is a share of the request: every container must have one.
        assert all("cpu" in c["resources"]["requests"] for c in pod_containers(target))
    assert ("StatefulSet", "task-svc") not in [
        (h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"]) for h in hpas
    ]
    assert sorted(autoscaled("prod")) == [
        ("Deployment", "gateway-svc"),
        ("Deployment", "llm-svc"),
        ("StatefulSet", "task-svc"),
    ]


def test_task_svc_scales_on_the_lag_of_every_shard() -> None:
    scaled = named("prod", "ScaledObject", "task-svc")
    spec = scaled["spec"]
    ref = spec["scaleTargetRef"]
    statefulset = named("prod", ref["kind"], ref["name"])
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "StatefulSet")
    assert spec["minReplicaCount"] == statefulset["spec"]["replicas"] == 3
    assert spec["minReplicaCount"] < spec["maxReplicaCount"] <= min(8, shard_count())
    # Every step moves shards: scale-down waits, and then goes one node at a time.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert [p["value"] for p in behavior["scaleDown"]["policies"]] == [1]
    assert all(p["type"] == "Pods" for p in behavior["scaleDown"]["policies"])

    triggers = spec["triggers"]
    prefix = TaskSettings().task_consumer  # named as task_svc/jetstream_store.py names them
    assert sorted(t["metadata"]["consumer"] for t in triggers) == sorted(
        f"{prefix}-shard-{n}" for n in range(shard_count())
    )
    monitor_port = helm_values("nats-values.yaml")["config"]["monitor"]["port"]
    endpoint = f"{NATS_RELEASE}-headless.{NAMESPACE}.svc.cluster.local:{monitor_port}"
    for trigger in triggers:
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert meta["stream"] == JOBS_STREAM and meta["account"] == "$G"
        assert meta["natsServerMonitoringEndpoint"] == endpoint
    # The formula adds every shard's lag, each once; the target is per node.
    modifiers = spec["advanced"]["scalingModifiers"]
    names = [t["name"] for t in triggers]
    assert len(set(names)) == len(names)
    assert sorted(re.split(r"\s*\+\s*", modifiers["formula"].strip())) == sorted(names)
    assert modifiers["metricType"] == "AverageValue" and int(modifiers["target"]) > 0
    assert {t["metadata"]["lagThreshold"] for t in triggers} == {modifiers["target"]}


# ---------------------------------------------------------------------------------------------
# Resources, privileges, the image.


@pytest.mark.parametrize(("overlay", "count"), [("dev", 5), ("prod", 4)])
def test_every_container_has_requests_and_a_memory_limit(overlay: str, count: int) -> None:
    assert len(workloads(overlay)) == count  # the four services (and NATS in dev)
    for workload in workloads(overlay):
        for spec in pod_containers(workload):
            resources = spec["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), workload["metadata"]["name"]
            assert "memory" in resources["limits"], workload["metadata"]["name"]


def test_dev_asks_for_less_than_prod() -> None:
    for workload in workloads("prod"):
        name = workload["metadata"]["name"]
        dev = container(named("dev", workload["kind"], name))["resources"]["limits"]["memory"]
        prod = container(workload)["resources"]["limits"]["memory"]
        assert mebibytes(dev) < mebibytes(prod), name


def mebibytes(quantity: str) -> int:
    found = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert found, quantity
    return int(found[1]) * (1024 if found[2] == "Gi" else 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_run_unprivileged(overlay: str) -> None:
    for workload in workloads(overlay):
        if workload["metadata"]["name"] == "nats":
            continue  # the NATS image's own user
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for spec in pod_containers(workload):
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def test_one_image_built_in_stages_runs_as_a_user() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and "AS build" in stages[0]
    (base,) = [line for line in lines if line.startswith("ARG PYTHON_IMAGE=")]
    assert base.split(":")[-1].count(".") >= 2  # a release, not a moving tag like 3.11
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")


# ---------------------------------------------------------------------------------------------
# Network policies.


def policies(overlay: str) -> list[Doc]:
    return kind_of(overlay, "NetworkPolicy")


def ingress_rules(overlay: str) -> list[tuple[Doc, Doc]]:
    return [(p, rule) for p in policies(overlay) for rule in p["spec"].get("ingress", [])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_denied_unless_allowed(overlay: str) -> None:
    deny = named(overlay, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_is_reachable_from_outside(overlay: str) -> None:
    open_to_all = [
        (p["spec"]["podSelector"], r["ports"]) for p, r in ingress_rules(overlay) if "from" not in r
    ]
    assert open_to_all == [
        ({"matchLabels": {"app": "gateway-svc"}}, [{"protocol": "TCP", "port": 4000}])
    ]
    # From another namespace: Prometheus, only the services' metrics ports; and in prod KEDA,
    # only NATS's monitoring port.
    from_elsewhere = [
        (p["spec"]["podSelector"], peer, r["ports"])
        for p, r in ingress_rules(overlay)
        for peer in r.get("from", [])
        if "podSelector" not in peer or "namespaceSelector" in peer or "ipBlock" in peer
    ]
    prometheus: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] = (
        {},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        [{"protocol": "TCP", "port": port} for port in (9100, 9101, 9102, 9103)],
    )
    keda = (
        {"matchLabels": {"app": "nats"}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}},
        [{"protocol": "TCP", "port": 8222}],
    )
    assert from_elsewhere == ([prometheus, keda] if overlay == "prod" else [prometheus])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_persistence_reaches_postgresql(overlay: str) -> None:
    reaching = [
        p["metadata"]["name"]
        for p in policies(overlay)
        for rule in p["spec"].get("egress", [])
        if any(port.get("port") == 5432 for port in rule.get("ports", []))
    ]
    assert reaching == ["persistence-svc"]


def test_the_nats_servers_reach_only_each_other_on_their_routes() -> None:
    (routes,) = [
        (p, rule)
        for p, rule in ingress_rules("prod")
        if {"protocol": "TCP", "port": 6222} in rule["ports"]
    ]
    assert routes[0]["spec"]["podSelector"] == {"matchLabels": {"app": "nats"}}
    assert routes[1]["from"] == [{"podSelector": {"matchLabels": {"app": "nats"}}}]
    assert not [
        r for _, r in ingress_rules("dev") if {"protocol": "TCP", "port": 6222} in r["ports"]
    ]


# ---------------------------------------------------------------------------------------------
# NATS and PostgreSQL from their Helm charts, and the document that installs them.


def helm_values(name: str) -> Doc:
    values: Doc = yaml.safe_load((HELM / name).read_text())
    return values


def chart_version(name: str, chart: str) -> str:
    """The version a values file was written for, from its first line:
    `# chart: <repo>/<chart> <version> (...)`."""
    first = (HELM / name).read_text().splitlines()[0]
    found = re.match(rf"# chart: \S+/{chart} (\d+\.\d+\.\d+)\b", first)
    assert found, first
    return found[1]


def test_nats_runs_as_a_jetstream_cluster_of_three() -> None:
    values = helm_values("nats-values.yaml")
    nats = values["config"]
    assert nats["cluster"]["enabled"] is True and nats["cluster"]["replicas"] == 3
    jetstream = nats["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True and jetstream["fileStore"]["pvc"]["enabled"]
    assert mebibytes(jetstream["fileStore"]["pvc"]["size"]) >= 10 * 1024
    assert nats["monitor"] == {"enabled": True, "port": 8222}  # KEDA's endpoint
    # The label the NetworkPolicies select NATS pods by.
    assert values["podTemplate"]["merge"]["metadata"]["labels"] == {"app": "nats"}
    assert values["natsBox"]["enabled"] is False
    # One NATS release in dev and prod.
    image = values["container"]["image"]
    dev_image = container(named("dev", "StatefulSet", "nats"))["image"]
    assert f"{image['repository']}:{image['tag']}" == dev_image
    assert image["tag"].startswith(chart_version("nats-values.yaml", "nats"))


def test_postgresql_runs_as_a_cloudnativepg_cluster() -> None:
    values = helm_values("postgresql-values.yaml")
    assert values["type"] == "postgresql" and values["mode"] == "standalone"
    assert re.fullmatch(r"\d+", values["version"]["postgresql"])  # a major version, pinned
    cluster = values["cluster"]
    assert cluster["instances"] == 3
    assert cluster["initdb"] == {"database": "switchboard", "owner": "switchboard"}
    assert cluster["enableSuperuserAccess"] is False


def test_the_deploy_document_installs_the_pinned_charts() -> None:
    text = DOCS_DEPLOY.read_text()
    nats = chart_version("nats-values.yaml", "nats")
    assert re.search(
        rf"helm upgrade --install {NATS_RELEASE} nats/nats --version {nats} -n {NAMESPACE}", text
    )
    cluster = chart_version("postgresql-values.yaml", "cluster")
    assert re.search(rf"cnpg/cluster --version {cluster}\b", text)
    (operator,) = re.findall(
        r"operator: cnpg/cloudnative-pg (\d+\.\d+\.\d+)",
        (HELM / "postgresql-values.yaml").read_text(),
    )
    assert re.search(rf"cnpg/cloudnative-pg --version {operator}\b", text)
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in text


def test_the_deploy_document_explains_every_setting_the_manifests_give() -> None:
    text = DOCS_DEPLOY.read_text()
    names = {"SWITCHBOARD_SECRET", "SWITCHBOARD_INTERNAL_SECRET", "DATABASE_URL"}
    for overlay in OVERLAYS:
        names |= set(config(overlay))
        names |= {
            v["name"]
            for w in workloads(overlay)
            for c in pod_containers(w)
            for v in c.get("env", [])
        }
    assert "TASK_ADVERTISE_ADDR" in names
    assert sorted(n for n in names if f"`{n}`" not in text) == []
