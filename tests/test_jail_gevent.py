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

import pathlib, tempfile
from tests import jail_support as js
from tests.test_jail_attacks import ATTACKS
from x2go_sftp.exports import Exports

assert monkey.is_module_patched("threading") and monkey.is_module_patched("socket")
shared = Exports()
with tempfile.TemporaryDirectory() as parent, js.served(shared) as transport:
    for mode in ("backend", "sftp"):
        for name, (category, fn) in ATTACKS.items():
            base = pathlib.Path(tempfile.mkdtemp(dir=parent))
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
"""


def run_patched(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter from the repository root; it must exit 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def test_attacks_under_gevent() -> None:
    from tests.test_jail_attacks import ATTACKS

    res = run_patched(SCRIPT)
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

import gevent, os, posix, resource, tempfile
from tests import jail_support as js
from x2go_sftp import jail
from x2go_sftp.exports import Exports

DEPTH, BURST, HEADROOM = 20, 500, 64
print("gevent", gevent.__version__, "defers os.close:", os.close is not posix.close, flush=True)
gevent.sleep(0)  # the hub exists, as in python-x2go's process
kept = tempfile.TemporaryDirectory()  # removed when the interpreter exits
base = kept.name
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
with js.served(exports) as transport:
    chan = transport.open_session()
    chan.invoke_subsystem("sftp")
    raw = js.RawSFTP(chan)
    before = open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + HEADROOM, hard))
    kinds = raw.pipelined(js.LSTAT, [js._string(deep)] * BURST)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    failed = BURST - kinds.count(js.ATTRS)
    assert not failed, f"{failed} of {BURST} LSTATs failed"
    assert open_fds() == before, f"{open_fds() - before} descriptors more after the burst"
    print("ok sftp", flush=True)
    raw.close()
"""


def test_a_burst_of_deep_lookups_under_gevent_closes_each_walks_descriptors_at_once() -> None:
    res = run_patched(BURST_SCRIPT)
    assert "ok walks" in res.stdout and "ok sftp" in res.stdout, res.stdout
