"""The inner SSH server's policy: who may log in, how often, and what they may open.

Exactly one key (the X2Go session key) for exactly one user name, by public
key only; only ``session`` channels and only the ``sftp`` subsystem.

The forwarded port listens on the X2Go server's loopback, so every local user
of that (multi-user) machine can connect to it without any key.  The limits
here bound what such a peer can make us hold before it logs in, and what a
key holder can hold after; each follows the OpenSSH setting named beside it.
"""

from __future__ import annotations

import hmac
import threading
import time

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_RESOURCE_SHORTAGE,
    OPEN_SUCCEEDED,
)

from . import log
from .paramiko_compat import open_channel_count

# Failed authentication requests per connection before it is closed (OpenSSH
# MaxAuthTries 6, counted as OpenSSH does: every failed request except a first
# "none", which clients send only to learn the methods).  paramiko's own limit
# is 10.
MAX_AUTH_TRIES = 6

# Session channels open at once on one connection.  sshfs and sftp use one;
# the second is headroom for a client that opens its next session before our
# close of the previous one has reached it.  OpenSSH's MaxSessions is 10, but
# there each session is its own process; here each is a thread and a share of
# the process's descriptors.
MAX_SESSIONS = 2

# Connections per tunnel that have not yet logged in (OpenSSH MaxStartups
# 10:30:100, whose first figure is where refusals begin).  Beyond it a new
# connection is closed at once, before any thread or key exchange is spent on
# it.  We refuse outright instead of OpenSSH's random early drop: the only
# legitimate clients are a handful of sshfs processes that retry.
MAX_STARTUPS = 10

# Logged-in connections per tunnel.  X2Go opens one sshfs connection per
# shared folder, one for the print spool and one for the MIME box; 32 leaves
# room for 30 shared folders.  OpenSSH has no such limit of its own (each
# connection is a process, bounded by the user's process limit); we bound it
# because each connection here is threads and descriptors of the one client
# process.
MAX_CONNECTIONS = 32

# While connections keep being refused, the refusals are one burst: one line
# when it starts, one reminder per interval while it lasts, and the count once
# it has been quiet this long.
REFUSAL_LOG_INTERVAL = 60.0


class LoginGate:
    """Counts one tunnel's connections and bounds them: pending logins and logged-in connections.

    Args:
        max_startups: connections allowed to be logging in at once (:data:`MAX_STARTUPS`).
        max_connections: logged-in connections allowed at once (:data:`MAX_CONNECTIONS`).
        logger: an X2Go-style logger.
    """

    def __init__(
        self,
        max_startups: int = MAX_STARTUPS,
        max_connections: int = MAX_CONNECTIONS,
        logger: log.LoggerLike | None = None,
    ):
        self.max_startups = max_startups
        self.max_connections = max_connections
        self.logger = log.tagged(logger, "limits")
        self._lock = threading.Lock()
        self._pending = 0
        self._logged_in = 0
        self._refused = 0  # in the current burst
        self._burst_start = 0.0
        self._last_refusal = 0.0
        self._last_report = 0.0

    @property
    def pending(self) -> int:
        """Connections admitted and not yet logged in."""
        return self._pending

    @property
    def logged_in(self) -> int:
        """Connections logged in and still open."""
        return self._logged_in

    def admit(self) -> Login | None:
        """A pending-login slot for a new connection, or None: close it (logged once per burst)."""
        now = time.monotonic()
        with self._lock:
            self._end_quiet_burst(now)
            if self._pending < self.max_startups:
                self._pending += 1
                return Login(self)
            if not self._refused:
                self._burst_start = self._last_report = now
                self.logger(
                    f"{self._pending} connections are logging in (limit {self.max_startups}, "
                    f"OpenSSH MaxStartups): refusing new connections until one finishes",
                    loglevel=log.loglevel_WARN,
                )
            elif now - self._last_report >= REFUSAL_LOG_INTERVAL:
                self._last_report = now
                self.logger(f"still refusing connections: {self._refused} refused so far",
                            loglevel=log.loglevel_WARN)
            self._refused += 1
            self._last_refusal = now
            return None

    def _end_quiet_burst(self, now: float) -> None:
        # Under self._lock.
        if self._refused and now - self._last_refusal >= REFUSAL_LOG_INTERVAL:
            self.logger(f"refused {self._refused} connections in "
                        f"{self._last_refusal - self._burst_start:.1f}s while logins were full",
                        loglevel=log.loglevel_NOTICE)
            self._refused = 0

    def _log_in(self) -> bool:
        with self._lock:
            self._pending -= 1
            if self._logged_in >= self.max_connections:
                return False
            self._logged_in += 1
            return True

    def _release(self, logged_in: bool) -> None:
        with self._lock:
            if logged_in:
                self._logged_in -= 1
            else:
                self._pending -= 1


class Login:
    """One connection's place in a :class:`LoginGate`: pending until :meth:`log_in`, freed by :meth:`done`."""

    def __init__(self, gate: LoginGate):
        self._gate = gate
        self._state = "pending"  # -> "in" -> "done", or "pending" -> "done"

    @property
    def max_connections(self) -> int:
        """The tunnel's limit of logged-in connections."""
        return self._gate.max_connections

    def log_in(self) -> bool:
        """Move from pending to logged in; False (and freed) when the tunnel has its maximum."""
        if self._state != "pending":
            return self._state == "in"
        if self._gate._log_in():
            self._state = "in"
            return True
        self._state = "done"
        return False

    def done(self) -> None:
        """Free the slot (idempotent)."""
        if self._state != "done":
            self._gate._release(self._state == "in")
            self._state = "done"


class SessionKeyAuth(paramiko.ServerInterface):
    """``paramiko.ServerInterface`` accepting only ``auth_key`` for ``username``.

    Args:
        auth_key: the session key (private or public half; only the public blob is compared).
        username: the one user name accepted (python-x2go: the local user).
        logger: an X2Go-style logger.
        transport: the transport this policy serves; with it, a connection is
            closed after :data:`MAX_AUTH_TRIES` failures and holds at most
            :data:`MAX_SESSIONS` session channels.
    """

    def __init__(
        self,
        auth_key: paramiko.PKey,
        username: str,
        logger: log.LoggerLike | None = None,
        *,
        transport: paramiko.Transport | None = None,
    ):
        self.auth_key = auth_key
        self.username = username
        self.logger = log.tagged(logger, "auth")
        self.transport = transport
        self._blob = auth_key.asbytes()
        self._requests = 0
        self._forgive_failure = False
        self.failures = 0

    def get_allowed_auths(self, username: str) -> str:
        # paramiko asks this once per failed request, to put in its failure
        # reply: the one place every failure passes, bad signatures included.
        if self._forgive_failure:
            self._forgive_failure = False
        else:
            self.failures += 1
            if self.failures >= MAX_AUTH_TRIES and self.transport is not None:
                # As OpenSSH: the connection ends instead of the last failure reply.
                # INFO, as every line a peer without the key can cause once per connection.
                self.logger(f"{self.failures} failed authentication attempts (limit {MAX_AUTH_TRIES}, "
                            f"OpenSSH MaxAuthTries): closing the connection", loglevel=log.loglevel_INFO)
                self.transport.close()
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        self._forgive_failure = self._requests == 0
        self._requests += 1
        return AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        self._requests += 1
        self.logger(f"password auth refused for {username!r}", loglevel=log.loglevel_INFO)
        return AUTH_FAILED

    def check_auth_interactive(self, username: str, submethods: str) -> int:
        self._requests += 1
        return AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self._requests += 1
        # Compare the whole public blob in constant time; the key type is part of it.
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        key_ok = hmac.compare_digest(key.asbytes(), self._blob)
        if user_ok and key_ok:
            self.logger(
                f"publickey auth ({key.get_name()}) for {username!r} succeeded",
                loglevel=log.loglevel_INFO,
            )
            return AUTH_SUCCESSFUL
        # INFO: OpenSSH clients offer their other keys first, and anyone on the
        # X2Go server can cause this line without a key.
        self.logger(f"publickey auth ({key.get_name()}) for {username!r} refused", loglevel=log.loglevel_INFO)
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            self.logger(f"refused channel of kind {kind!r}", loglevel=log.loglevel_WARN)
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        # paramiko registers the new channel only after this answer.
        if self.transport is not None and open_channel_count(self.transport) >= MAX_SESSIONS:
            self.logger(f"refused a session channel: {MAX_SESSIONS} already open on this connection",
                        loglevel=log.loglevel_WARN)
            return OPEN_FAILED_RESOURCE_SHORTAGE
        return OPEN_SUCCEEDED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp":
            self.logger(f"refused subsystem {name!r}", loglevel=log.loglevel_WARN)
            return False
        return bool(super().check_channel_subsystem_request(channel, name))

    # Everything else (exec, shell, pty, env, forwarding, agent, X11) keeps
    # paramiko's default answer: refused.
