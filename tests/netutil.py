"""Loopback helpers shared by the real-peer tests and the benchmark (no pytest needed)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Poll until something accepts on 127.0.0.1:port (bounded, exponential back-off).

    Raises:
        TimeoutError: nothing accepted within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class LocalService:
    """A TCP service on 127.0.0.1 that runs ``handle(conn)`` for each connection in its own thread.

    Stands for what a plain X2Go tunnel reaches (the sound daemon).  ``close()``
    stops accepting (shutdown wakes a thread blocked in ``accept()``; close
    alone does not on Linux) and joins every thread it started.
    """

    def __init__(self, handle: Callable[[socket.socket], None], name: str = "local-service",
                 backlog: int = 128) -> None:
        self.handle = handle
        self.name = name
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.handlers: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._serve, daemon=True, name=name)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._run, args=(conn,), daemon=True, name=self.name + "-handler")
            self.handlers = [h for h in self.handlers if h.is_alive()] + [t]
            t.start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handle(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)
        for t in self.handlers:
            t.join(10)
        assert not self.thread.is_alive()
