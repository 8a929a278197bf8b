"""x2go_sftp.aesgcm: one OpenSSL context per direction where cryptography's AESGCM sets one up per call.

The reused context exists for cryptography 38-42 (Debian 12 ships 38.0.4,
Ubuntu 24.04 41.0.7; CI's paramiko 2.12 suite runs on 38.0.4).  On newer
releases :func:`aesgcm.engine` must be cryptography's own ``AESGCM``; the
tests that need the reused context say so and skip there.
"""

from __future__ import annotations

import os
import threading

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from x2go_sftp import aesgcm

BINDING = aesgcm._binding()
CHECKED = aesgcm._release_major() in aesgcm._CHECKED_MAJORS
needs_binding = pytest.mark.skipif(
    BINDING is None, reason="this cryptography has no cffi EVP names (43 on: its AESGCM is Rust, fast per call)")


@pytest.fixture
def fresh_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides anew (the verdict is kept per process)."""
    monkeypatch.setattr(aesgcm, "_verdict", {})
    monkeypatch.delenv(aesgcm.GCM_CONTEXT_ENV, raising=False)


def _reused(key: bytes) -> aesgcm.ReusedGcm:
    assert BINDING is not None
    return aesgcm.ReusedGcm(key, BINDING)


def test_on_the_releases_it_was_checked_on_the_engine_keeps_its_context(fresh_verdict: None) -> None:
    """cryptography 38-42: engine() is the reused context; newer: cryptography's own AESGCM, quietly."""
    eng = aesgcm.engine(os.urandom(16))
    if CHECKED:
        assert aesgcm.reused(), aesgcm.describe()
        assert isinstance(eng, aesgcm.ReusedGcm)
        assert "one OpenSSL context per direction" in aesgcm.describe()
    else:
        assert not aesgcm.reused()
        assert type(eng) is AESGCM
        assert "its own AESGCM" in aesgcm.describe()


@needs_binding
@pytest.mark.parametrize("key_size", [16, 32])
def test_it_seals_and_opens_exactly_as_aesgcm(key_size: int) -> None:
    key = os.urandom(key_size)
    plain, ours = AESGCM(key), _reused(key)
    for n in (0, 1, 5, 16, 31, 256, 4096, 32768, 32768 + 13, 262144):
        for aad in (b"", os.urandom(4), os.urandom(37)):
            nonce, data = os.urandom(aesgcm.NONCE), os.urandom(n)
            sealed = plain.encrypt(nonce, data, aad)
            assert ours.encrypt(nonce, data, aad) == sealed
            assert ours.decrypt(nonce, sealed, aad) == data
            assert plain.decrypt(nonce, ours.encrypt(nonce, data, aad), aad) == data
    nonce, data = os.urandom(aesgcm.NONCE), b"payload"
    assert ours.encrypt(nonce, data, None) == plain.encrypt(nonce, data, None)


@needs_binding
def test_a_packet_that_does_not_authenticate_is_refused_and_the_context_serves_on() -> None:
    key = os.urandom(16)
    ours = _reused(key)
    nonce, data, aad = os.urandom(aesgcm.NONCE), os.urandom(1000), b"\x00\x00\x03\xf0"
    sealed = AESGCM(key).encrypt(nonce, data, aad)
    forged = [
        bytes([sealed[0] ^ 1]) + sealed[1:],  # the text
        sealed[:-1] + bytes([sealed[-1] ^ 0x80]),  # the tag
        sealed[:-1],  # one byte short
        sealed[:aesgcm.TAG - 1],  # shorter than a tag
        b"",
    ]
    for bad in forged:
        with pytest.raises(InvalidTag):
            ours.decrypt(nonce, bad, aad)
    with pytest.raises(InvalidTag):
        ours.decrypt(nonce, sealed, b"\x00\x00\x03\xf1")  # other additional data (the length)
    with pytest.raises(InvalidTag):
        ours.decrypt(os.urandom(aesgcm.NONCE), sealed, aad)  # another nonce
    assert ours.decrypt(nonce, sealed, aad) == data
    lib = BINDING[0]  # type: ignore[index]
    if hasattr(lib, "ERR_peek_error"):
        assert lib.ERR_peek_error() == 0  # nothing left on OpenSSL's error queue for cryptography to trip on


@needs_binding
def test_nonces_of_another_size_are_served_by_plain_aesgcm() -> None:
    key = os.urandom(32)
    ours = _reused(key)
    nonce, data = os.urandom(16), os.urandom(100)
    sealed = AESGCM(key).encrypt(nonce, data, b"x")
    assert ours.encrypt(nonce, data, b"x") == sealed
    assert ours.decrypt(nonce, sealed, b"x") == data


@needs_binding
def test_two_threads_in_one_engine_never_share_its_context() -> None:
    """One engine serves one direction; if two threads meet in it anyway, every packet is still right."""
    key = os.urandom(16)
    ours, plain = _reused(key), AESGCM(key)
    wrong: list[int] = []
    start = threading.Barrier(3)

    def hammer(seed: int) -> None:
        start.wait()
        for i in range(1500):
            nonce = seed.to_bytes(4, "big") + i.to_bytes(8, "big")
            data = os.urandom(2048 + (i % 7) * 1000)
            sealed = ours.encrypt(nonce, data, b"aad!")
            if sealed != plain.encrypt(nonce, data, b"aad!") or ours.decrypt(nonce, sealed, b"aad!") != data:
                wrong.append(i)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []


def test_the_opt_out_gives_cryptographys_own_aesgcm(fresh_verdict: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aesgcm.GCM_CONTEXT_ENV, "0")
    assert type(aesgcm.engine(os.urandom(16))) is AESGCM
    assert not aesgcm.reused()
    assert aesgcm.GCM_CONTEXT_ENV in aesgcm.describe()


def test_an_unchecked_cryptography_release_gets_its_own_aesgcm(fresh_verdict: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aesgcm, "_release_major", lambda: 37)
    assert type(aesgcm.engine(os.urandom(16))) is AESGCM
    assert "not a release the reused context was checked on" in aesgcm.describe()


@needs_binding
def test_a_failed_self_test_switches_the_reused_context_off(fresh_verdict: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Should OpenSSL seal differently from AESGCM (a broken build, a changed binding), nothing uses it."""
    monkeypatch.setattr(aesgcm, "_release_major", lambda: 41)
    real = aesgcm._Context.encrypt

    def off_by_one_bit(self: aesgcm._Context, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        out = real(self, nonce, data, aad)
        return bytes([out[0] ^ 1]) + out[1:] if out else out

    monkeypatch.setattr(aesgcm._Context, "encrypt", off_by_one_bit)
    assert type(aesgcm.engine(os.urandom(16))) is AESGCM
    assert "failed its self-test" in aesgcm.describe()


def test_a_binding_without_a_needed_name_gets_its_own_aesgcm(fresh_verdict: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aesgcm, "_release_major", lambda: 41)
    monkeypatch.setattr(aesgcm, "NEEDED", (*aesgcm.NEEDED, "EVP_no_such_function"))
    assert type(aesgcm.engine(os.urandom(16))) is AESGCM
    assert "lacks a name" in aesgcm.describe()
