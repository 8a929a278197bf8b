"""Closing the descriptors the jail, the exports and the backend own: at once, also under gevent.

gevent 25.8.1 and later replace ``os.close`` in ``monkey.patch_all()``.
For a descriptor that is not a regular file (a directory, an ``O_PATH``
descriptor), once gevent's hub exists, ``close()`` is deferred to the event
loop's next turn, so that a descriptor its loop watches is never closed under
it.  An SFTP session answering requests already in its channel's buffer does
not return to the loop between them, and the jail's walk opens and closes a
directory descriptor per path component.  So, measured on gevent 26.9 with
python-x2go's setup (``tests/test_jail_gevent.py``): 2,000 LSTATs of a path
20 directories deep, sent at once by the holder of the session key, kept the
walks' descriptors open until the process reached its limit (20,000 here;
1,024 is the usual default), 949 of the LSTATs failed, and anything else in
python-x2go's process that needed a descriptor meanwhile failed too.  The
bounds of :mod:`jail` (``WALK_MAX_FDS``) and :mod:`budget` count descriptors
as closed when they are closed; with the deferral they were not.

The descriptors closed here are never watched by any event loop: directories,
``O_PATH`` descriptors and regular files that this library opened itself.
So :func:`close` is the interpreter's own ``close`` from the ``posix``
(``nt``) module, which monkey patching leaves alone, whatever the order of
imports and patching.  Sockets and pipes are closed as usual elsewhere.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

close: Callable[[int], None] = getattr(importlib.import_module(os.name), "close", os.close)
"""Close a descriptor this library opened, now (never one an event loop may watch)."""
