"""llm_svc's Prometheus metrics, on one registry per `LlmServer` (tests start several).

Counted per provider call and per generation, never per token: a labelled child is looked up
once per (provider, model) and kept (`labels()` takes a lock and a lookup each time). Label
values come from the catalogue (provider and model ids) and from the error table
(svckit/errors.py reasons), never from a request, so cardinality is bounded whatever callers
send. The breakers' states are read when scraped (`BreakerStates`), not kept in step.

- `switchboard_provider_requests_total{provider,model,outcome}`: calls that passed the guards
  (so reached the provider); outcome `ok`, else the error's reason (`rate_limited`,
  `overloaded`, `timeout`, `network`, ..., `cancelled` when the caller left);
- `switchboard_provider_latency_seconds{provider,model,phase}`: successful calls, time to the
  first text (`first_token`) and to the end (`total`), our own rate-limit wait excluded;
- `switchboard_breaker_state{provider}`: 0 closed, 1 half-open, 2 open;
- `switchboard_rate_limit_waits_total{provider}` / `_refusals_total{provider}`: calls that
  queued for our own rpm/tpm buckets, and calls they refused (RATE_LIMITED before calling);
- `switchboard_quota_refusals_total`: generations refused for a spent daily user quota;
- `switchboard_fallbacks_total{model}`: answers by a fallback model (`model` took over);
- `switchboard_cache_answers_total{model}`: answers the response cache stood in for;
- `switchboard_generations_active`: generations running a model chain.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from llm_svc.breaker import Breakers, State
from llm_svc.catalogue import ModelEntry
from svckit.errors import ServiceError

OK = "ok"
CANCELLED = "cancelled"  # the caller left (or the server stopped) mid-call
INTERNAL = "internal"  # anything but a ServiceError: a bug in a provider
PHASE_FIRST_TOKEN = "first_token"
PHASE_TOTAL = "total"
# From a quick first token to a long answer at the default 600 s deadline.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
BREAKER_VALUES = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


def outcome_of(error: BaseException) -> str:
    """The `outcome` label of a call that raised `error`."""
    if isinstance(error, ServiceError):
        return error.reason
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return CANCELLED
    return INTERNAL


class _Series:
    """The children of one (provider, model), looked up once; outcomes as they come."""

    __slots__ = ("first_token", "model", "outcomes", "provider", "total")

    def __init__(self, metrics: LlmMetrics, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.first_token = metrics.latency.labels(provider, model, PHASE_FIRST_TOKEN)
        self.total = metrics.latency.labels(provider, model, PHASE_TOTAL)
        self.outcomes: dict[str, Any] = {}


class ProviderCall:
    """One provider call, as a context manager around it: leaving it without an exception
    is a success (the generator raises when a stream ends without its finish)."""

    __slots__ = ("_first", "_metrics", "_series", "_started")

    def __init__(self, metrics: LlmMetrics, series: _Series) -> None:
        self._metrics = metrics
        self._series = series
        self._started = 0.0
        self._first: float | None = None

    def __enter__(self) -> ProviderCall:
        self._started = time.perf_counter()
        return self

    def first_token(self) -> None:
        """The call's first text arrived (called once per call, not per token)."""
        self._first = time.perf_counter()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self._succeeded()
        self._metrics.count_call(self._series, OK if error is None else outcome_of(error))

    def _succeeded(self) -> None:
        now = time.perf_counter()
        self._series.total.observe(now - self._started)
        # An answer without text has no first token to time.
        if self._first is not None:
            self._series.first_token.observe(self._first - self._started)


@dataclass
class ProviderTotals:
    """One provider's calls since this registry started, summed over its models: what
    ListProviders reports (llm_svc/service.py)."""

    requests: int = 0
    errors: int = 0  # calls that failed (a caller leaving, `cancelled`, is no failure)
    first_token_sum_s: float = 0.0
    first_token_count: int = 0
    total_sum_s: float = 0.0
    total_count: int = 0

    @property
    def mean_first_token_s(self) -> float:
        return self.first_token_sum_s / self.first_token_count if self.first_token_count else 0.0

    @property
    def mean_total_s(self) -> float:
        return self.total_sum_s / self.total_count if self.total_count else 0.0


class BreakerStates:
    """A collector: each provider's breaker state, read when scraped (from the exporter's
    thread: `Breakers.states` copies the table in one step). Configured providers not
    called yet read closed, so a dashboard has a line for each from the start."""

    def __init__(self, breakers: Breakers, providers: Sequence[str]) -> None:
        self.breakers = breakers
        self.providers = tuple(providers)

    def describe(self) -> Iterable[Metric]:
        # Without it, registering would call `collect` (on the process-wide registry).
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        states = dict.fromkeys(self.providers, State.CLOSED)
        states.update(self.breakers.states())
        family = self._family()
        for provider, state in sorted(states.items()):
            family.add_metric([provider], BREAKER_VALUES[state])
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "switchboard_breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open (next call probes), 2 open.",
            labels=["provider"],
        )


class LlmMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "switchboard_provider_requests",
            "Provider calls (past our guards), by outcome: ok or the error's reason.",
            ["provider", "model", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "switchboard_provider_latency_seconds",
            "Successful provider calls: time to the first text, and in all.",
            ["provider", "model", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rate_limit_waits = Counter(
            "switchboard_rate_limit_waits",
            "Calls that waited for our own rpm/tpm limits before calling.",
            ["provider"],
            registry=r,
        )
        self.rate_limit_refusals = Counter(
            "switchboard_rate_limit_refusals",
            "Calls refused by our own rpm/tpm limits (RATE_LIMITED before calling).",
            ["provider"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "switchboard_quota_refusals",
            "Generations refused: the user's daily quota is spent.",
            registry=r,
        )
        self.fallbacks = Counter(
            "switchboard_fallbacks",
            "Answers by a fallback model of the chain (the model that took over).",
            ["model"],
            registry=r,
        )
        self.cache_answers = Counter(
            "switchboard_cache_answers",
            "Answers the response cache gave for a failing chain (the model it had kept).",
            ["model"],
            registry=r,
        )
        self.active = Gauge(
            "switchboard_generations_active", "Generations running a model chain.", registry=r
        )
        self._series: dict[tuple[str, str], _Series] = {}
        self._children: dict[tuple[Counter, str], Any] = {}

    def watch_breakers(self, breakers: Breakers, providers: Sequence[str]) -> None:
        """Report `breakers` as `switchboard_breaker_state` (once per registry)."""
        self.registry.register(BreakerStates(breakers, providers))

    def call(self, model: ModelEntry) -> ProviderCall:
        """A context manager around one provider call of `model`."""
        key = (model.provider, model.id)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, model.provider, model.id)
        return ProviderCall(self, series)

    def count_call(self, series: _Series, outcome: str) -> None:
        child = series.outcomes.get(outcome)
        if child is None:
            child = self.requests.labels(series.provider, series.model, outcome)
            series.outcomes[outcome] = child
        child.inc()

    def provider_totals(self) -> dict[str, ProviderTotals]:
        """Each called provider's totals, read off the counters themselves (no second tally
        to keep in step on the hot path: an admin call may pay for the `collect`)."""
        totals: defaultdict[str, ProviderTotals] = defaultdict(ProviderTotals)
        for metric in self.requests.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    t = totals[s.labels["provider"]]
                    t.requests += int(s.value)
                    if s.labels["outcome"] not in (OK, CANCELLED):
                        t.errors += int(s.value)
        for metric in self.latency.collect():
            for s in metric.samples:
                t = totals[s.labels["provider"]]
                first = s.labels["phase"] == PHASE_FIRST_TOKEN
                if s.name.endswith("_sum"):
                    if first:
                        t.first_token_sum_s += s.value
                    else:
                        t.total_sum_s += s.value
                elif s.name.endswith("_count"):
                    if first:
                        t.first_token_count += int(s.value)
                    else:
                        t.total_count += int(s.value)
        return dict(totals)

    def rate_limit_waited(self, provider: str) -> None:
        self._child(self.rate_limit_waits, provider).inc()

    def rate_limit_refused(self, provider: str) -> None:
        self._child(self.rate_limit_refusals, provider).inc()

    def quota_refused(self) -> None:
        self.quota_refusals.inc()

    def fell_back(self, model: str) -> None:
        self._child(self.fallbacks, model).inc()

    def cache_answered(self, model: str) -> None:
        self._child(self.cache_answers, model).inc()

    def _child(self, counter: Counter, label: str) -> Any:
        child = self._children.get((counter, label))
        if child is None:
            child = self._children[(counter, label)] = counter.labels(label)
        return child
