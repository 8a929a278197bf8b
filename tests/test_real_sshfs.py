"""sshfs mounted exactly as X2Go mounts it, through the whole X2Go path.

    sshfs (X2Go's options)  ->  real sshd (plays the X2Go server)  ->  python-x2go's outer
    paramiko connection  ->  our tunnel  ->  inner SSH server  ->  engine  ->  jail  ->  files

One tunnel and one mount serve the module.  File operations go through the
mount; every byte, name, mode and time is checked on the local side (the
export), never only through the mount itself.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from tests.realpeers import RealSSHD, is_mounted, require, sshfs_command, write_key_files
from x2go_sftp import X2GoRevFwTunnelToSFTP
from x2go_sftp import log as xlog

pytestmark = pytest.mark.real

LARGE_FILE_BYTES = 32 * 1024 * 1024 + 4097  # not a multiple of any block or request size


class RequestLog:
    """A python-x2go style logger (any callable) keeping the engine's request names."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: list[str] = []

    def __call__(self, msg: str, loglevel: int = xlog.loglevel_NONE) -> None:
        if loglevel & xlog.loglevel_DEBUG_SFTPXFER and msg.startswith("request "):
            parts = msg.split()
            with self.lock:
                self.names.append(parts[2] if parts[1] == "EXTENDED" else parts[1])

    def mark(self) -> int:
        with self.lock:
            return len(self.names)

    def since(self, mark: int) -> list[str]:
        with self.lock:
            return self.names[mark:]


@dataclass
class Mount:
    mnt: Path
    export: Path
    requests: RequestLog
    tunnel: X2GoRevFwTunnelToSFTP


@pytest.fixture(scope="module")
def mount(real_sshd: RealSSHD, session_key: paramiko.RSAKey, host_key: paramiko.RSAKey,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """Our tunnel over a real sshd, and sshfs mounted on it with X2Go's exact command line."""
    require("sshfs")
    work = tmp_path_factory.mktemp("sshfs-peer")
    export, mnt = work / "export", work / "mnt"
    export.mkdir()
    mnt.mkdir()
    requests = RequestLog()
    outer = real_sshd.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[str(export)],
                                   host_key=host_key, logger=requests)
    tunnel.start()
    try:
        assert tunnel.wait_ready(30) and tunnel.forwarding
        keyfile, ident = write_key_files(work, session_key, host_key, tunnel.server_port)
        cmd = sshfs_command(tunnel.server_port, keyfile, ident, str(export), mnt)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or not is_mounted(mnt):
            pytest.fail(f"sshfs failed ({res.returncode}): {res.stderr}")
        try:
            yield Mount(mnt, export, requests, tunnel)
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            if is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()


@pytest.fixture
def d(mount: Mount, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A fresh directory for one test: (path through the mount, the same directory locally)."""
    name = request.node.name.replace("[", "_").replace("]", "")
    (mount.export / name).mkdir()
    return mount.mnt / name, mount.export / name


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_create_and_read_back(d: tuple[Path, Path]) -> None:
    m, loc = d
    for n in (0, 1, 4096, 65536 + 1, 1_000_003):
        data = os.urandom(n)
        (m / f"f{n}").write_bytes(data)
        assert (loc / f"f{n}").read_bytes() == data
    (loc / "local-made.bin").write_bytes(b"made locally\n" * 1000)
    assert (m / "local-made.bin").read_bytes() == b"made locally\n" * 1000


def test_append_overwrite_truncate(d: tuple[Path, Path]) -> None:
    m, loc = d
    base = os.urandom(200_000)
    (m / "f").write_bytes(base)
    with open(m / "f", "ab") as f:
        f.write(b"APPENDED")
    assert (loc / "f").read_bytes() == base + b"APPENDED"
    with open(m / "f", "r+b") as f:
        f.seek(1000)
        f.write(b"X" * 5000)
    expected = base[:1000] + b"X" * 5000 + base[6000:] + b"APPENDED"
    assert (loc / "f").read_bytes() == expected
    os.truncate(m / "f", 150_000)
    assert (loc / "f").read_bytes() == expected[:150_000]
    os.truncate(m / "f", 160_000)  # extending keeps every byte and adds zeros
    assert (loc / "f").read_bytes() == expected[:150_000] + b"\0" * 10_000
    with open(m / "f", "r+b") as f:
        f.truncate(10)
    assert (loc / "f").read_bytes() == expected[:10]
    with open(m / "f", "wb") as f:  # O_TRUNC on open
        f.write(b"new")
    assert (loc / "f").read_bytes() == b"new"


def test_rename_over_existing_file(mount: Mount, d: tuple[Path, Path]) -> None:
    m, loc = d
    (m / "a").write_bytes(b"A" * 10)
    (m / "b").write_bytes(b"B" * 20)
    ino = (loc / "a").stat().st_ino
    mark = mount.requests.mark()
    os.rename(m / "a", m / "b")  # what editors do to save atomically
    assert not (loc / "a").exists()
    assert (loc / "b").read_bytes() == b"A" * 10 and (loc / "b").stat().st_ino == ino
    assert "posix-rename@openssh.com" in mount.requests.since(mark)
    os.rename(m / "b", m / "c")
    assert sorted(os.listdir(loc)) == ["c"]
    (loc / "sub").mkdir()
    os.rename(m / "c", m / "sub" / "c")
    assert (loc / "sub" / "c").read_bytes() == b"A" * 10


def test_hard_link(mount: Mount, d: tuple[Path, Path]) -> None:
    m, loc = d
    (m / "orig").write_bytes(b"linked")
    mark = mount.requests.mark()
    os.link(m / "orig", m / "hard")
    assert (loc / "orig").stat().st_ino == (loc / "hard").stat().st_ino
    assert (loc / "orig").stat().st_nlink == 2
    assert "hardlink@openssh.com" in mount.requests.since(mark)
    with open(m / "hard", "ab") as f:
        f.write(b"+more")
    assert (loc / "orig").read_bytes() == b"linked+more"


def test_symlink(d: tuple[Path, Path]) -> None:
    m, loc = d
    (m / "target.txt").write_bytes(b"pointed at")
    os.symlink("target.txt", m / "rel")
    assert os.readlink(loc / "rel") == "target.txt"
    assert os.readlink(m / "rel") == "target.txt"
    assert (m / "rel").read_bytes() == b"pointed at"
    os.symlink("no-such-target", m / "dangling")
    assert os.readlink(loc / "dangling") == "no-such-target"
    assert os.path.islink(m / "dangling") and not os.path.exists(m / "dangling")
    os.unlink(m / "rel")
    assert not os.path.lexists(loc / "rel") and (loc / "target.txt").exists()


def test_fsync(mount: Mount, d: tuple[Path, Path]) -> None:
    m, loc = d
    mark = mount.requests.mark()
    fd = os.open(m / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"on disk")
        os.fsync(fd)
        # After fsync returns the bytes are in the local file, before any close.
        assert (loc / "synced").read_bytes() == b"on disk"
    finally:
        os.close(fd)
    assert "fsync@openssh.com" in mount.requests.since(mark)


def test_df_statvfs(mount: Mount) -> None:
    mark = mount.requests.mark()
    remote, local = os.statvfs(mount.mnt), os.statvfs(mount.export)
    assert remote.f_blocks * remote.f_frsize == local.f_blocks * local.f_frsize
    assert remote.f_files == local.f_files
    assert remote.f_namemax == local.f_namemax
    assert "statvfs@openssh.com" in mount.requests.since(mark)
    res = subprocess.run(["df", "-P", str(mount.mnt)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.splitlines()[1].split()[1]) * 1024 == local.f_blocks * local.f_frsize


def test_chmod_and_utime(d: tuple[Path, Path]) -> None:
    m, loc = d
    (m / "f").write_bytes(b"x")
    for mode in (0o600, 0o640, 0o755, 0o4711):
        os.chmod(m / "f", mode)
        assert stat.S_IMODE((loc / "f").stat().st_mode) == mode
    os.utime(m / "f", (1_111_111_111, 1_222_222_222))
    st = (loc / "f").stat()
    assert (int(st.st_atime), int(st.st_mtime)) == (1_111_111_111, 1_222_222_222)
    (m / "dir").mkdir()
    os.chmod(m / "dir", 0o700)
    os.utime(m / "dir", (1_000_000_000, 1_000_000_001))
    st = (loc / "dir").stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and int(st.st_mtime) == 1_000_000_001


def test_mkdir_rmdir(d: tuple[Path, Path]) -> None:
    m, loc = d
    (m / "a" / "b" / "c").mkdir(parents=True)
    assert (loc / "a" / "b" / "c").is_dir()
    (m / "a" / "b" / "c").rmdir()
    assert not (loc / "a" / "b" / "c").exists()
    (loc / "a" / "b" / "keep").write_bytes(b"keep")
    with pytest.raises(OSError) as err:
        (m / "a" / "b").rmdir()
    # OpenSSH's sftp-server answers a non-empty RMDIR with FAILURE, which sshfs
    # reports as EPERM; so do we (the directory and its file stay).
    assert err.value.errno in (errno.EPERM, errno.ENOTEMPTY)
    assert (loc / "a" / "b" / "keep").read_bytes() == b"keep"
    shutil.rmtree(m / "a")
    assert not (loc / "a").exists()


def test_large_file(d: tuple[Path, Path]) -> None:
    m, loc = d
    chunk = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with open(m / "large.bin", "wb") as f:
        written = 0
        i = 0
        while written < LARGE_FILE_BYTES:
            piece = chunk[: min(len(chunk), LARGE_FILE_BYTES - written)]
            piece = bytes([i & 0xFF]) + piece[1:]  # every MiB differs
            f.write(piece)
            digest.update(piece)
            written += len(piece)
            i += 1
    local = hashlib.sha256()
    with open(loc / "large.bin", "rb") as f:
        while block := f.read(1 << 20):
            local.update(block)
    assert local.hexdigest() == digest.hexdigest()
    assert (loc / "large.bin").stat().st_size == LARGE_FILE_BYTES
    copy = hashlib.sha256()
    with open(m / "large.bin", "rb") as f:
        while block := f.read(1 << 20):
            copy.update(block)
    assert copy.hexdigest() == digest.hexdigest()


def test_many_files(d: tuple[Path, Path]) -> None:
    m, loc = d
    names = [f"n{i:04d}-" + "x" * (i % 200) for i in range(320)]  # READDIR needs 4 replies
    for n in names:
        (m / n).write_bytes(n.encode())
    assert sorted(os.listdir(m)) == sorted(names)  # READDIR in batches, each name once
    assert sorted(os.listdir(loc)) == sorted(names)
    for n in names[::37]:
        assert (loc / n).read_bytes() == n.encode()
    for n in names[:150]:
        (m / n).unlink()
    assert sorted(os.listdir(loc)) == sorted(names[150:])


def test_fio_verify(mount: Mount, d: tuple[Path, Path]) -> None:
    require("fio")
    m, loc = d
    # Small random I/O is latency-bound (one round trip each); sizes keep the job to seconds.
    jobs = [
        ["--name=randwrite", "--rw=randwrite", "--bs=4k", "--size=2M", "--verify=crc32c"],
        ["--name=seqwrite", "--rw=write", "--bs=128k", "--size=16M", "--verify=md5"],
        ["--name=randrw", "--rw=randrw", "--bs=16k", "--size=4M", "--verify=sha256"],
    ]
    for job in jobs:
        res = subprocess.run(
            ["fio", *job, f"--directory={m}", "--ioengine=psync", "--do_verify=1", "--verify_fatal=1",
             "--randrepeat=1", "--end_fsync=1", "--minimal", "--verify_state_save=0"],
            capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        fields = res.stdout.strip().splitlines()[-1].split(";")
        assert fields[4] == "0", f"fio reported error {fields[4]}"  # terse: field 5 is the error
    # The files fio wrote and verified through the mount are byte-identical locally.
    files = sorted(p.name for p in loc.iterdir())
    assert files and files == sorted(p.name for p in m.iterdir())
    for name in files:
        assert sha((loc / name).read_bytes()) == sha((m / name).read_bytes())


def test_extensions_used_by_sshfs(mount: Mount) -> None:
    """sshfs uses our extensions for rename over a file, link, fsync and statfs (self-contained)."""
    m = mount.mnt / "ext"
    m.mkdir(exist_ok=True)
    (m / "a").write_bytes(b"one")
    (m / "b").write_bytes(b"two")
    mark = mount.requests.mark()
    os.replace(m / "b", m / "a")                 # rename over an existing file: posix-rename
    os.link(m / "a", m / "hard")                 # hardlink
    fd = os.open(m / "a", os.O_WRONLY)
    try:
        os.write(fd, b"ONE")
        os.fsync(fd)                             # fsync
    finally:
        os.close(fd)
    os.statvfs(m)                                # statvfs
    seen = set(mount.requests.since(mark))
    for ext in ("posix-rename@openssh.com", "hardlink@openssh.com", "fsync@openssh.com",
                "statvfs@openssh.com"):
        assert ext in seen, (ext, sorted(seen))
    local = mount.export / "ext"
    assert (local / "a").read_bytes() == b"ONE" and not (local / "b").exists()
    assert os.stat(local / "hard").st_ino == os.stat(local / "a").st_ino
