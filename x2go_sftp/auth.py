"""The inner SSH server's policy: who may log in, and what they may open.

Exactly one key (the X2Go session key) for exactly one user name, by public
key only; only ``session`` channels and only the ``sftp`` subsystem.
"""

from __future__ import annotations

import hmac

import paramiko

from . import log


class SessionKeyAuth(paramiko.ServerInterface):
    """``paramiko.ServerInterface`` accepting only ``auth_key`` for ``username``.

    Args:
        auth_key: the session key (private or public half; only the public blob is compared).
        username: the one user name accepted (python-x2go: the local user).
        logger: an X2Go-style logger.
    """

    def __init__(
        self,
        auth_key: paramiko.PKey,
        username: str,
        logger: log.LoggerLike | None = None,
    ):
        self.auth_key = auth_key
        self.username = username
        self.logger = log.tagged(logger, "auth")
        self._blob = auth_key.asbytes()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        self.logger(f"password auth refused for {username!r}", loglevel=log.loglevel_WARN)
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # Compare the whole public blob in constant time; the key type is part of it.
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        key_ok = hmac.compare_digest(key.asbytes(), self._blob)
        if user_ok and key_ok:
            self.logger(
                f"publickey auth ({key.get_name()}) for {username!r} succeeded",
                loglevel=log.loglevel_INFO,
            )
            return paramiko.AUTH_SUCCESSFUL
        self.logger(f"publickey auth ({key.get_name()}) for {username!r} refused", loglevel=log.loglevel_WARN)
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        self.logger(f"refused channel of kind {kind!r}", loglevel=log.loglevel_WARN)
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp":
            self.logger(f"refused subsystem {name!r}", loglevel=log.loglevel_WARN)
            return False
        return bool(super().check_channel_subsystem_request(channel, name))

    # Everything else (exec, shell, pty, env, forwarding, agent, X11) keeps
    # paramiko's default answer: refused.
