"""The exported folders: which local directories a tunnel serves, and how they are named.

The SFTP namespace is the real absolute local path, because that is what
X2Go's sshfs asks for (``user@127.0.0.1:"/home/alice/Documents"``).  On a
Windows client python-x2go names drives ``/windrive/<letter>/...`` and UNC
shares ``/uncpath/<server>/<share>/...``; the mapping between those names and
local paths lives here as pure functions so it can be tested anywhere.

An :class:`Export` owns a directory file descriptor of its root.  Every
lookup below it goes through that descriptor (see :mod:`x2go_sftp.jail`).
The export follows its path, as OpenSSH's sftp-server (which only has paths)
does: when a request starts, the path's directory identity is compared with
the held descriptor's (one ``stat``); if the path now names another directory
the descriptor is replaced by one opened on it, and while the path names no
directory requests are refused.  The decision is made on identities and the
walk still starts from a descriptor, never from a path string.  Removing an
export makes it unreachable at once; a root descriptor is closed only when
no request still holds it, so a number can never be reused under a running
walk.
"""

from __future__ import annotations

import contextlib
import errno
import ntpath
import os
import posixpath
import stat as stat_mod
import threading
from collections.abc import Iterable, Iterator

from . import fds
from .defaults import X2GOCLIENT_OS, native_lock

WINDRIVE_PREFIX = "/windrive/"
UNCPATH_PREFIX = "/uncpath/"

# Linux PATH_MAX; longer client paths are refused before any syscall.
MAX_PATH_BYTES = 4096

# Characters Win32 path parsing gives a meaning to inside a name: separators
# ("\\" would let "a\\..\\.." climb), ":" (drive-relative names, NTFS
# alternate data streams "file::$DATA"), wildcards and redirections.  A
# component holding one is refused so the same jail rules hold on Windows.
WINDOWS_FORBIDDEN_CHARS = frozenset('\\:*?"<>|') | frozenset(chr(c) for c in range(32))

# DOS device names: on Windows "NUL", "con.txt" or "COM1.log" open a device,
# in any directory, whatever the extension.
WINDOWS_RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)


def split_components(path: str) -> list[str]:
    """Split an absolute or relative SFTP path into components, lexically resolving . and ..

    ``..`` at the top stays at the top (as the kernel does for ``/..``);
    callers check the result against an export, so that can never escape one.
    """
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return parts


def normalize(path: str, home: str | None) -> str:
    """Absolute, lexically normalised form of a client path (relative paths start at ``home``)."""
    if not path.startswith("/"):
        path = (home or "/") + "/" + path
    return "/" + "/".join(split_components(path))


def _windows_parts(parts: list[str], what: str) -> list[str]:
    for p in parts:
        if not windows_name_ok(p):
            raise ValueError(f"{what}: {p!r} is not a plain Windows name")
    return parts


def windows_local_to_sftp(local: str) -> str:
    """``C:\\Users\\x`` -> ``/windrive/C/Users/x``; ``\\\\srv\\share\\d`` -> ``/uncpath/srv/share/d``.

    The drive letter keeps its case: python-x2go builds the sshfs path as
    ``'/windrive/%s' % path.replace('\\', '/').replace(':', '')``, so that is
    the name sshfs will ask for.

    Raises:
        ValueError: for anything but an absolute drive or UNC path made of
            plain names: drive-relative ``C:x``, ``\\\\?\\`` and ``\\\\.\\`` device
            paths, ``..``, a UNC path without a share.
    """
    unified = local.replace("\\", "/")
    if unified.startswith(("//?/", "//./")):
        raise ValueError(f"Windows device namespace paths are not exported: {local!r}")
    drive, rest = ntpath.splitdrive(unified)
    # "C:" and "C:x" are relative to the drive's current directory.
    absolute = rest.startswith("/") or (drive.startswith("//") and not rest)
    if not drive or not absolute:
        raise ValueError(f"not an absolute Windows path: {local!r}")
    parts = _windows_parts([p for p in rest.split("/") if p], local)
    if drive.startswith("//"):
        unc = [p for p in drive.split("/") if p]
        if len(unc) != 2:
            raise ValueError(f"UNC path without a share: {local!r}")
        return UNCPATH_PREFIX + "/".join(_windows_parts(unc, local) + parts)
    if len(drive) == 2 and drive[1] == ":" and drive[0].isascii() and drive[0].isalpha():
        return WINDRIVE_PREFIX + "/".join([drive[0], *parts])
    raise ValueError(f"not an absolute Windows path: {local!r}")


def sftp_to_windows_local(sftp_path: str) -> str:
    """Inverse of :func:`windows_local_to_sftp`, on a (lexically normalised) SFTP path.

    Raises:
        ValueError: if the path is not under ``/windrive/<letter>`` or
            ``/uncpath/<server>/<share>``, or a component is not a plain
            Windows name (so ``a\\..\\b`` can never be handed to Win32).
    """
    parts = split_components(sftp_path)
    if (
        len(parts) >= 2
        and parts[0] == "windrive"
        and len(parts[1]) == 1
        and parts[1].isascii()
        and parts[1].isalpha()
    ):
        return parts[1] + ":\\" + "\\".join(_windows_parts(parts[2:], sftp_path))
    if len(parts) >= 3 and parts[0] == "uncpath":
        return "\\\\" + "\\".join(_windows_parts(parts[1:], sftp_path))
    raise ValueError(f"not a /windrive or /uncpath name: {sftp_path!r}")


def windows_name_ok(name: str) -> bool:
    """Would Win32 treat the path component ``name`` as exactly that one name?

    False for names Windows would reinterpret: holding separators, ``:`` or
    wildcards, ending in a dot or space (Windows strips those, so ``"a."``
    is ``"a"``), or naming a DOS device (``NUL``, ``con.txt``, ``COM1``).
    """
    if not name or name in (".", ".."):
        return False
    if any(c in WINDOWS_FORBIDDEN_CHARS for c in name):
        return False
    if name[-1] in ". ":
        return False
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    return stem not in WINDOWS_RESERVED_NAMES


def local_to_sftp(local: str, client_os: str = X2GOCLIENT_OS) -> str:
    """The SFTP name of a local folder, as sshfs will ask for it."""
    if client_os == "Windows":
        return windows_local_to_sftp(local)
    if not posixpath.isabs(local):
        raise ValueError(f"export paths must be absolute: {local!r}")
    return normalize(local, None)


class Export:
    """One exported directory: its SFTP name, its root descriptor, read-only or not."""

    def __init__(self, local_path: str, read_only: bool = False, client_os: str = X2GOCLIENT_OS):
        self.local_path = local_path
        self.sftp_path = local_to_sftp(local_path, client_os)
        self.components = tuple(split_components(self.sftp_path))
        self.read_only = read_only
        self._root_fd = self._open_root()
        st = os.fstat(self._root_fd)
        # Identity of the root directory: how the jail recognises, on the
        # descriptors of a walk, that it entered another export's root; and
        # how a request sees that the path now names another directory.
        self.root_id = (st.st_dev, st.st_ino)
        # Taken twice by every request (acquire, release), never held across a
        # wait: the operating system's lock even under gevent (native_lock).
        self._lock = native_lock()
        # Walks pinning each root descriptor (the current one, and replaced
        # ones that running walks still use), and the replaced ones.
        self._pins: dict[int, int] = {}
        self._retired: set[int] = set()
        self._active = True

    def _open_root(self) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        return os.open(self.local_path, flags | getattr(os, "O_PATH", 0))

    @property
    def active(self) -> bool:
        """False once the export has been removed; handles opened under it stop working."""
        return self._active

    def acquire(self) -> int:
        """Pin and return the root descriptor of the directory the path names now.

        Raises:
            PermissionError: EACCES if the export was removed.
            FileNotFoundError: ENOENT while the exported path names no directory.
        """
        if not self._active:
            raise PermissionError(errno.EACCES, "export removed")
        self.follow()
        with self._lock:
            if not self._active:
                raise PermissionError(errno.EACCES, "export removed")
            fd = self._root_fd
            self._pins[fd] = self._pins.get(fd, 0) + 1
            return fd

    def follow(self) -> None:
        """Point the root descriptor at the directory the exported path names now.

        One ``stat`` of the path per request; only a changed identity costs an
        ``open``.  The local user's own path is followed as when the export
        was added (symlinks in it included): that is the user's choice of
        what to share, not the remote side's.

        Raises:
            FileNotFoundError: ENOENT while the path names no directory.
        """
        try:
            st = os.stat(self.local_path)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(errno.ENOENT, "exported folder is missing") from None
        if (st.st_dev, st.st_ino) == self.root_id:
            return
        if not stat_mod.S_ISDIR(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "exported folder is not a directory")
        try:
            fd = self._open_root()
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(errno.ENOENT, "exported folder is missing") from None
        nst = os.fstat(fd)
        with self._lock:
            if not self._active or (nst.st_dev, nst.st_ino) == self.root_id:
                fds.close(fd)  # removed meanwhile, or another request already followed
                return
            old, self._root_fd = self._root_fd, fd
            self.root_id = (nst.st_dev, nst.st_ino)
            if self._pins.get(old):
                self._retired.add(old)
            else:
                fds.close(old)

    def release(self, fd: int | None = None) -> None:
        """Unpin a root descriptor from :meth:`acquire` (None: the current one).

        The last release of a replaced descriptor, or of any after
        :meth:`close`, closes it.
        """
        with self._lock:
            if fd is None or fd not in self._pins:
                fd = self._root_fd if self._root_fd in self._pins else next(iter(self._pins), -1)
            n = self._pins.get(fd, 0) - 1
            if n > 0:
                self._pins[fd] = n
                return
            self._pins.pop(fd, None)
            if fd in self._retired:
                self._retired.discard(fd)
                fds.close(fd)
            elif fd == self._root_fd and not self._active:
                self._close_fd()

    def close(self) -> None:
        """Deactivate now; close the root descriptor once no walk holds it."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            if not self._pins.get(self._root_fd):
                self._close_fd()

    def _close_fd(self) -> None:
        if self._root_fd >= 0:
            fds.close(self._root_fd)
            self._root_fd = -1

    def __repr__(self) -> str:
        ro = " ro" if self.read_only else ""
        return f"<Export {self.sftp_path}{ro}>"


class Exports:
    """The set of exports of one tunnel; safe to change while sessions run.

    The first export added is "home": relative paths, ``.`` and ``~`` resolve there.

    Changes replace the tuple of exports whole, one change at a time (under a
    lock); a request reads the tuple it finds, without a lock (every request
    asks three times, and under gevent a lock is a Python call).  So a request
    sees the exports as they were before a change or after it, never between.
    """

    def __init__(self, paths: Iterable[str | tuple[str, bool]] = (), client_os: str = X2GOCLIENT_OS):
        self.client_os = client_os
        self._lock = threading.Lock()
        self._exports: tuple[Export, ...] = ()  # never changed in place: replaced whole
        for item in paths:
            if isinstance(item, tuple):
                self.add(item[0], read_only=item[1])
            else:
                self.add(item)

    def add(self, path: str, read_only: bool = False) -> Export:
        """Export the existing directory ``path``; an export of the same name is replaced where it stands.

        (So replacing the first export, e.g. to make it read-only, keeps it "home".)
        """
        export = Export(path, read_only=read_only, client_os=self.client_os)
        with self._lock:
            old = [e for e in self._exports if e.sftp_path == export.sftp_path]
            if old:  # names are unique: the one of that name, in its place
                self._exports = tuple(export if e.sftp_path == export.sftp_path else e for e in self._exports)
            else:
                self._exports = (*self._exports, export)
        for e in old:
            e.close()
        return export

    def remove(self, path: str) -> bool:
        """Stop exporting ``path``; True if it was exported."""
        name = local_to_sftp(path, self.client_os)
        with self._lock:
            gone = [e for e in self._exports if e.sftp_path == name]
            self._exports = tuple(e for e in self._exports if e.sftp_path != name)
        for e in gone:
            e.close()
        return bool(gone)

    def clear(self) -> None:
        """Remove every export."""
        with self._lock:
            gone, self._exports = self._exports, ()
        for e in gone:
            e.close()

    def __iter__(self) -> Iterator[Export]:
        return iter(self._exports)

    def __len__(self) -> int:
        return len(self._exports)

    @property
    def home(self) -> str | None:
        """SFTP name of the first export, or None when nothing is exported."""
        exports = self._exports
        return exports[0].sftp_path if exports else None

    def normalize(self, path: str) -> str:
        """Absolute normalised SFTP path for a client path (relative to home)."""
        if "\x00" in path:
            raise OSError(errno.EINVAL, "NUL byte in path")
        if len(os.fsencode(path)) > MAX_PATH_BYTES:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        return normalize(path, self.home)

    def find(self, path: str) -> tuple[Export, list[str]]:
        """The export a normalised SFTP path lies in and the components below its root.

        Raises PermissionError (EACCES) for anything outside every export, whether
        or not it exists, so refusals reveal nothing.
        """
        parts = split_components(path)
        best: Export | None = None
        for export in self._exports:
            n = len(export.components)
            if tuple(parts[:n]) == export.components and (best is None or n > len(best.components)):
                best = export
        if best is None:
            raise PermissionError(errno.EACCES, "outside the exported folders")
        below = parts[len(best.components) :]
        if self.client_os == "Windows" and not all(windows_name_ok(p) for p in below):
            raise PermissionError(errno.EACCES, "name Windows would reinterpret")
        return best, below

    def fixed_dirs(self) -> set[tuple[int, int]]:
        """Identities of every export's root and of each directory on its path.

        The remote side may not move or remove these (backend refuses), so an
        export can only be redirected by the local user (see Export.follow).
        One ``stat`` per component of each exported path; asked only when a
        directory is about to be renamed or removed.
        """
        exports = self._exports
        out: set[tuple[int, int]] = set()
        for export in exports:
            out.add(export.root_id)
            path = export.local_path
            while True:
                try:
                    st = os.stat(path)
                except OSError:
                    pass
                else:
                    out.add((st.st_dev, st.st_ino))
                parent = os.path.dirname(path)
                if parent == path:
                    break
                path = parent
        return out

    def roots(self) -> dict[tuple[int, int], bool]:
        """Root identity ``(st_dev, st_ino)`` -> read-only, for every active export.

        A directory exported twice (under two names) is read-only if either
        export is: the stricter rule wins.  With several exports each one first
        follows its path (one ``stat`` each), so a read-only export whose path
        now names a new directory is recognised as that directory when a walk
        through another export reaches it.  A missing path keeps its last
        identity: stricter, never looser.
        """
        exports = self._exports
        if len(exports) > 1:
            for export in exports:
                with contextlib.suppress(OSError):
                    export.follow()
        out: dict[tuple[int, int], bool] = {}
        for export in exports:
            out[export.root_id] = out.get(export.root_id, False) or export.read_only
        return out
