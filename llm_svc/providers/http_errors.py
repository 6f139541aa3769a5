"""Provider HTTP failures → typed `ProviderError`s (sans-I/O: status, headers, body in).

One table for every HTTP provider; each adapter may refine it from the error body (OpenAI's
429 `insufficient_quota` is a spent quota, not a rate limit).
"""

from __future__ import annotations

import email.utils
import hashlib
import time
from collections.abc import Mapping

import orjson

from llm_svc.providers.base import ProviderError
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode

# status → (code, retryable). Providers' 5xx are transient (their own SDKs retry them).
STATUS_CODES: dict[int, tuple[common_pb2.ErrorCode.ValueType, bool]] = {
    400: (Code.ERROR_CODE_INVALID_REQUEST, False),
    401: (Code.ERROR_CODE_AUTH, False),
    403: (Code.ERROR_CODE_AUTH, False),
    404: (Code.ERROR_CODE_MODEL_NOT_FOUND, False),
    408: (Code.ERROR_CODE_TIMEOUT, True),
    409: (Code.ERROR_CODE_OVERLOADED, True),
    413: (Code.ERROR_CODE_INVALID_REQUEST, False),
    422: (Code.ERROR_CODE_INVALID_REQUEST, False),
    429: (Code.ERROR_CODE_RATE_LIMITED, True),
    500: (Code.ERROR_CODE_INTERNAL, True),
    502: (Code.ERROR_CODE_OVERLOADED, True),
    503: (Code.ERROR_CODE_OVERLOADED, True),
    504: (Code.ERROR_CODE_TIMEOUT, True),
    529: (Code.ERROR_CODE_OVERLOADED, True),  # Anthropic's "overloaded"
}
MAX_MESSAGE = 300


def key_fingerprint(api_key: str) -> str:
    """A short, non-reversible id of an API key: limits are kept per key, logs never show it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def retry_after_ms(headers: Mapping[str, str], now: float | None = None) -> int:
    """From `retry-after-ms` (OpenAI), else `retry-after` as seconds or an HTTP date
    (RFC 9110, section 10.2.3); 0 when absent or unreadable. `headers` keys are lower-case."""
    raw_ms = headers.get("retry-after-ms", "")
    try:
        if raw_ms:
            return max(int(float(raw_ms)), 0)
    except ValueError:
        pass
    raw = headers.get("retry-after", "").strip()
    if not raw:
        return 0
    try:
        return max(int(float(raw) * 1000), 0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return 0
    now = time.time() if now is None else now
    return max(int((when.timestamp() - now) * 1000), 0)


def error_detail(body: bytes) -> tuple[str, str]:
    """(message, type-or-code) from a JSON error body `{"error": {...}}` (OpenAI, Anthropic,
    Gemini all use this shape), else the body's text."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace").strip()[:MAX_MESSAGE], ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        kind = error.get("code") or error.get("type") or error.get("status") or ""
        return str(error.get("message", ""))[:MAX_MESSAGE], str(kind)
    if isinstance(error, str):
        return error[:MAX_MESSAGE], ""
    return "", ""


def error_from_status(
    provider: str, status: int, headers: Mapping[str, str], body: bytes
) -> ProviderError:
    code, retryable = STATUS_CODES.get(
        status,
        (Code.ERROR_CODE_OVERLOADED, True) if status >= 500 else (Code.ERROR_CODE_INTERNAL, False),
    )
    message, kind = error_detail(body)
    if status == 429 and kind == "insufficient_quota":
        code, retryable = Code.ERROR_CODE_QUOTA_EXCEEDED, False
    text = f"{provider} answered HTTP {status}" + (f": {message}" if message else "")
    return ProviderError(
        provider,
        code,
        text,
        retryable=retryable,
        retry_after_ms=retry_after_ms(headers) if retryable else 0,
    )
