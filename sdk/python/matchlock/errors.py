"""Errors raised by the matchlock client.

Every error is a :class:`MatchlockError`. Errors answered by the server are
:class:`RPCError` (with ``code``, ``message`` and ``data``), raised as the
subclass that matches the code, so callers can catch classes of failure::

    try:
        client.read_file("/etc/missing")
    except matchlock.NotFoundError:
        ...
"""

import builtins
from typing import Any, Dict, Optional, Type

# Protocol error codes (docs/rpc.md).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SANDBOX_ERROR = -32000
CANCELLED = -32001
UNKNOWN_SANDBOX = -32002
TOO_LARGE = -32003
LIMIT = -32004
NOT_SUPPORTED = -32005
NOT_FOUND = -32006
PERMISSION = -32007
GUEST_ERROR = -32008
UNKNOWN_REQUEST = -32009
SANDBOX_CLOSED = -32010
SESSION_ENDED = -32011


class MatchlockError(Exception):
    """Base class of every error of this package."""


class ClientClosedError(MatchlockError):
    """The client was closed, or the server process exited."""


class ProtocolError(MatchlockError):
    """The server sent something this client does not understand."""


class NoSandboxError(MatchlockError):
    """A sandbox method was called before launch()."""


class TimeoutError(MatchlockError, builtins.TimeoutError):
    """A call's timeout expired; the request was cancelled on the server."""


class RPCError(MatchlockError):
    """An error answered by the server."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


class InvalidRequestError(RPCError):
    """The request or its parameters were refused (-32600, -32602)."""


class NotFoundError(RPCError):
    """A guest path or command does not exist (-32006)."""


class PermissionDeniedError(RPCError):
    """The guest refused: permission denied (-32007)."""


class CancelledError(RPCError):
    """The request was cancelled (-32001)."""


class NotSupportedError(RPCError):
    """Valid, but not supported by this server yet (-32005)."""


class UnknownSandboxError(RPCError):
    """No sandbox with that id in this session (-32002)."""


class LimitError(RPCError):
    """A per-session limit is reached; retry later (-32004)."""


class SandboxClosedError(RPCError):
    """The sandbox was closed or its VM exited (-32010, -32011)."""


_BY_CODE: Dict[int, Type[RPCError]] = {
    INVALID_REQUEST: InvalidRequestError,
    INVALID_PARAMS: InvalidRequestError,
    NOT_FOUND: NotFoundError,
    PERMISSION: PermissionDeniedError,
    CANCELLED: CancelledError,
    NOT_SUPPORTED: NotSupportedError,
    UNKNOWN_SANDBOX: UnknownSandboxError,
    LIMIT: LimitError,
    SANDBOX_CLOSED: SandboxClosedError,
    SESSION_ENDED: SandboxClosedError,
}


def rpc_error(obj: Optional[Dict[str, Any]]) -> RPCError:
    """Build the RPCError subclass for a JSON-RPC error object."""
    obj = obj or {}
    code = obj.get("code")
    if not isinstance(code, int):
        code = INTERNAL_ERROR
    message = str(obj.get("message", "unknown error"))
    return _BY_CODE.get(code, RPCError)(code, message, obj.get("data"))
