"""The 2014 design of python-x2go's ``x2go.sftpserver``, re-expressed for the benchmark.

The baseline the issue compares against, rebuilt from a reading of
python-x2go 0.6.1.3 (``x2go/sftpserver.py``, ``x2go/rforward.py``) so it runs
in our topology without python-x2go installed.  What is kept, because it
decides the speed:

* paramiko's stock ``SFTPServer`` (request loop, ``BufferedPipe`` channels,
  paramiko's default ciphers and windows) over a plain ``paramiko.Transport``
  on the forwarded channel, with ``load_server_moduli()``;
* an ``SFTPServerInterface`` that joins paths onto a "chroot" of ``/`` and
  does buffered file I/O through ``os.fdopen`` objects;
* the forwarding protocol: the transport's ``tcpip-forward`` handler queues the
  channel on the transport's shared accept queue and notifies the tunnel
  thread, which ``accept()``s it and starts one thread per channel;
* that thread polls ``transport.is_active()`` once a second;
* nothing touches the outer socket (no TCP_NODELAY).

Not kept: python-x2go's logger and session hooks (no effect on speed).
Not for production use: it has none of the jail of :mod:`x2go_sftp`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from typing import Any

import paramiko

# The original polled the inner transport once a second (gevent.sleep(1)).
POLL_INTERVAL = 1.0

# Forwards are requested on the X2Go server's loopback, as python-x2go does.
FORWARD_ADDRESS = "127.0.0.1"


class LegacySSHServer(paramiko.ServerInterface):
    """Session channels only; public key auth by RSA key equality for one user."""

    def __init__(self, auth_key: paramiko.RSAKey, username: str):
        self.auth_key = auth_key
        self.username = username

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == self.username and isinstance(key, paramiko.RSAKey) and key == self.auth_key:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"


class LegacyHandle(paramiko.SFTPHandle):
    """paramiko's handle over a buffered file object; stat through fstat."""

    def stat(self) -> Any:
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)


class LegacySFTPInterface(paramiko.SFTPServerInterface):
    """Plain os calls on ``chroot + canonicalize(path)``."""

    def __init__(self, server: Any, chroot: str = "/", **kwargs: Any):
        super().__init__(server)
        self.chroot = chroot

    def _realpath(self, path: str) -> str:
        return (self.chroot + self.canonicalize(path)).replace("//", "/")

    def list_folder(self, path: str) -> Any:
        path = self._realpath(path)
        try:
            out = []
            for name in os.listdir(path):
                try:
                    attr = paramiko.SFTPAttributes.from_stat(os.lstat(os.path.join(path, name)))
                except OSError:
                    continue
                attr.filename = name
                out.append(attr)
            return out
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    def stat(self, path: str) -> Any:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._realpath(path)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    def lstat(self, path: str) -> Any:
        try:
            return paramiko.SFTPAttributes.from_stat(os.lstat(self._realpath(path)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    def open(self, path: str, flags: int, attr: Any) -> Any:
        path = self._realpath(path)
        try:
            mode = getattr(attr, "st_mode", None)
            fd = os.open(path, flags, mode if mode is not None else 0o666)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        if (flags & os.O_CREAT) and attr is not None:
            attr._flags &= ~attr.FLAG_PERMISSIONS
            paramiko.SFTPServer.set_file_attr(path, attr)
        if flags & os.O_WRONLY:
            fmode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            fmode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            fmode = "rb"
        try:
            f = os.fdopen(fd, fmode)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        handle = LegacyHandle(flags)
        handle.filename = path
        handle.readfile = f
        handle.writefile = f
        return handle

    def remove(self, path: str) -> int:
        try:
            os.remove(self._realpath(path))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return paramiko.SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        try:
            shutil.move(self._realpath(oldpath), self._realpath(newpath))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return paramiko.SFTP_OK

    def mkdir(self, path: str, attr: Any) -> int:
        try:
            os.mkdir(self._realpath(path), attr.st_mode if attr.st_mode is not None else 0o777)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return paramiko.SFTP_OK

    def rmdir(self, path: str) -> int:
        try:
            shutil.rmtree(self._realpath(path))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return paramiko.SFTP_OK

    def chattr(self, path: str, attr: Any) -> int:
        path = self._realpath(path)
        try:
            if attr.st_mode is not None:
                os.chmod(path, attr.st_mode)
            if attr.st_uid is not None:
                os.chown(path, attr.st_uid, attr.st_gid)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return paramiko.SFTP_OK

    def symlink(self, target_path: str, path: str) -> int:
        if target_path.startswith("/"):
            target_path = self._realpath(target_path)
        try:
            os.symlink(target_path, self._realpath(path))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return paramiko.SFTP_OK

    def readlink(self, path: str) -> Any:
        try:
            return os.readlink(self._realpath(path))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)


def _serve_channel(chan: paramiko.Channel, auth_key: paramiko.RSAKey, host_key: paramiko.PKey,
                   username: str) -> None:
    """The original per-channel handler: a stock server Transport, polled once a second."""
    t = paramiko.Transport(chan)
    t.daemon = True
    t.load_server_moduli()
    t.add_server_key(host_key)
    event = threading.Event()
    t.set_subsystem_handler("sftp", paramiko.SFTPServer, sftp_si=LegacySFTPInterface, chroot="/")
    t.start_server(server=LegacySSHServer(auth_key, username), event=event)
    while t.is_active():
        time.sleep(POLL_INTERVAL)
    t.close()


def _tcp_handler(chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]) -> None:
    # The original: queue on the transport's shared accept queue, wake the tunnel of that port.
    transport = chan.get_transport()
    transport._queue_incoming_channel(chan)
    tunnel = getattr(transport, "_legacy_tunnels", {}).get(int(server[1]))
    if tunnel is not None:
        tunnel.notify()


class LegacyTunnel(threading.Thread):
    """Reverse forward + accept loop + one thread per channel, as in 2014."""

    def __init__(self, ssh_transport: paramiko.Transport, auth_key: paramiko.RSAKey,
                 host_key: paramiko.PKey, username: str):
        super().__init__(daemon=True)
        self.ssh_transport = ssh_transport
        self.auth_key = auth_key
        self.host_key = host_key
        self.username = username
        self.incoming_channel = threading.Condition()
        self.server_port = 0
        self.ready = threading.Event()
        self._keepalive = True
        self.channel_threads: list[threading.Thread] = []

    def notify(self) -> None:
        with self.incoming_channel:
            self.incoming_channel.notify()

    def stop(self) -> None:
        self._keepalive = False
        with contextlib.suppress(Exception):
            self.ssh_transport.global_request("cancel-tcpip-forward", (FORWARD_ADDRESS, self.server_port),
                                              wait=True)
        self.notify()

    def run(self) -> None:
        with self.incoming_channel:
            self.server_port = self.ssh_transport.request_port_forward(FORWARD_ADDRESS, 0, handler=_tcp_handler)
            tunnels = getattr(self.ssh_transport, "_legacy_tunnels", {})
            tunnels[int(self.server_port)] = self
            self.ssh_transport._legacy_tunnels = tunnels
            self.ready.set()
            while self._keepalive:
                self.incoming_channel.wait()
                if not self._keepalive:
                    break
                chan = self.ssh_transport.accept()
                thread = threading.Thread(target=_serve_channel, daemon=True,
                                          args=(chan, self.auth_key, self.host_key, self.username))
                thread.start()
                self.channel_threads.append(thread)
