"""The one module that touches paramiko's private names.

Every access to a name paramiko does not document (packetizer fields,
``Transport._channels``, ``_expected_packet``, ``BufferedPipe`` internals, ...)
lives here, next to the paramiko releases it was checked on.  The rest of the
package asks this module; nothing else imports or reads a private name.  A new
paramiko release then means reading this one file.

Each optimisation asks :func:`probe` (done once per transport) whether it may
run; on a release outside :data:`CHECKED_RELEASES`, or when a name is missing,
the answer is no, the plain paramiko path is used, and one INFO line says why.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import itertools
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paramiko
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from paramiko.buffered_pipe import BufferedPipe
from paramiko.common import MSG_CHANNEL_CLOSE, cMSG_CHANNEL_DATA
from paramiko.packet import NeedRekeyException, Packetizer
from paramiko.sftp import BaseSFTP

from . import aesgcm, defaults, log

# -- which tricks, checked on which releases -------------------------------------------
#
# Each trick below reaches into paramiko.  A trick runs on a transport only if
# (1) the running release lies in its checked range: from the oldest release it
# was checked on up to (not including) the next major after the newest, and
# (2) every name it needs is present on that transport (probed once, cached on
# the transport).  Otherwise the trick is off for that transport, paramiko's
# own behaviour stays, and one INFO line per transport names what is off and why.


def _release(version: str) -> tuple[int, int]:
    """``"5.1.0"`` -> ``(5, 1)``; anything unparsable -> ``(0, 0)`` (an unknown release)."""
    parts = []
    for piece in str(version).split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            return (0, 0)
        parts.append(int(digits))
    return (parts[0], parts[1]) if len(parts) == 2 else (0, 0)


PARAMIKO_RELEASE: tuple[int, int] = _release(getattr(paramiko, "__version__", ""))
"""The running paramiko as (major, minor); tests set it to pretend another release."""

_PK = "_Packetizer__"  # paramiko's private packetizer fields, by their mangled names
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class Trick:
    """One use of paramiko's internals: the names it needs and the releases it was checked on.

    Attributes:
        name: how log lines call it.
        checked_on: the releases (major, minor) the trick was read against and
            tested on.
        applies_from: releases before this lack the feature the trick serves
            (e.g. AES-GCM): there it is off without a log line.
        native_from: releases from this one on do themselves what the trick
            adds (e.g. AES-GCM): there it is off without a log line.
        transport: attributes of the ``Transport`` instance.
        packetizer: fields of its ``Packetizer`` (unmangled) and methods.
        channel: attributes of a ``Channel`` instance.
        pipe: attributes of a ``BufferedPipe`` instance.
    """

    name: str
    checked_on: tuple[tuple[int, int], ...]
    applies_from: tuple[int, int] = (0, 0)
    native_from: tuple[int, int] | None = None
    transport: tuple[str, ...] = ()
    packetizer: tuple[str, ...] = ()
    channel: tuple[str, ...] = ()
    pipe: tuple[str, ...] = ()

    def applies(self, release: tuple[int, int]) -> bool:
        """False where ``release`` lacks what the trick serves, or does it itself: there it is off quietly."""
        if release == (0, 0):  # unknown: the known() check speaks
            return True
        return self.applies_from <= release and (self.native_from is None or release < self.native_from)

    def known(self, release: tuple[int, int]) -> bool:
        """True if ``release`` lies in this trick's checked range."""
        newest = max(self.checked_on)
        return min(self.checked_on) <= release < (newest[0] + 1, 0)


BOUNDED_PACKETIZER = Trick(
    "bounded packetizer",
    checked_on=((2, 12), (3, 5), (5, 1)),
    packetizer=("socket", "remainder", "closed", "need_rekey", "block_size_in", "mac_size_in", "etm_in",
                "handshake_timed_out", "_check_keepalive", "read_all", "readline", "read_message"),
)
CHANNEL_GUARD = Trick(
    "channel data guard",
    checked_on=((2, 12), (3, 5), (5, 1)),
    transport=("_channel_handler_table",),
    channel=("in_buffer",),
)
CHUNK_PIPE = Trick(
    "chunk pipe",
    checked_on=((2, 12), (3, 5), (5, 1)),
    channel=("in_buffer", "lock", "in_window_size", "in_window_threshold", "out_max_packet_size"),
    pipe=("_closed", "_event"),
)
FAST_PATH = Trick(
    "fast path (AES-GCM)",
    checked_on=((3, 5), (5, 1)),
    applies_from=(3, 3),  # paramiko's first AES-GCM
    transport=("packetizer", "in_kex", "_expected_packet", "_channels", "_send_user_message",
               "clear_to_send", "clear_to_send_lock", "local_cipher", "remote_cipher", "active"),
    packetizer=("block_engine_in", "block_engine_out", "iv_in", "iv_out", "aead_in", "aead_out",
                "sequence_number_in", "sequence_number_out", "write_lock", "received_bytes",
                "received_packets", "sent_bytes", "sent_packets", "need_rekey", "remainder",
                "compress_engine_in", "compress_engine_out", "dump_packets", "closed", "socket",
                "_trigger_rekey", "write_all", "REKEY_BYTES", "REKEY_PACKETS"),
    channel=("_check_add_window", "out_buffer_cv", "in_buffer", "in_window_size", "out_window_size"),
)
FAST_PATH_CTR = Trick(
    "fast path (AES-CTR + HMAC-SHA2)",
    checked_on=((2, 12), (3, 5), (5, 1)),
    transport=("packetizer", "in_kex", "_expected_packet", "_channels", "_send_user_message",
               "clear_to_send", "clear_to_send_lock", "local_cipher", "remote_cipher", "local_mac",
               "remote_mac", "active"),
    packetizer=("block_engine_in", "block_engine_out", "mac_engine_in", "mac_engine_out", "mac_key_in",
                "mac_key_out", "mac_size_in", "mac_size_out", "etm_in", "etm_out", "block_size_in",
                "block_size_out", "sequence_number_in", "sequence_number_out", "write_lock",
                "received_bytes", "received_packets", "sent_bytes", "sent_packets", "need_rekey",
                "remainder", "compress_engine_in", "compress_engine_out", "dump_packets", "closed",
                "socket", "_trigger_rekey", "write_all", "REKEY_BYTES", "REKEY_PACKETS"),
    channel=("_check_add_window", "out_buffer_cv", "in_buffer", "in_window_size", "out_window_size"),
)
CHANNEL_SEND = Trick(
    "channel data before its close",
    checked_on=((2, 12), (3, 5), (5, 1)),
    transport=("clear_to_send", "clear_to_send_lock", "clear_to_send_timeout", "_send_message", "active"),
    channel=("lock", "closed", "_wait_for_send_window", "remote_chanid"),
)
KEX_CLOSE = Trick(
    "channel close during a key exchange",
    checked_on=((2, 12), (3, 5), (5, 1)),
    transport=("_channel_handler_table", "clear_to_send", "clear_to_send_lock", "_send_message",
               "_send_user_message", "_unlink_channel"),
    channel=("lock", "_close_internal", "chanid"),
)
KEX_EXT_INFO = Trick(
    "ext-info marker order",
    checked_on=((2, 12), (3, 5), (5, 1)),
    transport=("_really_parse_kex_init",),
)
GCM_BACKPORT = Trick(
    "AES-GCM where paramiko has none",
    checked_on=((2, 12),),
    native_from=(3, 3),  # paramiko's own AES-GCM
    transport=("_get_cipher", "_cipher_info", "_activate_inbound", "_activate_outbound", "_compute_key"),
    packetizer=("set_inbound_cipher", "set_outbound_cipher", "read_all", "write_all", "_trigger_rekey",
                "block_engine_in", "block_engine_out", "sequence_number_in", "sequence_number_out",
                "write_lock", "received_bytes", "received_packets", "received_bytes_overflow",
                "received_packets_overflow", "sent_bytes", "sent_packets", "need_rekey",
                "compress_engine_in", "compress_engine_out", "REKEY_BYTES", "REKEY_PACKETS",
                "REKEY_BYTES_OVERFLOW_MAX", "REKEY_PACKETS_OVERFLOW_MAX"),
)

TRICKS: tuple[Trick, ...] = (BOUNDED_PACKETIZER, CHANNEL_GUARD, CHUNK_PIPE, FAST_PATH, FAST_PATH_CTR,
                             CHANNEL_SEND, KEX_CLOSE, KEX_EXT_INFO, GCM_BACKPORT)
"""Every trick, with the releases it was checked on (``checked_on``)."""

CHECKED_RELEASES: tuple[tuple[int, int], ...] = tuple(sorted({r for t in TRICKS for r in t.checked_on}))

_PROBE_ATTR = "x2go_sftp_paramiko_probe"  # ours: where a transport's probe is cached
_LOG_TAG = "paramiko-compat"


class Probe:
    """What a probe found on one transport: which tricks may run there."""

    def __init__(self, release: tuple[int, int]) -> None:
        self.release = release
        self.allowed: dict[str, bool] = {}
        self.why_not: dict[str, str] = {}

    def may(self, trick: Trick) -> bool:
        """True if ``trick`` may run on this transport."""
        return self.allowed.get(trick.name, False)

    def __repr__(self) -> str:
        on = [n for n, ok in self.allowed.items() if ok]
        return f"<Probe paramiko {self.release[0]}.{self.release[1]}: on {on}, off {self.why_not}>"


def _has(obj: Any, name: str) -> bool:
    try:
        return hasattr(obj, name)
    except Exception:
        return False


def _sample_channel() -> Any:
    try:
        return paramiko.Channel(0)
    except Exception:
        return None


def _sample_pipe() -> Any:
    try:
        return BufferedPipe()
    except Exception:
        return None


def _missing(trick: Trick, transport: Any) -> list[str]:
    """The names ``trick`` needs that this transport (its packetizer, paramiko's Channel/BufferedPipe) lacks."""
    missing = [f"Transport.{n}" for n in trick.transport if not _has(transport, n)]
    pk = getattr(transport, "packetizer", None)
    for n in trick.packetizer:
        if not (_has(pk, _PK + n) or _has(pk, n)):
            missing.append(f"Packetizer.{n}")
    if trick.channel:
        chan = _sample_channel()
        missing += [f"Channel.{n}" for n in trick.channel if not _has(chan, n)]
    if trick.pipe:
        pipe = _sample_pipe()
        missing += [f"BufferedPipe.{n}" for n in trick.pipe if not _has(pipe, n)]
    return missing


def probe(transport: Any, logger: log.LoggerLike | None = None) -> Probe:
    """Which tricks may run on ``transport``: probed once, then cached on the transport.

    On the first call for a transport, one INFO line names each trick that is
    off and why (a release outside its checked range, or the missing names).

    Args:
        transport: a paramiko ``Transport`` (after its constructor ran).
        logger: an X2Go-style logger for that line (default: stdlib logging
            under ``x2go_sftp.paramiko-compat``).
    """
    cached = getattr(transport, _PROBE_ATTR, None)
    if isinstance(cached, Probe):
        return cached
    result = Probe(PARAMIKO_RELEASE)
    for trick in TRICKS:
        if not trick.applies(result.release):
            result.allowed[trick.name] = False  # nothing to serve on this release: quietly off
            continue
        if not trick.known(result.release):
            checked = ", ".join(f"{a}.{b}" for a, b in trick.checked_on)
            result.why_not[trick.name] = f"not checked on this release (checked on {checked})"
        else:
            missing = _missing(trick, transport)
            if missing:
                result.why_not[trick.name] = "missing " + ", ".join(missing)
        result.allowed[trick.name] = trick.name not in result.why_not
    with contextlib.suppress(Exception):
        setattr(transport, _PROBE_ATTR, result)
    if result.why_not:
        version = getattr(paramiko, "__version__", "?")
        reasons = "; ".join(f"{name}: {why}" for name, why in result.why_not.items())
        _info(logger)(f"paramiko {version}: off for this connection ({transport!r}): {reasons}",
                      loglevel=log.loglevel_INFO)
    return result


def may(transport: Any, trick: Trick) -> bool:
    """Shorthand: ``probe(transport).may(trick)``."""
    return probe(transport).may(trick)


def _info(logger: log.LoggerLike | None) -> log.TaggedLogger:
    # INFO is below python-x2go's default mask: without a caller's logger, let
    # stdlib logging (x2go_sftp.paramiko-compat) decide whether it shows.
    return log.tagged(logger, _LOG_TAG, loglevel=log.loglevel_DEFAULT | log.loglevel_INFO)


# -- the bounded packetizer (every inner transport) ---------------------------------------

PACKET_MAX_SIZE = 256 * 1024
"""Largest SSH packet (its declared length) we read: OpenSSH's ``PACKET_MAX_SIZE`` (packet.c).

paramiko has no bound: it reads whatever length a peer declares, up to
0x7FFFFFFC bytes, before it looks at a byte of it."""

IDENT_MAX_LEN = 8192
"""Longest identification line we read: OpenSSH's ``SSH_MAX_BANNER_LEN`` (ssh.h, used in kex.c).

RFC 4253 4.2 allows 255 characters; paramiko reads a line of any length."""

IDENT_MAX_LINES_BEFORE = 0
"""Lines a client may send before its identification: none, as OpenSSH's server
(kex.c: "Do not accept lines before the SSH ident from a client"; its client
accepts ``SSH_MAX_PRE_BANNER_LINES`` = 1024 from a server).  paramiko accepts 100."""

IDENT_RECV_SIZE = 1024
"""Bytes asked for per read of the identification (paramiko: 128); the rest waits in paramiko's remainder."""


class PacketTooLarge(paramiko.SSHException):
    """The peer declared a packet longer than :data:`PACKET_MAX_SIZE`."""


class BadIdentification(paramiko.SSHException):
    """The peer's identification broke :data:`IDENT_MAX_LEN` or :data:`IDENT_MAX_LINES_BEFORE`."""


class GcmPacketizer(Packetizer):
    """paramiko's ``Packetizer`` that also frames AES-GCM (RFC 5647), for releases without it.

    Nothing differs until the transport hands ``set_*_cipher`` a :class:`GcmKeys`
    (see :func:`backport_gcm`).  The cipher state then lives in the fields
    paramiko >= 3.3 names the same (``aead_*``, ``iv_*``), so the fast path
    reads it as on those releases; sequence numbers and rekey counters stay
    paramiko's, counted as 2.12 counts them.
    """

    _gcm_in = False
    _gcm_out = False

    def set_outbound_cipher(self, block_engine: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(block_engine, GcmKeys):
            super().set_outbound_cipher(block_engine.aead, _AES_BLOCK, None, _GCM_TAG, None, True)  # type: ignore[arg-type]
            self._gcm_way("out", block_engine)
        else:
            super().set_outbound_cipher(block_engine, *args, **kwargs)
            if self._gcm_out:
                self._gcm_way("out", None)

    def set_inbound_cipher(self, block_engine: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(block_engine, GcmKeys):
            super().set_inbound_cipher(block_engine.aead, _AES_BLOCK, None, _GCM_TAG, None)  # type: ignore[arg-type]
            self._gcm_way("in", block_engine)
        else:
            super().set_inbound_cipher(block_engine, *args, **kwargs)
            if self._gcm_in:
                self._gcm_way("in", None)

    def _gcm_way(self, way: str, keys: GcmKeys | None) -> None:
        """AES-GCM on (``keys``) or off for one direction (``"in"``/``"out"``), in paramiko >= 3.3's fields."""
        d = self.__dict__
        d[_PK + "aead_" + way], d[_PK + "iv_" + way] = (True, keys.iv) if keys is not None else (False, None)
        setattr(self, "_gcm_" + way, keys is not None)

    def send_message(self, data: Any) -> None:
        if not self._gcm_out:
            super().send_message(data)
            return
        # What paramiko >= 3.3 does for AES-GCM (RFC 5647 7.2), with 2.12's rekey accounting.
        d = self.__dict__
        payload = data.asbytes() if isinstance(data, paramiko.Message) else bytes(data)
        with d[_PK + "write_lock"]:
            compress = d[_PK + "compress_engine_out"]
            if compress is not None:
                payload = compress(payload)
            padding = 3 + _AES_BLOCK - ((len(payload) + 4) % _AES_BLOCK)  # the length is not encrypted
            seq = d[_PK + "sequence_number_out"]
            out = _gcm_seal(d, bytes((padding,)) + payload + bytes(padding), seq)
            d[_PK + "sequence_number_out"] = (seq + 1) & 0xFFFFFFFF
            self.write_all(out)
            sent = d[_PK + "sent_bytes"] = d[_PK + "sent_bytes"] + len(out)
            packets = d[_PK + "sent_packets"] = d[_PK + "sent_packets"] + 1
            if (packets >= self.REKEY_PACKETS or sent >= self.REKEY_BYTES) and not d[_PK + "need_rekey"]:
                d[_PK + "received_bytes_overflow"] = d[_PK + "received_packets_overflow"] = 0
                self._trigger_rekey()  # type: ignore[attr-defined]

    def read_message(self) -> tuple[int, paramiko.Message]:
        if not self._gcm_in:
            return super().read_message()
        d = self.__dict__
        header = self.read_all(_AES_BLOCK, check_rekey=True)
        (size,) = _U32.unpack_from(header)
        if size < _AES_BLOCK or size % _AES_BLOCK:
            raise paramiko.SSHException("Invalid packet blocking")
        # read_all checks the declared size against PACKET_MAX_SIZE before reading the body.
        body = header[4:] + self.read_all(size - _AES_BLOCK + 4 + _GCM_TAG)
        iv = d[_PK + "iv_in"]
        try:
            plain = d[_PK + "block_engine_in"].decrypt(iv, body, header[:4])
        except InvalidTag:
            raise paramiko.SSHException("Mismatched MAC") from None
        d[_PK + "iv_in"] = _next_iv(iv)
        padding = plain[0]
        if padding < 4 or padding + 2 > size:
            raise paramiko.SSHException("bad padding")
        payload = plain[1:size - padding]
        compress = d[_PK + "compress_engine_in"]
        if compress is not None:
            payload = compress(payload)
        seq = d[_PK + "sequence_number_in"]
        msg = paramiko.Message(payload[1:])
        msg.seqno = seq
        d[_PK + "sequence_number_in"] = (seq + 1) & 0xFFFFFFFF
        self._count_received(size + _GCM_TAG + 4)
        return payload[0], msg

    def _count_received(self, raw: int) -> None:
        """paramiko 2.12's rekey accounting for one packet read (``raw`` bytes on the wire)."""
        d = self.__dict__
        got = d[_PK + "received_bytes"] = d[_PK + "received_bytes"] + raw
        packets = d[_PK + "received_packets"] = d[_PK + "received_packets"] + 1
        if d[_PK + "need_rekey"]:
            # asked to rekey: the peer gets some packets to comply before the connection is dropped
            over = d[_PK + "received_bytes_overflow"] = d[_PK + "received_bytes_overflow"] + raw
            over_packets = d[_PK + "received_packets_overflow"] = d[_PK + "received_packets_overflow"] + 1
            if over_packets >= self.REKEY_PACKETS_OVERFLOW_MAX or over >= self.REKEY_BYTES_OVERFLOW_MAX:
                raise paramiko.SSHException("Remote transport is ignoring rekey requests")
        elif packets >= self.REKEY_PACKETS or got >= self.REKEY_BYTES:
            d[_PK + "received_bytes_overflow"] = d[_PK + "received_packets_overflow"] = 0
            self._trigger_rekey()  # type: ignore[attr-defined]


class BoundedPacketizer(GcmPacketizer):
    """paramiko's ``Packetizer`` that reads at most what OpenSSH would, and in linear time.

    Made by changing the class of the packetizer paramiko built (see
    :func:`bound_packetizer`); its fields stay paramiko's.  Differences:

    * a packet whose declared length exceeds :data:`PACKET_MAX_SIZE` raises
      :class:`PacketTooLarge` before its body is read (paramiko then closes
      the transport);
    * ``read_all`` joins what it reads once, instead of ``+=`` per piece
      (quadratic in the packet's size when a peer sends it in small pieces);
    * the identification line is bounded in length and in lines before it, and
      must arrive within the timeout paramiko gives for it, counted once per
      line (paramiko restarts the timeout with every piece, so a peer sending
      one byte at a time is never dropped).
    """

    _ident_lines_seen = 0

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        d = self.__dict__
        if not check_rekey:
            # paramiko asks here for a packet's body (check_rekey=False) right
            # after reading its first block: n is then the declared length plus
            # the MAC or tag, minus what that first block held.
            declared = n + d[_PK + "block_size_in"] - 4 - (0 if d[_PK + "etm_in"] else d[_PK + "mac_size_in"])
            if declared > PACKET_MAX_SIZE:
                raise PacketTooLarge(f"the peer declared a packet of {declared} bytes "
                                     f"(more than {PACKET_MAX_SIZE})")
        parts: list[bytes] = []
        remainder = d[_PK + "remainder"]
        if remainder:  # what reading the identification line read beyond it
            head = remainder[:n]
            d[_PK + "remainder"] = remainder[n:]
            parts.append(head)
            n -= len(head)
        sock = d[_PK + "socket"]
        while n > 0:
            got_timeout = False
            if self.handshake_timed_out():
                raise EOFError()
            try:
                x = sock.recv(n)
                if not x:
                    raise EOFError()
                parts.append(x)
                n -= len(x)
            except TimeoutError:
                got_timeout = True
            except OSError as e:
                if e.errno == errno.EAGAIN:  # as paramiko: some kernels say EAGAIN for a timeout
                    got_timeout = True
                elif d[_PK + "closed"]:
                    raise EOFError() from e
                else:
                    raise
            if got_timeout:
                if d[_PK + "closed"]:
                    raise EOFError()
                if check_rekey and not parts and d[_PK + "need_rekey"]:
                    raise NeedRekeyException()
                self._check_keepalive()  # type: ignore[attr-defined]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readline(self, timeout: float) -> str:
        d = self.__dict__
        if self._ident_lines_seen > IDENT_MAX_LINES_BEFORE:
            raise BadIdentification(f"more than {IDENT_MAX_LINES_BEFORE} lines before the identification")
        self._ident_lines_seen += 1
        buf = bytearray(d[_PK + "remainder"])
        deadline = time.monotonic() + timeout
        scanned = 0
        while (end := buf.find(b"\n", scanned)) < 0:
            if len(buf) > IDENT_MAX_LEN + 1:  # + 1: the CR before the LF
                raise BadIdentification(f"identification line longer than {IDENT_MAX_LEN} bytes")
            scanned = len(buf)
            buf += self._ident_piece(deadline)
        if end > IDENT_MAX_LEN + 1:
            raise BadIdentification(f"identification line longer than {IDENT_MAX_LEN} bytes")
        d[_PK + "remainder"] = bytes(buf[end + 1:])
        line = bytes(buf[:end])
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b"SSH-"):
            self._ident_lines_seen = 0
        return line.decode("utf-8")

    def _ident_piece(self, deadline: float) -> bytes:
        """Some bytes of the identification, or ``socket.timeout`` once ``deadline`` passes."""
        d = self.__dict__
        sock = d[_PK + "socket"]
        while True:
            try:
                x = sock.recv(IDENT_RECV_SIZE)
                if not x:
                    raise EOFError()
                return bytes(x)
            except TimeoutError:
                pass
            if d[_PK + "closed"]:
                raise EOFError()
            if time.monotonic() >= deadline:
                raise TimeoutError()


def bound_packetizer(transport: Any, cls: type[BoundedPacketizer] = BoundedPacketizer) -> bool:
    """Make ``transport``'s packetizer a ``cls`` (a :class:`BoundedPacketizer`), before the transport starts.

    Returns:
        True if done; False where the probe said no or the packetizer is not
        paramiko's own (someone else's subclass is left alone).
    """
    pk = getattr(transport, "packetizer", None)
    if type(pk) is not Packetizer or not may(transport, BOUNDED_PACKETIZER):
        return False
    pk.__class__ = cls
    return True


# -- channel messages on inner transports ------------------------------------------------


def override_channel_handlers(transport: Any, handlers: dict[int, Callable[[Any, Any], None]],
                              trick: Trick = CHANNEL_GUARD) -> bool:
    """Handle these channel message types on ``transport`` only (an instance copy of paramiko's table).

    paramiko dispatches channel messages as ``self._channel_handler_table[ptype](chan, m)``
    (2.12 .. 5.x), so a copy on the instance changes this transport alone.

    Returns:
        True if installed; False where the probe said no to ``trick``.
    """
    if not may(transport, trick):
        return False
    table = dict(transport._channel_handler_table)
    if not all(ptype in table for ptype in handlers):
        return False
    table.update(handlers)
    transport._channel_handler_table = table
    return True


def paramiko_channel_handler(ptype: int) -> Callable[[Any, Any], None] | None:
    """paramiko's own handler for channel message ``ptype`` (from the class's table)."""
    table = getattr(paramiko.Transport, "_channel_handler_table", None)
    return table.get(ptype) if isinstance(table, dict) else None


def channel_in_buffer(chan: Any) -> Any:
    """The pipe a channel's incoming data goes to (``Channel.in_buffer``)."""
    return getattr(chan, "in_buffer", None)


def swap_in_buffer(chan: Any, new: Any) -> bool:
    """Give ``chan`` the pipe ``new`` for its incoming data, keeping buffered data, EOF and the select event.

    Only from the thread of the channel's transport (the one thread that feeds
    the pipe).  Leaves a pipe that is not paramiko's own ``BufferedPipe`` alone.

    Returns:
        True if swapped.
    """
    transport = chan.get_transport()
    old: Any = getattr(chan, "in_buffer", None)
    if transport is None or type(old) is not BufferedPipe or not may(transport, CHUNK_PIPE):
        return False
    state: Any = old  # its private fields: the EOF flag and the select() event
    pending = state.empty()
    if pending:
        new.feed(pending)
    if state._closed:
        new.close()
    if state._event is not None:
        new.set_event(state._event)
    chan.in_buffer = new
    return True


# -- ciphers ---------------------------------------------------------------------------


def supported_ciphers(transport: Any = None) -> tuple[str, ...]:
    """The ciphers this paramiko implements (``Transport._cipher_info``), or ``transport`` can use.

    A transport given :func:`backport_gcm` can use AES-GCM on every release.
    """
    return tuple(getattr(transport if transport is not None else paramiko.Transport, "_cipher_info", {}) or ())


# -- AES-GCM for paramiko without it (2.12: Debian 12, Ubuntu 24.04) --------------------------

_AES_BLOCK = 16
_GCM_TAG = 16
_GCM_NONCE = 12  # RFC 5647 7.1: a 4-byte fixed field and a 64-bit invocation counter
_GCM_ATTR = "x2go_sftp_gcm_backport"  # ours: marks a transport given backport_gcm
GCM_BACKPORT_ENV = "X2GO_SFTP_GCM_BACKPORT"
# OpenSSH's names (RFC 5647 as OpenSSH frames it), with the fields paramiko >= 3.3 gives them.
_GCM_INFO: dict[str, dict[str, Any]] = {
    name: {"class": AESGCM, "mode": None, "block-size": _AES_BLOCK, "key-size": size,
           "iv-size": _GCM_NONCE, "is_aead": True}
    for name, size in (("aes128-gcm@openssh.com", 16), ("aes256-gcm@openssh.com", 32))
}


class GcmKeys:
    """What a transport given :func:`backport_gcm` hands its packetizer for one direction, instead of a cipher context."""

    __slots__ = ("aead", "iv")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self.aead = aesgcm.engine(key)  # cryptography's AESGCM, or one OpenSSL context kept (cryptography < 43)
        self.iv = bytes(iv[:_GCM_NONCE])  # paramiko derived a block's worth; the nonce is its first 12 bytes


def _gcm_get_cipher(original: Callable[..., Any], name: str, key: bytes, iv: bytes, operation: Any) -> Any:
    """``Transport._get_cipher`` of a transport given :func:`backport_gcm`."""
    if name in _GCM_INFO:
        return GcmKeys(key, iv)
    return original(name, key, iv, operation)


def backport_gcm(transport: Any) -> bool:
    """Let ``transport`` use AES-GCM (RFC 5647) where paramiko has none of its own (before 3.3).

    paramiko builds each direction's cipher in ``Transport._get_cipher`` and
    hands it to the packetizer in ``_activate_inbound``/``_activate_outbound``.
    Here the transport's own ``_get_cipher`` returns :class:`GcmKeys` for an
    AES-GCM name, and its packetizer (made a :class:`GcmPacketizer` if it is
    paramiko's own; a :class:`BoundedPacketizer` is one) frames packets as
    OpenSSH and paramiko >= 3.3 do.  Key exchange, key derivation, rekeying and
    everything else stay paramiko's.  The ciphers become known to this
    transport only (its own ``_cipher_info``); what it offers is still the
    caller's choice (``get_security_options().ciphers``).  Safe on a running
    transport: nothing changes until the next key exchange agrees on AES-GCM.

    Only where the probe allows :data:`GCM_BACKPORT`.
    ``X2GO_SFTP_GCM_BACKPORT=0`` (or ``no``/``off``/``false``) opts out.

    Returns:
        True if the transport can negotiate ``aes128-gcm@openssh.com`` and
        ``aes256-gcm@openssh.com`` through the backport.
    """
    if gcm_backported(transport):
        return True
    if defaults.opted_out(GCM_BACKPORT_ENV) or not may(transport, GCM_BACKPORT):
        return False
    pk = packetizer_of(transport)
    if type(pk) is Packetizer:
        pk.__class__ = GcmPacketizer
    elif not isinstance(pk, GcmPacketizer):
        return False  # someone else's packetizer: left alone
    transport._get_cipher = functools.partial(_gcm_get_cipher, transport._get_cipher)
    transport._cipher_info = {**transport._cipher_info, **_GCM_INFO}
    transport.__dict__[_GCM_ATTR] = True
    return True


def gcm_backported(transport: Any) -> bool:
    """True if :func:`backport_gcm` gave ``transport`` AES-GCM."""
    return bool(getattr(transport, "__dict__", {}).get(_GCM_ATTR))


def may_lean_gcm(transport: Any) -> bool:
    """May the fast path frame AES-GCM on ``transport``?

    Where paramiko has AES-GCM, :data:`FAST_PATH` decides.  With the backport
    the fields it reads are ours, and the rest are those :data:`FAST_PATH_CTR`
    probes for.
    """
    return may(transport, FAST_PATH) or (gcm_backported(transport) and may(transport, FAST_PATH_CTR))


def negotiated_ciphers(transport: Any) -> tuple[str, str]:
    """The ciphers agreed for (sending, receiving) on ``transport``, "" where none yet."""
    return (str(getattr(transport, "local_cipher", "") or ""), str(getattr(transport, "remote_cipher", "") or ""))


# -- the fast path's access to paramiko's cipher state (AES-GCM, AES-CTR + HMAC) -------------------


def packetizer_of(transport: Any) -> Any:
    """``transport.packetizer`` (None if missing)."""
    return getattr(transport, "packetizer", None)


def packetizer_socket(pk: Any) -> Any:
    """What ``pk`` reads from and writes to."""
    return pk.__dict__.get(_PK + "socket")


def negotiated_macs(transport: Any) -> tuple[str, str]:
    """The MACs agreed for (sending, receiving) on ``transport``, "" where none yet."""
    return (str(getattr(transport, "local_mac", "") or ""), str(getattr(transport, "remote_mac", "") or ""))


#: How the fast path frames one direction: AES-GCM (RFC 5647), or AES-CTR with an HMAC
#: over the plaintext packet (RFC 4253 6.4) or over the ciphertext (OpenSSH's "-etm").
LEAN_GCM, LEAN_CTR, LEAN_CTR_ETM = "gcm", "ctr", "ctr-etm"


def lean_ready(transport: Any, pk: Any, out_mode: str, in_mode: str) -> bool:
    """Is ``transport`` between key exchanges, framed as ``out_mode``/``in_mode``, with nothing else in paramiko's way?

    True only when: active, no key exchange running or due, clear to send
    (RFC 4253 7.1), no packet type expected, both directions' engines set as
    their mode needs (AES-GCM: paramiko's AEAD flag; AES-CTR: no AEAD, a MAC
    engine and key, 16-byte blocks, paramiko's encrypt-then-MAC flag as the
    mode says), no compression, nothing left from the identification line,
    no packet dumps, and exactly one channel open.
    """
    d = pk.__dict__
    if not (
        transport.active and not transport.in_kex and transport.clear_to_send.is_set()
        and not transport._expected_packet and not d[_PK + "need_rekey"]
        and d[_PK + "compress_engine_in"] is None and d[_PK + "compress_engine_out"] is None
        and not d[_PK + "remainder"] and not d[_PK + "dump_packets"]
        and len(transport._channels.values()) == 1
    ):
        return False
    for way, mode in (("out", out_mode), ("in", in_mode)):
        if d.get(_PK + "block_engine_" + way) is None:
            return False
        aead = bool(d.get(_PK + "aead_" + way, False))  # paramiko < 3.3 has no such field
        if mode == LEAN_GCM:
            if not aead:
                return False
        elif mode in (LEAN_CTR, LEAN_CTR_ETM):
            if (aead or d.get(_PK + "mac_engine_" + way) is None or not d.get(_PK + "mac_key_" + way)
                    or not d.get(_PK + "mac_size_" + way) or d.get(_PK + "block_size_" + way) != 16
                    or bool(d.get(_PK + "etm_" + way)) != (mode == LEAN_CTR_ETM)):
                return False
        else:
            return False
    return True


def _next_iv(iv: bytes) -> bytes:
    """The next AES-GCM nonce: the 64-bit invocation counter after the fixed field (RFC 5647 7.1)."""
    return iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")


def _send_sealed(transport: Any, pk: Any, plain: bytes, seal: Callable[[dict[str, Any], bytes, int], bytes]) -> bool | None:
    """Send one packet that ``seal(fields, plain, sequence number)`` encrypts, as paramiko would send it.

    Sends only while paramiko would send a channel message itself: the
    transport active and clear to send (no key exchange started, RFC 4253
    7.1), under paramiko's own locks in paramiko's order (``clear_to_send_lock``
    then the packetizer's write lock), so key exchange cannot begin mid-packet.
    Counts the packet in paramiko's sequence number and rekey counters.

    Returns:
        None if nothing was sent because sending is not allowed now; else
        whether paramiko's rekey limits for sending are reached.
    """
    d = pk.__dict__
    with transport.clear_to_send_lock:
        if not transport.clear_to_send.is_set() or not transport.active or d[_PK + "closed"]:
            return None
        with d[_PK + "write_lock"]:
            seq = d[_PK + "sequence_number_out"]
            out = seal(d, plain, seq)
            d[_PK + "sequence_number_out"] = (seq + 1) & 0xFFFFFFFF
            pk.write_all(out)
            sent = d[_PK + "sent_bytes"] = d[_PK + "sent_bytes"] + len(out)
            packets = d[_PK + "sent_packets"] = d[_PK + "sent_packets"] + 1
    return bool(sent >= pk.REKEY_BYTES or packets >= pk.REKEY_PACKETS)


def _count_in(pk: Any, nbytes: int) -> bool:
    """One inbound packet of ``nbytes`` on the wire, read and checked: count it as paramiko does.

    Returns whether paramiko's rekey limits for receiving are reached.
    """
    d = pk.__dict__
    d[_PK + "sequence_number_in"] = (d[_PK + "sequence_number_in"] + 1) & 0xFFFFFFFF
    got = d[_PK + "received_bytes"] = d[_PK + "received_bytes"] + nbytes
    packets = d[_PK + "received_packets"] = d[_PK + "received_packets"] + 1
    return bool(got >= pk.REKEY_BYTES or packets >= pk.REKEY_PACKETS)


def _gcm_seal(d: dict[str, Any], plain: bytes, seq: int) -> bytes:
    head = _U32.pack(len(plain))
    iv = d[_PK + "iv_out"]
    out = head + d[_PK + "block_engine_out"].encrypt(iv, plain, head)
    d[_PK + "iv_out"] = _next_iv(iv)
    return bytes(out)


def gcm_send(transport: Any, pk: Any, plain: bytes) -> bool | None:
    """Encrypt and send one AES-GCM packet whose plaintext (padding length, payload, padding) is ``plain``.

    See :func:`_send_sealed` for when it sends and what it returns.
    """
    return _send_sealed(transport, pk, plain, _gcm_seal)


def gcm_open(pk: Any, head: bytes, body: bytes) -> tuple[bytes, int, bool]:
    """Decrypt one AES-GCM packet (``body`` includes the tag) with paramiko's inbound state.

    Returns:
        the plaintext, its sequence number, and whether paramiko's rekey
        limits for receiving are reached.

    Raises:
        cryptography's ``InvalidTag`` for a packet that does not authenticate.
    """
    d = pk.__dict__
    iv = d[_PK + "iv_in"]
    plain = d[_PK + "block_engine_in"].decrypt(iv, body, head)
    d[_PK + "iv_in"] = _next_iv(iv)
    seq = d[_PK + "sequence_number_in"]
    return plain, seq, _count_in(pk, len(body) + 4)


def _ctr_seal(d: dict[str, Any], plain: bytes, seq: int) -> bytes:
    head = _U32.pack(len(plain))
    engine = d[_PK + "block_engine_out"]
    mac = hmac.new(d[_PK + "mac_key_out"], _U32.pack(seq), d[_PK + "mac_engine_out"])
    if d[_PK + "etm_out"]:
        body = engine.update(plain)
        mac.update(head)
        mac.update(body)
    else:
        mac.update(head)
        mac.update(plain)
        head = engine.update(head)
        body = engine.update(plain)
    return b"".join((head, body, mac.digest()[:d[_PK + "mac_size_out"]]))


def ctr_send(transport: Any, pk: Any, plain: bytes) -> bool | None:
    """Encrypt, MAC and send one AES-CTR packet whose plaintext (padding length, payload, padding) is ``plain``.

    With paramiko's outbound cipher context (a stream: its counter runs on),
    MAC key and sequence number; the MAC covers the plaintext packet, or with
    OpenSSH's encrypt-then-MAC the clear length and the ciphertext.  See
    :func:`_send_sealed` for when it sends and what it returns.
    """
    return _send_sealed(transport, pk, plain, _ctr_seal)


def ctr_inbound(pk: Any) -> tuple[Any, Any, bytes, int, int]:
    """paramiko's inbound AES-CTR state: (decrypting context, MAC digest, MAC key, MAC size, sequence number)."""
    d = pk.__dict__
    return (d[_PK + "block_engine_in"], d[_PK + "mac_engine_in"], d[_PK + "mac_key_in"],
            d[_PK + "mac_size_in"], d[_PK + "sequence_number_in"])


def ctr_received(pk: Any, nbytes: int) -> bool:
    """One AES-CTR packet of ``nbytes`` on the wire was read and checked: count it as paramiko does.

    Returns whether paramiko's rekey limits for receiving are reached.
    """
    return _count_in(pk, nbytes)


def trigger_rekey(pk: Any) -> None:
    """Ask paramiko to rekey (what its packetizer does when its own limits are reached)."""
    pk._trigger_rekey()


def check_add_window(chan: Any, n: int) -> int:
    """Count ``n`` bytes consumed on ``chan``; the window adjust to send now (0: none), as ``Channel.recv`` does."""
    return int(chan._check_add_window(n))


def window_opened(chan: Any, nbytes: int) -> None:
    """The peer opened ``chan``'s send window by ``nbytes``: wake whoever waits to send."""
    with chan.lock:
        chan.out_window_size += nbytes
        chan.out_buffer_cv.notify_all()


def send_user_message(transport: Any, m: paramiko.Message) -> None:
    """Send ``m`` as paramiko sends channel messages: waiting out a key exchange."""
    transport._send_user_message(m)


# -- channel data never after the channel's close (every forwarded channel) -------------
#
# paramiko's ``Channel.send`` checks ``closed`` under the channel's lock, then
# releases it and queues the packet for the transport (``_send_user_message``).
# A close from another thread in that gap (ours: a session ending, ``pause()``,
# the login gate; or paramiko's thread answering the peer's CLOSE) sends its
# CHANNEL_CLOSE first, and the DATA goes out after it.  Once OpenSSH's sshd has
# exchanged both CLOSEs it frees the channel, and DATA for a freed channel is a
# protocol error: sshd disconnects ("data packet referred to nonexistent
# channel") and python-x2go's whole connection, every X2Go channel with it, is
# gone.  Seen once in CI, at the end of a pre-auth flood test.
#
# paramiko sets ``closed`` before it sends CHANNEL_CLOSE, and sends every
# message under the transport's ``clear_to_send_lock``.  :func:`channel_sender`
# makes the same check again under that lock, so what it sends precedes the
# CLOSE, or is not sent.  It never holds the channel's lock while it waits for
# the transport's (paramiko's own order), so it cannot deadlock a rekey.
# Checked on: 2.12, 3.5, 5.1 (``Channel.send``/``_send`` and
# ``Transport._send_user_message`` are the same code in all three).


def channel_sender(chan: Any) -> Callable[[bytes], int]:
    """``chan.send``, made safe against a concurrent close where this paramiko was checked.

    Same contract as ``Channel.send``: waits for send window, returns the
    bytes taken (0 if the channel got its EOF meanwhile), raises ``OSError``
    on a closed channel, waits out a key exchange.
    """
    get_transport = getattr(chan, "get_transport", None)  # anything else with a send (tests: a socket)
    transport = get_transport() if get_transport is not None else None
    if transport is None or not may(transport, CHANNEL_SEND):
        send: Callable[[bytes], int] = chan.send
        return send

    def ordered_send(data: bytes) -> int:
        size = len(data)
        with chan.lock:
            if chan.closed:
                raise OSError("Socket is closed")
            size = chan._wait_for_send_window(size)
            if size == 0:
                return 0
        m = paramiko.Message()
        m.add_byte(cMSG_CHANNEL_DATA)
        m.add_int(chan.remote_chanid)
        m.add_string(data[:size])
        _send_unless_closed(transport, chan, m)
        return int(size)

    return ordered_send


def _send_unless_closed(transport: Any, chan: Any, m: paramiko.Message) -> None:
    """``Transport._send_user_message(m)``, but raising OSError instead if ``chan`` was closed meanwhile."""
    start = time.time()
    while True:
        transport.clear_to_send.wait(0.1)
        if not transport.active:
            return  # as paramiko: the connection is gone, nothing to send it on
        transport.clear_to_send_lock.acquire()
        if transport.clear_to_send.is_set():
            break
        transport.clear_to_send_lock.release()
        if time.time() > start + transport.clear_to_send_timeout:
            raise paramiko.SSHException("Key-exchange timed out waiting for key negotiation")
    try:
        if chan.closed:
            raise OSError("Socket is closed")  # its CLOSE may be on the wire: DATA may not follow
        transport._send_message(m)
    finally:
        transport.clear_to_send_lock.release()


# -- a channel's CLOSE arriving during a key exchange (python-x2go's connection) ----------
#
# paramiko issue 822.  ``Channel._handle_close`` runs in the transport's own
# thread and answers with ``_send_user_message``, which waits while a key
# exchange is under way: for the one thread that could finish it.  The
# transport then hangs until ``clear_to_send_timeout`` (30 s) and dies with
# "Key-exchange timed out", python-x2go's whole connection with it.  A key
# exchange starts on python-x2go's connection every 512 MiB paramiko moves
# (``REKEY_BYTES``; our shares move that much) or at ``outer_gcm``, and
# python-x2go's short commands close channels all the time.
#
# :func:`answer_close_after_kex` gives that one transport its own CLOSE
# handler: outside a key exchange it is paramiko's; during one, it closes and
# unlinks the channel as paramiko does and leaves the answer to a helper thread
# that sends it as soon as the exchange is over (RFC 4253 7.1 forbids it
# earlier anyway).  Checked on 2.12, 3.5, 5.1 (the same ``_handle_close``).

_KEX_CLOSE_ATTR = "x2go_sftp_kex_close"  # ours: marks a transport that has the handler


def answer_close_after_kex(transport: Any) -> bool:
    """Install the CLOSE handler above on ``transport`` (once); False where the probe says no."""
    if getattr(transport, _KEX_CLOSE_ATTR, False):
        return True
    paramiko_close = paramiko_channel_handler(MSG_CHANNEL_CLOSE)
    if paramiko_close is None:
        return False

    def handle_close(chan: Any, m: Any) -> None:
        if transport.clear_to_send.is_set():
            paramiko_close(chan, m)
            return
        with chan.lock:
            msgs = [msg for msg in chan._close_internal() if msg is not None]
            transport._unlink_channel(chan.chanid)
        if not msgs:
            return

        def answer() -> None:
            with contextlib.suppress(Exception):  # the connection ended meanwhile: nothing to answer
                for msg in msgs:
                    transport._send_user_message(msg)

        try:
            threading.Thread(target=answer, daemon=True, name="x2go-sftp-close-after-kex").start()
        except RuntimeError:  # no thread to spare: paramiko's own way, waiting in this thread
            answer()

    if not override_channel_handlers(transport, {MSG_CHANNEL_CLOSE: handle_close}, KEX_CLOSE):
        return False
    with contextlib.suppress(Exception):
        setattr(transport, _KEX_CLOSE_ATTR, True)
    return True


# -- paramiko's SFTP server internals the engine uses (checked on 2.12, 3.5, 5.1) ----------
#
# Each falls back to plain behaviour where the name is missing.


#: The private writer behind ``PKey.write_private_key``, which python-x2go patches with
#: the paramiko 2.x signature (``integrate`` replaces that patch on paramiko >= 4).
#: Checked on 2.12, 3.5 and 5.1.
PKEY_PRIVATE_WRITER = "_write_private_key"


def pkey_private_writer() -> Any:
    """``paramiko.PKey``'s private key writer as it is now (python-x2go's patch, if applied)."""
    return getattr(paramiko.PKey, PKEY_PRIVATE_WRITER, None)


def attr_flags(attr: Any) -> int:
    """The ATTRS flags of an ``SFTPAttributes`` (paramiko keeps them in ``_flags``)."""
    flags = getattr(attr, "_flags", None)
    if isinstance(flags, int):
        return flags
    # Missing: what paramiko's _pack would send for the fields that are set.
    cls = paramiko.SFTPAttributes
    out = 0
    if getattr(attr, "st_size", None) is not None:
        out |= cls.FLAG_SIZE
    if getattr(attr, "st_uid", None) is not None and getattr(attr, "st_gid", None) is not None:
        out |= cls.FLAG_UIDGID
    if getattr(attr, "st_mode", None) is not None:
        out |= cls.FLAG_PERMISSIONS
    if getattr(attr, "st_atime", None) is not None and getattr(attr, "st_mtime", None) is not None:
        out |= cls.FLAG_AMTIME
    if getattr(attr, "attr", None):
        out |= cls.FLAG_EXTENDED
    return out


def set_attr_flags(attr: Any, flags: int) -> None:
    """Record the ATTRS flags a client sent on an ``SFTPAttributes``."""
    attr._flags = flags


def set_handle_name(handle: Any, name: bytes) -> None:
    """Name an ``SFTPHandle`` as paramiko's server does (``_set_name``); harmless where missing."""
    setter = getattr(handle, "_set_name", None)
    if setter is not None:
        setter(name)


def set_folder_listing(handle: Any, listing: list[Any]) -> None:
    """Give a folder handle the whole listing of a plain ``SFTPServerInterface.list_folder``."""
    setter = getattr(handle, "_set_files", None)
    if setter is not None:
        setter(listing)
    else:
        handle.x2go_sftp_listing = list(listing)


def next_folder_batch(handle: Any) -> Any:
    """The next names of a folder handle set up by :func:`set_folder_listing` (empty list at the end)."""
    getter = getattr(handle, "_get_next_files", None)
    if getter is not None:
        return getter()
    listing = getattr(handle, "x2go_sftp_listing", [])
    batch, handle.x2go_sftp_listing = listing[:16], listing[16:]
    return batch


def sftp_write_all(server: Any, out: bytes) -> None:
    """Write ``out`` to an SFTP server's channel as paramiko's ``BaseSFTP._write_all`` does."""
    write_all = getattr(BaseSFTP, "_write_all", None)
    if write_all is not None:
        write_all(server, out)
    else:
        server.sock.sendall(out)


# -- python-x2go's forwarded channels (rforward) ------------------------------------------


def queue_incoming_channel(transport: Any, chan: Any) -> bool:
    """Put ``chan`` on ``transport``'s accept queue, as paramiko does for channels it accepts.

    Returns:
        False (and the channel closed) where this paramiko has no such queue.
    """
    queue = getattr(transport, "_queue_incoming_channel", None)
    if queue is None:
        chan.close()
        return False
    queue(chan)
    return True


# -- the ext-info marker (InnerTransport) ---------------------------------------------------


class ExtInfoMarkerLast:
    """Mixin for a server ``Transport``: treat the client's ``ext-info-c`` as paramiko >= 3.3 does.

    paramiko < 3.3 only recognises "ext-info-c" as the *last* kex name;
    OpenSSH >= 9.2 sends "kex-strict-c-v00@openssh.com" after it (Debian 12).
    Without ext-info we never send server-sig-algs and OpenSSH >= 8.8 refuses
    to sign with RSA: "no mutual signature supported".  Moving the marker to
    the end is harmless on releases that scan the whole list.  Overrides
    ``Transport._really_parse_kex_init`` (2.12 .. 5.x); off where the probe says no.
    """

    def _really_parse_kex_init(self, m: Any, ignore_first_byte: bool = False) -> dict[str, Any]:
        parsed: dict[str, Any] = super()._really_parse_kex_init(m, ignore_first_byte)  # type: ignore[misc]
        if not may(self, KEX_EXT_INFO):
            return parsed
        kex = list(parsed.get("kex_algo_list", ()))
        info = [k for k in kex if k.startswith("ext-info-")]
        if info and kex[-1] != info[0]:
            kex.remove(info[0])
            kex.append(info[0])
            parsed["kex_algo_list"] = kex
        return parsed




def open_channel_count(transport: Any) -> int:
    """Channels currently open on ``transport`` (paramiko's ``_channels`` map; 2.12 .. 5.x).

    Returns 0 when the map is missing (an unknown release): callers treat that
    as "no channels", so a limit based on it never refuses wrongly.
    """
    channels = getattr(transport, "_channels", None)
    try:
        return len(channels.values()) if channels is not None else 0
    except Exception:
        return 0


__all__ = ["open_channel_count", "paramiko"]


def cancel_handshake_timer(transport: Any) -> None:
    """End the timer thread paramiko starts for a transport's first packet (2.12 .. 5.x).

    paramiko's ``Packetizer.start_handshake`` starts a ``threading.Timer`` once
    the peer's banner is in, and cancels it only when a packet has been
    handled: a peer that sends a banner and disconnects leaves a thread behind
    for the whole ``handshake_timeout``.  Call after the transport's thread has
    ended; does nothing where the packetizer lacks the method.
    """
    complete = getattr(getattr(transport, "packetizer", None), "complete_handshake", None)
    if complete is not None:
        with contextlib.suppress(Exception):
            complete()


# -- paramiko 2.x: asbytes() formats the repr of every packet it sends ----------------
#
# paramiko 2.x's ``common.asbytes(s)`` first tries ``py3compat.b(s)``, which, for
# anything that is neither bytes nor str, raises
# ``TypeError("Expected unicode or bytes, got {!r}".format(s))`` and only then
# falls back to ``s.asbytes()``.  ``Packetizer.send_message`` hands every
# outgoing packet to it as a ``Message``, so each packet formats the repr of its
# whole payload (32 KiB for a data packet) and throws it away: 66 % of the
# process's CPU while sshfs reads under paramiko 2.12.  paramiko 3.0 made b()
# name only the type; 3.x and later need nothing.
#
# :func:`fix_asbytes` probes the behaviour (not the version string): it calls the
# function paramiko binds as ``asbytes`` with a probe ``Message`` and applies the
# fix only if that formats the probe's repr and otherwise behaves exactly as
# 2.x's does.  It then binds :func:`asbytes_without_repr` wherever paramiko's
# modules bound the original by name (2.12: common, packet, message, sftp,
# agent): process-wide, so python-x2go's own connection gets faster as well.
# The result is the same object for every input; only the discarded repr is
# gone.  Opt out with the environment variable ``X2GO_SFTP_ASBYTES_FIX=0``
# (read at each call, so set it before the first tunnel); undo with
# :func:`restore_asbytes`.  Checked on: 2.12 (applied), 3.5 and 5.1 (nothing to do).

import sys  # noqa: E402  (this section's own import, kept beside it)

# (Callable and log: imported at the top)

ASBYTES_FIX_ENV = "X2GO_SFTP_ASBYTES_FIX"
"""Environment variable: ``0``, ``no``, ``off`` or ``false`` keeps paramiko's own ``asbytes``."""



class _Rebinding:
    """One paramiko function rebound, process-wide, to one with the same results: idempotent, undoable.

    ``attr`` is the name paramiko's modules bind it under; ``env`` the
    environment variable whose ``0``/``no``/``off``/``false`` keeps paramiko's.
    """

    def __init__(self, attr: str, env: str) -> None:
        self.attr, self.env = attr, env
        self._lock = threading.Lock()
        # paramiko's own function and the one bound in its place, while applied.
        self.original: Callable[..., Any] | None = None
        self.replacement: Callable[..., Any] | None = None

    @property
    def applied(self) -> bool:
        return self.original is not None

    def apply(self, find: Callable[[], Callable[..., Any] | None], fits: Callable[[Callable[..., Any]], bool],
              make: Callable[[Callable[..., Any]], Callable[..., Any]], logger: log.LoggerLike | None,
              what: str) -> bool:
        """Bind ``make(original)`` where paramiko bound ``find()``'s function, if ``fits`` it; True if in effect."""
        if defaults.opted_out(self.env):
            return self.applied
        with self._lock:
            if self.original is not None:
                return True
            original = find()
            if original is None or not fits(original):
                return False
            replacement = make(original)
            bound = _rebind(self.attr, original, replacement)
            self.original, self.replacement = original, replacement
        log.tagged(logger, _LOG_TAG)(
            f"paramiko {getattr(paramiko, '__version__', '?')}: {what} in {', '.join(bound)} "
            f"(opt out: {self.env}=0)",
            loglevel=log.loglevel_INFO,
        )
        return True

    def restore(self) -> bool:
        """paramiko's own function again in every module bound to the replacement (those imported since too)."""
        with self._lock:
            if self.original is None:
                return False
            _rebind(self.attr, self.replacement, self.original)
            self.original = self.replacement = None
        return True


_ASBYTES = _Rebinding("asbytes", ASBYTES_FIX_ENV)


def asbytes_without_repr(s: Any) -> Any:
    """paramiko 2.x's ``common.asbytes`` without the discarded repr: the same result for every input.

    2.x's ``b()`` returns bytes as they are and encodes str as UTF-8; for
    anything else it raises TypeError (after formatting the repr), and
    ``asbytes`` returns ``s.asbytes()``, or ``s`` itself when that raises
    AttributeError.  The one difference: an object whose ``__repr__`` raises
    no longer propagates that error.
    """
    if isinstance(s, bytes):
        return s
    if isinstance(s, str):
        return s.encode("utf8")
    try:
        return s.asbytes()
    except AttributeError:
        return s


class _ReprProbe(paramiko.Message):
    """A Message that counts how often its repr is formatted."""

    def __init__(self) -> None:
        super().__init__()
        self.add_string(b"probe")
        self.reprs = 0

    def __repr__(self) -> str:
        self.reprs += 1
        return "_ReprProbe()"


class _WithAsbytes:
    def asbytes(self) -> bytes:
        return b"with-asbytes"


def paramiko_asbytes() -> Callable[[Any], Any] | None:
    """paramiko's own ``asbytes``: from ``common`` (2.x) or ``util`` (3.x and later), even while fixed."""
    if _ASBYTES.original is not None:
        return _ASBYTES.original
    for module in (getattr(paramiko, "common", None), getattr(paramiko, "util", None)):
        func = getattr(module, "asbytes", None)
        if callable(func):
            found: Callable[[Any], Any] = func
            return found
    return None


def asbytes_formats_repr(func: Callable[[Any], Any]) -> bool:
    """Probe: does ``func(message)`` format the message's repr?"""
    probe = _ReprProbe()
    try:
        func(probe)
    except Exception:
        return False
    return probe.reprs > 0


def _behaves_as_2x(func: Callable[[Any], Any]) -> bool:
    """Probe: ``func`` returns what :func:`asbytes_without_repr` returns for each kind of input."""
    message, other, text = _ReprProbe(), object(), "pr\u00f6be"
    try:
        return (
            func(b"probe") == b"probe"
            and func(text) == text.encode("utf8")
            and func(message) == message.asbytes()
            and func(_WithAsbytes()) == b"with-asbytes"
            and func(other) is other
        )
    except Exception:
        return False


def _paramiko_modules() -> list[Any]:
    return [
        m
        for name, m in list(sys.modules.items())
        if m is not None and (name == "paramiko" or name.startswith("paramiko."))
    ]


def _rebind(attr: str, old: Any, new: Any) -> list[str]:
    """Bind ``new`` as ``attr`` in every loaded paramiko module that binds ``old`` there; their names."""
    bound = []
    for module in _paramiko_modules():
        if getattr(module, attr, None) is old:
            setattr(module, attr, new)
            bound.append(module.__name__)
    return sorted(bound)


def asbytes_fix_applied() -> bool:
    """True while :func:`fix_asbytes` is in effect."""
    return _ASBYTES.applied


def fix_asbytes(logger: log.LoggerLike | None = None) -> bool:
    """Stop paramiko 2.x formatting the repr of every packet it sends (process-wide, idempotent).

    Does nothing where paramiko's ``asbytes`` formats no repr (3.0 and later),
    where it does not behave exactly as 2.x's (an unknown release, or someone
    else's wrapper), or when ``X2GO_SFTP_ASBYTES_FIX`` is ``0``/``no``/``off``/``false``.

    Args:
        logger: where the one INFO line goes when the fix is applied.

    Returns:
        True if the fix is in effect after the call.
    """
    return _ASBYTES.apply(
        paramiko_asbytes, lambda f: asbytes_formats_repr(f) and _behaves_as_2x(f), lambda f: asbytes_without_repr,
        logger, "asbytes() formatted the repr of every packet sent; now bound without it")


def restore_asbytes() -> bool:
    """Undo :func:`fix_asbytes`: paramiko's own ``asbytes`` again, in every module bound to the fix.

    A tunnel made later applies the fix again unless ``X2GO_SFTP_ASBYTES_FIX=0``.

    Returns:
        True if something was undone.
    """
    return _ASBYTES.restore()


# -- every paramiko: the MAC of each packet received, compared in a Python loop ---------
#
# ``Packetizer.read_message`` checks the MAC of every packet it receives with
# ``util.constant_time_bytes_eq``: a Python loop that calls ``byte_ord`` twice per
# byte, 64 calls for an HMAC-SHA256, about 4 us per packet (2.12, 3.5 and 5.1 have
# the same code).  While sshfs writes through python-x2go's connection (AES-CTR
# with HMAC-SHA2: paramiko's first choice against OpenSSH), that was 5.8 % of the
# process's CPU on Debian 12's stack (py-spy, notebook round 10).  The standard
# library has the same comparison in C, constant-time as well:
# ``hmac.compare_digest``, about 0.05 us.
#
# :func:`fix_mac_compare` binds a :func:`mac_compare` wherever paramiko's modules
# bound paramiko's function by name (``util``, where ``packet`` looks it up at
# each packet, and ``hostkeys``): two bytes objects go to ``compare_digest``,
# anything else to paramiko's own function, so the answer is the same for every
# input.  It is applied only after a probe finds that paramiko's function answers
# as equality on bytes (an unknown or someone else's function is left alone).
# Process-wide, like the ``asbytes`` fix: python-x2go's connection is where most
# packets are received.  Opt out with ``X2GO_SFTP_MAC_COMPARE_FIX=0`` (read at
# each call); undo with :func:`restore_mac_compare`.  Checked on: 2.12, 3.5, 5.1.

MAC_COMPARE_FIX_ENV = "X2GO_SFTP_MAC_COMPARE_FIX"
"""Environment variable: ``0``, ``no``, ``off`` or ``false`` keeps paramiko's own MAC comparison."""

_MAC = _Rebinding("constant_time_bytes_eq", MAC_COMPARE_FIX_ENV)


def paramiko_mac_compare() -> Callable[[Any, Any], bool] | None:
    """paramiko's own ``util.constant_time_bytes_eq``, even while fixed."""
    if _MAC.original is not None:
        return _MAC.original
    func = getattr(getattr(paramiko, "util", None), _MAC.attr, None)
    return func if callable(func) else None


def mac_compare(original: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """``original``'s answers, in C for two bytes objects (``hmac.compare_digest``, constant-time too)."""
    compare_digest = hmac.compare_digest

    def constant_time_bytes_eq(a: Any, b: Any) -> bool:
        if type(a) is bytes and type(b) is bytes:
            return compare_digest(a, b)
        return original(a, b)

    return constant_time_bytes_eq


def _compares_as_equality(func: Callable[[Any, Any], bool]) -> bool:
    """Probe: ``func(a, b)`` is ``a == b`` for bytes (equal, one bit or one byte apart, empty)."""
    mac = bytes(range(32))
    pairs = [(mac, bytes(mac)), (mac, mac[:-1] + b"\x1e"), (mac, mac[:-1]), (b"", b""), (mac[:16], mac[16:])]
    try:
        return all(func(a, b) is (a == b) for a, b in pairs)
    except Exception:
        return False


def mac_compare_fix_applied() -> bool:
    """True while :func:`fix_mac_compare` is in effect."""
    return _MAC.applied


def fix_mac_compare(logger: log.LoggerLike | None = None) -> bool:
    """Compare the MAC of every packet paramiko receives in C, not in a Python loop (process-wide, idempotent).

    Does nothing when paramiko's function does not answer as equality on
    bytes (an unknown release, or someone else's wrapper), or when
    ``X2GO_SFTP_MAC_COMPARE_FIX`` is ``0``/``no``/``off``/``false``.

    Args:
        logger: where the one INFO line goes when the fix is applied.

    Returns:
        True if the fix is in effect after the call.
    """
    return _MAC.apply(
        paramiko_mac_compare, lambda f: f is not hmac.compare_digest and _compares_as_equality(f), mac_compare,
        logger, "the MAC of each packet received is compared with hmac.compare_digest, not a Python loop")


def restore_mac_compare() -> bool:
    """Undo :func:`fix_mac_compare` in every module bound to the fix.

    Returns:
        True if something was undone.
    """
    return _MAC.restore()


def fix_speed_defects(logger: log.LoggerLike | None = None) -> dict[str, bool]:
    """Both process-wide fixes of paramiko's own slow spots (same results, less CPU): what is in effect.

    :func:`fix_asbytes` (paramiko 2.x) and :func:`fix_mac_compare` (every
    release), each probed and with its own opt-out.  Called for every tunnel
    and by :func:`x2go_sftp.integrate.install`.
    """
    return {"asbytes": fix_asbytes(logger), "mac_compare": fix_mac_compare(logger)}
