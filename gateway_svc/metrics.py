"""The gateway's Prometheus metrics, on one registry per `Gateway` (tests build several).

Label values come from small fixed sets (never a user id, topic or token), so cardinality is
bounded whatever clients send.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway_svc.channels import LIMIT_CHANNELS as LIMIT_CHANNELS  # GATEWAY_MAX_CHANNELS

# `limit` label values of gateway_limit_hits_total: one per configured limit.
LIMIT_FRAME_SIZE = "frame_size"  # GATEWAY_MAX_FRAME_BYTES: closed with 1009
LIMIT_PROMPT_SIZE = "prompt_size"  # GATEWAY_MAX_PROMPT_CHARS: error reply invalid_request
LIMIT_CONNECTIONS = "connections_per_user"  # GATEWAY_MAX_CONNECTIONS_PER_USER: HTTP 403
LIMIT_GENERATE_RATE = "generate_rate"  # GATEWAY_GENERATE_RATE_PER_S/_BURST: rate_limited
LIMIT_SOCKET_EVENTS = "socket_events"  # GATEWAY_SOCKET_EVENTS_PER_S/_BURST: rate_limited
LIMIT_OUTBOUND_QUEUE = "outbound_queue"  # GATEWAY_OUTBOUND_MAX_*: closed with 1008

# `reason` label values of gateway_connects_refused_total.
REFUSED_MISSING_TOKEN = "missing_token"
REFUSED_INVALID_TOKEN = "invalid_token"
REFUSED_EXPIRED_TOKEN = "expired_token"
REFUSED_VSN = "unsupported_vsn"
REFUSED_TOO_MANY = "too_many_connections"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Gauge("gateway_connections", "Open sockets.", registry=r)
        self.channels = Gauge("gateway_channels", "Joined task channels.", registry=r)
        self.connects = Counter("gateway_connects", "Accepted socket connects.", registry=r)
        self.refused = Counter(
            "gateway_connects_refused",
            "Socket connects refused with HTTP 403, by reason.",
            ["reason"],
            registry=r,
        )
        self.bad_frames = Counter(
            "gateway_bad_frames",
            "Undecodable frames (the socket is closed), by kind.",
            ["kind"],
            registry=r,
        )
        self.limit_hits = Counter(
            "gateway_limit_hits", "Requests refused by a configured limit.", ["limit"], registry=r
        )
        self.rate_limited = Counter(
            "gateway_rate_limited_pushes",
            "llm_generate pushes answered rate_limited, by who refused (gateway or task_svc).",
            ["source"],
            registry=r,
        )
        self.slow_consumer_closes = Counter(
            "gateway_slow_consumer_closes",
            "Sockets closed with 1008 because their outbound queue overflowed.",
            registry=r,
        )
        self.coalesced = Counter(
            "gateway_coalesced_pushes",
            "progress pushes replaced by a later one before a slow socket could take them.",
            registry=r,
        )
        self.idle_closes = Counter(
            "gateway_idle_closes", "Sockets closed with 1001 for silence.", registry=r
        )
        self.expired_closes = Counter(
            "gateway_expired_closes", "Sockets closed with 1008: their token expired.", registry=r
        )
        self.joins = Counter(
            "gateway_joins", "phx_join replies, by status.", ["status"], registry=r
        )
        self.generates = Counter(
            "gateway_generates", "llm_generate replies, by status.", ["status"], registry=r
        )
        self.channel_crashes = Counter(
            "gateway_channel_crashes", "phx_error sent (a channel failed).", registry=r
        )
        self.pushes = Counter(
            "gateway_pushes", "Task events pushed to sockets, by event.", ["event"], registry=r
        )
        self._pushed: dict[str, Any] = {}

    def limit(self, name: str) -> None:
        self.limit_hits.labels(name).inc()

    def pushed(self, event: str) -> None:
        """Count one push; called for every event, so the labelled child is kept (`labels`
        takes a lock and a lookup each time)."""
        child = self._pushed.get(event)
        if child is None:
            child = self._pushed[event] = self.pushes.labels(event)
        child.inc()
