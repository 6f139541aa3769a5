"""OpenAI Chat Completions, and every OpenAI-compatible server, over httpx streaming.

Configured by OPENAI_API_KEY and OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1 for vLLM,
http://127.0.0.1:11434/v1 for Ollama, http://127.0.0.1:8080/v1 for llama.cpp's server).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_svc.providers.base import ProviderError, ProviderRequest
from llm_svc.providers.http_errors import error_from_status
from llm_svc.providers.http_stream import SseProvider, StreamParser
from llm_svc.providers.openai_wire import ChatStreamParser, request_body

PROVIDER_NAME = "openai"


class OpenAIProvider(SseProvider):
    name = PROVIDER_NAME

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def url(self, request: ProviderRequest) -> str:
        return self.base_url + "/chat/completions"

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        return request_body(request)

    def parser(self) -> StreamParser:
        return ChatStreamParser(self.name)

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        return error_from_status(self.name, status, headers, body)
