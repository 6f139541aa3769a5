"""Anthropic's Messages API over httpx streaming.

Configured by ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL (the API host, as in Anthropic's
SDKs: https://api.anthropic.com; `/v1/messages` is appended).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_svc.providers.anthropic_wire import (
    API_VERSION,
    MessagesStreamParser,
    error_from_response,
    request_body,
)
from llm_svc.providers.base import ProviderError, ProviderRequest
from llm_svc.providers.http_stream import SseProvider, StreamParser

PROVIDER_NAME = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"


class AnthropicProvider(SseProvider):
    name = PROVIDER_NAME

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key, "anthropic-version": API_VERSION}

    def url(self, request: ProviderRequest) -> str:
        # The base URL is the API host, as in Anthropic's SDKs; tolerate one ending in /v1.
        return self.base_url + ("/messages" if self.base_url.endswith("/v1") else "/v1/messages")

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        return request_body(request)

    def parser(self) -> StreamParser:
        return MessagesStreamParser(self.name)

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        return error_from_response(self.name, status, headers, body)
