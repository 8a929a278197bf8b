"""install() / uninstall() against the real python-x2go, without a server.

Runs under a Python that has python-x2go (see driver.py).  argv[1] is the
repository path.  Prints one ``@@x2go-driver {json}`` line with what it saw;
the test asserts on it.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

MARK = "@@x2go-driver "


def main() -> int:
    sys.path.insert(0, sys.argv[1])
    import paramiko
    import x2go  # python-x2go's own gevent patching, as in PyHoca
    import x2go.backends.control.plain  # applies python-x2go's paramiko patches
    import x2go.backends.terminal.plain as terminal_plain
    import x2go.defaults
    import x2go.rforward
    import x2go.sftpserver

    import x2go_sftp.integrate as integrate

    stock_tunnel = x2go.sftpserver.X2GoRevFwTunnelToSFTP
    stock_key = x2go.defaults.RSAHostKey
    stock_handler = x2go.rforward.x2go_transport_tcp_handler
    stock_share = terminal_plain.X2GoTerminalSession.share_local_folder
    stock_write = paramiko.PKey._write_private_key

    def key_text() -> Any:
        """What share_local_folder() does with the session key: write_private_key into BytesIO."""
        buf = io.BytesIO()
        try:
            paramiko.RSAKey.generate(1024).write_private_key(buf)
        except Exception as e:  # we report what python-x2go would hit
            return f"{type(e).__name__}: {e}"
        return buf.getvalue().decode().splitlines()[0]

    before = key_text()
    first = integrate.install()
    second = integrate.install()
    installed = {
        "tunnel": x2go.sftpserver.X2GoRevFwTunnelToSFTP is integrate.X2GoIntegratedTunnel,
        "handler_replaced": x2go.rforward.x2go_transport_tcp_handler is not stock_handler,
        "share_wrapped": terminal_plain.X2GoTerminalSession.share_local_folder is not stock_share,
        "key_bits": x2go.defaults.RSAHostKey.get_bits(),
        "write_replaced": paramiko.PKey._write_private_key is not stock_write,
        "key_text": key_text(),
        "installed": integrate.installed(),
    }
    undone = integrate.uninstall()
    again = integrate.uninstall()
    restored = {
        "tunnel": x2go.sftpserver.X2GoRevFwTunnelToSFTP is stock_tunnel,
        "key": x2go.defaults.RSAHostKey is stock_key,
        "handler": x2go.rforward.x2go_transport_tcp_handler is stock_handler,
        "share": terminal_plain.X2GoTerminalSession.share_local_folder is stock_share,
        "write": paramiko.PKey._write_private_key is stock_write,
        "installed": integrate.installed(),
    }
    report = {
        "paramiko": paramiko.__version__, "before": before, "first": first, "second": second,
        "installed": installed, "undone": undone, "again": again, "restored": restored,
    }
    sys.stdout.write(MARK + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
