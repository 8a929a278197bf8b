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
