"""paramiko's MAC comparison: in C, the same answers, an opt-out and an undo.

Every paramiko release compares the MAC of each packet it receives in a
Python loop (``util.constant_time_bytes_eq``: ``byte_ord`` twice per byte);
:func:`x2go_sftp.paramiko_compat.fix_mac_compare` binds one that hands two
bytes objects to ``hmac.compare_digest``.  These tests count paramiko's
``byte_ord`` calls while data moves through a real tunnel (whose connections
use AES-CTR with HMAC-SHA2, paramiko's first choice), compare the answers for
every kind of input, and check the opt-out, idempotence and undo.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import paramiko
import paramiko.util
import pytest

from tests.test_asbytes import DATA_BYTES, move_data
from x2go_sftp import X2GoRevFwTunnelToSFTP, log, paramiko_compat

NAME = "constant_time_bytes_eq"


def bindings() -> dict[str, Any]:
    """Every paramiko module's ``constant_time_bytes_eq`` global, by module name."""
    return {
        name: getattr(m, NAME)
        for name, m in list(sys.modules.items())
        if m is not None and name.startswith("paramiko") and hasattr(m, NAME)
    }


@pytest.fixture
def clean_mac() -> Iterator[None]:
    """Start from paramiko's own comparison; leave the process as it was found."""
    was_applied = paramiko_compat.restore_mac_compare()
    yield
    paramiko_compat.restore_mac_compare()
    if was_applied:
        paramiko_compat.fix_mac_compare()


@pytest.fixture
def count_byte_ords(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the ``byte_ord`` calls of paramiko's MAC loop, from now on, from any thread.

    (paramiko calls ``byte_ord`` elsewhere too, e.g. for the integers of a key
    exchange: only the calls made from ``constant_time_bytes_eq`` count.)
    """
    calls: list[None] = []  # list.append is atomic under the GIL
    original = paramiko.util.byte_ord

    def counting(c: Any) -> int:
        if sys._getframe(1).f_code.co_name == NAME:
            calls.append(None)
        return int(original(c))

    monkeypatch.setattr(paramiko.util, "byte_ord", counting)
    return lambda: len(calls)


# -- the data path ---------------------------------------------------------------
def test_no_python_loop_per_packet_while_data_moves(
    clean_mac: None,
    make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
    connect: Callable[..., paramiko.SFTPClient],
    export_dir: str,
    count_byte_ords: Callable[[], int],
) -> None:
    tunnel = make_tunnel([export_dir])  # applies the fix, on every supported paramiko
    assert paramiko_compat.mac_compare_fix_applied()
    before = count_byte_ords()
    move_data(tunnel, connect, export_dir)
    assert count_byte_ords() == before


def test_opt_out_keeps_paramikos_loop(
    clean_mac: None,
    monkeypatch: pytest.MonkeyPatch,
    make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
    connect: Callable[..., paramiko.SFTPClient],
    export_dir: str,
    count_byte_ords: Callable[[], int],
) -> None:
    """With the opt-out the tunnel leaves paramiko alone, and the counter sees its loop."""
    monkeypatch.setenv(paramiko_compat.MAC_COMPARE_FIX_ENV, "0")
    before = bindings()
    tunnel = make_tunnel([export_dir])
    assert not paramiko_compat.mac_compare_fix_applied()
    assert bindings() == before
    move_data(tunnel, connect, export_dir)
    # Two byte_ord calls per MAC byte, one MAC per packet: at least one packet per 32 KiB moved.
    assert count_byte_ords() >= 2 * 32 * (DATA_BYTES // (32 * 1024))


# -- the same answer for every input -------------------------------------------------
MAC = bytes(range(100, 132))


def pairs() -> list[tuple[str, Any, Any]]:
    return [
        ("equal", MAC, bytes(MAC)),
        ("last bit", MAC, MAC[:-1] + bytes((MAC[-1] ^ 1,))),
        ("first byte", MAC, b"\x00" + MAC[1:]),
        ("shorter", MAC, MAC[:-1]),
        ("empty", b"", b""),
        ("empty and not", b"", MAC),
        ("str equal", "abc", "abc"),
        ("str differ", "abc", "abd"),
        ("bytearray", bytearray(MAC), bytearray(MAC)),
        ("memoryview", memoryview(MAC), MAC),
        ("bytes and bytearray", MAC, bytearray(MAC)),
    ]


@pytest.mark.parametrize("kind,a,b", pairs(), ids=[k for k, _, _ in pairs()])
def test_same_answer_as_paramikos(clean_mac: None, kind: str, a: Any, b: Any) -> None:
    original = paramiko_compat.paramiko_mac_compare()
    assert original is not None
    fixed = paramiko_compat.mac_compare(original)
    assert fixed(a, b) == original(a, b)
    assert fixed(b, a) == original(b, a)


# -- applied once, logged once, undone; the opt-out; a foreign function --------------
def test_applied_on_every_supported_release_once_and_undone(
    clean_mac: None, caplog: pytest.LogCaptureFixture
) -> None:
    original = paramiko_compat.paramiko_mac_compare()
    before = bindings()
    holders = sorted(name for name, f in before.items() if f is original)
    assert "paramiko.util" in holders
    logger = log.X2GoLogger(loglevel=log.loglevel_DEFAULT | log.loglevel_INFO)
    with caplog.at_level(logging.INFO, logger="x2go_sftp"):
        assert paramiko_compat.fix_mac_compare(logger)
        applied = bindings()
        assert paramiko_compat.fix_mac_compare(logger)
    assert bindings() == applied
    assert sorted(n for n, f in applied.items() if f is not original) == holders  # every holder, only those
    assert len([r for r in caplog.records if "MAC" in r.getMessage()]) == 1
    assert paramiko_compat.paramiko_mac_compare() is original
    assert paramiko_compat.restore_mac_compare()
    assert bindings() == before
    assert not paramiko_compat.restore_mac_compare()


@pytest.mark.parametrize("value", ["0", "off", "No", "false"])
def test_environment_opt_out(clean_mac: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    before = bindings()
    monkeypatch.setenv(paramiko_compat.MAC_COMPARE_FIX_ENV, value)
    assert not paramiko_compat.fix_mac_compare()
    assert bindings() == before
    monkeypatch.setenv(paramiko_compat.MAC_COMPARE_FIX_ENV, "1")
    assert paramiko_compat.fix_mac_compare()


def test_not_applied_over_a_function_that_is_not_equality(clean_mac: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def lenient(a: Any, b: Any) -> bool:
        return len(a) == len(b)

    monkeypatch.setattr(paramiko.util, NAME, lenient)
    assert not paramiko_compat.fix_mac_compare()
    assert getattr(paramiko.util, NAME) is lenient
