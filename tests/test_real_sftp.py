"""OpenSSH ``sftp`` through the whole X2Go path, compared with OpenSSH's own sftp-server.

    sftp -b  ->  real sshd (plays the X2Go server)  ->  python-x2go's outer paramiko
    connection  ->  our tunnel  ->  inner SSH server  ->  engine  ->  jail  ->  files

Most tests run the same batch twice on freshly populated copies of the same
directory: once through our tunnel, once against ``/usr/lib/openssh/sftp-server``
(``sftp -D``), and require the same exit status, output and resulting files.
Content is always checked byte for byte against the local files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.realpeers import RealSSHD, require, run_sftp, running_sshd, write_key_files
from x2go_sftp import X2GoRevFwTunnelToSFTP
from x2go_sftp import log as xlog
from x2go_sftp.defaults import current_local_user

OPENSSH_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
FIXED_MTIME = 1_600_000_000  # populated files get this mtime so "ls -l" is deterministic

pytestmark = pytest.mark.real


class RequestLog:
    """A python-x2go style logger (any callable) that keeps the engine's request trace."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: list[str] = []

    def __call__(self, msg: str, loglevel: int = xlog.loglevel_NONE) -> None:
        if loglevel & xlog.loglevel_DEBUG_SFTPXFER and msg.startswith("request "):
            with self.lock:
                self.lines.append(msg)

    def mark(self) -> int:
        with self.lock:
            return len(self.lines)

    def requests_since(self, mark: int) -> list[str]:
        """Request names ("OPEN", "posix-rename@openssh.com", ...) logged since ``mark``."""
        with self.lock:
            lines = self.lines[mark:]
        out = []
        for line in lines:
            parts = line.split()
            out.append(parts[2] if parts[1] == "EXTENDED" else parts[1])
        return out


@dataclass
class Peer:
    tunnel: X2GoRevFwTunnelToSFTP
    keyfile: Path
    ident: Path
    export: Path
    requests: RequestLog
    runs: list[str] = field(default_factory=list)

    def sftp(self, commands: str) -> subprocess.CompletedProcess[str]:
        mark = self.requests.mark()
        res = run_sftp(self.tunnel.server_port, self.keyfile, self.ident, commands)
        self.runs.extend(self.requests.requests_since(mark))
        return res


@contextlib.contextmanager
def running_peer(real_sshd: RealSSHD, session_key: paramiko.RSAKey, host_key: paramiko.RSAKey, work: Path,
                 command: bool = True) -> Iterator[Peer]:
    """Our tunnel over a real sshd, exporting one directory (``command``: see RealSSHD.connect)."""
    require("sftp")
    if not os.access(OPENSSH_SFTP_SERVER, os.X_OK):
        pytest.fail(f"{OPENSSH_SFTP_SERVER} is missing (apt-get install openssh-server)")
    export = work / "export"
    export.mkdir(parents=True)
    requests = RequestLog()
    outer = real_sshd.connect(command)
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[str(export)],
                                   host_key=host_key, logger=requests)
    tunnel.start()
    try:
        assert tunnel.wait_ready(30) and tunnel.forwarding
        keyfile, ident = write_key_files(work, session_key, host_key, tunnel.server_port)
        yield Peer(tunnel, keyfile, ident, export, requests)
    finally:
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()


@pytest.fixture(scope="module")
def peer(real_sshd: RealSSHD, session_key: paramiko.RSAKey, host_key: paramiko.RSAKey,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """Our tunnel over a real sshd, exporting one directory, as python-x2go runs it (a command running)."""
    with running_peer(real_sshd, session_key, host_key, tmp_path_factory.mktemp("sftp-peer")) as p:
        yield p


def openssh_sftp(commands: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The same batch against OpenSSH's sftp-server, started directly (no ssh) in ``cwd``."""
    return subprocess.run(["sftp", "-b", "-", "-D", OPENSSH_SFTP_SERVER], input=commands, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, Any]:
    """Everything a client could observe of a tree: types, modes, sizes, bytes, links, inode sharing."""
    out: dict[str, Any] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            entry: dict[str, Any] = {"mode": oct(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
                entry["nlink"] = st.st_nlink
                entry["same_inode_as"] = inodes.setdefault(st.st_ino, rel)
            out[rel] = entry
    return out


def compare_with_openssh(peer: Peer, name: str, populate: Callable[[Path], None], batch: Callable[[Path], str],
                         ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``batch`` through us and through OpenSSH on fresh copies of one directory; require equal results."""
    root = peer.export / name
    results = []
    for run in ("ours", "openssh"):
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        populate(root)
        os.utime(root, (FIXED_MTIME, FIXED_MTIME))
        commands = batch(root)
        res = peer.sftp(commands) if run == "ours" else openssh_sftp(commands, root)
        results.append((res, snapshot(root)))
    (ours, ours_tree), (theirs, theirs_tree) = results
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    assert ours_tree == theirs_tree
    return ours, ours_tree


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SIZES = [0, 1, 4095, 32768, 65537, 261120, 261121, 1024 * 1024 + 17, 8 * 1024 * 1024 + 3]


def test_put_and_get_several_sizes_with_checksums(peer: Peer, tmp_path: Path) -> None:
    local, back = tmp_path / "local", tmp_path / "back"
    local.mkdir()
    back.mkdir()
    remote = peer.export / "sizes"
    remote.mkdir()
    sums = {}
    for n in SIZES:
        data = os.urandom(n)
        (local / f"f{n}").write_bytes(data)
        sums[n] = hashlib.sha256(data).hexdigest()
    commands = "".join(f"put {local}/f{n} {remote}/f{n}\n" for n in SIZES)
    commands += "".join(f"get {remote}/f{n} {back}/f{n}\n" for n in SIZES)
    res = peer.sftp(commands)
    assert res.returncode == 0, res.stderr
    for n in SIZES:
        assert sha(remote / f"f{n}") == sums[n], f"upload of {n} bytes"
        assert sha(back / f"f{n}") == sums[n], f"download of {n} bytes"
        assert (remote / f"f{n}").stat().st_size == n


def _tree(root: Path) -> None:
    (root / "docs").mkdir()
    for i, n in enumerate([0, 10, 5000, 70000]):
        p = root / "docs" / f"file{i}.bin"
        p.write_bytes(bytes(range(256)) * (n // 256) + b"x" * (n % 256))
        os.utime(p, (FIXED_MTIME, FIXED_MTIME + i))
    os.chmod(root / "docs" / "file1.bin", 0o640)
    os.symlink("file0.bin", root / "docs" / "link")
    os.utime(root / "docs" / "link", (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    (root / "docs" / "sub").mkdir()
    os.utime(root / "docs" / "sub", (FIXED_MTIME, FIXED_MTIME))
    os.utime(root / "docs", (FIXED_MTIME, FIXED_MTIME))


def test_ls_l_matches_openssh(peer: Peer) -> None:
    res, _ = compare_with_openssh(peer, "ls", _tree, lambda r: (
        f"ls -l {r}/docs\nls -la {r}/docs\nls -ln {r}/docs\nls -1 {r}/docs\ncd {r}/docs\nls -lS\npwd\n"))
    assert "file3.bin" in res.stdout and "-> file0.bin" not in res.stderr


def test_rename_ln_symlink_mkdir_rmdir_chmod_match_openssh(peer: Peer) -> None:
    def batch(r: Path) -> str:
        d = f"{r}/docs"
        return (f"rename {d}/file1.bin {d}/renamed.bin\n"        # posix-rename
                f"rename {d}/file2.bin {d}/file3.bin\n"          # posix-rename replaces
                f"ln {d}/file0.bin {d}/hard.bin\n"                 # hardlink
                f"ln -s file3.bin {d}/soft\n"                      # SYMLINK (target first)
                f"symlink ../docs/renamed.bin {d}/soft2\n"
                f"mkdir {d}/newdir\n"
                f"mkdir {d}/newdir/inner\n"
                f"rmdir {d}/newdir/inner\n"
                f"chmod 600 {d}/renamed.bin\n"
                f"chmod 751 {d}/newdir\n"
                f"chmod -h 604 {d}/file3.bin\n"                  # lsetstat
                f"rm {d}/file0.bin\n"
                f"ls -l {d}/renamed.bin\n")
    _, tree = compare_with_openssh(peer, "ops", _tree, batch)
    file2 = bytes(range(256)) * (5000 // 256) + b"x" * (5000 % 256)
    assert tree["docs/file3.bin"]["sha256"] == hashlib.sha256(file2).hexdigest()
    assert tree["docs/hard.bin"]["nlink"] == 1 and "file0.bin" not in tree
    assert tree["docs/soft"]["target"] == "file3.bin"
    assert oct(stat.S_IMODE(int(tree["docs/renamed.bin"]["mode"], 8))) == oct(0o600)


def test_cp_uses_copy_data_and_matches_openssh(peer: Peer) -> None:
    mark = len(peer.runs)
    _, tree = compare_with_openssh(peer, "cp", _tree, lambda r: (
        f"cp {r}/docs/file3.bin {r}/docs/copy.bin\ncp {r}/docs/file0.bin {r}/docs/empty.bin\n"))
    assert tree["docs/copy.bin"]["sha256"] == tree["docs/file3.bin"]["sha256"]
    assert tree["docs/copy.bin"]["same_inode_as"] == "docs/copy.bin"
    assert "copy-data" in peer.runs[mark:]


def test_resumed_get_and_put(peer: Peer, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    remote = peer.export / "resume"
    remote.mkdir()
    (remote / "full.bin").write_bytes(data)
    (tmp_path / "full.bin").write_bytes(data)
    # The parts already there differ from the source, so the result shows that only
    # the missing tail crossed the wire (a full transfer would overwrite them).
    (tmp_path / "partial.bin").write_bytes(b"Z" * 1_000_000)
    (remote / "up.bin").write_bytes(b"Q" * 777_777)
    res = peer.sftp(f"get -a {remote}/full.bin {tmp_path}/partial.bin\n"
                    f"reput {tmp_path}/full.bin {remote}/up.bin\n"
                    f"reget {remote}/full.bin {tmp_path}/full.bin\n")  # already complete: nothing to do
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "partial.bin").read_bytes() == b"Z" * 1_000_000 + data[1_000_000:]
    assert (remote / "up.bin").read_bytes() == b"Q" * 777_777 + data[777_777:]
    assert (tmp_path / "full.bin").read_bytes() == data


ERROR_CASES = {
    "get_missing": lambda r, tmp: f"get {r}/nope {tmp}/nope\n",
    "put_missing_dir": lambda r, tmp: f"put {tmp}/local.txt {r}/no/such/dir/x\n",
    "ls_missing": lambda r, tmp: f"ls {r}/nope\n",
    "cd_missing": lambda r, tmp: f"cd {r}/nope\n",
    "rm_missing": lambda r, tmp: f"rm {r}/nope\n",
    "rename_missing": lambda r, tmp: f"rename {r}/nope {r}/x\n",
    "legacy_rename_onto_existing": lambda r, tmp: f"rename -l {r}/docs/file1.bin {r}/docs/file2.bin\n",
    "legacy_rename_dir_onto_existing": lambda r, tmp: f"rename -l {r}/docs/sub {r}/docs/file2.bin\n",
    "rmdir_not_empty": lambda r, tmp: f"rmdir {r}/docs\n",
    "rmdir_file": lambda r, tmp: f"rmdir {r}/docs/file1.bin\n",
    "rm_dir": lambda r, tmp: f"rm {r}/docs/sub\n",
    "mkdir_existing": lambda r, tmp: f"mkdir {r}/docs\n",
    "ln_onto_existing": lambda r, tmp: f"ln {r}/docs/file1.bin {r}/docs/file2.bin\n",
    "symlink_onto_existing": lambda r, tmp: f"ln -s file1.bin {r}/docs/file2.bin\n",
    "cp_missing": lambda r, tmp: f"cp {r}/nope {r}/x\n",
    "chmod_missing": lambda r, tmp: f"chmod 600 {r}/nope\n",
    "get_directory_without_r": lambda r, tmp: f"get {r}/docs {tmp}/d\n",
    "chmod_h_symlink": lambda r, tmp: f"chmod -h 600 {r}/docs/link\n",
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_cases_match_openssh(peer: Peer, case: str, tmp_path: Path) -> None:
    (tmp_path / "local.txt").write_text("local\n")
    res, tree = compare_with_openssh(peer, f"err-{case}", _tree, lambda r: ERROR_CASES[case](r, tmp_path))
    assert res.returncode == 1, res.stdout
    assert res.stderr.strip(), "an error message"
    assert tree["docs/file1.bin"]["sha256"] != tree["docs/file2.bin"]["sha256"]  # nothing overwritten


def test_df_reports_the_export_filesystem(peer: Peer) -> None:
    res = peer.sftp(f"df {peer.export}\ndf -i {peer.export}\n")
    assert res.returncode == 0, res.stderr
    local = os.statvfs(peer.export)
    lines = [line for line in res.stdout.splitlines() if re.match(r"^\s*\d", line)]
    size_kib = int(lines[0].split()[0])
    inodes = int(lines[1].split()[0])
    assert size_kib == local.f_blocks * local.f_frsize // 1024
    assert inodes == local.f_files


def test_home_is_the_export(peer: Peer) -> None:
    (peer.export / "homesub").mkdir()
    res = peer.sftp("pwd\ncd homesub\npwd\ncd\npwd\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(f"Remote working directory: {peer.export}\n") == 2
    assert f"Remote working directory: {peer.export}/homesub\n" in res.stdout


def test_scp_tilde_paths_resolve_to_the_export(peer: Peer, tmp_path: Path) -> None:
    """OpenSSH >= 9 scp speaks SFTP; it asks the server to expand "~user/" (expand-path@openssh.com)."""
    require("scp")
    (peer.export / "tilde.txt").write_bytes(b"from home\n")
    user = current_local_user()
    for i, remote in enumerate(["~/tilde.txt", f"~{user}/tilde.txt"]):
        mark = peer.requests.mark()
        res = subprocess.run(
            ["scp", "-q", "-s", "-P", str(peer.tunnel.server_port), "-i", str(peer.keyfile),
             "-o", f"UserKnownHostsFile={peer.ident}", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
             f"{user}@127.0.0.1:{remote}", str(tmp_path / f"got{i}.txt")],
            capture_output=True, text=True, timeout=120)
        # scp also fails when the session ends without an exit status: sshd sends one, so must we.
        assert res.returncode == 0, res.stderr
        assert (tmp_path / f"got{i}.txt").read_bytes() == b"from home\n"
        used = peer.requests.requests_since(mark)
        peer.runs.extend(used)
    assert "expand-path@openssh.com" in used, used


def test_extensions_used_by_openssh_sftp(peer: Peer) -> None:
    """OpenSSH's sftp uses our extensions for the commands that have them (self-contained: runs alone)."""
    d = peer.export / "ext"
    d.mkdir(exist_ok=True)
    (d / "a.txt").write_bytes(b"extensions\n")
    (d / "b.txt").write_bytes(b"replaced\n")
    mark = peer.requests.mark()
    # sftp asks for limits at start, posix-rename for "rename", hardlink for "ln",
    # statvfs for "df", copy-data for "cp", users-groups-by-id for "ls -l", lsetstat for "chmod -h".
    res = run_sftp(peer.tunnel.server_port, peer.keyfile, peer.ident, (
        f"rename {d}/b.txt {d}/c.txt\nln {d}/a.txt {d}/hard.txt\ndf {d}\ncp {d}/a.txt {d}/copy.txt\n"
        f"ls -l {d}\nchmod -h 600 {d}/a.txt\n"))
    assert res.returncode == 0, res.stderr
    seen = set(peer.requests.requests_since(mark))
    for ext in ("limits@openssh.com", "posix-rename@openssh.com", "hardlink@openssh.com",
                "statvfs@openssh.com", "copy-data", "users-groups-by-id@openssh.com",
                "lsetstat@openssh.com"):
        assert ext in seen, (ext, sorted(seen))
    # Each did its job on the real files.
    assert (d / "c.txt").read_bytes() == b"replaced\n" and not (d / "b.txt").exists()
    assert os.stat(d / "hard.txt").st_ino == os.stat(d / "a.txt").st_ino
    assert (d / "copy.txt").read_bytes() == b"extensions\n"
    assert stat.S_IMODE(os.lstat(d / "a.txt").st_mode) == 0o600


@pytest.mark.parametrize("outer_command", [True, False], ids=["command-running", "forward-only"])
def test_openssh_rekeying_every_256k_keeps_data_intact(outer_command: bool, real_sshd: RealSSHD,
                                                       session_key: paramiko.RSAKey, host_key: paramiko.RSAKey,
                                                       tmp_path: Path, sshfs_mount: Callable[..., Path]) -> None:
    """OpenSSH's client asks for new keys mid-transfer (RekeyLimit): each exchange must pass
    through paramiko while the data around it takes the fast path (x2go_sftp.fastpath).

    Both states of the outer connection: python-x2go's (a command running), and
    forward-only, where sshd's end keeps Nagle on and packets arrive later and
    in more pieces.
    """
    with running_peer(real_sshd, session_key, host_key, tmp_path / "peer", outer_command) as peer:
        rekey_both_clients(peer, tmp_path, sshfs_mount)


def rekey_both_clients(peer: Peer, tmp_path: Path, sshfs_mount: Callable[..., Path]) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    back = tmp_path / "back.bin"
    res = run_sftp(peer.tunnel.server_port, peer.keyfile, peer.ident,
                   f"put {src} {peer.export}/rekey.bin\nget {peer.export}/rekey.bin {back}\n",
                   extra_args=("-v", "-o", "RekeyLimit=256K"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("SSH2_MSG_NEWKEYS received") >= 10  # the client really rekeyed, many times
    assert sha(peer.export / "rekey.bin") == sha(src) == sha(back)
    # sshfs with X2Go's options plus a limit: 6 MiB each way through the mount
    mnt = sshfs_mount(peer.tunnel.server_port, peer.keyfile, peer.ident, str(peer.export),
                      ["-o", "RekeyLimit=512K"])
    data = os.urandom(6 * 1024 * 1024)
    (mnt / "rekey2.bin").write_bytes(data)
    assert (peer.export / "rekey2.bin").read_bytes() == data
    assert (mnt / "rekey.bin").read_bytes() == src.read_bytes()


# AES-GCM as OpenSSH and paramiko name it (paramiko's own from 3.3 on, our backport before).
GCM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def test_outer_gcm_while_the_x2go_server_rekeys_every_256k(session_key: paramiko.RSAKey, host_key: paramiko.RSAKey,
                                                          tmp_path: Path, sshfs_mount: Callable[..., Path],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """outer_gcm, and the X2Go server's sshd renews python-x2go's keys every 256 KiB (RekeyLimit):
    the connection, on AES-GCM (paramiko's own from 3.3, our backport on 2.12), passes every
    exchange while shared data crosses it both ways, and stays on AES-GCM."""
    (tmp_path / "sshd").mkdir()
    with running_sshd(tmp_path / "sshd", paramiko.RSAKey.generate(2048), "RekeyLimit 256K\n") as sshd:
        outer = sshd.connect()
        outer.set_log_channel("x2go_sftp.test.outer")
        caplog.set_level(logging.DEBUG, logger="x2go_sftp.test.outer")
        export = tmp_path / "export"
        export.mkdir()
        tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[str(export)], host_key=host_key,
                                       outer_gcm=True)
        tunnel.start()
        try:
            assert tunnel.wait_ready(30) and tunnel.forwarding
            assert outer.local_cipher in GCM_CIPHERS and outer.remote_cipher in GCM_CIPHERS
            keyfile, ident = write_key_files(tmp_path, session_key, host_key, tunnel.server_port)
            mnt = sshfs_mount(tunnel.server_port, keyfile, ident, str(export))
            up, down = os.urandom(6 * 1024 * 1024), os.urandom(6 * 1024 * 1024 + 7)
            (mnt / "up.bin").write_bytes(up)
            (export / "down.bin").write_bytes(down)
            assert (mnt / "down.bin").read_bytes() == down
            assert (export / "up.bin").read_bytes() == up
            renewals = sum("Switch to new keys" in r.getMessage() for r in caplog.records
                           if r.name == "x2go_sftp.test.outer")
            assert renewals >= 20, renewals  # 12 MiB at 256 KiB, both directions counted by sshd
            assert outer.is_active() and outer.local_cipher in GCM_CIPHERS
        finally:
            tunnel.stop_thread()
            tunnel.join(10)
            outer.close()
