"""Google's Gemini API over httpx streaming (`streamGenerateContent?alt=sse`).

Configured by GEMINI_API_KEY and GEMINI_BASE_URL (the API host; the key goes in the
`x-goog-api-key` header, never in the URL, so it stays out of logs and proxies).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import httpx

from llm_svc.providers.base import ProviderError, ProviderEvent, ProviderRequest
from llm_svc.providers.gemini_wire import (
    GeminiStreamParser,
    error_from_response,
    request_body,
    stream_url,
)
from llm_svc.providers.http_errors import key_fingerprint
from llm_svc.providers.http_stream import stream_sse

PROVIDER_NAME = "gemini"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"


class GeminiProvider:
    name = PROVIDER_NAME

    def __init__(self, http: httpx.AsyncClient, api_key: str, base_url: str) -> None:
        self.http = http
        self.base_url = base_url
        self.key_id = key_fingerprint(api_key)
        self._headers = {"x-goog-api-key": api_key, "Accept": "text/event-stream"}

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        return None

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        return stream_sse(
            self.http,
            self.name,
            stream_url(self.base_url, request.model),
            request_body(request),
            self._headers,
            GeminiStreamParser(self.name),
            self._error,
        )

    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        return error_from_response(self.name, status, headers, body)

    async def aclose(self) -> None:
        return None  # the shared HTTP client is closed by its owner
