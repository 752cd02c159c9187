"""A loopback TCP proxy in front of a real server, which a test can cut off and restore.

Stores opened through :attr:`FaultProxy.port` reach the real server as long as the proxy is up.
:meth:`FaultProxy.cut` makes the server unreachable the way a network partition or a server
restart does: every open connection is torn down in both directions and the port stops
listening, so new connections are refused. :meth:`FaultProxy.restore` listens again on the
same port. The bytes in between are passed on untouched, whatever the protocol, each read
:attr:`FaultProxy.latency` seconds late (0 unless a test sets it: a slow network or server).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

# Bytes a pump moves per read; any size works, this one keeps a packet in one read.
_CHUNK = 65536


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream``, with connections that can be cut at will."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        #: Seconds each read waits before it is passed on, in either direction.
        self.latency = 0.0
        self.port = self._listen(0)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_cut(self) -> bool:
        """Whether the proxy refuses connections right now."""
        with self._lock:
            return self._listener is None

    def cut(self) -> None:
        """Tear down every open connection and refuse new ones until :meth:`restore`."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
        if listener is not None:
            _close(listener)
        for connection in connections:
            _close(connection)

    def restore(self) -> None:
        """Accept connections on the same port again."""
        if self.is_cut:
            self._listen(self.port)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """Cut for the duration of the block, then restore."""
        self.cut()
        try:
            yield
        finally:
            self.restore()

    def close(self) -> None:
        """Cut for good and wait for the proxy's threads."""
        self.cut()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(5)

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        bound: int = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        self._start(self._accept, listener)
        return bound

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [known for known in self._threads if known.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by cut()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    # Cut while connecting: this connection belongs to the outage.
                    _close(client)
                    _close(server)
                    return
                self._connections.update((client, server))
            self._start(self._pump, client, server)
            self._start(self._pump, server, client)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(_CHUNK):
                if self.latency:
                    time.sleep(self.latency)
                target.sendall(data)
        except OSError:
            pass
        # One side ended: end both, as the kernel would for a proxied connection.
        with self._lock:
            self._connections.discard(source)
            self._connections.discard(target)
        _close(source)
        _close(target)


def _close(sock: socket.socket) -> None:
    """Shut ``sock`` down in both directions (waking threads blocked on it) and close it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
