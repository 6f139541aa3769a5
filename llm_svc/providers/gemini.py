"""Google's Gemini API over httpx streaming (`streamGenerateContent?alt=sse`).

Configured by GEMINI_API_KEY and GEMINI_BASE_URL (the API host; the key goes in the
`x-goog-api-key` header, never in the URL, so it stays out of logs and proxies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_svc.providers.base import ProviderError, ProviderRequest
from llm_svc.providers.gemini_wire import (
    GeminiStreamParser,
    error_from_response,
    request_body,
    stream_url,
)
from llm_svc.providers.http_stream import SseProvider, StreamParser

PROVIDER_NAME = "gemini"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"


class GeminiProvider(SseProvider):
    name = PROVIDER_NAME

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key}

    def url(self, request: ProviderRequest) -> str:
        return stream_url(self.base_url, request.model)

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        return request_body(request)

    def parser(self) -> StreamParser:
        return GeminiStreamParser(self.name)

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        return error_from_response(self.name, status, headers, body)
