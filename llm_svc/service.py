"""The LlmService servicer (llm.proto): a thin shell over `Generator` and the catalogue, and
the providers' health (breakers, metrics) for the operator dashboard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any

import grpc

from llm_svc.breaker import Breakers, State
from llm_svc.catalogue import Catalogue
from llm_svc.coalesce import Window, coalesce
from llm_svc.generation import Generator
from llm_svc.metrics import ProviderTotals
from llm_svc.multiplex import serve_many
from svckit.lifecycle import cancel_and_wait
from switchboard.v1 import llm_pb2, llm_pb2_grpc

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(
        self,
        generator: Generator,
        catalogue: Catalogue,
        *,
        window: Window | None = None,
        breakers: Breakers | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.generator = generator
        self.catalogue = catalogue
        # See coalesce.py; none given: every delta as it comes.
        self.window = window if window is not None else Window(0.0)
        # ListProviders: the generator's breakers (none given: every circuit reads closed),
        # and the configured providers (none given: the generator's).
        self.breakers = breakers if breakers is not None else Breakers()
        self.providers = tuple(providers) if providers is not None else None
        self._handlers: set[asyncio.Task[Any]] = set()  # the generations' gRPC handlers

    async def settle(self) -> None:
        """Cancel the generations still running and wait until each is torn down (its
        provider stream closed, the upstream request with it). Called after the gRPC
        server's stop, which returns once it has cancelled the calls, possibly before
        their handlers have run their cleanup."""
        await cancel_and_wait(*self._handlers)

    @contextmanager
    def _running(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            yield
        finally:
            self._handlers.discard(task)

    # A coroutine writing with `context.write`, not an async generator: when the client
    # cancels, grpc.aio cancels this task wherever it waits (writing included), and
    # `aclosing` then closes the generation, and with it the provider stream, at once.
    # An async-generator handler would leave that close to garbage collection.
    async def Generate(  # type: ignore[override]
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> None:
        with self._running():
            async with aclosing(self.events(request)) as events:
                async for event in events:
                    await context.write(event)

    async def GenerateMany(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[llm_pb2.GenerateCommands],
        context: grpc.aio.ServicerContext[object, object],
    ) -> None:
        with self._running():
            await serve_many(request_iterator, context, self.events)

    def events(self, request: llm_pb2.GenerateRequest) -> AsyncGenerator[llm_pb2.GenerateEvent]:
        """One generation's events, coalesced (coalesce.py)."""
        return coalesce(self.generator.generate(request), self.window)

    async def ListModels(
        self, request: llm_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> llm_pb2.ListModelsResponse:
        return list_models(self.catalogue)

    async def ListProviders(
        self,
        request: llm_pb2.ListProvidersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> llm_pb2.ListProvidersResponse:
        providers = self.providers
        if providers is None:
            providers = tuple(self.generator.providers)
        totals = self.generator.metrics.provider_totals()
        return list_providers(providers, self.breakers.states(), totals)


def list_models(catalogue: Catalogue) -> llm_pb2.ListModelsResponse:
    return llm_pb2.ListModelsResponse(
        models=[
            llm_pb2.ModelInfo(
                id=model.id,
                provider=model.provider,
                queue=model.queue,
                is_default=model.id == catalogue.default_model,
                max_tokens=model.max_tokens,
            )
            for model in catalogue.models.values()
        ]
    )


def list_providers(
    providers: Sequence[str],
    breakers: Mapping[str, State],
    totals: Mapping[str, ProviderTotals],
) -> llm_pb2.ListProvidersResponse:
    """One status per configured provider, by name: a provider not called yet has no breaker
    (closed) and no totals (zeros), and still gets its line on the dashboard."""
    statuses = []
    for name in sorted(set(providers)):
        t = totals.get(name, ProviderTotals())
        statuses.append(
            llm_pb2.ProviderStatus(
                provider=name,
                breaker=breakers.get(name, State.CLOSED).value,
                requests=t.requests,
                errors=t.errors,
                mean_first_token_s=t.mean_first_token_s,
                mean_total_s=t.mean_total_s,
            )
        )
    return llm_pb2.ListProvidersResponse(providers=statuses)
