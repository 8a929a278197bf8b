"""X2Go-style logging (``x2go.log`` compatible) on top of stdlib :mod:`logging`.

python-x2go passes an ``X2GoLogger`` instance around and calls it as
``logger(msg, loglevel=loglevel_DEBUG)``.  We keep that calling convention and
the level constants bit for bit, but every message that passes the X2Go level
mask is handed to a stdlib logger under ``x2go_sftp.*``, so applications
configure output the usual way.  Nothing is printed unless the caller sets a
``destination`` stream, as the original did with ``sys.stderr``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

loglevel_NONE = 0
loglevel_ERROR = 8
loglevel_WARN = 16
loglevel_NOTICE = 32
loglevel_INFO = 64
loglevel_DEBUG = 128
loglevel_DEBUG_SFTPXFER = 1024

loglevel_DEFAULT = loglevel_ERROR | loglevel_WARN | loglevel_NOTICE
"""Default: NOTICE | WARN | ERROR (56), as in python-x2go."""

# Below logging.DEBUG: per-request SFTP traces are noisier than any debug output.
SFTPXFER = 5

_STDLIB_LEVEL = {
    loglevel_ERROR: logging.ERROR,
    loglevel_WARN: logging.WARNING,
    loglevel_NOTICE: logging.INFO,
    loglevel_INFO: logging.INFO,
    loglevel_DEBUG: logging.DEBUG,
    loglevel_DEBUG_SFTPXFER: SFTPXFER,
}

_NAMES = {
    loglevel_ERROR: "error",
    loglevel_WARN: "warn",
    loglevel_NOTICE: "notice",
    loglevel_INFO: "info",
    loglevel_DEBUG: "debug",
    loglevel_DEBUG_SFTPXFER: "debug-sftpxfer",
}


class LoggerLike(Protocol):
    """Anything python-x2go would accept as a logger: ``logger(msg, loglevel=...)``."""

    def __call__(self, msg: str, loglevel: int = ...) -> Any: ...


def stdlib_level(loglevel: int) -> int:
    """Map an X2Go log level bit to a stdlib logging level."""
    return _STDLIB_LEVEL.get(loglevel, logging.INFO)


class X2GoLogger:
    """A python-x2go compatible logger that writes through stdlib logging.

    Args:
        name: program name shown in ``destination`` lines (default: ``sys.argv[0]``).
        loglevel: bit mask of the ``loglevel_*`` constants that pass.
        tag: default tag; it also names the stdlib logger (``x2go_sftp.<tag>``).
    """

    _loglevel_NAMES = _NAMES

    def __init__(
        self,
        name: str | None = None,
        loglevel: int = loglevel_DEFAULT,
        tag: str | None = None,
    ) -> None:
        self.name = os.path.basename(name if name is not None else (sys.argv[0] or "python"))
        self.tag = tag
        self.loglevel = loglevel
        self.progpid = os.getpid()
        self.destination: IO[str] | None = None

    def message(self, msg: str, loglevel: int = loglevel_NONE, tag: str | None = None) -> None:
        """Log ``msg`` if ``loglevel`` is in this logger's mask."""
        if not loglevel & self.loglevel:
            return
        tag = self.tag if tag is None else tag
        logger = logging.getLogger(f"x2go_sftp.{tag}" if tag else "x2go_sftp")
        level = stdlib_level(loglevel)
        if logger.isEnabledFor(level):
            logger.log(level, "%s", msg)
        if self.destination is not None:
            label = _NAMES.get(loglevel, "log").upper()
            text = str(msg).replace("\n", " ")
            prefix = f"{self.name}[{self.progpid}]"
            line = f"{prefix} ({tag}) {label}: {text}\n" if tag else f"{prefix} {label}: {text}\n"
            self.destination.write(line)

    __call__ = message

    def get_loglevel(self) -> int:
        """Return the current level mask."""
        return self.loglevel

    def set_loglevel(self, loglevel_name: int | str = "none") -> None:
        """Set the mask, from an int or a name (``quiet``, ``error`` ... ``debug``)."""
        if isinstance(loglevel_name, int):
            self.loglevel = loglevel_name
            return
        setter = getattr(self, f"set_loglevel_{loglevel_name}", None)
        if setter is None:
            self.loglevel = loglevel_DEFAULT
        else:
            setter()

    def set_loglevel_quiet(self) -> None:
        self.loglevel = loglevel_NONE

    set_loglevel_none = set_loglevel_quiet

    def set_loglevel_error(self) -> None:
        self.loglevel = loglevel_ERROR

    def set_loglevel_warn(self) -> None:
        self.loglevel = loglevel_ERROR | loglevel_WARN

    def set_loglevel_notice(self) -> None:
        self.loglevel = loglevel_ERROR | loglevel_WARN | loglevel_NOTICE

    def set_loglevel_info(self) -> None:
        self.loglevel = loglevel_ERROR | loglevel_WARN | loglevel_NOTICE | loglevel_INFO

    def set_loglevel_debug(self) -> None:
        self.loglevel = loglevel_ERROR | loglevel_WARN | loglevel_NOTICE | loglevel_INFO | loglevel_DEBUG

    def enable_debug_sftpxfer(self) -> None:
        self.loglevel |= loglevel_DEBUG_SFTPXFER

    def disable_debug_sftpxfer(self) -> None:
        self.loglevel &= ~loglevel_DEBUG_SFTPXFER


class TaggedLogger:
    """Wraps a caller's logger with our tag, without copying or mutating it.

    The original deep-copied the caller's logger per object just to set a tag;
    we wrap instead.  A foreign logger (python-x2go's own ``X2GoLogger`` or any
    callable) is called as ``logger(msg, loglevel=...)`` and the message is also
    sent to stdlib logging; our own ``X2GoLogger`` already does the latter.
    """

    def __init__(self, logger: LoggerLike | None, tag: str, loglevel: int = loglevel_DEFAULT):
        self.tag = tag
        self.wrapped: LoggerLike = logger if logger is not None else X2GoLogger(loglevel=loglevel)
        self._stdlib = logging.getLogger(f"x2go_sftp.{tag}")

    def __call__(self, msg: str, loglevel: int = loglevel_NONE) -> None:
        wrapped = self.wrapped
        if isinstance(wrapped, X2GoLogger):
            wrapped.message(msg, loglevel=loglevel, tag=self.tag)
            return
        if isinstance(wrapped, TaggedLogger):
            wrapped(msg, loglevel=loglevel)
            return
        level = stdlib_level(loglevel)
        if self._stdlib.isEnabledFor(level):
            self._stdlib.log(level, "%s", msg)
        try:
            wrapped(msg, loglevel=loglevel)
        except Exception:  # a broken foreign logger must not break the tunnel
            self._stdlib.exception("caller's logger failed")

    def get_loglevel(self) -> int:
        getter: Callable[[], int] | None = getattr(self.wrapped, "get_loglevel", None)
        return getter() if getter is not None else loglevel_DEFAULT

    def enabled(self, loglevel: int) -> bool:
        """True if a message at ``loglevel`` would be emitted (to skip costly formatting).

        Our own loggers emit only what passes their mask.  A foreign logger with
        python-x2go's ``get_loglevel()`` is asked for its mask; since its
        messages also go to stdlib logging, that counts too.  A bare callable
        may want everything.
        """
        wrapped = self.wrapped
        if isinstance(wrapped, (X2GoLogger, TaggedLogger)):
            return bool(self.get_loglevel() & loglevel)
        getter = getattr(wrapped, "get_loglevel", None)
        if getter is None:
            return True
        try:
            mask = int(getter())
        except Exception:
            return True
        return bool(mask & loglevel) or self._stdlib.isEnabledFor(stdlib_level(loglevel))


def tagged(logger: LoggerLike | None, tag: str, loglevel: int = loglevel_DEFAULT) -> TaggedLogger:
    """Return ``logger`` wrapped with ``tag``; a fresh ``X2GoLogger`` if None."""
    if isinstance(logger, TaggedLogger):
        return TaggedLogger(logger.wrapped, tag, loglevel)
    return TaggedLogger(logger, tag, loglevel)


# Rate limits for lines a remote peer can provoke (bad packets, backend errors).
# The burst is the Linux kernel's printk_ratelimit() (DEFAULT_RATELIMIT_BURST
# 10); the window is longer than the kernel's 5 s because one client can repeat
# a bad request forever.  sshd does the same for its own flood: it logs
# "beginning MaxStartups throttling" once, not each dropped connection.
LOG_BURST = 10
LOG_INTERVAL = 60.0


class RateLimiter:
    """At most ``burst`` events per ``interval`` seconds; counts the ones it refuses.

    A fixed window, thread-safe (and gevent-safe: the lock is held for a few
    operations, never across I/O).  Share one instance among everything that
    logs the same kind of event, so many sessions cannot multiply the budget.

    Args:
        burst: events allowed per window.
        interval: the window, in seconds of ``time.monotonic()``.
    """

    def __init__(self, burst: int = LOG_BURST, interval: float = LOG_INTERVAL):
        self.burst = burst
        self.interval = interval
        self._lock = threading.Lock()
        self._window_start = -interval  # the first event opens a window
        self._count = 0
        self._suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """Ask for one event.

        Returns:
            ``(allowed, suppressed)``: whether to emit it, and how many events
            were refused since the last allowed one (to report with it).
        """
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.interval:
                self._window_start = now
                self._count = 0
            if self._count >= self.burst:
                self._suppressed += 1
                return False, 0
            self._count += 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed


def limited(logger: LoggerLike, limiter: RateLimiter, msg: str, loglevel: int) -> bool:
    """Log ``msg`` through ``logger`` if ``limiter`` allows; True if it was logged.

    The first line after a quiet spell says how many similar lines were
    dropped, so nothing is lost silently.
    """
    allowed, suppressed = limiter.allow()
    if not allowed:
        return False
    if suppressed:
        msg = f"{msg} ({suppressed} similar messages suppressed)"
    logger(msg, loglevel=loglevel)
    return True
