"""The Debian/Ubuntu PyHoca recipe of docs/python-x2go.md, run exactly as the page writes it.

The shell block between the ``pyhoca-recipe`` markers is taken from the page
(so page and test cannot drift) and run with bash, ``HOME`` in a temporary
directory: Debian's ``/usr/bin/python3 -m venv --system-site-packages``,
``pip install`` of x2go-sftp (here: a copy of this checkout, the one
substitution), the ``usercustomize.py`` start-up hook, the ``installed()``
check.  Then a fresh interpreter of that venv must have python-x2go switched
without calling ``install()`` itself, and after ``pip uninstall x2go-sftp`` it
must start silently.  pip needs PyPI for the build dependencies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "python-x2go.md"

# python-x2go is packaged for Debian's Python only; the page names it literally.
DEBIAN_PYTHON = "/usr/bin/python3"
# The page's venv, below HOME (the test's HOME is a temporary directory).
VENV_UNDER_HOME = Path(".local/share/x2go-sftp/venv")
# The page installs the released package; the test installs this checkout instead.
PIP_LINE = '"$VENV/bin/pip" install x2go-sftp'
# What pip builds the checkout from (pyproject.toml's readme and license-files).
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "x2go_sftp")
# venv creation, pip with a PyPI download of the build backend, one 3072-bit key.
RECIPE_TIMEOUT = 600.0
CHECK_TIMEOUT = 120.0

# Run in the fresh interpreter: nothing of python-x2go imported at start-up (the hook
# waits for the program's own import), then switched by that import alone.
CHECK = r"""
import json, sys
at_start = sorted(m for m in sys.modules if m == "x2go" or m.startswith(("x2go.", "gevent")))
import x2go.defaults, x2go.sftpserver, x2go_sftp.integrate
import paramiko
print(json.dumps({
    "at_start": at_start,
    "installed": x2go_sftp.integrate.installed(),
    "tunnel": x2go.sftpserver.X2GoRevFwTunnelToSFTP is x2go_sftp.integrate.X2GoIntegratedTunnel,
    "host_key_bits": x2go.defaults.RSAHostKey.get_bits(),
    "x2go_sftp": x2go_sftp.integrate.__file__,
    "paramiko": paramiko.__file__,
    "prefix": sys.prefix,
}))
"""


def recipe_block(text: str) -> str:
    """The one ``sh`` block between the page's ``pyhoca-recipe`` markers."""
    section = re.search(r"<!-- pyhoca-recipe:[^>]*-->\n(.*?)<!-- /pyhoca-recipe -->", text, re.S)
    assert section, f"no pyhoca-recipe markers in {DOC}"
    blocks = re.findall(r"^```sh\n(.*?)^```$", section.group(1), re.S | re.M)
    assert len(blocks) == 1, f"expected one sh block between the markers, found {len(blocks)}"
    return blocks[0]


def clean_env(home: Path) -> dict[str, str]:
    """The environment of a user's login shell: no venv or Python overrides of the test run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE", "PYTHONSTARTUP", "VIRTUAL_ENV",
                        "PYTHONSAFEPATH", "PIP_REQUIRE_VIRTUALENV")}
    # Keep pip's download cache where it was (HOME moves); nothing else of the old HOME is used.
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    env.update(HOME=str(home), PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_debian_pyhoca_recipe_as_written(tmp_path: Path) -> None:
    if not os.path.exists(DEBIAN_PYTHON):
        pytest.fail(f"{DEBIAN_PYTHON} is missing: the recipe is for Debian's Python")
    if subprocess.run([DEBIAN_PYTHON, "-c", "import x2go.sftpserver"], capture_output=True,
                      timeout=CHECK_TIMEOUT).returncode != 0:
        pytest.fail("Debian's Python cannot import python-x2go (apt-get install python3-x2go)")

    # A copy, so pip's in-tree build never writes into the shared checkout.
    src = tmp_path / "x2go-sftp-src"
    src.mkdir()
    for name in PACKAGE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    block = recipe_block(DOC.read_text())
    assert block.count(PIP_LINE) == 1, f"the page's pip line changed; expected {PIP_LINE!r} in:\n{block}"
    script = block.replace(PIP_LINE, f'"$VENV/bin/pip" install {src}')

    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    res = run(["bash", "-euo", "pipefail", "-c", script], env, RECIPE_TIMEOUT, tmp_path)
    assert res.returncode == 0, f"recipe failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert res.stdout.splitlines()[-1] == "True", res.stdout  # the page's own check

    # A fresh interpreter of the venv: switched by the start-up hook, no install() call.
    venv = home / VENV_UNDER_HOME
    python = str(venv / "bin" / "python")
    check = run([python, "-c", CHECK], env, CHECK_TIMEOUT, tmp_path)
    assert check.returncode == 0, check.stderr
    seen = json.loads(check.stdout.splitlines()[-1])
    assert seen["at_start"] == [], "the hook imported python-x2go/gevent before the program did"
    assert seen["installed"] is True and seen["tunnel"] is True, seen
    assert seen["host_key_bits"] == 3072
    assert seen["prefix"] == str(venv)
    assert seen["x2go_sftp"].startswith(str(venv) + os.sep), seen  # pip put it in the venv ...
    assert seen["paramiko"].startswith("/usr/lib/python3/dist-packages/"), seen  # ... and Debian's stays

    # x2go-sftp gone: the hook must not break or disturb start-up.
    gone = run([str(venv / "bin" / "pip"), "uninstall", "-y", "x2go-sftp"], env, CHECK_TIMEOUT, tmp_path)
    assert gone.returncode == 0, gone.stderr
    quiet = run([python, "-c", "print('started')"], env, CHECK_TIMEOUT, tmp_path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "started\n", "")
    stock = run([python, "-c", "import x2go.sftpserver as s; print(s.X2GoRevFwTunnelToSFTP.__module__)"],
                env, CHECK_TIMEOUT, tmp_path)
    assert stock.returncode == 0 and stock.stdout.splitlines()[-1] == "x2go.sftpserver", stock.stderr
