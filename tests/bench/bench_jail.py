"""Benchmark: what the jail's walk costs, and what openat2(RESOLVE_BENEATH) would save.

    python -m tests.bench.bench_jail

Prints, per path depth below the export root, the time of one
``Jail.resolve`` + ``fstatat`` against one ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` of the parent + ``fstatat``
(the most openat2 could replace), and then the time of one SFTP STAT through
the whole in-process path (paramiko client -> loopback X2Go server -> our
tunnel -> inner SSH server -> engine -> backend) for scale.  Never asserts.
"""

from __future__ import annotations

import ctypes
import os
import platform
import tempfile
import time

import paramiko

from x2go_sftp import X2GoRevFwTunnelToSFTP
from x2go_sftp.defaults import current_local_user
from x2go_sftp.exports import Exports
from x2go_sftp.jail import Jail
from x2go_sftp.testing import LoopbackX2GoServer, sftp_client

# openat2(2): syscall 437 on every Linux architecture (new-style numbering, 5.6+).
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
DEPTHS = (1, 5, 20)
LOCAL_ROUNDS = 20000
SFTP_ROUNDS = 1000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(libc: ctypes.CDLL, dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = int(libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    base = tempfile.mkdtemp()
    export = os.path.join(base, "export")
    for depth in DEPTHS:
        d = os.path.join(export, *[f"d{i}" for i in range(depth)])
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "f"), "w").close()
    exports = Exports([export])
    jail = Jail(exports)
    root = next(iter(exports)).acquire()
    print(f"kernel {platform.release()}, Python {platform.python_version()}, paramiko {paramiko.__version__}")
    print(f"{'depth':>5}  {'walk+stat':>10}  {'openat2+stat':>12}")
    for depth in DEPTHS:
        rel = "/".join([f"d{i}" for i in range(depth)] + ["f"])
        t = time.perf_counter()
        for _ in range(LOCAL_ROUNDS):
            with jail.resolve(export + "/" + rel) as r:
                os.stat(r.name, dir_fd=r.dir_fd, follow_symlinks=False)
        walk = (time.perf_counter() - t) / LOCAL_ROUNDS * 1e6
        parent = rel.rsplit("/", 1)[0]
        flags = os.O_PATH | os.O_DIRECTORY
        resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
        t = time.perf_counter()
        for _ in range(LOCAL_ROUNDS):
            fd = _openat2(libc, root, parent, flags, resolve)
            os.stat("f", dir_fd=fd, follow_symlinks=False)
            os.close(fd)
        o2 = (time.perf_counter() - t) / LOCAL_ROUNDS * 1e6
        print(f"{depth:>5}  {walk:>8.1f}us  {o2:>10.1f}us")
    next(iter(exports)).release()

    key, host_key = paramiko.RSAKey.generate(2048), paramiko.RSAKey.generate(2048)
    server = LoopbackX2GoServer()
    outer = server.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=key, exports=exports, host_key=host_key)
    tunnel.start()
    tunnel.wait_ready(30)
    transport, client = sftp_client(tunnel.server_port, key, current_local_user())
    try:
        for depth in DEPTHS:
            path = export + "/" + "/".join([f"d{i}" for i in range(depth)] + ["f"])
            t = time.perf_counter()
            for _ in range(SFTP_ROUNDS):
                client.stat(path)
            per = (time.perf_counter() - t) / SFTP_ROUNDS * 1e6
            print(f"SFTP STAT round trip, depth {depth:>2}: {per:.0f}us")
    finally:
        transport.close()
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()
        server.close()
        exports.clear()


if __name__ == "__main__":
    main()
