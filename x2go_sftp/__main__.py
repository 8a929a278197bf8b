"""Command line: ``python -m x2go_sftp`` (``share``, ``demo``: see :mod:`x2go_sftp.cli`); the demo.

The demo plays both ends of an X2Go folder share in one process: a loopback
stand-in for the X2Go server's sshd, python-x2go's outer SSH connection to it,
our tunnel exporting a temporary folder, and an SFTP client (standing in for
the server's sshfs) that lists the folder, writes a file and reads it back.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time

import paramiko

from . import __version__
from .defaults import current_local_user
from .sftpserver import X2GoRevFwTunnelToSFTP
from .testing import LoopbackX2GoServer, sftp_client


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def demo(size: int) -> int:
    """Run the demo; returns the process exit code."""
    with tempfile.TemporaryDirectory(prefix="x2go-sftp-demo-") as folder:
        with open(os.path.join(folder, "welcome.txt"), "w") as f:
            f.write("shared from the X2Go client\n")
        os.mkdir(os.path.join(folder, "Documents"))

        t0 = time.monotonic()
        session_key = paramiko.RSAKey.generate(2048)  # python-x2go makes one per session
        with LoopbackX2GoServer() as x2go_server:
            outer = x2go_server.connect()
            tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[folder])
            tunnel.start()
            tunnel.wait_ready(30)
            _say(f"x2go-sftp {__version__}: exporting {folder}")
            _say(
                f"reverse forward granted on 127.0.0.1:{tunnel.server_port} "
                f"(set up in {time.monotonic() - t0:.2f} s)"
            )
            try:
                transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
                with transport, sftp:
                    _say(f"\n$ ls -l {folder}")
                    for attr in sorted(sftp.listdir_attr(folder), key=lambda a: a.filename):
                        _say(f"  {attr}")
                    payload = os.urandom(size)
                    digest = hashlib.sha256(payload).hexdigest()
                    target = folder + "/upload.bin"
                    t1 = time.monotonic()
                    with sftp.open(target, "wb") as f:
                        f.set_pipelined(True)
                        f.write(payload)
                    t2 = time.monotonic()
                    with sftp.open(target, "rb") as f:
                        f.prefetch(size)  # pipelined reads, as sshfs does
                        back = f.read()
                    t3 = time.monotonic()
                    back_digest = hashlib.sha256(back).hexdigest()
                    _say(f"\nwrote {size} bytes in {t2 - t1:.3f} s, read back in {t3 - t2:.3f} s")
                    _say(f"sha256 sent     {digest}")
                    _say(f"sha256 received {back_digest}")
                    with open(target, "rb") as local:
                        on_disk = hashlib.sha256(local.read()).hexdigest()
                    _say(f"sha256 on disk  {on_disk}")
                    try:
                        sftp.listdir("/etc")
                        escaped = True
                    except PermissionError:
                        escaped = False
                    _say(
                        f"\n$ ls /etc  -> {'LISTED (jail broken!)' if escaped else 'Permission denied (outside the export)'}"
                    )
                    ok = digest == back_digest == on_disk and not escaped
            finally:
                tunnel.stop_thread()
                tunnel.join(10)
                outer.close()
    _say("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m x2go_sftp``: the ``x2go-sftp`` command (see :mod:`x2go_sftp.cli`)."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
