"""The same tunnel under gevent.monkey.patch_all(), as python-x2go runs it (in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_tunnel_under_gevent_monkey_patching():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, os.path.join(root, "tests", "gevent_scenario.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=root,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split("\n")[:8] == [
        "ok ready",
        "ok session",
        "ok small-requests",
        "ok write-behind",
        "ok routing",
        "ok pause-resume",
        "ok outer-gone",
        "ok stopped",
    ]
