"""Smoke: the whole X2Go byte path with real sshd, sftp and sshfs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.realpeers import run_sftp, write_key_files


def test_sshfs_mount_through_real_sshd(real_sshd, session_key, host_key, tmp_path, export_dir, sshfs_mount):
    from x2go_sftp import X2GoRevFwTunnelToSFTP

    outer = real_sshd.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[export_dir], host_key=host_key)
    tunnel.start()
    try:
        assert tunnel.wait_ready(30) and tunnel.forwarding
        keyfile, ident = write_key_files(tmp_path, session_key, host_key, tunnel.server_port)
        res = run_sftp(tunnel.server_port, keyfile, ident, f"ls -l {export_dir}\n")
        assert res.returncode == 0, res.stderr
        assert "hello.txt" in res.stdout
        mnt = sshfs_mount(tunnel.server_port, keyfile, ident, export_dir)
        payload = os.urandom(3 * 1024 * 1024 + 17)
        (mnt / "big.bin").write_bytes(payload)
        local = Path(export_dir, "big.bin").read_bytes()
        assert hashlib.sha256(local).digest() == hashlib.sha256(payload).digest()
        assert (mnt / "hello.txt").read_text() == "hello\n"
    finally:
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()


def test_openssh_client_receives_server_sig_algs(real_sshd, session_key, host_key, tmp_path, export_dir):
    """OpenSSH >= 9.2 sends kex-strict after ext-info-c; paramiko < 3.3 then never sent
    server-sig-algs and OpenSSH refused to sign with RSA ("no mutual signature supported").
    Under paramiko 2.12 this test fails without InnerTransport's fix."""
    from x2go_sftp import X2GoRevFwTunnelToSFTP

    outer = real_sshd.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[export_dir], host_key=host_key)
    tunnel.start()
    try:
        assert tunnel.wait_ready(30)
        keyfile, ident = write_key_files(tmp_path, session_key, host_key, tunnel.server_port)
        res = run_sftp(tunnel.server_port, keyfile, ident, "pwd\n", timeout=60, extra_args=("-vvv",))
        assert res.returncode == 0, res.stderr[-2000:]
        sig_algs = [line for line in res.stderr.splitlines() if "server-sig-algs" in line]
        assert sig_algs and "rsa-sha2-256" in sig_algs[0], res.stderr[-2000:]
        assert f"Remote working directory: {export_dir}" in res.stdout
    finally:
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()
