"""The client: runs ``matchlock rpc`` and speaks its JSON-RPC protocol.

One reader thread reads the server's lines and hands each response to the
call waiting for its id, and each notification to the handler of the
request it names; so any number of threads may use one Client at once.
"""

import base64
import codecs
import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from . import errors
from .sandbox import Sandbox

PROTOCOL_VERSION = 1

#: Payload bytes of one stdin or write_file_chunk request.
CHUNK_SIZE = 512 * 1024
#: Longest line accepted from the server (exec results are at most ~12 MiB).
MAX_LINE = 64 * 1024 * 1024
#: How long a cancelled call waits for the server to confirm the cancel.
CANCEL_GRACE = 2.0

Command = Union[str, Sequence[str]]
Output = Union[None, IO[Any], Callable[[bytes], Any]]
Input = Union[None, bytes, str, IO[Any], Iterable[bytes]]


@dataclass
class Config:
    """How to start the server.

    binary_path: the matchlock binary; default ``$MATCHLOCK_BIN``, else
        ``matchlock`` from ``$PATH``.
    args: extra arguments after ``matchlock rpc`` (e.g. ``["--pull=never"]``).
    env: extra environment variables for the server.
    stderr: where the server's standard error (notices) goes; default
        inherited from this process.
    start_timeout: seconds to wait for the server to answer its first ping.
    """

    binary_path: Optional[str] = None
    args: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    stderr: Optional[IO[Any]] = None
    start_timeout: float = 30.0


@dataclass
class ExecResult:
    """How a command ended. ``stdout``/``stderr`` are decoded UTF-8 (invalid
    bytes replaced); ``stdout_bytes``/``stderr_bytes`` are the raw bytes.
    Both are empty for the streaming calls, whose output went to writers."""

    exit_code: int
    signal: int = 0
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    duration_ms: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class FileInfo:
    name: str
    size: int
    mode: int
    is_dir: bool
    mtime: int


class _Pending:
    __slots__ = ("method", "event", "response", "on_note", "lock", "abandoned")

    def __init__(self, method: str, on_note: Optional[Callable[[str, Dict[str, Any]], None]]) -> None:
        self.method = method
        self.event = threading.Event()
        self.response: Optional[Dict[str, Any]] = None
        self.on_note = on_note
        self.lock = threading.Lock()  # serialises notes with abandonment
        self.abandoned = False


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(s: Optional[str]) -> bytes:
    return base64.b64decode(s) if s else b""


class _Writer:
    """Adapts an output target: a binary or text file object, or a callable
    taking bytes. Text targets get UTF-8 decoded incrementally."""

    def __init__(self, target: Output) -> None:
        self.target = target
        self.error: Optional[BaseException] = None
        self._decoder = None
        self._raw: Optional[Any] = None
        if target is None or callable(target) and not hasattr(target, "write"):
            return
        buf = getattr(target, "buffer", None)
        if buf is not None and hasattr(buf, "write"):
            self._raw = buf  # sys.stdout and friends: write bytes to the buffer
        elif isinstance(target, io.TextIOBase):
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, data: bytes) -> None:
        if self.target is None or self.error is not None:
            return
        try:
            if self._raw is not None:
                self.target.flush()  # type: ignore[union-attr]
                self._raw.write(data)
                self._raw.flush()
            elif self._decoder is not None:
                self.target.write(self._decoder.decode(data))  # type: ignore[union-attr]
            elif hasattr(self.target, "write"):
                self.target.write(data)  # type: ignore[union-attr]
            else:
                self.target(data)  # type: ignore[operator]
        except BaseException as e:  # a broken writer must not kill the reader thread
            self.error = e

    def finish(self) -> None:
        if self._decoder is not None and self.error is None:
            rest = self._decoder.decode(b"", final=True)
            if rest:
                self.target.write(rest)  # type: ignore[union-attr]


def _chunks(data: Input) -> Iterable[bytes]:
    if data is None:
        return
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        for off in range(0, len(mv), CHUNK_SIZE):
            yield bytes(mv[off:off + CHUNK_SIZE])
        return
    read = getattr(data, "read", None)
    if read is not None:
        read1 = getattr(data, "read1", None)  # returns what is available: interactive input flows
        while True:
            b = read1(CHUNK_SIZE) if read1 is not None else read(CHUNK_SIZE)
            if not b:
                return
            yield b.encode("utf-8") if isinstance(b, str) else b
    for b in data:  # type: ignore[union-attr]
        if isinstance(b, str):
            b = b.encode("utf-8")
        for off in range(0, len(b), CHUNK_SIZE):
            yield b[off:off + CHUNK_SIZE]


class Client:
    """A connection to one ``matchlock rpc`` process.

    Use it as a context manager (or call :meth:`close`): closing ends the
    server, which closes every sandbox this client launched. Sandbox methods
    act on the current sandbox (the one launched last, or chosen with
    :meth:`use`) unless given ``sandbox_id``.

    Every call takes ``timeout`` (seconds, None = no limit); when it
    expires the request is cancelled on the server (a command is killed)
    and :class:`matchlock.TimeoutError` is raised.
    """

    def __init__(self, config: Optional[Config] = None) -> None:
        self.config = config or Config()
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._pending: Dict[int, _Pending] = {}
        self._next = 0
        self._closed: Optional[BaseException] = None
        self._current: Optional[str] = None
        self._stderr_tail: List[bytes] = []
        binary = self.config.binary_path or os.environ.get("MATCHLOCK_BIN") or shutil.which("matchlock")
        if not binary:
            raise errors.MatchlockError(
                "the matchlock binary is not in $PATH (set MATCHLOCK_BIN or Config(binary_path=...))")
        env = dict(os.environ)
        env.update(self.config.env)
        try:
            self._proc = subprocess.Popen(
                [binary, "rpc", *self.config.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self.config.stderr, env=env)
        except OSError as e:
            raise errors.MatchlockError(f"start {binary} rpc: {e}") from e
        self._reader = threading.Thread(target=self._read_loop, name="matchlock-reader", daemon=True)
        self._reader.start()
        try:
            pong = self._call("ping", {}, timeout=self.config.start_timeout)
        except BaseException:
            self.close()
            raise
        if pong.get("protocol_version") != PROTOCOL_VERSION:
            self.close()
            raise errors.ProtocolError(
                f"server speaks protocol {pong.get('protocol_version')}, this client {PROTOCOL_VERSION}")

    # --- lifecycle -------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> None:
        """End the session: every sandbox is closed and the server exits.
        Waits up to ``timeout`` seconds, then kills the server."""
        with self._lock:
            if self._closed is None:
                self._closed = errors.ClientClosedError("client closed")
            pending = list(self._pending.values())
        for p in pending:
            p.event.set()
        try:
            with self._wlock:
                if self._proc.stdin:
                    self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not threading.current_thread():
            self._reader.join(5)  # it ends at the server's EOF
        if self._proc.stdout and not self._reader.is_alive():
            self._proc.stdout.close()

    @property
    def current(self) -> Optional[str]:
        """The id of the current sandbox, or None."""
        return self._current

    def use(self, sandbox_id: str) -> None:
        """Make another sandbox of this client current."""
        self._current = sandbox_id

    # --- transport -------------------------------------------------------

    def _read_loop(self) -> None:
        out = self._proc.stdout
        assert out is not None
        err: BaseException = errors.ClientClosedError("the server exited")
        try:
            while True:
                line = out.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE:
                    err = errors.ProtocolError(f"a line from the server is longer than {MAX_LINE} bytes")
                    break
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    err = errors.ProtocolError(f"bad line from the server: {e}")
                    break
                if not isinstance(msg, dict):
                    continue
                if "method" in msg:
                    self._deliver_note(msg)
                    continue
                mid = msg.get("id")
                with self._lock:
                    p = self._pending.pop(mid, None) if isinstance(mid, int) else None
                if p is not None:
                    p.response = msg
                    p.event.set()
        except (OSError, ValueError) as e:
            err = errors.ClientClosedError(f"reading from the server: {e}")
        with self._lock:
            if self._closed is None:
                self._closed = err
            pending = list(self._pending.values())
        for p in pending:
            p.event.set()

    def _deliver_note(self, msg: Dict[str, Any]) -> None:
        params = msg.get("params")
        if not isinstance(params, dict):
            return
        rid = params.get("request_id")
        with self._lock:
            p = self._pending.get(rid) if isinstance(rid, int) else None
        if p is None or p.on_note is None:
            return
        with p.lock:
            if not p.abandoned:
                p.on_note(msg["method"], params)

    def _write(self, obj: Dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"
        with self._wlock:
            with self._lock:
                closed = self._closed
            if closed is not None:
                raise closed
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except (OSError, ValueError) as e:
                with self._lock:
                    if self._closed is None:
                        self._closed = errors.ClientClosedError(f"writing to the server: {e}")
                raise errors.ClientClosedError(f"writing to the server: {e}") from e

    def _send(self, method: str, params: Dict[str, Any],
              on_note: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> "tuple[int, _Pending]":
        p = _Pending(method, on_note)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            self._next += 1
            rid = self._next
            self._pending[rid] = p
        try:
            self._write({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        return rid, p

    def _notify(self, method: str, params: Dict[str, Any]) -> None:
        try:
            self._write({"jsonrpc": "2.0", "method": method, "params": params})
        except errors.MatchlockError:
            pass

    def _await(self, rid: int, p: _Pending, timeout: Optional[float]) -> Dict[str, Any]:
        if not p.event.wait(timeout):
            with p.lock:
                p.abandoned = True
            self._notify("cancel", {"request_id": rid})
            p.event.wait(CANCEL_GRACE)  # so that a killed command is gone when we raise
            raise errors.TimeoutError(f"{p.method}: no answer in {timeout} s; the request was cancelled")
        resp = p.response
        if resp is None:
            with self._lock:
                closed = self._closed
            raise closed or errors.ClientClosedError("client closed")
        if "error" in resp and resp["error"] is not None:
            raise errors.rpc_error(resp["error"])
        result = resp.get("result")
        return result if isinstance(result, dict) else {}

    def _call(self, method: str, params: Dict[str, Any], on_note: Any = None,
              timeout: Optional[float] = None) -> Dict[str, Any]:
        rid, p = self._send(method, params, on_note)
        return self._await(rid, p, timeout)

    def _sid(self, sandbox_id: Optional[str]) -> str:
        sid = sandbox_id or self._current
        if not sid:
            raise errors.NoSandboxError("no sandbox: call launch() first")
        return sid

    # --- sandboxes -------------------------------------------------------

    def launch(self, sandbox: Sandbox, timeout: Optional[float] = None) -> str:
        """Boot a sandbox, make it current, and return its id."""
        res = self._call("create", sandbox.to_params(), timeout=timeout)
        sid = res.get("id")
        if not isinstance(sid, str):
            raise errors.ProtocolError(f"create returned no id: {res!r}")
        self._current = sid
        return sid

    def close_sandbox(self, sandbox_id: Optional[str] = None, timeout: Optional[float] = None) -> None:
        """Stop a sandbox (default: the current one) and remove its files."""
        sid = self._sid(sandbox_id)
        try:
            self._call("close", {"id": sid}, timeout=timeout)
        finally:
            if self._current == sid:
                self._current = None

    # --- exec ------------------------------------------------------------

    @staticmethod
    def _exec_params(sid: str, cmd: Command, env: Optional[Dict[str, str]], workdir: Optional[str],
                     user: Optional[str]) -> Dict[str, Any]:
        p: Dict[str, Any] = {"id": sid}
        if isinstance(cmd, str):
            p["command"] = cmd  # run with /bin/sh -c
        else:
            p["argv"] = list(cmd)
        if env:
            p["env"] = dict(env)
        if workdir:
            p["workdir"] = workdir
        if user:
            p["user"] = user
        return p

    @staticmethod
    def _result(res: Dict[str, Any]) -> ExecResult:
        return ExecResult(
            exit_code=int(res.get("exit_code", -1)), signal=int(res.get("signal", 0)),
            stdout_bytes=_unb64(res.get("stdout")), stderr_bytes=_unb64(res.get("stderr")),
            duration_ms=int(res.get("duration_ms", 0)),
            stdout_truncated=bool(res.get("stdout_truncated")), stderr_truncated=bool(res.get("stderr_truncated")))

    def exec(self, cmd: Command, *, env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None,
             user: Optional[str] = None, stdin: Union[None, bytes, str] = None,
             timeout: Optional[float] = None, sandbox_id: Optional[str] = None) -> ExecResult:
        """Run a command and return its buffered output (at most 4 MiB per
        stream). A string runs with ``/bin/sh -c``; a list is an argv. A
        command that fails is not an exception: look at ``exit_code``."""
        p = self._exec_params(self._sid(sandbox_id), cmd, env, workdir, user)
        if stdin is not None:
            p["stdin"] = _b64(stdin.encode("utf-8") if isinstance(stdin, str) else stdin)
        return self._result(self._call("exec", p, timeout=timeout))

    def exec_stream(self, cmd: Command, stdout: Output = None, stderr: Output = None, *,
                    env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None,
                    user: Optional[str] = None, timeout: Optional[float] = None,
                    sandbox_id: Optional[str] = None) -> ExecResult:
        """Run a command, writing its output to ``stdout`` and ``stderr`` as
        it comes (file objects, text or binary, or callables taking bytes).
        The writers run on the reader thread: keep them quick, and do not
        call the client from them."""
        p = self._exec_params(self._sid(sandbox_id), cmd, env, workdir, user)
        return self._run_streaming("exec_stream", p, None, stdout, stderr, timeout)

    def exec_pipe(self, cmd: Command, stdin: Input, stdout: Output = None, stderr: Output = None, *,
                  env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None,
                  user: Optional[str] = None, timeout: Optional[float] = None,
                  sandbox_id: Optional[str] = None) -> ExecResult:
        """Like exec_stream, with ``stdin`` (bytes, str, a file object or an
        iterable of bytes) copied to the command, then EOF."""
        p = self._exec_params(self._sid(sandbox_id), cmd, env, workdir, user)
        return self._run_streaming("exec_pipe", p, stdin, stdout, stderr, timeout)

    def exec_tty(self, cmd: Command, stdin: Input = None, stdout: Output = None, *, rows: int = 24,
                 cols: int = 80, env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None,
                 user: Optional[str] = None, timeout: Optional[float] = None,
                 sandbox_id: Optional[str] = None) -> ExecResult:
        """Run a command on a pseudo-terminal; its output (stderr included)
        goes to ``stdout``."""
        p = self._exec_params(self._sid(sandbox_id), cmd, env, workdir, user)
        p["rows"], p["cols"] = rows, cols
        return self._run_streaming("exec_tty", p, stdin, stdout, None, timeout)

    def _run_streaming(self, method: str, params: Dict[str, Any], stdin: Input, stdout: Output,
                       stderr: Output, timeout: Optional[float]) -> ExecResult:
        outs = {"stdout": _Writer(stdout), "stderr": _Writer(stderr)}

        def on_note(m: str, n: Dict[str, Any]) -> None:
            if m == "exec_output":
                w = outs.get(n.get("stream", ""))
                if w is not None:
                    w.write(_unb64(n.get("data")))

        deadline = None if timeout is None else time.monotonic() + timeout
        rid, p = self._send(method, params, on_note)
        feeder = None
        stdin_err: List[BaseException] = []
        if stdin is not None:
            feeder = threading.Thread(target=self._feed, args=(rid, stdin, p, stdin_err),
                                      name="matchlock-stdin", daemon=True)
            feeder.start()
        res = self._await(rid, p, None if deadline is None else max(0.0, deadline - time.monotonic()))
        for w in outs.values():
            w.finish()
            if w.error is not None:
                raise errors.MatchlockError(f"writing output: {w.error}") from w.error
        if stdin_err:
            raise errors.MatchlockError(f"copying stdin: {stdin_err[0]}") from stdin_err[0]
        return self._result(res)

    def _feed(self, rid: int, stdin: Input, owner: _Pending, failed: List[BaseException]) -> None:
        """Send stdin chunk by chunk, each acknowledged before the next."""
        try:
            for chunk in _chunks(stdin):
                if owner.event.is_set():
                    return
                self._call("stdin", {"request_id": rid, "data": _b64(chunk)})
            if not owner.event.is_set():
                self._call("stdin", {"request_id": rid, "eof": True})
        except errors.RPCError as e:
            if e.code not in (errors.UNKNOWN_REQUEST, errors.CANCELLED, errors.SANDBOX_CLOSED,
                              errors.SESSION_ENDED):
                failed.append(e)
        except errors.ClientClosedError:
            pass
        except BaseException as e:  # the caller's stdin failed
            failed.append(e)
            self._notify("cancel", {"request_id": rid})

    # --- files -----------------------------------------------------------

    def write_file(self, path: str, content: Input, mode: int = 0o644, timeout: Optional[float] = None,
                   sandbox_id: Optional[str] = None) -> int:
        """Write ``content`` (bytes, str, a file object or an iterable of
        bytes) to ``path`` in the guest, in chunks; returns the size."""
        sid = self._sid(sandbox_id)
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> Optional[float]:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        handle = self._call("write_file_open", {"id": sid, "path": path, "mode": mode}, timeout=left())["handle"]
        digest = hashlib.sha256()
        n = 0
        try:
            for chunk in _chunks(content):
                digest.update(chunk)
                n += len(chunk)
                self._call("write_file_chunk", {"handle": handle, "data": _b64(chunk)}, timeout=left())
        except BaseException:
            self._notify("write_file_close", {"handle": handle, "abort": True})
            raise
        res = self._call("write_file_close", {"handle": handle}, timeout=left())
        if res.get("size") != n or res.get("sha256") != digest.hexdigest():
            raise errors.ProtocolError(f"wrote {n} bytes, the server took {res.get('size')}")
        return n

    def read_file(self, path: str, dest: Optional[IO[bytes]] = None, timeout: Optional[float] = None,
                  sandbox_id: Optional[str] = None) -> Union[bytes, int]:
        """Read a guest file. Returns its bytes, or with ``dest`` (a binary
        file object) streams into it and returns the size."""
        sid = self._sid(sandbox_id)
        digest = hashlib.sha256()
        parts: List[bytes] = []
        state = {"n": 0}

        def on_note(m: str, n: Dict[str, Any]) -> None:
            if m != "read_file_chunk":
                return
            data = _unb64(n.get("data"))
            digest.update(data)
            state["n"] += len(data)
            if dest is not None:
                dest.write(data)
            else:
                parts.append(data)

        res = self._call("read_file", {"id": sid, "path": path}, on_note, timeout=timeout)
        if res.get("size") != state["n"] or res.get("sha256") != digest.hexdigest():
            raise errors.ProtocolError(f"read {state['n']} bytes of {res.get('size')}: checksum mismatch")
        return state["n"] if dest is not None else b"".join(parts)

    def list_files(self, path: str, timeout: Optional[float] = None,
                   sandbox_id: Optional[str] = None) -> List[FileInfo]:
        """List a guest directory."""
        res = self._call("list_files", {"id": self._sid(sandbox_id), "path": path}, timeout=timeout)
        return [FileInfo(name=f["name"], size=f["size"], mode=f["mode"], is_dir=f["is_dir"], mtime=f["mtime"])
                for f in res.get("files", [])]

    # --- network ---------------------------------------------------------

    def allow_list_add(self, *hosts: str, timeout: Optional[float] = None,
                       sandbox_id: Optional[str] = None) -> List[str]:
        """Add host patterns to the running sandbox's allow-list."""
        res = self._call("allow_list_add", {"id": self._sid(sandbox_id), "hosts": list(hosts)}, timeout=timeout)
        return list(res.get("allow_hosts", []))

    def allow_list_delete(self, *hosts: str, timeout: Optional[float] = None,
                          sandbox_id: Optional[str] = None) -> List[str]:
        """Remove host patterns from the running sandbox's allow-list."""
        res = self._call("allow_list_delete", {"id": self._sid(sandbox_id), "hosts": list(hosts)}, timeout=timeout)
        return list(res.get("allow_hosts", []))

    def port_forward(self, guest_port: int, host_addr: Optional[str] = None, timeout: Optional[float] = None,
                     sandbox_id: Optional[str] = None) -> str:
        """Forward a host address (default 127.0.0.1, any free port) to a
        guest port; returns the bound address."""
        p: Dict[str, Any] = {"id": self._sid(sandbox_id), "guest_port": guest_port}
        if host_addr:
            p["host_addr"] = host_addr
        return str(self._call("port_forward", p, timeout=timeout).get("host_addr", ""))
