"""Anthropic's Messages API over httpx streaming.

Configured by ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL (the API host, as in Anthropic's
SDKs: https://api.anthropic.com; `/v1/messages` is appended).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import httpx

from llm_svc.providers.anthropic_wire import (
    API_VERSION,
    MessagesStreamParser,
    error_from_response,
    request_body,
)
from llm_svc.providers.base import ProviderError, ProviderEvent, ProviderRequest
from llm_svc.providers.http_errors import key_fingerprint
from llm_svc.providers.http_stream import stream_sse

PROVIDER_NAME = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"


class AnthropicProvider:
    name = PROVIDER_NAME

    def __init__(self, http: httpx.AsyncClient, api_key: str, base_url: str) -> None:
        self.http = http
        base = base_url.rstrip("/")
        self.url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        self.key_id = key_fingerprint(api_key)
        self._headers = {
            "x-api-key": api_key,
            "anthropic-version": API_VERSION,
            "Accept": "text/event-stream",
        }

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        return None

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        return stream_sse(
            self.http,
            self.name,
            self.url,
            request_body(request),
            self._headers,
            MessagesStreamParser(self.name),
            self._error,
        )

    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        return error_from_response(self.name, status, headers, body)

    async def aclose(self) -> None:
        return None  # the shared HTTP client is closed by its owner
