"""A grpc.aio server with standard health checking (grpc.health.v1) and reflection."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from svckit import service_auth
from svckit.service_auth import AuthenticatedChannel, CallerCheck, Minter, internal_secret

log = logging.getLogger(__name__)

# Server streams (Watch, Generate) can be long; keepalive lets both ends notice a dead peer.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # A peer that restarts is found again within a second or two: gRPC's default reconnect
    # backoff grows to two minutes, which would hold every task back that long.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # A peer that restarts is found again within a second or two: gRPC's default reconnect
    # backoff grows to two minutes, which would hold every task back that long.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # A target of several addresses (`ipv4:127.0.0.1:7052,127.0.0.1:7062`, as `make
    # cluster` gives task_svc for its two llm_svc) gets a connection to each, and each new
    # call goes to the next ready one; one that is down is skipped. gRPC's default
    # (pick_first) would send everything to the first address while it is up. With one
    # address it is the same as pick_first, except that a lost connection is made again at
    # once rather than at the next call.
    ("grpc.lb_policy_name", "round_robin"),
]


class GrpcServer:
    """Owns a grpc.aio server and its health servicer.

    `start()` binds (port 0 picks a free port, see `.port`) and reports SERVING;
    `stop(grace)` reports NOT_SERVING first, so load balancers stop sending, then
    lets in-flight calls finish for `grace` seconds.

    Two kinds of entry: "" says the process is alive and serving (a liveness probe's), the
    service names say whether it can do its work, which `set_ready` follows as a hard
    dependency (JetStream for task_svc, the database for persistence_svc's HistoryService)
    goes and comes back (a readiness probe's): restarting the process would not bring it back.
    """

    def __init__(
        self,
        address: str,
        register: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
    ) -> None:
        self.address = address
        self.service_names = list(service_names)
        # Every call but health checking and reflection needs a service token.
        self.server = grpc.aio.server(
            options=SERVER_OPTIONS, interceptors=[CallerCheck(internal_secret())]
        )
        self.health = health.aio.HealthServicer()
        register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self._stopping = False

    async def start(self) -> None:
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {self.address}")
        await self.server.start()
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("grpc serving", extra={"address": self.address, "port": self.port})

    async def set_ready(self, ready: bool, names: Sequence[str] | None = None) -> None:
        """Report `names` (default: every service name) SERVING or NOT_SERVING; "" is left
        as it is."""
        if self._stopping:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.service_names if names is None else names:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)

    async def _set_all(self, status: int) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


def insecure_channel(target: str, *, caller: str | None = None) -> grpc.aio.Channel:
    """A channel whose every call carries a service token for `caller` (default: this
    process's service, `service_auth.CALLER`).

    Each channel has its own connection (gRPC's global subchannel pool would share one
    between channels to the same target): its calls get their own HTTP/2 flow control
    window, so they never wait behind another channel's streaming traffic, and a channel
    made for a node that came back at an old address never inherits another channel's
    failed connection to the one before it (which would fail its first calls at once)."""
    options: list[tuple[str, int | str]] = [
        *CHANNEL_OPTIONS,
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channel = grpc.aio.insecure_channel(target, options=options)
    minter = Minter(caller or service_auth.CALLER, internal_secret())
    return AuthenticatedChannel(channel, minter)
