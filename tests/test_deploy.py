"""deploy/k8s, checked offline: every manifest the Kustomize base lists is valid against the
Kubernetes API's own schemas (kubernetes-validate, strict: no unknown fields), and says what
the services need: one task_svc at a time, probes that ask the right health entry, a grace
longer than each service's drain, resources, and network policies under which only the
gateway is reachable from outside and only persistence_svc reaches PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway_svc.config import Settings as GatewaySettings
from llm_svc.config import Settings as LlmSettings
from persistence_svc.config import Settings as PersistenceSettings
from task_svc.config import Settings as TaskSettings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
Doc = dict[str, Any]


def documents() -> list[Doc]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # Only `resources`: what `kubectl kustomize` renders is then these files as they are.
    assert set(kustomization) == {"apiVersion", "kind", "resources"}
    docs: list[Doc] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


DOCS = documents()


def named(kind: str, name: str) -> Doc:
    found = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def containers(workload: Doc) -> list[Doc]:
    return list(workload["spec"]["template"]["spec"]["containers"])


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_each_manifest_is_valid_against_the_kubernetes_schemas(doc: Doc) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_task_svc_never_runs_twice() -> None:
    assert not [
        d for d in DOCS if d["kind"] == "Deployment" and d["metadata"]["name"] == "task-svc"
    ]
    spec = named("StatefulSet", "task-svc")["spec"]
    assert spec["replicas"] == 1 and spec["podManagementPolicy"] == "OrderedReady"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert named("Service", spec["serviceName"])["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize(
    ("kind", "name", "ready_on"),
    [
        ("StatefulSet", "task-svc", "switchboard.v1.TaskService"),
        ("Deployment", "persistence-svc", "switchboard.v1.HistoryService"),
        ("Deployment", "gateway-svc", None),
        ("Deployment", "llm-svc", None),
    ],
)
def test_readiness_asks_the_service_entry_and_liveness_the_process(
    kind: str, name: str, ready_on: str | None
) -> None:
    (container,) = containers(named(kind, name))
    assert container["readinessProbe"]["grpc"].get("service") == ready_on
    assert "service" not in container["livenessProbe"]["grpc"]  # "": alive


@pytest.mark.parametrize(
    ("kind", "name", "drain_s"),
    [
        ("StatefulSet", "task-svc", TaskSettings().task_shutdown_grace_s + 5.0),
        ("Deployment", "gateway-svc", GatewaySettings().gateway_shutdown_grace_s),
        ("Deployment", "llm-svc", LlmSettings().llm_shutdown_grace_s),
        ("Deployment", "persistence-svc", PersistenceSettings().persistence_shutdown_grace_s),
    ],
)
def test_the_grace_outlasts_the_drain(kind: str, name: str, drain_s: float) -> None:
    grace = named(kind, name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain_s


def test_gateways_run_as_several_replicas() -> None:
    gateway = named("Deployment", "gateway-svc")["spec"]
    assert gateway["replicas"] >= 2  # their limits are shared over NATS
    budget = named("PodDisruptionBudget", "gateway-svc")["spec"]
    assert budget["maxUnavailable"] < gateway["replicas"]


def test_every_container_has_requests_and_a_memory_limit() -> None:
    workloads = [d for d in DOCS if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 5
    for workload in workloads:
        for container in containers(workload):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), workload["metadata"]["name"]
            assert "memory" in resources["limits"], workload["metadata"]["name"]


def policies() -> list[Doc]:
    return [d for d in DOCS if d["kind"] == "NetworkPolicy"]


def test_everything_is_denied_unless_allowed() -> None:
    deny = named("NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny


def test_only_the_gateway_is_reachable_from_outside() -> None:
    open_to_all = [
        p["spec"]["podSelector"]
        for p in policies()
        for rule in p["spec"].get("ingress", [])
        if "from" not in rule
    ]
    assert open_to_all == [{"matchLabels": {"app": "gateway-svc"}}]
    (rule,) = named("NetworkPolicy", "gateway-svc")["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 4000}]


def test_only_persistence_reaches_postgresql() -> None:
    reaching = [
        p["metadata"]["name"]
        for p in policies()
        for rule in p["spec"].get("egress", [])
        if any(port.get("port") == 5432 for port in rule.get("ports", []))
    ]
    assert reaching == ["persistence-svc"]


def test_one_image_built_in_stages_runs_as_a_user() -> None:
    lines = (K8S.parent / "Dockerfile").read_text().splitlines()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and "AS build" in stages[0]
    (base,) = [line for line in lines if line.startswith("ARG PYTHON_IMAGE=")]
    assert base.split(":")[-1].count(".") >= 2  # a release, not a moving tag like 3.11
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")


def test_the_services_run_unprivileged() -> None:
    for workload in [d for d in DOCS if d["kind"] in ("Deployment", "StatefulSet")]:
        if workload["metadata"]["name"] == "nats":
            continue  # the NATS image's own user
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
