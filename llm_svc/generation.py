"""Turns a GenerateRequest into the GenerateEvent stream of llm.proto.

Per request: resolve the model chain (the model, then its offered fallbacks); admit it
against the user's daily quota; for each model, attempt the provider call through the guards
(circuit breaker, rate limits), retrying per `RetryPolicy`; stream deltas and progress; end
with exactly one `final` or one `error`. When every model failed, a cached answer of the
chain may stand in (`from_cache`); without one, the request gets `unavailable` (retryable).
Retries and fallbacks happen only before the first delta: once text went out, a failure ends
the stream with an error (the caller holds text it cannot take back; task_svc retries the
whole job).

Domain failures (unknown model, bad request, provider errors) are `error` events, never a
gRPC status: the stream always ends cleanly with its terminal event. Cancellation (the caller
closing the generator, or cancelling the task iterating it) closes the provider stream at
once, which for HTTP providers aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field

from llm_svc.catalogue import Catalogue, ModelEntry
from llm_svc.metrics import LlmMetrics
from llm_svc.pacing import DeadlinePassed, paced
from llm_svc.policy import (
    FALLBACK_CODES,
    Attempt,
    CachedAnswer,
    Guard,
    ResponseCache,
    RetryPolicy,
)
from llm_svc.progress import TYPICAL_ANSWER_TOKENS, ProgressTracker
from llm_svc.providers.base import (
    Finish,
    Provider,
    ProviderError,
    ProviderRequest,
    TextDelta,
    TokenUsage,
)
from llm_svc.providers.local import count_tokens
from llm_svc.quota import UserQuota
from svckit import tracing
from svckit.errors import ServiceError
from svckit.requests import InvalidRequest, check_options
from switchboard.v1 import common_pb2, llm_pb2

log = logging.getLogger(__name__)
Code = common_pb2.ErrorCode


def delta_event(text: str, progress: float | None = None, tokens: int = 0) -> llm_pb2.GenerateEvent:
    """A text delta, with the progress made by it when `progress` is given. Built in place:
    one message per token, where nested constructors copy each sub-message (2.5x the cost)."""
    event = llm_pb2.GenerateEvent()
    delta = event.delta
    delta.text = text
    if progress is not None:
        delta.progress.progress = progress
        delta.progress.tokens = tokens
    return event


def unavailable(last: ServiceError, chain: Sequence[ModelEntry]) -> ServiceError:
    """What a request gets when every model of its chain failed for now and no cached answer
    could stand in: an honest, retryable `unavailable`, never another model's text."""
    models = ", ".join(model.id for model in chain)
    return ServiceError(
        Code.ERROR_CODE_UNAVAILABLE,
        f"no model could answer ({models}); the last said: {last.message}",
        retryable=True,
        retry_after_ms=last.retry_after_ms,
    )


def fallback_event(model: str, shown: _Shown) -> llm_pb2.GenerateEvent:
    progress = llm_pb2.GenerationProgress(
        progress=shown.progress, tokens=shown.tokens, fallback_model=model
    )
    return llm_pb2.GenerateEvent(progress=progress)


def progress_event(progress: float, tokens: int) -> llm_pb2.GenerateEvent:
    return llm_pb2.GenerateEvent(
        progress=llm_pb2.GenerationProgress(progress=progress, tokens=tokens)
    )


def error_event(error: ServiceError) -> llm_pb2.GenerateEvent:
    return llm_pb2.GenerateEvent(error=error.to_proto())


def final_event(
    answer: CachedAnswer, *, from_fallback: bool, from_cache: bool
) -> llm_pb2.GenerateEvent:
    return llm_pb2.GenerateEvent(
        final=llm_pb2.GenerationFinal(
            content=answer.content,
            model=answer.model,
            finish_reason=answer.finish_reason,
            usage=answer.usage.to_proto(),
            from_fallback=from_fallback,
            from_cache=from_cache,
        )
    )


@dataclass
class _Shown:
    """What the caller has of the answer so far, across the models of the chain (parts, not
    one string: appending to a string per delta would copy the answer each time)."""

    parts: list[str] = field(default_factory=list)
    progress: float = 0.0
    tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class _Run:
    """One attempt; `shown` is the whole generation's."""

    shown: _Shown = field(default_factory=_Shown)
    started: bool = False  # this attempt streamed text: it cannot start over


class Generator:
    def __init__(
        self,
        catalogue: Catalogue,
        providers: Mapping[str, Provider],
        *,
        retry: RetryPolicy | None = None,
        guards: Sequence[Guard] = (),
        cache: ResponseCache | None = None,
        quota: UserQuota | None = None,
        metrics: LlmMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalogue = catalogue
        self.providers = providers
        self.retry = retry or RetryPolicy()
        self.guards = list(guards)
        self.cache = cache
        self.quota = quota
        # Always some registry (its own when not given), so counting needs no checks.
        self.metrics = metrics if metrics is not None else LlmMetrics()
        self._sleep = sleep
        self._clock = clock

    async def generate(
        self, request: llm_pb2.GenerateRequest
    ) -> AsyncGenerator[llm_pb2.GenerateEvent, None]:
        try:
            chain = self._resolve(request)
            if self.quota is not None:
                await self.quota.admit(request.user_id)
        except ServiceError as error:
            if error.code == Code.ERROR_CODE_QUOTA_EXCEEDED:
                self.metrics.quota_refused()
            yield error_event(error)
            return
        self.metrics.active.inc()
        try:
            with tracing.around("generation", request.traceparent, {"model": chain[0].id}) as span:
                generated = self._generate(request, chain, tracing.traceparent(span))
                # Its steps run with the span current (log lines carry its trace id); the
                # caller, between them, never sees it (svckit/tracing.py: current_in).
                async with aclosing(tracing.current_in(span, generated)) as events:
                    async for event in events:
                        if event.HasField("final") and self.quota is not None:
                            tokens = event.final.usage.total_tokens
                            await self.quota.record(request.user_id, tokens)
                        yield event
        finally:
            self.metrics.active.dec()

    async def _generate(
        self, request: llm_pb2.GenerateRequest, chain: list[ModelEntry], trace: str = ""
    ) -> AsyncGenerator[llm_pb2.GenerateEvent, None]:
        started = self._clock()
        # The model asked for sets the whole generation's deadline, fallbacks included.
        deadline_s = chain[0].pacing.deadline_s
        deadline_at = asyncio.get_running_loop().time() + deadline_s
        last_error: ServiceError | None = None
        shown = _Shown([request.continue_from] if request.continue_from else [])
        for index, model in enumerate(chain):
            provider_request = self._provider_request(model, request, shown.text)
            attempt = 0
            while True:
                attempt += 1
                run = _Run(shown)
                try:
                    attempted = self._attempt(
                        model, provider_request, run, index > 0, deadline_at, trace
                    )
                    async with aclosing(attempted):  # closed with us: the provider's stream too
                        async for event in attempted:
                            yield event
                    return
                except DeadlinePassed as error:
                    self._log_failure(request, model, attempt, error, run)
                    yield error_event(error)
                    return
                except ServiceError as error:
                    last_error = error
                except Exception as error:  # a bug in a provider must not kill the stream
                    log.exception("provider failed", extra={"request_id": request.request_id})
                    last_error = ServiceError(Code.ERROR_CODE_INTERNAL, f"provider failed: {error}")
                self._log_failure(request, model, attempt, last_error, run)
                if run.started:  # text went out: this model cannot start over
                    break
                delay = self.retry.delay(attempt, last_error, self._clock() - started)
                if delay is None:
                    break
                if asyncio.get_running_loop().time() + delay >= deadline_at:
                    yield error_event(DeadlinePassed(deadline_s))
                    return
                await self._sleep(delay)
            if last_error.code not in FALLBACK_CODES:
                break
            if shown.parts and index + 1 < len(chain):
                # Mid-stream fallback: the next model continues the text the caller has.
                yield fallback_event(chain[index + 1].id, shown)
        assert last_error is not None  # the chain is never empty here
        if shown.parts:  # text went out and no model of the chain could carry it on
            yield error_event(last_error)
            return
        # The cache stands in for a failing model, not for a request no model would take.
        cached = None
        if last_error.code in FALLBACK_CODES:
            cached = await self._cached(chain, request)
        if cached is not None:
            self.metrics.cache_answered(cached.model)
            # As one delta, so that the deltas of every successful stream join to its final.
            yield delta_event(cached.content, 1.0, cached.usage.completion_tokens)
            yield final_event(cached, from_fallback=True, from_cache=True)
            return
        yield error_event(unavailable(last_error, chain) if last_error.retryable else last_error)

    def _resolve(self, request: llm_pb2.GenerateRequest) -> list[ModelEntry]:
        if not request.prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string")
        # The same rules task_svc enforced at Submit (llm_svc also serves other callers).
        check_options(request.options)
        chain = self.catalogue.chain(request.model)
        if not chain:
            provider = self.catalogue.unavailable.get(request.model)
            why = f"provider {provider} is not configured" if provider else "no such model"
            raise ServiceError(
                Code.ERROR_CODE_MODEL_NOT_FOUND, f"model {request.model!r} is not available: {why}"
            )
        usable = [model for model in chain if model.provider in self.providers]
        if not usable:
            raise ServiceError(
                Code.ERROR_CODE_MODEL_NOT_FOUND, f"model {request.model!r} has no provider"
            )
        return usable

    @staticmethod
    def _provider_request(
        model: ModelEntry, request: llm_pb2.GenerateRequest, continue_from: str = ""
    ) -> ProviderRequest:
        options = request.options
        asked = options.max_tokens
        return ProviderRequest(
            continue_from=continue_from,
            model=model.upstream,
            prompt=request.prompt,
            max_tokens=min(asked, model.max_tokens) if asked > 0 else model.max_tokens,
            system=options.system,
            temperature=options.temperature if options.HasField("temperature") else None,
            user_id=request.user_id,
            request_id=request.request_id,
        )

    async def _attempt(
        self,
        model: ModelEntry,
        request: ProviderRequest,
        run: _Run,
        from_fallback: bool,
        deadline_at: float,
        trace: str = "",
    ) -> AsyncGenerator[llm_pb2.GenerateEvent, None]:
        provider = self.providers[model.provider]
        estimate = provider.estimate_tokens(request)
        if estimate:
            tracker = ProgressTracker(estimate)
        else:
            tracker = ProgressTracker(request.max_tokens, typical_tokens=TYPICAL_ANSWER_TOKENS)
        attempt = Attempt(model, request)
        finish: Finish | None = None
        shown = run.shown
        base_tokens = shown.tokens
        async with AsyncExitStack() as guarded:
            for guard in self.guards:
                await guarded.enter_async_context(guard.admit(attempt))
            # Inside the guards: what they refused never reached the provider (they count
            # their refusals themselves); the call's outcome is known before theirs.
            attributes = {"provider": provider.name, "model": model.id}
            span = guarded.enter_context(tracing.around("provider", trace, attributes))
            call = guarded.enter_context(self.metrics.call(model))
            # The provider's own log lines are written in its span.
            async with aclosing(tracing.current_in(span, provider.stream(request))) as stream:
                async for event in paced(stream, provider.name, model.pacing, deadline_at):
                    match event:
                        case TextDelta(text=text, tokens=tokens):
                            moved = tracker.advance(tokens)
                            shown.tokens = base_tokens + tracker.tokens
                            # A continuation never reports less than the caller was shown.
                            if moved is not None and moved > shown.progress:
                                shown.progress = moved
                            else:
                                moved = None
                            if text:
                                if not run.started:  # this attempt's first text
                                    run.started = True
                                    call.first_token()
                                shown.parts.append(text)
                                yield delta_event(text, moved, shown.tokens)
                            elif moved is not None:
                                yield progress_event(moved, shown.tokens)
                        case Finish():
                            finish = event
                            break
            if finish is None:
                raise ProviderError(
                    provider.name, Code.ERROR_CODE_NETWORK, "the provider stream ended early"
                )
            # Some providers do not report usage; count it the way the local model does.
            usage = finish.usage or TokenUsage(
                count_tokens(request.system) + count_tokens(request.prompt), tracker.tokens
            )
            attempt.usage = usage
        answer = CachedAnswer(shown.text, model.id, finish.finish_reason, usage)
        # Per task, so DEBUG: at hundreds of tasks a second, INFO is for what goes wrong.
        log.debug(
            "generation finished",
            extra={
                "request_id": request.request_id,
                "model": model.id,
                "finish_reason": finish.finish_reason,
                "completion_tokens": usage.completion_tokens,
                "from_fallback": from_fallback,
            },
        )
        if self.cache is not None and not request.continue_from:  # a whole answer of its own
            await self.cache.put(model, request, answer)
        if from_fallback:
            self.metrics.fell_back(model.id)
        yield progress_event(tracker.finish(), usage.completion_tokens)
        yield final_event(answer, from_fallback=from_fallback, from_cache=False)

    async def _cached(
        self, chain: list[ModelEntry], request: llm_pb2.GenerateRequest
    ) -> CachedAnswer | None:
        """The first cached answer along the chain (the one a model of it gave last)."""
        if self.cache is None:
            return None
        for model in chain:
            answer = await self.cache.get(model, self._provider_request(model, request))
            if answer is not None:
                return answer
        return None

    @staticmethod
    def _log_failure(
        request: llm_pb2.GenerateRequest,
        model: ModelEntry,
        attempt: int,
        error: ServiceError,
        run: _Run,
    ) -> None:
        log.warning(
            "generation attempt failed",
            extra={
                "request_id": request.request_id,
                "model": model.id,
                "attempt": attempt,
                "code": common_pb2.ErrorCode.Name(error.code),
                "retryable": error.retryable,
                "streamed": run.started,
            },
        )
