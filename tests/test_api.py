"""The public contract kept from python-x2go: names, signatures, log levels, logger protocol."""

from __future__ import annotations

import inspect
import io
import logging
import subprocess
import sys
import threading

import paramiko
import pytest

import x2go_sftp
from x2go_sftp import log, rforward, sftpserver


def params(obj: object) -> list[tuple[str, object]]:
    return [
        (p.name, p.default)
        for p in inspect.signature(obj).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def test_log_level_constants():
    assert (
        log.loglevel_NONE,
        log.loglevel_ERROR,
        log.loglevel_WARN,
        log.loglevel_NOTICE,
        log.loglevel_INFO,
        log.loglevel_DEBUG,
        log.loglevel_DEBUG_SFTPXFER,
        log.loglevel_DEFAULT,
    ) == (0, 8, 16, 32, 64, 128, 1024, 56)


def test_original_positional_signatures():
    empty = inspect.Parameter.empty
    assert params(sftpserver.X2GoRevFwTunnelToSFTP.__init__) == [
        ("self", empty),
        ("server_port", empty),
        ("ssh_transport", empty),
        ("auth_key", None),
        ("session_instance", None),
        ("logger", None),
        ("loglevel", 56),
    ]
    assert params(sftpserver.x2go_rev_forward_sftpchannel_handler) == [
        ("chan", None),
        ("auth_key", None),
        ("logger", None),
    ]
    assert params(sftpserver.X2GoRevFwSFTPChannelThread.__init__) == [
        ("self", empty),
        ("channel", empty),
        ("remote", None),
    ]
    assert params(rforward.X2GoRevFwTunnel.__init__) == [
        ("self", empty),
        ("server_port", empty),
        ("remote_host", empty),
        ("remote_port", empty),
        ("ssh_transport", empty),
        ("session_instance", None),
        ("logger", None),
        ("loglevel", 56),
    ]
    assert params(rforward.x2go_transport_tcp_handler) == [
        ("chan", empty),
        ("origin", empty),
        ("server", empty),
    ]
    assert params(rforward.x2go_rev_forward_channel_handler) == [
        ("chan", None),
        ("addr", ""),
        ("port", 0),
        ("parent_thread", None),
        ("logger", None),
    ]
    kwonly = {
        p.name
        for p in inspect.signature(sftpserver.X2GoRevFwTunnelToSFTP.__init__).parameters.values()
        if p.kind == p.KEYWORD_ONLY
    }
    assert {"exports", "host_key", "username"} <= kwonly


def test_public_names_and_thread_api():
    assert issubclass(x2go_sftp.X2GoRevFwTunnelToSFTP, threading.Thread)
    assert issubclass(x2go_sftp.X2GoRevFwTunnelToSFTP, x2go_sftp.X2GoRevFwTunnel)
    assert issubclass(x2go_sftp.X2GoRevFwSFTPChannelThread, x2go_sftp.X2GoRevFwChannelThread)
    for name in (
        "start",
        "run",
        "notify",
        "pause",
        "resume",
        "stop_thread",
        "cancel_port_forward",
        "add_export",
        "remove_export",
    ):
        assert callable(getattr(x2go_sftp.X2GoRevFwTunnelToSFTP, name))
    tunnel = x2go_sftp.X2GoRevFwTunnelToSFTP(30001, None)
    assert tunnel.ready is False and tunnel.open_channels == {} and tunnel.daemon


def test_x2go_logger_mask_and_stdlib(caplog: pytest.LogCaptureFixture):
    logger = log.X2GoLogger(loglevel=log.loglevel_DEFAULT, tag="unit")
    with caplog.at_level(logging.DEBUG, logger="x2go_sftp"):
        logger("shown", loglevel=log.loglevel_WARN)
        logger("hidden", loglevel=log.loglevel_DEBUG)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("x2go_sftp.unit", logging.WARNING, "shown")
    ]
    logger.set_loglevel("debug")
    assert logger.get_loglevel() & log.loglevel_DEBUG
    logger.enable_debug_sftpxfer()
    assert logger.get_loglevel() & log.loglevel_DEBUG_SFTPXFER
    logger.disable_debug_sftpxfer()
    assert not logger.get_loglevel() & log.loglevel_DEBUG_SFTPXFER
    logger.set_loglevel(log.loglevel_ERROR)
    assert logger.get_loglevel() == log.loglevel_ERROR


def test_x2go_logger_destination_stream():
    logger = log.X2GoLogger(name="prog", loglevel=log.loglevel_DEFAULT, tag="t")
    logger.destination = io.StringIO()
    logger("line\nbreak", loglevel=log.loglevel_NOTICE)
    assert logger.destination.getvalue().endswith("(t) NOTICE: line break\n")


def test_foreign_logger_callable_is_used_and_not_copied(caplog: pytest.LogCaptureFixture):
    calls: list[tuple[str, int]] = []

    def x2go_style(msg: str, loglevel: int = 0) -> None:
        calls.append((msg, loglevel))

    tunnel = x2go_sftp.X2GoRevFwTunnelToSFTP(30002, None, logger=x2go_style)
    # The first tunnel of a process may announce once-per-process fixes (paramiko 2.x's asbytes)
    # through it: only what follows matters here, whatever ran before this test.
    calls.clear()
    with caplog.at_level(logging.INFO, logger="x2go_sftp"):
        tunnel.logger("hello", loglevel=log.loglevel_INFO)
    assert calls == [("hello", log.loglevel_INFO)]
    assert any(r.getMessage() == "hello" for r in caplog.records)
    assert tunnel.logger.wrapped is x2go_style


def test_non_pkey_auth_key_is_dropped():
    # As the original: anything that is not a key means "no key" (channels get closed).
    assert x2go_sftp.X2GoRevFwTunnelToSFTP(1, None, auth_key="not a key").auth_key is None
    key = paramiko.RSAKey.generate(1024)
    assert x2go_sftp.X2GoRevFwTunnelToSFTP(1, None, auth_key=key).auth_key is key


def test_import_is_cheap_and_host_key_is_lazy():
    code = (
        "import x2go_sftp, x2go_sftp.defaults as d\n"
        "assert d._host_key is None, 'host key made at import'\n"
        "k = d.default_host_key()\n"
        "assert k is d.default_host_key()\n"
        "print(k.get_name(), k.get_bits())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ssh-rsa", "3072"]


def test_enabled_respects_a_foreign_loggers_mask():
    class PythonX2GoLogger:  # the shape of x2go.log.X2GoLogger
        loglevel = log.loglevel_DEFAULT

        def get_loglevel(self) -> int:
            return self.loglevel

        def __call__(self, msg: str, loglevel: int = 0) -> None:
            pass

    wrapped = log.tagged(PythonX2GoLogger(), "t")
    assert wrapped.enabled(log.loglevel_WARN)
    assert not wrapped.enabled(log.loglevel_DEBUG_SFTPXFER)
    assert log.tagged(lambda msg, loglevel=0: None, "t").enabled(log.loglevel_DEBUG_SFTPXFER)
