"""The SFTP backend: paramiko's ``SFTPServerInterface`` over the jail.

Every method resolves its path through :class:`~x2go_sftp.jail.Jail` and does
the final operation with an ``*at`` call relative to the descriptor the walk
returned, never following a symlink in the last step.  Errors come back as a
:class:`~x2go_sftp.status.Status` (an int with a message), never as exceptions.

Beyond paramiko's interface the backend offers the methods our engine looks
for to switch on OpenSSH extensions: :meth:`opendir`, :meth:`posix_rename`,
:meth:`hardlink`, :meth:`lsetstat`, :meth:`statvfs`, :meth:`realpath`,
:meth:`home`, and on handles ``fsync``, ``statvfs``, ``read_batch``.
"""

from __future__ import annotations

import errno
import functools
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import paramiko
from paramiko.sftp import SFTP_EOF, SFTP_OK
from paramiko.sftp_attr import SFTPAttributes

from . import budget, fds, log, paramiko_compat
from .exports import Export, Exports
from .jail import Jail, Resolved, chmod_nofollow, refused
from .status import OK, Status, from_oserror

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_OPEN_EXTRA = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)

# Descriptors an open handle holds, charged to budget.handle_fds: a file its
# own; a directory its own plus the duplicate os.scandir() makes of it.
FILE_HANDLE_FDS = 1
DIR_HANDLE_FDS = 2

# off_t is signed 64-bit: larger offsets and sizes cannot reach the kernel
# (Python raises OverflowError).  OpenSSH casts the u64 to off_t and lseek()
# or ftruncate() answer EINVAL; so do we, before any system call.
MAX_OFFSET = 2**63 - 1

T = TypeVar("T")

# One limiter for the whole process: every session's refusals share it.
_BUDGET_LOG = log.RateLimiter()


def _status_on_error(fn: Callable[..., T]) -> Callable[..., T | Status]:
    """Turn OSError (and ValueError from bad client input) into a Status."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T | Status:
        try:
            return fn(self, *args, **kwargs)
        except OSError as e:
            self._log_error(fn.__name__, args, e)
            return from_oserror(e)
        except (ValueError, UnicodeError, OverflowError) as e:
            self._log_error(fn.__name__, args, e)
            return Status(paramiko.sftp.SFTP_FAILURE, "Invalid argument")

    return wrapper


def _check_offset(value: int | None, what: str = "offset") -> None:
    """EINVAL for an offset or size off_t cannot hold (as OpenSSH's lseek/ftruncate)."""
    if value is not None and not 0 <= value <= MAX_OFFSET:
        raise OSError(errno.EINVAL, f"{what} out of range")


def _flagged(value: int | None, what: str) -> int:
    """An ATTRS field whose flag is set; EINVAL if the attributes claim a field they lack.

    Attributes parsed from the wire always carry what their flags announce; an
    ``SFTPAttributes`` built by other code may not, and must not reach a system
    call as None.
    """
    if value is None:
        raise OSError(errno.EINVAL, f"{what} flagged but missing")
    return value


# copy-data moves data in chunks of this size between two open handles (as OpenSSH's sftp-server).
COPY_CHUNK = 64 * 1024

_SEEK_DATA = getattr(os, "SEEK_DATA", None)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", None)


def _next(fd: int, pos: int, end: int, data: bool) -> int:
    """Where the next data (``data``) or hole starts at or after ``pos``, at most ``end``.

    ``lseek(SEEK_DATA / SEEK_HOLE)``; where the filesystem or platform has no
    hole support, everything is data.
    """
    whence = _SEEK_DATA if data else _SEEK_HOLE
    if whence is None:
        return pos if data else end
    try:
        return min(os.lseek(fd, pos, whence), end)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at or after pos: a hole to the end of the file
            return end
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return pos if data else end
        raise


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _zero_data_extents(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` of ``fd`` read as zeros, writing only over its data extents."""
    end = min(offset + length, os.fstat(fd).st_size)  # past the end: zeros once the size grows
    pos = offset
    while pos < end:
        data_at = _next(fd, pos, end, data=True)
        if data_at >= end:
            return
        stop = _next(fd, data_at, end, data=False)
        zeros = bytes(min(COPY_CHUNK, stop - data_at))
        pos = data_at
        while pos < stop:
            n = min(len(zeros), stop - pos)
            _pwrite_all(fd, zeros[:n], pos)
            pos += n


class StatAttributes(SFTPAttributes):
    """``SFTPAttributes`` that also carry the link count, for the engine's "ls -l" long name."""

    st_nlink: int


def _attributes(st: os.stat_result, filename: str | None = None) -> StatAttributes:
    attr = StatAttributes.from_stat(st)
    attr.st_nlink = st.st_nlink
    if filename is not None:
        attr.filename = filename
    return attr


def _check_writable(place: Export | Resolved | FileHandle) -> None:
    # A Resolved knows whether its walk entered a read-only export nested in
    # a writable one (jail.Jail._read_only); an Export only its own flag.
    if place.read_only:
        raise PermissionError(errno.EACCES, "read-only export")


def _apply_attr_at(dir_fd: int, name: str, attr: SFTPAttributes) -> None:
    """SETSTAT on ``name`` in ``dir_fd`` without following a final symlink.

    Order as OpenSSH's sftp-server: size, permissions, times, owner.  Size is
    a real ``ftruncate`` (paramiko's stock helper reopened the file with "w+",
    which zero-filled it).
    """
    flags = paramiko_compat.attr_flags(attr)
    if flags & attr.FLAG_SIZE:
        size = _flagged(attr.st_size, "size")
        _check_offset(size, "size")
        fd = os.open(name, os.O_WRONLY | _OPEN_EXTRA, dir_fd=dir_fd)
        try:
            if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            os.ftruncate(fd, size)
        finally:
            fds.close(fd)
    if flags & attr.FLAG_PERMISSIONS:
        mode = _flagged(attr.st_mode, "permissions")
        try:
            # Never through a symlink, and not only on glibc >= 2.32.
            chmod_nofollow(dir_fd, name, mode & 0o7777)
        except (NotImplementedError, ValueError):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)) from None
    if flags & attr.FLAG_AMTIME:
        times = (_flagged(attr.st_atime, "atime"), _flagged(attr.st_mtime, "mtime"))
        os.utime(name, times, dir_fd=dir_fd, follow_symlinks=False)
    if flags & attr.FLAG_UIDGID:
        uid, gid = _flagged(attr.st_uid, "uid"), _flagged(attr.st_gid, "gid")
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def _apply_attr_fd(fd: int, attr: SFTPAttributes) -> None:
    flags = paramiko_compat.attr_flags(attr)
    if flags & attr.FLAG_SIZE:
        size = _flagged(attr.st_size, "size")
        _check_offset(size, "size")
        os.ftruncate(fd, size)
    if flags & attr.FLAG_PERMISSIONS:
        os.chmod(fd, _flagged(attr.st_mode, "permissions") & 0o7777)
    if flags & attr.FLAG_AMTIME:
        os.utime(fd, (_flagged(attr.st_atime, "atime"), _flagged(attr.st_mtime, "mtime")))
    if flags & attr.FLAG_UIDGID:
        os.chown(fd, _flagged(attr.st_uid, "uid"), _flagged(attr.st_gid, "gid"))


class FileHandle(paramiko.SFTPHandle):
    """An open regular file under an export; dies with the export.

    Args:
        budget_fds: descriptors taken from :data:`budget.handle_fds` for this
            handle; given back once, when it closes.
    """

    def __init__(self, fd: int, export: Export, flags: int, name: str, read_only: bool | None = None,
                 budget_fds: int = 0):
        super().__init__(flags)
        self.fd = fd
        self.export = export
        self.read_only = export.read_only if read_only is None else read_only
        self.filename = name
        self.writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        self._budget_fds = budget_fds

    def _live(self) -> int:
        if self.fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if not self.export.active:
            raise refused("export removed")
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        charged, self._budget_fds = self._budget_fds, 0
        try:
            if fd >= 0:
                fds.close(fd)
        finally:
            budget.handle_fds.give(charged)

    def read(self, offset: int, length: int) -> bytes | int:
        try:
            fd = self._live()
            _check_offset(offset)
            return os.pread(fd, length, offset)
        except OSError as e:
            return from_oserror(e)

    def fd_for_write(self, offset: int) -> int:
        """The descriptor a WRITE at ``offset`` goes to, after the checks :meth:`write` makes.

        For the engine's write-behind (:mod:`x2go_sftp.writebehind`), which
        writes there itself; raises ``OSError`` where :meth:`write` would
        return its status.
        """
        fd = self._live()
        if self.read_only:
            raise refused("read-only export")
        _check_offset(offset)
        return fd

    def write(self, offset: int, data: ReadableBuffer) -> int:
        try:
            fd = self.fd_for_write(offset)
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
            return SFTP_OK
        except OSError as e:
            return from_oserror(e)

    def stat(self) -> SFTPAttributes | int:
        try:
            return _attributes(os.fstat(self._live()))
        except OSError as e:
            return from_oserror(e)

    def chattr(self, attr: SFTPAttributes) -> int:
        try:
            fd = self._live()
            _check_writable(self)
            _apply_attr_fd(fd, attr)
            return OK
        except OSError as e:
            return from_oserror(e)

    def fsync(self) -> int:
        """fsync@openssh.com."""
        try:
            os.fsync(self._live())
            return OK
        except OSError as e:
            return from_oserror(e)

    def statvfs(self) -> os.statvfs_result | int:
        """fstatvfs@openssh.com."""
        try:
            return os.fstatvfs(self._live())
        except OSError as e:
            return from_oserror(e)

    def copy_range(self, dst: FileHandle, src_offset: int, length: int, dst_offset: int) -> int:
        """copy-data: ``length`` bytes (0: to the end of the file) from here to ``dst``, holes kept as holes.

        OpenSSH's sftp-server reads and writes every byte, holes included, so
        one request naming a sparse source (one byte written at 1 GiB) puts a
        GiB of zeros on disk and costs seconds of CPU: here, in a process all
        sessions share, that is a cheap amplification.  Data extents
        (``SEEK_DATA``/``SEEK_HOLE``) are copied; a hole of the source costs
        nothing where the destination is a hole or past its end too, and
        zeros are written only over data the destination already has.  The
        result is byte for byte OpenSSH's.  Filesystems without hole support
        report all data, and the copy is the plain one.

        Returns:
            SFTP_OK, SFTP_EOF when the source ends before ``length``, or an error status.
        """
        try:
            fd, out = self._live(), dst._live()
            if dst.read_only or not dst.writable:
                raise refused("read-only export") if dst.read_only else OSError(errno.EBADF, "not open for writing")
            _check_offset(src_offset, "read offset")
            _check_offset(dst_offset, "write offset")
            size = os.fstat(fd).st_size
            end = size if length == 0 else min(src_offset + length, size)
            _check_offset(dst_offset + max(end - src_offset, 0), "write offset")
            pos = src_offset
            while pos < end:
                data_at = _next(fd, pos, end, data=True)
                if data_at > pos:  # a hole of the source
                    _zero_data_extents(out, dst_offset + (pos - src_offset), data_at - pos)
                    pos = data_at
                    continue
                stop = _next(fd, pos, end, data=False)
                while pos < stop:
                    chunk = os.pread(fd, min(COPY_CHUNK, stop - pos), pos)
                    if not chunk:  # the file shrank under us
                        stop = end = pos
                        break
                    _pwrite_all(out, chunk, dst_offset + (pos - src_offset))
                    pos += len(chunk)
            if end > src_offset and os.fstat(out).st_size < dst_offset + (end - src_offset):
                os.ftruncate(out, dst_offset + (end - src_offset))  # a trailing hole: the size, no blocks
            return SFTP_OK if length == 0 or src_offset + length <= end else SFTP_EOF
        except OSError as e:
            return from_oserror(e)

    def same_file(self, other: Any) -> bool:
        """True if ``other`` is an open handle on the same file (copy-data refuses that)."""
        if not isinstance(other, FileHandle) or self.fd < 0 or other.fd < 0:
            return False
        a, b = os.fstat(self.fd), os.fstat(other.fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class DirHandle(paramiko.SFTPHandle):
    """An open directory, listed in batches straight from the kernel (never whole)."""

    def __init__(self, fd: int, export: Export, name: str, at_root: bool, parent_fd: int | None = None,
                 budget_fds: int = 0):
        super().__init__(0)
        self.export = export
        self.filename = name
        self._fd = fd
        self._budget_fds = 0
        here = os.fstat(fd)
        # Never reveal the attributes of the directory above an export.
        if at_root:
            up = here
        elif parent_fd is not None:
            up = os.fstat(parent_fd)  # from the walk: the kernel's ".." may lie outside
        else:
            up = os.stat("..", dir_fd=fd)
        self._pending: list[tuple[str, os.stat_result]] = [(".", here), ("..", up)]
        self._scan = os.scandir(fd)  # works on its own dup of fd; the last step that can fail
        # From here on close() gives the budget back (until here it is the caller's to give).
        self._budget_fds = budget_fds

    def read_stats(self, max_names: int) -> list[tuple[str, os.stat_result]] | int:
        """Up to ``max_names`` entries as ``(name, lstat result)``; [] at the end of the directory.

        The listing primitive: the engine encodes READDIR replies straight from
        these (:meth:`x2go_sftp.attrs.LongNames.entry`), without building an
        ``SFTPAttributes`` per name.  A subclass that filters or adds entries
        overrides this one; :meth:`read_batch` follows it.
        """
        if not self.export.active:
            return from_oserror(refused("export removed"))
        out = self._pending[:max_names]
        del self._pending[:max_names]
        while len(out) < max_names:
            try:
                entry = next(self._scan)
            except StopIteration:
                break
            except OSError as e:
                return from_oserror(e)
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False)))
            except OSError:
                continue  # removed while listing
        return out

    def read_batch(self, max_names: int) -> list[SFTPAttributes] | int:
        """Up to ``max_names`` entries as ``SFTPAttributes``; [] at the end of the directory."""
        batch = self.read_stats(max_names)
        if not isinstance(batch, list):
            return batch
        return [_attributes(st, name) for name, st in batch]

    def push_back(self, entries: list[tuple[str, os.stat_result]]) -> None:
        """Return entries of :meth:`read_stats` that did not fit in a reply; they come first next time."""
        self._pending[:0] = entries

    def _get_next_files(self) -> list[SFTPAttributes]:
        # paramiko's stock SFTPServer pulls 16 names at a time through this.
        batch = self.read_batch(16)
        return batch if isinstance(batch, list) else []

    def close(self) -> None:
        charged, self._budget_fds = self._budget_fds, 0
        try:
            if self._fd >= 0:
                self._fd, fd = -1, self._fd
                try:
                    self._scan.close()
                finally:
                    fds.close(fd)
        finally:
            budget.handle_fds.give(charged)


class JailedSFTPServer(paramiko.SFTPServerInterface):
    """paramiko ``SFTPServerInterface`` serving only the given exports.

    Args:
        server: the inner SSH ``ServerInterface`` (paramiko passes it).
        exports: the :class:`~x2go_sftp.exports.Exports` to serve; none: refuse all.
        logger: an X2Go-style logger.
    """

    def __init__(
        self,
        server: paramiko.ServerInterface,
        *args: Any,
        exports: Exports | None = None,
        logger: log.LoggerLike | None = None,
        **kwargs: Any,
    ):
        super().__init__(server, *args, **kwargs)
        self.exports = exports if exports is not None else Exports()
        self.jail = Jail(self.exports)
        self.logger = log.tagged(logger, "sftp")

    # -- helpers -----------------------------------------------------------
    def _log_error(self, op: str, args: tuple[Any, ...], e: Exception) -> None:
        if self.logger.enabled(log.loglevel_DEBUG_SFTPXFER):
            self.logger(f"{op}{args!r}: {e}", loglevel=log.loglevel_DEBUG_SFTPXFER)
        if isinstance(e, PermissionError) and e.errno == errno.EACCES and not len(self.exports):
            self.logger(f"{op} refused: nothing is exported", loglevel=log.loglevel_WARN)

    def _resolve(self, path: str, follow_last: bool = True) -> Resolved:
        return self.jail.resolve(path, follow_last=follow_last)

    def _take_budget(self, n: int) -> None:
        """Take ``n`` descriptors from the process-wide handle budget, or refuse the request."""
        try:
            budget.handle_fds.take(n)
        except budget.BudgetExhausted:
            log.limited(self.logger, _BUDGET_LOG,
                        f"refusing a handle: the {budget.handle_fds.limit} descriptors for open "
                        f"handles of this process are in use", log.loglevel_NOTICE)
            raise

    def _resolve_named(self, path: str) -> Resolved:
        """Resolve for an operation on the final name itself (never the export root)."""
        res = self._resolve(path, follow_last=False)
        if res.name is None:
            res.close()
            raise refused("operation on an export root")
        return res

    # -- session ------------------------------------------------------------
    def session_started(self) -> None:
        self.logger("sFTP session started", loglevel=log.loglevel_DEBUG)

    def session_ended(self) -> None:
        self.logger("sFTP session ended", loglevel=log.loglevel_DEBUG)

    # -- files ----------------------------------------------------------------
    @_status_on_error
    def open(self, path: str, flags: int, attr: SFTPAttributes) -> FileHandle:
        excl = bool(flags & os.O_CREAT and flags & os.O_EXCL)
        with self._resolve(path, follow_last=not excl) as res:
            if flags & _WRITE_FLAGS:
                _check_writable(res)
            if res.name is None:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            mode = 0o666
            if attr is not None and paramiko_compat.attr_flags(attr) & attr.FLAG_PERMISSIONS:
                mode = _flagged(attr.st_mode, "permissions") & 0o7777
            self._take_budget(FILE_HANDLE_FDS)
            fd = -1
            try:
                fd = os.open(res.name, flags | _OPEN_EXTRA, mode, dir_fd=res.dir_fd)
                if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                return FileHandle(fd, res.export, flags, res.sftp_path, res.read_only,
                                  budget_fds=FILE_HANDLE_FDS)
            except BaseException:
                if fd >= 0:
                    fds.close(fd)
                budget.handle_fds.give(FILE_HANDLE_FDS)
                raise

    @_status_on_error
    def opendir(self, path: str) -> DirHandle:
        with self._resolve(path) as res:
            self._take_budget(DIR_HANDLE_FDS)
            fd = -1
            try:
                if res.name is not None:
                    fd = os.open(
                        res.name, os.O_RDONLY | os.O_DIRECTORY | _OPEN_EXTRA, dir_fd=res.dir_fd
                    )
                else:
                    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=res.dir_fd)
                return DirHandle(fd, res.export, res.sftp_path, res.is_root, res.parent_fd,
                                 budget_fds=DIR_HANDLE_FDS)
            except BaseException:
                if fd >= 0:
                    fds.close(fd)
                budget.handle_fds.give(DIR_HANDLE_FDS)
                raise

    @_status_on_error
    def list_folder(self, path: str) -> list[SFTPAttributes]:
        handle = self.opendir(path)
        if not isinstance(handle, DirHandle):
            return handle  # type: ignore[return-value]
        try:
            out: list[SFTPAttributes] = []
            while True:
                batch = handle.read_batch(1024)
                if not isinstance(batch, list):
                    return batch  # type: ignore[return-value]
                if not batch:
                    return [a for a in out if a.filename not in (".", "..")]
                out.extend(batch)
        finally:
            handle.close()

    # -- attributes -----------------------------------------------------------
    @_status_on_error
    def stat(self, path: str) -> SFTPAttributes:
        return self._stat(path, follow_last=True)

    @_status_on_error
    def lstat(self, path: str) -> SFTPAttributes:
        return self._stat(path, follow_last=False)

    def _stat(self, path: str, follow_last: bool) -> SFTPAttributes:
        # With follow_last the walk has already expanded a final symlink, so the
        # last step never follows one either way.
        with self._resolve(path, follow_last=follow_last) as res:
            if res.name is None:
                return _attributes(os.fstat(res.dir_fd))
            return _attributes(os.stat(res.name, dir_fd=res.dir_fd, follow_symlinks=False))

    @_status_on_error
    def chattr(self, path: str, attr: SFTPAttributes) -> int:
        return self._setstat(path, attr, follow_last=True)

    @_status_on_error
    def lsetstat(self, path: str, attr: SFTPAttributes) -> int:
        """lsetstat@openssh.com: SETSTAT that never follows a final symlink."""
        return self._setstat(path, attr, follow_last=False)

    def _setstat(self, path: str, attr: SFTPAttributes, follow_last: bool) -> int:
        with self._resolve(path, follow_last=follow_last) as res:
            _check_writable(res)
            if res.name is None:
                _apply_attr_fd_dir(res.dir_fd, attr)
            else:
                _apply_attr_at(res.dir_fd, res.name, attr)
            return OK

    @_status_on_error
    def statvfs(self, path: str) -> os.statvfs_result:
        """statvfs@openssh.com."""
        with self._resolve(path) as res:
            if res.name is None:
                return os.fstatvfs(res.dir_fd)
            fd = os.open(res.name, getattr(os, "O_PATH", os.O_RDONLY) | _OPEN_EXTRA, dir_fd=res.dir_fd)
            try:
                return os.fstatvfs(fd)
            finally:
                fds.close(fd)

    # -- names ------------------------------------------------------------------
    @_status_on_error
    def remove(self, path: str) -> int:
        with self._resolve_named(path) as res:
            _check_writable(res)
            os.unlink(res.leaf, dir_fd=res.dir_fd)
            return OK

    @_status_on_error
    def mkdir(self, path: str, attr: SFTPAttributes) -> int:
        with self._resolve_named(path) as res:
            _check_writable(res)
            mode = 0o777
            if attr is not None and paramiko_compat.attr_flags(attr) & attr.FLAG_PERMISSIONS:
                mode = _flagged(attr.st_mode, "permissions") & 0o7777
            os.mkdir(res.leaf, mode, dir_fd=res.dir_fd)
            return OK

    @_status_on_error
    def rmdir(self, path: str) -> int:
        with self._resolve_named(path) as res:
            _check_writable(res)
            self._refuse_export_roots(res)
            os.rmdir(res.leaf, dir_fd=res.dir_fd)  # never recursive
            return OK

    def _refuse_export_roots(self, res: Resolved) -> None:
        """EACCES if ``res`` names a directory that is, or holds, an export's root.

        Exports follow their path (exports.Export.follow).  If the remote side
        could move a read-only export nested in a writable one (or a folder
        above it) and make a new folder at its path, the export would follow
        to the new folder and the old one, reached through the writable
        export, would be writable.  So, as the root of its own export already
        is, every export root and every folder on an export's path is fixed
        for the remote side: only the local user moves them.
        """
        if len(self.exports) < 2 or res.name is None:
            return
        try:
            st = os.stat(res.name, dir_fd=res.dir_fd, follow_symlinks=False)
        except OSError:
            return  # nothing there (yet): the operation itself will say so
        if stat_mod.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in self.exports.fixed_dirs():
            raise refused("an exported folder or a folder holding one")

    def _two_names(self, oldpath: str, newpath: str) -> tuple[Resolved, Resolved]:
        old = self._resolve_named(oldpath)
        try:
            new = self._resolve_named(newpath)
        except BaseException:
            old.close()
            raise
        if old.export is not new.export:
            old.close()
            new.close()
            raise OSError(errno.EXDEV, "source and target are in different exports")
        try:
            if old.read_only or new.read_only:
                raise refused("read-only export")
            self._refuse_export_roots(old)
            self._refuse_export_roots(new)  # posix-rename would replace an empty one
        except BaseException:
            old.close()
            new.close()
            raise
        return old, new

    @_status_on_error
    def rename(self, oldpath: str, newpath: str) -> int:
        """SFTP v3 RENAME: never replaces an existing target (as OpenSSH's sftp-server)."""
        old, new = self._two_names(oldpath, newpath)
        with old, new:
            st = os.stat(old.leaf, dir_fd=old.dir_fd, follow_symlinks=False)
            if stat_mod.S_ISREG(st.st_mode):
                # link + unlink: atomic "fail if the target exists" for files.
                try:
                    os.link(old.leaf, new.leaf, src_dir_fd=old.dir_fd, dst_dir_fd=new.dir_fd,
                            follow_symlinks=False)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    _rename_noreplace(old, new)
                else:
                    try:
                        os.unlink(old.leaf, dir_fd=old.dir_fd)
                    except OSError:
                        # As OpenSSH: undo the link so the file keeps exactly one name.
                        os.unlink(new.leaf, dir_fd=new.dir_fd)
                        raise
            else:
                _rename_noreplace(old, new)
            return OK

    @_status_on_error
    def posix_rename(self, oldpath: str, newpath: str) -> int:
        """posix-rename@openssh.com: atomic replace."""
        old, new = self._two_names(oldpath, newpath)
        with old, new:
            os.rename(old.leaf, new.leaf, src_dir_fd=old.dir_fd, dst_dir_fd=new.dir_fd)
            return OK

    @_status_on_error
    def hardlink(self, oldpath: str, newpath: str) -> int:
        """hardlink@openssh.com: both ends inside the same export."""
        old, new = self._two_names(oldpath, newpath)
        with old, new:
            os.link(old.leaf, new.leaf, src_dir_fd=old.dir_fd, dst_dir_fd=new.dir_fd,
                    follow_symlinks=False)
            return OK

    @_status_on_error
    def symlink(self, target_path: str, path: str) -> int:
        """Create ``path`` -> ``target_path``; a target that leaves the export is refused."""
        with self._resolve_named(path) as res:
            _check_writable(res)
            if not self.jail.link_target_allowed(res, target_path):
                raise refused("symlink target outside the export")
            os.symlink(target_path, res.leaf, dir_fd=res.dir_fd)
            return OK

    @_status_on_error
    def readlink(self, path: str) -> str:
        with self._resolve_named(path) as res:
            return os.readlink(res.leaf, dir_fd=res.dir_fd)

    @_status_on_error
    def realpath(self, path: str) -> str:
        """Canonical name with symlinks expanded; the final component may not exist."""
        with self._resolve(path) as res:
            return res.sftp_path

    def canonicalize(self, path: str) -> str:
        # paramiko's stock engine wants a string no matter what; ours uses realpath().
        result = self.realpath(path)
        if isinstance(result, str):
            return result
        home = self.exports.home or "/"
        try:
            return self.exports.normalize(path)
        except OSError:
            return home

    def home(self) -> str | None:
        """Our "home": the first export (what REALPATH "." and ``~`` resolve to)."""
        return self.exports.home

    def iter_exports(self) -> Iterator[Export]:
        return iter(self.exports)


def _apply_attr_fd_dir(dir_fd: int, attr: SFTPAttributes) -> None:
    """SETSTAT on a directory we hold as an O_PATH descriptor (an export root or walked dir)."""
    if paramiko_compat.attr_flags(attr) & attr.FLAG_SIZE:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        _apply_attr_fd(fd, attr)
    finally:
        fds.close(fd)


def _rename_noreplace(old: Resolved, new: Resolved) -> None:
    """rename that fails with EEXIST if the target exists (best effort without renameat2)."""
    try:
        os.stat(new.leaf, dir_fd=new.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(old.leaf, new.leaf, src_dir_fd=old.dir_fd, dst_dir_fd=new.dir_fd)
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
