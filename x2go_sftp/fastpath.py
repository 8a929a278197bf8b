"""The inner SSH data path of an SFTP session, without paramiko's per-packet machinery.

paramiko moves each inner packet through its transport thread (decrypt,
``Message``, dispatch, the channel's pipe and locks) and then hands it to the
engine's thread; each reply goes back through the channel, the transport's
send path and the packetizer.  Measured, that machinery, not the cipher,
is most of the CPU an inner packet costs (AES-GCM itself is ~0.4 ms/MB).

Here, once an SFTP session is running, its engine reads and writes the
inner transport's packets itself:

* paramiko still does everything else: key exchange, authentication, the
  channel's opening, requests and closing, rekeying, and any message this
  module does not know.  The fast path covers only ``CHANNEL_DATA`` and
  ``CHANNEL_WINDOW_ADJUST`` of the session's one channel.
* The switch is made at a packet boundary, with paramiko's transport thread
  parked inside :meth:`LeanPacketizer.read_message` (so exactly one reader
  exists at any time); any other message read on the fast path is handed
  back to paramiko already decrypted, and paramiko reads on until it calls
  ``read_message`` again with nothing special going on (no key exchange, no
  rekey due, one channel).
* The cipher state (keys, GCM invocation counters, sequence numbers, the
  rekey counters) is paramiko's own, read and written in place under
  paramiko's write lock, so both paths always agree.
* Only the ciphers OpenSSH's clients negotiate with paramiko are handled,
  by name in each direction: AES-GCM (:data:`FAST_CIPHERS`: paramiko's own
  from 3.3, :func:`paramiko_compat.backport_gcm` before),
  and AES-CTR (:data:`FAST_CTR_CIPHERS`) with HMAC-SHA2, plain or
  encrypt-then-MAC (:data:`FAST_MACS`), which is what paramiko 2.12
  (Debian 12, Ubuntu 24.04) negotiates; with any other cipher or MAC,
  compression or packet dumps, nothing changes.
* It fails safe: every paramiko internal it touches goes through
  :mod:`paramiko_compat`, which turns it off for a transport on an unknown
  release or a missing name; it never sends while paramiko would not (a key
  exchange started: RFC 4253 7.1); and an exception in its hooks inside
  paramiko's thread turns it off for that transport (paramiko reads on as
  usual) instead of ending the connection.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import struct
import threading
from typing import Any

import paramiko
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST, cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.packet import NeedRekeyException

from . import defaults, log, paramiko_compat

# Switch the fast path off (to measure what it buys, or to rule it out).
ENABLED = True

# How often a parked paramiko thread re-checks that its transport still lives.
PARK_RECHECK = 2.0  # close(), give_back() and release() wake it at once; this is a safety net

# Under gevent's patching, wait for the channel without a timeout (see SessionIO.__init__);
# off only to measure what it buys.
RECV_UNTIMED = True

# Largest inner packet accepted on the fast path: OpenSSH's PACKET_MAX_SIZE, as on paramiko's path.
MAX_PACKET = paramiko_compat.PACKET_MAX_SIZE

# The ciphers the fast path speaks, by name, in both directions: the AES-GCM
# of RFC 5647 as OpenSSH names it.  Being an AEAD is not enough: the packet
# layout, nonce and tag handling below are those of these two only.
FAST_CIPHERS = frozenset({"aes128-gcm@openssh.com", "aes256-gcm@openssh.com"})

# AES in counter mode (RFC 4344) with one of these MACs (RFC 6668, and OpenSSH's
# encrypt-then-MAC forms of them): what OpenSSH's ssh (and so sshfs) agrees
# with paramiko releases that lack AES-GCM.  The framing below is that of
# these only: a 16-byte block, the MAC after the packet.
FAST_CTR_CIPHERS = frozenset({"aes128-ctr", "aes192-ctr", "aes256-ctr"})
FAST_MACS = frozenset({"hmac-sha2-256", "hmac-sha2-512",
                       "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"})

_GCM_TAG = 16
_AES_BLOCK = 16
_U32 = struct.Struct(">I")
_DATA_HEAD = struct.Struct(">BBII")  # padding length, message type, recipient, data length
_ADJUST = struct.Struct(">BII")
_log_off = log.tagged(None, "fastpath", loglevel=log.loglevel_DEFAULT | log.loglevel_INFO)


class Handover(Exception):
    """Raised by a channel's pipe to its reader: paramiko is parked, read the transport yourself."""


class LeanPacketizer(paramiko_compat.BoundedPacketizer):
    """paramiko's ``Packetizer`` (bounded) whose reading can be lent to one SFTP session's engine.

    Made by changing the class of the packetizer paramiko built (the fields
    are paramiko's); nothing differs from :class:`paramiko_compat.BoundedPacketizer`
    until a :class:`SessionIO` asks for the data path.
    """

    _lean_cv: threading.Condition | None = None
    _lean_owner: SessionIO | None = None
    _lean_active = False
    _lean_off = False  # set for good once a hook failed in paramiko's thread
    _lean_pushback: tuple[int, paramiko.Message] | None = None
    _lean_rekey = False
    _lean_transport: Any = None

    def lean_init(self, transport: Any) -> None:
        self._lean_cv = threading.Condition(threading.Lock())
        self._lean_transport = transport

    # -- paramiko's thread -------------------------------------------------
    def read_message(self) -> tuple[int, paramiko.Message]:
        cv = self._lean_cv
        if cv is None:
            return super().read_message()
        with cv:
            while True:
                if self._lean_pushback is not None:
                    message, self._lean_pushback = self._lean_pushback, None
                    return message
                if self._lean_rekey:
                    self._lean_rekey = False
                    paramiko_compat.trigger_rekey(self)
                    raise NeedRekeyException()
                owner = self._lean_owner
                if owner is None or self._lean_off:
                    break
                try:
                    if not owner.may_take_over() or not owner.offer():
                        break
                except Exception as e:  # a bug of ours must not end the connection: paramiko reads on
                    self._switch_off(owner, e)
                    break
                self._lean_active = True
                while self._lean_active and not self.closed:
                    cv.wait(PARK_RECHECK)
                if self.closed:
                    self._lean_active = False
                    raise EOFError()
        return super().read_message()

    def _switch_off(self, owner: SessionIO, why: BaseException) -> None:
        """A hook failed in paramiko's thread (lock held): no fast path on this transport from now on."""
        self._lean_off = True
        self._lean_active = False
        with contextlib.suppress(Exception):  # the engine checks parked() before it reads anyway
            owner.withdraw_offer()
        _log_off(f"fast path off for {self._lean_transport!r}: {why!r} in paramiko's thread; "
                 f"paramiko reads on", loglevel=log.loglevel_WARN)

    def close(self) -> None:
        super().close()
        if self._lean_cv is not None:
            with self._lean_cv:
                self._lean_cv.notify_all()

    # -- the engine's thread -----------------------------------------------
    def parked(self) -> bool:
        """True while paramiko's thread is parked and the data path is the engine's."""
        assert self._lean_cv is not None
        with self._lean_cv:
            return self._lean_active and not self._lean_off

    def give_back(self, pushback: tuple[int, paramiko.Message] | None = None, rekey: bool = False) -> None:
        """End a fast-path stretch: paramiko reads again (first ``pushback``, if any)."""
        assert self._lean_cv is not None
        with self._lean_cv:
            self._lean_pushback = pushback
            self._lean_rekey = rekey
            self._lean_active = False
            self._lean_cv.notify_all()

    def claim(self, owner: SessionIO) -> bool:
        """Make ``owner`` the one session that may take the data path (first come, first served)."""
        assert self._lean_cv is not None
        with self._lean_cv:
            if self._lean_owner is None and not self._lean_off:
                self._lean_owner = owner
            return self._lean_owner is owner

    def release(self, owner: SessionIO) -> None:
        """``owner`` is done: if it held the data path, paramiko reads again."""
        assert self._lean_cv is not None
        with self._lean_cv:
            if self._lean_owner is owner:
                self._lean_owner = None
                self._lean_active = False
                self._lean_cv.notify_all()

    def lean_send(self, plain: bytes, mode: str) -> bool | None:
        """Encrypt and send one packet whose plaintext (padding length, payload, padding) is ``plain``.

        ``mode`` is the outbound framing (``paramiko_compat.LEAN_*``).
        Returns None when nothing was sent because paramiko would not send now
        (a key exchange has begun, RFC 4253 7.1, or the transport is closing);
        else True once paramiko's rekey limits for sending are reached.
        """
        if mode == paramiko_compat.LEAN_GCM:
            return paramiko_compat.gcm_send(self._lean_transport, self, plain)
        return paramiko_compat.ctr_send(self._lean_transport, self, plain)

    def lean_decrypt(self, head: bytes, body: bytes) -> tuple[bytes, int, bool]:
        """Decrypt one packet (``body`` includes the tag).

        Returns the plaintext, its sequence number, and whether paramiko's
        rekey limits for receiving are reached.
        """
        return paramiko_compat.gcm_open(self, head, body)


def install(transport: paramiko.Transport) -> bool:
    """Make ``transport``'s packetizer a :class:`LeanPacketizer` (before the transport starts).

    Returns False (nothing changed) when the fast path is switched off, or
    :mod:`paramiko_compat` says no for this paramiko (an unknown release, a
    missing name) for both its AES-GCM and its AES-CTR framing.
    """
    if not ENABLED or not (paramiko_compat.may(transport, paramiko_compat.FAST_PATH)
                           or paramiko_compat.may(transport, paramiko_compat.FAST_PATH_CTR)):
        return False
    if not paramiko_compat.bound_packetizer(transport, LeanPacketizer):
        return False
    pk = paramiko_compat.packetizer_of(transport)
    pk.lean_init(transport)
    return True


def lean_mode(transport: Any, cipher: str, mac: str) -> str:
    """The fast path's framing for one direction that negotiated ``cipher`` and ``mac`` ("" if none).

    By name only, and only where :mod:`paramiko_compat` allows that framing
    on ``transport``'s paramiko.
    """
    if cipher in FAST_CIPHERS:
        return paramiko_compat.LEAN_GCM if paramiko_compat.may_lean_gcm(transport) else ""
    if cipher in FAST_CTR_CIPHERS and mac in FAST_MACS and paramiko_compat.may(transport,
                                                                             paramiko_compat.FAST_PATH_CTR):
        return paramiko_compat.LEAN_CTR_ETM if mac.endswith("-etm@openssh.com") else paramiko_compat.LEAN_CTR
    return ""


class SessionIO:
    """The engine's input and output on one session channel: paramiko's channel, or the fast path.

    ``recv``/``sendall``/``input_ready`` are called only from the engine's
    thread.  Until paramiko parks, and whenever it has been given a message
    back, they use the channel as usual.
    """

    def __init__(self, chan: paramiko.Channel, logger: log.LoggerLike | None = None):
        self.chan = chan
        self.transport = chan.get_transport()
        self.xlog = log.tagged(logger, "fastpath")
        pk = paramiko_compat.packetizer_of(self.transport)
        self.pk: LeanPacketizer | None = None
        self.sock: Any = None
        # install() made it a LeanPacketizer only where paramiko_compat allows the fast path.
        if isinstance(pk, LeanPacketizer) and pk._lean_cv is not None:
            sock = paramiko_compat.packetizer_socket(pk)
            if hasattr(sock, "read_buffered"):
                self.pk, self.sock = pk, sock
        # Under gevent the fast path reads without a timeout (ReadAheadSocket.recv_untimed): a
        # timed wait costs a gevent Timeout per request there.  With threads a timed wait costs
        # nothing more, and the timeout stays as a safety net.
        untimed = getattr(self.sock, "recv_untimed", None)
        self._sock_recv: Any = (untimed if untimed is not None and RECV_UNTIMED and defaults.gevent_patched()
                                else getattr(self.sock, "recv", None))
        self.lean = False
        # The framing of each direction, fixed when paramiko parks (ciphers change only in a key
        # exchange, and any key exchange message hands the transport back first).
        self._out_mode = self._in_mode = ""
        self._pad_extra = 0  # 4 where the length field is encrypted too (AES-CTR without -etm)
        self._pending: list[bytes | memoryview] = []  # data read while waiting for window on the fast path
        self._pending_bytes = 0
        self._rekey_due = False
        self._sending = False  # in a send through paramiko (see _take_offer_or_mark_sending)
        self.stretches = 0  # times the fast path was taken (for tests and logs)
        self.packets_in = 0
        self.packets_out = 0
        self.handed_back = 0
        self.rekeys = 0
        self.kex_waits = 0  # sends handed to paramiko because a key exchange had begun

    # -- set-up and tear-down ----------------------------------------------
    def start(self) -> None:
        """Ask for the data path (granted to the first session of a connection only)."""
        if self.pk is not None and not self.pk.claim(self):
            self.pk = None

    def stop(self) -> None:
        """Give the transport back to paramiko for good (before the session's channel closes)."""
        if self.pk is not None:
            self.pk.release(self)
            self.lean = False

    def may_take_over(self) -> bool:
        """Called by paramiko's thread (packetizer lock held): may the engine read now?

        Only between key exchanges, with a cipher (and MAC) of this module by
        name each way, this session's channel the only one open and live, and
        the engine not inside a send through paramiko.
        """
        t, pk, chan = self.transport, self.pk, self.chan
        if pk is None or t is None or self._sending:
            return False
        if chan.closed or chan.eof_received or not chan.active:
            return False
        (out_cipher, in_cipher), (out_mac, in_mac) = (paramiko_compat.negotiated_ciphers(t),
                                                      paramiko_compat.negotiated_macs(t))
        out_mode, in_mode = lean_mode(t, out_cipher, out_mac), lean_mode(t, in_cipher, in_mac)
        if not out_mode or not in_mode or not paramiko_compat.lean_ready(t, pk, out_mode, in_mode):
            return False
        self._out_mode, self._in_mode = out_mode, in_mode
        self._pad_extra = 4 if out_mode == paramiko_compat.LEAN_CTR else 0
        return True

    def _in_pipe(self) -> Any:
        return paramiko_compat.channel_in_buffer(self.chan)

    def _take_offer_or_mark_sending(self) -> bool:
        """Before a send through paramiko: take a pending offer (True), or keep paramiko from parking.

        paramiko must not park while the engine may block in ``chan.sendall``
        waiting for a window adjust that only paramiko's reading can deliver.
        """
        if self.pk is None or self.pk._lean_cv is None:
            return False
        with self.pk._lean_cv:
            if self.pk._lean_active and not self.pk._lean_off and self._in_pipe().take_handover():
                self.lean = True
                self.stretches += 1
            else:
                self._sending = True
                return False
        # Input paramiko fed before it parked comes first (its window opens when recv hands it over).
        early = self._in_pipe().empty()
        if early:
            self._hold(bytes(early))
        return True

    def offer(self) -> bool:
        """paramiko has parked: wake the engine if it waits on the channel (False: cannot)."""
        offer = getattr(self._in_pipe(), "offer_handover", None)
        if offer is None:
            return False  # not our pipe: nothing would tell the engine
        offer()
        return True

    def withdraw_offer(self) -> None:
        """paramiko did not park after all (a hook failed): take back an offer not yet taken."""
        take = getattr(self._in_pipe(), "take_handover", None)
        if take is not None:
            take()

    # -- input ---------------------------------------------------------------
    def recv(self, nbytes: int) -> bytes | memoryview | None:
        """Input for the engine: data, b"" at EOF, or None when a packet brought none.

        None lets the engine look again at whether to send what it holds
        before it reads on (a window adjust is not a request).
        """
        if self._pending:
            out = b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            self._consumed(len(out))
            return out
        if not self.lean:
            try:
                return bytes(self.chan.recv(nbytes))
            except Handover:
                if self.pk is None or not self.pk.parked():
                    return None  # paramiko did not park after all: read the channel again
                self.lean = True
                self.stretches += 1
        data = self._lean_step()
        if data:
            self._consumed(len(data))
        return data

    def _lean_step(self) -> bytes | memoryview | None:
        """Hand back if a rekey is due (None); else one packet: its data for the engine, or None."""
        if self._rekey_due:
            self._give_back(rekey=True)
            return None
        try:
            return self._lean_read()
        except (paramiko.SSHException, EOFError, OSError) as e:
            self.fail(e)
            raise

    def fail(self, why: BaseException) -> None:
        """A broken inner packet (or the tunnel gone) on the fast path: the whole inner connection ends.

        paramiko cannot read on after a packet it did not see, so the
        transport is closed, as paramiko closes it on a bad packet.
        """
        level = log.loglevel_WARN if isinstance(why, paramiko.SSHException) else log.loglevel_DEBUG
        self.xlog(f"inner transport closed on the fast path: {why!r}", loglevel=level)
        self.lean = False
        if self.transport is not None:
            self.transport.close()

    def input_ready(self) -> bool:
        if self._pending:
            return True
        if self.lean:
            return bool(self.sock.read_buffered() or self.sock.recv_ready())
        return bool(self.chan.recv_ready())

    def _lean_read(self) -> bytes | memoryview | None:
        """One packet on the fast path: its data, b"" at EOF, or None (nothing for the engine)."""
        assert self.pk is not None
        plain, seq = self._read_packet()
        if len(plain) >= 10 and plain[1] == MSG_CHANNEL_DATA:
            pad = plain[0]
            recipient, size = struct.unpack_from(">II", plain, 2)
            if recipient == self.chan.chanid and 10 + size + pad <= len(plain) and pad >= 4:
                self.packets_in += 1
                # The window opens as the engine takes the data (recv), not before:
                # what waits in _pending stays within the window we gave.  A view:
                # the engine copies each request out once (SFTPEngine._take).
                return memoryview(plain)[10:10 + size] if size else None
        elif len(plain) >= 10 and plain[1] == MSG_CHANNEL_WINDOW_ADJUST:
            recipient, nbytes = struct.unpack_from(">II", plain, 2)
            if recipient == self.chan.chanid:
                paramiko_compat.window_opened(self.chan, nbytes)
                return None
        # Anything else is paramiko's: hand it over decrypted, read the channel again.
        pad = plain[0]
        if pad < 4 or pad + 2 > len(plain):
            raise paramiko.SSHException("bad padding on the inner transport")
        msg = paramiko.Message(plain[2:len(plain) - pad])
        msg.seqno = seq
        self._give_back(pushback=(plain[1], msg))
        return None

    def _read_packet(self) -> tuple[bytes, int]:
        if self._in_mode != paramiko_compat.LEAN_GCM:
            return self._read_ctr_packet()
        assert self.pk is not None
        head = self._read_exact(4)
        (size,) = _U32.unpack(head)
        if size < _AES_BLOCK or size > MAX_PACKET or size % _AES_BLOCK:
            raise paramiko.SSHException(f"bad inner packet length {size}")
        body = self._read_exact(size + _GCM_TAG)
        try:
            plain, seq, rekey = self.pk.lean_decrypt(head, body)
        except Exception as e:  # cryptography's InvalidTag
            raise paramiko.SSHException("Mismatched MAC") from e
        if rekey:
            self._rekey_due = True
        return plain, seq

    def _read_ctr_packet(self) -> tuple[bytes, int]:
        """One AES-CTR + HMAC packet: its plaintext after the length, and its sequence number.

        The declared length is checked before the body is read (the bound of
        paramiko's path, :data:`MAX_PACKET`), the MAC before the packet is used.
        """
        assert self.pk is not None
        engine, digest, key, mac_size, seq = paramiko_compat.ctr_inbound(self.pk)
        mac = hmac.new(key, _U32.pack(seq), digest)
        if self._in_mode == paramiko_compat.LEAN_CTR_ETM:
            head = self._read_exact(4)
            (size,) = _U32.unpack(head)
            if size < _AES_BLOCK or size > MAX_PACKET or size % _AES_BLOCK:
                raise paramiko.SSHException(f"bad inner packet length {size}")
            wire = memoryview(self._read_exact(size + mac_size))
            mac.update(head)
            mac.update(wire[:size])
            if not hmac.compare_digest(mac.digest()[:mac_size], wire[size:]):
                raise paramiko.SSHException("Mismatched MAC")
            plain = engine.update(wire[:size])
        else:
            first = engine.update(self._read_exact(_AES_BLOCK))
            (size,) = _U32.unpack_from(first)
            if size < _AES_BLOCK - 4 or size > MAX_PACKET or (size + 4) % _AES_BLOCK:
                raise paramiko.SSHException(f"bad inner packet length {size}")
            wire = memoryview(self._read_exact(size + 4 - _AES_BLOCK + mac_size))
            rest = size + 4 - _AES_BLOCK
            plain = first[4:] + engine.update(wire[:rest])
            mac.update(first[:4])
            mac.update(plain)
            if not hmac.compare_digest(mac.digest()[:mac_size], wire[rest:]):
                raise paramiko.SSHException("Mismatched MAC")
        if paramiko_compat.ctr_received(self.pk, 4 + size + mac_size):
            self._rekey_due = True
        return plain, seq

    def _read_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            try:
                x = self._sock_recv(n)
            except TimeoutError:
                if self.pk is None or self.pk.closed or not self.transport.is_active():
                    raise EOFError() from None
                continue
            if not x:
                raise EOFError()
            parts.append(x)
            n -= len(x)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _consumed(self, n: int) -> None:
        ack = paramiko_compat.check_add_window(self.chan, n)
        if ack <= 0:
            return
        if self.lean and self._send_plain(_ADJUST.pack(MSG_CHANNEL_WINDOW_ADJUST, self.chan.remote_chanid, ack)):
            return
        # paramiko's way (it waits out a key exchange), as Channel.recv does
        m = paramiko.Message()
        m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
        m.add_int(self.chan.remote_chanid)
        m.add_int(ack)
        paramiko_compat.send_user_message(self.transport, m)

    def _give_back(self, pushback: tuple[int, paramiko.Message] | None = None, rekey: bool = False) -> None:
        assert self.pk is not None
        self.lean = False
        self._rekey_due = False
        self.handed_back += 1
        self.rekeys += rekey
        self.pk.give_back(pushback, rekey)

    # -- output ---------------------------------------------------------------
    def sendall(self, data: bytes | memoryview) -> None:
        chan = self.chan
        view = memoryview(data)
        while view:
            if not self.lean and not self._take_offer_or_mark_sending():
                try:
                    chan.sendall(bytes(view))
                finally:
                    self._sending = False
                return
            with chan.lock:
                if chan.closed or chan.eof_sent or not chan.active:
                    raise OSError("Socket is closed")
                n = min(len(view), chan.out_window_size, chan.out_max_packet_size - 64)
                if n > 0:
                    chan.out_window_size -= n
            if n <= 0:
                self._wait_window()  # returns with window, or off the fast path
                continue
            if not self._send_data(chan.remote_chanid, view[:n]):
                with chan.lock:  # not sent: a key exchange has begun; paramiko sends it when done
                    chan.out_window_size += n
                continue
            view = view[n:]

    def _wait_window(self) -> None:
        """Read packets until the peer opens the window, or the fast path has to end."""
        while self.lean:
            data = self._lean_step()
            if data:
                self._hold(data)
            if self.chan.out_window_size > 0:
                return

    def _hold(self, data: bytes | memoryview) -> None:
        """Keep input for the engine's next ``recv``: never more than the window we gave the client.

        Held input is not acknowledged yet, so a client within its window
        cannot exceed it; one that does is cut off (as paramiko is, by the
        channel's ``ChunkPipe``), instead of filling our memory.
        """
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self.chan.in_window_size:
            self.fail(paramiko.SSHException(
                f"the client sent {self._pending_bytes} bytes, more than the window of {self.chan.in_window_size}"))
            raise EOFError("inner transport closed: the client exceeded its window")

    def _send_data(self, remote: int, data: memoryview) -> bool:
        size = len(data)
        pad = 3 + _AES_BLOCK - ((size + 9 + 4 + self._pad_extra) % _AES_BLOCK)
        plain = b"".join((_DATA_HEAD.pack(pad, MSG_CHANNEL_DATA, remote, size), data, os.urandom(pad)))
        return self._send_raw(plain)

    def _send_plain(self, payload: bytes) -> bool:
        pad = 3 + _AES_BLOCK - ((len(payload) + 4 + self._pad_extra) % _AES_BLOCK)
        return self._send_raw(bytes((pad,)) + payload + os.urandom(pad))

    def _send_raw(self, plain: bytes) -> bool:
        """Send one packet on the fast path; False (and paramiko reads again) if paramiko would not send now.

        Once a key exchange has begun (our KEXINIT sent, RFC 4253 7.1) only
        key exchange messages may follow until NEWKEYS; the exchange needs
        paramiko's thread reading, so the data path goes back to it and the
        caller sends the packet paramiko's way, which waits for the exchange.
        """
        assert self.pk is not None
        rekey = self.pk.lean_send(plain, self._out_mode)
        if rekey is None:
            self.kex_waits += 1
            self._give_back()
            return False
        if rekey:
            self._rekey_due = True
        self.packets_out += 1
        return True
