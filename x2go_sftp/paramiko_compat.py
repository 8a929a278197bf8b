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


def cancel_handshake_timer(transport: Any) -> None:
    """End the timer thread paramiko starts for a transport's first packet (2.12 .. 5.x).

    paramiko's ``Packetizer.start_handshake`` starts a ``threading.Timer`` once
    the peer's banner is in, and cancels it only when a packet has been
    handled: a peer that sends a banner and disconnects leaves a thread behind
    for the whole ``handshake_timeout``.  Call after the transport's thread has
    ended; does nothing where the packetizer lacks the method.
    """
    complete = getattr(getattr(transport, "packetizer", None), "complete_handshake", None)
    if complete is not None:
        try:
            complete()
        except Exception:
            pass


# -- paramiko 2.x: asbytes() formats the repr of every packet it sends ----------------
#
# paramiko 2.x's ``common.asbytes(s)`` first tries ``py3compat.b(s)``, which, for
# anything that is neither bytes nor str, raises
# ``TypeError("Expected unicode or bytes, got {!r}".format(s))`` and only then
# falls back to ``s.asbytes()``.  ``Packetizer.send_message`` hands every
# outgoing packet to it as a ``Message``, so each packet formats the repr of its
# whole payload (32 KiB for a data packet) and throws it away: 66 % of the
# process's CPU while sshfs reads under paramiko 2.12.  paramiko 3.0 made b()
# name only the type; 3.x and later need nothing.
#
# :func:`fix_asbytes` probes the behaviour (not the version string): it calls the
# function paramiko binds as ``asbytes`` with a probe ``Message`` and applies the
# fix only if that formats the probe's repr and otherwise behaves exactly as
# 2.x's does.  It then binds :func:`asbytes_without_repr` wherever paramiko's
# modules bound the original by name (2.12: common, packet, message, sftp,
# agent): process-wide, so python-x2go's own connection gets faster as well.
# The result is the same object for every input; only the discarded repr is
# gone.  Opt out with the environment variable ``X2GO_SFTP_ASBYTES_FIX=0``
# (read at each call, so set it before the first tunnel); undo with
# :func:`restore_asbytes`.  Checked on: 2.12 (applied), 3.5 and 5.1 (nothing to do).

import os  # noqa: E402  (this section's own imports, kept beside it)
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402

from . import log  # noqa: E402

ASBYTES_FIX_ENV = "X2GO_SFTP_ASBYTES_FIX"
"""Environment variable: ``0``, ``no``, ``off`` or ``false`` keeps paramiko's own ``asbytes``."""

_ASBYTES_FIX_OFF = frozenset({"0", "no", "off", "false"})
_ASBYTES_LOG_TAG = "paramiko-compat"
_asbytes_lock = threading.Lock()
# paramiko's own function while the fix is applied, else None.
_asbytes_original: Callable[[Any], Any] | None = None


def asbytes_without_repr(s: Any) -> Any:
    """paramiko 2.x's ``common.asbytes`` without the discarded repr: the same result for every input.

    2.x's ``b()`` returns bytes as they are and encodes str as UTF-8; for
    anything else it raises TypeError (after formatting the repr), and
    ``asbytes`` returns ``s.asbytes()``, or ``s`` itself when that raises
    AttributeError.  The one difference: an object whose ``__repr__`` raises
    no longer propagates that error.
    """
    if isinstance(s, bytes):
        return s
    if isinstance(s, str):
        return s.encode("utf8")
    try:
        return s.asbytes()
    except AttributeError:
        return s


class _ReprProbe(paramiko.Message):
    """A Message that counts how often its repr is formatted."""

    def __init__(self) -> None:
        super().__init__()
        self.add_string(b"probe")
        self.reprs = 0

    def __repr__(self) -> str:
        self.reprs += 1
        return "_ReprProbe()"


class _WithAsbytes:
    def asbytes(self) -> bytes:
        return b"with-asbytes"


def paramiko_asbytes() -> Callable[[Any], Any] | None:
    """paramiko's own ``asbytes``: from ``common`` (2.x) or ``util`` (3.x and later), even while fixed."""
    if _asbytes_original is not None:
        return _asbytes_original
    for module in (getattr(paramiko, "common", None), getattr(paramiko, "util", None)):
        func = getattr(module, "asbytes", None)
        if callable(func):
            return func
    return None


def asbytes_formats_repr(func: Callable[[Any], Any]) -> bool:
    """Probe: does ``func(message)`` format the message's repr?"""
    probe = _ReprProbe()
    try:
        func(probe)
    except Exception:
        return False
    return probe.reprs > 0


def _behaves_as_2x(func: Callable[[Any], Any]) -> bool:
    """Probe: ``func`` returns what :func:`asbytes_without_repr` returns for each kind of input."""
    message, other, text = _ReprProbe(), object(), "pr\u00f6be"
    try:
        return (
            func(b"probe") == b"probe"
            and func(text) == text.encode("utf8")
            and func(message) == message.asbytes()
            and func(_WithAsbytes()) == b"with-asbytes"
            and func(other) is other
        )
    except Exception:
        return False


def _paramiko_modules() -> list[Any]:
    return [
        m
        for name, m in list(sys.modules.items())
        if m is not None and (name == "paramiko" or name.startswith("paramiko."))
    ]


def asbytes_fix_applied() -> bool:
    """True while :func:`fix_asbytes` is in effect."""
    return _asbytes_original is not None


def fix_asbytes(logger: log.LoggerLike | None = None) -> bool:
    """Stop paramiko 2.x formatting the repr of every packet it sends (process-wide, idempotent).

    Does nothing where paramiko's ``asbytes`` formats no repr (3.0 and later),
    where it does not behave exactly as 2.x's (an unknown release, or someone
    else's wrapper), or when ``X2GO_SFTP_ASBYTES_FIX`` is ``0``/``no``/``off``/``false``.

    Args:
        logger: where the one INFO line goes when the fix is applied.

    Returns:
        True if the fix is in effect after the call.
    """
    global _asbytes_original
    if os.environ.get(ASBYTES_FIX_ENV, "").strip().lower() in _ASBYTES_FIX_OFF:
        return asbytes_fix_applied()
    with _asbytes_lock:
        if _asbytes_original is not None:
            return True
        original = paramiko_asbytes()
        if original is None or not asbytes_formats_repr(original) or not _behaves_as_2x(original):
            return False
        bound = []
        for module in _paramiko_modules():
            if getattr(module, "asbytes", None) is original:
                module.asbytes = asbytes_without_repr
                bound.append(module.__name__)
        _asbytes_original = original
    log.tagged(logger, _ASBYTES_LOG_TAG)(
        f"paramiko {getattr(paramiko, '__version__', '?')}: asbytes() formatted the repr of every packet "
        f"sent; now bound without it in {', '.join(sorted(bound))} (opt out: {ASBYTES_FIX_ENV}=0)",
        loglevel=log.loglevel_INFO,
    )
    return True


def restore_asbytes() -> bool:
    """Undo :func:`fix_asbytes`: paramiko's own ``asbytes`` again, in every module bound to the fix.

    A tunnel made later applies the fix again unless ``X2GO_SFTP_ASBYTES_FIX=0``.

    Returns:
        True if something was undone.
    """
    global _asbytes_original
    with _asbytes_lock:
        original = _asbytes_original
        if original is None:
            return False
        # Modules imported after the fix bound it too: look at every one.
        for module in _paramiko_modules():
            if getattr(module, "asbytes", None) is asbytes_without_repr:
                module.asbytes = original
        _asbytes_original = None
    return True
