"""AES-GCM for one direction of an SSH connection, without an OpenSSL setup per packet.

cryptography's ``AESGCM`` is what the AES-GCM packets of the inner connection
(and of a connection given :func:`x2go_sftp.paramiko_compat.backport_gcm`) go
through.  Up to cryptography 42 it is built on cffi and makes, keys and frees
an OpenSSL cipher context on every call: measured here (Python 3.11, one core
with AES-NI), 11-16 us per packet of any size, where the sealing itself takes
~1.5 us for a small packet.  Those are the releases the distributions with
paramiko 2.12 ship: 38.0.4 on Debian 12, 41.0.7 on Ubuntu 24.04.  From 43 on,
cryptography's AEAD is Rust and costs under 1 us per call (Debian 13: 43.0.0).

:func:`engine` gives an object with ``AESGCM``'s ``encrypt``/``decrypt``, that
on those releases keeps one OpenSSL context per operation, keyed once, and
per packet only sets the nonce (``EVP_CipherInit_ex`` with the key left as
it is), feeds the additional data and the text, and sets or takes the tag.
It uses cryptography's own OpenSSL binding (``Binding.lib``/``ffi``, the
names cryptography's ``AESGCM`` itself called), only where:

* cryptography's release is one it was checked on (:data:`CHECKED_ON`);
* the binding has every name it needs (:data:`NEEDED`);
* a self-test against ``AESGCM`` passes once per process: the same sealed
  bytes for both key sizes and several lengths, the same plaintext back, and
  a tampered packet refused, with the context still good afterwards.

Anything else, or ``X2GO_SFTP_GCM_CONTEXT=0`` (``no``/``off``/``false``), and
:func:`engine` returns plain ``AESGCM``.  Nothing changes on the wire: the
bytes sent are the ones ``AESGCM`` would send, a packet whose tag does not
verify raises ``InvalidTag``, and nothing of it is returned.

One object serves one direction, as paramiko's packetizer uses it (sends
under its write lock, reads from one thread).  Should two threads meet in
one anyway, the second is served by a plain ``AESGCM``: never a shared
OpenSSL context, never a wait.
"""

from __future__ import annotations

import os
from typing import Any

import cryptography
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import defaults

GCM_CONTEXT_ENV = "X2GO_SFTP_GCM_CONTEXT"

#: cryptography releases the reused context was read against and tested on (majors 38 to 42 all
#: build AESGCM per call on cffi); 43 moved AEAD to Rust (fast per call, and the names are gone).
CHECKED_ON: tuple[str, ...] = ("38.0.4", "39.0.2", "40.0.2", "41.0.7", "42.0.8")
_CHECKED_MAJORS = frozenset(int(v.split(".")[0]) for v in CHECKED_ON)

#: What the reused context needs from cryptography's OpenSSL binding.
NEEDED: tuple[str, ...] = ("EVP_get_cipherbyname", "EVP_CIPHER_CTX_new", "EVP_CIPHER_CTX_free",
                           "EVP_CipherInit_ex", "EVP_CIPHER_CTX_ctrl", "EVP_CipherUpdate",
                           "EVP_CipherFinal_ex", "EVP_CTRL_AEAD_SET_IVLEN", "EVP_CTRL_AEAD_GET_TAG",
                           "EVP_CTRL_AEAD_SET_TAG", "ERR_clear_error")

TAG = 16
NONCE = 12  # RFC 5647 7.1: the only nonce size SSH uses
_CIPHER_NAMES = {16: b"aes-128-gcm", 32: b"aes-256-gcm"}
_SEAL, _OPEN = 0, 1  # ReusedGcm's two ways (an opened packet carries its tag on top of the text)
# The longest text one call takes (OpenSSL's lengths are C ints); SSH packets are far shorter.
_MAX_TEXT = 1 << 30


def _release_major() -> int:
    try:
        return int(str(getattr(cryptography, "__version__", "")).split(".")[0])
    except ValueError:
        return 0


def _binding() -> tuple[Any, Any] | None:
    """cryptography's OpenSSL binding (lib, ffi), if it has every name in :data:`NEEDED`."""
    try:
        from cryptography.hazmat.bindings.openssl.binding import Binding
    except ImportError:
        return None
    lib, ffi = getattr(Binding, "lib", None), getattr(Binding, "ffi", None)
    if lib is None or ffi is None or not all(hasattr(lib, name) for name in NEEDED):
        return None
    return lib, ffi


class _Context:
    """One OpenSSL AES-GCM context, keyed once, for one operation (seal or open)."""

    __slots__ = ("ctx", "ffi", "lib", "outl", "scratch", "scratch_size", "seal", "tag")

    def __init__(self, lib: Any, ffi: Any, key: bytes, seal: bool) -> None:
        self.lib, self.ffi, self.seal = lib, ffi, int(seal)
        cipher = lib.EVP_get_cipherbyname(_CIPHER_NAMES[len(key)])
        if cipher == ffi.NULL:
            raise RuntimeError("OpenSSL has no AES-GCM")
        ctx = lib.EVP_CIPHER_CTX_new()
        if ctx == ffi.NULL:
            raise MemoryError("EVP_CIPHER_CTX_new")
        self.ctx = ffi.gc(ctx, lib.EVP_CIPHER_CTX_free)  # freeing it cleanses the key schedule
        null = ffi.NULL
        if (lib.EVP_CipherInit_ex(self.ctx, cipher, null, null, null, self.seal) != 1
                or lib.EVP_CIPHER_CTX_ctrl(self.ctx, lib.EVP_CTRL_AEAD_SET_IVLEN, NONCE, null) != 1
                or lib.EVP_CipherInit_ex(self.ctx, null, null, key, null, self.seal) != 1):
            lib.ERR_clear_error()
            raise RuntimeError("OpenSSL refused the AES-GCM key")
        self.outl = ffi.new("int *")
        self.tag = ffi.new("unsigned char[]", TAG)
        self.scratch: Any = None
        self.scratch_size = 0

    def _out(self, n: int) -> Any:
        """A buffer of at least ``n`` bytes, kept for the next packets (no allocation per packet)."""
        if self.scratch is None or n > self.scratch_size:
            self.scratch_size = max(n, 2 * self.scratch_size, 4096)
            self.scratch = self.ffi.new("unsigned char[]", self.scratch_size)
        return self.scratch

    def _start(self, nonce: bytes, aad: bytes) -> bool:
        lib, ffi, ctx = self.lib, self.ffi, self.ctx
        if lib.EVP_CipherInit_ex(ctx, ffi.NULL, ffi.NULL, ffi.NULL, nonce, self.seal) != 1:
            return False
        return not aad or lib.EVP_CipherUpdate(ctx, ffi.NULL, self.outl, ffi.from_buffer(aad), len(aad)) == 1

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        lib, ffi, ctx = self.lib, self.ffi, self.ctx
        n = len(data)
        out = self._out(n + TAG)
        ok = (self._start(nonce, aad)
              and (n == 0 or lib.EVP_CipherUpdate(ctx, out, self.outl, ffi.from_buffer(data), n) == 1)
              and lib.EVP_CipherFinal_ex(ctx, self.tag, self.outl) == 1
              and lib.EVP_CIPHER_CTX_ctrl(ctx, lib.EVP_CTRL_AEAD_GET_TAG, TAG, out + n) == 1)
        if not ok:
            lib.ERR_clear_error()
            raise RuntimeError("OpenSSL could not seal an AES-GCM packet")
        return bytes(ffi.buffer(out, n + TAG)[:])

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        lib, ffi, ctx = self.lib, self.ffi, self.ctx
        n = len(data) - TAG
        if n < 0:
            raise InvalidTag
        src = ffi.from_buffer(data)
        out = self._out(n)
        ok = (self._start(nonce, aad)
              and lib.EVP_CIPHER_CTX_ctrl(ctx, lib.EVP_CTRL_AEAD_SET_TAG, TAG, src + n) == 1
              and (n == 0 or lib.EVP_CipherUpdate(ctx, out, self.outl, src, n) == 1)
              and lib.EVP_CipherFinal_ex(ctx, self.tag, self.outl) == 1)  # checks the tag
        if not ok:
            lib.ERR_clear_error()
            raise InvalidTag
        return bytes(ffi.buffer(out, n)[:])


class ReusedGcm:
    """``AESGCM``'s ``encrypt``/``decrypt`` for one key, on one OpenSSL context per operation made once.

    Only for 12-byte nonces (SSH's); any other call, or a second thread
    arriving while one is inside, is served by a plain ``AESGCM`` of the same key.
    """

    __slots__ = ("_binding", "_busy", "_contexts", "_key", "_plain")

    def __init__(self, key: bytes, binding: tuple[Any, Any]) -> None:
        if len(key) not in _CIPHER_NAMES:
            raise ValueError("AES-GCM key must be 128 or 256 bits")
        self._key = bytes(key)
        self._plain = AESGCM(self._key)
        self._binding = binding
        self._contexts: list[_Context | None] = [None, None]  # sealing, opening: made at first use
        # The one token for the kept contexts: taken with list.pop(), which is one
        # atomic operation (it never waits, and costs no Python call under gevent,
        # where a lock's acquire does); whoever finds it gone uses a plain AESGCM.
        self._busy: list[None] = [None]

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._run(_SEAL, nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._run(_OPEN, nonce, data, associated_data)

    def _run(self, way: int, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        """Seal or open on this key's kept context for ``way``; on a plain ``AESGCM`` if it is not for that."""
        if len(nonce) != NONCE or len(data) > _MAX_TEXT + way * TAG:
            return self._on_plain(way, nonce, data, associated_data)
        busy = self._busy
        try:
            busy.pop()
        except IndexError:  # another thread has the contexts
            return self._on_plain(way, nonce, data, associated_data)
        try:
            ctx = self._contexts[way]
            if ctx is None:
                ctx = self._contexts[way] = _Context(*self._binding, self._key, seal=way == _SEAL)
            aad = associated_data or b""
            return ctx.decrypt(nonce, data, aad) if way == _OPEN else ctx.encrypt(nonce, data, aad)
        finally:
            busy.append(None)

    def _on_plain(self, way: int, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        plain = self._plain
        return plain.decrypt(nonce, data, associated_data) if way == _OPEN else plain.encrypt(nonce, data, associated_data)


def _self_test(binding: tuple[Any, Any]) -> bool:
    """Does the reused context seal and open exactly as ``AESGCM`` does, and refuse what it refuses?"""
    try:
        for key_size in _CIPHER_NAMES:
            key = os.urandom(key_size)
            plain, ours = AESGCM(key), ReusedGcm(key, binding)
            for n in (0, 1, 15, 16, 4099, 32768 + 9):
                nonce, data, aad = os.urandom(NONCE), os.urandom(n), os.urandom(4)
                sealed = plain.encrypt(nonce, data, aad)
                if ours.encrypt(nonce, data, aad) != sealed or ours.decrypt(nonce, sealed, aad) != data:
                    return False
                for bad in (bytes([sealed[0] ^ 1]) + sealed[1:], sealed[:-1] + bytes([sealed[-1] ^ 0x80])):
                    try:
                        ours.decrypt(nonce, bad, aad)
                        return False
                    except InvalidTag:
                        pass
                try:
                    ours.decrypt(nonce, sealed, aad[::-1] + b"x")
                    return False
                except InvalidTag:
                    pass
                if ours.decrypt(nonce, sealed, aad) != data:  # still good after the refusals
                    return False
    except Exception:  # anything unexpected from OpenSSL or cffi: not for us
        return False
    return True


_verdict: dict[str, Any] = {}  # once per process: {"binding": (lib, ffi) or None, "why": str}


def _decide() -> tuple[tuple[Any, Any] | None, str]:
    if "why" not in _verdict:
        version = str(getattr(cryptography, "__version__", "?"))
        binding = None
        if _release_major() not in _CHECKED_MAJORS:
            why = f"cryptography {version}: its own AESGCM (not a release the reused context was checked on)"
        elif (binding := _binding()) is None:
            why = f"cryptography {version}: its own AESGCM (its OpenSSL binding lacks a name the reused context needs)"
        elif not _self_test(binding):
            binding = None
            why = f"cryptography {version}: its own AESGCM (the reused context failed its self-test)"
        else:
            why = f"cryptography {version}: one OpenSSL context per direction (reused AES-GCM context)"
        _verdict.update(binding=binding, why=why)
    return _verdict["binding"], _verdict["why"]


def opted_out() -> bool:
    """True if ``X2GO_SFTP_GCM_CONTEXT`` switches the reused context off."""
    return defaults.opted_out(GCM_CONTEXT_ENV)


def reused() -> bool:
    """Will :func:`engine` keep one OpenSSL context per direction here?"""
    return not opted_out() and _decide()[0] is not None


def describe() -> str:
    """One line for logs and bug reports: which AES-GCM the packets go through, and why."""
    if opted_out():
        return f"cryptography {getattr(cryptography, '__version__', '?')}: its own AESGCM ({GCM_CONTEXT_ENV} opts out)"
    return _decide()[1]


def engine(key: bytes) -> Any:
    """An AES-GCM engine for one direction: :class:`ReusedGcm` where :func:`reused`, else ``AESGCM(key)``."""
    binding = None if opted_out() else _decide()[0]
    return ReusedGcm(key, binding) if binding is not None else AESGCM(key)
