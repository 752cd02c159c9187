"""What both fakes share: one loopback HTTP server, the same answers in-process, faults and log.

A fake decides every answer in one method, ``_respond``: a :class:`Request` in, a :class:`Reply`
out, or ``None`` to drop the connection unanswered. :class:`FakeServer` serves that method over
real HTTP on ``127.0.0.1`` from a daemon thread, and :meth:`FakeServer.handler` calls the same
method for an ``httpx.Request``, so ``httpx.MockTransport(fake.handler)`` gets the same answers
without a socket. It also keeps the fault queue and the call log both fakes have.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, ClassVar, Generic, Self, TypeVar
from urllib.parse import urlsplit

import httpx

F = TypeVar("F")
C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a fake sees it, from a socket or in-process.

    ``body`` is ``None`` when it could not be read (a bad length, or over the fake's limit).
    ``wait(seconds)`` holds the answer that long in real time and says whether to give it up,
    which is true once the server is stopping.
    """

    method: str
    path: str
    headers: httpx.Headers
    body: bytes | None
    wait: Callable[[float], bool]


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer; ``chunks`` makes it a chunked body, as the real wrapper streams."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    chunks: tuple[bytes, ...] | None = None
    close: bool = False
    #: Real seconds between chunks; 0 sends them all in one write.
    gap: float = 0.0
    #: Keep a chunked body open after its last chunk, never ending it, until the server stops.
    hold: bool = False


def phrase(code: int) -> str:
    """The reason phrase of an HTTP status, ``Error`` for one the standard does not name."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def verbatim(status: int, body: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """``body`` sent as it is, typed as what it looks like: JSON, HTML or plain text."""
    try:
        json.loads(body)
    except ValueError:
        content_type = "text/html; charset=utf-8" if body.lstrip().startswith("<") else "text/plain"
    else:
        content_type = "application/json"
    return Reply(status, body.encode(), content_type, headers)


def check_status(code: object) -> None:
    """Refuse a fault status that is not an HTTP status."""
    if isinstance(code, bool) or not isinstance(code, int) or not 200 <= code <= 599:
        raise ValueError(f"code must be an HTTP status between 200 and 599, got {code!r}")


def check_seconds(seconds: object) -> float:
    """``seconds`` as a float, refusing anything but a positive finite number."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    return float(seconds)


class FakeServer(Generic[F, C]):
    """The base of both fakes: lifecycle, the in-process handler, the fault queue, the call log.

    A subclass answers in ``_respond``, takes faults with ``_take_fault`` and logs its calls with
    ``_record_locked`` under ``_lock``, which is also the condition :meth:`wait_for_calls` waits on.
    """

    _fault_type: ClassVar[type]
    # The wrapper's uvicorn keeps connections open (HTTP/1.1); the provider closes each one.
    _persistent: ClassVar[bool] = False
    _max_body: ClassVar[int]
    _server_header: ClassVar[str | None] = None

    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._faults: deque[F] = deque()
        self._calls: list[C] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free port on ``127.0.0.1`` and serve in a daemon thread; a no-op if running."""
        if self._server is not None:
            return self
        server = _Server(self)
        thread = threading.Thread(
            target=server.serve_forever,
            # shutdown() waits up to one poll interval; keep stop() quick for per-test fakes.
            kwargs={"poll_interval": 0.005},
            name=f"{type(self).__name__}:{server.server_port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving, close the port and open connections; held requests are dropped.

        Idempotent.
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:<port>``."""
        url = self._url_or_none()
        if url is None:
            raise RuntimeError(
                f"the {type(self).__name__} is not running; call start() or use `with`"
            )
        return url

    def _url_or_none(self) -> str | None:
        server = self._server
        return None if server is None else f"http://127.0.0.1:{server.server_port}"

    def handler(self, request: httpx.Request) -> httpx.Response:
        """Answer ``request`` in-process as the server would: ``httpx.MockTransport(fake.handler)``.

        No socket and no :meth:`start` are needed; the URL's host is ignored. What needs a socket
        gets its nearest equivalent: a dropped connection raises ``httpx.RemoteProtocolError``; a
        hold (latency, a timeout or delay fault) longer than the request's read timeout lasts
        that timeout, then the fake finishes the request (rotating, logging) without the rest of
        the hold and ``httpx.ReadTimeout`` is raised. Streams arrive in one piece. Async clients
        work too, though a hold blocks their event loop.
        """
        body = request.read()
        patience = _Patience(request)
        reply = self._respond(
            Request(
                request.method,
                request.url.path,
                request.headers,
                body if len(body) <= self._max_body else None,
                patience,
            )
        )
        if patience.expired:
            raise httpx.ReadTimeout("timed out", request=request)
        if reply is None:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        headers = [("Content-Type", reply.content_type), *reply.headers]
        if reply.chunks is not None:
            headers.append(("Transfer-Encoding", "chunked"))
        content = reply.body if reply.chunks is None else b"".join(reply.chunks)
        return httpx.Response(reply.status, headers=headers, content=content)

    def _respond(self, request: Request) -> Reply | None:
        raise NotImplementedError

    # -- faults and log ------------------------------------------------------------------

    def fail_next(self, *faults: F) -> None:
        """Queue ``faults``; each refresh or message request takes the next one, in order.

        A request the wrapper refuses with a 422 takes none, as FastAPI answers it first.
        """
        for fault in faults:
            if not isinstance(fault, self._fault_type):
                raise TypeError(
                    f"expected {self._fault_type.__name__} instances, got {type(fault).__name__}"
                )
        with self._lock:
            self._faults.extend(faults)

    def clear_faults(self) -> int:
        """Drop every queued fault no request has taken yet; return how many were dropped."""
        with self._lock:
            dropped = len(self._faults)
            self._faults.clear()
            return dropped

    @property
    def pending_faults(self) -> int:
        """How many queued faults no request has taken yet."""
        with self._lock:
            return len(self._faults)

    def reset_log(self) -> None:
        """Forget the call log; faults, tokens and files stay."""
        with self._lock:
            self._calls.clear()

    def wait_for_calls(self, count: int, *, timeout: float = 5.0) -> list[C]:
        """Block until at least ``count`` requests are logged; return the log.

        For requests still held on the server's threads, such as a timeout or delay fault the
        client has already given up on. Raises ``TimeoutError`` after ``timeout`` real seconds.
        """
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._calls) >= count, timeout):
                raise TimeoutError(
                    f"the {type(self).__name__} logged {len(self._calls)} calls, not {count}, "
                    f"within {timeout} s"
                )
            return list(self._calls)

    def _logged(self) -> list[C]:
        with self._lock:
            return list(self._calls)

    def _count(self, test: Callable[[C], bool] = lambda call: True) -> int:
        """How many logged calls pass ``test``."""
        with self._lock:
            return sum(1 for call in self._calls if test(call))

    def _take_fault(self) -> F | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record_locked(self, call: C) -> None:
        self._calls.append(call)
        self._lock.notify_all()


class _Patience:
    """The in-process ``wait``: real time, up to the client's read timeout and no further."""

    def __init__(self, request: httpx.Request) -> None:
        read = request.extensions.get("timeout", {}).get("read")
        self.deadline = None if read is None else time.monotonic() + read
        self.expired = False

    def __call__(self, seconds: float) -> bool:
        if self.deadline is not None and time.monotonic() + seconds > self.deadline:
            # The client gives up here: the rest of the hold is skipped, the work still done.
            time.sleep(max(0.0, self.deadline - time.monotonic()))
            self.expired = True
        else:
            time.sleep(seconds)
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Engine tests start dozens of concurrent refreshes and benchmarks open many connections at
    # once; the default backlog of 5 would make some of them wait on SYN retries.
    request_queue_size = 128

    def __init__(self, fake: FakeServer[Any, Any]) -> None:
        self.fake = fake
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a machine
        # without working reverse DNS; a loopback fake needs no name.
        TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def close_connections(self) -> None:
        """Wake handlers idling on keep-alive connections, so nothing is served after stop()."""
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    continue


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # Headers and body go out in two writes; with Nagle the second waits for a delayed ACK.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        if self.server.fake._persistent:
            # A client sends thousands of calls over one connection.
            self.protocol_version = "HTTP/1.1"
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            return

    def version_string(self) -> str:
        return self.server.fake._server_header or super().version_string()

    def log_message(self, format: str, *args: Any) -> None:
        # Silence BaseHTTPRequestHandler's stderr log: the fakes never log anything.
        return

    def _serve(self) -> None:
        body = self._read_body()
        if body is None:
            # The unread body is still on the connection: nothing more can be read from it.
            self.close_connection = True
        request = Request(
            self.command,
            urlsplit(self.path).path,
            httpx.Headers(list(self.headers.items())),
            body,
            self.server.stopping.wait,
        )
        self._send(self.server.fake._respond(request))

    # BaseHTTPRequestHandler dispatches on these names; the fake decides what each method gets.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve  # noqa: N815

    def _read_body(self) -> bytes | None:
        """The request body, or ``None`` when it is malformed or too large."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if not 0 <= length <= self.server.fake._max_body:
            return None
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                size = -1
            total += size
            if size < 0 or total > self.server.fake._max_body:
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    continue
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send(self, reply: Reply | None) -> None:
        if reply is None:
            # A dropped request, or one held while stopping: close without a word.
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers:
                self.send_header(name, value)
            if reply.close:
                self.send_header("Connection", "close")
                self.close_connection = True
            if reply.chunks is None:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            end = b"" if reply.hold else b"0\r\n\r\n"
            if not reply.gap:
                # Sent in one go, as the buffered /v1/messages stream is.
                framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in reply.chunks)
                self.wfile.write(framed + end)
            else:
                for index, chunk in enumerate(reply.chunks):
                    if index and self.server.stopping.wait(reply.gap):
                        self.close_connection = True
                        return
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(end)
            if reply.hold:
                self.wfile.flush()
                self.server.stopping.wait()
                self.close_connection = True
        except OSError:
            # The client gave up (a timeout or delay fault) and closed its end.
            self.close_connection = True
