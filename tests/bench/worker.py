"""One X2Go client process for the benchmark: python-x2go's outer connection plus a tunnel.

Run as ``python -m tests.bench.worker MODE SSHD_PORT KEYDIR [--disable a,b]``.
MODE is ``gevent`` (this library, gevent-patched as python-x2go runs),
``threads`` (this library, plain threads), ``legacy`` (the 2014 design,
gevent-patched) or ``forward`` (no SFTP server at all: python-x2go's
connection only relays each forwarded channel to a local sshd, gevent-patched;
what the outer paramiko hop costs by itself).  The worker logs into the X2Go-server sshd with paramiko,
runs a long command on the connection (python-x2go always has one), starts
the tunnel and prints one JSON line ``{"port": N}``.  It exits when its
standard input closes.  ``--disable`` switches single optimisations off to
measure what each buys (nodelay, gcm, pipe, fit, readahead, hold, fastpath, ack; command: no remote command, a forward-only connection;
asbytes: paramiko 2.x's own asbytes, which formats the repr of every packet sent; maccmp: paramiko's
own MAC comparison, a Python loop per packet received; wb: WRITEs done in the session's greenlet,
no write-behind thread; dirbatch: READDIR replies of at most 100 names, as OpenSSH's; locks: gevent's
locks for the channel pipe and the exports; untimed: the fast path's channel reads with paramiko's timeout;
lazywb: the write-behind thread woken for every WRITE and waking the session after every batch); ``--outer-gcm``
turns on the opt-in rekey of the outer connection to AES-GCM.

The library's tunnel applies x2go_sftp.paramiko_compat.fix_speed_defects
(``asbytes`` on paramiko 2.x, the MAC comparison on every release;
process-wide, so python-x2go's connection too).  ``forward`` applies them
as well: with x2go-sftp installed, python-x2go's connection runs with them, so
that is the floor to compare with.  ``legacy`` (python-x2go without x2go-sftp)
does not.  ``X2GO_SFTP_ASBYTES_FIX=0`` and ``X2GO_SFTP_MAC_COMPARE_FIX=0`` in
the environment turn them off for all.
"""

from __future__ import annotations

import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "gevent"
if MODE in ("gevent", "legacy", "forward"):
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import paramiko  # noqa: E402

# Keeps python-x2go's "a command is running on the connection" state for the whole run;
# cat ends with the connection (its input), where a sleep would outlive it.
REMOTE_COMMAND = "cat"


def outer_connection(port: int, client_key: paramiko.PKey, user: str,
                     command: bool = True) -> tuple[paramiko.Transport, paramiko.Channel | None]:
    """python-x2go's connection: a paramiko client Transport, key auth, one command running.

    Without ``command`` the connection only forwards (sshd then leaves Nagle
    on at its end: it sets TCP_NODELAY only once a session runs).
    """
    sock = socket.create_connection(("127.0.0.1", port))
    transport = paramiko.Transport(sock)
    transport.start_client()
    transport.auth_publickey(user, client_key)
    if not command:
        return transport, None
    chan = transport.open_session()
    chan.exec_command(REMOTE_COMMAND)
    return transport, chan


def wait_for_eof() -> None:
    """Block until stdin closes; via select so gevent's hub keeps serving meanwhile."""
    while True:
        select.select([0], [], [])
        if not os.read(0, 4096):
            return


class Relay:
    """The ``forward`` mode: each reverse-forwarded channel relayed to TCP ``target`` (a local sshd).

    The cheapest thing a process holding python-x2go's connection can do with
    the bytes: no inner SSH, no SFTP.  Its CPU is the floor under any design
    that keeps that connection in paramiko.
    """

    def __init__(self, transport: paramiko.Transport, target: int, outer_gcm: bool = False):
        from x2go_sftp import paramiko_compat, tuning

        self.transport, self.target, self.tuning = transport, target, tuning
        tuning.set_tcp_nodelay(transport)
        if outer_gcm:  # as the tunnel does with outer_gcm (install()'s default)
            paramiko_compat.answer_close_after_kex(transport)
            tuning.rekey_outer_to_gcm(transport)
        paramiko_compat.fix_speed_defects()  # as our tunnel does for python-x2go's connection
        self.server_port = transport.request_port_forward("127.0.0.1", 0, self.handler)

    def handler(self, chan: paramiko.Channel, origin: object, server: object) -> None:
        self.tuning.use_chunk_pipe(chan)  # the transport's thread: the channel is ours to tune
        threading.Thread(target=self.relay, args=(chan,), daemon=True).start()

    def relay(self, chan: paramiko.Channel) -> None:
        sock = socket.create_connection(("127.0.0.1", self.target))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=self.pump, args=(sock.recv, chan.sendall, chan.close), daemon=True).start()
        self.pump(chan.recv, sock.sendall, sock.close)

    @staticmethod
    def pump(recv: Callable[[int], bytes], send: Callable[[bytes], None], close: Callable[[], None]) -> None:
        """Copy until EOF (or an error), then close the other side."""
        try:
            while data := recv(256 * 1024):
                send(data)
        except OSError:
            pass
        close()

    def stop(self) -> None:
        self.transport.cancel_port_forward("127.0.0.1", self.server_port)


def count_outer_packets(path: Path) -> None:
    """Diagnostics: count the outer connection's packets by direction and size; JSON to ``path`` at exit.

    Set with ``X2GO_BENCH_PACKETS=DIR`` (one file per worker).  Wraps paramiko's
    Packetizer in this benchmark process only.
    """
    import atexit
    import collections

    from paramiko.packet import Packetizer

    counts: dict[str, collections.Counter[int]] = {"in": collections.Counter(), "out": collections.Counter()}
    outer: set[int] = set()
    read_message, send_message, start_client = (Packetizer.read_message, Packetizer.send_message,
                                                paramiko.Transport.start_client)

    def bucket(n: int) -> int:
        return 0 if n < 1024 else 1 << (n - 1).bit_length()  # 0: below 1 KiB; else the power of 2 above

    def read(self: Packetizer) -> tuple[int, paramiko.Message]:
        ptype, m = read_message(self)
        if id(self) in outer:
            counts["in"][bucket(len(m.asbytes()) + 1)] += 1
        return ptype, m

    def send(self: Packetizer, data: paramiko.Message) -> None:
        if id(self) in outer:
            counts["out"][bucket(len(data.asbytes()))] += 1
        send_message(self, data)

    def start(self: paramiko.Transport, *a: object, **k: object) -> object:
        outer.add(id(self.packetizer))
        return start_client(self, *a, **k)

    Packetizer.read_message, Packetizer.send_message = read, send  # type: ignore[method-assign]
    paramiko.Transport.start_client = start  # type: ignore[method-assign]
    atexit.register(lambda: path.write_text(json.dumps({d: dict(c) for d, c in counts.items()})))


def disable(names: list[str]) -> None:
    """Switch single optimisations off (benchmark ablation only)."""
    from x2go_sftp import tuning

    for name in names:
        if name == "gcm":
            tuning.PREFERRED_CIPHERS = ()
        elif name == "pipe":
            tuning.USE_CHUNK_PIPE = False
            tuning.INNER_MAX_PACKET_SIZE = paramiko.common.DEFAULT_MAX_PACKET_SIZE
        elif name == "fit":
            tuning.FIT_INNER_PACKETS = False
        elif name == "readahead":
            tuning.USE_READ_AHEAD = False
        elif name == "fastpath":
            from x2go_sftp import fastpath

            fastpath.ENABLED = False
        elif name == "yield":
            tuning.YIELD_TO_READER = False
        elif name == "ack":
            tuning.WINDOW_ACK_FRACTION = 10  # paramiko's own
        elif name == "hold":
            from x2go_sftp.engine import SFTPEngine

            SFTPEngine.hold_replies = False
        elif name == "gcmctx":
            os.environ["X2GO_SFTP_GCM_CONTEXT"] = "0"  # x2go_sftp.aesgcm's opt-out, read for each new key
        elif name == "asbytes":
            os.environ["X2GO_SFTP_ASBYTES_FIX"] = "0"  # the opt-out, read when the tunnel is made
        elif name == "maccmp":
            os.environ["X2GO_SFTP_MAC_COMPARE_FIX"] = "0"  # the opt-out, read when the tunnel is made
        elif name == "dirbatch":
            from x2go_sftp import engine

            engine.READDIR_MAX_NAMES = 100  # OpenSSH's sftp-server's batch
        elif name == "locks":
            from x2go_sftp import defaults

            defaults.NATIVE_LOCKS = False
        elif name == "untimed":
            from x2go_sftp import fastpath

            fastpath.RECV_UNTIMED = False
        elif name == "wb":
            from x2go_sftp.engine import SFTPEngine

            SFTPEngine.write_behind = False
        elif name == "lazywb":
            from x2go_sftp import writebehind

            writebehind.WAKE_LAZILY = False
        elif name not in ("nodelay", "command") and name:
            raise SystemExit(f"unknown optimisation {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("gevent", "threads", "legacy", "forward"))
    parser.add_argument("sshd_port", type=int)
    parser.add_argument("keydir", type=Path)
    parser.add_argument("--disable", default="")
    parser.add_argument("--user", default="root")
    parser.add_argument("--outer-gcm", action="store_true")
    parser.add_argument("--target", type=int, default=0, help="forward mode: the local sshd's port")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                        help="override an integer constant of x2go_sftp.tuning (experiments)")
    args = parser.parse_args()

    client_key = paramiko.RSAKey.from_private_key_file(str(args.keydir / "outer_client"))
    session_key = paramiko.RSAKey.from_private_key_file(str(args.keydir / "session"))
    host_key = paramiko.RSAKey.from_private_key_file(str(args.keydir / "inner_host"))
    off = [n for n in args.disable.split(",") if n]
    if os.environ.get("X2GO_BENCH_PACKETS"):
        count_outer_packets(Path(os.environ["X2GO_BENCH_PACKETS"]) / f"{args.mode}-{os.getpid()}.json")
    transport, command = outer_connection(args.sshd_port, client_key, args.user, "command" not in off)
    if os.environ.get("X2GO_BENCH_CPU_SPLIT"):
        from tests.bench import cpu_split

        cpu_split.install(Path(os.environ["X2GO_BENCH_CPU_SPLIT"]), transport, args.mode != "threads")

    if args.mode == "forward":
        relay = Relay(transport, args.target, args.outer_gcm)
        port = relay.server_port
        stop = relay.stop
    elif args.mode == "legacy":
        from tests.bench.legacy import LegacyTunnel

        tunnel = LegacyTunnel(transport, session_key, host_key, args.user)
        tunnel.start()
        tunnel.ready.wait(30)
        port = tunnel.server_port
        stop = tunnel.stop
    else:
        disable(off)
        from x2go_sftp import tuning

        for item in args.set:
            name, _, value = item.partition("=")
            if not isinstance(getattr(tuning, name, None), int):
                raise SystemExit(f"no integer tuning constant {name!r}")
            setattr(tuning, name, int(value))
        from x2go_sftp import X2GoRevFwTunnelToSFTP

        export = os.environ.get("BENCH_EXPORT", "/")
        kwargs = {"tcp_nodelay": "nodelay" not in off, "outer_gcm": args.outer_gcm}
        tunnel = X2GoRevFwTunnelToSFTP(0, transport, auth_key=session_key, exports=[export],
                                       host_key=host_key, username=args.user, **kwargs)
        tunnel.start()
        tunnel.wait_ready(30)
        port = tunnel.server_port
        stop = tunnel.stop_thread
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    wait_for_eof()
    stop()
    if command is not None:
        command.close()
    transport.close()


if __name__ == "__main__":
    main()
