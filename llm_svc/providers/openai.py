"""OpenAI Chat Completions, and every OpenAI-compatible server, over httpx streaming.

Configured by OPENAI_API_KEY and OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1 for vLLM,
http://127.0.0.1:11434/v1 for Ollama, http://127.0.0.1:8080/v1 for llama.cpp's server).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import httpx

from llm_svc.providers.base import ProviderError, ProviderEvent, ProviderRequest
from llm_svc.providers.http_errors import error_from_status, key_fingerprint
from llm_svc.providers.http_stream import stream_sse
from llm_svc.providers.openai_wire import ChatStreamParser, request_body

PROVIDER_NAME = "openai"


class OpenAIProvider:
    name = PROVIDER_NAME

    def __init__(self, http: httpx.AsyncClient, api_key: str, base_url: str) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.key_id = key_fingerprint(api_key)
        self._headers = {
            "Authorization": f"Bearer {api_key}",
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
            ChatStreamParser(self.name),
            self._error,
        )

    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        return error_from_status(self.name, status, headers, body)

    async def aclose(self) -> None:
        return None  # the shared HTTP client is closed by its owner
