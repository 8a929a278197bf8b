"""The jail under a Windows client's namespace (``/windrive/<letter>/...``), run on Linux.

On Linux a name like ``C:\\Users\\alice`` is one plain file name, so a
directory of that literal name in the current directory lets the real jail,
backend and SFTP session serve the Windows namespace here.  The Windows
rules (no backslash, ``:``, device names, trailing dots; drive letters as
exported) are enforced in the exports layer, so they hold the same on Windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.jail_support import (
    CREATE,
    READ,
    SECRET,
    WRITE,
    BackendClient,
    Client,
    RawSFTP,
    SFTPClientAPI,
    denied,
    listdir,
    read_file,
)
from x2go_sftp.exports import Exports

HOME = "/windrive/C/Users/alice"


@pytest.fixture
def winexports(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Exports]:
    monkeypatch.chdir(tmp_path)
    alice = tmp_path / "C:\\Users\\alice"
    bob = tmp_path / "C:\\Users\\bob"
    alice.mkdir()
    bob.mkdir()
    (alice / "doc.txt").write_text("doc\n")
    (bob / "secret.txt").write_bytes(SECRET)
    ex = Exports(["C:\\Users\\alice"], client_os="Windows")
    yield ex
    ex.clear()


@pytest.fixture(params=["backend", "sftp"])
def winclient(request: pytest.FixtureRequest, winexports: Exports) -> Iterator[Client]:
    if request.param == "backend":
        yield BackendClient(winexports)
        return
    sftp = request.getfixturevalue("connect")(request.getfixturevalue("make_tunnel")(winexports))
    channel = sftp.get_channel().get_transport().open_session()
    channel.invoke_subsystem("sftp")
    raw = RawSFTP(channel)
    yield SFTPClientAPI(raw, HOME)
    raw.close()


def test_windows_namespace_served(winclient: Client) -> None:
    c = winclient
    assert c.realpath(".") == HOME
    assert read_file(c, HOME + "/doc.txt") == b"doc\n"
    assert "doc.txt" in listdir(c, HOME)
    c.mkdir(HOME + "/new dir")
    c.close(c.open(HOME + "/new dir/f.txt", WRITE | CREATE))


REFUSED_FORMS = [
    "/windrive/C/Users/bob/secret.txt",
    HOME + "/../bob/secret.txt",
    HOME + "/..\\bob\\secret.txt",
    HOME + "/doc.txt\\..\\..\\bob\\secret.txt",
    "/windrive/c/Users/alice/doc.txt",  # not the exported name (drive case differs): fail closed
    HOME + "/doc.txt:hidden",  # NTFS alternate data stream
    HOME + "/doc.txt::$DATA",
    HOME + "/NUL",
    HOME + "/con.txt",
    HOME + "/doc.txt.",  # Windows would strip the dot
    HOME + "/doc.txt ",
    "/uncpath/srv/share/../../windrive/C/Users/bob/secret.txt",
    "/uncpath/srv/share/x",
    "C:\\Users\\bob\\secret.txt",  # a relative name: under home, and not a plain name
]


def test_windows_forms_refused(winclient: Client) -> None:
    c = winclient
    for path in REFUSED_FORMS:
        denied(lambda: read_file(c, path))  # noqa: B023  (called at once)
        denied(lambda: c.stat(path))  # noqa: B023
        denied(lambda: c.open(path, WRITE | CREATE))  # noqa: B023
    assert SECRET not in c.received


def test_windows_symlink_targets(winclient: Client) -> None:
    c = winclient
    for target in ("..\\bob\\secret.txt", "doc.txt:stream", "C:\\Users\\bob", "NUL"):
        denied(lambda: c.symlink(target, HOME + "/l"))  # noqa: B023  (called at once)
    c.symlink("doc.txt", HOME + "/ok")
    assert read_file(c, HOME + "/ok") == b"doc\n"
    denied(lambda: c.open(HOME + "/aux", READ))
