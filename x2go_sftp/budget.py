"""One budget of file descriptors for the open SFTP handles of the whole process.

OpenSSH runs one ``sftp-server`` process per session, so each session meets
its own ``RLIMIT_NOFILE``; when it runs out, ``open()`` fails with EMFILE and
the client gets a failure.  All our sessions, of every tunnel, share
python-x2go's one process and its one descriptor table: a per-session cap
alone (``engine.MAX_OPEN_HANDLES``) lets a few sessions take every descriptor
the process has, and then python-x2go itself (its SSH sockets, sound and
printing forwards, log files, the GUI) fails in unrelated places.

So every descriptor an open handle holds is taken from this one budget before
the handle opens it, and given back when the handle closes (CLOSE, session
end, or a failure half-way through opening).  A handle holds one descriptor
for a file and two for a directory (the directory and the ``scandir`` stream's
own duplicate).  When the budget is spent the request fails with
"Too many open files in this process" and nothing else is touched.
"""

from __future__ import annotations

import errno
import resource
import threading

# Share of RLIMIT_NOFILE (the soft limit, the one open() meets) that open SFTP
# handles may hold.  OpenSSH's sftp-server reports its own limit as
# RLIMIT_NOFILE - 5 ("stdio(3) + syslog + spare", process_extended_limits),
# because it is alone in its process.  We are not: the other half stays for
# python-x2go and its GUI (a PyHoca session holds a few dozen descriptors:
# SSH sockets, forwards, X connection, fonts, logs), for the jail's walks
# (at most jail.WALK_MAX_FDS + 1 at a time per running request) and for the
# inner SSH transports.  With the usual desktop limit of 1024 that is 512
# descriptors for handles: 512 open files, or 256 listings in progress.
HANDLE_FD_SHARE = 0.5

# Bounds of the default: a tiny RLIMIT_NOFILE still allows a working mount
# (sshfs keeps a handful of handles open), and an unlimited or huge one does
# not let clients pin hundreds of thousands of descriptors (and the kernel
# memory behind them).  OpenSSH's sftp-server has no ceiling (it is alone in
# its process and reports RLIMIT_NOFILE - 5 in limits@openssh.com); 64 Ki is
# ours: far above what a mount uses, far below the kernel's nr_open.
MIN_HANDLE_FDS = 64
MAX_HANDLE_FDS = 65536

# The message clients see, as strerror(EMFILE) says it, naming whose limit it is.
EXHAUSTED_MESSAGE = "Too many open files in this process"


def default_limit() -> int:
    """The default budget: :data:`HANDLE_FD_SHARE` of the soft ``RLIMIT_NOFILE``, within bounds."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = MAX_HANDLE_FDS * 2
    return max(MIN_HANDLE_FDS, min(MAX_HANDLE_FDS, int(soft * HANDLE_FD_SHARE)))


class BudgetExhausted(OSError):
    """No descriptor left in the process-wide handle budget (EMFILE)."""

    def __init__(self) -> None:
        super().__init__(errno.EMFILE, EXHAUSTED_MESSAGE)


class FdBudget:
    """A counter of descriptors held by open handles, with a limit; thread-safe.

    Args:
        limit: descriptors that may be held at once (default: :func:`default_limit`).
    """

    def __init__(self, limit: int | None = None):
        self._lock = threading.Lock()
        self._limit = default_limit() if limit is None else limit
        self._held = 0

    @property
    def limit(self) -> int:
        """Descriptors that may be held at once."""
        return self._limit

    @property
    def held(self) -> int:
        """Descriptors held now."""
        return self._held

    def set_limit(self, limit: int | None) -> int:
        """Change the limit (None: back to the default); returns the old one.

        Lowering it below what is held refuses new handles until enough close;
        nothing already open is touched.
        """
        with self._lock:
            old, self._limit = self._limit, default_limit() if limit is None else limit
            return old

    def take(self, n: int) -> None:
        """Take ``n`` descriptors.

        Raises:
            BudgetExhausted: if fewer than ``n`` are left.
        """
        with self._lock:
            if self._held + n > self._limit:
                raise BudgetExhausted()
            self._held += n

    def give(self, n: int) -> None:
        """Give back ``n`` descriptors taken with :meth:`take`."""
        with self._lock:
            self._held = max(0, self._held - n)


#: The process's one budget; the backend's handles take from it.
handle_fds = FdBudget()
