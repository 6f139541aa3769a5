"""llm_svc settings, from the environment (names below are the variables, upper-cased)."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_svc.catalogue import DEFAULT_MODELS_FILE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    log_level: str = "INFO"
    llm_svc_listen: str = "127.0.0.1:7052"
    # `host:port` of the Prometheus /metrics endpoint of `python -m llm_svc` (metrics.py,
    # svckit/metrics.py); empty = off, `host:0` = a free port (logged). make cluster gives
    # each replica its own port (tools/stack.py), tests a free one (tests/conftest.py).
    llm_metrics_listen: str = "127.0.0.1:9102"
    # OTLP/gRPC collector for traces (svckit/tracing.py); empty: no traces.
    otel_exporter_otlp_endpoint: str = ""

    llm_models_file: Path = DEFAULT_MODELS_FILE
    llm_default_model: str = ""  # empty: the catalogue's choice ("local" with no key)
    local_model_token_delay_ms: float = 30.0
    # Deltas arriving within this many ms of the last event sent travel as one (the first
    # is never held back; see coalesce.py). 0 sends every delta on its own.
    llm_coalesce_ms: float = 50.0
    # With many streams open the window widens, so that together they send at most about
    # this many events a second (each one's window at least streams / this, at most
    # LLM_COALESCE_MAX_MS). 0 keeps LLM_COALESCE_MS whatever the load.
    llm_coalesce_events_per_s: float = 3000.0
    llm_coalesce_max_ms: float = 250.0

    # A provider is configured (its models offered) when its key is set and not empty.
    # Base URLs as the providers' own SDKs take them: OpenAI's includes /v1 (any
    # OpenAI-compatible server: vLLM, Ollama, llama.cpp), Gemini's and Anthropic's are hosts.
    openai_api_key: SecretStr | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    gemini_api_key: SecretStr | None = None
    gemini_base_url: str = "https://generativelanguage.googleapis.com"
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str = "https://api.anthropic.com"

    # Retries of one model before its first delta (see policy.RetryPolicy).
    llm_retry_max_attempts: int = 3
    llm_retry_base_delay_ms: int = 200
    llm_retry_max_delay_ms: int = 5000
    llm_retry_deadline_s: float = 30.0

    # Our own per-provider RPM/TPM limits are in models.toml ([providers.<name>]); this
    # JSON overrides them per provider, e.g. {"openai": {"rpm": 3000, "tpm": 1000000}}
    # (0 lifts a limit). How long a call may queue for them before it is refused with
    # RATE_LIMITED (and falls back):
    llm_provider_limits: dict[str, dict[str, int]] = {}
    llm_rate_limit_max_wait_ms: int = 2000
    # Circuit breaker per provider: consecutive failures that open it, and how long it stays
    # open before one probe call.
    llm_breaker_failures: int = 5
    llm_breaker_reset_s: float = 30.0
    # With NATS, rate limits and quotas are counted for every llm_svc replica together
    # (fleet.py); empty: each replica counts for itself. Servers comma-separated.
    nats_url: str = ""
    nats_stream_replicas: int = 1  # JetStream replicas of the quota bucket
    # Per-user daily quotas (UTC days); 0 disables one.
    llm_user_daily_requests: int = 20_000
    llm_user_daily_tokens: int = 5_000_000
    # Answers kept for when every model of a chain is down; 0 entries disables the cache.
    llm_cache_max_entries: int = 1000
    llm_cache_ttl_s: float = 3600.0

    llm_http_connect_timeout_s: float = 10.0
    llm_http_read_timeout_s: float = 60.0  # between two bytes of a streamed answer
    # Streamed generations hold a connection each for their whole length.
    llm_http_max_connections: int = 500
    llm_shutdown_grace_s: float = 5.0
