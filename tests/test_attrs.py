"""READDIR entries encoded straight from ``lstat`` (attrs.LongNames.entry) against the general path.

The engine encodes each listed name from its ``os.stat_result``, without an
``SFTPAttributes``; these tests hold its bytes equal to what the general path
(``SFTPAttributes.from_stat`` -> name, long name, ATTRS) and an independent
``ls -l`` line give, over real files and over stat results at the edges of the
wire format, and keep the session's caches bounded.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from paramiko.sftp_attr import SFTPAttributes

from x2go_sftp import attrs
from x2go_sftp.attrs import LongNames, pack_attrs, pack_string

from .test_engine import raw_longname


def general_path(name: str, st: os.stat_result, now: float) -> bytes:
    """The entry as the engine encodes any backend's SFTPAttributes, with the long name from raw_longname."""
    attr = SFTPAttributes.from_stat(st)
    raw = name.encode("utf-8", "surrogateescape")
    return (pack_string(raw) + pack_string(raw_longname(st, name, now).encode("utf-8", "surrogateescape"))
            + pack_attrs(attr))


def fake_stat(mode: int, nlink: int, uid: int, gid: int, size: int, atime: float, mtime: float) -> os.stat_result:
    return os.stat_result((mode, 1, 2, nlink, uid, gid, size, int(atime), int(mtime), 0, atime, mtime, 0.0))


EDGES = [
    # mode, nlink, uid, gid, size, atime, mtime
    (stat.S_IFREG | 0o644, 1, 0, 0, 0, 0.0, 0.0),
    (stat.S_IFREG | 0o4755, 70000, 0, 0, 2**63 - 1, 1.5, 1_500_000_000.75),
    (stat.S_IFDIR | 0o1777, 3, 2**32 - 2, 2**32 - 2, 4096, -1.5, -86400.25),  # unknown ids, before 1970
    (stat.S_IFLNK | 0o777, 1, 0, 0, 12, 2**33 + 0.5, 2**33 + 0.5),  # after 2106: wrapped to 32 bits
    (stat.S_IFSOCK | 0o600, 2, 0, 0, 0, time.time(), time.time() - 60),  # recent: a time, not a year
    (stat.S_IFCHR | 0o620, 1, 0, 0, 0, time.time(), time.time() + 3600),  # in the future: a year
    (stat.S_IFIFO | 0o2640, 1, 0, 0, 99999999999, 0.0, time.time() - 200 * 86400),  # older than half a year
]


@pytest.mark.parametrize("values", EDGES)
@pytest.mark.parametrize("name", ["plain.txt", "with space", "caf\udce9", "\u00e9t\u00e9", "x" * 255])
def test_entry_equals_the_general_path_at_the_edges(values: tuple, name: str) -> None:
    now = time.time()
    st = fake_stat(*values)
    names = LongNames()
    assert names.entry(name, st, now) == general_path(name, st, now)
    assert names.entry(name, st, now) == general_path(name, st, now)  # and again, from the caches


def test_entry_equals_the_general_path_for_real_files(tmp_path: Path) -> None:
    now = time.time()
    for i, (mode, when) in enumerate([(0o644, now - 60), (0o600, 1_500_000_000), (0o755, now - 3600)]):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * i * 1000)
        path.chmod(mode)
        os.utime(path, (when, when))
    os.symlink("f0", tmp_path / "link")
    os.mkdir(tmp_path / "dir")
    names = LongNames()
    for entry in os.scandir(tmp_path):
        st = entry.stat(follow_symlinks=False)
        assert names.entry(entry.name, st, now) == general_path(entry.name, st, now)
        # The long name of the SFTPAttributes path (other backends) agrees too.
        attr = SFTPAttributes.from_stat(st, entry.name)
        attr.st_nlink = st.st_nlink  # type: ignore[attr-defined]
        assert names.longname(attr, now) == raw_longname(st, entry.name, now).encode()


def test_long_name_caches_stay_bounded() -> None:
    """A listing of many distinct modes, owners and dates never grows a session's caches past the cap."""
    names = LongNames()
    now = time.time()
    count = attrs.NAME_CACHE_SIZE * 3
    for i in range(count):
        st = fake_stat(stat.S_IFREG | (i % 0o7777), 1 + i, 10_000_000 + i, 10_000_000 + i, i, now, 1_000_000 + i)
        assert names.entry(f"n{i}", st, now) == general_path(f"n{i}", st, now)
    for cache in (names._prefixes, names._dates, names._names):
        assert 0 < len(cache) <= attrs.NAME_CACHE_SIZE
