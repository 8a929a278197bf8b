"""The real python-x2go, switched with ``x2go_sftp.integrate.install()``, against a real X2Go server.

    tests/x2go/driver.py under Debian's Python (python3-x2go 0.6.1.3; paramiko 2.12,
    or a venv of it with paramiko 3.5 / 5.1):
        X2GoClient -> X2GoSession.connect -> real sshd on 127.0.0.1 (plays the X2Go server)
        X2GoTerminalSession.start_sshfs / start_printing / start_mimebox,
        X2GoSession.share_local_folder / unshare_local_folder
            -> real x2gomountdirs / x2goumount-session (Debian's x2goserver)
            -> real sshfs (X2Go's options) -> sshd -> reverse forward -> the tunnel

What is real and what stands in (details in docs/python-x2go.md): everything
on the byte path and every python-x2go and X2Go server call is the shipped
code.  Stood in: ``x2gostartagent`` (the session is registered in the X2Go
session database with the two helpers x2gostartagent itself calls, but no
``x2goagent`` runs) and, on the client, ``nxproxy``; both are the graphical
half of a session, need an X display, and take no part in folder sharing.
The X2Go server's user is root (the only user these tests may log in as),
with ``HOME`` set to a temporary directory by sshd's ``SetEnv``.

The test suite's own Python cannot import python-x2go (it is installed for
Debian's Python only, and importing it monkey-patches gevent into the test
process), so the driver runs as a subprocess and the test checks the
results itself: mounts in /proc/mounts, bytes through the server-side mount
points, and OpenSSH's own ssh/sftp against the tunnel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import selectors
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.netutil import free_port
from tests.realpeers import require, run_sftp, running_sshd
from x2go_sftp.defaults import current_local_user

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "x2go" / "driver.py"
CHECK_INSTALL = REPO / "tests" / "x2go" / "check_install.py"
MARK = "@@x2go-driver "

# Debian 12's python3-x2go runs on Debian's Python with Debian's paramiko 2.12.
DEBIAN_PYTHON = os.environ.get("X2GO_SFTP_DEBIAN_PYTHON", "/usr/bin/python3")
# Venvs of Debian's Python (--system-site-packages: python3-x2go, gevent) with another
# paramiko; .ci/run creates them, and python_with_x2go() makes a missing one.
VENV_PYTHONS = {
    "paramiko-3.5": os.environ.get("X2GO_SFTP_PARAMIKO3_PYTHON",
                                   str(REPO / ".venv-x2go-paramiko3" / "bin" / "python")),
    "paramiko-5.1": os.environ.get("X2GO_SFTP_PARAMIKO5_PYTHON",
                                   str(REPO / ".venv-x2go-paramiko5" / "bin" / "python")),
}
VENV_PARAMIKO = {"paramiko-3.5": "paramiko==3.5.1", "paramiko-5.1": "paramiko==5.1.0"}
PYTHONS = {"debian-paramiko-2.12": DEBIAN_PYTHON, **VENV_PYTHONS}

# Bounds for one driver step (python-x2go + x2gomountdirs + sshfs each take seconds).
STEP_TIMEOUT = 120.0

# X2Go server user's temporary mount tree (x2gomountdirs: /tmp/.x2go-$USER/...).
X2GO_TMP_ROOT = Path(f"/tmp/.x2go-{current_local_user()}")


def _make_venv(python: str) -> None:
    """Create the venv of Debian's Python that ``python`` names, with its paramiko release."""
    which = next((k for k, v in VENV_PYTHONS.items() if v == python), None)
    if which is None:
        pytest.fail(f"{python} is missing")
    venv = Path(python).parent.parent
    for cmd in ([DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", str(venv)],
                [python, "-m", "pip", "install", "-q", VENV_PARAMIKO[which]]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.fail(f"cannot make {venv} ({' '.join(cmd)}; apt-get install python3-venv): {res.stderr}")


def python_with_x2go(python: str) -> str:
    """``python`` if it can import python-x2go; fail (not skip) otherwise, so CI cannot go green without."""
    if not os.path.exists(python) and python in VENV_PYTHONS.values():
        _make_venv(python)
    if not os.path.exists(python):
        pytest.fail(f"{python} is missing: run .ci/run (it creates the python-x2go venvs)")
    res = subprocess.run([python, "-c", "import x2go.sftpserver, paramiko; print(paramiko.__version__)"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.fail(f"{python} cannot import python-x2go (apt-get install python3-x2go): {res.stderr}")
    return python


# --------------------------------------------------------------------------------------
# The X2Go server: a real sshd with the real x2goserver scripts
# --------------------------------------------------------------------------------------
@dataclass
class X2GoServer:
    port: int
    client_key: Path
    home: Path
    workdir: Path


@contextlib.contextmanager
def running_x2go_server(work: Path) -> Iterator[X2GoServer]:
    """sshd on 127.0.0.1 for the X2Go server's user, HOME in ``work``/home (also tests/bench/bench_x2go.py)."""
    for script in ("x2gomountdirs", "x2goumount-session", "x2golistsessions", "x2gopath"):
        require(script)
    home = work / "home"
    home.mkdir(parents=True)
    # python-x2go logs in with a key file (PEM RSA, which paramiko 2.12 reads).
    client_key = work / "client_key"
    key = paramiko.RSAKey.generate(2048)
    key.write_private_key_file(str(client_key))
    with running_sshd(work, key, f"SetEnv HOME={home}\n") as sshd:
        yield X2GoServer(sshd.port, client_key, home, work)


@pytest.fixture(scope="module")
def x2go_server(tmp_path_factory: Any) -> Iterator[X2GoServer]:
    with running_x2go_server(tmp_path_factory.mktemp("x2goserver")) as server:
        yield server


def server_mounts() -> dict[str, str]:
    """{source path on the client: mount point} of every sshfs mount to 127.0.0.1."""
    mounts = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            source, target, fstype = line.split()[:3]
            if fstype == "fuse.sshfs" and "@127.0.0.1:" in source:
                mounts[source.split(":", 1)[1]] = target.replace("\\040", " ")
    return mounts


def forget_session(name: str) -> None:
    """Unmount what x2gomountdirs mounted for ``name`` and drop its database row (teardown only)."""
    for root in (X2GO_TMP_ROOT / "spool" / f"C-{name}", X2GO_TMP_ROOT / "mimebox" / f"C-{name}"):
        subprocess.run(["fusermount", "-u", "-z", str(root)], capture_output=True)
    subprocess.run(["x2goumount-session", name], capture_output=True, timeout=60)
    subprocess.run(["perl", "-MX2Go::Server::DB=dbsys_rmsessionsroot", "-e", "dbsys_rmsessionsroot(shift)",
                    name], capture_output=True, timeout=60)


# --------------------------------------------------------------------------------------
# The driver subprocess
# --------------------------------------------------------------------------------------
class Driver:
    """tests/x2go/driver.py under a python-x2go Python, driven one step at a time."""

    def __init__(self, python: str, cfg: dict[str, Any], stderr_path: Path):
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 (the driver's stderr while it runs; close() closes it)
        self.proc = subprocess.Popen([python, str(DRIVER), json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def expect(self, event: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """The next event, which must be ``event`` (bounded wait on the pipe, no sleeping)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                pytest.fail(f"driver sent no {event!r} within {timeout}s:\n{self.stderr()}")
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"driver ended before {event!r} (rc={self.proc.wait(30)}):\n{self.stderr()}")
            if line.startswith(MARK):
                data: dict[str, Any] = json.loads(line[len(MARK):])
                assert data["event"] == event, f"expected {event!r}, got {data}\n{self.stderr()}"
                return data

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-6000:]

    def close(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("quit")
            try:
                self.proc.wait(STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._sel.close()
        self._stderr.close()
        return self.proc.returncode


def driver_config(server: X2GoServer, work: Path, mode: str, shares: list[str], **extra: Any) -> dict[str, Any]:
    """The driver's cfg for one new session (a fresh session name); ``extra`` adds or overrides keys."""
    display = random.randrange(1000, 10000)  # unique in the session database, which takes < 5 digits
    name = f"{current_local_user()}-{display}-{int(time.time())}_stDxterm_dp24"
    keys_out = work / "keys"
    keys_out.mkdir(parents=True, exist_ok=True)
    return {
        "mode": mode, "repo": str(REPO), "port": server.port, "user": current_local_user(),
        "client_key": str(server.client_key), "known_hosts": str(work / "known_hosts"),
        "client_root": str(work / "client"), "session_name": name,
        "ports": {"gr": free_port(), "snd": free_port(), "fs": free_port()},
        "agent_pid": os.getpid(), "shares": shares, "printing": True, "mimebox": True,
        "keys_out": str(keys_out), **extra,
    }


@pytest.fixture
def run_driver(x2go_server: X2GoServer, tmp_path: Path) -> Iterator[Any]:
    """Start the driver for one session; the session is always torn down on the server."""
    started: list[tuple[Driver, str]] = []

    def start(python: str, mode: str, shares: list[str], **extra: Any) -> Driver:
        cfg = driver_config(x2go_server, tmp_path, mode, shares, **extra)
        driver = Driver(python, cfg, tmp_path / f"driver-{len(started)}.stderr")
        started.append((driver, cfg["session_name"]))
        return driver

    yield start
    for driver, name in started:
        driver.close()
        forget_session(name)


def ssh_probe(port: int, keyfile: str, ident: str) -> subprocess.CompletedProcess[str]:
    """OpenSSH 9.2's ssh (what sshfs runs) opening the sftp subsystem, verbose."""
    return subprocess.run(
        ["ssh", "-v", "-p", str(port), "-i", keyfile, "-o", f"UserKnownHostsFile={ident}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         f"{current_local_user()}@127.0.0.1", "-s", "sftp"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )


def make_share(tmp_path: Path, name: str = "Documents") -> tuple[Path, bytes]:
    share = tmp_path / "client-files" / name
    share.mkdir(parents=True)
    payload = os.urandom(256 * 1024 + 3)
    (share / "from-client.bin").write_bytes(payload)
    return share, payload


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", sorted(PYTHONS))
def test_install_is_idempotent_and_undoable(which: str) -> None:
    python = python_with_x2go(PYTHONS[which])
    res = subprocess.run([python, str(CHECK_INSTALL), str(REPO)], capture_output=True, text=True,
                         timeout=STEP_TIMEOUT)
    assert res.returncode == 0, res.stderr
    report = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith(MARK))[len(MARK):])
    assert (report["first"], report["second"]) == (True, False)
    installed = report["installed"]
    assert installed["tunnel"] and installed["handler_replaced"] and installed["share_wrapped"]
    assert installed["installed"] and installed["key_bits"] == 3072
    assert installed["key_text"] == "-----BEGIN RSA PRIVATE KEY-----"
    if report["paramiko"].split(".")[0] in ("2", "3"):
        # python-x2go's own key-writing patch works there: left alone.
        assert report["before"] == "-----BEGIN RSA PRIVATE KEY-----"
        assert not installed["write_replaced"]
    else:
        # paramiko >= 4: python-x2go's patch breaks share_local_folder(); install() repairs it.
        assert "file_format" in report["before"]
        assert installed["write_replaced"]
    assert (report["undone"], report["again"]) == (True, False)
    assert all(report["restored"][k] for k in ("tunnel", "key", "handler", "share", "write"))
    assert not report["restored"]["installed"]


def test_stock_module_cannot_mount_on_debian12(run_driver: Any, tmp_path: Path) -> None:
    """Debian 12 as shipped: OpenSSH 9.2's ssh gets no server-sig-algs and will not sign with ssh-rsa."""
    python = python_with_x2go(DEBIAN_PYTHON)
    share, _ = make_share(tmp_path)
    driver = run_driver(python, "stock", [str(share)])
    tunnel = driver.expect("tunnel")
    assert tunnel["paramiko"].startswith("2.12")
    assert tunnel["tunnel_class"] == "x2go.sftpserver.X2GoRevFwTunnelToSFTP"
    assert tunnel["host_key_bits"] == 1024
    probe = ssh_probe(tunnel["sshfs_port"], tunnel["keyfile"], tunnel["ident"])
    assert probe.returncode != 0
    assert "no mutual signature" in probe.stderr, probe.stderr
    assert "Authenticated to" not in probe.stderr
    driver.send("next")
    shared = driver.expect("shared")
    assert shared["shared"] == {str(share): False}
    assert str(share) not in server_mounts()
    mounts_log = Path(tunnel["remote_home"]) / ".x2go" / f"C-{driver_session_name(driver)}" / "sshfs-mounts.log"
    assert mounts_log.read_text().strip(), "x2gomountdirs logged no sshfs failure"


def driver_session_name(driver: Driver) -> str:
    args = driver.proc.args
    assert isinstance(args, list)
    return str(json.loads(args[-1])["session_name"])


@pytest.mark.parametrize("which", sorted(PYTHONS))
def test_real_python_x2go_shares_through_our_tunnel(which: str, run_driver: Any, tmp_path: Path) -> None:
    python = python_with_x2go(PYTHONS[which])
    share, payload = make_share(tmp_path)
    unshared_later, _ = make_share(tmp_path, "Pictures")
    driver = run_driver(python, "ours", [str(share), str(unshared_later)])
    assert driver.expect("installed") == {"event": "installed", "first": True, "second": False}

    # start_sshfs(): our tunnel, a strong host key, and nothing served yet.
    tunnel = driver.expect("tunnel")
    assert tunnel["tunnel_class"] == "x2go_sftp.integrate.X2GoIntegratedTunnel"
    assert tunnel["sftpserver_class"] == "x2go_sftp.integrate.X2GoIntegratedTunnel"
    assert tunnel["host_key_bits"] == 3072
    assert tunnel["exports"] == []
    port, keyfile, ident = tunnel["sshfs_port"], tunnel["keyfile"], tunnel["ident"]
    probe = ssh_probe(port, keyfile, ident)
    assert "Authenticated to 127.0.0.1" in probe.stderr, probe.stderr  # OpenSSH 9.2 signs now
    refused = run_sftp(port, Path(keyfile), Path(ident), f"ls {share}\n")
    assert refused.returncode != 0  # logged in, but nothing is exported before a share

    # start_printing(), start_mimebox(), X2GoSession.share_local_folder() x 2.
    driver.send("next")
    shared = driver.expect("shared")
    spool, mimebox = shared["printing_spool"], shared["mimebox"]
    assert shared["shared"] == {str(share): True, str(unshared_later): True}
    assert shared["exports"] == sorted([spool, mimebox, str(share), str(unshared_later)])
    mounts = server_mounts()
    for path in (spool, mimebox, str(share), str(unshared_later)):
        assert path in mounts, f"{path} not mounted on the server: {mounts}"

    # Bytes both ways through the server-side sshfs mount point x2gomountdirs made.
    mnt = Path(mounts[str(share)])
    assert mnt.is_relative_to(X2GO_TMP_ROOT / "media" / "disk")
    assert hashlib.sha256((mnt / "from-client.bin").read_bytes()).digest() == hashlib.sha256(payload).digest()
    upload = os.urandom(1024 * 1024 + 11)
    (mnt / "from-server.bin").write_bytes(upload)
    assert (share / "from-server.bin").read_bytes() == upload
    job = b"%PDF-1.4 print job\n" + os.urandom(4096)
    (Path(mounts[spool]) / "job.pdf").write_bytes(job)  # what the X2Go printer backend does
    assert (Path(spool) / "job.pdf").read_bytes() == job

    # Exactly the shared folders: nothing else of the client is reachable.
    outside = run_sftp(port, Path(keyfile), Path(ident), "ls /etc\n")
    assert outside.returncode != 0 and "passwd" not in outside.stdout
    inside = run_sftp(port, Path(keyfile), Path(ident), f"ls {share}\n")
    assert inside.returncode == 0 and "from-server.bin" in inside.stdout, inside.stderr

    # X2GoSession.unshare_local_folder(): unmounted on the server and no longer served.
    driver.send(f"unshare {unshared_later}")
    gone = driver.expect("unshared")
    assert gone["ok"] is True
    assert gone["exports"] == sorted([spool, mimebox, str(share)])
    assert str(unshared_later) not in server_mounts()
    assert run_sftp(port, Path(keyfile), Path(ident), f"ls {unshared_later}\n").returncode != 0

    # unshare_all_local_folders(force_all): x2goumount-session takes spool and MIME box too.
    driver.send("unshare_all")
    none_left = driver.expect("unshared_all")
    assert none_left["ok"] is True and none_left["exports"] == []
    assert not {spool, mimebox, str(share)} & set(server_mounts())
    driver.send("quit")
    driver.expect("bye")
    assert driver.close() == 0


# AES-GCM as OpenSSH and paramiko name it (paramiko's own from 3.3 on, our backport before).
GCM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


@pytest.mark.parametrize("which", sorted(PYTHONS))
def test_real_python_x2go_outer_gcm_by_default(which: str, run_driver: Any, tmp_path: Path) -> None:
    """install(): python-x2go's own connection is rekeyed to AES-GCM, and sharing works.

    On paramiko < 3.3 (Debian 12's 2.12), which has no AES-GCM, python-x2go's
    transport gets ours (``paramiko_compat.backport_gcm``) before the rekey.  A
    channel close arriving during that rekey once hung paramiko's transport
    thread (paramiko issue 822); every tunnel answers it after the key exchange
    now (``paramiko_compat.answer_close_after_kex``), so such a hang fails here.
    """
    python = python_with_x2go(PYTHONS[which])
    share, payload = make_share(tmp_path)
    driver = run_driver(python, "ours", [str(share)], printing=False, mimebox=False)
    shared = _share_and_check(driver, share, payload)
    ciphers = shared["ciphers"]  # the control session's transport, after the tunnel started on it
    assert ciphers["local"] in GCM_CIPHERS and ciphers["remote"] in GCM_CIPHERS, ciphers


@pytest.mark.parametrize("how", ["install(outer_gcm=False)", "X2GO_SFTP_OUTER_GCM=0"])
def test_real_python_x2go_outer_cipher_left_alone_on_request(how: str, run_driver: Any, tmp_path: Path) -> None:
    """Either opt-out leaves python-x2go's connection on the cipher it negotiated (Debian 12's stack)."""
    python = python_with_x2go(PYTHONS["debian-paramiko-2.12"])
    share, payload = make_share(tmp_path)
    extra: dict[str, Any] = {"outer_gcm": False} if how.startswith("install") else {
        "env": {"X2GO_SFTP_OUTER_GCM": "0"}}
    driver = run_driver(python, "ours", [str(share)], printing=False, mimebox=False, **extra)
    shared = _share_and_check(driver, share, payload)
    ciphers = shared["ciphers"]
    assert ciphers["local"] not in GCM_CIPHERS and ciphers["remote"] not in GCM_CIPHERS, ciphers


def _share_and_check(driver: Any, share: Path, payload: bytes) -> dict[str, Any]:
    """Share ``share``; bytes both ways through the server-side sshfs mount; the "shared" event."""
    assert driver.expect("installed") == {"event": "installed", "first": True, "second": False}
    tunnel = driver.expect("tunnel")
    assert tunnel["tunnel_class"] == "x2go_sftp.integrate.X2GoIntegratedTunnel"
    driver.send("next")
    shared: dict[str, Any] = driver.expect("shared")
    assert shared["shared"] == {str(share): True}, driver.stderr()
    mounts = server_mounts()
    assert str(share) in mounts, f"{share} not mounted on the server: {mounts}"
    mnt = Path(mounts[str(share)])
    assert (mnt / "from-client.bin").read_bytes() == payload
    upload = os.urandom(2 * 1024 * 1024 + 5)
    (mnt / "from-server.bin").write_bytes(upload)
    assert (share / "from-server.bin").read_bytes() == upload
    driver.send("quit")
    driver.expect("bye")
    assert driver.close() == 0
    return shared


def test_bare_class_swap_is_refused_inside_python_x2go(run_driver: Any, tmp_path: Path) -> None:
    """Our class put into x2go.sftpserver without install(): refused at construction, loudly.

    The driver runs python-x2go's own X2GoSession.resume(); only the graphical
    part of the terminal session is stood in.  Without the refusal, python-x2go
    builds the tunnel, sshfs meets our host key instead of python-x2go's
    RSAHostKey, and nothing is exported: every share fails silently.
    """
    python = python_with_x2go(DEBIAN_PYTHON)
    share, _ = make_share(tmp_path)
    driver = run_driver(python, "bare", [str(share)])
    resumed = driver.expect("resumed")
    # python-x2go caught the refusal (X2GoUserException) and went on with the session ...
    assert resumed["resumed"] is True and resumed["running"] is True, resumed
    # ... without a tunnel, and with folder sharing, printing and the MIME box off.
    assert resumed["sshfs_tunnel"] is None
    assert (resumed["folder_sharing"], resumed["printing"], resumed["mimebox"]) == (False, False, False)
    assert resumed["shared"] == {str(share): False}
    assert str(share) not in server_mounts()
    # The user sees why, and what to do instead, in python-x2go's log.
    log = driver.stderr()
    assert "without x2go_sftp.integrate.install()" in log, log
    assert "HOOK_sshfs_not_available" in log, log
    driver.send("quit")
    driver.expect("bye")
    assert driver.close() == 0
