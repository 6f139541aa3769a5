"""Every port the services and launchers listen on by default lies below the range Linux
hands out as the local port of outgoing connections (32768-60999 unless changed).

A port in that range can be taken by any client socket on the machine: one connection's
TIME_WAIT (60 s after the client side closed) on 127.0.0.1:50052 made llm_svc fail to bind
("Address already in use") when the stack restarted after a benchmark's thousands of
connections, SO_REUSEADDR notwithstanding (the client socket does not set it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from gateway_svc.config import Settings as GatewaySettings
from llm_svc.config import Settings as LlmSettings
from persistence_svc.config import Settings as PersistenceSettings
from task_svc.config import Settings as TaskSettings
from tools.cluster import ClusterConfig
from tools.stack import StackConfig

LINUX_EPHEMERAL_START = 32768
ADDRESS_PORT = re.compile(r":(\d+)$")


def ephemeral_range() -> tuple[int, int]:
    """This machine's range, or Linux's default where it cannot be read."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except OSError:
        return LINUX_EPHEMERAL_START, 60999
    return int(low), int(high)


def settings_ports(settings: type[BaseSettings]) -> dict[str, int]:
    ports = {}
    for name, field in settings.model_fields.items():
        default = field.default
        if isinstance(default, int) and name.endswith("_port"):
            ports[name] = default
        elif isinstance(default, str) and (match := ADDRESS_PORT.search(default)):
            ports[name] = int(match.group(1))
    return ports


def launcher_ports() -> dict[str, int]:
    stack, cluster = StackConfig(), ClusterConfig()
    ports = {"stack.gateway_port": stack.gateway_port, "stack.nats_port": stack.nats_port}
    ports |= {f"stack.grpc.{name}": port for name, port in stack.grpc_ports.items()}
    ports |= {f"stack.metrics.{name}": port for name, port in stack.metrics_ports.items()}
    for name in (
        "gateway_grpc_ports",
        "task_ports",
        "llm_ports",
        "nats_ports",
        "nats_cluster_ports",
        "nats_monitor_ports",
    ):
        for i, port in enumerate(getattr(cluster, name)):
            ports[f"cluster.{name}[{i}]"] = port
    ports["cluster.persistence_port"] = cluster.persistence_port
    return ports


DEFAULT_PORTS = {
    **{f"gateway.{k}": v for k, v in settings_ports(GatewaySettings).items()},
    **{f"task.{k}": v for k, v in settings_ports(TaskSettings).items()},
    **{f"llm.{k}": v for k, v in settings_ports(LlmSettings).items()},
    **{f"persistence.{k}": v for k, v in settings_ports(PersistenceSettings).items()},
    **launcher_ports(),
}


def test_the_services_listening_addresses_are_all_found() -> None:
    # The search below must see each service's gRPC address, or it proves nothing.
    for name in (
        "gateway.gateway_grpc_listen",
        "task.task_svc_listen",
        "llm.llm_svc_listen",
        "persistence.history_svc_listen",
        "gateway.gateway_port",
    ):
        assert name in DEFAULT_PORTS


@pytest.mark.parametrize("name", sorted(DEFAULT_PORTS))
def test_default_port_is_outside_the_ephemeral_range(name: str) -> None:
    low, high = ephemeral_range()
    port = DEFAULT_PORTS[name]
    assert port < min(low, LINUX_EPHEMERAL_START), (
        f"{name} = {port} is in the local port range {low}-{high}"
    )
