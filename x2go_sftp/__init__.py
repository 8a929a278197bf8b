"""x2go-sftp: share local folders with an X2Go session over sshfs, safely and fast.

A drop-in replacement for python-x2go's ``x2go.sftpserver``.  The public
names are re-exported here; see :mod:`x2go_sftp.sftpserver` for the tunnel.
"""

import logging

from .exports import Export, Exports
from .log import X2GoLogger
from .rforward import (
    X2GoRevFwChannelThread,
    X2GoRevFwTunnel,
    x2go_rev_forward_channel_handler,
    x2go_transport_tcp_handler,
)
from .sftpserver import (
    X2GoRevFwSFTPChannelThread,
    X2GoRevFwTunnelToSFTP,
    x2go_rev_forward_sftpchannel_handler,
)

__version__ = "0.1.0"

# A library adds no output of its own: without this, Python's last-resort
# handler would print our warnings to stderr when the application configured
# no logging.  Applications attach handlers to "x2go_sftp" as usual.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Export",
    "Exports",
    "X2GoLogger",
    "X2GoRevFwChannelThread",
    "X2GoRevFwSFTPChannelThread",
    "X2GoRevFwTunnel",
    "X2GoRevFwTunnelToSFTP",
    "__version__",
    "x2go_rev_forward_channel_handler",
    "x2go_rev_forward_sftpchannel_handler",
    "x2go_transport_tcp_handler",
]
