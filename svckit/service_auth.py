"""Internal calls are authenticated: a pod that is not ours cannot call TaskService,
HistoryService, LlmService or the dead-letter RPCs.

Every call carries a service token in its metadata (`x-switchboard-caller`):
`v1.<caller>.<expires_unix>.<hmac>`, the HMAC-SHA256 of the rest under the internal secret
(SWITCHBOARD_INTERNAL_SECRET, shared by the services, never logged). Every server checks it
before the call reaches its handler (`CallerCheck`); health checking and reflection stay open
for probes. The dead-letter RPCs also want the caller `admin` (an operator's token:
`python -m svckit.service_auth admin` prints one for grpcurl's `-H`).

The user a request names (`user_id`) is then the word of an authenticated service: the gateway
passes the user its socket's token proved, and no one else can speak to the services.

Costs nothing per message: the token is added once per call (`AuthenticatedChannel`) and
checked once per call, and the hot paths are long-lived multiplexed streams.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

METADATA_KEY = "x-switchboard-caller"
SECRET_ENV = "SWITCHBOARD_INTERNAL_SECRET"
DEV_SECRET = b"switchboard-development-internal-secret-not-for-production"
TOKEN_TTL_S = 3600.0
ADMIN = "admin"
ADMIN_METHODS = frozenset(
    {
        "/switchboard.v1.TaskService/ListDeadLetters",
        "/switchboard.v1.TaskService/RequeueDeadLetter",
        "/switchboard.v1.TaskService/DiscardDeadLetter",
        "/switchboard.v1.TaskService/ListActiveTasks",
        "/switchboard.v1.LlmService/ListProviders",
    }
)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
CALLER = "tool"  # who this process is; run_service names it after the service


class SecretMissing(RuntimeError):
    pass


def internal_secret(environ: dict[str, str] | None = None) -> bytes:
    """The shared secret; in production (SWITCHBOARD_ENV=production) it must be set."""
    env = os.environ if environ is None else environ
    secret = env.get(SECRET_ENV, "")
    if secret:
        if len(secret) < 32:
            raise SecretMissing(f"{SECRET_ENV} must be at least 32 characters")
        return secret.encode()
    if env.get("SWITCHBOARD_ENV") == "production":
        raise SecretMissing(f"{SECRET_ENV} is required in production")
    return DEV_SECRET


def _sign(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


def mint(caller: str, secret: bytes, now: float, ttl_s: float = TOKEN_TTL_S) -> str:
    if not caller or "." in caller:
        raise ValueError("a caller is a name without dots")
    body = f"v1.{caller}.{int(now + ttl_s)}"
    return f"{body}.{_sign(secret, body)}"


def verify(token: str, secret: bytes, now: float) -> str | None:
    """The caller a token names, or None if it is forged, garbled or expired."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[2].isdigit():
        return None
    body = ".".join(parts[:3])
    if not hmac.compare_digest(parts[3], _sign(secret, body)):
        return None
    return parts[1] if int(parts[2]) > now else None


class Minter:
    """This process's token, minted again well before it expires."""

    def __init__(self, caller: str, secret: bytes, clock: Callable[[], float] = time.time):
        self.caller = caller
        self.secret = secret
        self.clock = clock
        self._token = ""
        self._renew_at = 0.0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now = self.clock()
        if now >= self._renew_at:
            self._token = mint(self.caller, self.secret, now)
            self._renew_at = now + TOKEN_TTL_S / 2
        return ((METADATA_KEY, self._token),)


# -- the server's check -----------------------------------------------------------------


def _refusal(code: grpc.StatusCode, message: str, handler: Any) -> Any:
    """A handler of the same shape as `handler` that ends the call with `code`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class CallerCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.clock = clock

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        token = dict(details.invocation_metadata or ()).get(METADATA_KEY, "")
        caller = verify(token, self.secret, self.clock()) if token else None
        if caller is None or (method in ADMIN_METHODS and caller != ADMIN):
            handler = await continuation(details)
            if handler is None:
                return None
            if caller is None:
                return _refusal(grpc.StatusCode.UNAUTHENTICATED, "no valid service token", handler)
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, "admin only", handler)
        return await continuation(details)


# -- the client's token -----------------------------------------------------------------


class _WithToken:
    """A multicallable that adds the token to each call's metadata."""

    def __init__(self, call: Any, minter: Minter) -> None:
        self._call = call
        self._minter = minter

    def __call__(
        self, *args: Any, metadata: Sequence[tuple[str, str]] | None = None, **kw: Any
    ) -> Any:
        return self._call(*args, metadata=(*(metadata or ()), *self._minter.metadata()), **kw)


class AuthenticatedChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A grpc.aio channel whose every call carries this process's service token."""

    def __init__(self, channel: grpc.aio.Channel, minter: Minter) -> None:
        self._channel = channel
        self._minter = minter

    def unary_unary(self, *args: Any, **kw: Any) -> Any:
        return _WithToken(self._channel.unary_unary(*args, **kw), self._minter)

    def unary_stream(self, *args: Any, **kw: Any) -> Any:
        return _WithToken(self._channel.unary_stream(*args, **kw), self._minter)

    def stream_unary(self, *args: Any, **kw: Any) -> Any:
        return _WithToken(self._channel.stream_unary(*args, **kw), self._minter)

    def stream_stream(self, *args: Any, **kw: Any) -> Any:
        return _WithToken(self._channel.stream_stream(*args, **kw), self._minter)

    async def __aenter__(self) -> AuthenticatedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()


if __name__ == "__main__":  # python -m svckit.service_auth <caller>: a token for grpcurl -H
    who = sys.argv[1] if len(sys.argv) > 1 else ADMIN
    print(f"{METADATA_KEY}: {mint(who, internal_secret(), time.time())}")
