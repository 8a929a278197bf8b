"""paramiko's per-packet MAC through OpenSSL's one-shot HMAC: the same bytes, an opt-out and an undo.

paramiko's ``packet.compute_hmac`` builds an ``hmac.HMAC`` object for every
packet; :func:`x2go_sftp.paramiko_compat.fix_hmac` binds
:func:`~x2go_sftp.paramiko_compat.compute_hmac_oneshot` there instead
(``hmac.digest`` by hash name).  These tests compare the MACs for every MAC
paramiko offers and keys and messages of several lengths, move data through a
real tunnel whose inner transport is forced to aes128-ctr with an HMAC-SHA2
(ETM and not) while counting who computed the MACs, and check the opt-out,
idempotence, the undo and that a foreign ``compute_hmac`` is left alone.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import paramiko.packet
import pytest

from x2go_sftp import X2GoRevFwTunnelToSFTP, log, paramiko_compat, tuning

# Key and message lengths compared: empty, one byte, one and just over one
# md5/sha1/sha256 block (64 bytes), and a full 32 KiB data packet.
LENGTHS = (0, 1, 64, 65, 32 * 1024)
# What moves through the tunnel: 128 READs of 32 KiB (sshfs's request size) and
# the same written back, so hundreds of MAC'd packets on each SSH hop.
DATA_BYTES = 4 * 1024 * 1024
READ_SIZE = 32 * 1024
# Under the fix no MAC on the data path comes from paramiko's hmac.HMAC.
HMAC_OBJECTS_ALLOWED_UNDER_FIX = 0
# The inner transport's cipher for the tunnel test: what paramiko 2.12 (no AES-GCM)
# negotiates with OpenSSH's client, where the MAC is computed per packet.
CTR_CIPHER = "aes128-ctr"
TUNNEL_MACS = ("hmac-sha2-256", "hmac-sha2-512", "hmac-sha2-256-etm@openssh.com")


def offered_macs() -> tuple[str, ...]:
    """The MACs a paramiko client offers by default (public API: its security options)."""
    return tuple(paramiko.Transport(socket.socket()).get_security_options().digests)


def compute_hmac_bindings() -> dict[str, Any]:
    """Every paramiko module's ``compute_hmac`` global, by module name."""
    return {
        name: m.compute_hmac
        for name, m in list(sys.modules.items())
        if m is not None and name.startswith("paramiko") and hasattr(m, "compute_hmac")
    }


@pytest.fixture
def clean_hmac() -> Iterator[None]:
    """Start from paramiko's own compute_hmac; leave the process as it was found."""
    was_applied = paramiko_compat.restore_hmac()
    yield
    paramiko_compat.restore_hmac()
    if was_applied:
        paramiko_compat.fix_hmac()


class MacCounter:
    """Counts, from any thread, MACs computed by paramiko's HMAC objects and by the fix's one-shot."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paramiko_objects: list[None] = []  # list.append is atomic under the GIL
        self.oneshots: list[None] = []
        init, digest = hmac.HMAC.__init__, hmac.digest

        def counting_init(obj: hmac.HMAC, *args: Any, **kwargs: Any) -> None:
            if sys._getframe(1).f_globals.get("__name__") == "paramiko.packet":
                self.paramiko_objects.append(None)
            init(obj, *args, **kwargs)

        def counting_digest(key: Any, msg: Any, name: Any) -> bytes:
            if sys._getframe(1).f_globals.get("__name__") == paramiko_compat.__name__:
                self.oneshots.append(None)
            return digest(key, msg, name)

        monkeypatch.setattr(hmac.HMAC, "__init__", counting_init)
        monkeypatch.setattr(hmac, "digest", counting_digest)


def ctr_sftp_client(
    port: int, key: paramiko.PKey, username: str, mac: str
) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    """Log into a tunnel's port offering only :data:`CTR_CIPHER` and ``mac``; open SFTP."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    try:
        options = transport.get_security_options()
        options.ciphers = (CTR_CIPHER,)
        options.digests = (mac,)
        transport.start_client()
        transport.auth_publickey(username, key)
        client = paramiko.SFTPClient.from_transport(transport)
    except BaseException:
        transport.close()
        raise
    assert client is not None
    return transport, client


def move_data(sftp: paramiko.SFTPClient, export_dir: str) -> None:
    """Read DATA_BYTES and write them back through the tunnel; check both copies by sha256."""
    payload = os.urandom(DATA_BYTES)
    Path(export_dir, "big.bin").write_bytes(payload)
    received = bytearray()
    with sftp.open("big.bin", "rb") as f:
        while chunk := f.read(READ_SIZE):
            received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    with sftp.open("copy.bin", "wb") as f:
        f.write(bytes(received))
    assert (
        hashlib.sha256(Path(export_dir, "copy.bin").read_bytes()).digest() == hashlib.sha256(payload).digest()
    )


# -- the same MAC for every digest, key and message ------------------------------------
@pytest.mark.parametrize("mac", offered_macs())
def test_same_mac_as_paramiko(clean_hmac: None, monkeypatch: pytest.MonkeyPatch, mac: str) -> None:
    original = paramiko_compat.paramiko_compute_hmac()
    assert original is not None and original is not paramiko_compat.compute_hmac_oneshot
    digest_class = paramiko_compat.mac_digests()[mac]
    assert paramiko_compat.fix_hmac()
    counter = MacCounter(monkeypatch)
    for key_len in LENGTHS:
        key = os.urandom(key_len)
        for msg_len in LENGTHS:
            message = os.urandom(msg_len)
            expected = original(key, message, digest_class)
            got = paramiko.packet.compute_hmac(key, message, digest_class)
            assert got == expected == hmac.new(key, message, digest_class).digest(), (key_len, msg_len)
    # Each comparison: paramiko's own function made one HMAC object, the fix none (OpenSSL's one-shot).
    assert len(counter.oneshots) == len(counter.paramiko_objects) == len(LENGTHS) ** 2


def test_other_digest_keeps_paramikos_function(clean_hmac: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest the probe did not check (sha384 here) is computed by paramiko's own function."""
    assert paramiko_compat.fix_hmac()
    counter = MacCounter(monkeypatch)
    key, message = os.urandom(48), os.urandom(1000)
    got = paramiko.packet.compute_hmac(key, message, hashlib.sha384)
    assert got == hmac.new(key, message, hashlib.sha384).digest()
    assert len(counter.paramiko_objects) == 1 and not counter.oneshots


# -- the data path ---------------------------------------------------------------
@pytest.mark.parametrize("mac", TUNNEL_MACS)
def test_tunnel_macs_computed_by_the_fix(
    clean_hmac: None,
    monkeypatch: pytest.MonkeyPatch,
    make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
    session_key: paramiko.RSAKey,
    local_user: str,
    export_dir: str,
    mac: str,
) -> None:
    """aes128-ctr + ``mac`` on the inner transport: data intact, every MAC from OpenSSL's one-shot."""
    monkeypatch.setattr(tuning, "PREFERRED_CIPHERS", ())  # paramiko's own cipher list, CTR included
    tunnel = make_tunnel([export_dir])  # applies the fix (process-wide)
    assert paramiko_compat.hmac_fix_applied()
    counter = MacCounter(monkeypatch)
    transport, sftp = ctr_sftp_client(tunnel.server_port, session_key, local_user, mac)
    try:
        assert paramiko_compat.negotiated_ciphers(transport) == (CTR_CIPHER, CTR_CIPHER)
        assert paramiko_compat.negotiated_macs(transport) == (mac, mac)
        move_data(sftp, export_dir)
    finally:
        transport.close()
    # Both ends of the inner hop compute one MAC per packet each way: at least
    # one per 32 KiB read and one per 32 KiB written, on each end.
    assert len(counter.oneshots) >= 2 * 2 * DATA_BYTES // READ_SIZE
    assert len(counter.paramiko_objects) <= HMAC_OBJECTS_ALLOWED_UNDER_FIX


# -- applied process-wide; idempotent; opt-out; undone -----------------------------------
def test_bound_where_paramiko_binds_it(clean_hmac: None) -> None:
    original = paramiko_compat.paramiko_compute_hmac()
    before = compute_hmac_bindings()
    holders = sorted(name for name, f in before.items() if f is original)
    assert "paramiko.packet" in holders
    assert paramiko_compat.fix_hmac()
    after = compute_hmac_bindings()
    assert sorted(n for n, f in after.items() if f is paramiko_compat.compute_hmac_oneshot) == holders
    assert set(paramiko_compat.hmac_fix_digests()) == {"md5", "sha1", "sha256", "sha512"}


def test_idempotent_one_log_line_and_undo(clean_hmac: None, caplog: pytest.LogCaptureFixture) -> None:
    before = compute_hmac_bindings()
    logger = log.X2GoLogger(loglevel=log.loglevel_DEFAULT | log.loglevel_INFO)
    with caplog.at_level(logging.INFO, logger="x2go_sftp"):
        assert paramiko_compat.fix_hmac(logger)
        applied = compute_hmac_bindings()
        assert paramiko_compat.fix_hmac(logger)
    assert compute_hmac_bindings() == applied != before
    lines = [r for r in caplog.records if "compute_hmac" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert paramiko_compat.restore_hmac()
    assert compute_hmac_bindings() == before
    assert not paramiko_compat.hmac_fix_applied() and paramiko_compat.hmac_fix_digests() == ()
    assert not paramiko_compat.restore_hmac()


@pytest.mark.parametrize("value", ["0", "off", "No", "false"])
def test_environment_opt_out(clean_hmac: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    before = compute_hmac_bindings()
    monkeypatch.setenv(paramiko_compat.HMAC_FIX_ENV, value)
    assert not paramiko_compat.fix_hmac()
    assert compute_hmac_bindings() == before
    monkeypatch.setenv(paramiko_compat.HMAC_FIX_ENV, "1")
    assert paramiko_compat.fix_hmac()


def test_opt_out_tunnel_keeps_paramikos_function(
    clean_hmac: None,
    monkeypatch: pytest.MonkeyPatch,
    make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
    export_dir: str,
) -> None:
    """With the opt-out set, making a tunnel leaves paramiko's compute_hmac bound."""
    monkeypatch.setenv(paramiko_compat.HMAC_FIX_ENV, "0")
    before = compute_hmac_bindings()
    make_tunnel([export_dir])
    assert not paramiko_compat.hmac_fix_applied()
    assert compute_hmac_bindings() == before


def test_replacement_still_right_after_undo(clean_hmac: None) -> None:
    """A packet already inside the replacement when the fix is undone still gets paramiko's bytes."""
    assert paramiko_compat.fix_hmac()
    paramiko_compat.restore_hmac()
    key, message = os.urandom(32), os.urandom(100)
    for digest_class in set(paramiko_compat.mac_digests().values()):
        expected = hmac.new(key, message, digest_class).digest()
        assert paramiko_compat.compute_hmac_oneshot(key, message, digest_class) == expected


def test_not_applied_over_a_foreign_compute_hmac(clean_hmac: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compute_hmac that is not paramiko's own (someone's wrapper) is left alone, same bytes or not."""
    original = paramiko.packet.compute_hmac

    def foreign(key: Any, message: Any, digest_class: Any) -> bytes:
        return original(key, message, digest_class)

    monkeypatch.setattr(paramiko.packet, "compute_hmac", foreign)
    assert not paramiko_compat.fix_hmac()
    assert paramiko.packet.compute_hmac is foreign
