"""One call that makes an installed python-x2go share folders through this library.

PyHoca-GUI, PyHoca-CLI and every other python-x2go application switch with::

    import x2go_sftp.integrate; x2go_sftp.integrate.install()

before their first session starts.  :func:`install` changes, in the running
process only:

* ``X2GoRevFwTunnelToSFTP`` wherever python-x2go holds it (``x2go.sftpserver``
  and any ``x2go.*`` module that imported the name) becomes
  :class:`X2GoIntegratedTunnel`, which serves nothing until python-x2go shares a
  folder;
* ``X2GoTerminalSession.share_local_folder`` (disk folders, and through it the
  print spool and the MIME box), ``unshare_local_folder`` and
  ``unshare_all_local_folders`` keep the tunnel's exports equal to what is
  mounted on the server;
* ``x2go.rforward.x2go_transport_tcp_handler`` hands each forwarded channel to
  the tunnel of its port instead of the transport's shared accept queue;
* ``x2go.defaults.RSAHostKey`` (1024 bits, written into the known-hosts file
  the server's sshfs checks) becomes a 3072-bit key, and the tunnel always
  serves whatever key that attribute holds, so the two cannot disagree;
* on paramiko releases whose ``PKey.write_private_key`` passes ``file_format``
  (4.x, 5.x), python-x2go's own patch of ``PKey._write_private_key`` (an older
  signature: ``TypeError`` when a session shares a folder) is replaced by one
  that accepts both signatures and writes what python-x2go expects.

:func:`install_on_import` defers :func:`install` until python-x2go is
imported (for a start-up hook); the tunnel constructor calls
:func:`refuse_bare_swap`, which refuses python-x2go a tunnel class that
was swapped in without :func:`install`.

:func:`uninstall` puts every original back.  Both are idempotent.  The record
of what was replaced lives on python-x2go's ``x2go.sftpserver`` module, not
here, so this module holds no state.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import paramiko

from . import defaults, log, paramiko_compat, rforward
from .defaults import default_host_key
from .sftpserver import X2GoRevFwTunnelToSFTP

__all__ = ["X2GoIntegratedTunnel", "install", "install_on_import", "installed", "refuse_bare_swap", "uninstall"]

# Attribute of python-x2go's ``x2go.sftpserver`` module holding our record.
_RECORD_ATTR = "_x2go_sftp_integration"

# Attribute set on each wrapper so a second install() (or a foreign re-wrap)
# can tell our wrappers from the originals.
_WRAPPED_MARK = "_x2go_sftp_wraps"

# python-x2go's tunnel table: reverse_tunnels[session_name]['sshfs'] = (port, tunnel).
_SSHFS_KEY = "sshfs"

_LOG_TAG = "integrate"


# --------------------------------------------------------------------------------------
# The tunnel python-x2go gets
# --------------------------------------------------------------------------------------
class X2GoIntegratedTunnel(X2GoRevFwTunnelToSFTP):
    """``X2GoRevFwTunnelToSFTP`` with python-x2go's constructor, exporting nothing at first.

    Folders are added and removed by the wrapped terminal-session methods.  The
    inner server's host key is read from ``x2go.defaults.RSAHostKey`` for every
    connection, i.e. it is always the key python-x2go last wrote into the
    server's known-hosts file; the login user is python-x2go's
    ``CURRENT_LOCAL_USER``, the name it passes to ``x2gomountdirs``.

    Args:
        server_port: the port on the X2Go server (sshfs connects there).
        ssh_transport: python-x2go's control-session transport.
        auth_key: the session key sshfs authenticates with.
        session_instance: python-x2go's ``X2GoSession``, or None.
        logger: python-x2go's ``X2GoLogger`` (or any compatible callable).
        loglevel: level mask of the logger created when ``logger`` is None.
    """

    def __init__(
        self,
        server_port: int,
        ssh_transport: paramiko.Transport,
        auth_key: paramiko.PKey | None = None,
        session_instance: Any = None,
        logger: log.LoggerLike | None = None,
        loglevel: int = log.loglevel_DEFAULT,
        **kwargs: Any,
    ):
        x2go_defaults = _x2go_module("x2go.defaults")
        kwargs.setdefault("username", getattr(x2go_defaults, "CURRENT_LOCAL_USER", None))
        record = getattr(_x2go_module("x2go.sftpserver"), _RECORD_ATTR, None)
        kwargs.setdefault("outer_gcm", bool(getattr(record, "outer_gcm", False)))
        super().__init__(server_port, ssh_transport, auth_key=auth_key,
                         session_instance=session_instance, logger=logger, loglevel=loglevel, **kwargs)

    @property
    def host_key(self) -> paramiko.PKey | None:
        """The key sshfs expects: an explicit one, else python-x2go's current ``RSAHostKey``."""
        if self._explicit_host_key is not None:
            return self._explicit_host_key
        return getattr(_x2go_module("x2go.defaults"), "RSAHostKey", None)

    @host_key.setter
    def host_key(self, key: paramiko.PKey | None) -> None:
        self._explicit_host_key = key


def _x2go_module(name: str) -> ModuleType | None:
    """An already imported python-x2go module, or None (never imports)."""
    return sys.modules.get(name)


# --------------------------------------------------------------------------------------
# Keeping exports equal to what python-x2go mounts
# --------------------------------------------------------------------------------------
def _sshfs_tunnel(terminal: Any) -> X2GoRevFwTunnelToSFTP | None:
    """The terminal session's sshfs tunnel if it is one of ours (else None)."""
    try:
        entry = terminal.reverse_tunnels[terminal.session_info.name][_SSHFS_KEY]
    except (AttributeError, KeyError, TypeError):
        return None
    tunnel = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else None
    return tunnel if isinstance(tunnel, X2GoRevFwTunnelToSFTP) else None


def _local_dir(local_path: Any) -> str | None:
    """python-x2go's normalisation of a share path (``os.path.normpath``), as ``str``."""
    if not isinstance(local_path, (str, bytes)):
        return None
    return os.path.normpath(os.fsdecode(local_path))


def _is_exported(tunnel: X2GoRevFwTunnelToSFTP, path: str) -> bool:
    return any(export.local_path == path for export in tunnel.exports)


def _logger(terminal: Any) -> log.TaggedLogger:
    return log.tagged(getattr(terminal, "logger", None), _LOG_TAG)


def _wrap_share(original: Callable[..., Any]) -> Callable[..., Any]:
    """Export the folder before python-x2go mounts it; withdraw it if the mount fails."""

    @functools.wraps(original)
    def share_local_folder(self: Any, local_path: Any = None, folder_type: str = "disk",
                           *args: Any, **kwargs: Any) -> Any:
        tunnel = _sshfs_tunnel(self)
        path = _local_dir(local_path)
        added = False
        if tunnel is not None and path is not None and os.path.isdir(path) and not _is_exported(tunnel, path):
            try:
                tunnel.add_export(path)
                added = True
            except (OSError, ValueError) as e:
                _logger(self)(f"cannot export {path!r}: {e}", loglevel=log.loglevel_WARN)
        ok = False
        try:
            ok = original(self, local_path, folder_type, *args, **kwargs)
            return ok
        finally:
            if added and not ok and tunnel is not None and path is not None:
                # The server did not mount it: serve nothing python-x2go does not show as shared.
                tunnel.remove_export(path)

    setattr(share_local_folder, _WRAPPED_MARK, original)
    return share_local_folder


def _wrap_unshare(original: Callable[..., Any]) -> Callable[..., Any]:
    """Stop serving the folder once python-x2go has asked the server to unmount it."""

    @functools.wraps(original)
    def unshare_local_folder(self: Any, local_path: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, local_path, *args, **kwargs)
        finally:
            # Even if the server failed to unmount: the user asked for the folder to go.
            tunnel = _sshfs_tunnel(self)
            path = _local_dir(local_path)
            if tunnel is not None and path is not None:
                tunnel.remove_export(path)

    setattr(unshare_local_folder, _WRAPPED_MARK, original)
    return unshare_local_folder


def _wrap_unshare_all(original: Callable[..., Any]) -> Callable[..., Any]:
    """``x2goumount-session <session>`` unmounts everything, spool and MIME box included."""

    @functools.wraps(original)
    def unshare_all_local_folders(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            tunnel = _sshfs_tunnel(self)
            if tunnel is not None:
                for export in list(tunnel.exports):
                    tunnel.remove_export(export.local_path)

    setattr(unshare_all_local_folders, _WRAPPED_MARK, original)
    return unshare_all_local_folders


_TERMINAL_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "share_local_folder": _wrap_share,
    "unshare_local_folder": _wrap_unshare,
    "unshare_all_local_folders": _wrap_unshare_all,
}


# --------------------------------------------------------------------------------------
# paramiko >= 4: python-x2go's PKey._write_private_key patch has the old signature
# --------------------------------------------------------------------------------------
def _write_private_key(self: paramiko.PKey, f: Any, key: Any, file_format: Any = None,
                       password: Any = None, **legacy: Any) -> None:
    """``PKey._write_private_key`` for every paramiko release, writing what the stream takes.

    paramiko < 4 passes a cryptography ``PrivateFormat`` (positionally, as
    ``format``); paramiko >= 4 a ``FileFormat`` (``format`` + ``encoding``),
    as ``file_format=``.  Text streams get ``str`` (paramiko's own behaviour),
    any other stream ``bytes`` (what python-x2go's ``io.BytesIO`` needs).
    """
    from cryptography.hazmat.primitives import serialization

    fmt = legacy.pop("format", file_format)
    if legacy:
        raise TypeError(f"unexpected arguments: {sorted(legacy)}")
    encoding = getattr(fmt, "encoding", serialization.Encoding.PEM)
    private_format = getattr(fmt, "format", fmt)
    if password is None:
        encryption: Any = serialization.NoEncryption()
    else:
        secret = password if isinstance(password, bytes) else str(password).encode()
        encryption = serialization.BestAvailableEncryption(secret)
    data = key.private_bytes(encoding, private_format, encryption)
    if isinstance(f, io.TextIOBase):
        f.write(data.decode())
        return
    try:
        f.write(data)
    except TypeError:  # a text-only file-like object that is no io.TextIOBase
        f.write(data.decode())


def _paramiko_passes_file_format() -> bool:
    """True if this paramiko calls ``_write_private_key(..., file_format=...)`` (4.x and later)."""
    try:
        return "file_format" in inspect.signature(paramiko.PKey.write_private_key).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------
# install / uninstall
# --------------------------------------------------------------------------------------
@dataclass
class _Record:
    """What install() replaced: (owner, attribute, original, replacement) in order."""

    patches: list[tuple[Any, str, Any, Any]] = field(default_factory=list)
    outer_gcm: bool = False  # what install() was asked for: every integrated tunnel's outer_gcm

    def replace(self, owner: Any, name: str, new: Any) -> None:
        self.patches.append((owner, name, getattr(owner, name), new))
        setattr(owner, name, new)

    def undo(self) -> None:
        for owner, name, original, new in reversed(self.patches):
            # Only put back what still is ours; a later patch by someone else wins.
            if getattr(owner, name, None) is new:
                setattr(owner, name, original)
        self.patches.clear()


def _x2go_modules() -> list[ModuleType]:
    return [m for n, m in list(sys.modules.items())
            if isinstance(m, ModuleType) and (n == "x2go" or n.startswith("x2go."))]


def installed() -> bool:
    """True while :func:`install` is in effect."""
    sftpserver = _x2go_module("x2go.sftpserver")
    return sftpserver is not None and getattr(sftpserver, _RECORD_ATTR, None) is not None


# The opt-out from install()'s outer_gcm default, for programs that call install() for the
# user (a usercustomize.py, PyHoca-GUI): "0" leaves python-x2go's cipher as negotiated.
OUTER_GCM_ENV = "X2GO_SFTP_OUTER_GCM"


def outer_gcm_default() -> bool:
    """What :func:`install` does when ``outer_gcm`` is not given: on, unless ``X2GO_SFTP_OUTER_GCM=0`` (``no``, ``off``, ``false``)."""
    return not defaults.opted_out(OUTER_GCM_ENV)


def install(host_key: paramiko.PKey | None = None, outer_gcm: bool | None = None) -> bool:
    """Make the python-x2go of this process share folders through x2go-sftp.

    Call once before any session starts (importing python-x2go, as this does,
    applies its gevent monkey patching as usual).  A second call does nothing.

    Args:
        host_key: the inner server's host key (default: a 3072-bit RSA key per
            process).  It replaces python-x2go's 1024-bit ``RSAHostKey``.
        outer_gcm: every tunnel python-x2go starts gets ``outer_gcm=True``: its
            connection is rekeyed to prefer AES-GCM where the X2Go server offers
            it (see :class:`~x2go_sftp.sftpserver.X2GoRevFwTunnelToSFTP`).  None
            (the default) is on unless ``X2GO_SFTP_OUTER_GCM=0``
            (:func:`outer_gcm_default`); False leaves python-x2go's cipher as
            negotiated.  On by default because the caller opted into this
            integration, the key exchange is the one paramiko already runs on
            python-x2go's connection every 512 MiB, AES-GCM is at least as
            strong as the aes128-ctr + hmac-sha2-256 it replaces, and inside
            real python-x2go on Debian 12 it read 1.49x and wrote 1.18x faster
            at 23 % less CPU per MB (docs/performance.md).

    Returns:
        True if this call installed, False if it was already installed.

    Raises:
        ImportError: python-x2go is not installed.
    """
    import x2go.backends.control.plain  # noqa: F401  (applies python-x2go's own paramiko patches first)
    import x2go.backends.terminal.plain as terminal_plain
    import x2go.defaults as x2go_defaults
    import x2go.rforward as x2go_rforward
    import x2go.sftpserver as x2go_sftpserver

    if getattr(x2go_sftpserver, _RECORD_ATTR, None) is not None:
        return False
    record = _Record(outer_gcm=outer_gcm_default() if outer_gcm is None else outer_gcm)

    # 1. The tunnel class, wherever python-x2go holds it.
    stock_tunnel = x2go_sftpserver.X2GoRevFwTunnelToSFTP
    for module in _x2go_modules():
        if getattr(module, "X2GoRevFwTunnelToSFTP", None) is stock_tunnel:
            record.replace(module, "X2GoRevFwTunnelToSFTP", X2GoIntegratedTunnel)

    # 2. Forwarded channels go to their own tunnel, not to a shared queue.
    record.replace(x2go_rforward, "x2go_transport_tcp_handler", rforward.x2go_transport_tcp_handler)

    # 3. A strong host key, everywhere python-x2go refers to the old one.
    old_key = x2go_defaults.RSAHostKey
    new_key = host_key if host_key is not None else default_host_key()
    for module in _x2go_modules():
        if getattr(module, "RSAHostKey", None) is old_key:
            record.replace(module, "RSAHostKey", new_key)

    # 4. Exports follow share/unshare.
    terminal_class = terminal_plain.X2GoTerminalSession
    for name, wrap in _TERMINAL_WRAPPERS.items():
        current = terminal_class.__dict__.get(name)
        if current is not None and not hasattr(current, _WRAPPED_MARK):
            record.replace(terminal_class, name, wrap(current))

    # 5. paramiko >= 4 versus python-x2go's _write_private_key patch.
    x2go_paramiko = _x2go_module("x2go._paramiko")
    x2go_patch = getattr(x2go_paramiko, "_Pkey_write_private_key", None)
    if (x2go_patch is not None and paramiko_compat.pkey_private_writer() is x2go_patch
            and _paramiko_passes_file_format()):
        record.replace(paramiko.PKey, paramiko_compat.PKEY_PRIVATE_WRITER, _write_private_key)

    paramiko_compat.fix_speed_defects()  # 6. python-x2go's connection: no repr per packet sent, MACs compared in C
    setattr(x2go_sftpserver, _RECORD_ATTR, record)
    log.tagged(None, _LOG_TAG)(
        f"python-x2go now shares folders through x2go-sftp ({len(record.patches)} replacements)",
        loglevel=log.loglevel_NOTICE,
    )
    return True


def uninstall() -> bool:
    """Undo :func:`install`; tunnels already running keep their current exports.

    Returns:
        True if something was undone, False if nothing was installed.
    """
    sftpserver = _x2go_module("x2go.sftpserver")
    record = getattr(sftpserver, _RECORD_ATTR, None) if sftpserver is not None else None
    if record is None:
        return False
    record.undo()
    delattr(sftpserver, _RECORD_ATTR)
    return True


# --------------------------------------------------------------------------------------
# A start-up hook that installs when python-x2go is imported
# --------------------------------------------------------------------------------------
class _InstallAfterX2GoImport:
    """One-shot ``sys.meta_path`` finder: runs :func:`install` right after ``x2go`` is executed.

    It finds nothing itself.  For ``x2go`` it asks the other finders for the
    spec and wraps that spec's loader so the package runs first, then
    :func:`install`.  So the hook imports no python-x2go (and applies no gevent
    monkey patching) before the application imports it: PyHoca-GUI creates its
    ``wx.App`` before importing ``x2go`` on purpose.
    """

    def __init__(self, host_key: paramiko.PKey | None = None, outer_gcm: bool | None = None) -> None:
        self.host_key = host_key
        self.outer_gcm = outer_gcm

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _X2GO_PACKAGE:
            return None
        _remove_import_hook()
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec  # not found (the import fails as usual) or no loader we can wrap
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            # x2go's __init__ has imported its backends by now, as install() needs.  An error
            # here fails the import: never a silent fallback to the stock module (it serves /).
            install(self.host_key, self.outer_gcm)

        # On the loader instance of this one spec, so module.__loader__ stays python-x2go's.
        loader.exec_module = exec_module
        return spec


# The package whose import triggers the hook.
_X2GO_PACKAGE = "x2go"


def _remove_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _InstallAfterX2GoImport)]


def install_on_import(host_key: paramiko.PKey | None = None, outer_gcm: bool | None = None) -> None:
    """:func:`install` as soon as python-x2go is imported (at once if it already is).

    The arguments are :func:`install`'s.

    For a start-up hook such as a ``usercustomize.py``: it costs nothing in
    programs that never import python-x2go (pip, for instance), and it keeps
    the application's own import order (see :class:`_InstallAfterX2GoImport`).
    Calling it again before python-x2go is imported adds no second hook.
    """
    if _X2GO_PACKAGE in sys.modules:
        install(host_key, outer_gcm)
        return
    _remove_import_hook()
    sys.meta_path.insert(0, _InstallAfterX2GoImport(host_key, outer_gcm))


# --------------------------------------------------------------------------------------
# The bare class swap, refused
# --------------------------------------------------------------------------------------
BARE_SWAP_MESSAGE = (
    "x2go.sftpserver.X2GoRevFwTunnelToSFTP was replaced by x2go-sftp's {name} without "
    "x2go_sftp.integrate.install(): sshfs would reject the tunnel's host key (python-x2go writes its "
    "own RSAHostKey into the known-hosts file) and no shared folder would be exported. Folder sharing, "
    "printing and the MIME box stay off for this session. Instead of replacing the class, call "
    "`import x2go_sftp.integrate; x2go_sftp.integrate.install()` before the first session starts."
)
"""What python-x2go logs when a session meets the bare class swap (``{name}``: the class)."""


def refuse_bare_swap(tunnel_class: type, logger: log.LoggerLike | None = None) -> None:
    """Refuse to be python-x2go's sshfs tunnel without :func:`install`; the tunnel constructor calls it.

    A bare ``x2go.sftpserver.X2GoRevFwTunnelToSFTP = X2GoRevFwTunnelToSFTP``
    gives python-x2go a tunnel that serves its own host key (python-x2go writes
    ``x2go.defaults.RSAHostKey`` into the known-hosts file sshfs checks:
    "REMOTE HOST IDENTIFICATION HAS CHANGED") and no folders (nothing tells it
    what python-x2go shares).  python-x2go's session start catches
    ``X2GoUserException`` from ``start_sshfs()``: it logs the message as a
    warning, calls ``HOOK_sshfs_not_available`` and runs the session without
    folder sharing, printing and MIME box.  Any other exception would abort the
    session start half-way (the session window is already up by then).

    Args:
        tunnel_class: the class being constructed.
        logger: the constructor's logger; the refusal is logged there as an error too.

    Raises:
        x2go.x2go_exceptions.X2GoUserException: python-x2go constructs
            ``tunnel_class`` for its sessions and :func:`install` did not put it there.
    """
    if issubclass(tunnel_class, X2GoIntegratedTunnel) or not any(
        getattr(holder, "X2GoRevFwTunnelToSFTP", None) is tunnel_class
        # python-x2go looks the class up as ``sftpserver.X2GoRevFwTunnelToSFTP`` at each
        # session start; a swap may have replaced the class or the whole module.
        for module in _x2go_modules()
        for holder in (module, getattr(module, "sftpserver", None))
    ):
        return
    message = BARE_SWAP_MESSAGE.format(name=f"{tunnel_class.__module__}.{tunnel_class.__qualname__}")
    log.tagged(logger, _LOG_TAG)(message, loglevel=log.loglevel_ERROR)
    exceptions = _x2go_module("x2go.x2go_exceptions")
    raise getattr(exceptions, "X2GoUserException", RuntimeError)(message)
