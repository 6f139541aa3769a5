"""The gateway's Prometheus metrics, on one registry per `Gateway` (tests build several).

Label values come from small fixed sets (never a user id, topic or token; a model is one the
catalogue resolved), so cardinality is bounded whatever clients send. The `switchboard_*`
names are the ones dashboards and alerts rely on (deploy/monitoring/). Frames are counted in
plain integers and exported at scrape time: a Counter's lock per frame would be the costliest
thing a frame does here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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


ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Gauge("switchboard_sockets", "Open sockets.", registry=r)
        self.channels = Gauge("switchboard_channels", "Joined task channels.", registry=r)
        self.ack = Histogram(
            "switchboard_ack_seconds",
            "llm_generate push to its reply (accepted or refused), in the gateway.",
            buckets=ACK_BUCKETS,
            registry=r,
        )
        self.ack_store = Histogram(
            "switchboard_ack_store_seconds",
            "The part of an llm_generate's ack spent storing its job from the gateway "
            "(direct_submit.py: the model resolved, the publish, its PubAck).",
            buckets=ACK_BUCKETS,
            registry=r,
        )
        self.first_chunk = Histogram(
            "switchboard_first_chunk_seconds",
            "Accepted llm_generate to the task's first chunk pushed, by model.",
            ["model"],
            buckets=STREAM_BUCKETS,
            registry=r,
        )
        self.generation = Histogram(
            "switchboard_generation_seconds",
            "Accepted llm_generate to the task's end pushed (answer or error), by model.",
            ["model"],
            buckets=STREAM_BUCKETS,
            registry=r,
        )
        self.closes = Counter(
            "switchboard_socket_closes",
            "Sockets closed, by WebSocket close code (1006: dropped without one).",
            ["code"],
            registry=r,
        )
        self.frames_in = 0  # exported by _FrameCounts
        self.frames_out = 0
        r.register(_FrameCounts(self))
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


class _FrameCounts(Collector):
    """`switchboard_frames_total{direction}` from the gateway's plain frame counters."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        frames = CounterMetricFamily(
            "switchboard_frames", "WebSocket frames, by direction.", labels=["direction"]
        )
        frames.add_metric(["in"], self.metrics.frames_in)
        frames.add_metric(["out"], self.metrics.frames_out)
        yield frames
