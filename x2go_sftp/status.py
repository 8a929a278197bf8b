"""SFTP status codes that carry their message, and the errno -> status mapping."""

from __future__ import annotations

import errno
import os

from paramiko.sftp import (
    SFTP_DESC,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
)

from .budget import EXHAUSTED_MESSAGE

# errno -> SFTP v3 status.  OpenSSH's sftp-server (errno_to_portable) maps
# ENOENT, ENOTDIR, EBADF and ELOOP to NO_SUCH_FILE, EPERM/EACCES/EFAULT to
# PERMISSION_DENIED, ENOSYS to OP_UNSUPPORTED and everything else to FAILURE;
# we add EROFS (a read-only filesystem is a refusal, not a failure).  The
# kernel's EOPNOTSUPP (chmod of a symlink) stays FAILURE, as OpenSSH: the
# request is one we do; this file system cannot.  OpenSSH answers EINVAL and
# ENAMETOOLONG with BAD_MESSAGE, which sshfs turns into EBADMSG; we keep those
# FAILURE with the errno text, since the message itself was fine.
_NO_SUCH_FILE = {errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EFAULT}
_UNSUPPORTED = {errno.ENOSYS}

# Texts that say more than strerror() where it matters to the user: EMFILE is
# the per-process limit (the kernel's, or budget.handle_fds), shared by every
# session, so the client should not look for the cause in its own session.
_MESSAGES = {errno.EMFILE: EXHAUSTED_MESSAGE}


class Status(int):
    """An SFTP status code (an ``int``, as paramiko's interface expects) with a message.

    paramiko's ``SFTPServerInterface`` methods return bare ints; returning a
    ``Status`` instead stays compatible with that contract while letting our
    engine send a useful message ("Directory not empty") instead of "Failure".
    """

    message: str

    def __new__(cls, code: int, message: str | None = None) -> Status:
        obj = super().__new__(cls, code)
        if message is None:
            try:
                message = SFTP_DESC[code]
            except IndexError:
                message = "Unknown"
        obj.message = message
        return obj

    def __repr__(self) -> str:
        return f"Status({int(self)}, {self.message!r})"


OK = Status(SFTP_OK)


def code_for_errno(err: int | None) -> int:
    """The SFTP v3 status for an errno (as OpenSSH's sftp-server maps them)."""
    if err in _NO_SUCH_FILE:
        return SFTP_NO_SUCH_FILE
    if err in _DENIED:
        return SFTP_PERMISSION_DENIED
    if err in _UNSUPPORTED:
        return SFTP_OP_UNSUPPORTED
    return SFTP_FAILURE


def from_oserror(e: OSError) -> Status:
    """Status for an OSError; the message is the errno's standard text, nothing more.

    The standard text (not ``e.strerror``) goes on the wire so that a refusal
    of an outside path reads the same whether or not that path exists.
    """
    err = e.errno
    text = (_MESSAGES.get(err) or os.strerror(err)) if err else (str(e) or "Failure")
    return Status(code_for_errno(err), text)
