"""Share local folders with any SSH server you can log into: sshfs there, our SFTP server here.

The building block under ``x2go-sftp share`` and for tunnel managers that are
not X2Go.  Given a connected, authenticated paramiko ``Transport`` to a server
and some local folders, :func:`share`:

1. checks the server can mount (sshfs, fusermount, a usable ``/dev/fuse``),
2. asks it for one reverse forward per folder (a tunnel each: every mount
   reaches only its own folder, and its figures are its own),
3. makes a fresh session key, puts it and our inner host key on the server in
   a 0700 directory with 0600 files (over SFTP, on the same connection),
4. runs sshfs there, with X2Go's options, for each folder at
   ``<remote_dir>/<basename>``,

and returns a :class:`Share`: the mounts, their live :class:`MountCounters`,
and :meth:`Share.close`, which unmounts, removes the key directory and the
folders it created, and closes the tunnels.  On any failure :func:`share`
undoes what it did and raises :class:`ShareError` with a message for people.

Example::

    client = paramiko.SSHClient(); client.load_system_host_keys()
    client.connect("build-box")
    with share(client.get_transport(), ["/home/me/src"]) as s:
        print(s.mounts[0].mountpoint, s.totals().bytes_out)
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
import shlex
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import paramiko
from paramiko.sftp import SFTP_NO_SUCH_FILE

from . import inner, log
from .defaults import HOST_KEY_BITS, current_local_user, default_host_key
from .sftpserver import X2GoRevFwTunnelToSFTP

# Where the folders are mounted when the caller names no place ("~" is the
# remote user's home, as for ssh/scp).
DEFAULT_REMOTE_DIR = "~/x2go-sftp"

# The session key: RSA of the size our inner host key has (python-x2go makes
# a 2048-bit one per session; NIST SP 800-57 asks for >= 3072 beyond 2030).
SESSION_KEY_BITS = HOST_KEY_BITS

# sshfs's keep-alive towards our inner server: X2Go's x2gomountdirs value
# (ssh's ServerAliveInterval, off by default in OpenSSH).
SSHFS_SERVER_ALIVE_INTERVAL = 300

# Name of the key directory in the remote home; a random suffix follows, so
# two shares of one user never share keys.  The leading dot keeps it out of ls.
KEY_DIR_PREFIX = ".x2go-sftp-keys-"

# How long a small remote command (the checks, fusermount) may take.  OpenSSH
# has no such limit for a command; ours are instant, and a hung server must
# not hang the share.  ssh's ConnectTimeout is the nearest precedent.
REMOTE_COMMAND_TIMEOUT = 30.0

# How long one sshfs may take to mount: longer than our inner server's login
# deadline (inner.LOGIN_GRACE_TIME, OpenSSH LoginGraceTime), so a stuck login
# fails there first, with its own message.
SSHFS_MOUNT_TIMEOUT = inner.LOGIN_GRACE_TIME + 30.0

# How long to wait for the server's answer to the forward request (OpenSSH's
# ssh waits for it with no limit; python-x2go likewise).
FORWARD_TIMEOUT = 30.0

# Re-check interval while waiting for a remote command's exit status, which
# may arrive just after its output ends (paramiko offers no timed wait for it).
EXIT_STATUS_POLL = 0.05

# How often a running remote command looks at the caller's cancel event
# (Ctrl-C during setup): a person waits for the answer.
CANCEL_POLL = 0.1

# Output kept from one remote command (its tail): error messages are short,
# and a chatty login script must not grow our memory.
MAX_COMMAND_OUTPUT = 64 * 1024

_MARK = "x2go-sftp:"

# The server-side checks, in POSIX sh (the login shell may be csh or fish).
# /dev/fuse must be readable and writable by the user: libfuse opens it before
# it falls back to the setuid fusermount, and stops there when it cannot.
_CHECK_SCRIPT = f"""
command -v sshfs >/dev/null 2>&1 || {{ echo '{_MARK} no-sshfs'; exit 3; }}
{{ command -v fusermount3 || command -v fusermount; }} >/dev/null 2>&1 || {{ echo '{_MARK} no-fusermount'; exit 3; }}
[ -c /dev/fuse ] || {{ echo '{_MARK} no-dev-fuse'; exit 3; }}
{{ [ -r /dev/fuse ] && [ -w /dev/fuse ]; }} || {{ echo "{_MARK} dev-fuse-denied $(id -un)"; exit 3; }}
echo "{_MARK} ok $(id -u) $(id -g)"
"""


class ShareError(Exception):
    """A share could not be set up; the message says why and what to do.  Nothing was left behind."""


class ShareCancelled(ShareError):
    """The caller's ``cancel`` event was set during setup; what was done is undone."""


@dataclass(frozen=True)
class CounterSnapshot:
    """One reading of a mount's (or all mounts') figures.

    Attributes:
        bytes_in: SFTP bytes received from the server (its writes into your folders, and requests).
        bytes_out: SFTP bytes sent to the server (your files' contents it reads, and replies).
        requests: SFTP requests served.
        open_handles: files and directories the server holds open now.
        errors: error replies (permission denied, failures, ...), not counting "no such file".
        not_found: "no such file" replies (routine: file managers and shells probe names).
        sessions: SFTP sessions open now (one per sshfs).
    """

    bytes_in: int = 0
    bytes_out: int = 0
    requests: int = 0
    open_handles: int = 0
    errors: int = 0
    not_found: int = 0
    sessions: int = 0

    def __add__(self, other: CounterSnapshot) -> CounterSnapshot:
        return CounterSnapshot(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))


def _fields(s: CounterSnapshot) -> tuple[int, ...]:
    return (s.bytes_in, s.bytes_out, s.requests, s.open_handles, s.errors, s.not_found, s.sessions)


def _engine_figures(engine: Any, live: bool) -> CounterSnapshot:
    """The figures of one SFTP session (``engine.SFTPEngine``), read from another thread."""
    # dict() and list() copy in one step under the GIL, so a name the session
    # adds meanwhile cannot break the iteration.
    statuses = dict(engine.error_statuses)
    not_found = statuses.pop(SFTP_NO_SUCH_FILE, 0)
    handles = len(engine.file_table) + len(engine.folder_table) if live else 0
    return CounterSnapshot(
        bytes_in=engine.bytes_in,
        bytes_out=engine.bytes_out,
        requests=sum(list(engine.requests.values())),
        open_handles=handles,
        errors=sum(statuses.values()),
        not_found=not_found,
        sessions=1 if live else 0,
    )


class MountCounters:
    """Live figures of every SFTP session of one tunnel: pass it as ``session_observer``.

    Works with any :class:`~x2go_sftp.sftpserver.X2GoRevFwTunnelToSFTP`
    (python-x2go's included): ``X2GoRevFwTunnelToSFTP(..., session_observer=MountCounters())``.
    Sessions that ended keep counting in the totals.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[Any] = []
        self._ended = CounterSnapshot()

    def session_started(self, engine: Any) -> None:
        """Called by the engine when an SFTP session starts."""
        with self._lock:
            self._live.append(engine)

    def session_ended(self, engine: Any) -> None:
        """Called by the engine when the session has ended (its handles are closed)."""
        with self._lock:
            if engine in self._live:
                self._live.remove(engine)
                self._ended = self._ended + _engine_figures(engine, live=False)

    def snapshot(self) -> CounterSnapshot:
        """The figures now: ended sessions' totals plus the running ones'."""
        with self._lock:
            live, total = list(self._live), self._ended
        for engine in live:
            total = total + _engine_figures(engine, live=True)
        return total


@dataclass
class Mount:
    """One shared folder.

    Attributes:
        local_dir: the folder on this machine (absolute).
        mountpoint: where the server sees it (absolute path on the server).
        read_only: whether the server may only read.
        port: the server's loopback port sshfs connects to.
        counters: the live figures of this mount.
        mounted: True while the server has it mounted (as far as we know).
        tunnel: the :class:`~x2go_sftp.sftpserver.X2GoRevFwTunnelToSFTP` serving this folder alone.
    """

    local_dir: str
    mountpoint: str
    read_only: bool
    port: int = 0
    counters: MountCounters = field(default_factory=MountCounters)
    mounted: bool = False
    tunnel: X2GoRevFwTunnelToSFTP | None = field(default=None, repr=False)
    # sshfs was started: it may have mounted even if we never heard back (interrupted).
    attempted: bool = field(default=False, repr=False)


def run_remote(transport: paramiko.Transport, command: str, timeout: float = REMOTE_COMMAND_TIMEOUT,
               cancel: threading.Event | None = None) -> tuple[int, str]:
    """Run ``command`` on the server (an exec channel); return its exit status and output (stdout + stderr).

    Raises:
        ShareError: the server refused the command, or it ran longer than ``timeout``.
        ShareCancelled: ``cancel`` was set while it ran (its channel is closed).
    """
    deadline = time.monotonic() + timeout
    try:
        chan = transport.open_session(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise ShareError(f"the server refused a session channel: {e}") from e
    try:
        chan.set_combine_stderr(True)
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ShareError(f"the server refused to run a command ({e}): is this an SFTP-only account?") from e
        out = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ShareError(f"a command on the server did not finish within {timeout:.0f} s: {command[:200]}")
            if cancel is not None and cancel.is_set():
                raise ShareCancelled("cancelled")
            chan.settimeout(min(remaining, CANCEL_POLL) if cancel is not None else remaining)
            try:
                data = chan.recv(32768)
            except TimeoutError:  # socket.timeout, which paramiko raises
                continue
            if not data:
                break
            out = (out + data)[-MAX_COMMAND_OUTPUT:]
        while not chan.exit_status_ready():
            if time.monotonic() >= deadline or (chan.closed and not chan.exit_status_ready()):
                break
            time.sleep(EXIT_STATUS_POLL)
        status = chan.recv_exit_status() if chan.exit_status_ready() else -1
        return status, out.decode("utf-8", "replace")
    finally:
        chan.close()


def _sh(script: str) -> str:
    """``script`` as one command line for any login shell: run by sh."""
    return shlex.join(["/bin/sh", "-c", script])


def _check_server(transport: paramiko.Transport, host: str, cancel: threading.Event | None) -> tuple[int, int]:
    """Check sshfs and FUSE on the server; return the remote user's uid and gid."""
    status, out = run_remote(transport, _sh(_CHECK_SCRIPT), cancel=cancel)
    answers = [line[len(_MARK):].split() for line in out.splitlines() if line.startswith(_MARK)]
    answer = answers[-1] if answers else []
    if answer[:1] == ["ok"] and len(answer) >= 3 and status == 0:
        return int(answer[1]), int(answer[2])
    user = answer[1] if len(answer) > 1 else "the remote user"
    messages = {
        "no-sshfs": f"sshfs is not installed on {host}: install it there "
                    f"(Debian/Ubuntu: apt install sshfs; Fedora/RHEL: dnf install fuse-sshfs)",
        "no-fusermount": f"FUSE's fusermount is not installed on {host}: install fuse3 there "
                         f"(Debian/Ubuntu: apt install fuse3; Fedora/RHEL: dnf install fuse3)",
        "no-dev-fuse": f"FUSE is not available on {host}: /dev/fuse does not exist "
                       f"(load the kernel module: modprobe fuse; in a container, pass /dev/fuse in)",
        "dev-fuse-denied": f"FUSE is not usable by {user} on {host}: no read and write access to /dev/fuse "
                           f"(the fuse3 package makes it mode 0666)",
    }
    if answer and answer[0] in messages:
        raise ShareError(messages[answer[0]])
    raise ShareError(f"checking {host} for sshfs failed (exit status {status}): {out.strip()[-500:]}")


def _remote_abspath(path: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    elif not path.startswith("/"):
        path = home + "/" + path
    return posixpath.normpath(path)


def _lstat(sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPAttributes | None:
    try:
        return sftp.lstat(path)
    except FileNotFoundError:
        return None


class Share:
    """Folders of this machine mounted on a server; made by :func:`share`.

    Attributes:
        host: the server's name in messages.
        mounts: one :class:`Mount` per folder, in the order given.
        key_dir: the directory on the server holding the session key (None once removed).
        problems: what :meth:`close` could not undo (empty when everything was).
    """

    def __init__(self, transport: paramiko.Transport, host: str, logger: log.LoggerLike | None):
        self.transport = transport
        self.host = host
        self.mounts: list[Mount] = []
        self.key_dir: str | None = None
        self.problems: list[str] = []
        self._logger = logger
        self._log = log.tagged(logger, "share")
        self._sftp: paramiko.SFTPClient | None = None
        self._created_dirs: list[str] = []
        self._key_files: list[str] = []
        self._closed = False
        self._close_lock = threading.Lock()

    # -- reading ---------------------------------------------------------------
    def totals(self) -> CounterSnapshot:
        """All mounts' figures added up."""
        total = CounterSnapshot()
        for m in self.mounts:
            total = total + m.counters.snapshot()
        return total

    def is_active(self) -> bool:
        """True while the connection and every tunnel are up."""
        return (not self._closed and self.transport.is_active()
                and all(m.tunnel is not None and m.tunnel.is_alive() for m in self.mounts))

    # -- closing -----------------------------------------------------------------
    def close(self) -> list[str]:
        """Unmount on the server, remove the key directory and the folders we made, close the tunnels.

        Idempotent; never raises.  Returns (and keeps in :attr:`problems`) what
        could not be undone, e.g. when the connection is gone.
        """
        with self._close_lock:
            if self._closed:
                return self.problems
            self._closed = True
            connected = self.transport.is_active()
            # Unmount first, while our end still answers: sshfs then exits by itself.
            for m in reversed(self.mounts):
                if m.attempted and not m.mounted and connected:
                    self._unmount(m, quiet=True)  # interrupted while sshfs ran: it may have mounted
                if m.mounted:
                    if connected:
                        self._unmount(m)
                    else:
                        self.problems.append(f"{self.host}:{m.mountpoint} may still be mounted "
                                             f"(the connection is gone): run fusermount -u there")
            for m in self.mounts:
                if m.tunnel is not None:
                    m.tunnel.stop_thread()
            for m in self.mounts:
                if m.tunnel is not None:
                    m.tunnel.join(FORWARD_TIMEOUT)
            for m in self.mounts:
                if m.attempted and not m.mounted and connected and self.transport.is_active():
                    # An sshfs interrupted mid-mount may have finished mounting after the
                    # first try; with its tunnel gone it is ending, and this catches the rest.
                    self._unmount(m, quiet=True)
            self._remove_remote_files(connected and self.transport.is_active())
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
            for problem in self.problems:
                self._log(problem, loglevel=log.loglevel_WARN)
            return self.problems

    def _unmount(self, m: Mount, quiet: bool = False) -> None:
        q = shlex.quote(m.mountpoint)
        for lazy in ("",) if quiet else ("", "z"):
            try:
                status, out = run_remote(
                    self.transport, _sh(f"fusermount3 -u{lazy} {q} 2>&1 || fusermount -u{lazy} {q} 2>&1"))
            except ShareError as e:
                status, out = -1, str(e)
            if status == 0:
                m.mounted = False
                if lazy:
                    self.problems.append(f"{self.host}:{m.mountpoint} was busy: detached (lazy unmount); "
                                         f"it goes once nothing uses it")
                self._log(f"unmounted {self.host}:{m.mountpoint}", loglevel=log.loglevel_INFO)
                return
            self._log(f"fusermount -u{lazy} {m.mountpoint}: {out.strip()}", loglevel=log.loglevel_INFO)
        if not quiet:
            self.problems.append(f"could not unmount {self.host}:{m.mountpoint}: {out.strip()}")

    def _remove_remote_files(self, connected: bool) -> None:
        if not connected:
            if self.key_dir is not None:
                self.problems.append(f"the connection is gone: remove {self.host}:{self.key_dir} by hand")
            return
        sftp = self._sftp
        if sftp is None:
            return
        if self.key_dir is not None:
            # Everything in it is ours: the keys, and the output of an sshfs we were interrupted in.
            try:
                names = sftp.listdir(self.key_dir)
            except Exception:
                names = []
            for path in {posixpath.join(self.key_dir, n) for n in names} | set(self._key_files):
                try:
                    sftp.remove(path)
                except FileNotFoundError:
                    pass
                except Exception as e:
                    self.problems.append(f"could not remove {self.host}:{path}: {e}")
        self._key_files = []
        if self.key_dir is not None:
            try:
                sftp.rmdir(self.key_dir)
                self.key_dir = None
            except Exception as e:
                self.problems.append(f"could not remove {self.host}:{self.key_dir}: {e}")
        for path in reversed(self._created_dirs):
            if any(m.mounted and m.mountpoint == path for m in self.mounts):
                continue  # still mounted: removing would fail anyway
            with contextlib.suppress(Exception):  # not empty any more (the user put something there): keep it
                sftp.rmdir(path)
        self._created_dirs = []

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- building (used by share()) -------------------------------------------
    def _mkdirs(self, path: str, mode: int = 0o755) -> None:
        """``mkdir -p`` over SFTP, remembering what it made."""
        assert self._sftp is not None
        missing: list[str] = []
        p = path
        while p not in ("/", "") and _lstat(self._sftp, p) is None:
            missing.append(p)
            p = posixpath.dirname(p)
        for d in reversed(missing):
            try:
                self._sftp.mkdir(d, mode)
            except OSError as e:
                raise ShareError(f"cannot make the folder {self.host}:{d}: {e.strerror or e}") from e
            self._created_dirs.append(d)


def check_local_folders(folders: Iterable[str | tuple[str, bool]], read_only: bool = False) -> list[tuple[str, bool]]:
    """Absolute paths and read-only flags of ``folders``; ShareError unless each is a directory with its own basename."""
    out: list[tuple[str, bool]] = []
    names: dict[str, str] = {}
    for item in folders:
        path, ro = (item, read_only) if isinstance(item, str) else (item[0], bool(item[1]) or read_only)
        absolute = os.path.abspath(os.path.expanduser(path))
        try:
            st = os.stat(absolute)
        except FileNotFoundError:
            raise ShareError(f"{path}: no such directory") from None
        except OSError as e:
            raise ShareError(f"{path}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ShareError(f"{path}: not a directory")
        name = os.path.basename(absolute) or "root"
        if name in names:
            raise ShareError(f"{names[name]} and {path} would both be mounted as {name!r}: "
                             f"share one of them from another place")
        names[name] = path
        out.append((absolute, ro))
    if not out:
        raise ShareError("no folder to share")
    return out


def share(
    transport: paramiko.Transport,
    folders: Iterable[str | tuple[str, bool]],
    *,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    read_only: bool = False,
    host: str | None = None,
    username: str | None = None,
    host_key: paramiko.PKey | None = None,
    logger: log.LoggerLike | None = None,
    cancel: threading.Event | None = None,
) -> Share:
    """Mount ``folders`` on the server at the other end of ``transport``; return the :class:`Share`.

    Args:
        transport: a connected, authenticated paramiko ``Transport``; the caller
            keeps owning it (close it after :meth:`Share.close`).
        folders: local directories; ``str`` or ``(path, read_only)`` items.
        remote_dir: where the mounts go on the server: ``<remote_dir>/<basename>``
            (``~`` and relative paths start at the remote home; made if missing).
        read_only: mount every folder read-only (the server may read, never change).
        host: the server's name for messages (default: its address).
        username: the user name sshfs logs in to our inner server with (default: the local user).
        host_key: our inner server's host key (default: the process's 3072-bit RSA key).
        logger: an X2Go-style logger for the tunnels (default: stdlib logging under ``x2go_sftp.*``).
        cancel: set it (from a signal handler or another thread) to abandon the
            setup: checked between steps and while remote commands run; what
            was done is undone and :class:`ShareCancelled` raised.  Safer than
            an exception raised into the middle of an SFTP exchange.

    Raises:
        ShareError: anything that stops the share (a local folder missing,
            sshfs or FUSE missing on the server, a mountpoint not empty, the
            forward refused, sshfs failing); what was done is undone first.
        ShareCancelled: ``cancel`` was set.
    """
    items = check_local_folders(folders, read_only)
    if host is None:
        try:
            host = str(transport.getpeername()[0])
        except Exception:
            host = "the server"
    if logger is None:
        logger = StdlibLogger()
    s = Share(transport, host, logger)
    try:
        _build(s, items, remote_dir, username or current_local_user(), host_key, cancel)
    except BaseException as e:
        s.close()
        if isinstance(e, ShareError):
            raise
        if isinstance(e, (paramiko.SSHException, EOFError, OSError)) and not transport.is_active():
            raise ShareError(f"the connection to {host} was lost: {e}") from e
        if isinstance(e, (paramiko.SSHException, EOFError, OSError)):
            raise ShareError(f"setting up the share on {host} failed: {e}") from e
        raise
    return s


def _build(s: Share, items: list[tuple[str, bool]], remote_dir: str, username: str,
           host_key: paramiko.PKey | None, cancel: threading.Event | None) -> None:
    host, transport = s.host, s.transport

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise ShareCancelled("cancelled")

    uid, gid = _check_server(transport, host, cancel)
    check_cancel()
    try:
        s._sftp = paramiko.SFTPClient.from_transport(transport)
    except (paramiko.SSHException, EOFError) as e:
        raise ShareError(f"{host} offers no SFTP (its sshd's Subsystem sftp is off): {e}") from e
    sftp = s._sftp
    assert sftp is not None
    home = sftp.normalize(".")
    base = _remote_abspath(remote_dir, home)
    for local, ro in items:
        s.mounts.append(Mount(local, posixpath.join(base, os.path.basename(local) or "root"), ro))

    # Every mountpoint must be an empty directory (or not exist yet) before anything is made.
    for m in s.mounts:
        st = _lstat(sftp, m.mountpoint)
        if st is None:
            continue
        if not stat.S_ISDIR(st.st_mode or 0):
            raise ShareError(f"the mountpoint {host}:{m.mountpoint} exists and is not a directory")
        try:
            entries = sftp.listdir(m.mountpoint)
        except OSError as e:
            raise ShareError(f"cannot read the mountpoint {host}:{m.mountpoint} ({e}): "
                             f"if an earlier share left it mounted, run fusermount -u there") from e
        if entries:
            raise ShareError(f"the mountpoint {host}:{m.mountpoint} is not empty: empty it, or choose "
                             f"another place with --remote-dir")
    for m in s.mounts:
        check_cancel()
        s._mkdirs(m.mountpoint)

    # One tunnel per folder: its sshfs reaches only that folder, and its counters are its own.
    session_key = paramiko.RSAKey.generate(SESSION_KEY_BITS)
    inner_host_key = host_key if host_key is not None else default_host_key()
    for m in s.mounts:
        check_cancel()
        m.tunnel = X2GoRevFwTunnelToSFTP(
            0, transport, auth_key=session_key, logger=s._logger, exports=[(m.local_dir, m.read_only)],
            host_key=inner_host_key, username=username, session_observer=m.counters)
        m.tunnel.start()
        if not m.tunnel.wait_ready(FORWARD_TIMEOUT) or not m.tunnel.forwarding:
            raise ShareError(f"{host} refused the port forward (its sshd has AllowTcpForwarding no, "
                             f"or 'restrict'/'no-port-forwarding' on your key)")
        m.port = int(m.tunnel.server_port)

    # The keys: a fresh 0700 directory in the remote home, files 0600 before anything is written.
    check_cancel()
    if "," in home:
        raise ShareError(f"the remote home {home!r} holds a comma, which sshfs's -o options cannot carry")
    for _ in range(3):
        candidate = posixpath.join(home, KEY_DIR_PREFIX + secrets.token_hex(8))
        try:
            sftp.mkdir(candidate, 0o700)
        except OSError:
            if _lstat(sftp, candidate) is not None:
                continue  # taken (astronomically unlikely): draw again
            raise
        s.key_dir = candidate
        break
    if s.key_dir is None:
        raise ShareError(f"could not make a key directory in {host}:{home}")
    sftp.chmod(s.key_dir, 0o700)  # mkdir's mode passed the remote umask
    st = sftp.lstat(s.key_dir)
    if not stat.S_ISDIR(st.st_mode or 0) or (st.st_mode or 0) & 0o077 or st.st_uid != uid:
        raise ShareError(f"the key directory {host}:{s.key_dir} is not a private directory of yours")
    key_path = posixpath.join(s.key_dir, "key")
    ident_path = key_path + ".ident"
    pem = _private_key_text(session_key)
    ident = "".join(f"[127.0.0.1]:{m.port} {inner_host_key.get_name()} {inner_host_key.get_base64()}\n"
                    for m in s.mounts)
    for path, text in ((key_path, pem), (ident_path, ident)):
        s._key_files.append(path)
        with sftp.open(path, "wx") as f:
            f.chmod(0o600)
            f.write(text.encode())

    for m in s.mounts:
        tunnel = m.tunnel
        assert tunnel is not None
        export = next(iter(tunnel.exports))
        check_cancel()
        _mount(s, m, export.sftp_path, username, uid, gid, key_path, ident_path, cancel)
        s._log(f"{m.local_dir} -> {host}:{m.mountpoint}{' (read-only)' if m.read_only else ''}",
               loglevel=log.loglevel_NOTICE)
    check_cancel()  # set during the last step: the caller no longer wants the share


def _private_key_text(key: paramiko.PKey) -> str:
    import io

    buf = io.StringIO()
    key.write_private_key(buf)
    return buf.getvalue()


def sshfs_command(port: int, username: str, sftp_path: str, mountpoint: str, uid: int, gid: int,
                  key_path: str, ident_path: str) -> list[str]:
    """The sshfs command line X2Go's x2gomountdirs runs, for one folder."""
    opts = (f"idmap=user,uid={uid},gid={gid},default_permissions,"
            f"ServerAliveInterval={SSHFS_SERVER_ALIVE_INTERVAL},"
            f"IdentityFile={key_path},UserKnownHostsFile={ident_path}")
    return ["sshfs", "-o", opts, f"{username}@127.0.0.1:{sftp_path}", mountpoint, "-p", str(port)]


def _mount(s: Share, m: Mount, sftp_path: str, username: str, uid: int, gid: int,
           key_path: str, ident_path: str, cancel: threading.Event | None) -> None:
    argv = sshfs_command(m.port, username, sftp_path, m.mountpoint, uid, gid, key_path, ident_path)
    # sshfs goes to the background once mounted, but the ssh it started keeps
    # its stderr: send that to a file, so the command (and its channel) ends.
    out = posixpath.join(s.key_dir or "/tmp", f"sshfs-{m.port}.out")
    script = f"{shlex.join(argv)} </dev/null >{shlex.quote(out)} 2>&1; rc=$?; cat {shlex.quote(out)}; " \
             f"rm -f {shlex.quote(out)}; exit $rc"
    m.attempted = True
    status, text = run_remote(s.transport, _sh(script), SSHFS_MOUNT_TIMEOUT, cancel)
    if status != 0:
        raise ShareError(f"sshfs on {s.host} could not mount {m.mountpoint}: {text.strip()[-800:]}")
    m.mounted = True


class StdlibLogger:
    """An X2Go-style logger whose messages go to stdlib logging only, filtered by its levels alone.

    Passed to the tunnels, it makes ``logging`` configuration (``-v``) decide
    what appears: no X2Go level mask in between (its mask is 0, so only the
    stdlib level enables a message, and costly traces are skipped when off).
    """

    def __call__(self, msg: str, loglevel: int = log.loglevel_NONE) -> None:
        pass  # TaggedLogger already sent it to stdlib logging

    def get_loglevel(self) -> int:
        return log.loglevel_NONE


__all__ = [
    "DEFAULT_REMOTE_DIR",
    "CounterSnapshot",
    "Mount",
    "MountCounters",
    "Share",
    "ShareCancelled",
    "ShareError",
    "StdlibLogger",
    "check_local_folders",
    "run_remote",
    "share",
    "sshfs_command",
]
