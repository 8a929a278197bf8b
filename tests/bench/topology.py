"""Real OpenSSH peers for the benchmark, built without pytest.

Two sshd processes on 127.0.0.1:

* the *X2Go server* (``x2go``): python-x2go's outer paramiko connection logs in
  here and asks for the reverse forward sshfs connects to;
* the *local sshd* (``local``): the end of the all-OpenSSH tunnel
  (``ssh -R`` from OpenSSH's client) and the target of a direct sshfs mount.
  Its sftp subsystem is OpenSSH's own sftp-server and its host key is a
  3072-bit RSA key, like our inner server's default.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from tests.netutil import free_port, wait_for_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                          "/usr/libexec/sftp-server")

# Same size as our inner server's default host key, so "new channel" times compare.
HOST_KEY_BITS = 3072

# How long a helper process may take to come up before the benchmark gives up.
START_TIMEOUT = 20.0


def sftp_server_binary() -> str:
    for candidate in SFTP_SERVER_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("OpenSSH sftp-server not found (apt-get install openssh-server)")


def write_private_key(key: paramiko.PKey, path: Path) -> Path:
    key.write_private_key_file(str(path))
    os.chmod(path, 0o600)
    return path


def known_hosts_line(port: int, key: paramiko.PKey) -> str:
    return f"[127.0.0.1]:{port} {key.get_name()} {key.get_base64()}\n"


@dataclass
class Sshd:
    """One running sshd on 127.0.0.1 (started by :func:`start_sshd`)."""

    name: str
    port: int
    workdir: Path
    host_key: paramiko.RSAKey
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_sshd(name: str, workdir: Path, authorized: list[paramiko.PKey],
               host_key: paramiko.RSAKey | None = None) -> Sshd:
    """Start an sshd that accepts ``authorized`` keys for root, forwards, and serves sftp-server."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = host_key or paramiko.RSAKey.generate(HOST_KEY_BITS)
    host_key_file = write_private_key(host_key, workdir / "ssh_host_rsa_key")
    (workdir / "authorized_keys").write_text(
        "".join(f"{k.get_name()} {k.get_base64()}\n" for k in authorized))
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key_file}
PidFile {workdir}/sshd.pid
AuthorizedKeysFile {workdir}/authorized_keys
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
ClientAliveInterval 0
MaxStartups 100
MaxSessions 100
UseDNS no
Subsystem sftp {sftp_server_binary()}
LogLevel ERROR
"""
    )
    os.makedirs("/run/sshd", exist_ok=True)
    with open(workdir / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    try:
        wait_for_port(port, START_TIMEOUT)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"sshd {name} did not start: {(workdir / 'sshd.log').read_text()}") from None
    return Sshd(name, port, workdir, host_key, proc)


@dataclass
class Keys:
    """Every key the benchmark uses, with the files OpenSSH needs."""

    workdir: Path
    outer_client: paramiko.RSAKey = field(default_factory=lambda: paramiko.RSAKey.generate(2048))
    session: paramiko.RSAKey = field(default_factory=lambda: paramiko.RSAKey.generate(2048))
    inner_host: paramiko.RSAKey = field(default_factory=lambda: paramiko.RSAKey.generate(HOST_KEY_BITS))

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.outer_client_file = write_private_key(self.outer_client, self.workdir / "outer_client")
        self.session_file = write_private_key(self.session, self.workdir / "session")
        self.inner_host_file = write_private_key(self.inner_host, self.workdir / "inner_host")


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and every live descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_ns(pids: list[int]) -> int:
    """CPU time of every thread of ``pids``, in nanoseconds (threads alive now)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (those still alive)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pids: list[int]) -> int:
    """Proportional set size of ``pids`` (shared pages split fairly between processes)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of ``pid`` to its current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
