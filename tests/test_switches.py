"""The X2GO_SFTP_* environment switches all read an opt-out the same way."""

from __future__ import annotations

import pytest

from x2go_sftp import aesgcm, defaults, integrate, tuning, writebehind

OFF = ["0", "no", "off", "false", "OFF", " False ", "No"]
ON = ["", "1", "yes", "on", "anything"]


@pytest.mark.parametrize("value", OFF)
def test_each_switch_is_off_for_every_opt_out_spelling(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(writebehind.ENV, value)
    monkeypatch.setenv(integrate.OUTER_GCM_ENV, value)
    monkeypatch.setenv(aesgcm.GCM_CONTEXT_ENV, value)
    assert defaults.opted_out(writebehind.ENV)
    assert not writebehind.wanted(True)  # the opt-out wins over a forced setting
    assert not integrate.outer_gcm_default()
    assert aesgcm.opted_out()


@pytest.mark.parametrize("value", OFF)
def test_the_yield_to_the_reader_is_off_for_every_opt_out_spelling(monkeypatch: pytest.MonkeyPatch,
                                                                   value: str) -> None:
    monkeypatch.setattr(defaults, "gevent_patched", lambda module="threading": True)  # as under gevent
    monkeypatch.setenv(tuning.YIELD_ENV, value)
    assert not tuning.yield_wanted()


@pytest.mark.parametrize("value", ON)
def test_the_yield_to_the_reader_stays_on_otherwise_under_gevent_only(monkeypatch: pytest.MonkeyPatch,
                                                                      value: str) -> None:
    monkeypatch.setenv(tuning.YIELD_ENV, value)
    monkeypatch.setattr(defaults, "gevent_patched", lambda module="threading": True)
    assert tuning.yield_wanted()
    monkeypatch.setattr(defaults, "gevent_patched", lambda module="threading": False)  # plain threads: never
    assert not tuning.yield_wanted()


@pytest.mark.parametrize("value", ON)
def test_each_switch_stays_on_otherwise(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(writebehind.ENV, value)
    monkeypatch.setenv(integrate.OUTER_GCM_ENV, value)
    monkeypatch.setenv(aesgcm.GCM_CONTEXT_ENV, value)
    assert writebehind.wanted(True)
    assert integrate.outer_gcm_default()
    assert not aesgcm.opted_out()


def test_unset_switches_are_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in (writebehind.ENV, integrate.OUTER_GCM_ENV, aesgcm.GCM_CONTEXT_ENV):
        monkeypatch.delenv(env, raising=False)
    assert writebehind.wanted(True) and integrate.outer_gcm_default() and not aesgcm.opted_out()
