"""The ``x2go-sftp`` command (also ``python -m x2go_sftp``): ``share`` and ``demo``.

``x2go-sftp share [USER@]HOST LOCAL_DIR...`` logs into HOST the way ``ssh``
would (``~/.ssh/config``'s HostName, Port, User and IdentityFile, the agent,
the default keys; the host key checked against known_hosts), then mounts each
LOCAL_DIR there with sshfs through a reverse forward (see :mod:`x2go_sftp.share`).
It runs until Ctrl-C or SIGTERM, then unmounts and removes what it put there.

Exit codes: 0 after a clean end, 2 when the share could not be set up
(nothing is left behind), 1 when the connection was lost while sharing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import paramiko

from . import __version__, log, tuning
from .share import (
    DEFAULT_REMOTE_DIR,
    CounterSnapshot,
    Share,
    ShareCancelled,
    ShareError,
    check_local_folders,
    share,
)

PROG = "x2go-sftp"

EXIT_OK = 0
EXIT_LOST = 1  # the connection dropped while sharing
EXIT_USAGE = 2  # the share could not be set up (argparse uses 2 for bad arguments too)

# TCP connect and SSH handshake limits: OpenSSH's ssh has ConnectTimeout
# (unset: the kernel's ~2 min) and no handshake limit; paramiko's
# SSHClient.connect uses 15 s for the banner.  A CLI should not hang for minutes.
CONNECT_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 30.0

# How often the main loop checks that the connection is still up (paramiko
# does not wake anyone when it drops; OpenSSH's ssh notices at once on a
# reset, or after ServerAliveInterval * ServerAliveCountMax when configured).
LIVENESS_CHECK_INTERVAL = 0.5

# Refresh interval of the status line (as rsync --info=progress2, once a second).
STATUS_INTERVAL = 1.0

# ssh's default identity files, in its order (ssh(1), -i), DSA left out
# (OpenSSH dropped it).
DEFAULT_IDENTITIES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk", "~/.ssh/id_ed25519",
                      "~/.ssh/id_ed25519_sk")

# Host key algorithms a known key of each type may be offered under (OpenSSH
# orders its HostKeyAlgorithms to prefer the types it already knows for a host).
_HOSTKEY_ALGOS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


class ConnectError(Exception):
    """Logging in failed; the message says why (unknown or changed host key, authentication, network)."""


# -- output -------------------------------------------------------------------
class StatusLine:
    """The live line on stderr (a terminal): bytes in/out and rates, requests, open handles, errors."""

    def __init__(self, share_: Share, stream: IO[str]):
        self.share = share_
        self.stream = stream
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._shown = False
        self._thread = threading.Thread(target=self._run, name="x2go-sftp-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STATUS_INTERVAL * 5)
        self.clear()

    def clear(self) -> None:
        """Erase the line (before other output, and at the end)."""
        with self.lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def _run(self) -> None:
        last, t_last = self.share.totals(), time.monotonic()
        while not self._stop.wait(STATUS_INTERVAL):
            now, t_now = self.share.totals(), time.monotonic()
            text = format_status(now, last, t_now - t_last)
            last, t_last = now, t_now
            with self.lock:
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()
                self._shown = True


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_status(now: CounterSnapshot, before: CounterSnapshot, seconds: float) -> str:
    """The status line text; rates over the last ``seconds``."""
    seconds = max(seconds, 1e-3)
    rate_in = (now.bytes_in - before.bytes_in) / seconds
    rate_out = (now.bytes_out - before.bytes_out) / seconds
    return (f"in {human_bytes(now.bytes_in)} ({human_bytes(rate_in)}/s)  "
            f"out {human_bytes(now.bytes_out)} ({human_bytes(rate_out)}/s)  "
            f"requests {now.requests}  open {now.open_handles}  errors {now.errors}")


class _LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr handler that erases the status line before a message."""

    status: StatusLine | None = None

    def emit(self, record: logging.LogRecord) -> None:
        status = self.status
        if status is None:
            super().emit(record)
            return
        with status.lock:
            status._clear_locked()
            super().emit(record)


def configure_logging(verbose: int, quiet: bool) -> _LogHandler:
    """stdlib logging to stderr: warnings by default, -v info, -vv debug, -vvv SFTP traces; --quiet errors.

    The tunnels get a logger without an X2Go level mask (see
    :class:`x2go_sftp.share.StdlibLogger`), so this alone decides what shows.
    """
    if quiet:
        level = logging.ERROR
    else:
        level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}.get(verbose, log.SFTPXFER)
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
    ours = logging.getLogger("x2go_sftp")
    ours.setLevel(level)
    ours.addHandler(handler)
    # paramiko's own debug output is about SSH packets: only at -vvv.
    theirs = logging.getLogger("paramiko")
    theirs.setLevel(logging.DEBUG if verbose >= 3 else max(level, logging.WARNING))
    theirs.addHandler(handler)
    return handler


def error(text: str) -> None:
    """One error line on stderr (shown even with --quiet)."""
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()


def say(text: str, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


# -- connecting like ssh --------------------------------------------------------
def _ssh_config(host: str) -> dict[str, Any]:
    """``~/.ssh/config`` looked up for ``host`` (empty when there is none or it cannot be read)."""
    path = os.path.expanduser("~/.ssh/config")
    if not os.path.exists(path):
        return {}
    try:
        return dict(paramiko.SSHConfig.from_path(path).lookup(host))
    except Exception as e:  # e.g. "Match exec" without the invoke package
        logging.getLogger("x2go_sftp.cli").warning("ignoring %s: %s", path, e)
        return {}


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of ``key``."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def known_hosts_name(hostname: str, port: int) -> str:
    """The name known_hosts files use: ``host``, or ``[host]:port`` off port 22."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def _load_known(paths: list[str], name: str) -> dict[str, paramiko.PKey]:
    known: dict[str, paramiko.PKey] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        keys = paramiko.HostKeys()
        try:
            keys.load(path)
        except (OSError, paramiko.SSHException) as e:
            raise ConnectError(f"cannot read {path}: {e}") from e
        for ktype, key in (keys.lookup(name) or {}).items():
            known.setdefault(ktype, key)
    return known


def _restrict_host_key_types(transport: paramiko.Transport, known: dict[str, paramiko.PKey]) -> None:
    """Offer only the host key types we know for this host (as ssh prefers them), when paramiko has them."""
    opts = transport.get_security_options()
    wanted: list[str] = []
    for ktype in known:
        wanted.extend(_HOSTKEY_ALGOS.get(ktype, (ktype,)))
    usable = [k for k in opts.key_types if k in wanted]
    if usable:
        opts.key_types = usable


def _prefer_gcm(transport: paramiko.Transport) -> None:
    """Put AES-GCM first on our own connection, the others after it as fallbacks.

    As the client our order decides.  GCM costs a fraction of paramiko's
    default aes128-ctr + hmac-sha2-256 per byte (see :data:`tuning.PREFERRED_CIPHERS`);
    every byte of every mount crosses this connection.  paramiko < 3.3 has no GCM
    of its own: this connection gets ours (:func:`tuning.gcm_ciphers`).
    """
    opts = transport.get_security_options()
    gcm = tuning.gcm_ciphers(transport)
    opts.ciphers = gcm + tuple(c for c in opts.ciphers if c not in gcm)


def _check_host_key(transport: paramiko.Transport, known: dict[str, paramiko.PKey], name: str,
                    known_hosts: str, accept_new: bool, hostname: str) -> None:
    key = transport.get_remote_server_key()
    fp = fingerprint(key)
    if key.get_name() in known:
        if known[key.get_name()].asbytes() == key.asbytes():
            return
        raise ConnectError(
            f"the host key of {name} has CHANGED ({key.get_name()} {fp}): someone may be "
            f"impersonating it, or it was reinstalled. Refusing to connect. If you know why, "
            f"remove the old entry: ssh-keygen -R {name!r} -f {known_hosts}")
    if known:
        raise ConnectError(
            f"{name} offered a {key.get_name()} host key ({fp}), but known_hosts has only "
            f"{', '.join(sorted(known))} for it. Refusing to connect.")
    if not accept_new:
        raise ConnectError(
            f"the host {name} is not known ({key.get_name()} {fp}). Check the fingerprint, then run "
            f"again with --accept-new to add it to {known_hosts}, or add it with ssh(1)")
    directory = os.path.dirname(known_hosts)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(known_hosts, "a") as f:
        f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
    logging.getLogger("x2go_sftp.cli").warning("permanently added %s (%s %s) to %s", name, key.get_name(),
                                               fp, known_hosts)


def _key_classes() -> list[type[paramiko.PKey]]:
    classes: list[type[paramiko.PKey]] = [paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey]
    return classes


def load_private_key(path: str, interactive: bool) -> paramiko.PKey | None:
    """The private key in ``path``, asking for its passphrase on a terminal; None if unusable."""
    lg = logging.getLogger("x2go_sftp.cli")
    passphrase: str | None = None
    for attempt in range(2):
        for cls in _key_classes():
            try:
                return cls.from_private_key_file(path, password=passphrase)
            except paramiko.PasswordRequiredException:
                break
            except (paramiko.SSHException, ValueError, OSError):
                continue
        else:
            lg.info("cannot load %s as a private key", path)
            return None
        if attempt or not interactive:
            lg.info("skipping %s: it needs a passphrase", path)
            return None
        passphrase = getpass.getpass(f"Enter passphrase for key '{path}': ")
    return None


def _identity_candidates(explicit: list[str]) -> Iterator[tuple[str, paramiko.PKey | None, str]]:
    """Keys to try, in order: explicit files, the agent's keys, ssh's default files (if none explicit)."""
    interactive = sys.stdin.isatty()
    for path in explicit:
        yield path, load_private_key(path, interactive), path
    try:
        agent_keys = paramiko.Agent().get_keys()
    except Exception:
        agent_keys = ()
    for key in agent_keys:
        yield "agent", key, f"agent key {fingerprint(key)}"
    if not explicit:
        for path in DEFAULT_IDENTITIES:
            path = os.path.expanduser(path)
            if os.path.exists(path):
                yield path, load_private_key(path, interactive), path


def _authenticate(transport: paramiko.Transport, user: str, explicit: list[str], name: str) -> None:
    tried: list[str] = []
    for _source, key, label in _identity_candidates(explicit):
        if key is None:
            continue
        if not transport.is_active():
            break
        try:
            transport.auth_publickey(user, key)
        except paramiko.BadAuthenticationType as e:
            raise ConnectError(f"authentication failed for {user}@{name}: the server allows only "
                               f"{', '.join(e.allowed_types)} (x2go-sftp uses keys)") from e
        except paramiko.AuthenticationException:
            tried.append(label)
            continue
        except (paramiko.SSHException, EOFError, OSError):
            tried.append(label)
            if not transport.is_active():
                break
            continue
        if transport.is_authenticated():
            return
    what = ", ".join(tried) if tried else "no usable key (none given with -i, no agent, no default key file)"
    raise ConnectError(f"authentication failed for {user}@{name} (tried: {what})")


def connect(destination: str, port: int | None, login: str | None, identities: list[str],
            known_hosts: str | None, accept_new: bool) -> tuple[paramiko.Transport, str]:
    """Log into ``[user@]host`` as ssh would; return the transport and the host's name for messages.

    Raises:
        ConnectError: network failure, unknown or changed host key, authentication failure.
    """
    user_part, _, host = destination.rpartition("@")
    if not host:
        raise ConnectError(f"no host in {destination!r}")
    cfg = _ssh_config(host)
    hostname = str(cfg.get("hostname", host))
    port = port or int(cfg.get("port", 22))
    user = login or user_part or str(cfg.get("user") or "") or getpass.getuser()
    explicit = [os.path.expanduser(p) for p in identities] + [os.path.expanduser(p) for p in cfg.get("identityfile", [])]
    if known_hosts is None:
        configured = str(cfg.get("userknownhostsfile", "")).split()
        known_hosts = os.path.expanduser(configured[0]) if configured else os.path.expanduser("~/.ssh/known_hosts")
        files = [known_hosts, os.path.expanduser("~/.ssh/known_hosts2"), "/etc/ssh/ssh_known_hosts"]
    else:
        files = [known_hosts]
    name = str(cfg.get("hostkeyalias") or known_hosts_name(hostname, port))
    known = _load_known(files, name)

    try:
        sock = socket.create_connection((hostname, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise ConnectError(f"cannot connect to {hostname} port {port}: {e.strerror or e}") from e
    transport = paramiko.Transport(sock)
    try:
        _restrict_host_key_types(transport, known)
        _prefer_gcm(transport)
        transport.banner_timeout = HANDSHAKE_TIMEOUT
        try:
            transport.start_client(timeout=HANDSHAKE_TIMEOUT)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ConnectError(f"SSH handshake with {hostname} port {port} failed: {e}") from e
        _check_host_key(transport, known, name, known_hosts, accept_new, hostname)
        _authenticate(transport, user, explicit, name)
    except BaseException:
        transport.close()
        raise
    sock.settimeout(None)
    return transport, host


# -- commands -------------------------------------------------------------------
class _Stop(Exception):
    """SIGINT/SIGTERM/SIGHUP while logging in (nothing is on the server yet)."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _SignalStop:
    """SIGINT, SIGTERM and SIGHUP set :attr:`event`, without the handler taking a lock.

    A Python signal handler runs in the main thread between two bytecodes,
    possibly while that thread holds the very lock ``Event.set()`` needs:
    ``Event.wait()`` holds its condition's lock as it starts and ends, and
    the main loop waits on the event twice a second.  A handler calling
    ``set()`` there waits for itself forever (seen in CI: the share never
    ended after SIGINT).  So the handler only writes a byte to a pipe; a
    thread reading it sets the event.  While :attr:`logging_in`, the first
    signal also raises :class:`_Stop` where the main thread is (nothing is on
    the server yet).
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.logging_in = True
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # a burst of signals must not block the handler
        self._thread = threading.Thread(target=self._relay, name="x2go-sftp-signals", daemon=True)
        self._previous: dict[int, Any] = {}

    def _relay(self) -> None:
        while os.read(self._read, 64):  # b"" once the write end is closed
            self.event.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError):  # the pipe is full: the event is being set anyway
            os.write(self._write, b"!")
        if self.logging_in:
            self.logging_in = False
            raise _Stop(signal.Signals(signum).name)

    def install(self) -> None:
        """Start the relay thread, then take over the signals."""
        self._thread.start()
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        """Give the signals back, end the relay thread, close the pipe (also after a partial install)."""
        self.logging_in = False
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        os.close(self._write)
        if self._thread.ident is not None:
            self._thread.join()
        os.close(self._read)

    def __enter__(self) -> _SignalStop:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def cmd_share(args: argparse.Namespace) -> int:
    quiet: bool = args.quiet
    handler = configure_logging(args.verbose, quiet)
    try:
        folders = check_local_folders(args.local_dirs, args.read_only)
    except ShareError as e:
        error(str(e))
        return EXIT_USAGE

    # While logging in, a signal may interrupt whatever runs: nothing is on the
    # server yet.  From then on it only sets ``stop``, which share() checks
    # between steps: an exception in the middle of an SFTP exchange would
    # leave the stream unusable for the undoing.
    signals = _SignalStop()
    stop = signals.event
    transport: paramiko.Transport | None = None
    s: Share | None = None
    try:
        try:
            signals.install()
            transport, host = connect(args.destination, args.port, args.login, args.identity or [],
                                      args.known_hosts, args.accept_new)
            signals.logging_in = False
            s = share(transport, folders, remote_dir=args.remote_dir, host=host, cancel=stop)
        except (_Stop, ShareCancelled):
            return EXIT_OK  # share() undid its part
        except (ConnectError, ShareError) as e:
            error(str(e))
            return EXIT_USAGE
        if not quiet:
            for m in s.mounts:
                say(f"{m.local_dir} -> {s.host}:{m.mountpoint}{' (read-only)' if m.read_only else ''}")
        status: StatusLine | None = None
        if not quiet and sys.stderr.isatty():
            status = StatusLine(s, sys.stderr)
            handler.status = status
            status.start()
        lost = False
        while not stop.wait(LIVENESS_CHECK_INTERVAL):
            if not s.is_active():
                lost = True
                break
        if status is not None:
            status.stop()
            handler.status = None
        problems = s.close()
        if lost:
            error(f"the connection to {s.host} was lost" + (": " + "; ".join(problems) if problems else ""))
            return EXIT_LOST
        for p in problems:
            error(p)
        return EXIT_OK
    finally:
        signals.logging_in = False
        if s is not None:
            s.close()
        if transport is not None:
            transport.close()
        signals.restore()


def cmd_demo(args: argparse.Namespace) -> int:
    from .__main__ import demo

    return demo(args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Share local folders over sshfs through a reverse SSH tunnel, "
                               "with no SSH server on this machine.")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} (paramiko {paramiko.__version__})")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug, -vvv also SFTP requests and paramiko)")
    sub = parser.add_subparsers(dest="command", required=True)

    p_share = sub.add_parser(
        "share", help="mount local folders on an SSH server you can log into",
        description="Mount each LOCAL_DIR on HOST at REMOTE_DIR/<basename> with sshfs, served from this "
                    "machine through a reverse port forward. Runs until Ctrl-C, then unmounts and "
                    "removes everything it put on HOST.")
    p_share.add_argument("-p", "--port", type=int, help="SSH port of HOST (default: ~/.ssh/config, then 22)")
    p_share.add_argument("-i", "--identity", action="append", metavar="IDENTITY",
                         help="private key file to log in with (repeatable)")
    p_share.add_argument("-l", "--login", help="user name on HOST")
    p_share.add_argument("--known-hosts", metavar="FILE", help="known_hosts file (default ~/.ssh/known_hosts)")
    p_share.add_argument("--accept-new", action="store_true",
                         help="add an unknown host's key to known_hosts (a changed key is always refused)")
    p_share.add_argument("--read-only", action="store_true", help="HOST may read the folders, never change them")
    p_share.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, metavar="DIR",
                         help=f"where to mount on HOST (default {DEFAULT_REMOTE_DIR})")
    p_share.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p_share.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help="log more (as before the command)")
    p_share.add_argument("destination", metavar="[USER@]HOST")
    p_share.add_argument("local_dirs", nargs="+", metavar="LOCAL_DIR")
    p_share.set_defaults(func=cmd_share)

    p_demo = sub.add_parser("demo", help="share a temporary folder through an in-process X2Go server")
    p_demo.add_argument("--size", type=int, default=4 * 1024 * 1024, help="bytes to write and read back")
    p_demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``x2go-sftp`` console script."""
    args = build_parser().parse_args(argv)
    if args.command != "share" and args.verbose:
        configure_logging(args.verbose, False)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
