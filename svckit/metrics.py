"""Prometheus metrics for any service: an exporter started from one `host:port` setting.

Each service names the setting `<SERVICE>_METRICS_LISTEN` (e.g. GATEWAY_METRICS_LISTEN) and
passes its value here. Empty (the default everywhere) means no exporter: nothing is bound, so
services started side by side on one machine never collide on a metrics port. `host:0`
binds a free port (read `.port`; it is logged). The exporter serves `/metrics` in text format
from prometheus_client's own daemon thread, so it keeps answering even when the service's
event loop is busy.

Metrics themselves are plain prometheus_client objects. A service that may be instantiated
more than once in a process (tests) builds them on its own `CollectorRegistry` and exports that
registry; `REGISTRY` (the process default, which also holds the process and GC collectors) is
the default.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsConfigError(ValueError):
    """A `<SERVICE>_METRICS_LISTEN` value that is not `host:port`."""


def parse_listen(listen: str) -> tuple[str, int]:
    """`"127.0.0.1:9100"` → `("127.0.0.1", 9100)`; `"[::1]:9100"` → `("::1", 9100)`."""
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsConfigError(f"metrics listen address must be host:port, not {listen!r}")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port)


@dataclass
class MetricsExporter:
    """A running `/metrics` endpoint; `close()` stops it (idempotent)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread
    _closed: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()  # returns once serve_forever has stopped
        self._server.server_close()
        self._thread.join()


def start_exporter(
    listen: str | None, registry: CollectorRegistry = REGISTRY, *, service: str = ""
) -> MetricsExporter | None:
    """Serve `registry` on `listen` (`host:port`); None when `listen` is empty (off).
    Binding happens here, so a taken port fails the service's start-up, as it should."""
    if not listen or not listen.strip():
        return None
    host, port = parse_listen(listen)
    server, thread = start_http_server(port, host, registry)
    bound = int(server.server_port)
    exporter = MetricsExporter(host, bound, server, thread)
    log.info("metrics exporter listening", extra={"service": service, "url": exporter.url})
    return exporter


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The current value of one sample (0.0 when it does not exist yet), for tests and
    benchmarks that read a registry without scraping it."""
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value
