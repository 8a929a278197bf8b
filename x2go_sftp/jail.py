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

from . import fds
from .exports import MAX_PATH_BYTES, Export, Exports, split_components, windows_name_ok

# Linux SYMLOOP_MAX (40): the kernel's own limit on links followed in one lookup.
MAX_SYMLINKS = 40

# NAME_MAX on Linux filesystems; longer components are refused before any syscall.
MAX_NAME_BYTES = 255

# Descriptors one walk holds below the export root (the deepest levels it
# walked); a ".." past them re-walks from the root by name.  The kernel's own
# path walk holds references, not descriptors; OpenSSH's sftp-server lets the
# kernel walk.  Ours holds at most WALK_MAX_FDS + 1 descriptors at any moment
# (one more while stepping), whatever the depth: a chain 1,100 directories
# deep used to hold 1,100 and exhausted the process's limit.  8 keeps the
# "a/.." and "../x" of ordinary relative symlinks free of re-walks.
WALK_MAX_FDS = 8

# openat() calls one lookup may make, re-walks for ".." included.  The kernel
# resolves a component in O(1) from its dentry cache; our re-walks cost
# O(depth), so 40 symlinks (MAX_SYMLINKS) of 4 KiB of "../../x" at the bottom
# of a deep chain could cost millions of calls in the one process all
# sessions share.  Past this bound the lookup fails with ELOOP, as the kernel
# answers a lookup it will not finish.  Far above any real path: a 4 KiB path
# has at most 2,048 components.
MAX_WALK_STEPS = 65536

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_DIR_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# The walk needs openat/readlinkat (and the backend the other *at calls).
# Without them (Windows) every request is refused rather than served by path.
HAVE_AT_CALLS = os.open in os.supports_dir_fd and os.readlink in os.supports_dir_fd


class WalkTooLong(OSError):
    """A lookup that reached :data:`MAX_WALK_STEPS` (ELOOP, as the kernel's answer to a lookup it gives up)."""

    def __init__(self) -> None:
        super().__init__(errno.ELOOP, os.strerror(errno.ELOOP))


def refused(why: str = "outside the exported folders") -> PermissionError:
    """The one error every escape attempt gets (EACCES -> SFTP PERMISSION_DENIED)."""
    return PermissionError(errno.EACCES, why)


class Resolved:
    """A walked path: the directory descriptor holding ``name``, inside ``export``.

    ``name`` is None when the path is a directory that was itself walked into
    (the export root, or a directory reached with ``follow_last``); then
    :attr:`dir_fd` is that directory.  Use as a context manager: it closes the
    descriptors of the walk and unpins the export root.

    The walk records the physical name of every directory below the root but
    holds descriptors only for the deepest :data:`WALK_MAX_FDS` of them, so a
    chain of any depth costs a fixed number of descriptors.  A ``..`` past the
    held ones re-walks from the export root by the recorded names, each step
    ``O_NOFOLLOW``, so it reaches a directory inside the export or fails:
    never the kernel's ``..``, never a path string.
    """

    def __init__(self, export: Export, root_fd: int, roots: dict[tuple[int, int], bool] | None = None):
        self.export = export
        self.root_fd = root_fd
        # Physical names from the root down, and for each level whether it is
        # the root of an export (True/False: read-only or not), None if not.
        self._names: list[str] = []
        self._marks: list[bool | None] = []
        # Descriptors of the deepest len(self._fds) levels; _fds[-1] is level len(_names).
        self._fds: list[int] = []
        # Export roots by identity, when several exports could nest (see Jail._read_only).
        self._roots = roots if roots is not None and len(roots) > 1 else None
        self.name: str | None = None
        #: True when the place reached may not be modified: the walk's export
        #: is read-only, or the walk entered a read-only export nested in it.
        self.read_only = export.read_only
        #: openat() calls made by the walk (re-walks included), see MAX_WALK_STEPS.
        self.steps = 0
        self._closed = False

    @property
    def depth(self) -> int:
        """Directories walked into below the export root."""
        return len(self._names)

    @property
    def dir_fd(self) -> int:
        """Descriptor of the directory the final component lives in (or the directory itself)."""
        return self._fds[-1] if self._names else self.root_fd

    @property
    def parent_fd(self) -> int:
        """Descriptor of the directory above :attr:`dir_fd` (the root for the root).

        For ``..`` entries: taken from the walk (re-walked from the root by
        name if it is no longer held), so the kernel's ``..`` (which would
        leave an export whose subdirectory was moved out) is never used.
        """
        if len(self._names) < 2:
            return self.root_fd
        if len(self._fds) < 2:
            self._refill()
        return self._fds[-2]

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
        return [*self._names, self.name] if self.name is not None else list(self._names)

    @property
    def sftp_path(self) -> str:
        """The canonical SFTP name of what was resolved (symlinks expanded)."""
        return "/" + "/".join(list(self.export.components) + self.components)

    @property
    def is_root(self) -> bool:
        """True when the path is the export root itself."""
        return not self._names and self.name is None

    def read_only_marks(self) -> list[bool | None]:
        """Per level below the root: read-only flag if that directory is an export root, else None."""
        return list(self._marks)

    def _open_dir(self, name: str, dir_fd: int) -> int:
        """openat(dir_fd, name) as a directory, never through a symlink; counted in :attr:`steps`."""
        self.steps += 1
        if self.steps > MAX_WALK_STEPS:
            raise WalkTooLong()
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    def _mark(self, fd: int) -> bool | None:
        if self._roots is None:
            return None
        st = os.fstat(fd)
        return self._roots.get((st.st_dev, st.st_ino))

    def _push(self, name: str, fd: int) -> None:
        self._names.append(name)
        self._marks.append(self._mark(fd) if self._roots is not None else None)
        self._fds.append(fd)
        if len(self._fds) > WALK_MAX_FDS:
            fds.close(self._fds.pop(0))

    def _up(self, levels: int) -> None:
        """Climb ``levels`` directories (a run of ``..``), never above the export root."""
        if levels > len(self._names):
            raise refused("'..' above the export root")
        if not levels:
            return
        del self._names[len(self._names) - levels:]
        del self._marks[len(self._marks) - levels:]
        for _ in range(min(levels, len(self._fds))):
            fds.close(self._fds.pop())
        if self._names and not self._fds:
            self._refill()

    def _refill(self) -> None:
        """Hold descriptors for the deepest levels again, walking down from the root by name.

        Each step is ``openat(parent, name, O_NOFOLLOW | O_DIRECTORY)`` from
        the export root, so whatever a racing process renamed meanwhile, the
        result is a directory inside the export, or ENOENT.  At most
        :data:`WALK_MAX_FDS` + 1 descriptors are open at any moment.
        """
        for fd in self._fds:
            fds.close(fd)
        self._fds = []
        fd = self.root_fd
        fresh: list[int] = []
        try:
            for i, name in enumerate(self._names):
                try:
                    fd = self._open_dir(name, fd)
                except WalkTooLong:
                    raise
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        # Replaced by a file or a symlink since we walked it.
                        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT)) from None
                    raise
                fresh.append(fd)
                if self._roots is not None:
                    self._marks[i] = self._mark(fd)
                if len(fresh) > WALK_MAX_FDS:
                    fds.close(fresh.pop(0))
        except BaseException:
            for fd in fresh:
                fds.close(fd)
            raise
        self._fds = fresh

    def _reset(self) -> None:
        """Back to the export root (an absolute symlink restarts there)."""
        self._up(len(self._names))

    def close(self) -> None:
        """Close the walk's descriptors and unpin the export root."""
        if self._closed:
            return
        self._closed = True
        held, self._fds = self._fds, []
        for fd in held:
            fds.close(fd)
        self.export.release(self.root_fd)

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
        roots = self.exports.roots()
        res = Resolved(export, root_fd, roots)
        try:
            self._walk(res, parts, follow_last)
            res.read_only = self._read_only(res, roots)
        except BaseException:
            res.close()
            raise
        return res

    @staticmethod
    def _read_only(res: Resolved, roots: dict[tuple[int, int], bool]) -> bool:
        """The innermost export the walk went through decides (identified by inode).

        The walk marked each directory that is an export root as it entered
        it (it no longer holds every level's descriptor to look afterwards).
        """
        if len(roots) <= 1:
            return res.export.read_only
        for mark in reversed(res.read_only_marks()):
            if mark is not None:
                return mark
        st = os.fstat(res.root_fd)
        ro = roots.get((st.st_dev, st.st_ino))
        return ro if ro is not None else res.export.read_only

    def _walk(self, res: Resolved, parts: list[str], follow_last: bool) -> None:
        pending = list(reversed(parts))  # a stack: pending[-1] is the next component
        links = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                # A run of ".." climbs at once: one re-walk at most, not one per step.
                levels = 1
                while pending and pending[-1] in ("", ".", ".."):
                    levels += pending.pop() == ".."
                res._up(levels)
                continue
            if len(os.fsencode(name)) > MAX_NAME_BYTES:
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
            last = not any(p not in ("", ".") for p in pending)
            if last and not follow_last:
                res.name = name
                return
            try:
                fd = res._open_dir(name, res.dir_fd)
            except WalkTooLong:
                raise
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
        probe = Resolved(res.export, res.export.acquire(), self.exports.roots())
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
        fds.close(fd)
