"""Resolve a client path to a file descriptor under an export, or refuse.

This module's whole job is the walk.  Modelled on Go's ``os.Root`` and on
``openat2(RESOLVE_BENEATH)``:

* the start is the export's root directory descriptor, never a path string;
* each component is opened relative to its parent with ``O_NOFOLLOW``;
* a symlink met on the way is read with ``readlinkat`` and its target spliced
  into the walk: a relative target continues from the link's directory, an
  absolute one must name a place inside the *same* export and restarts at its
  root; a ``..`` that would climb above the export root is refused;
* no decision is made on a path string that is later handed to the kernel
  again, so a local process that swaps a directory for a symlink between our
  steps only changes which object *inside* the export we reach.

The caller receives the directory descriptor that holds the final component
and the component's name, and performs the final operation with the ``*at``
system call and ``O_NOFOLLOW`` / ``AT_SYMLINK_NOFOLLOW``.

Why not ``openat2(RESOLVE_BENEATH)``: it refuses every absolute symlink, and
ours must follow absolute links that stay in the export (the SFTP namespace
is the real local path), so the walk would be needed anyway; the walk never
asks the kernel for ``..``, so ``RESOLVE_BENEATH`` adds no confinement; and
the time it saves (tens of microseconds a request) is lost in the
milliseconds of an SSH round trip.  docs/security.md has the figures.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from types import TracebackType

from .exports import MAX_PATH_BYTES, Export, Exports, split_components, windows_name_ok

# Linux SYMLOOP_MAX (40): the kernel's own limit on links followed in one lookup.
MAX_SYMLINKS = 40

# NAME_MAX on Linux filesystems; longer components are refused before any syscall.
MAX_NAME_BYTES = 255

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_DIR_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# The walk needs openat/readlinkat (and the backend the other *at calls).
# Without them (Windows) every request is refused rather than served by path.
HAVE_AT_CALLS = os.open in os.supports_dir_fd and os.readlink in os.supports_dir_fd


def refused(why: str = "outside the exported folders") -> PermissionError:
    """The one error every escape attempt gets (EACCES -> SFTP PERMISSION_DENIED)."""
    return PermissionError(errno.EACCES, why)


class Resolved:
    """A walked path: the directory descriptor holding ``name``, inside ``export``.

    ``name`` is None when the path is a directory that was itself walked into
    (the export root, or a directory reached with ``follow_last``); then
    :attr:`dir_fd` is that directory.  Use as a context manager: it closes the
    descriptors of the walk and unpins the export root.
    """

    def __init__(self, export: Export, root_fd: int):
        self.export = export
        self.root_fd = root_fd
        self._stack: list[tuple[str, int]] = []
        self.name: str | None = None
        #: True when the place reached may not be modified: the walk's export
        #: is read-only, or the walk entered a read-only export nested in it.
        self.read_only = export.read_only
        self._closed = False

    @property
    def dir_fd(self) -> int:
        """Descriptor of the directory the final component lives in (or the directory itself)."""
        return self._stack[-1][1] if self._stack else self.root_fd

    @property
    def parent_fd(self) -> int:
        """Descriptor of the directory above :attr:`dir_fd` (the root for the root).

        For ``..`` entries: taken from the walk, so the kernel's ``..`` (which
        would leave an export whose subdirectory was moved out) is never used.
        """
        return self._stack[-2][1] if len(self._stack) >= 2 else self.root_fd

    @property
    def leaf(self) -> str:
        """The final name, for operations on a name (remove, rename, link ...).

        Raises:
            PermissionError: EACCES when the path is a walked directory (an export root).
        """
        if self.name is None:
            raise refused("operation on an export root")
        return self.name

    @property
    def components(self) -> list[str]:
        """Physical components below the export root, the final name included."""
        names = [n for n, _ in self._stack]
        return names + [self.name] if self.name is not None else names

    @property
    def sftp_path(self) -> str:
        """The canonical SFTP name of what was resolved (symlinks expanded)."""
        return "/" + "/".join(list(self.export.components) + self.components)

    @property
    def is_root(self) -> bool:
        """True when the path is the export root itself."""
        return not self._stack and self.name is None

    def _push(self, name: str, fd: int) -> None:
        self._stack.append((name, fd))

    def _pop(self) -> None:
        if not self._stack:
            raise refused("'..' above the export root")
        os.close(self._stack.pop()[1])

    def _reset(self) -> None:
        while self._stack:
            os.close(self._stack.pop()[1])

    def close(self) -> None:
        """Close the walk's descriptors and unpin the export root."""
        if self._closed:
            return
        self._closed = True
        self._reset()
        self.export.release()

    def __enter__(self) -> Resolved:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Jail:
    """Resolves client paths under a set of :class:`~x2go_sftp.exports.Exports`."""

    def __init__(self, exports: Exports):
        self.exports = exports

    def resolve(self, path: str, follow_last: bool = True) -> Resolved:
        """Walk ``path`` under its export.

        Args:
            path: a client path (absolute, or relative to the first export).
            follow_last: expand a symlink in the final component (stat, open)
                or leave it as the name to operate on (lstat, remove, rename).

        Returns:
            A :class:`Resolved`; its ``name`` may not exist yet (for creation).

        Raises:
            PermissionError: EACCES for anything outside the exports.
            OSError: ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG from the walk itself.
        """
        if not HAVE_AT_CALLS:
            raise refused("no *at system calls on this platform")
        export, parts = self.exports.find(self.exports.normalize(path))
        root_fd = export.acquire()
        res = Resolved(export, root_fd)
        try:
            self._walk(res, parts, follow_last)
            res.read_only = self._read_only(res)
        except BaseException:
            res.close()
            raise
        return res

    def _read_only(self, res: Resolved) -> bool:
        """The innermost export the walk went through decides (identified by inode)."""
        roots = self.exports.roots()
        if len(roots) <= 1:
            return res.export.read_only
        for fd in [fd for _, fd in reversed(res._stack)] + [res.root_fd]:
            st = os.fstat(fd)
            ro = roots.get((st.st_dev, st.st_ino))
            if ro is not None:
                return ro
        return res.export.read_only

    def _walk(self, res: Resolved, parts: list[str], follow_last: bool) -> None:
        pending = list(reversed(parts))  # a stack: pending[-1] is the next component
        links = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                res._pop()
                continue
            if len(os.fsencode(name)) > MAX_NAME_BYTES:
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
            last = not any(p not in ("", ".") for p in pending)
            if last and not follow_last:
                res.name = name
                return
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=res.dir_fd)
            except OSError as e:
                if e.errno == errno.ENOENT and last:
                    res.name = name  # to be created
                    return
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                try:
                    target = os.readlink(name, dir_fd=res.dir_fd)
                except OSError as e2:
                    if e2.errno == errno.EINVAL:  # not a symlink: a file
                        if last:
                            res.name = name
                            return
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
                    if e2.errno == errno.ENOENT and last:  # vanished: treat as missing
                        res.name = name
                        return
                    raise
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                self._splice(res, target, pending)
                continue
            res._push(name, fd)

    def _splice(self, res: Resolved, target: str, pending: list[str]) -> None:
        """Continue the walk through a symlink's target, never leaving the export."""
        if "\x00" in target or not target:
            raise refused("bad symlink target")
        if target.startswith("/"):
            n = len(res.export.components)
            tparts = split_components(target)
            if tuple(tparts[:n]) != res.export.components:
                raise refused("symlink points outside the export")
            res._reset()
            pending.extend(reversed(tparts[n:]))
        else:
            pending.extend(reversed(target.split("/")))

    def link_target_allowed(self, res: Resolved, target: str) -> bool:
        """Would a symlink placed at ``res`` with ``target`` stay inside the export?

        Both must hold: lexically from the link's physical directory (so a
        dangling target cannot later come to life outside), and when the
        target is walked now through the jail from that directory (so a
        symlink already on its way, such as ``up -> ../..``, cannot carry it
        out).  Following a link is independently confined by :meth:`resolve`.
        """
        if not target or "\x00" in target or len(os.fsencode(target)) > MAX_PATH_BYTES:
            return False
        if self.exports.client_os == "Windows" and not all(
            windows_name_ok(p) for p in target.split("/") if p not in ("", ".", "..")
        ):
            return False  # "..\\x" is one name here but two steps on Windows
        if target.startswith("/"):
            n = len(res.export.components)
            tparts = split_components(target)
            if tuple(tparts[:n]) != res.export.components:
                return False
            start: list[str] = []
            # The raw components, so the walk below sees ".." physically, not lexically.
            below = self._below_export(res.export, target.split("/")[1:])
            if below is None:
                return False
            walk = below
        else:
            depth = len(res.components) - 1  # directories between the root and the link
            for part in target.split("/"):
                if part == "..":
                    depth -= 1
                    if depth < 0:
                        return False
                elif part not in ("", "."):
                    depth += 1
            start = res.components[:-1]
            walk = target.split("/")
        probe = Resolved(res.export, res.export.acquire())
        try:
            self._walk(probe, start + walk, follow_last=True)
        except PermissionError:
            return False
        except OSError:
            pass  # missing or not a directory: the lexical check above decides
        finally:
            probe.close()
        return True

    @staticmethod
    def _below_export(export: Export, parts: list[str]) -> list[str] | None:
        """Strip the export's own name from an absolute target split on "/", or None."""
        rest = list(parts)
        for want in export.components:
            while rest and rest[0] in ("", "."):
                rest.pop(0)
            if not rest or rest[0] != want:
                return None
            rest.pop(0)
        return rest


def chmod_nofollow(dir_fd: int, name: str, mode: int) -> None:
    """chmod ``name`` in ``dir_fd``, never through a symlink.

    Linux cannot change a symlink's own mode, and ``fchmodat(...,
    AT_SYMLINK_NOFOLLOW)`` needs glibc 2.32; so the name is pinned with an
    ``O_PATH | O_NOFOLLOW`` descriptor, a symlink is refused (EOPNOTSUPP, as
    OpenSSH's lsetstat), and the inode the descriptor holds is changed
    through its ``/proc/self/fd`` entry (glibc's own method), with no path
    lookup a racing process could redirect.

    Raises:
        OSError: EOPNOTSUPP for a symlink, else what the kernel says.
    """
    fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat_mod.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
            return
        except FileNotFoundError:
            pass  # no /proc mounted: let the C library try
        try:
            os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
        except (NotImplementedError, ValueError):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)) from None
    finally:
        os.close(fd)
