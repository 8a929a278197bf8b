"""Process-wide defaults: the local user name, the client OS, the default host key.

Nothing expensive happens at import: the host key is generated on first use.
"""

from __future__ import annotations

import getpass
import os
import platform
import sys
import threading
from typing import Any

import paramiko

X2GOCLIENT_OS = platform.system()

# NIST SP 800-57 / BSI TR-02102 recommend >= 3000-bit RSA beyond 2023; the
# original used a 1024-bit key, which OpenSSH itself refuses since 8.x.
HOST_KEY_BITS = 3072

# What turns one of the X2GO_SFTP_* switches off (any case, spaces ignored).
OPT_OUT_VALUES = frozenset({"0", "no", "off", "false"})

_host_key: paramiko.PKey | None = None
_host_key_lock = threading.Lock()


def gevent_patched(module: str = "threading") -> bool:
    """True if gevent's monkey patching has made ``module`` cooperative (no import of gevent)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched(module))


# native_lock() gives the operating system's lock under gevent too; off only to measure what it buys.
NATIVE_LOCKS = True


def native_lock() -> Any:
    """A lock of the operating system's, even where gevent has patched ``threading``.

    Only for critical sections that never block, wait or switch greenlets
    (a few list and counter updates, setting an ``Event``): there it is
    correct under greenlets and threads alike, as no other greenlet can run
    while it is held.  Under gevent's monkey patching ``threading.Lock()`` is
    gevent's, whose ``acquire`` is a Python function: ``with lock: pass``
    took 0.67 us against 0.24 us for this one (``timeit``, Python 3.11, the
    machine of notebook round 17), and the hot paths take such locks several
    times per request.  Without gevent's patching this is ``threading.Lock()``.
    """
    if NATIVE_LOCKS and gevent_patched("threading"):
        return sys.modules["gevent.monkey"].get_original("_thread", "allocate_lock")()
    return threading.Lock()


def opted_out(env: str) -> bool:
    """True if the environment variable ``env`` says ``0``, ``no``, ``off`` or ``false``."""
    return os.environ.get(env, "").strip().lower() in OPT_OUT_VALUES


def current_local_user() -> str:
    """The user name sshfs must log in as (python-x2go's ``CURRENT_LOCAL_USER``)."""
    return getpass.getuser()


def default_host_key() -> paramiko.PKey:
    """One RSA host key of :data:`HOST_KEY_BITS` bits per process, created on first use."""
    global _host_key
    with _host_key_lock:
        if _host_key is None:
            _host_key = paramiko.RSAKey.generate(HOST_KEY_BITS)
        return _host_key


def set_default_host_key(key: paramiko.PKey | None) -> None:
    """Replace the process-wide default host key (None: generate a new one on next use)."""
    global _host_key
    with _host_key_lock:
        _host_key = key
