"""Smoke: the whole X2Go byte path with real sshd, sftp and sshfs."""

from __future__ import annotations

import hashlib
import os

from tests.realpeers import run_sftp, write_key_files


def test_sshfs_mount_through_real_sshd(real_sshd, session_key, host_key, tmp_path, export_dir,
                                       sshfs_mount):
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
        local = open(os.path.join(export_dir, "big.bin"), "rb").read()
        assert hashlib.sha256(local).digest() == hashlib.sha256(payload).digest()
        assert (mnt / "hello.txt").read_text() == "hello\n"
    finally:
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()
