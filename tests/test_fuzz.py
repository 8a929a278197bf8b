"""CI's short seeded batch of the SFTP fuzzer (``tests/fuzz_sftp.py``).

One run of a few thousand malformed and mutated packets, through the real
tunnel (paramiko client -> in-process X2Go server -> X2GoRevFwTunnelToSFTP ->
inner SSH server -> engine -> jail), in two batches; the tests below read its
report.  The long run is ``python -m tests.fuzz_sftp --seed N --packets 1000000``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fuzz_sftp import Fuzzer, Places, Report, packet_stream
from tests.jail_support import CREATE, EXTENDED, READ, WRITE, RawSFTP, Refused, SFTPClientAPI, _string

SEED = 11
# Two batches, so the checks after a batch run twice (the second on a server
# that has already served a batch) and every type byte comes up (about 10 % of
# packets walk the 256 type bytes in turn).
PACKETS = 4000
BATCH = 2000
# Hang and settle deadlines of this run (the CLI's are 60 s): every packet of it
# is answered in milliseconds, and a hang or a leak must fail the test within
# pytest's 120 s timeout (each batch waits out both once at worst).
DEADLINE = 10.0


@pytest.fixture(scope="module")
def report() -> Iterator[Report]:
    yield Fuzzer(SEED, PACKETS, BATCH, hang_deadline=DEADLINE, settle_deadline=DEADLINE).run()


def test_the_batch_ran_what_it_claims(report: Report) -> None:
    """Guards the other tests: the packets went out and the server was exercised."""
    assert report.packets >= PACKETS
    assert report.batches == 2
    assert len(report.types_sent) == 256, sorted(set(range(256)) - report.types_sent)
    assert report.answered > 0.9 * report.packets
    # Refusals of several kinds and successes: the requests reached the backend.
    for status in ("OK", "BAD_MESSAGE", "PERMISSION_DENIED", "NO_SUCH_FILE", "OP_UNSUPPORTED", "FAILURE"):
        assert report.statuses[status] > 0, report.statuses
    for kind in ("valid", "mutated", "type", "handle", "attrs", "path", "ext", "numbers", "lie", "limit"):
        assert report.kinds[kind] > 0, report.kinds
    assert sum(report.expected_closes.values()) > 0, "no session ended on a protocol violation"


def test_no_crash_and_no_hang(report: Report) -> None:
    assert not report.thread_crashes, report.thread_crashes[:3]
    assert not report.error_lines, report.error_lines[:3]
    assert not report.hangs, report.hangs[:3]
    assert not report.unexpected_closes, report.unexpected_closes[:3]
    assert not report.anomalies, report.anomalies[:3]
    assert not report.connections_lost, report.connections_lost[:3]


def test_no_internal_error_replies(report: Report) -> None:
    """Bad input gets a precise status, never the engine's catch-all "Internal error"."""
    assert not report.internal_errors, (dict(report.internal_error_kinds), report.internal_errors[:3])


def test_no_leak_and_sessions_still_answer(report: Report) -> None:
    assert not report.leaks, report.leaks
    assert not report.fresh_failures, report.fresh_failures
    assert not report.foreign_failures, report.foreign_failures


def test_nothing_outside_the_export_changed_or_leaked(report: Report) -> None:
    assert not report.escapes, report.escapes[:5]
    assert not report.outside_changes, report.outside_changes[:5]
    assert report.secret_leaks == 0


def test_one_seed_one_stream() -> None:
    """The generator is a function of the seed (and the handles it is given): no clock, no hash order."""
    places = Places.for_sandbox(b"/base", b"/base/export", b"/base/ro")
    first = list(packet_stream(SEED, places, 3, 300))
    assert first == list(packet_stream(SEED, places, 3, 300))
    assert first != list(packet_stream(SEED + 1, places, 3, 300))


def test_a_batch_under_gevent() -> None:
    """python-x2go runs monkey-patched by gevent: the same batch there (in a fresh interpreter)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("from gevent import monkey; monkey.patch_all(); import sys; from tests.fuzz_sftp import main; "
            "sys.exit(main())")
    res = subprocess.run(
        [sys.executable, "-c", code, "--seed", str(SEED), "--packets", str(PACKETS), "--batch",
         str(BATCH), "--deadline", str(DEADLINE)],
        capture_output=True, text=True, timeout=110, env=env, cwd=root,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "verdict: OK" in res.stdout
    assert "type bytes sent: 256/256" in res.stdout


# -- what the fuzzer's rig turned up ------------------------------------------------------------
# One copy-data request may write at most this much (the size of a sparse source it
# copies holes of is not what the client sent: 64 MiB is 256 full WRITEs of sshfs).
COPY_AMPLIFICATION_LIMIT = 64 * 1024 * 1024
SPARSE_SOURCE = 256 * 1024 * 1024


def test_one_copy_data_cannot_write_far_more_than_the_client_sent(
    make_tunnel: Callable[..., Any], connect: Callable[..., Any], export_dir: str
) -> None:
    client = connect(make_tunnel([export_dir]))
    channel = client.get_channel().get_transport().open_session()
    channel.invoke_subsystem("sftp")
    api = SFTPClientAPI(RawSFTP(channel), export_dir)
    src = api.open(export_dir + "/sparse", READ | WRITE | CREATE)
    api.write(src, SPARSE_SOURCE - 1, b"x")
    dst = api.open(export_dir + "/copy", WRITE | CREATE)
    with contextlib.suppress(Refused):  # refusing is one way to keep the bound
        api.raw.request(EXTENDED, _string("copy-data") + _string(src) + struct.pack(">QQ", 0, 0) + _string(dst)
                        + struct.pack(">Q", 0))
    copy = os.path.join(export_dir, "copy")
    written = os.stat(copy).st_blocks * 512
    os.unlink(copy)  # pytest keeps the last runs' directories: do not keep the zeros
    assert written <= COPY_AMPLIFICATION_LIMIT, f"{written >> 20} MiB written for one copy-data request"
