"""A full tunnel scenario, run in a fresh interpreter after gevent.monkey.patch_all().

python-x2go runs monkey-patched: threads are greenlets, sockets and locks
cooperative.  Prints one "ok <step>" line per step; exits non-zero on failure.
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

import paramiko  # noqa: E402

from x2go_sftp import X2GoRevFwTunnel, X2GoRevFwTunnelToSFTP, paramiko_compat, tuning  # noqa: E402
from x2go_sftp.defaults import current_local_user  # noqa: E402
from x2go_sftp.testing import LoopbackX2GoServer, sftp_client  # noqa: E402


def step(name: str) -> None:
    sys.stdout.write(f"ok {name}\n")
    sys.stdout.flush()


class Sessions:
    """The tunnel's session observer: the engines of the sessions running now."""

    def __init__(self) -> None:
        self.live: list = []

    def session_started(self, engine) -> None:
        self.live.append(engine)

    def session_ended(self, engine) -> None:
        self.live.remove(engine)


def os_threads() -> int:
    """Native threads of this process (under the patching, threading shows greenlets)."""
    return len(os.listdir("/proc/self/task"))


def wait_until(condition, timeout: float = 20.0) -> bool:
    """Bounded polling of a real condition (cooperative: gevent's sleep)."""
    import gevent

    delay = 0.002
    for _ in range(int(timeout / 0.1) + 20):
        if condition():
            return True
        gevent.sleep(delay)
        delay = min(delay * 2, 0.1)
    return condition()


def gevent_waits_in(files: tuple[str, ...], work) -> tuple[int, int]:
    """While ``work()`` runs: (gevent lock acquisitions made in ``files``, gevent Timeouts made with them on the stack)."""
    import gevent.thread
    import gevent.timeout

    counts = [0, 0]
    acquire, make_timeout = gevent.thread.LockType.acquire, gevent.timeout.Timeout.__init__

    def ours(frame) -> bool:
        return frame is not None and os.path.basename(frame.f_code.co_filename) in files

    def counting_acquire(self, *args, **kwargs):
        counts[0] += ours(sys._getframe(1))
        return acquire(self, *args, **kwargs)

    def counting_timeout(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and not ours(frame):
            frame = frame.f_back
        counts[1] += frame is not None
        return make_timeout(self, *args, **kwargs)

    gevent.thread.LockType.acquire, gevent.timeout.Timeout.__init__ = counting_acquire, counting_timeout
    try:
        work()
    finally:
        gevent.thread.LockType.acquire, gevent.timeout.Timeout.__init__ = acquire, make_timeout
    return counts[0], counts[1]


def main() -> int:
    assert monkey.is_module_patched("threading") and monkey.is_module_patched("socket")
    user = current_local_user()
    key = paramiko.RSAKey.generate(2048)
    host_key = paramiko.RSAKey.generate(2048)
    kept = tempfile.TemporaryDirectory()  # removed when the interpreter exits, even after a failure
    folder = kept.name
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("a")
    server = LoopbackX2GoServer(host_key)
    outer = server.connect()

    sessions = Sessions()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=key, exports=[folder], host_key=host_key,
                                   session_observer=sessions)
    tunnel.start()
    assert tunnel.wait_ready(30) and tunnel.forwarding
    step("ready")

    transport, client = sftp_client(tunnel.server_port, key, user)
    assert client.listdir(folder) == ["a.txt"]
    data = os.urandom(1 << 20)
    with client.open(folder + "/big", "wb") as f:
        f.write(data)
    with client.open(folder + "/big", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    # One request at a time on a drained socket: python-x2go's transport greenlet
    # let the session answer before going back to its socket (tuning.YIELD_TO_READER).
    pipes = [paramiko_compat.channel_in_buffer(t.channel) for t in tunnel.open_channels.values()]
    assert pipes and all(isinstance(p, tuning.ChunkPipe) for p in pipes), pipes
    assert sum(p.yields for p in pipes) > 0
    step("session")

    # Small requests on the fast path: the channel pipes' and the exports' locks are
    # the operating system's (defaults.native_lock), and the engine waits for the
    # channel without a gevent Timeout (tuning.ReadAheadSocket.recv_untimed).  With
    # gevent's lock there, four or more acquisitions per request; with a timed wait
    # one Timeout each.
    engine = sessions.live[-1]
    lean_before = engine.fast.packets_in
    locks, timeouts = gevent_waits_in(("tuning.py", "exports.py"), lambda: [
        client.listdir(folder) for _ in range(3)] + [
        client.stat(folder + "/a.txt") for _ in range(200)])
    assert engine.fast.packets_in - lean_before >= 200, (engine.fast.packets_in, lean_before)
    assert (locks, timeouts) == (0, 0), (locks, timeouts)
    step("small-requests")

    # WRITEs go to a native thread (x2go_sftp.writebehind): pipelined, the
    # file is right, the thread lives as long as the session and no longer.
    threads_idle = os_threads()
    t2, c2 = sftp_client(tunnel.server_port, key, user)
    t2.packetizer.REKEY_BYTES = 256 * 1024  # this client asks for new keys every 256 KiB
    data = os.urandom(4 << 20)
    with c2.open(folder + "/piped", "wb") as f:
        f.set_pipelined(True)
        for pos in range(0, len(data), 32768):
            f.write(data[pos:pos + 32768])
    assert os_threads() == threads_idle + 1
    with open(os.path.join(folder, "piped"), "rb") as local:
        assert hashlib.sha256(local.read()).digest() == hashlib.sha256(data).digest()
    engine = sessions.live[-1]
    assert engine.writes_behind >= len(data) // 32768, engine.writes_behind
    # Key exchanges went back to paramiko; the fast path (waiting without a timeout) resumes after them.
    for _ in range(5):
        c2.stat(folder + "/piped")
    assert 1 <= engine.fast.handed_back < engine.fast.stretches, (engine.fast.handed_back, engine.fast.stretches)
    t2.close()
    assert wait_until(lambda: engine not in sessions.live and os_threads() == threads_idle)
    os.unlink(os.path.join(folder, "piped"))
    step("write-behind")

    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(1)

    def serve_echo() -> None:
        conn, _ = echo.accept()
        with conn:
            conn.sendall(b"echo:" + conn.recv(100))

    threading.Thread(target=serve_echo, daemon=True).start()
    snd = X2GoRevFwTunnel(0, "127.0.0.1", echo.getsockname()[1], outer)
    snd.start()
    assert snd.wait_ready(30)
    s = socket.create_connection(("127.0.0.1", snd.server_port))
    s.sendall(b"hi")
    assert s.recv(100) == b"echo:hi"
    s.close()
    assert sorted(client.listdir(folder)) == ["a.txt", "big"]
    step("routing")

    tunnel.pause()
    try:
        client.listdir(folder)
        raise AssertionError("session survived pause()")
    except (OSError, EOFError, paramiko.SSHException):
        pass
    transport.close()
    tunnel.resume()
    transport, client = sftp_client(tunnel.server_port, key, user)
    assert sorted(client.listdir(folder)) == ["a.txt", "big"]
    transport.close()
    step("pause-resume")

    # python-x2go's connection dropping under a session that waits for its next request (on the
    # fast path, without a timeout): paramiko closes the channel's pipe, the session ends.
    outer2 = server.connect()
    sessions2 = Sessions()
    tunnel2 = X2GoRevFwTunnelToSFTP(0, outer2, auth_key=key, exports=[folder], host_key=host_key,
                                    session_observer=sessions2)
    tunnel2.start()
    assert tunnel2.wait_ready(30)
    t3, c3 = sftp_client(tunnel2.server_port, key, user)
    for _ in range(20):
        c3.stat(folder + "/a.txt")
    waiting = sessions2.live[-1]
    assert waiting.fast.packets_in > 0
    outer2.close()
    assert wait_until(lambda: not sessions2.live), sessions2.live
    t3.close()
    tunnel2.stop_thread()
    tunnel2.join(10)
    assert not tunnel2.is_alive()
    step("outer-gone")

    for t in (tunnel, snd):
        t.stop_thread()
        t.join(10)
        assert not t.is_alive()
    outer.close()
    server.close()
    echo.close()
    step("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
