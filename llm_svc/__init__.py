"""llm_svc: streams generations from LLM providers and the built-in local model.

Modules: `catalogue` (models.toml: model id → provider, upstream name, queue, max_tokens,
rpm/tpm limits, fallbacks; per-provider limits), `providers/` (the `Provider` interface in
`base`; `local`, the offline default; `openai` for OpenAI and OpenAI-compatible servers,
`gemini`, `anthropic`, each over its sans-I/O wire module (`*_wire`) and the shared
`http_stream` shell with `sse` and `http_errors`; `registry` builds the configured ones),
`progress`, `policy` (retries with backoff, jitter and a deadline; the `Guard` and
`ResponseCache` seams), `breaker` (a circuit breaker per provider), `limits` (RPM/TPM token
buckets per provider key and model), `quota` (per-user daily quotas), `cache` (the
in-memory response cache), `generation` (provider stream → GenerateEvents, with retries
and fallbacks), `service` (the gRPC servicer), `server` (assembly and ordered shutdown),
`config` (environment).

Contract of Generate (llm.proto): deltas, progress (monotonic, exactly 1.0 just before the
final), then exactly one `final` (saying which model answered, from a fallback or the cache)
or one `error` event (typed, retryable or not, with retry-after when known). Domain failures
(unknown model, bad request, provider errors, a spent quota) are `error` events on a stream
that ends with status OK.
"""
