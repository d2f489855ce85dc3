"""Python client of matchlock: run code in throwaway micro-VMs.

    from matchlock import Client, Config, Sandbox

    with Client(Config()) as client:
        client.launch(Sandbox("alpine:latest").with_cpus(2))
        print(client.exec("echo hello").stdout)

The client runs ``matchlock rpc`` (from ``$MATCHLOCK_BIN`` or ``$PATH``) and
speaks its JSON-RPC protocol; see docs/rpc.md in the matchlock repository.
Standard library only.
"""

from .client import CHUNK_SIZE, PROTOCOL_VERSION, Client, Config, ExecResult, FileInfo
from .errors import (
    CancelledError,
    ClientClosedError,
    InvalidRequestError,
    LimitError,
    MatchlockError,
    NoSandboxError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    ProtocolError,
    RPCError,
    SandboxClosedError,
    TimeoutError,
    UnknownSandboxError,
)
from .sandbox import Sandbox

__version__ = "0.1.0"

__all__ = [
    "CHUNK_SIZE", "PROTOCOL_VERSION", "Client", "Config", "ExecResult", "FileInfo", "Sandbox",
    "MatchlockError", "RPCError", "ClientClosedError", "ProtocolError", "NoSandboxError", "TimeoutError",
    "InvalidRequestError", "NotFoundError", "PermissionDeniedError", "CancelledError", "NotSupportedError",
    "UnknownSandboxError", "LimitError", "SandboxClosedError",
]
