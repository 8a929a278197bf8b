"""Tuning: ChunkPipe semantics, where pipes are swapped, TCP_NODELAY, ciphers, packet fitting, outer rekey.

Speed itself is measured by ``python -m tests.bench.bench_mount`` and never
asserted here; these tests check that each optimisation is in effect (or
cleanly absent where paramiko lacks what it needs) and keeps data intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import threading

import paramiko
import pytest
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout

from x2go_sftp import paramiko_compat, tuning

HAS_GCM = "aes128-gcm@openssh.com" in paramiko.Transport._cipher_info


# -- ChunkPipe -------------------------------------------------------------------
def test_chunk_pipe_reads_across_and_within_chunks():
    pipe = tuning.ChunkPipe()
    pipe.feed(b"abc")
    pipe.feed(b"defgh")
    pipe.feed(bytearray(b"ij"))
    assert len(pipe) == 10 and pipe.read_ready()
    assert pipe.read(2) == b"ab"
    assert pipe.read(4) == b"cdef"
    assert pipe.read(100) == b"ghij"
    assert len(pipe) == 0 and not pipe.read_ready()


def test_chunk_pipe_matches_buffered_pipe_on_random_traffic():
    rng = random.Random(5)
    ours, theirs = tuning.ChunkPipe(), BufferedPipe()
    for _ in range(3000):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.randint(0, 40000))
            ours.feed(data)
            theirs.feed(data)
        elif len(theirs):
            n = rng.randint(1, 70000)
            assert ours.read(n, timeout=0) == theirs.read(n, timeout=0)
        assert len(ours) == len(theirs)
    assert ours.empty() == theirs.empty()
    assert len(ours) == 0


def test_chunk_pipe_timeouts_and_close():
    pipe = tuning.ChunkPipe()
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.0)
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.01)  # bounded wait on an empty pipe
    pipe.feed(b"tail")
    pipe.close()
    assert pipe.read(10) == b"tail"  # buffered data survives close
    assert pipe.read(10) == b""  # then EOF, without blocking
    assert pipe.read(10, timeout=0.0) == b""


def test_chunk_pipe_wakes_a_blocked_reader():
    pipe = tuning.ChunkPipe()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read(100)))
    reader.start()
    pipe.feed(b"wake up")
    reader.join(10)
    assert not reader.is_alive() and got == [b"wake up"]
    closer = threading.Thread(target=lambda: got.append(pipe.read(100)))
    closer.start()
    pipe.close()
    closer.join(10)
    assert not closer.is_alive() and got[-1] == b""


def test_chunk_pipe_handover_only_once_empty():
    from x2go_sftp.fastpath import Handover

    pipe = tuning.ChunkPipe()
    pipe.feed(b"before")
    pipe.offer_handover()
    assert pipe.read(100) == b"before"  # what was fed before the offer is read first
    with pytest.raises(Handover):
        pipe.read(100)
    with pytest.raises(PipeTimeout):  # the offer is taken once
        pipe.read(100, timeout=0.0)
    pipe.offer_handover()
    assert pipe.take_handover() and not pipe.take_handover()
    # a reader blocked on the empty pipe is woken by the offer
    pipe.offer_handover()
    pipe.take_handover()
    raised = threading.Event()

    def reader() -> None:
        try:
            pipe.read(100)
        except Handover:
            raised.set()

    t = threading.Thread(target=reader)
    t.start()
    pipe.offer_handover()
    t.join(10)
    assert raised.is_set()


def test_chunk_pipe_event_follows_data_like_buffered_pipe():
    pipe = tuning.ChunkPipe()
    event = threading.Event()
    pipe.feed(b"x")
    pipe.set_event(event)
    assert event.is_set()  # data already there
    assert pipe.read(1) == b"x"
    assert not event.is_set()  # drained
    pipe.feed(b"yz")
    assert event.is_set()
    pipe.read(1)
    assert event.is_set()  # one byte left
    pipe.read(1)
    pipe.close()
    assert event.is_set()  # EOF is readable


# -- where the pipes are swapped ------------------------------------------------------
def test_use_chunk_pipe_refuses_outside_the_transport_thread(outer):
    chan = outer.open_session()
    try:
        assert isinstance(chan.in_buffer, BufferedPipe)
        assert tuning.use_chunk_pipe(chan) is False  # this test thread is not the transport's
        assert type(chan.in_buffer) is BufferedPipe
    finally:
        chan.close()


def _inner_transport(tunnel) -> paramiko.Transport:
    threads = list(tunnel.open_channels.values())
    assert len(threads) == 1
    inner = threads[0].inner_transport
    assert inner is not None
    return inner


def test_tunnel_channels_use_chunk_pipes_and_keep_data_intact(make_tunnel, connect, export_dir):
    tunnel = make_tunnel([export_dir])
    client = connect(tunnel)
    payload = os.urandom(3 * 1024 * 1024 + 123)
    with client.open(f"{export_dir}/up.bin", "wb") as f:
        f.set_pipelined(True)
        f.write(payload)
    with open(os.path.join(export_dir, "up.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    with client.open(f"{export_dir}/up.bin", "rb") as f:
        f.prefetch()
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    inner = _inner_transport(tunnel)
    forwarded = inner.sock  # the outer transport's forwarded-tcpip channel
    assert isinstance(forwarded.in_buffer, tuning.ChunkPipe)
    sessions = [c for c in inner._channels.values() if c.active]
    assert sessions and all(isinstance(c.in_buffer, tuning.ChunkPipe) for c in sessions)


def test_inner_data_packets_fit_one_outer_packet(make_tunnel, connect, export_dir):
    tunnel = make_tunnel([export_dir])
    connect(tunnel).listdir(export_dir)
    inner = _inner_transport(tunnel)
    outer_payload = inner.sock.out_max_packet_size - 64
    session = next(c for c in inner._channels.values() if c.active)
    inner_payload = session.out_max_packet_size - 64
    # A full inner data packet, with every header and the MAC, fits one outer packet.
    assert inner_payload + tuning.INNER_PACKET_OVERHEAD <= outer_payload
    assert inner_payload >= outer_payload - 2 * tuning.INNER_PACKET_OVERHEAD  # and is not needlessly small


def test_channels_we_own_acknowledge_data_in_quarters_of_the_window(make_tunnel, connect, export_dir):
    """Fewer CHANNEL_WINDOW_ADJUST packets (each crosses python-x2go's paramiko transport):
    one per quarter of the window, where paramiko sends one per tenth."""
    tunnel = make_tunnel([export_dir])
    client = connect(tunnel)
    transport = client.get_channel().get_transport()
    adjusts: list[int] = []
    table = dict(transport._channel_handler_table)
    window_adjust = table[paramiko.common.MSG_CHANNEL_WINDOW_ADJUST]

    def counting(chan, m):
        adjusts.append(int.from_bytes(m.asbytes()[4:8], "big"))  # after the recipient channel
        window_adjust(chan, m)

    table[paramiko.common.MSG_CHANNEL_WINDOW_ADJUST] = counting
    transport._channel_handler_table = table  # this client only
    payload = os.urandom(4 * 1024 * 1024)
    with client.open(f"{export_dir}/acks.bin", "wb") as f:
        f.set_pipelined(True)
        f.write(payload)
    with open(os.path.join(export_dir, "acks.bin"), "rb") as f:
        assert f.read() == payload
    quarter = tuning.INNER_WINDOW_SIZE // 4
    assert adjusts and all(n > quarter for n in adjusts)
    assert 4 <= len(adjusts) <= len(payload) // quarter + 1  # paramiko's tenths: about 20
    # and the outer forwarded channel, ours too
    forwarded = _inner_transport(tunnel).sock
    assert forwarded.in_window_threshold == forwarded.in_window_size // 4


# -- ciphers ---------------------------------------------------------------------------
def test_inner_transport_negotiates_gcm_on_every_paramiko(make_tunnel, connect, export_dir):
    """AES-GCM inside, paramiko's own from 3.3, the backport before (2.12: Debian 12, Ubuntu 24.04)."""
    tunnel = make_tunnel([export_dir])
    connect(tunnel).listdir(export_dir)
    inner = _inner_transport(tunnel)
    assert inner.local_cipher == inner.remote_cipher == "aes128-gcm@openssh.com"
    assert paramiko_compat.gcm_backported(inner) == (not HAS_GCM)


def test_prefer_fast_ciphers_leaves_defaults_without_gcm(monkeypatch):
    t = paramiko.Transport(socket.socketpair()[0])
    try:
        default = tuple(t.get_security_options().ciphers)
        monkeypatch.setattr(tuning, "PREFERRED_CIPHERS", ("no-such-cipher",))
        assert tuning.prefer_fast_ciphers(t) == default
    finally:
        t.close()


# -- the caller's transport --------------------------------------------------------------
def _nodelay(transport: paramiko.Transport) -> int:
    return transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_tcp_nodelay_is_set_on_the_outer_socket_by_default(make_tunnel, outer):
    assert _nodelay(outer) == 0  # paramiko leaves it off
    make_tunnel()
    assert _nodelay(outer) == 1


def test_tcp_nodelay_opt_out_leaves_the_socket_alone(make_tunnel, outer):
    make_tunnel(tcp_nodelay=False)
    assert _nodelay(outer) == 0


def test_set_tcp_nodelay_ignores_non_tcp_transports():
    a, b = socket.socketpair()
    try:
        class Fake:
            sock = a

        assert tuning.set_tcp_nodelay(Fake()) is False
        assert tuning.set_tcp_nodelay(object()) is False
    finally:
        a.close()
        b.close()


def test_outer_cipher_untouched_unless_opted_in(make_tunnel, connect, outer, export_dir):
    before = outer.local_cipher
    connect(make_tunnel([export_dir])).listdir(export_dir)
    assert outer.local_cipher == before


def test_outer_gcm_opt_in_rekeys_and_the_connection_keeps_working(make_tunnel, connect, outer, export_dir):
    """paramiko's own AES-GCM from 3.3; before, the backport on python-x2go's transport too."""
    tunnel = make_tunnel([export_dir], outer_gcm=True)
    assert outer.local_cipher == outer.remote_cipher == "aes128-gcm@openssh.com"
    assert paramiko_compat.gcm_backported(outer) == (not HAS_GCM)
    client = connect(tunnel)
    payload = os.urandom(200_000)
    with client.open(f"{export_dir}/after-rekey.bin", "wb") as f:
        f.write(payload)
    with client.open(f"{export_dir}/after-rekey.bin", "rb") as f:
        assert f.read() == payload


def test_outer_gcm_rekeys_a_connection_once(make_tunnel, outer, export_dir, caplog):
    """A second tunnel on a connection already on AES-GCM asks for no second key exchange."""
    outer.set_log_channel("x2go_sftp.test.outer")
    caplog.set_level(logging.DEBUG, logger="x2go_sftp.test.outer")

    def exchanges() -> int:
        return sum("Switch to new keys" in r.getMessage() for r in caplog.records if r.name == "x2go_sftp.test.outer")

    make_tunnel([export_dir], outer_gcm=True)
    assert outer.local_cipher == "aes128-gcm@openssh.com" and exchanges() == 1
    make_tunnel([export_dir], outer_gcm=True)
    assert exchanges() == 1


# -- read-ahead socket under the inner transport ---------------------------------------
def test_read_ahead_socket_returns_the_stream_unchanged_and_keeps_timeouts():
    a, b = socket.socketpair()
    try:
        sock = tuning.ReadAheadSocket(a)
        payload = os.urandom(300_000)
        sender = threading.Thread(target=b.sendall, args=(payload,))  # more than the socket buffers
        sender.start()
        rng = random.Random(7)
        got = b""
        while len(got) < len(payload):
            n = rng.choice((1, 4, 16, 1000, 40000, 500000))
            held = sock.read_buffered()
            chunk = sock.recv(n)
            assert 0 < len(chunk) <= n
            assert held >= 0 and (held == 0 or len(chunk) == min(n, held))  # a short read only from a short buffer
            got += chunk
        assert got == payload
        assert sock.read_buffered() == 0
        sender.join()
        sock.settimeout(0.01)  # passed to the socket: an empty read times out as before
        with pytest.raises(socket.timeout):
            sock.recv(4)
        assert sock.gettimeout() == 0.01
        b.close()
        assert sock.recv(4) == b""  # EOF as from the socket
    finally:
        a.close()
        b.close()


def test_inner_transport_reads_the_forwarded_channel_ahead(make_tunnel, connect, export_dir):
    tunnel = make_tunnel([export_dir])
    client = connect(tunnel)
    payload = os.urandom(1024 * 1024 + 5)
    with client.open(f"{export_dir}/ra.bin", "wb") as f:
        f.set_pipelined(True)
        f.write(payload)
    with open(os.path.join(export_dir, "ra.bin"), "rb") as f:
        assert f.read() == payload
    assert isinstance(_inner_transport(tunnel).sock, tuning.ReadAheadSocket)


# -- replies held while more requests are buffered ---------------------------------------
class _CountingPipe(BufferedPipe):
    """paramiko's pipe, counting the SSH data packets fed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.feeds = 0

    def feed(self, data: bytes) -> None:
        self.feeds += 1
        super().feed(data)


def _raw_realpath(rid: int) -> bytes:
    body = rid.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"."
    return (len(body) + 1).to_bytes(4, "big") + bytes((16,)) + body  # SSH_FXP_REALPATH


def _raw_replies(chan: paramiko.Channel, count: int) -> list[int]:
    """Read ``count`` SFTP replies from ``chan``; their request ids."""
    buf = b""
    ids = []
    while len(ids) < count:
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            chunk = chan.recv(65536)
            assert chunk, "channel closed"
            buf += chunk
        size = int.from_bytes(buf[:4], "big")
        ids.append(int.from_bytes(buf[5:9], "big"))
        buf = buf[4 + size:]
    assert buf == b""
    return ids


def test_replies_to_buffered_requests_leave_together(make_tunnel, connect, export_dir):
    client = connect(make_tunnel([export_dir]))
    chan = client.get_channel()
    chan.settimeout(10)
    counter = _CountingPipe()
    chan.in_buffer = counter  # idle channel: nothing is being fed while we swap
    # 50 requests in one SSH packet: the engine has them all before it answers the first.
    chan.sendall(b"".join(_raw_realpath(1000 + i) for i in range(50)))
    assert _raw_replies(chan, 50) == [1000 + i for i in range(50)]
    assert counter.feeds == 1  # one SSH packet for all 50 replies (one each without holding)
    assert client.listdir(export_dir) == ["hello.txt"]  # the session goes on


def test_a_held_reply_is_sent_before_waiting_for_the_rest_of_a_request(make_tunnel, connect, export_dir):
    client = connect(make_tunnel([export_dir]))
    chan = client.get_channel()
    chan.settimeout(10)
    first, second = _raw_realpath(1), _raw_realpath(2)
    # A whole request and the start of the next: the first reply must not wait for the rest.
    chan.sendall(first + second[:3])
    assert _raw_replies(chan, 1) == [1]
    chan.sendall(second[3:])
    assert _raw_replies(chan, 1) == [2]


_READER_FIRST = r"""
import sys
from gevent import monkey
monkey.patch_all()
import gevent
from x2go_sftp import tuning
setting, drained, reader = sys.argv[1:4]
assert tuning.yield_wanted()
tuning.YIELD_TO_READER = setting == "on"
pipe = tuning.ChunkPipe(None, (lambda: drained == "drained") if tuning.yield_wanted() else None)
order = []
if reader == "reader":
    gevent.spawn(lambda: order.append(("read", pipe.read(100))))
    gevent.sleep(0)  # the reader blocks in read()
gevent.spawn(lambda: order.append(("other greenlet", None)))  # runs at the next switch
pipe.feed(b"request")
order.append(("feed returned", None))
gevent.sleep(0.01)
print(order, pipe.yields)
"""


@pytest.mark.parametrize(("setting", "drained", "reader", "expected"), [
    # The transport's greenlet lets the waiting session answer first ...
    ("on", "drained", "reader", "[('other greenlet', None), ('read', b'request'), ('feed returned', None)] 1"),
    # ... but reads on while its socket holds more (a burst stays batched),
    ("on", "more", "reader", "[('feed returned', None), ('other greenlet', None), ('read', b'request')] 0"),
    # never switches when no reader waits,
    ("on", "drained", "none", "[('feed returned', None), ('other greenlet', None)] 0"),
    # and not at all when switched off.
    ("off", "drained", "reader", "[('feed returned', None), ('other greenlet', None), ('read', b'request')] 0"),
])
def test_under_gevent_feed_yields_to_a_waiting_reader_only_when_the_feeder_is_drained(
        setting: str, drained: str, reader: str, expected: str) -> None:
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _READER_FIRST, setting, drained, reader], capture_output=True,
                         text=True, timeout=60, env=env, cwd=root)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


def test_with_plain_threads_no_pipe_is_made_to_yield(make_tunnel, connect, export_dir) -> None:
    # The session's thread runs beside the transport's: a yield would only hand the GIL over.
    assert not tuning.yield_wanted()
    tunnel = make_tunnel([export_dir])
    connect(tunnel).listdir(export_dir)
    pipes = [paramiko_compat.channel_in_buffer(t.channel) for t in tunnel.open_channels.values()]
    assert pipes and all(isinstance(p, tuning.ChunkPipe) and p._feeder_drained is None for p in pipes)
    assert sum(p.yields for p in pipes) == 0


def test_drained_check_asks_the_kernel_what_waits_unread() -> None:
    a, b = socket.socketpair()
    try:
        drained = tuning.drained_check(a)
        assert drained is not None
        assert drained()
        b.sendall(b"more")
        assert not drained()
        assert a.recv(10) == b"more"
        assert drained()
        a.close()
        assert not drained()  # closed: say "not drained", so no yield
    finally:
        a.close()
        b.close()
    assert tuning.drained_check(object()) is None  # no descriptor (a ProxyCommand, say): no check, no yield
    assert tuning.drained_check(None) is None
