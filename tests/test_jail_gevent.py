"""The whole attack table again, under gevent.monkey.patch_all(), as python-x2go runs.

A fresh interpreter is patched first, then runs every attack of
tests/test_jail_attacks.py in both modes (backend, and a real SFTP session
through the tunnel, whose threads are greenlets there) with the same
sentinel checks.  It prints one line per attack and mode.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
from gevent import monkey
monkey.patch_all()

import pathlib, sys, tempfile
import paramiko
from tests import jail_support as js
from tests.test_jail_attacks import ATTACKS
from x2go_sftp import X2GoRevFwTunnelToSFTP
from x2go_sftp.defaults import current_local_user
from x2go_sftp.exports import Exports
from x2go_sftp.testing import LoopbackX2GoServer, sftp_client

assert monkey.is_module_patched("threading") and monkey.is_module_patched("socket")
key, host_key = paramiko.RSAKey.generate(2048), paramiko.RSAKey.generate(2048)
shared = Exports()
server = LoopbackX2GoServer(host_key)
outer = server.connect()
tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=key, exports=shared, host_key=host_key)
tunnel.start()
assert tunnel.wait_ready(30)
transport, _ = sftp_client(tunnel.server_port, key, current_local_user())
for mode in ("backend", "sftp"):
    for name, (category, fn) in ATTACKS.items():
        base = pathlib.Path(tempfile.mkdtemp())
        if mode == "sftp":
            sb = js.Sandbox(base, shared)
            channel = transport.open_session()
            channel.invoke_subsystem("sftp")
            raw = js.RawSFTP(channel)
            c = js.SFTPClientAPI(raw, str(sb.export))
        else:
            sb = js.Sandbox(base)
            c = js.BackendClient(sb.exports)
        sb.prime()
        before = sb.snapshot()
        fn(sb, c)
        js.assert_unchanged(before, sb.snapshot())
        assert js.SECRET not in c.received
        if mode == "sftp":
            raw.close()
        sb.exports.clear()
        print("ok", mode, name, flush=True)
transport.close()
tunnel.stop_thread()
tunnel.join(10)
outer.close()
server.close()
"""


def test_attacks_under_gevent() -> None:
    from tests.test_jail_attacks import ATTACKS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    done = [line for line in res.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == 2 * len(ATTACKS), res.stdout[-2000:]


# The holder of the session key pipelines lookups of a deep path. Each walk opens and closes a
# directory descriptor per component; gevent >= 25.8.1's patched os.close defers closing a
# non-regular file to the loop's next turn, and a session answering buffered requests never
# returns to the loop between them (x2go_sftp/fds.py). The process's descriptor limit is lowered
# to what it holds plus 64: enough for every walk if each closes what it opened, far too few
# for 500 x 20 deferred closes.
BURST_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()

import gevent, os, posix, resource, struct, sys, tempfile
import paramiko
from x2go_sftp import X2GoRevFwTunnelToSFTP, jail
from x2go_sftp.defaults import current_local_user
from x2go_sftp.exports import Exports
from x2go_sftp.testing import LoopbackX2GoServer, sftp_client

DEPTH, BURST, HEADROOM = 20, 500, 64
print("gevent", gevent.__version__, "defers os.close:", os.close is not posix.close, flush=True)
gevent.sleep(0)  # the hub exists, as in python-x2go's process
base = tempfile.mkdtemp()
deep = os.path.join(base, *[f"d{i}" for i in range(DEPTH)])
os.makedirs(deep)

def open_fds():
    return len(os.listdir("/proc/self/fd"))

# The walk alone, with no turn of the loop between lookups.
exports = Exports([base])
walker = jail.Jail(exports)
before = open_fds()
for _ in range(BURST):
    with walker.resolve(deep, follow_last=False) as r:
        os.stat(r.name, dir_fd=r.dir_fd, follow_symlinks=False)
assert open_fds() == before, f"{open_fds() - before} descriptors still open after {BURST} walks"
print("ok walks", flush=True)

# A real SFTP session under gevent, the requests sent at once.
key, host_key = paramiko.RSAKey.generate(2048), paramiko.RSAKey.generate(2048)
server = LoopbackX2GoServer(host_key)
outer = server.connect()
tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=key, exports=exports, host_key=host_key)
tunnel.start()
assert tunnel.wait_ready(30)
transport, client = sftp_client(tunnel.server_port, key, current_local_user())
client.close()
chan = transport.open_session()
chan.invoke_subsystem("sftp")

def exact(n):
    out = b""
    while len(out) < n:
        piece = chan.recv(n - len(out))
        assert piece, "the session ended"
        out += piece
    return out

def reply():
    (n,) = struct.unpack(">I", exact(4))
    data = exact(n)
    return data[0], data[1:]

chan.sendall(struct.pack(">IBI", 5, 1, 3))
assert reply()[0] == 2  # VERSION
before = open_fds()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (before + HEADROOM, hard))
path = deep.encode()
chan.sendall(b"".join(struct.pack(">IBII", 9 + len(path), 7, i + 1, len(path)) + path for i in range(BURST)))
kinds = [reply()[0] for _ in range(BURST)]
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
failed = BURST - kinds.count(105)  # SSH_FXP_ATTRS
assert not failed, f"{failed} of {BURST} LSTATs failed"
assert open_fds() == before, f"{open_fds() - before} descriptors more after the burst"
print("ok sftp", flush=True)
chan.close()
transport.close()
tunnel.stop_thread()
tunnel.join(10)
outer.close()
server.close()
"""


def test_a_burst_of_deep_lookups_under_gevent_closes_each_walks_descriptors_at_once() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", BURST_SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "ok walks" in res.stdout and "ok sftp" in res.stdout, res.stdout
