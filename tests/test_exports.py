"""The exports layer: path functions (POSIX and Windows forms), the registry, root pinning."""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from x2go_sftp.exports import (
    MAX_PATH_BYTES,
    Export,
    Exports,
    local_to_sftp,
    normalize,
    sftp_to_windows_local,
    split_components,
    windows_local_to_sftp,
    windows_name_ok,
)


# -- POSIX names -------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, parts",
    [
        ("/a/b", ["a", "b"]),
        ("//a///b//", ["a", "b"]),
        ("/a/./b/.", ["a", "b"]),
        ("/a/../b", ["b"]),
        ("/../../a", ["a"]),  # ".." at the top stays at the top, as the kernel's "/.."
        ("a/b/../../..", []),
        ("/a/%2e%2e/b", ["a", "%2e%2e", "b"]),  # no URL decoding
        ("/a\\..\\b", ["a\\..\\b"]),  # a backslash is a name character on POSIX
    ],
)
def test_split_components(path: str, parts: list[str]) -> None:
    assert split_components(path) == parts


def test_normalize_relative_starts_at_home() -> None:
    assert normalize("x/../y", "/home/a") == "/home/a/y"
    assert normalize("../../etc", "/home/a") == "/etc"  # lexical; the export check refuses it
    assert normalize("x", None) == "/x"


def test_local_to_sftp_posix() -> None:
    assert local_to_sftp("/home/a//Docs/", "Linux") == "/home/a/Docs"
    with pytest.raises(ValueError):
        local_to_sftp("relative/dir", "Linux")


# -- Windows names ------------------------------------------------------------------
@pytest.mark.parametrize(
    "local, sftp",
    [
        ("C:\\Users\\alice", "/windrive/C/Users/alice"),
        ("c:\\users\\alice", "/windrive/c/users/alice"),
        ("d:/Data/x y", "/windrive/d/Data/x y"),
        ("C:\\", "/windrive/C"),
        ("\\\\server\\share", "/uncpath/server/share"),
        ("\\\\server\\share\\dir\\sub", "/uncpath/server/share/dir/sub"),
        ("//server/share/dir", "/uncpath/server/share/dir"),
    ],
)
def test_windows_local_to_sftp_round_trip(local: str, sftp: str) -> None:
    assert windows_local_to_sftp(local) == sftp
    assert windows_local_to_sftp(sftp_to_windows_local(sftp)) == sftp


@pytest.mark.parametrize(
    "local",
    [
        "C:relative",  # relative to the drive's current directory
        "C:",
        "relative\\dir",
        "\\\\?\\C:\\Windows",  # device namespace: no Win32 normalisation at all
        "\\\\.\\PhysicalDrive0",
        "\\\\server",  # UNC without a share
        "C:\\Users\\..\\..\\Windows",
        "C:\\Users\\alice\\NUL",
        "C:\\Users\\con.txt",
        "C:\\dir.\\x",  # Windows strips the trailing dot
        "C:\\a:stream",  # NTFS alternate data stream
        "1:\\x",
    ],
)
def test_windows_local_to_sftp_refuses(local: str) -> None:
    with pytest.raises(ValueError):
        windows_local_to_sftp(local)


@pytest.mark.parametrize(
    "sftp, local",
    [
        ("/windrive/C/Users/alice", "C:\\Users\\alice"),
        ("/windrive/c/Users/alice", "c:\\Users\\alice"),
        ("/windrive/C/x", "C:\\x"),
        ("/windrive/C/a/../b", "C:\\b"),  # lexically normalised first
        ("/uncpath/srv/share/d", "\\\\srv\\share\\d"),
    ],
)
def test_sftp_to_windows_local(sftp: str, local: str) -> None:
    assert sftp_to_windows_local(sftp) == local


@pytest.mark.parametrize(
    "sftp",
    [
        "/windrive/c/a\\..\\..\\Windows",  # a backslash would become a separator
        "/windrive/c/x:y",
        "/windrive/c/AUX",
        "/windrive/c/lpt1.log",
        "/windrive/c/name ",
        "/windrive/cc/x",
        "/windrive",
        "/uncpath/srv",
        "/home/alice",
        "/windrive/c/../../etc",
    ],
)
def test_sftp_to_windows_local_refuses(sftp: str) -> None:
    with pytest.raises(ValueError):
        sftp_to_windows_local(sftp)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("report.txt", True),
        ("x y", True),
        ("..a", True),
        ("émigré", True),
        ("", False),
        (".", False),
        ("..", False),
        ("a\\b", False),
        ("a:b", False),
        ("a*", False),
        ("a?", False),
        ('a"', False),
        ("a<b", False),
        ("a|b", False),
        ("a\x01", False),
        ("trail.", False),
        ("trail ", False),
        ("CON", False),
        ("con", False),
        ("Nul.txt", False),
        ("COM1", False),
        ("lpt9.tar.gz", False),
        ("CONIN$", False),
        ("console", True),
        ("COM10", True),
    ],
)
def test_windows_name_ok(name: str, ok: bool) -> None:
    assert windows_name_ok(name) is ok


# -- the registry ---------------------------------------------------------------------
def test_find_longest_export_and_refusal(tmp_path: Any) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "ab").mkdir()
    ex = Exports([str(tmp_path / "a"), str(tmp_path / "a" / "b")])
    try:
        export, below = ex.find(str(tmp_path / "a" / "b" / "x"))
        assert export.sftp_path == str(tmp_path / "a" / "b") and below == ["x"]
        export, below = ex.find(str(tmp_path / "a" / "c"))
        assert export.sftp_path == str(tmp_path / "a") and below == ["c"]
        for outside in (str(tmp_path / "ab" / "x"), str(tmp_path), "/"):  # "ab" is not under "a"
            with pytest.raises(PermissionError) as e:
                ex.find(outside)
            assert e.value.errno == errno.EACCES
    finally:
        ex.clear()


def test_normalize_refuses_nul_and_overlong(tmp_path: Any) -> None:
    ex = Exports([str(tmp_path)])
    try:
        with pytest.raises(OSError) as e:
            ex.normalize("a\x00b")
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            ex.normalize("/" + "a" * MAX_PATH_BYTES)
        assert e.value.errno == errno.ENAMETOOLONG
        assert ex.normalize("x") == str(tmp_path) + "/x"
    finally:
        ex.clear()


def test_export_follows_its_path_by_identity(tmp_path: Any) -> None:
    """Renamed away: refused while the path is missing; a new folder there is served.

    A walk that pinned the old root keeps its descriptor until it lets go,
    and only then is it closed (a number is never reused under a walk).
    """
    d = tmp_path / "d"
    d.mkdir()
    (d / "mine.txt").write_text("mine")
    export = Export(str(d))
    try:
        old_fd = export.acquire()  # a walk running across the rename
        os.rename(d, tmp_path / "moved")
        with pytest.raises(FileNotFoundError):
            export.acquire()
        d.mkdir()
        (d / "new.txt").write_text("new")
        fd = export.acquire()
        try:
            assert fd != old_fd
            assert os.stat("new.txt", dir_fd=fd).st_size == 3  # the folder now at the path
            assert os.stat("mine.txt", dir_fd=old_fd).st_size == 4  # the running walk's, still open
            st = os.stat(d)
            assert export.root_id == (st.st_dev, st.st_ino)
        finally:
            export.release(fd)
        export.release(old_fd)
        with pytest.raises(OSError) as e:
            os.fstat(old_fd)
        assert e.value.errno == errno.EBADF
        # Moved back: the path names the first directory again, and it is served again.
        d.rename(tmp_path / "second")
        (tmp_path / "moved").rename(d)
        fd = export.acquire()
        try:
            assert os.stat("mine.txt", dir_fd=fd).st_size == 4
        finally:
            export.release(fd)
        # A file at the path is not a folder to serve.
        d.rename(tmp_path / "third")
        d.write_text("not a directory")
        with pytest.raises(FileNotFoundError):
            export.acquire()
    finally:
        export.close()


def test_root_pinned_until_last_release(tmp_path: Any) -> None:
    """close() deactivates at once, but the descriptor lives until every walk let go."""
    export = Export(str(tmp_path))
    fd1 = export.acquire()
    fd2 = export.acquire()
    export.close()
    assert not export.active
    with pytest.raises(PermissionError):
        export.acquire()
    export.release()
    os.fstat(fd1)  # still open: one walk still holds it
    export.release()
    with pytest.raises(OSError) as e:
        os.fstat(fd2)
    assert e.value.errno == errno.EBADF


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond (not every 5 ms), so that races show within a test."""
    was = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(was)


def test_lookups_never_see_exports_half_changed(tmp_path: Any, frequent_thread_switches: None) -> None:
    """Requests read the exports without a lock while others are added, replaced and removed:
    each lookup sees them before a change or after it, never an export missing in between."""
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.mkdir()
    other.mkdir()
    ex = Exports([str(shared)])
    path = ex.normalize(local_to_sftp(str(shared)) + "/dir/file")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            ex.add(str(shared))  # replaces the export of that name
            ex.add(str(other))
            ex.remove(str(other))

    thread = threading.Thread(target=churn)
    thread.start()
    missing = 0
    try:
        for _ in range(20_000):
            try:
                export, below = ex.find(path)
            except PermissionError:
                missing += 1
                continue
            assert export.local_path == str(shared) and below == ["dir", "file"]
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert missing == 0


def test_replacing_the_first_export_keeps_it_home(tmp_path: Any) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    ex = Exports([str(first), str(second)])
    home = ex.home
    assert home == local_to_sftp(str(first))
    ex.add(str(first), read_only=True)
    assert ex.home == home and len(ex) == 2
    assert [e.local_path for e in ex] == [str(first), str(second)]
    assert ex.find(ex.normalize("x"))[0].read_only


def test_add_replace_remove(tmp_path: Any) -> None:
    ex = Exports()
    first = ex.add(str(tmp_path))
    second = ex.add(str(tmp_path), read_only=True)
    assert not first.active and second.active and len(ex) == 1
    assert ex.roots() == {second.root_id: True}
    assert ex.remove(str(tmp_path)) and not second.active
    assert not ex.remove(str(tmp_path))
    assert ex.home is None


def test_roots_stricter_wins(tmp_path: Any) -> None:
    """The same directory under two names: read-only if either export is."""
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "alias")
    ex = Exports([str(tmp_path / "real"), (str(tmp_path / "alias"), True)])
    try:
        assert list(ex.roots().values()) == [True]
    finally:
        ex.clear()


@pytest.mark.parametrize("local", ["C:\\Users\\alice\\Documents", "d:\\Data\\x y", "E:\\"])
def test_windrive_names_match_what_python_x2go_sends(local: str) -> None:
    # python-x2go's share_local_folder on Windows (backends/terminal/plain.py):
    sent = "/windrive/{}".format(local.replace("\\", "/").replace(":", ""))
    assert windows_local_to_sftp(local) == "/" + "/".join(p for p in sent.split("/") if p)
