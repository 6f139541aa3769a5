"""The I/O shell every HTTP provider shares: POST a JSON body, check the status, decode the
`text/event-stream` body with the sans-I/O `SseDecoder`, hand each event to the provider's
sans-I/O parser, and turn transport failures into typed errors.

Closing the stream (or cancelling its consumer) leaves `http.stream(...)`, which closes the
response before it was read to the end: httpx then drops the connection, which is how an
HTTP/1.1 request is aborted, at once.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import httpx

from llm_svc.providers.base import ProviderError, ProviderEvent, ProviderRequest
from llm_svc.providers.http_errors import key_fingerprint
from llm_svc.providers.sse import SseDecoder, SseEvent
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
MAX_ERROR_BODY = 64 * 1024
DRAIN_TIMEOUT_S = 0.5

# (status, lower-cased headers, body) → the typed error of a non-200 reply.
ErrorMapper = Callable[[int, Mapping[str, str], bytes], ProviderError]


class StreamParser(Protocol):
    """A provider's wire format, sans-I/O: SSE events in, provider events out."""

    @property
    def done(self) -> bool:
        """The stream announced its own end (OpenAI's [DONE], Anthropic's message_stop)."""
        ...

    def feed_event(self, event: SseEvent) -> list[ProviderEvent]:
        """The events one SSE event gives; raises a `ProviderError` for an error event."""
        ...

    def end(self) -> list[ProviderEvent]:
        """The body ended (without `done`): the last events, or raise a `ProviderError`
        (a stream cut short)."""
        ...


async def stream_sse(
    http: httpx.AsyncClient,
    provider: str,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    parser: StreamParser,
    error_from_response: ErrorMapper,
) -> AsyncGenerator[ProviderEvent, None]:
    try:
        async with http.stream("POST", url, json=body, headers=dict(headers)) as response:
            if response.status_code != 200:
                raw = await read_some(response)
                lowered = {k.lower(): v for k, v in response.headers.items()}
                raise error_from_response(response.status_code, lowered, raw)
            decoder = SseDecoder()
            # SSE is always UTF-8 (HTML Living Standard 9.2.5), whatever the headers say;
            # the incremental decoder keeps a character split across reads whole.
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            chunks = response.aiter_bytes()
            async for data in chunks:
                for event in decoder.feed(utf8.decode(data)):
                    events = parser.feed_event(event)
                    if parser.done:
                        # Read the few bytes left (the end of the chunked body) before the
                        # last events: the consumer stops at the Finish, and a response read
                        # to its end returns its connection to the pool, where one closed
                        # early would cost a new connection for the next request.
                        await _drain(chunks)
                        for provider_event in events:
                            yield provider_event
                        return
                    for provider_event in events:
                        yield provider_event
    except httpx.TimeoutException as error:
        raise ProviderError(
            provider, Code.ERROR_CODE_TIMEOUT, f"{provider}: {type(error).__name__}"
        ) from error
    except httpx.TransportError as error:
        raise ProviderError(
            provider, Code.ERROR_CODE_NETWORK, f"{provider}: {type(error).__name__}: {error}"
        ) from error
    for provider_event in parser.end():
        yield provider_event


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows the end marker, briefly: the answer is complete whatever happens
    here, only the connection's reuse is at stake (a server that keeps talking, stalls or
    drops the connection after its end marker just loses it)."""
    left = MAX_ERROR_BODY
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for data in chunks:
                left -= len(data)
                if left < 0:
                    return
    except (TimeoutError, httpx.HTTPError):
        return


async def read_some(response: httpx.Response) -> bytes:
    """At most MAX_ERROR_BODY bytes of an error reply (enough for any JSON error)."""
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    return body[:MAX_ERROR_BODY]


class SseProvider:
    """A provider whose API streams server-sent events over HTTP. Each subclass names its
    wire format: its auth headers, its URL, its request body, its parser and its error
    mapping; the I/O is `stream_sse`, the same for all."""

    name: str

    def __init__(self, http: httpx.AsyncClient, api_key: str, base_url: str) -> None:
        self.http = http  # shared and closed by its owner (providers.registry)
        self.base_url = base_url.rstrip("/")
        self.key_id = key_fingerprint(api_key)
        self._headers = {**self.auth_headers(api_key), "Accept": "text/event-stream"}

    def auth_headers(self, api_key: str) -> dict[str, str]:
        raise NotImplementedError

    def url(self, request: ProviderRequest) -> str:
        raise NotImplementedError

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        raise NotImplementedError

    def parser(self) -> StreamParser:
        raise NotImplementedError

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        raise NotImplementedError

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        return None

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        return stream_sse(
            self.http,
            self.name,
            self.url(request),
            self.body(request),
            self._headers,
            self.parser(),
            self.error,
        )

    async def aclose(self) -> None:
        return None  # the shared HTTP client is closed by its owner
