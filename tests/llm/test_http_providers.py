"""Every HTTP provider (OpenAI, Gemini, Anthropic) over real HTTP, against local servers
that speak each one's exact wire format: a normal stream, an error event mid-stream, 429
with retry-after, 5xx (529 for Anthropic), a stall (read timeout → TIMEOUT), a dropped
connection (→ NETWORK), an invalid key (→ AUTH), cancellation aborting the request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from llm_svc.providers import anthropic, gemini, openai
from llm_svc.providers.base import Finish, Provider, ProviderError, ProviderRequest, TextDelta
from llm_svc.providers.registry import tls_context
from switchboard.v1 import common_pb2
from tests.conftest import timeout
from tests.llm import anthropic_server as ant
from tests.llm import gemini_server as gem
from tests.llm import openai_server as oai
from tests.llm.http_fake import FakeSseServer, Reply

Code = common_pb2.ErrorCode
KEY = "test-key-123"
READ_TIMEOUT_S = 0.2


@dataclass(frozen=True)
class Case:
    """One provider and its wire format, for the tests every provider must pass."""

    name: str
    server: Callable[..., FakeSseServer]  # (*replies, key=) → a fake server
    provider: Callable[[httpx.AsyncClient, str, str], Provider]  # (http, key, base_url)
    model: str
    completion: Callable[[list[str]], list[Any]]  # tokens → payloads
    reply: type[Reply]  # the server's Reply, with its default payloads
    first: Callable[[str], list[Any]]  # the payloads that open a stream with one text delta
    mid_error: Any  # an error payload in the middle of a stream
    mid_error_code: int
    rate_limited: Reply  # 429, retry after 2 s
    server_errors: tuple[tuple[Reply, int], ...]  # 5xx replies and their codes


CASES = [
    Case(
        "openai",
        oai.FakeOpenAI,
        openai.OpenAIProvider,
        "gpt-4o-mini",
        oai.completion,
        oai.Reply,
        lambda text: oai.completion([text])[:2],
        {"error": {"message": "The server had an error", "type": "server_error"}},
        Code.ERROR_CODE_OVERLOADED,
        oai.Reply(
            429,
            body=oai.api_error("Rate limit reached", "requests", "rate_limit_exceeded"),
            headers={"retry-after": "2", "x-ratelimit-remaining-requests": "0"},
        ),
        (
            (oai.Reply(500, body=oai.api_error("oops", "server_error")), Code.ERROR_CODE_INTERNAL),
            (oai.Reply(503, body=b"Service Unavailable"), Code.ERROR_CODE_OVERLOADED),
        ),
    ),
    Case(
        "gemini",
        gem.FakeGemini,
        gemini.GeminiProvider,
        "gemini-2.5-flash-lite",
        gem.completion,
        gem.Reply,
        lambda text: [gem.response(text, 4, 1)],
        gem.status_error(503, "UNAVAILABLE", "The model is overloaded."),
        Code.ERROR_CODE_OVERLOADED,
        gem.Reply(429, body=gem.rate_limited("2s")),
        (
            (
                gem.Reply(500, body=gem.api_error(500, "INTERNAL", "An internal error")),
                Code.ERROR_CODE_INTERNAL,
            ),
            (
                gem.Reply(503, body=gem.api_error(503, "UNAVAILABLE", "overloaded")),
                Code.ERROR_CODE_OVERLOADED,
            ),
        ),
    ),
    Case(
        "anthropic",
        ant.FakeAnthropic,
        anthropic.AnthropicProvider,
        "claude-haiku-4-5",
        ant.completion,
        ant.Reply,
        lambda text: [*ant.opening(), ant.text_delta(text)],
        ant.error_event("overloaded_error", "Overloaded"),
        Code.ERROR_CODE_OVERLOADED,
        ant.Reply(
            429,
            body=ant.api_error("rate_limit_error", "Number of requests exceeded"),
            headers={"retry-after": "2", "anthropic-ratelimit-requests-remaining": "0"},
        ),
        (
            (ant.Reply(500, body=ant.api_error("api_error", "oops")), Code.ERROR_CODE_INTERNAL),
            (ant.Reply(529, body=ant.OVERLOADED), Code.ERROR_CODE_OVERLOADED),
        ),
    ),
]
IDS = [case.name for case in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Timeout(timeout(5), read=READ_TIMEOUT_S)
    async with httpx.AsyncClient(verify=tls_context(), timeout=limits) as client:
        yield client


def request_for(case: Case) -> ProviderRequest:
    return ProviderRequest(model=case.model, prompt="Say hello", max_tokens=20, system="short")


async def run(case: Case, http: httpx.AsyncClient, *replies: Reply, key: str = KEY) -> Any:
    """(events, error or None, server) of one stream against a fresh fake server."""
    server = case.server(*replies, key=KEY)
    base_url = await server.start()
    events: list[object] = []
    error: ProviderError | None = None
    try:
        async for event in case.provider(http, key, base_url).stream(request_for(case)):
            events.append(event)
    except ProviderError as caught:
        error = caught
    finally:
        if any(reply.hang for reply in replies):
            # A stalled response must see the client leave (the request closed, not leaked).
            await asyncio.wait_for(server.client_left.wait(), timeout(5))
        await server.stop()
    return events, error, server


async def test_a_normal_stream(case: Case, http: httpx.AsyncClient) -> None:
    tokens = ["Caf\u00e9", " au", " lait \U0001f600"]
    events, error, server = await run(case, http, case.reply(payloads=case.completion(tokens)))
    assert error is None
    assert [e.text for e in events if isinstance(e, TextDelta)] == tokens
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "stop"
    assert finish.usage is not None and finish.usage.completion_tokens == 3
    assert sum(isinstance(e, Finish) for e in events) == 1
    [sent] = server.requests
    assert sent.method == "POST" and sent.headers["content-type"] == "application/json"
    assert "text/event-stream" in sent.headers["accept"]


async def test_split_anywhere_on_the_wire(case: Case, http: httpx.AsyncClient) -> None:
    tokens = ["\u00e9t\u00e9", " \u2615"]
    reply = case.reply(payloads=case.completion(tokens), byte_by_byte=True)
    events, error, _ = await run(case, http, reply)
    assert error is None and [e.text for e in events if isinstance(e, TextDelta)] == tokens


async def test_an_error_event_mid_stream(case: Case, http: httpx.AsyncClient) -> None:
    reply = case.reply(payloads=[*case.first("par"), case.mid_error], done=False)
    events, error, _ = await run(case, http, reply)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["par"]
    assert error is not None and error.code == case.mid_error_code and error.retryable


async def test_429_with_retry_after(case: Case, http: httpx.AsyncClient) -> None:
    _, error, _ = await run(case, http, case.rate_limited)
    assert error is not None
    assert (error.code, error.retryable, error.retry_after_ms) == (
        Code.ERROR_CODE_RATE_LIMITED,
        True,
        2000,
    )


async def test_server_errors(case: Case, http: httpx.AsyncClient) -> None:
    for reply, code in case.server_errors:
        _, error, _ = await run(case, http, reply)
        assert error is not None, reply.status
        assert (error.code, error.retryable) == (code, True), reply.status
        assert f"HTTP {reply.status}" in error.message


async def test_a_stall_is_a_timeout(case: Case, http: httpx.AsyncClient) -> None:
    events, error, server = await run(case, http, case.reply(payloads=case.first("a"), hang=True))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["a"]
    assert error is not None and error.code == Code.ERROR_CODE_TIMEOUT and error.retryable
    assert server.client_left.is_set()  # the stalled request was closed, not leaked


async def test_a_dropped_connection_is_a_network_error(case: Case, http: httpx.AsyncClient) -> None:
    events, error, _ = await run(case, http, case.reply(payloads=case.first("a"), drop=True))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["a"]
    assert error is not None and error.code == Code.ERROR_CODE_NETWORK and error.retryable


async def test_a_body_cut_short_is_a_network_error(case: Case, http: httpx.AsyncClient) -> None:
    events, error, _ = await run(case, http, case.reply(payloads=case.first("a"), done=False))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["a"]
    assert error is not None and error.code == Code.ERROR_CODE_NETWORK


async def test_an_invalid_key_is_auth(case: Case, http: httpx.AsyncClient) -> None:
    _, error, server = await run(case, http, key="wrong-key")
    assert error is not None and error.code == Code.ERROR_CODE_AUTH and not error.retryable
    assert "wrong-key" not in error.message and KEY not in error.message
    assert len(server.requests) == 1


async def test_cancelling_aborts_the_http_request(case: Case, http: httpx.AsyncClient) -> None:
    server = case.server(case.reply(payloads=case.first("a"), hang=True), key=KEY)
    base_url = await server.start()
    long_read = httpx.AsyncClient(verify=tls_context(), timeout=timeout(30))
    try:
        stream = case.provider(long_read, KEY, base_url).stream(request_for(case))
        assert await anext(stream) == TextDelta("a", 1)
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.wait_for(server.streaming.wait(), timeout(5))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(server.client_left.wait(), timeout(5))
    finally:
        await long_read.aclose()
        await server.stop()


async def test_requests_on_the_wire() -> None:
    """Each provider's exact URL, auth header and body."""
    async with httpx.AsyncClient(verify=tls_context(), timeout=timeout(5)) as http:
        seen = {}
        for case in CASES:
            events, error, server = await run(case, http, case.reply())
            assert error is None and isinstance(events[-1], Finish)
            seen[case.name] = server.requests[0]
    assert seen["openai"].path == "/v1/chat/completions"
    assert seen["openai"].headers["authorization"] == f"Bearer {KEY}"
    assert seen["openai"].body["model"] == "gpt-4o-mini"
    gemini_path = "/v1beta/models/gemini-2.5-flash-lite:streamGenerateContent?alt=sse"
    assert seen["gemini"].path == gemini_path
    assert seen["gemini"].headers["x-goog-api-key"] == KEY
    assert "key=" not in seen["gemini"].path  # the key never goes in a URL
    assert seen["gemini"].body["generationConfig"] == {"maxOutputTokens": 20}
    assert seen["gemini"].body["systemInstruction"] == {"parts": [{"text": "short"}]}
    assert seen["anthropic"].path == "/v1/messages"
    assert seen["anthropic"].headers["x-api-key"] == KEY
    assert seen["anthropic"].headers["anthropic-version"] == "2023-06-01"
    assert seen["anthropic"].body == {
        "model": "claude-haiku-4-5",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": True,
        "system": "short",
    }
    assert orjson.dumps(seen["anthropic"].body)  # JSON all the way


async def test_a_connection_dropped_after_the_end_marker_loses_nothing(
    http: httpx.AsyncClient,
) -> None:
    # OpenAI ends with `data: [DONE]`, Anthropic with message_stop: what follows is not
    # the answer's business.
    for case, payloads in (
        (CASES[0], [*oai.completion(["ok"]), "[DONE]"]),
        (CASES[2], ant.completion(["ok"])),
    ):
        reply = case.reply(payloads=payloads, done=False, drop=True)
        events, error, _ = await run(case, http, reply)
        assert error is None, case.name
        assert events[0] == TextDelta("ok", 1) and isinstance(events[-1], Finish)
