"""Bounds after login: what one authenticated client may cost the shared process.

Each test drives the real engine, backend and jail (through the in-process
tunnel, or on a paramiko server over a socketpair for a special-purpose
backend) and checks one bound of issue 11:

* offsets and sizes beyond ``off_t`` get a precise status, and bad input
  cannot flood the user's log (rate-limited lines);
* ``users-groups-by-id@openssh.com`` takes a bounded number of ids;
* one descriptor budget for the open handles of the whole process;
* the jail's walk holds a fixed number of descriptors whatever the depth,
  and its work per lookup is bounded;
* an export follows its path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.test_engine import (
    CLOSE,
    EXTENDED_REPLY,
    F_CREAT,
    F_READ,
    F_WRITE,
    FSETSTAT,
    FX_BAD_MESSAGE,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_PERMISSION_DENIED,
    OPEN,
    OPENDIR,
    READ,
    READDIR,
    REALPATH,
    RENAME,
    RMDIR,
    SETSTAT,
    STAT,
    STATUS,
    WRITE,
    RawSFTP,
    _packed,
    _wait_until,
    attrs,
    engine_over_socketpair,
    open_raw,
    s,
    u32,
    u64,
)
from x2go_sftp import budget, log
from x2go_sftp import engine as eng
from x2go_sftp import jail as jail_mod
from x2go_sftp.backend import JailedSFTPServer
from x2go_sftp.exports import Exports

# Everything but per-request traces: INFO lines are what a flood would produce.
_VERBOSE = log.loglevel_ERROR | log.loglevel_WARN | log.loglevel_NOTICE | log.loglevel_INFO

TOO_MANY = "Too many open files in this process"


@pytest.fixture
def verbose_tunnel(make_tunnel: Callable[..., Any], export_dir: str) -> Any:
    """A tunnel whose logger lets INFO through (the default mask would hide a flood)."""
    return make_tunnel([export_dir], loglevel=_VERBOSE)


@pytest.fixture
def sessions(verbose_tunnel: Any, session_key: paramiko.RSAKey) -> Iterator[Callable[[], tuple[paramiko.Transport, RawSFTP]]]:
    """Open initialised raw SFTP sessions on ``verbose_tunnel``; closed at teardown."""
    opened: list[paramiko.Transport] = []

    def make() -> tuple[paramiko.Transport, RawSFTP]:
        transport, client = open_raw(verbose_tunnel.server_port, session_key)
        opened.append(transport)
        client.init()
        return transport, client

    yield make
    for t in opened:
        t.close()


@pytest.fixture
def raw(sessions: Callable[[], tuple[paramiko.Transport, RawSFTP]]) -> RawSFTP:
    return sessions()[1]


@pytest.fixture
def fresh_log_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """New rate limiters, so earlier tests' lines in this window do not count here."""
    monkeypatch.setattr(eng, "_BAD_INPUT_LOG", log.RateLimiter())
    monkeypatch.setattr(eng, "_BACKEND_ERROR_LOG", log.RateLimiter())


def P(export_dir: str, *names: str) -> str:
    return os.path.join(export_dir, *names)


# -- 1. offsets beyond off_t, and a log a client cannot flood ---------------------------------------

def test_offsets_and_sizes_beyond_off_t_get_a_precise_status(raw: RawSFTP, export_dir: str) -> None:
    Path(P(export_dir, "f")).write_bytes(b"0123456789")
    h = raw.open(P(export_dir, "f"), F_READ | F_WRITE)
    out = raw.open(P(export_dir, "out"), F_WRITE | F_CREAT)
    for big in (2**63, 2**64 - 1):
        assert raw.status(READ, s(h) + u64(big) + u32(10)) == (FX_FAILURE, "Invalid argument: offset out of range")
        assert raw.status(WRITE, s(h) + u64(big) + s(b"x")) == (FX_FAILURE, "Invalid argument: offset out of range")
        assert raw.status(SETSTAT, s(P(export_dir, "f")) + attrs(size=big)) == (
            FX_FAILURE, "Invalid argument: size out of range")
        assert raw.status(FSETSTAT, s(h) + attrs(size=big)) == (FX_FAILURE, "Invalid argument: size out of range")
        copy = "copy-data"
        assert raw.ext_status(copy, s(h) + u64(big) + u64(0) + s(out) + u64(0)) == (
            FX_FAILURE, "Invalid argument: read offset out of range")
        assert raw.ext_status(copy, s(h) + u64(0) + u64(big) + s(out) + u64(0)) == (
            FX_FAILURE, "Invalid argument: length out of range")
        assert raw.ext_status(copy, s(h) + u64(0) + u64(0) + s(out) + u64(big)) == (
            FX_FAILURE, "Invalid argument: write offset out of range")
    # Nothing changed, and the session goes on.
    assert Path(P(export_dir, "f")).read_bytes() == b"0123456789"
    assert raw.read(h, 2, 3) == b"234"
    assert raw.status(CLOSE, s(h)) == (FX_OK, "Success")


def test_backend_refuses_offsets_beyond_off_t_without_raising(export_dir: str) -> None:
    """The backend's own bound, for engines that do not check (paramiko's stock one)."""
    Path(P(export_dir, "f")).write_bytes(b"data")
    exports = Exports([export_dir])
    try:
        backend = JailedSFTPServer(None, exports=exports)
        f = backend.open(P(export_dir, "f"), os.O_RDWR, paramiko.SFTPAttributes())
        try:
            for result in (f.read(2**63, 1), f.write(2**63, b"x")):
                assert (int(result), result.message) == (FX_FAILURE, "Invalid argument")
            attr = paramiko.SFTPAttributes()
            attr.st_size = 2**63
            attr._flags = attr.FLAG_SIZE
            for result in (f.chattr(attr), backend.chattr(P(export_dir, "f"), attr)):
                assert (int(result), result.message) == (FX_FAILURE, "Invalid argument")
        finally:
            f.close()
        assert Path(P(export_dir, "f")).read_bytes() == b"data"
    finally:
        exports.clear()


def test_backend_refuses_attributes_that_claim_a_field_they_lack(export_dir: str) -> None:
    """Attributes built by other code whose flags announce a field left None: a status, no system call."""
    path = P(export_dir, "f")
    Path(path).write_bytes(b"data")
    before = os.stat(path)
    exports = Exports([export_dir])
    try:
        backend = JailedSFTPServer(None, exports=exports)
        f = backend.open(path, os.O_RDWR, paramiko.SFTPAttributes())
        try:
            for flag in (paramiko.SFTPAttributes.FLAG_SIZE, paramiko.SFTPAttributes.FLAG_PERMISSIONS,
                         paramiko.SFTPAttributes.FLAG_AMTIME, paramiko.SFTPAttributes.FLAG_UIDGID):
                attr = paramiko.SFTPAttributes()
                attr._flags = flag
                for result in (f.chattr(attr), backend.chattr(path, attr), backend.lsetstat(path, attr)):
                    assert (int(result), result.message) == (FX_FAILURE, "Invalid argument"), flag
        finally:
            f.close()
        after = os.stat(path)
        assert Path(path).read_bytes() == b"data"
        assert (after.st_mode, after.st_mtime_ns, after.st_uid) == (before.st_mode, before.st_mtime_ns, before.st_uid)
    finally:
        exports.clear()


def _flood(raw: RawSFTP, packets: list[tuple[int, bytes]], expect: tuple[int, str]) -> None:
    """Send ``packets`` pipelined (a window of requests in flight) and check every reply."""
    window = 200
    for start in range(0, len(packets), window):
        batch = packets[start:start + window]
        ids = []
        for t, body in batch:
            ids.append(raw.next_id)
            raw.send(t, u32(raw.next_id) + body)
            raw.next_id += 1
        for rid in ids:
            t, reply = raw.recv()
            assert (t, reply.u32()) == (STATUS, rid)
            assert (reply.u32(), reply.string().decode()) == expect


def _lines(caplog: pytest.LogCaptureFixture, level: int, *starts: str) -> list[logging.LogRecord]:
    """Our lines at ``level`` or above whose text starts with one of ``starts``.

    Only the flood's own lines count: sessions of earlier tests may still be
    closing in this process and log their own.
    """
    return [r for r in caplog.records
            if r.name.startswith("x2go_sftp") and r.levelno >= level and r.getMessage().startswith(starts)]


def test_ten_thousand_bad_packets_give_a_bounded_number_of_log_lines(
        raw: RawSFTP, export_dir: str, caplog: pytest.LogCaptureFixture, fresh_log_limits: None) -> None:
    caplog.set_level(logging.INFO, logger="x2go_sftp")
    h = raw.open(P(export_dir, "hello.txt"))
    bad_offset = [(READ, s(h) + u64(2**64 - 1) + u32(1))] * 5_000
    truncated = [(OPEN, u32(100) + b"abc")] * 5_000  # a path string that claims more than it carries
    caplog.clear()
    _flood(raw, bad_offset, (FX_FAILURE, "Invalid argument: offset out of range"))
    _flood(raw, truncated, (FX_BAD_MESSAGE, "truncated request"))
    lines = _lines(caplog, logging.DEBUG, "sFTP read #", "sFTP open #")
    # One process-wide limiter: at most a burst per window (two if the flood spans a window's end).
    assert 1 <= len(lines) <= 2 * log.LOG_BURST, [r.getMessage() for r in lines]
    assert all(r.levelno == logging.INFO for r in lines)
    assert raw.read(h, 0, 5) == b"hello"


class _BrokenStat(JailedSFTPServer):
    """A backend with a bug: STAT raises instead of returning a status."""

    def stat(self, path: str) -> Any:
        raise RuntimeError("backend bug")


def test_a_backend_bug_answers_internal_error_and_logs_a_bounded_number_of_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fresh_log_limits: None) -> None:
    caplog.set_level(logging.INFO, logger="x2go_sftp")
    exports = Exports([str(tmp_path)])
    try:
        with engine_over_socketpair(_BrokenStat, exports=exports, logger=log.X2GoLogger(loglevel=_VERBOSE)) as raw:
            caplog.clear()
            _flood(raw, [(STAT, s(str(tmp_path)))] * 10_000, (FX_FAILURE, "Internal error"))
            errors = _lines(caplog, logging.DEBUG, "sFTP request stat failed")
            assert 1 <= len(errors) <= 2 * log.LOG_BURST
            assert all(r.levelno == logging.ERROR and "backend bug" in r.getMessage() for r in errors)
            assert raw.one_name(REALPATH, s(".")) == str(tmp_path).encode()  # still serving
    finally:
        exports.clear()


def test_rate_limiter_reports_what_it_dropped() -> None:
    said: list[str] = []

    def logger(msg: str, loglevel: int = 0) -> None:
        said.append(msg)

    limiter = log.RateLimiter(burst=3, interval=3600.0)
    logged = [log.limited(logger, limiter, f"line {i}", log.loglevel_INFO) for i in range(100)]
    assert logged == [True] * 3 + [False] * 97
    assert said == ["line 0", "line 1", "line 2"]
    limiter.interval = 0.0  # the next event opens a new window
    assert log.limited(logger, limiter, "again", log.loglevel_INFO)
    assert said[-1] == "again (97 similar messages suppressed)"


# -- 2. users-groups-by-id -------------------------------------------------------------------

def test_users_groups_by_id_takes_a_bounded_number_of_ids(raw: RawSFTP) -> None:
    ext = "users-groups-by-id@openssh.com"
    cap = eng.MAX_IDS_PER_REQUEST
    # Up to the bound, split any way between users and groups: answered.
    t, body = raw.ext(ext, s(u32(0) * (cap - 1)) + s(u32(0)))
    assert t == EXTENDED_REPLY
    assert _packed(body.string()) == [b"root"] * (cap - 1) and len(_packed(body.string())) == 1
    # One more, even with a short answer: refused before any lookup, with the reason.
    refused = (FX_FAILURE, f"Too many ids in one request (at most {cap})")
    assert raw.ext_status(ext, s(u32(0) * cap) + s(u32(0))) == refused
    # The request: ~65k distinct ids in one packet.
    many = b"".join(u32(100_000 + i) for i in range(65_000))
    assert raw.ext_status(ext, s(many) + s(b"")) == refused
    t, _ = raw.ext(ext, s(u32(0)) + s(b""))
    assert t == EXTENDED_REPLY


# -- 3. one descriptor budget for the open handles of the whole process ---------------------------

@pytest.fixture
def small_budget() -> Iterator[Callable[[int], int]]:
    """Set the process-wide handle budget to what is held now plus ``room``; restored after."""
    old = budget.handle_fds.limit

    def set_room(room: int) -> int:
        limit = budget.handle_fds.held + room
        budget.handle_fds.set_limit(limit)
        return limit

    yield set_room
    budget.handle_fds.set_limit(old)


def _open_status(raw: RawSFTP, path: str) -> tuple[int, str]:
    return raw.status(OPEN, s(path) + u32(F_READ) + attrs())


def test_one_budget_for_every_session_counting_real_descriptors(
        sessions: Callable[[], tuple[paramiko.Transport, RawSFTP]], export_dir: str,
        small_budget: Callable[[int], int]) -> None:
    os.mkdir(P(export_dir, "d"))
    os.mkfifo(P(export_dir, "fifo"))
    hello = P(export_dir, "hello.txt")
    transport_a, a = sessions()
    _, b = sessions()
    _, c = sessions()
    # Sessions of earlier tests may still be closing their handles: wait for a quiet budget.
    assert _wait_until(lambda: budget.handle_fds.held == 0)
    start = 0
    small_budget(20)
    # A listing holds two descriptors, a file one.
    dirs = [a.opendir(P(export_dir, "d")) for _ in range(5)]
    assert budget.handle_fds.held == start + 10
    files = [b.open(hello) for _ in range(10)]
    assert budget.handle_fds.held == start + 20
    # Spent: every session gets the process's answer, for files and listings alike.
    for client in (a, b, c):
        assert _open_status(client, hello) == (FX_FAILURE, TOO_MANY)
        assert client.status(OPENDIR, s(P(export_dir, "d"))) == (FX_FAILURE, TOO_MANY)
    # Failed opens gave back what they took.
    assert budget.handle_fds.held == start + 20
    # CLOSE frees: one listing closed is room for exactly two files.
    a.close(dirs.pop())
    c_files = [c.open(hello), c.open(hello)]
    assert _open_status(c, hello) == (FX_FAILURE, TOO_MANY)
    # An open that fails after taking its share (a FIFO is not a regular file) gives it back.
    b.close(files.pop())
    assert _open_status(c, P(export_dir, "fifo"))[0] == FX_FAILURE
    assert budget.handle_fds.held == start + 19
    # The end of a session frees all its handles.
    transport_a.close()
    assert _wait_until(lambda: budget.handle_fds.held == start + 19 - 8)
    more = [c.opendir(P(export_dir, "d")) for _ in range(4)]
    assert budget.handle_fds.held == start + 19
    assert c.status(OPENDIR, s(P(export_dir, "d"))) == (FX_FAILURE, TOO_MANY)  # needs two, one is left
    for h in c_files + more:
        c.close(h)
    for h in files:
        b.close(h)
    assert budget.handle_fds.held == start


def test_default_budget_leaves_half_of_rlimit_nofile_to_the_rest_of_the_process() -> None:
    script = textwrap.dedent("""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        from x2go_sftp import budget
        print(budget.default_limit(), budget.handle_fds.limit)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["512", "512"]
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert budget.default_limit() == max(budget.MIN_HANDLE_FDS, min(budget.MAX_HANDLE_FDS, soft // 2))


# -- 4. the jail's walk: descriptors independent of depth, work bounded ---------------------------

DEPTH = 1_100


def _make_chain(root: str, depth: int, leaf: bytes = b"bottom") -> None:
    """``root/d/d/.../d`` ``depth`` levels deep with a file ``f`` at the bottom (made by descriptor)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            with contextlib.suppress(FileExistsError):
                os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(wfd, leaf)
        os.close(wfd)
    finally:
        os.close(fd)


def _bottom(export_dir: str, depth: int = DEPTH) -> str:
    return export_dir + "/d" * depth


def _flatten_chain(root: str) -> None:
    """Move each level of ``root/d/d/...`` up to ``root`` (O(1) per level).

    shutil.rmtree (and so pytest's cleanup of old temporary directories)
    recurses once per level and fails on a chain deeper than Python's
    recursion limit; flattened, the chain is removed like any directory.
    """
    cur, i = os.path.join(root, "d"), 0
    while os.path.isdir(os.path.join(cur, "d")) and not os.path.islink(os.path.join(cur, "d")):
        i += 1
        os.rename(os.path.join(cur, "d"), os.path.join(root, f"level{i}"))
        cur = os.path.join(root, f"level{i}")


@pytest.fixture
def chain(export_dir: str) -> Iterator[Callable[[int], str]]:
    """Make ``export_dir/d/d/.../d/f``; returns the bottom directory.  Flattened at teardown."""
    def make(depth: int) -> str:
        _make_chain(export_dir, depth)
        return _bottom(export_dir, depth)

    yield make
    if os.path.isdir(export_dir):
        _flatten_chain(export_dir)


def test_operations_at_the_bottom_of_a_deep_chain(raw: RawSFTP, export_dir: str,
                                                   chain: Callable[[int], str]) -> None:
    bottom = chain(DEPTH)
    fd_bottom = os.open(bottom, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # "up" climbs all the way to the export root from the bottom: ".." through the walk.
        os.symlink("../" * DEPTH + "hello.txt", "up", dir_fd=fd_bottom)
        os.symlink("../../../f2", "up3", dir_fd=fd_bottom)
        depth3 = _bottom(export_dir, DEPTH - 3)
        Path(depth3 + "/f2").write_bytes(b"three up")
    finally:
        os.close(fd_bottom)
    st = raw.attrs_of(STAT, s(bottom + "/f"))
    assert isinstance(st, dict) and st["size"] == 6
    h = raw.open(bottom + "/f")
    assert raw.read(h, 0, 100) == b"bottom"
    raw.close(h)
    w = raw.open(bottom + "/new", F_WRITE | F_CREAT)
    assert raw.write(w, 0, b"written") == FX_OK
    raw.close(w)
    assert Path(bottom + "/new").read_bytes() == b"written"
    # A listing at the bottom: its ".." entry comes from the walk, re-walked by name.
    d = raw.opendir(bottom)
    names = raw.names(READDIR, s(d))
    assert isinstance(names, list)
    listed = {n: a for n, _, a in names}
    above = os.stat(_bottom(export_dir, DEPTH - 1))
    assert listed[b".."]["mtime"] == int(above.st_mtime) and listed[b".."]["perm"] == above.st_mode
    raw.close(d)
    # ".." from the bottom: three levels, and all the way up to the export root.
    h = raw.open(bottom + "/up3")
    assert raw.read(h, 0, 100) == b"three up"
    raw.close(h)
    h = raw.open(bottom + "/up")
    assert raw.read(h, 0, 100) == b"hello\n"
    raw.close(h)
    assert raw.one_name(REALPATH, s(bottom + "/up")) == (export_dir + "/hello.txt").encode()
    # One more ".." than there are levels is above the root: refused as ever.
    os.symlink("../" * (DEPTH + 1) + "hello.txt", bottom + "/too_far")
    assert raw.status(STAT, s(bottom + "/too_far")) == (FX_PERMISSION_DENIED, "Permission denied")


_FD_PROBE = textwrap.dedent("""
    import errno, os, resource, sys
    from x2go_sftp import jail
    from x2go_sftp.backend import JailedSFTPServer
    from x2go_sftp.exports import Exports

    export_dir, depth = sys.argv[1], int(sys.argv[2])
    exports = Exports([export_dir])
    backend = JailedSFTPServer(None, exports=exports)
    j = jail.Jail(exports)
    bottom = export_dir + "/d" * depth
    j.resolve(bottom).close()  # warm up: imports and caches that open files do so now
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The walk may hold WALK_MAX_FDS + 1 descriptors at a time, and nothing else is opened.
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + jail.WALK_MAX_FDS + 1, hard))
    res = j.resolve(bottom + "/f")
    assert res.name == "f" and res.depth == depth, (res.name, res.depth)
    res.close()
    with j.resolve(bottom + "/up") as res:        # ".." all the way up from the bottom
        assert res.is_root is False and res.components == ["hello.txt"], res.components
    with j.resolve(bottom + "/mid") as res:       # a run of ".." then down again
        assert res.depth == depth - 100 + 1, res.depth
    with j.resolve(bottom) as res:
        os.fstat(res.parent_fd)                   # the ".." of a listing, re-walked
    # The backend's final step and a listing (two descriptors) need two more.
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + jail.WALK_MAX_FDS + 3, hard))
    st = backend.stat(bottom + "/f")
    assert st.st_size == 6, st
    f = backend.open(bottom + "/f", os.O_RDONLY, None)
    assert f.read(0, 10) == b"bottom"
    f.close()
    d = backend.opendir(bottom)
    assert sorted(a.filename for a in d.read_batch(100)) == [".", "..", "f", "mid", "up"]
    d.close()
    print("ok")
""")


def test_the_walk_holds_a_fixed_number_of_descriptors_whatever_the_depth(
        export_dir: str, chain: Callable[[int], str]) -> None:
    """In a process whose RLIMIT_NOFILE leaves the walk exactly WALK_MAX_FDS + 1 descriptors."""
    assert jail_mod.WALK_MAX_FDS <= 16 < DEPTH  # "a small fixed number", far below the depth
    bottom = chain(DEPTH)
    os.symlink("../" * DEPTH + "hello.txt", bottom + "/up")
    os.symlink("../" * 100 + "d", bottom + "/mid")
    out = subprocess.run([sys.executable, "-c", _FD_PROBE, export_dir, str(DEPTH)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_lookup_that_would_re_walk_without_end_fails_with_eloop(
        export_dir: str, chain: Callable[[int], str]) -> None:
    """A symlink of ``../`` runs at the bottom of a deep chain: bounded work, then ELOOP."""
    depth = 1_000
    bottom = chain(depth)
    # Each run climbs one level past the descriptors the walk holds, then steps down again:
    # every run costs a re-walk from the root.  Ten such links chained.
    cycles = 60
    up_down = ("../" * (jail_mod.WALK_MAX_FDS + 1) + "d/") * cycles
    for i in range(10):
        target = up_down + "d/" * (cycles * jail_mod.WALK_MAX_FDS) + f"hop{i + 1}"
        assert len(target) < 4096
        os.symlink(target, bottom + f"/hop{i}")
    exports = Exports([export_dir])
    try:
        j = jail_mod.Jail(exports)
        with pytest.raises(OSError) as e:
            j.resolve(bottom + "/hop0").close()
        assert e.value.errno == errno.ELOOP
    finally:
        exports.clear()


# -- 5. an export follows its path ------------------------------------------------------------

def test_an_export_renamed_away_is_refused_and_a_new_folder_there_is_served(
        raw: RawSFTP, export_dir: str, tmp_path: Path) -> None:
    Path(P(export_dir, "old.txt")).write_bytes(b"old contents")
    h = raw.open(P(export_dir, "old.txt"), F_READ | F_WRITE)
    d = raw.opendir(export_dir)
    moved = tmp_path / "moved-away"
    os.rename(export_dir, moved)
    # Missing: refused with a clear status, for paths at and below the root.
    assert raw.status(STAT, s(export_dir)) == (FX_NO_SUCH_FILE, "No such file or directory")
    assert raw.status(STAT, s(P(export_dir, "old.txt")))[0] == FX_NO_SUCH_FILE
    assert _open_status(raw, P(export_dir, "old.txt"))[0] == FX_NO_SUCH_FILE
    # Handles keep working on what they opened, wherever it went.
    assert raw.read(h, 0, 3) == b"old"
    assert raw.write(h, 0, b"OLD") == FX_OK
    names = raw.names(READDIR, s(d))
    assert isinstance(names, list) and b"old.txt" in {n for n, _, _ in names}
    # A new folder at the path is what the export serves now.
    os.mkdir(export_dir)
    Path(P(export_dir, "new.txt")).write_bytes(b"new")
    assert raw.status(STAT, s(P(export_dir, "old.txt")))[0] == FX_NO_SUCH_FILE
    n = raw.open(P(export_dir, "new.txt"))
    assert raw.read(n, 0, 10) == b"new"
    raw.close(n)
    d2 = raw.opendir(export_dir)
    listing = raw.names(READDIR, s(d2))
    assert isinstance(listing, list) and {x for x, _, _ in listing} == {b".", b"..", b"new.txt"}
    w = raw.open(P(export_dir, "written.txt"), F_WRITE | F_CREAT)
    raw.close(w)
    assert (Path(export_dir) / "written.txt").exists() and not (moved / "written.txt").exists()
    # The old handle still writes into the moved folder only.
    assert raw.write(h, 3, b"!") == FX_OK
    raw.close(h)
    assert (moved / "old.txt").read_bytes() == b"OLD!contents"
    for x in (d, d2):
        raw.close(x)


def test_an_export_replaced_by_a_file_or_removed_is_refused(raw: RawSFTP, export_dir: str, tmp_path: Path) -> None:
    os.rename(export_dir, tmp_path / "gone")
    Path(export_dir).write_bytes(b"a file now")
    assert raw.status(STAT, s(export_dir))[0] == FX_NO_SUCH_FILE
    assert raw.status(OPENDIR, s(export_dir))[0] == FX_NO_SUCH_FILE
    os.unlink(export_dir)
    os.rename(tmp_path / "gone", export_dir)  # back: served again
    st = raw.attrs_of(STAT, s(P(export_dir, "hello.txt")))
    assert isinstance(st, dict) and st["size"] == 6


def test_a_nested_read_only_export_that_follows_its_path_stays_read_only_through_the_outer_one(
        make_tunnel: Callable[..., Any], session_key: paramiko.RSAKey, tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    os.symlink("inner", outer / "link")  # reaches the read-only export through the writable one
    tunnel = make_tunnel([str(outer), (str(inner), True)])
    transport, raw = open_raw(tunnel.server_port, session_key)
    try:
        raw.init()
        assert _open_status(raw, str(outer / "link" / "x"))[0] == FX_NO_SUCH_FILE  # the walk works
        # The local user puts a new folder at the read-only export's path; the first
        # request after it reaches the new folder through the outer export's symlink.
        inner.rename(outer / "old-inner")
        inner.mkdir()
        assert raw.status(OPEN, s(str(outer / "link" / "new")) + u32(F_WRITE | F_CREAT) + attrs()) == (
            FX_PERMISSION_DENIED, "Permission denied")
        assert not (inner / "new").exists()
        # The folder that was moved away is an ordinary folder of the outer export now.
        w = raw.open(str(outer / "old-inner" / "w"), F_WRITE | F_CREAT)
        raw.close(w)
    finally:
        transport.close()



def test_the_remote_side_cannot_move_an_export_or_a_folder_holding_one(
        make_tunnel: Callable[..., Any], session_key: paramiko.RSAKey, tmp_path: Path) -> None:
    """Else it could move a nested read-only export away, make a folder at its path
    (the export follows it), and write the old contents through the writable export."""
    outer = tmp_path / "outer"
    inner = outer / "sub" / "inner"
    inner.mkdir(parents=True)
    (inner / "keep.txt").write_text("keep\n")
    empty = outer / "empty-ro"
    empty.mkdir()
    os.symlink("sub", outer / "via")  # names the folders by a path no export is called
    os.symlink(".", outer / "here")
    tunnel = make_tunnel([str(outer), (str(inner), True), (str(empty), True)])
    transport, raw = open_raw(tunnel.server_port, session_key)
    denied = (FX_PERMISSION_DENIED, "Permission denied")
    try:
        raw.init()
        for old, new in ((outer / "sub", outer / "sub2"), (outer / "via" / "inner", outer / "moved"),
                         (outer / "here" / "empty-ro", outer / "moved")):
            assert raw.status(RENAME, s(str(old)) + s(str(new))) == denied
            assert raw.ext_status("posix-rename@openssh.com", s(str(old)) + s(str(new))) == denied
        assert raw.status(RMDIR, s(str(outer / "here" / "empty-ro"))) == denied
        # posix-rename over an (empty) export root would put another folder at its path.
        (outer / "decoy").mkdir()
        assert raw.ext_status("posix-rename@openssh.com", s(str(outer / "decoy")) + s(str(outer / "here" / "empty-ro"))) == denied
        assert inner.is_dir() and empty.is_dir() and (inner / "keep.txt").read_text() == "keep\n"
        # Ordinary folders of the outer export still move.
        assert raw.status(RENAME, s(str(outer / "decoy")) + s(str(outer / "decoy2"))) == (FX_OK, "Success")
        assert raw.status(RMDIR, s(str(outer / "decoy2"))) == (FX_OK, "Success")
    finally:
        transport.close()
