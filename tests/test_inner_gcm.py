"""AES-GCM inside on every paramiko: OpenSSH's own ``sftp`` agrees on it with the inner server.

paramiko has AES-GCM from 3.3; before (2.12: Debian 12, Ubuntu 24.04) the inner
transport gets :func:`x2go_sftp.paramiko_compat.backport_gcm`.  These tests run
on every release and hold the inner server to what OpenSSH's client does:
both GCM ciphers, key re-exchanges in the middle of transfers, and a tampered
packet that ends its connection and nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from tests.netutil import CorruptingProxy
from tests.realpeers import require, run_sftp, write_key_files
from x2go_sftp import X2GoRevFwTunnelToSFTP, aesgcm, paramiko_compat
from x2go_sftp.testing import inner_speaks_gcm

pytestmark = pytest.mark.real

GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
HAS_GCM = "aes128-gcm@openssh.com" in paramiko_compat.supported_ciphers()


@pytest.fixture
def peer(make_tunnel, export_dir: str, session_key: paramiko.RSAKey, host_key: paramiko.RSAKey,
         tmp_path: Path) -> Iterator[tuple[X2GoRevFwTunnelToSFTP, Path, Path]]:
    require("sftp")
    tunnel = make_tunnel([export_dir], host_key=host_key)
    keyfile, ident = write_key_files(tmp_path, session_key, host_key, tunnel.server_port)
    yield tunnel, keyfile, ident


def _ciphers(stderr: str) -> set[str]:
    """The ciphers ``sftp -v`` reports for each direction of each key exchange."""
    return set(re.findall(r"kex: (?:client->server|server->client) cipher: (\S+)", stderr))


def _put_get(peer: tuple[X2GoRevFwTunnelToSFTP, Path, Path], export_dir: str, tmp_path: Path, size: int,
             *options: str) -> tuple[str, int]:
    """Upload ``size`` random bytes and fetch them back with OpenSSH's sftp; return its stderr and the rekeys."""
    tunnel, keyfile, ident = peer
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(os.urandom(size))
    res = run_sftp(tunnel.server_port, keyfile, ident, f"put {src} {export_dir}/up.bin\nget {export_dir}/up.bin {back}\n",
                   extra_args=("-v", *options))
    assert res.returncode == 0, res.stderr[-2000:]
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashlib.sha256(Path(export_dir, "up.bin").read_bytes()).hexdigest() == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    return res.stderr, res.stderr.count("SSH2_MSG_NEWKEYS received")


def test_the_inner_server_speaks_aes_gcm_on_every_paramiko() -> None:
    """Where paramiko has none of its own, the backport is there (checked on 2.12)."""
    assert inner_speaks_gcm()


@pytest.mark.parametrize("cipher", GCM)
def test_openssh_sftp_agrees_on_each_aes_gcm_and_moves_data_intact(peer, export_dir: str, tmp_path: Path,
                                                                   cipher: str) -> None:
    """``sftp -c`` offers only that cipher: without AES-GCM in the inner server it cannot connect."""
    stderr, _ = _put_get(peer, export_dir, tmp_path, 3 << 20, "-c", cipher)
    assert _ciphers(stderr) == {cipher}


def test_openssh_sftp_with_its_default_ciphers_gets_aes_gcm(peer, export_dir: str, tmp_path: Path) -> None:
    """OpenSSH prefers AES-CTR to AES-GCM; the inner server offers only AES-GCM, so that is what it gets."""
    stderr, _ = _put_get(peer, export_dir, tmp_path, 1 << 20)
    assert _ciphers(stderr) == {"aes128-gcm@openssh.com"}


def test_key_re_exchanges_in_the_middle_of_transfers_keep_data_intact(peer, export_dir: str,
                                                                      tmp_path: Path) -> None:
    """The client rekeys every 256 KiB while 4 MiB go each way: each exchange runs through
    paramiko's path under AES-GCM, then the data path resumes."""
    stderr, newkeys = _put_get(peer, export_dir, tmp_path, 4 << 20, "-o", "RekeyLimit=256K")
    assert _ciphers(stderr) == {"aes128-gcm@openssh.com"}
    assert newkeys >= 16  # the first exchange, then one per 256 KiB of 8 MiB


@pytest.mark.skipif(HAS_GCM or aesgcm._binding() is None or aesgcm._release_major() not in aesgcm._CHECKED_MAJORS,
                    reason="the backport's packets go through the reused context only on cryptography 38-42")
def test_the_backport_keeps_one_openssl_context_per_direction_and_key(peer, export_dir: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On Debian 12's cryptography (38.0.4) AESGCM makes an OpenSSL context per packet; the inner
    transport makes one per direction and key: across rekeys, thousands of packets, a few contexts."""
    made, used = [0], [0]

    class Counted(aesgcm._Context):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made[0] += 1

        def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
            used[0] += 1
            return super().encrypt(nonce, data, aad)

        def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
            used[0] += 1
            return super().decrypt(nonce, data, aad)

    monkeypatch.setattr(aesgcm, "_Context", Counted)
    _, newkeys = _put_get(peer, export_dir, tmp_path, 4 << 20, "-o", "RekeyLimit=1M")
    assert newkeys >= 4
    assert used[0] >= 2 * (4 << 20) // (64 << 10)  # every data packet each way went through a kept context
    assert 0 < made[0] <= 2 * newkeys  # at most one per direction and key



def test_a_tampered_packet_before_the_session_ends_that_connection_only(
        no_leaks, peer, export_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One bit flipped inside the client's first AES-GCM packet (its service request, read by
    the transport before any session): the tag check fails, that connection ends, the tunnel serves on."""
    tunnel, keyfile, ident = peer
    proxy = CorruptingProxy(tunnel.server_port, after_newkeys=8)
    try:
        with caplog.at_level(logging.ERROR, logger="paramiko"):
            res = run_sftp(proxy.port, keyfile, ident, "ls\n", timeout=60,
                           extra_args=("-c", "aes128-gcm@openssh.com",
                                       "-o", f"HostKeyAlias=[127.0.0.1]:{tunnel.server_port}"))
        assert proxy.flipped.is_set()
        assert res.returncode != 0
        assert "no matching cipher" not in res.stderr  # AES-GCM was agreed, the flipped bit broke it
        # paramiko's transport ended on the tag check: our backport says "Mismatched MAC" as
        # paramiko does for a MAC; paramiko's own AES-GCM lets cryptography's InvalidTag through
        said = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("paramiko.transport"))
        assert ("InvalidTag" if HAS_GCM else "Mismatched MAC") in said
    finally:
        proxy.close()
    _put_get(peer, export_dir, tmp_path, 100_000)
