"""llm_svc assembled: settings → HTTP clients and providers → catalogue → guards (circuit
breakers, rate limits), quota, cache → generator → gRPC server; with NATS_URL, the limits
and quotas are shared with the other replicas (fleet.py). Metrics (metrics.py) are counted
on `.metrics.registry`; serving them on /metrics is `__main__`'s (LLM_METRICS_LISTEN).

`LlmServer` is what `__main__` runs, and what other services' tests can start in-process
(`LlmServer(Settings(llm_svc_listen="127.0.0.1:0", local_model_token_delay_ms=0))`).
"""

from __future__ import annotations

import logging

import grpc

from llm_svc.breaker import Breakers
from llm_svc.cache import MemoryResponseCache
from llm_svc.catalogue import Catalogue
from llm_svc.coalesce import Window
from llm_svc.config import Settings
from llm_svc.fleet import Fleet
from llm_svc.generation import Generator
from llm_svc.limits import RateLimiter
from llm_svc.metrics import LlmMetrics
from llm_svc.policy import RetryPolicy
from llm_svc.providers.registry import HttpClients, build_providers, key_ids
from llm_svc.quota import DailyQuota
from llm_svc.service import SERVICE_NAME, LlmServicer
from svckit.grpc_server import GrpcServer
from switchboard.v1 import llm_pb2_grpc

log = logging.getLogger(__name__)


class LlmServer:
    """`__init__` does no I/O; `start()` binds (`.port`); `shutdown()` is ordered and
    idempotent: NOT_SERVING and refuse new calls, let running generations finish for the
    grace period, cancel the rest (which aborts their provider requests), close providers
    and the HTTP clients."""

    def __init__(self, settings: Settings, metrics: LlmMetrics | None = None) -> None:
        self.settings = settings
        # Its own registry unless given one (__main__ gives the process-wide one); the
        # exporter is __main__'s too: tests start many servers in one process.
        self.metrics = metrics if metrics is not None else LlmMetrics()
        self.http = HttpClients(settings)
        self.providers = build_providers(settings, self.http)
        self.catalogue = Catalogue.load(
            settings.llm_models_file, self.providers.keys(), settings.llm_default_model
        ).with_provider_limits(settings.llm_provider_limits)
        retry = RetryPolicy(
            max_attempts=settings.llm_retry_max_attempts,
            base_delay_s=settings.llm_retry_base_delay_ms / 1000,
            max_delay_s=settings.llm_retry_max_delay_ms / 1000,
            deadline_s=settings.llm_retry_deadline_s,
        )
        # The breaker first: a provider known to be down costs no rate-limit budget.
        self.breakers = Breakers(settings.llm_breaker_failures, settings.llm_breaker_reset_s)
        self.metrics.watch_breakers(self.breakers, sorted(self.providers))
        self.limiter = RateLimiter(
            self.catalogue.limits_for,
            key_ids(self.providers),
            max_wait_s=settings.llm_rate_limit_max_wait_ms / 1000,
            on_wait=self.metrics.rate_limit_waited,
            on_refusal=self.metrics.rate_limit_refused,
        )
        self.quota = DailyQuota(settings.llm_user_daily_requests, settings.llm_user_daily_tokens)
        self.fleet: Fleet | None = None
        if settings.nats_url:
            self.fleet = Fleet(
                settings.nats_url, settings.nats_stream_replicas, self.limiter, self.quota
            )
        self.cache = MemoryResponseCache(settings.llm_cache_max_entries, settings.llm_cache_ttl_s)
        self.generator = Generator(
            self.catalogue,
            self.providers,
            retry=retry,
            guards=[self.breakers, self.limiter],
            cache=self.cache,
            quota=self.quota,
            metrics=self.metrics,
        )
        self.servicer = LlmServicer(
            self.generator,
            self.catalogue,
            window=Window(
                settings.llm_coalesce_ms / 1000,
                settings.llm_coalesce_events_per_s,
                settings.llm_coalesce_max_ms / 1000,
            ),
            breakers=self.breakers,
            providers=sorted(self.providers),
        )
        self.grpc = GrpcServer(settings.llm_svc_listen, self._register, [SERVICE_NAME])
        self._stopped = False

    def _register(self, server: grpc.aio.Server) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self.servicer, server)

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self) -> None:
        await self.grpc.start()
        if self.fleet is not None:
            self.fleet.start()
        log.info(
            "llm_svc ready",
            extra={
                "models": list(self.catalogue.models),
                "default_model": self.catalogue.default_model,
                "providers": sorted(self.providers),
            },
        )

    async def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.stop(self.settings.llm_shutdown_grace_s)
        await self.servicer.settle()
        if self.fleet is not None:
            await self.fleet.close()
        for provider in self.providers.values():
            await provider.aclose()
        await self.http.aclose()
