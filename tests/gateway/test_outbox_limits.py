"""The sans-I/O parts of the limits: the outbound queue, the per-user counters and buckets,
and svckit's metrics exporter."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway_svc.limits import ConnectionCounter, RateLimiter
from gateway_svc.outbox import Outbox, Overflow
from gateway_svc.task_payloads import coalescable
from svckit.metrics import MetricsConfigError, parse_listen, sample, start_exporter


def drain(box: Outbox) -> list[bytes]:
    out = []
    while (data := box.pop()) is not None:
        out.append(data)
    return out


def test_progress_is_coalesced_latest_wins_and_order_is_kept() -> None:
    box = Outbox(max_frames=10, max_bytes=1000)
    assert not box.put(b"p1", "task:a")
    assert not box.put(b"c2")
    assert box.put(b"p3", "task:a")  # replaces p1, goes behind c2
    assert not box.put(b"q4", "task:b")  # another channel's progress stays
    assert drain(box) == [b"c2", b"p3", b"q4"]
    assert box.bytes == 0 and len(box) == 0


def test_unkeyed_frames_are_never_dropped_and_overflow_raises() -> None:
    box = Outbox(max_frames=3, max_bytes=1000)
    for frame in (b"a", b"b", b"c"):
        box.put(frame)
    with pytest.raises(Overflow):
        box.put(b"d")
    bytes_box = Outbox(max_frames=100, max_bytes=10)
    bytes_box.put(b"x" * 6)
    with pytest.raises(Overflow):
        bytes_box.put(b"y" * 6)


def test_one_large_frame_alone_goes_through() -> None:
    box = Outbox(max_frames=4, max_bytes=10)
    box.put(b"z" * 100)
    assert drain(box) == [b"z" * 100]


def test_a_popped_progress_is_not_replaced_later() -> None:
    box = Outbox(max_frames=4, max_bytes=100)
    box.put(b"p1", "t")
    assert box.pop() == b"p1"
    assert not box.put(b"p2", "t")
    assert drain(box) == [b"p2"]


def test_only_non_terminal_progress_coalesces() -> None:
    assert coalescable("progress", {"status": "processing", "progress": 0.5})
    assert coalescable("progress", {"status": "queued", "position": 3})
    assert not coalescable("progress", {"status": "cancelled"})
    for event in ("chunk", "llm_response", "error", "phx_reply", "phx_close"):
        assert not coalescable(event, {"status": "processing"})


def test_connection_counter_frees_users_at_zero() -> None:
    counter = ConnectionCounter(limit=2)
    assert counter.acquire("a") and counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a")
    for user in ("a", "a", "b"):
        counter.release(user)
    assert counter.open == {}
    unlimited = ConnectionCounter(limit=0)
    assert all(unlimited.acquire("a") for _ in range(100))


def test_token_bucket_burst_refill_and_retry_after() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("u", 0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.take("u", 0.0) == 500  # one token comes back in 0.5 s
    assert limiter.take("u", 0.25) == 250
    assert limiter.take("u", 0.5) == 0
    assert limiter.take("other", 0.5) == 0  # per key
    assert limiter.take("u", 100.0) == 0  # never more than the burst after a long pause
    assert limiter.take("u", 100.0) == 0
    assert limiter.take("u", 100.0) == 0
    assert limiter.take("u", 100.0) > 0


def test_full_buckets_are_pruned_and_a_zero_rate_disables() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    for user in range(50):
        limiter.take(f"user{user}", 0.0)
    limiter.take("busy", 9.0)
    limiter.take("busy", 9.0)
    limiter.prune(10.0)
    assert list(limiter.buckets) == ["busy"]
    off = RateLimiter(rate=0.0, burst=1)
    assert all(off.take("u", 0.0) == 0 for _ in range(100))
    assert off.buckets == {}


def test_what_other_replicas_hold_and_spend_counts_here() -> None:
    counter = ConnectionCounter(3)
    assert counter.acquire("alice", elsewhere=2)
    assert not counter.acquire("alice", elsewhere=2)  # 1 here + 2 elsewhere
    limiter = RateLimiter(rate=1.0, burst=5)
    limiter.charge("alice", 4, now=0.0)  # spent on another replica
    assert limiter.take("alice", 0.0) == 0 and limiter.take("alice", 0.0) == 1000
    limiter.charge("alice", 100, now=0.0)  # a flood elsewhere: the debt is one burst at most
    assert limiter.take("alice", 0.0) == 6000


def test_exporter_serves_a_registry_and_is_off_by_default() -> None:
    assert start_exporter("") is None
    assert start_exporter(None) is None
    registry = CollectorRegistry()
    hits = Counter("demo_hits", "Hits.", ["kind"], registry=registry)
    hits.labels("x").inc(3)
    assert sample(registry, "demo_hits_total", kind="x") == 3
    assert sample(registry, "demo_hits_total", kind="y") == 0
    exporter = start_exporter("127.0.0.1:0", registry, service="test")
    assert exporter is not None and exporter.port > 0
    try:
        with urllib.request.urlopen(exporter.url, timeout=5) as response:
            body = response.read().decode()
        assert 'demo_hits_total{kind="x"} 3.0' in body
    finally:
        exporter.close()
        exporter.close()  # idempotent


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9100") == ("0.0.0.0", 9100)
    for bad in ("9100", "host:", "host:x", "host:70000"):
        with pytest.raises(MetricsConfigError):
            parse_listen(bad)
