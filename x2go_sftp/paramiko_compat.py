"""The one module that touches paramiko's private names.

Every access to a name paramiko does not document (packetizer fields,
``Transport._channels``, ``_expected_packet``, ``BufferedPipe`` internals, ...)
lives here, next to the paramiko releases it was checked on.  The rest of the
package asks this module; nothing else imports or reads a private name.  A new
paramiko release then means reading this one file.

Each optimisation asks :func:`probe` (done once per transport) whether it may
run; on a release outside :data:`CHECKED_RELEASES`, or when a name is missing,
the answer is no, the plain paramiko path is used, and one INFO line says why.
"""

from __future__ import annotations

from typing import Any

import paramiko

# (work in progress: the sections below are filled in by the issue-11 work)


def open_channel_count(transport: Any) -> int:
    """Channels currently open on ``transport`` (paramiko's ``_channels`` map; 2.12 .. 5.x).

    Returns 0 when the map is missing (an unknown release): callers treat that
    as "no channels", so a limit based on it never refuses wrongly.
    """
    channels = getattr(transport, "_channels", None)
    try:
        return len(channels.values()) if channels is not None else 0
    except Exception:
        return 0


__all__ = ["open_channel_count", "paramiko"]
