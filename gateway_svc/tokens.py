"""Signed socket tokens: `base64url(json {sub, exp}) "." base64url(HMAC-SHA256)`.

`sub` is the app's external user id; `exp` a Unix time in seconds. The key is
SWITCHBOARD_SECRET; in development (the default environment) a fixed, public dev key is used
when it is unset, and production refuses to start without a real one.

`python -m gateway_svc.tokens alice [--ttl SECONDS]` prints a token for alice.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

import orjson

from gateway_svc.config import Settings

DEV_SECRET = b"switchboard-development-secret-not-for-production"
MIN_SECRET_BYTES = 32
DEFAULT_TTL_S = 24 * 3600


class TokenError(Exception):
    """A token that is malformed, forged or expired (the socket connect gets HTTP 403)."""


class ExpiredToken(TokenError):
    """A well-signed token past its `exp`."""


class SecretConfigError(RuntimeError):
    """Production without a usable SWITCHBOARD_SECRET."""


def secret_from(settings: Settings) -> bytes:
    """The signing key for these settings; raises SecretConfigError in production without a
    secret of at least 32 bytes."""
    configured = settings.switchboard_secret
    if configured is not None and configured.get_secret_value():
        key = configured.get_secret_value().encode()
        if settings.switchboard_env == "production" and len(key) < MIN_SECRET_BYTES:
            raise SecretConfigError(
                f"SWITCHBOARD_SECRET must be at least {MIN_SECRET_BYTES} bytes in production"
            )
        return key
    if settings.switchboard_env == "production":
        raise SecretConfigError("SWITCHBOARD_SECRET is required when SWITCHBOARD_ENV=production")
    return DEV_SECRET


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(body: str, secret: bytes) -> str:
    return _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())


def mint(user: str, secret: bytes, ttl: float = DEFAULT_TTL_S, *, now: float | None = None) -> str:
    if not user:
        raise ValueError("user must be non-empty")
    issued = time.time() if now is None else now
    body = _b64(orjson.dumps({"sub": user, "exp": int(issued + ttl)}))
    return f"{body}.{_sign(body, secret)}"


@dataclass(frozen=True)
class Claims:
    user: str
    expires_at: float  # Unix time: a socket opened with it is closed then


def verify(token: str, secret: bytes, *, now: float | None = None) -> str:
    """The user id of a valid token; TokenError otherwise."""
    return verify_claims(token, secret, now=now).user


def verify_claims(token: str, secret: bytes, *, now: float | None = None) -> Claims:
    """The claims of a valid token; TokenError otherwise."""
    body, dot, signature = token.partition(".")
    if not dot or not body or not signature:
        raise TokenError("malformed token")
    if not hmac.compare_digest(signature.encode(), _sign(body, secret).encode()):
        raise TokenError("bad signature")
    try:
        claims = orjson.loads(_unb64(body))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    user, exp = claims.get("sub"), claims.get("exp")
    if not isinstance(user, str) or not user or not isinstance(exp, int | float):
        raise TokenError("malformed claims")
    if (time.time() if now is None else now) >= exp:
        raise ExpiredToken("expired token")
    return Claims(user, float(exp))


def mint_dev_token(user: str, ttl: float = DEFAULT_TTL_S) -> str:
    """A token for `user` signed with this environment's key (SWITCHBOARD_SECRET, or the dev
    key in development): what `make token` prints."""
    return mint(user, secret_from(Settings()), ttl)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_svc.tokens", description="Print a socket token for a user."
    )
    parser.add_argument("user", help="the app's external user id, e.g. alice")
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="lifetime in seconds")
    args = parser.parse_args(argv)
    try:
        print(mint_dev_token(args.user, args.ttl))
    except SecretConfigError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
