"""``x2go-sftp share`` and :mod:`x2go_sftp.share` against a real sshd, a real user and real sshfs.

    x2go-sftp share (this machine, as root)  --ssh-->  real sshd on 127.0.0.1 (the "server")
        user x2gosftp<pid> there runs sshfs -> 127.0.0.1:<forwarded port> -> sshd
        -> our reverse forward -> inner SSH server -> engine -> jail -> the local folders

The server-side user is a real non-root account (created for the session when
absent, removed afterwards), so sshfs mounts the way it does for anyone: FUSE
through the setuid fusermount, the mount visible to that user only.  Every
file operation through a mount therefore runs as that user (``as_user``).
The command runs as a subprocess and is stopped with real signals.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import pty
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from tests.realpeers import RealSSHD, is_mounted, require, running_sshd
from x2go_sftp import cli, paramiko_compat
from x2go_sftp.share import KEY_DIR_PREFIX, Share, ShareCancelled, ShareError, share
from x2go_sftp.testing import ClientTransport

pytestmark = pytest.mark.real

# One user per test process: two checkouts running this suite at once must not
# rewrite each other's authorized_keys, nor delete the user under each other.
USER = f"x2gosftp{os.getpid()}"

# How long the command may take to print its mounts, and to end after a signal.
STARTUP_DEADLINE = 90.0
EXIT_DEADLINE = 60.0


# -- the server-side user ---------------------------------------------------------
@dataclass
class RemoteUser:
    name: str
    uid: int
    gid: int
    home: Path
    key: paramiko.RSAKey
    key_file: Path  # the private key the command logs in with (root's, mode 0600)


# Where concurrent runs of this suite (two checkouts at once) agree on /dev/fuse's mode.
FUSE_LOCK = Path(tempfile.gettempdir()) / "x2go-sftp-test-fuse.lock"
FUSE_MODE_SAVED = Path(tempfile.gettempdir()) / "x2go-sftp-test-fuse.mode"


def _fuse_usable_by_users() -> Iterator[None]:
    """Make /dev/fuse 0666, as the fuse3 package does on Debian; put the old mode back afterwards.

    libfuse opens /dev/fuse itself before falling back to the setuid
    fusermount, and gives up when it cannot: with a root-only 0600 node (some
    containers) no user can mount.  Every run holds a shared lock while it
    needs the mode; the first saves the old one, the last puts it back.
    """
    lock = os.open(FUSE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not FUSE_MODE_SAVED.exists():
            FUSE_MODE_SAVED.write_text(str(stat.S_IMODE(os.stat("/dev/fuse").st_mode)))
        os.chmod("/dev/fuse", 0o666)
        fcntl.flock(lock, fcntl.LOCK_SH)  # the others may come and go; none restores while we hold it
        try:
            yield
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another run still needs it: the last one restores
            else:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    os.chmod("/dev/fuse", int(FUSE_MODE_SAVED.read_text()))
                FUSE_MODE_SAVED.unlink(missing_ok=True)
    finally:
        os.close(lock)


@pytest.fixture(scope="module")
def remote_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteUser]:
    """A real non-root user with an authorized key and FUSE access (created if absent, then removed)."""
    require("sshfs")
    require("useradd")
    created = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True)
        created = True
        pw = pwd.getpwnam(USER)
    # No password, but not locked: without PAM, sshd refuses a locked ("!") account even for keys.
    subprocess.run(["usermod", "-p", "*", USER], check=True)
    home = Path(pw.pw_dir)
    key = paramiko.RSAKey.generate(2048)
    work = tmp_path_factory.mktemp("share-client")
    key_file = work / "id_rsa"
    key.write_private_key_file(str(key_file))
    os.chmod(key_file, 0o600)
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(f"{key.get_name()} {key.get_base64()}\n")
    for p in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    gen = _fuse_usable_by_users()
    next(gen)
    try:
        yield RemoteUser(USER, pw.pw_uid, pw.pw_gid, home, key, key_file)
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)
        if created:
            # userdel refuses while the user still has processes: sshd's sessions end just after sshd.
            wait_for(lambda: not _processes_of(pw.pw_uid), f"{USER}'s processes to end")
            res = subprocess.run(["userdel", "-r", USER], capture_output=True, text=True)
            assert res.returncode in (0, 12), res.stderr  # 12: the home directory was already gone


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
    return pids


def _user_sshd_config(user: RemoteUser, extra: str = "") -> str:
    # sshd reads authorized_keys with the user's rights: the suite's file in
    # root's temporary directory is out of reach, the user's own is not.
    return f"Match User {user.name}\n    AuthorizedKeysFile {user.home}/.ssh/authorized_keys\n{extra}"


@pytest.fixture(scope="module")
def server(remote_user: RemoteUser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealSSHD]:
    """A real sshd on loopback where the user may log in with their key and forward ports."""
    with running_sshd(tmp_path_factory.mktemp("share-sshd"), remote_user.key,
                      _user_sshd_config(remote_user)) as sshd:
        yield sshd


def host_key_line(sshd: RealSSHD) -> str:
    ktype, blob = (sshd.workdir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    return f"[127.0.0.1]:{sshd.port} {ktype} {blob}\n"


@pytest.fixture
def known_hosts(server: RealSSHD, tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(host_key_line(server))
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two local folders with a file each."""
    a, b = tmp_path / "local" / "alpha", tmp_path / "local" / "beta"
    a.mkdir(parents=True)
    b.mkdir()
    (a / "hello.txt").write_text("hello from alpha\n")
    (b / "data.bin").write_bytes(os.urandom(300_000))
    return a, b


def as_user(user: RemoteUser, *argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command as the server-side user (FUSE mounts are visible to their owner only)."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, timeout=60, user=user.uid,
                          group=user.gid, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": str(user.home)})


def key_dirs(user: RemoteUser) -> list[str]:
    return glob.glob(str(user.home / (KEY_DIR_PREFIX + "*")))


def user_mounts(user: RemoteUser) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(user.home) + "/")]


@pytest.fixture
def clean_remote(remote_user: RemoteUser) -> Iterator[None]:
    """Each test starts and ends with nothing of ours on the server: no mount, no key, no mount folder."""
    def sweep() -> list[str]:
        left = []
        for mnt in user_mounts(remote_user):
            left.append(mnt)
            as_user(remote_user, "fusermount3", "-uz", mnt)
        for d in key_dirs(remote_user):
            left.append(d)
            shutil.rmtree(d)
        remote = remote_user.home / "x2go-sftp"
        if remote.exists():
            left.append(str(remote))
            shutil.rmtree(remote)
        return left

    sweep()
    yield
    left = sweep()
    assert not left, f"left behind on the server: {left}"


# -- running the command ------------------------------------------------------------
class Command:
    """``python -m x2go_sftp share ...`` as a subprocess, with a clean HOME (no ~/.ssh, no agent)."""

    def __init__(self, argv: list[str], home: Path, stderr: int = subprocess.PIPE):
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        env["HOME"] = str(home)
        env["PYTHONUNBUFFERED"] = "1"
        # paramiko 2.12 triggers cryptography's TripleDES deprecation warning at
        # import, before any of our code runs: Python's output, not the command's.
        env["PYTHONWARNINGS"] = "ignore::UserWarning"
        self.proc = subprocess.Popen([sys.executable, "-m", "x2go_sftp", *argv], stdout=subprocess.PIPE,
                                     stderr=stderr, env=env, cwd=str(home))
        self.out = b""

    def wait_lines(self, n: int, deadline: float = STARTUP_DEADLINE) -> list[str]:
        """The first ``n`` lines on stdout (the mounts), or fail with what the command said."""
        assert self.proc.stdout is not None
        end = time.monotonic() + deadline
        while self.out.count(b"\n") < n:
            remaining = end - time.monotonic()
            if remaining <= 0:
                self.proc.kill()
                self.proc.wait(EXIT_DEADLINE)
                pytest.fail(f"no mount lines within {deadline} s: {self.out!r} {self._err()}")
            if select.select([self.proc.stdout], [], [], remaining)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:  # the command ended without its lines
                    self.proc.wait(EXIT_DEADLINE)
                    pytest.fail(f"no mount lines (rc {self.proc.returncode}): {self.out!r} {self._err()}")
                self.out += chunk
        return self.out.decode().splitlines()[:n]

    def _err(self) -> str:
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr is not None else ""

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        return self.finish()

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=30)
            pytest.fail(f"the command did not end: {err.decode()}")
        return self.proc.returncode, (self.out + out).decode(), (err or b"").decode()


@pytest.fixture
def run_share(server: RealSSHD, remote_user: RemoteUser, known_hosts: Path, tmp_path: Path,
              clean_remote: None) -> Iterator[Callable[..., Command]]:
    """Start ``x2go-sftp share`` against the test sshd as the test user; killed at teardown if still running."""
    started: list[Command] = []
    home = tmp_path / "client-home"
    home.mkdir()

    def start(*args: str, port: int | None = None, known: Path | None = None, key: Path | None = None,
              pre: list[str] | None = None, stderr: int = subprocess.PIPE) -> Command:
        argv = [*(pre or []), "share", "-p", str(port or server.port), "-i", str(key or remote_user.key_file),
                "--known-hosts", str(known or known_hosts), *args]
        cmd = Command(argv, home, stderr)
        started.append(cmd)
        return cmd

    yield start
    for cmd in started:
        if cmd.proc.poll() is None:
            cmd.proc.send_signal(signal.SIGTERM)
            try:
                cmd.proc.communicate(timeout=EXIT_DEADLINE)
            except subprocess.TimeoutExpired:
                cmd.proc.kill()
                cmd.proc.communicate()


def dest() -> str:
    return f"{USER}@127.0.0.1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the command: mounting, data both ways, stopping ------------------------------------
def test_share_mounts_moves_data_both_ways_and_ctrl_c_leaves_nothing(
        run_share: Callable[..., Command], remote_user: RemoteUser, folders: tuple[Path, Path]) -> None:
    a, b = folders
    cmd = run_share(dest(), str(a), str(b))
    lines = cmd.wait_lines(2)
    mnt_a, mnt_b = remote_user.home / "x2go-sftp" / "alpha", remote_user.home / "x2go-sftp" / "beta"
    assert lines == [f"{a} -> 127.0.0.1:{mnt_a}", f"{b} -> 127.0.0.1:{mnt_b}"]
    assert is_mounted(mnt_a) and is_mounted(mnt_b)

    # The key directory: 0700, its files 0600, owned by the user.
    (kd,) = key_dirs(remote_user)
    st = os.lstat(kd)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == remote_user.uid
    for name in os.listdir(kd):
        fst = os.lstat(os.path.join(kd, name))
        assert stat.S_IMODE(fst.st_mode) == 0o600 and fst.st_uid == remote_user.uid, name

    # Local -> server: files made here are read there.
    res = as_user(remote_user, "cat", str(mnt_a / "hello.txt"))
    assert res.returncode == 0 and res.stdout == b"hello from alpha\n"
    res = as_user(remote_user, "sha256sum", str(mnt_b / "data.bin"))
    assert res.stdout.split()[0].decode() == sha((b / "data.bin").read_bytes())
    # Server -> local: files written there land here, byte for byte.
    payload = os.urandom(1_000_003)
    res = as_user(remote_user, "dd", f"of={mnt_a / 'up.bin'}", "bs=65536", "status=none", stdin=payload)
    assert res.returncode == 0, res.stderr
    assert sha((a / "up.bin").read_bytes()) == sha(payload)
    res = as_user(remote_user, "mkdir", str(mnt_b / "made-there"))
    assert res.returncode == 0 and (b / "made-there").is_dir()

    rc, _out, err = cmd.stop(signal.SIGINT)
    assert rc == 0, err
    assert not is_mounted(mnt_a) and not is_mounted(mnt_b)
    assert key_dirs(remote_user) == []
    assert not (remote_user.home / "x2go-sftp").exists()  # the folders it made are gone too
    assert (a / "up.bin").exists()  # and the local side keeps what was written


def test_read_only_is_enforced_and_sigterm_cleans_up(
        run_share: Callable[..., Command], remote_user: RemoteUser, folders: tuple[Path, Path]) -> None:
    a, _ = folders
    cmd = run_share("--read-only", "--remote-dir", "shares", dest(), str(a))
    (line,) = cmd.wait_lines(1)
    mnt = remote_user.home / "shares" / "alpha"
    assert line == f"{a} -> 127.0.0.1:{mnt} (read-only)"
    assert as_user(remote_user, "cat", str(mnt / "hello.txt")).stdout == b"hello from alpha\n"
    for argv in (["sh", "-c", f"echo x > {mnt}/new.txt"], ["sh", "-c", f"echo x >> {mnt}/hello.txt"],
                 ["rm", str(mnt / "hello.txt")], ["mkdir", str(mnt / "d")], ["touch", str(mnt / "hello.txt")]):
        res = as_user(remote_user, *argv)
        assert res.returncode != 0, argv
    assert sorted(os.listdir(a)) == ["hello.txt"] and (a / "hello.txt").read_text() == "hello from alpha\n"
    rc, _, err = cmd.stop(signal.SIGTERM)
    assert rc == 0, err
    assert not is_mounted(mnt) and key_dirs(remote_user) == [] and not (remote_user.home / "shares").exists()


def test_dot_dot_is_refused_on_the_forwarded_port(
        run_share: Callable[..., Command], remote_user: RemoteUser, folders: tuple[Path, Path]) -> None:
    """A client holding the session key (anyone who can read the key file) still cannot leave the folder."""
    a, _ = folders
    (a.parent / "secret.txt").write_text("not shared\n")
    cmd = run_share(dest(), str(a))
    cmd.wait_lines(1)
    (kd,) = key_dirs(remote_user)
    key = paramiko.RSAKey.from_private_key_file(os.path.join(kd, "key"))
    port = int(Path(kd, "key.ident").read_text().split()[0].split(":")[1])
    transport = ClientTransport(("127.0.0.1", port))
    try:
        transport.connect(username=pwd.getpwuid(os.getuid()).pw_name, pkey=key)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        assert "hello.txt" in sftp.listdir(str(a))
        for path in (f"{a}/..", f"{a}/../secret.txt", f"{a}/../../..", "/etc", f"{a}/../../../etc/passwd"):
            with pytest.raises((PermissionError, FileNotFoundError)):
                if path.endswith(("txt", "passwd")):
                    sftp.open(path).read()
                else:
                    sftp.listdir(path)
    finally:
        transport.close()
    rc, _, err = cmd.stop()
    assert rc == 0, err


def test_accept_new_adds_the_host_and_an_unknown_host_is_refused(
        run_share: Callable[..., Command], server: RealSSHD, remote_user: RemoteUser,
        folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = folders
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    rc, _out, err = run_share(dest(), str(a), known=empty).finish()
    assert rc == 2 and f"the host [127.0.0.1]:{server.port} is not known" in err and "--accept-new" in err
    assert empty.read_text() == "" and key_dirs(remote_user) == []

    cmd = run_share("--accept-new", dest(), str(a), known=empty)
    cmd.wait_lines(1)
    assert empty.read_text() == host_key_line(server)
    rc, _, err = cmd.stop()
    assert rc == 0, err


def test_the_share_connection_uses_aes_gcm_on_every_paramiko(server: RealSSHD, remote_user: RemoteUser,
                                                             known_hosts: Path) -> None:
    """Every byte of every mount crosses it: AES-GCM, paramiko's own from 3.3, ours before."""
    transport, _ = cli.connect(dest(), server.port, None, [str(remote_user.key_file)], str(known_hosts), False)
    try:
        assert transport.local_cipher == transport.remote_cipher == "aes128-gcm@openssh.com"
        assert paramiko_compat.gcm_backported(transport) == ("aes128-gcm@openssh.com"
                                                             not in paramiko_compat.supported_ciphers())
    finally:
        transport.close()


def test_changed_host_key_is_refused_even_with_accept_new(
        run_share: Callable[..., Command], server: RealSSHD, remote_user: RemoteUser,
        folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = folders
    other = paramiko.Ed25519Key.from_private_key_file(str(_ed25519_key(tmp_path)))
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{server.port} ssh-ed25519 {other.get_base64()}\n")
    rc, _, err = run_share("--accept-new", dest(), str(a), known=wrong).finish()
    assert rc == 2 and "has CHANGED" in err, err
    assert wrong.read_text().count("\n") == 1 and key_dirs(remote_user) == []


def _ed25519_key(work: Path) -> Path:
    path = work / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


# -- errors: message, exit code 2, nothing left behind --------------------------------------
def test_authentication_failure(run_share: Callable[..., Command], folders: tuple[Path, Path],
                                tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    paramiko.RSAKey.generate(2048).write_private_key_file(str(stranger))
    rc, _, err = run_share(dest(), str(folders[0]), key=stranger).finish()
    assert rc == 2 and f"authentication failed for {USER}@" in err, err


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_local_dir_missing_or_not_a_directory(run_share: Callable[..., Command], folders: tuple[Path, Path],
                                              tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "nope"
    if kind == "file":
        bad.write_text("a file")
    rc, _, err = run_share(dest(), str(folders[0]), str(bad)).finish()
    expected = "no such directory" if kind == "missing" else "not a directory"
    assert rc == 2 and f"{bad}: {expected}" in err, err


def test_mountpoint_not_empty(run_share: Callable[..., Command], remote_user: RemoteUser,
                              folders: tuple[Path, Path]) -> None:
    a, b = folders
    occupied = remote_user.home / "x2go-sftp" / "beta"
    occupied.mkdir(parents=True)
    (occupied / "mine.txt").write_text("the user's own file\n")
    for p in (occupied.parent, occupied, occupied / "mine.txt"):
        os.chown(p, remote_user.uid, remote_user.gid)
    try:
        rc, _, err = run_share(dest(), str(a), str(b)).finish()
        assert rc == 2 and f"the mountpoint 127.0.0.1:{occupied} is not empty" in err, err
        assert (occupied / "mine.txt").read_text() == "the user's own file\n"
        assert not (remote_user.home / "x2go-sftp" / "alpha").exists() and key_dirs(remote_user) == []
        assert user_mounts(remote_user) == []
    finally:
        shutil.rmtree(remote_user.home / "x2go-sftp")


def test_forward_refused(remote_user: RemoteUser, run_share: Callable[..., Command],
                         folders: tuple[Path, Path], tmp_path: Path) -> None:
    extra = "    AllowTcpForwarding no\n"
    (tmp_path / "nofwd").mkdir()
    with running_sshd(tmp_path / "nofwd", remote_user.key, _user_sshd_config(remote_user, extra)) as sshd:
        kh = tmp_path / "kh"
        kh.write_text(host_key_line(sshd))
        rc, _, err = run_share(dest(), str(folders[0]), port=sshd.port, known=kh).finish()
    assert rc == 2 and "refused the port forward" in err and "AllowTcpForwarding" in err, err
    assert key_dirs(remote_user) == [] and not (remote_user.home / "x2go-sftp").exists()


@pytest.mark.parametrize("missing", ["sshfs", "fusermount"])
def test_sshfs_or_fuse_tools_missing_name_the_package(remote_user: RemoteUser, run_share: Callable[..., Command],
                                                      folders: tuple[Path, Path], tmp_path: Path,
                                                      missing: str) -> None:
    # The server's PATH holds only the other tool (sshd's SetEnv sets it for the session);
    # the directory must be one the user can enter.
    bindir = Path(tempfile.mkdtemp(prefix="x2go-sftp-test-bin-"))
    try:
        os.chmod(bindir, 0o755)
        present = "fusermount3" if missing == "sshfs" else "sshfs"
        os.symlink(shutil.which(present) or f"/usr/bin/{present}", bindir / present)
        extra = f"    SetEnv PATH={bindir}\n"
        (tmp_path / "sshd").mkdir()
        with running_sshd(tmp_path / "sshd", remote_user.key, _user_sshd_config(remote_user, extra)) as sshd:
            kh = tmp_path / "kh"
            kh.write_text(host_key_line(sshd))
            rc, _, err = run_share(dest(), str(folders[0]), port=sshd.port, known=kh).finish()
    finally:
        shutil.rmtree(bindir)
    if missing == "sshfs":
        assert rc == 2 and "sshfs is not installed on 127.0.0.1" in err and "apt install sshfs" in err, err
    else:
        assert rc == 2 and "fusermount is not installed" in err and "apt install fuse3" in err, err
    assert key_dirs(remote_user) == [] and not (remote_user.home / "x2go-sftp").exists()


def test_dev_fuse_not_usable(run_share: Callable[..., Command], folders: tuple[Path, Path]) -> None:
    old = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o600)  # root only, as in some containers
    try:
        rc, _, err = run_share(dest(), str(folders[0])).finish()
    finally:
        os.chmod("/dev/fuse", old)
    assert rc == 2 and f"FUSE is not usable by {USER}" in err and "/dev/fuse" in err, err


# -- the API: live counters per mount ----------------------------------------------------------
def _connect_as_user(server: RealSSHD, user: RemoteUser) -> paramiko.Transport:
    transport = paramiko.Transport(("127.0.0.1", server.port))
    transport.connect(username=user.name, pkey=user.key)
    return transport


def wait_for(predicate: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    """Poll ``predicate`` until true (the counters move with sshfs's own timing), or fail."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_api_counts_bytes_requests_handles_and_errors_per_mount(
        server: RealSSHD, remote_user: RemoteUser, folders: tuple[Path, Path], clean_remote: None) -> None:
    a, b = folders
    transport = _connect_as_user(server, remote_user)
    try:
        s: Share = share(transport, [str(a), (str(b), True)], host="box")
        with s:
            ma, mb = s.mounts
            assert (ma.read_only, mb.read_only) == (False, True) and ma.port != mb.port
            before_a, before_b = ma.counters.snapshot(), mb.counters.snapshot()
            assert before_a.sessions == 1 and before_b.sessions == 1
            payload = os.urandom(2_000_000)
            assert as_user(remote_user, "dd", f"of={ma.mountpoint}/up.bin", "bs=65536", "status=none",
                           stdin=payload).returncode == 0
            wait_for(lambda: ma.counters.snapshot().bytes_in - before_a.bytes_in >= len(payload), "bytes in")
            data = (b / "data.bin").read_bytes()
            assert as_user(remote_user, "cat", f"{mb.mountpoint}/data.bin").stdout == data
            wait_for(lambda: mb.counters.snapshot().bytes_out - before_b.bytes_out >= len(data), "bytes out")
            # Bytes are the mount's own: the other mount saw neither transfer.
            assert mb.counters.snapshot().bytes_in - before_b.bytes_in < len(payload) // 10
            assert ma.counters.snapshot().bytes_out - before_a.bytes_out < len(data) // 10
            assert ma.counters.snapshot().requests > before_a.requests

            # A read-only refusal counts as an error of that mount only.
            assert as_user(remote_user, "sh", "-c", f"echo x > {mb.mountpoint}/new.txt").returncode != 0
            wait_for(lambda: mb.counters.snapshot().errors > before_b.errors, "an error")
            assert ma.counters.snapshot().errors == before_a.errors

            # An open file on the server is an open handle here, until it is closed.
            holder = subprocess.Popen(["sh", "-c", f"exec 3<{ma.mountpoint}/up.bin; read x"],
                                      stdin=subprocess.PIPE, user=remote_user.uid, group=remote_user.gid,
                                      extra_groups=[], cwd="/")
            try:
                wait_for(lambda: ma.counters.snapshot().open_handles >= 1, "an open handle")
            finally:
                assert holder.stdin is not None
                holder.stdin.close()
                holder.wait(30)
            wait_for(lambda: ma.counters.snapshot().open_handles == 0, "the handle to close")
            total = s.totals()
            assert total.bytes_in >= len(payload) and total.bytes_out >= len(data)
            assert total.requests >= ma.counters.snapshot().requests + before_b.requests
            # Whatever is in the key directory is ours (e.g. an interrupted sshfs's output): close() empties it.
            assert s.key_dir is not None
            assert as_user(remote_user, "touch", f"{s.key_dir}/sshfs-0.out").returncode == 0
        assert s.problems == []
        assert user_mounts(remote_user) == [] and key_dirs(remote_user) == []
        assert not (remote_user.home / "x2go-sftp").exists()
    finally:
        transport.close()


def test_api_refuses_a_missing_folder_before_touching_the_server(tmp_path: Path) -> None:
    with pytest.raises(ShareError, match="no such directory"):
        share(None, [str(tmp_path / "absent")])  # type: ignore[arg-type]


# -- the command's output: mount lines, status line, logging, --quiet, --version -------------------
def test_status_line_on_a_terminal(run_share: Callable[..., Command], remote_user: RemoteUser,
                                   folders: tuple[Path, Path]) -> None:
    a, _ = folders
    master, slave = pty.openpty()
    try:
        cmd = run_share(dest(), str(a), stderr=slave)
        os.close(slave)
        slave = -1
        cmd.wait_lines(1)
        assert as_user(remote_user, "cat", str(remote_user.home / "x2go-sftp" / "alpha" / "hello.txt")).returncode == 0
        seen = b""
        end = time.monotonic() + 30
        while not re.search(rb"in \d.* out \d.*requests [1-9]\d*  open \d+  errors 0", seen):
            if time.monotonic() > end:
                pytest.fail(f"no status line with requests on the terminal: {seen!r}")
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        rc, _, _ = cmd.stop()
        assert rc == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_verbose_turns_on_logging_without_the_x2go_mask_and_quiet_prints_nothing(
        run_share: Callable[..., Command], remote_user: RemoteUser, folders: tuple[Path, Path]) -> None:
    a, _ = folders
    # The inner server's login line is an X2Go INFO message, which the default X2Go mask (56) filters out.
    cmd = run_share(dest(), str(a), pre=["-v"])
    cmd.wait_lines(1)
    rc, _, err = cmd.stop()
    assert rc == 0 and "INFO: x2go_sftp.auth: publickey auth (ssh-rsa) for " in err, err
    assert "DEBUG" not in err

    cmd = run_share("--quiet", dest(), str(a))
    wait_for(lambda: is_mounted(remote_user.home / "x2go-sftp" / "alpha"), "the quiet mount")
    rc, out, err = cmd.stop()
    assert (rc, out, err) == (0, "", "")


def test_version() -> None:
    res = subprocess.run([sys.executable, "-m", "x2go_sftp", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and re.fullmatch(r"x2go-sftp \d+\.\d+\.\d+ \(paramiko \S+\)\n", res.stdout)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the sshfs daemons are not: they detached to init)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in glob.glob(f"/proc/{parent}/task/*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in Path(task).read_text().split()]
                found.extend(kids)
                todo.extend(kids)
    return found


def test_dropped_connection_is_reported_with_exit_1(
        remote_user: RemoteUser, run_share: Callable[..., Command], folders: tuple[Path, Path],
        tmp_path: Path) -> None:
    (tmp_path / "sshd").mkdir()
    with running_sshd(tmp_path / "sshd", remote_user.key, _user_sshd_config(remote_user)) as sshd:
        kh = tmp_path / "kh"
        kh.write_text(host_key_line(sshd))
        cmd = run_share(dest(), str(folders[0]), port=sshd.port, known=kh)
        cmd.wait_lines(1)
        # End the server's side of the connection: the per-connection sshd processes
        # (the privileged monitor and the user's process holding the socket).
        victims = descendants(sshd.process.pid)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        rc, _, err = cmd.finish()
    assert rc == 1 and "the connection to 127.0.0.1 was lost" in err, err
    (kd,) = key_dirs(remote_user)
    assert f"remove 127.0.0.1:{kd} by hand" in err and "run fusermount -u there" in err
    # What the message asks the user to do by hand (sshfs, its connection gone, unmounted itself).
    shutil.rmtree(kd)
    shutil.rmtree(remote_user.home / "x2go-sftp")


_GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import os, subprocess, sys
import paramiko
from x2go_sftp.share import share
port, user, key_file, folder, uid, gid = sys.argv[1:7]
t = paramiko.Transport(("127.0.0.1", int(port)))
t.connect(username=user, pkey=paramiko.RSAKey.from_private_key_file(key_file))
s = share(t, [folder])
m = s.mounts[0]
run = lambda *a, stdin=None: subprocess.run(list(a), input=stdin, capture_output=True, timeout=60,
                                            user=int(uid), group=int(gid), extra_groups=[], cwd="/")
assert run("cat", m.mountpoint + "/hello.txt").stdout == b"hello from alpha\\n"
assert run("dd", "of=" + m.mountpoint + "/g.bin", "bs=65536", "status=none", stdin=b"g" * 500000).returncode == 0
assert open(os.path.join(folder, "g.bin"), "rb").read() == b"g" * 500000
assert m.counters.snapshot().bytes_in >= 500000
assert s.close() == []
t.close()
print("ok")
"""


def test_api_under_gevent(server: RealSSHD, remote_user: RemoteUser, folders: tuple[Path, Path],
                          clean_remote: None) -> None:
    """python-x2go runs monkey-patched; the share API must work there too (in a fresh interpreter)."""
    a, _ = folders
    res = subprocess.run([sys.executable, "-c", _GEVENT_SCRIPT, str(server.port), remote_user.name,
                          str(remote_user.key_file), str(a), str(remote_user.uid), str(remote_user.gid)],
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"})
    assert res.returncode == 0 and res.stdout == "ok\n", res.stdout + res.stderr


def test_api_cancel_while_sshfs_logs_in_undoes_everything(
        server: RealSSHD, remote_user: RemoteUser, folders: tuple[Path, Path], clean_remote: None) -> None:
    """``cancel`` set at a known point (sshfs of the second folder is logging in) leaves nothing behind."""
    a, b = folders
    cancel = threading.Event()
    logins = []

    def logger(msg: str, loglevel: int = 0) -> None:
        # The inner server's login line: sshfs is mounting, in the middle of share().
        if "publickey auth" in msg and "succeeded" in msg:
            logins.append(msg)
            if len(logins) == 2:
                cancel.set()

    transport = _connect_as_user(server, remote_user)
    try:
        with pytest.raises(ShareCancelled):
            share(transport, [str(a), str(b)], logger=logger, cancel=cancel)
        assert len(logins) == 2  # the cancel came while the second sshfs ran
        assert transport.is_active()
        assert user_mounts(remote_user) == [] and key_dirs(remote_user) == []
        assert not (remote_user.home / "x2go-sftp").exists()
    finally:
        transport.close()
