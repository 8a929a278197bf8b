"""Real OpenSSH peers on loopback: sshd as the X2Go server, sftp and sshfs as its clients.

    sshfs / sftp (as run on the X2Go server)
        -> 127.0.0.1:<port sshd listens on for our remote forward>
        -> sshd -> outer paramiko connection (python-x2go's) -> our tunnel -> files

Everything binds to 127.0.0.1.  The binaries come from Debian's
openssh-server, openssh-client and sshfs packages (``.ci/run`` installs them);
these fixtures fail, not skip, when they are missing, so CI cannot go green
without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.netutil import free_port, wait_for_port
from x2go_sftp.defaults import current_local_user

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def require(binary: str) -> str:
    path = shutil.which(binary) or (SSHD if binary == "sshd" else None)
    if not path or not os.path.exists(path):
        pytest.fail(f"{binary} is not installed (apt-get install openssh-server openssh-client sshfs)")
    return path


@dataclass
class RealSSHD:
    """A running OpenSSH sshd on 127.0.0.1 that plays the X2Go server."""

    port: int
    workdir: Path
    client_key: paramiko.RSAKey
    process: subprocess.Popen[bytes]
    log_path: Path

    def connect(self, command: bool = True) -> paramiko.Transport:
        """python-x2go's outer connection: paramiko, key auth as the local user.

        With ``command`` (the default) a command runs on it, as python-x2go
        always has one: sshd sets TCP_NODELAY on its end only once a session
        runs.  Without, the connection only forwards and sshd's end keeps
        Nagle on (a state python-x2go never leaves it in, but a caller might).
        """
        sock = socket.create_connection(("127.0.0.1", self.port))
        transport = paramiko.Transport(sock)
        transport.start_client()
        transport.auth_publickey(current_local_user(), self.client_key)
        if command:
            # cat ends when the connection does (sshd does not kill a command without a terminal).
            transport.open_session().exec_command("cat")
        return transport

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_sshd(work: Path, client_key: paramiko.PKey, extra_config: str = "") -> Iterator[RealSSHD]:
    """Run an sshd on a free 127.0.0.1 port accepting ``client_key``, allowing remote forwards."""
    sshd = require("sshd")
    require("ssh-keygen")
    host_key = work / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    (work / "authorized_keys").write_text(f"{client_key.get_name()} {client_key.get_base64()}\n")
    port = free_port()
    config = work / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {work}/sshd.pid
AuthorizedKeysFile {work}/authorized_keys
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
ClientAliveInterval 0
Subsystem sftp internal-sftp
LogLevel VERBOSE
{extra_config}"""
    )
    os.makedirs("/run/sshd", exist_ok=True)
    log_path = work / "sshd.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log_file, stderr=log_file)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        pytest.fail(f"sshd did not start:\n{log_path.read_text()}")
    try:
        yield RealSSHD(port, work, client_key, proc, log_path)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def real_sshd(tmp_path_factory: Any) -> Iterator[RealSSHD]:
    """A real sshd on a loopback port, accepting one client key, allowing remote forwards."""
    with running_sshd(tmp_path_factory.mktemp("sshd"), paramiko.RSAKey.generate(2048)) as sshd:
        yield sshd


def write_key_files(
    workdir: Path, session_key: paramiko.RSAKey, host_key: paramiko.PKey, port: int
) -> tuple[Path, Path]:
    """The session key file and its ``.ident`` known-hosts file, as python-x2go writes them."""
    keyfile = workdir / f"key-{port}"
    session_key.write_private_key_file(str(keyfile))
    os.chmod(keyfile, 0o600)
    ident = Path(str(keyfile) + ".ident")
    ident.write_text(f"[127.0.0.1]:{port} {host_key.get_name()} {host_key.get_base64()}\n")
    return keyfile, ident


def run_sftp(
    port: int,
    keyfile: Path,
    ident: Path,
    commands: str,
    user: str | None = None,
    timeout: float = 120,
    extra_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """OpenSSH ``sftp`` in batch mode against 127.0.0.1:port (commands one per line)."""
    require("sftp")
    return subprocess.run(
        [
            "sftp",
            *extra_args,
            "-b",
            "-",
            "-P",
            str(port),
            "-i",
            str(keyfile),
            "-o",
            f"UserKnownHostsFile={ident}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            f"{user or current_local_user()}@127.0.0.1",
        ],
        input=commands,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sshfs_command(
    port: int, keyfile: Path, ident: Path, remote_path: str, mountpoint: Path, user: str | None = None
) -> list[str]:
    """Exactly the sshfs command line X2Go's x2gomountdirs runs."""
    uid, gid = os.getuid(), os.getgid()
    opts = (
        f"idmap=user,uid={uid},gid={gid},default_permissions,ServerAliveInterval=300,"
        f"IdentityFile={keyfile},UserKnownHostsFile={ident}"
    )
    return [
        "sshfs",
        "-o",
        opts,
        f"{user or current_local_user()}@127.0.0.1:{remote_path}",
        str(mountpoint),
        "-p",
        str(port),
    ]


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


@pytest.fixture
def sshfs_mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount with X2Go's sshfs options; every mount is unmounted at teardown."""
    require("sshfs")
    mounts: list[Path] = []

    def mount(
        port: int, keyfile: Path, ident: Path, remote_path: str, extra: list[str] | None = None
    ) -> Path:
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        cmd = sshfs_command(port, keyfile, ident, remote_path, mnt) + (extra or [])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or not is_mounted(mnt):
            pytest.fail(f"sshfs failed ({res.returncode}): {res.stderr}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        if is_mounted(mnt):
            subprocess.run(["umount", str(mnt)], capture_output=True)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
