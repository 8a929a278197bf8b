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

from x2go_sftp import X2GoRevFwTunnel, X2GoRevFwTunnelToSFTP  # noqa: E402
from x2go_sftp.defaults import current_local_user  # noqa: E402
from x2go_sftp.testing import LoopbackX2GoServer, sftp_client  # noqa: E402


def step(name: str) -> None:
    sys.stdout.write(f"ok {name}\n")
    sys.stdout.flush()


def main() -> int:
    assert monkey.is_module_patched("threading") and monkey.is_module_patched("socket")
    user = current_local_user()
    key = paramiko.RSAKey.generate(2048)
    host_key = paramiko.RSAKey.generate(2048)
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("a")
    server = LoopbackX2GoServer(host_key)
    outer = server.connect()

    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=key, exports=[folder], host_key=host_key)
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
    step("session")

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
