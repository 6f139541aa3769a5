"""One table for every typed error: its gRPC status, its socket reason, whether it is
retryable. Errors cross gRPC as a status plus the serialized `switchboard.v1.Error` in the
trailing metadata key `sb-error-bin`, so the typed code survives every hop."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
ERROR_METADATA_KEY = "sb-error-bin"


@dataclass(frozen=True)
class ErrorKind:
    status: grpc.StatusCode
    reason: str  # the `reason` of a socket error reply (docs/protocol.md)
    retryable: bool


ERRORS: dict[common_pb2.ErrorCode.ValueType, ErrorKind] = {
    Code.ERROR_CODE_UNSPECIFIED: ErrorKind(grpc.StatusCode.UNKNOWN, "internal", False),
    Code.ERROR_CODE_INTERNAL: ErrorKind(grpc.StatusCode.INTERNAL, "internal", False),
    Code.ERROR_CODE_AUTH: ErrorKind(grpc.StatusCode.UNAUTHENTICATED, "provider_auth", False),
    Code.ERROR_CODE_INVALID_REQUEST: ErrorKind(
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", False
    ),
    Code.ERROR_CODE_RATE_LIMITED: ErrorKind(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited", True
    ),
    Code.ERROR_CODE_OVERLOADED: ErrorKind(grpc.StatusCode.UNAVAILABLE, "overloaded", True),
    Code.ERROR_CODE_TIMEOUT: ErrorKind(grpc.StatusCode.DEADLINE_EXCEEDED, "timeout", True),
    Code.ERROR_CODE_NETWORK: ErrorKind(grpc.StatusCode.UNAVAILABLE, "network", True),
    Code.ERROR_CODE_CONTENT_FILTERED: ErrorKind(
        grpc.StatusCode.FAILED_PRECONDITION, "content_filtered", False
    ),
    Code.ERROR_CODE_QUOTA_EXCEEDED: ErrorKind(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "quota_exceeded", False
    ),
    Code.ERROR_CODE_CANCELLED: ErrorKind(grpc.StatusCode.CANCELLED, "cancelled", False),
    Code.ERROR_CODE_MODEL_NOT_FOUND: ErrorKind(
        grpc.StatusCode.INVALID_ARGUMENT, "model_not_found", False
    ),
    Code.ERROR_CODE_NOT_FOUND: ErrorKind(grpc.StatusCode.NOT_FOUND, "not_found", False),
    Code.ERROR_CODE_FORBIDDEN: ErrorKind(grpc.StatusCode.PERMISSION_DENIED, "unauthorized", False),
    Code.ERROR_CODE_UNAVAILABLE: ErrorKind(grpc.StatusCode.UNAVAILABLE, "unavailable", True),
}

# For a status that arrives without our metadata (a proxy, a crashed peer).
_FROM_STATUS: dict[grpc.StatusCode, common_pb2.ErrorCode.ValueType] = {
    grpc.StatusCode.INVALID_ARGUMENT: Code.ERROR_CODE_INVALID_REQUEST,
    grpc.StatusCode.NOT_FOUND: Code.ERROR_CODE_NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED: Code.ERROR_CODE_FORBIDDEN,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Code.ERROR_CODE_RATE_LIMITED,
    grpc.StatusCode.UNAVAILABLE: Code.ERROR_CODE_NETWORK,
    grpc.StatusCode.DEADLINE_EXCEEDED: Code.ERROR_CODE_TIMEOUT,
    grpc.StatusCode.CANCELLED: Code.ERROR_CODE_CANCELLED,
}


class ServiceError(Exception):
    """A typed error that any service can raise and any other can read back."""

    def __init__(
        self,
        code: common_pb2.ErrorCode.ValueType,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after_ms: int = 0,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = ERRORS[code].retryable if retryable is None else retryable
        self.retry_after_ms = retry_after_ms

    @property
    def kind(self) -> ErrorKind:
        return ERRORS[self.code]

    @property
    def reason(self) -> str:
        return self.kind.reason

    def to_proto(self) -> common_pb2.Error:
        return common_pb2.Error(
            code=self.code,
            message=self.message,
            retryable=self.retryable,
            retry_after_ms=self.retry_after_ms,
        )

    @classmethod
    def from_proto(cls, error: common_pb2.Error) -> ServiceError:
        code = error.code if error.code in ERRORS else Code.ERROR_CODE_INTERNAL
        return cls(
            code, error.message, retryable=error.retryable, retry_after_ms=error.retry_after_ms
        )

    async def abort(self, context: grpc.aio.ServicerContext[object, object]) -> NoReturn:
        metadata = ((ERROR_METADATA_KEY, self.to_proto().SerializeToString()),)
        await context.abort(self.kind.status, self.message, trailing_metadata=metadata)
        raise AssertionError("context.abort returns only by raising")

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> ServiceError:
        return cls.from_status(error.code(), error.details(), error.trailing_metadata())

    @classmethod
    def from_status(
        cls, status: grpc.StatusCode, details: str | None, metadata: Any = ()
    ) -> ServiceError:
        """The typed error of a gRPC status and its trailing metadata (`abort`'s inverse)."""
        for key, value in metadata or ():
            if key == ERROR_METADATA_KEY and isinstance(value, bytes):
                return cls.from_proto(common_pb2.Error.FromString(value))
        code = _FROM_STATUS.get(status, Code.ERROR_CODE_INTERNAL)
        return cls(code, details or status.name)

    def __repr__(self) -> str:
        name = common_pb2.ErrorCode.Name(self.code)
        return f"ServiceError({name}, {self.message!r}, retryable={self.retryable})"


T = TypeVar("T")


async def typed(call: Awaitable[T]) -> T:
    """A gRPC call's answer, its failure raised as the typed ServiceError (what callers that
    retry or reply in the protocol's form need)."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise ServiceError.from_rpc_error(error) from None


Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Reply = TypeVar("Reply")
Context = TypeVar("Context", bound="grpc.aio.ServicerContext[Any, Any]")


def rpc(
    method: Callable[[Servicer, Request, Context], Awaitable[Reply]],
) -> Callable[[Servicer, Request, Context], Awaitable[Reply]]:
    """A unary servicer method whose `ServiceError`s become the typed gRPC error: the one
    place a raised error turns into a status plus `sb-error-bin` metadata."""

    @functools.wraps(method)
    async def handle(self: Servicer, request: Request, context: Context) -> Reply:
        try:
            return await method(self, request, context)
        except ServiceError as error:
            await error.abort(context)

    return handle
