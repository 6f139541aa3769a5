"""Which providers this process can use: "local" always, others when their key is set;
and the HTTP clients they stream over."""

from __future__ import annotations

import functools
import ssl

import httpx
from pydantic import SecretStr

from llm_svc.config import Settings
from llm_svc.providers.anthropic import AnthropicProvider
from llm_svc.providers.base import Provider
from llm_svc.providers.gemini import GeminiProvider
from llm_svc.providers.local import LocalProvider
from llm_svc.providers.openai import OpenAIProvider


def _key(secret: SecretStr | None) -> str:
    return secret.get_secret_value().strip() if secret is not None else ""


class HttpClients:
    """One pooled httpx client per provider, each with its own bounded pool
    (LLM_HTTP_MAX_CONNECTIONS): a provider that holds all its connections in slow streams
    never starves another. Clients are made on first use; `aclose()` closes them all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients: dict[str, httpx.AsyncClient] = {}

    def for_provider(self, name: str) -> httpx.AsyncClient:
        client = self.clients.get(name)
        if client is None:
            client = self.clients[name] = http_client(self.settings)
        return client

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


def build_providers(settings: Settings, http: HttpClients) -> dict[str, Provider]:
    """The configured providers by name. A provider without a key is simply not offered."""
    providers: dict[str, Provider] = {
        "local": LocalProvider(settings.local_model_token_delay_ms / 1000),
    }
    if key := _key(settings.openai_api_key):
        client = http.for_provider("openai")
        providers["openai"] = OpenAIProvider(client, key, settings.openai_base_url)
    if key := _key(settings.gemini_api_key):
        client = http.for_provider("gemini")
        providers["gemini"] = GeminiProvider(client, key, settings.gemini_base_url)
    if key := _key(settings.anthropic_api_key):
        client = http.for_provider("anthropic")
        providers["anthropic"] = AnthropicProvider(client, key, settings.anthropic_base_url)
    return providers


def key_ids(providers: dict[str, Provider]) -> dict[str, str]:
    """Provider → a fingerprint of its key (rate limits are per key)."""
    return {name: str(getattr(p, "key_id", "")) for name, p in providers.items()}


def http_client(settings: Settings) -> httpx.AsyncClient:
    """A client with the configured timeouts and a bounded pool. The read timeout is the
    longest silence allowed inside a streamed answer (a stall becomes TIMEOUT)."""
    timeout = httpx.Timeout(
        connect=settings.llm_http_connect_timeout_s,
        read=settings.llm_http_read_timeout_s,
        write=settings.llm_http_connect_timeout_s,
        pool=settings.llm_http_connect_timeout_s,
    )
    limits = httpx.Limits(
        max_connections=settings.llm_http_max_connections,
        max_keepalive_connections=min(settings.llm_http_max_connections, 100),
    )
    return httpx.AsyncClient(
        timeout=timeout, limits=limits, follow_redirects=False, verify=tls_context()
    )


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The CA bundle loaded once per process (a tenth of a second each time otherwise)."""
    return httpx.create_ssl_context()
