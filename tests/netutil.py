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


def echo(conn: socket.socket) -> None:
    """A :class:`LocalService` handler that sends every byte back."""
    while data := conn.recv(65536):
        conn.sendall(data)


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


MSG_NEWKEYS = 21  # RFC 4253 7.3


def first_encrypted_offset(stream: bytes) -> int | None:
    """Where the first encrypted packet starts in a client's byte stream, once its NEWKEYS is in ``stream``.

    Before NEWKEYS, SSH packets are clear: a 4-byte length, then that many
    bytes, the message type after the padding-length byte (RFC 4253 6).
    """
    line_end = stream.find(b"\n")
    if line_end < 0:
        return None
    at = line_end + 1
    while at + 6 <= len(stream):
        length = int.from_bytes(stream[at:at + 4], "big")
        if stream[at + 5] == MSG_NEWKEYS:
            return at + 4 + length
        at += 4 + length
    return None


class CorruptingProxy:
    """A TCP relay to ``port`` that flips one bit of what the client sends, for one connection.

    The bit is in the byte at offset ``after`` of the client's stream, or, with
    ``after_newkeys``, that many bytes into the first packet encrypted with
    the negotiated keys (what a transport reads before any session runs).
    """

    def __init__(self, port: int, after: int = 0, after_newkeys: int | None = None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.after: int | None = None if after_newkeys is not None else after
        self.after_newkeys = after_newkeys
        self.flipped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.target))
        self.socks += [conn, up]
        for src, dst, flip in ((conn, up, True), (up, conn, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, flip), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        history = bytearray()
        try:
            while data := src.recv(65536):
                if flip and self.after is None and self.after_newkeys is not None:
                    history += data
                    start = first_encrypted_offset(bytes(history))
                    if start is not None:
                        self.after = start + self.after_newkeys
                if flip and self.after is not None and seen <= self.after < seen + len(data):
                    i = self.after - seen
                    data = data[:i] + bytes((data[i] ^ 0x01,)) + data[i + 1:]
                    self.flipped.set()
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for t in self.threads:
            t.join(10)
        for s in self.socks:
            s.close()
