"""paramiko 2.x's ``asbytes``: no repr per packet sent, the same bytes, an opt-out and an undo.

paramiko 2.x formats the repr of every outgoing ``Message`` (its whole
payload) before sending it; :func:`x2go_sftp.paramiko_compat.fix_asbytes`
rebinds ``asbytes`` without that on the releases that do it.  These tests count
``Message.__repr__`` calls while data moves through a real tunnel, compare the
bytes for every kind of input, and check the opt-out, idempotence and undo.
On paramiko >= 3.0 there is nothing to fix and the fix must change nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import paramiko.packet
import pytest

from x2go_sftp import X2GoRevFwTunnelToSFTP, log, paramiko_compat

# What moves through the tunnel while reprs are counted: 128 SFTP READs of 32 KiB
# (sshfs's request size), so 128+ data packets on each of the two SSH hops.
DATA_BYTES = 4 * 1024 * 1024
# Under the fix nothing on the data path formats a Message's repr.
REPRS_ALLOWED_UNDER_FIX = 0

# Does this paramiko's own asbytes format the repr of a Message?  (2.x yes, 3.0+ no.)
HAS_DEFECT = paramiko_compat.asbytes_formats_repr(paramiko_compat.paramiko_asbytes() or bytes)


def paramiko_bindings() -> dict[str, Any]:
    """Every paramiko module's ``asbytes`` global, by module name."""
    return {
        name: m.asbytes
        for name, m in list(sys.modules.items())
        if m is not None and name.startswith("paramiko") and hasattr(m, "asbytes")
    }


@pytest.fixture
def clean_asbytes() -> Iterator[None]:
    """Start from paramiko's own asbytes; leave the process as it was found."""
    was_applied = paramiko_compat.restore_asbytes()
    yield
    paramiko_compat.restore_asbytes()
    if was_applied:
        paramiko_compat.fix_asbytes()


@pytest.fixture
def count_reprs(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count ``Message.__repr__`` calls from now on (from any thread); returns a reader."""
    calls: list[None] = []  # list.append is atomic under the GIL
    original = paramiko.Message.__repr__

    def counting(self: paramiko.Message) -> str:
        calls.append(None)
        return original(self)

    monkeypatch.setattr(paramiko.Message, "__repr__", counting)
    return lambda: len(calls)


def move_data(
    tunnel: X2GoRevFwTunnelToSFTP, connect: Callable[..., paramiko.SFTPClient], export_dir: str
) -> None:
    """Read DATA_BYTES and write them back through the tunnel; check both copies."""
    payload = os.urandom(DATA_BYTES)
    Path(export_dir, "big.bin").write_bytes(payload)
    sftp = connect(tunnel)
    with sftp.open("big.bin", "rb") as f:
        received = f.read(DATA_BYTES)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    with sftp.open("copy.bin", "wb") as f:
        f.write(received)
    assert (
        hashlib.sha256(Path(export_dir, "copy.bin").read_bytes()).digest() == hashlib.sha256(payload).digest()
    )


# -- the data path ---------------------------------------------------------------
def test_no_message_repr_while_data_moves(
    clean_asbytes: None,
    make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
    connect: Callable[..., paramiko.SFTPClient],
    export_dir: str,
    count_reprs: Callable[[], int],
) -> None:
    tunnel = make_tunnel([export_dir])  # applies the fix where paramiko has the defect
    assert paramiko_compat.asbytes_fix_applied() == HAS_DEFECT
    before = count_reprs()
    move_data(tunnel, connect, export_dir)
    assert count_reprs() - before <= REPRS_ALLOWED_UNDER_FIX


@pytest.mark.skipif(not HAS_DEFECT, reason="this paramiko formats no repr in asbytes (3.0 and later)")
def test_opt_out_keeps_paramikos_asbytes(
    clean_asbytes: None,
    monkeypatch: pytest.MonkeyPatch,
    make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
    connect: Callable[..., paramiko.SFTPClient],
    export_dir: str,
    count_reprs: Callable[[], int],
) -> None:
    """With the opt-out, the tunnel leaves paramiko alone (and the counter sees the defect)."""
    monkeypatch.setenv(paramiko_compat.ASBYTES_FIX_ENV, "0")
    bindings = paramiko_bindings()
    tunnel = make_tunnel([export_dir])
    assert not paramiko_compat.asbytes_fix_applied()
    assert paramiko_bindings() == bindings
    move_data(tunnel, connect, export_dir)
    # One repr per data packet sent on each hop: at least one per 32 KiB read.
    assert count_reprs() >= DATA_BYTES // (32 * 1024)


# -- same bytes for every input ----------------------------------------------------
def inputs() -> list[tuple[str, Any]]:
    message = paramiko.Message()
    message.add_byte(b"\x5e")
    message.add_int(7)
    message.add_string(b"\x00" * 40000)
    attrs = paramiko.SFTPAttributes()
    attrs.st_size, attrs.st_mode = 12345, 0o100644
    return [
        ("bytes", b"\x00\xffraw"),
        ("empty bytes", b""),
        ("str", "ascii"),
        ("non-ascii str", "f\u00fc\u00df \u2603"),
        ("Message", message),
        ("PKey", paramiko.RSAKey.generate(1024)),
        ("SFTPAttributes", attrs),
        ("bytearray", bytearray(b"ba")),
        ("memoryview", memoryview(b"mv")),
        ("int", 42),
        ("None", None),
        ("object", object()),
    ]


@pytest.mark.parametrize("kind,value", inputs(), ids=[k for k, _ in inputs()])
def test_same_result_as_paramikos_asbytes(clean_asbytes: None, kind: str, value: Any) -> None:
    original = paramiko_compat.paramiko_asbytes()
    assert original is not None and original is not paramiko_compat.asbytes_without_repr
    expected = original(value)
    got = paramiko_compat.asbytes_without_repr(value)
    assert type(got) is type(expected)
    if isinstance(expected, (bytes, str)):
        assert got == expected
    else:
        assert got is expected  # handed back unchanged, as paramiko does


def test_message_bytes_on_the_send_path(clean_asbytes: None) -> None:
    """What Packetizer.send_message sends for a Message is the same under the fix."""
    message = paramiko.Message()
    message.add_byte(b"\x5e")
    message.add_string(os.urandom(32 * 1024))
    original = paramiko_compat.paramiko_asbytes()
    assert original is not None
    expected = original(message)
    paramiko_compat.fix_asbytes()
    sender = getattr(paramiko.packet, "asbytes", None) or original  # 3.x: packet calls data.asbytes()
    assert sender(message) == expected == message.asbytes()


# -- applied only where needed; idempotent; undone -----------------------------------
def test_applied_only_where_paramiko_formats_the_repr(clean_asbytes: None) -> None:
    original = paramiko_compat.paramiko_asbytes()
    before = paramiko_bindings()
    holders = sorted(name for name, f in before.items() if f is original)
    assert paramiko_compat.fix_asbytes() == HAS_DEFECT
    after = paramiko_bindings()
    if HAS_DEFECT:
        # Every module that bound paramiko's function by name now binds the fix, and only those.
        assert {"paramiko.common", "paramiko.packet", "paramiko.message"} <= set(holders)
        assert sorted(n for n, f in after.items() if f is paramiko_compat.asbytes_without_repr) == holders
        assert not paramiko_compat.asbytes_formats_repr(paramiko.common.asbytes)
    else:
        assert after == before


@pytest.mark.skipif(not HAS_DEFECT, reason="this paramiko formats no repr in asbytes (3.0 and later)")
def test_idempotent_one_log_line_and_undo(clean_asbytes: None, caplog: pytest.LogCaptureFixture) -> None:
    before = paramiko_bindings()
    logger = log.X2GoLogger(loglevel=log.loglevel_DEFAULT | log.loglevel_INFO)
    with caplog.at_level(logging.INFO, logger="x2go_sftp"):
        assert paramiko_compat.fix_asbytes(logger)
        applied = paramiko_bindings()
        assert paramiko_compat.fix_asbytes(logger)
    assert paramiko_bindings() == applied != before
    lines = [r for r in caplog.records if "asbytes" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert paramiko_compat.restore_asbytes()
    assert paramiko_bindings() == before
    assert paramiko_compat.asbytes_formats_repr(paramiko.common.asbytes)
    assert not paramiko_compat.restore_asbytes()


@pytest.mark.skipif(not HAS_DEFECT, reason="this paramiko formats no repr in asbytes (3.0 and later)")
@pytest.mark.parametrize("value", ["0", "off", "No", "false"])
def test_environment_opt_out(clean_asbytes: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    before = paramiko_bindings()
    monkeypatch.setenv(paramiko_compat.ASBYTES_FIX_ENV, value)
    assert not paramiko_compat.fix_asbytes()
    assert paramiko_bindings() == before
    monkeypatch.setenv(paramiko_compat.ASBYTES_FIX_ENV, "1")
    assert paramiko_compat.fix_asbytes()


@pytest.mark.skipif(not HAS_DEFECT, reason="this paramiko formats no repr in asbytes (3.0 and later)")
def test_undo_reaches_modules_imported_after_the_fix(clean_asbytes: None) -> None:
    """A paramiko module imported while the fix is in effect binds it too; restore finds it."""
    import types

    original = paramiko_compat.paramiko_asbytes()
    paramiko_compat.fix_asbytes()
    late = types.ModuleType("paramiko._late_test_module")
    exec("from paramiko.common import asbytes", late.__dict__)
    sys.modules[late.__name__] = late
    try:
        assert late.asbytes is paramiko_compat.asbytes_without_repr
        paramiko_compat.restore_asbytes()
        assert late.asbytes is original
    finally:
        del sys.modules[late.__name__]


def test_not_applied_over_a_foreign_asbytes(clean_asbytes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An asbytes that does not behave as paramiko 2.x's is left alone, repr or not."""
    module = paramiko.common if hasattr(paramiko.common, "asbytes") else paramiko.util

    def foreign(s: Any) -> Any:
        repr(s)
        return b"foreign"

    monkeypatch.setattr(module, "asbytes", foreign)
    assert paramiko_compat.asbytes_formats_repr(foreign)
    assert not paramiko_compat.fix_asbytes()
    assert module.asbytes is foreign
