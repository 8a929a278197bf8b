"""One virtual environment per paramiko release, for the benchmark's workers.

    python -m tests.bench.venvs 2.12.0,3.5.1,newest     # make (or reuse) them; print each python

The benchmark runs its worker processes (python-x2go's connection plus this
library, from the source tree via ``PYTHONPATH``) under the interpreter of a
venv that holds only that paramiko release and gevent.  The venvs are kept
under :data:`CACHE_DIR` (``X2GO_BENCH_VENVS`` overrides it), one per release and
Python minor version, so a repeated run starts at once.  ``newest`` is upgraded
from the package index at most once per :data:`NEWEST_RECHECK_S`.

Release names: a version (``2.12.0``), ``newest`` (what pip picks today),
``current`` (no venv: the benchmark's own interpreter and its paramiko),
``system`` (no venv: ``/usr/bin/python3`` with the distribution's own packages,
Debian 12's on this machine), or a distribution (:data:`DISTRIBUTIONS`:
``debian12``, ``ubuntu24.04``, ``debian13``): its paramiko with the
cryptography and gevent it ships beside it.  cryptography matters: up to 42
its AES-GCM sets up OpenSSL per packet (x2go_sftp/aesgcm.py), and its AES-CTR
and HMAC cost more per call, so a paramiko 2.12 venv with today's cryptography
is not what a Debian 12 user runs.  A distribution's venv is made with its
Python (3.11, 3.12, 3.13; found as .ci/run finds interpreters); any other
release's with the benchmark's own.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("X2GO_BENCH_VENVS", "/tmp/x2go-sftp-bench-venvs"))
# How old the "newest" venv may be before pip is asked again for a newer paramiko.
NEWEST_RECHECK_S = 24 * 3600
# What every worker needs besides paramiko: gevent for the gevent-patched variants
# (python-x2go runs under it).  x2go_sftp itself comes from the source tree.
EXTRA_PACKAGES = ("gevent",
                  # gevent < 23 loads its plugins through pkg_resources, whose old releases cannot
                  # find today's wheel metadata names (zope_interface): no speed is involved.
                  "setuptools>=70,<81")
# pip may take a while to fetch cryptography and gevent wheels on a slow link.
PIP_TIMEOUT_S = 900
# Releases in the table of supported paramiko releases (issue 12): Debian 12 / Ubuntu 24.04,
# Debian 13, and the newest.
# What each distribution ships with its python3-paramiko (Debian and Ubuntu package versions):
# its Python, paramiko, and the packages whose speed matters beside it.
DISTRIBUTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "debian12": ("3.11", "2.12.0",
                 ("cryptography==38.0.4", "gevent==22.10.2", "greenlet==2.0.2", "zope.interface==5.5.2")),
    "ubuntu24.04": ("3.12", "2.12.0",
                    ("cryptography==41.0.7", "gevent==23.9.1", "greenlet==3.0.3", "zope.interface==6.1")),
    "debian13": ("3.13", "3.5.1", ("cryptography==43.0.0", "gevent==24.11.1")),
}
SUPPORTED = ("debian12", "ubuntu24.04", "debian13", "newest")
SHORT = ("debian12", "newest")  # CI's short mode: the oldest supported (as Debian 12 ships it) and the newest
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Release:
    """A paramiko release the benchmark runs its workers under."""

    name: str  # as asked for: "2.12.0", "debian12", "newest", "current", "system"
    python: str  # the interpreter of its venv
    version: str  # the paramiko version installed there
    cryptography: str = "?"  # the cryptography version installed there


def _this_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_python(minor: str) -> str:
    """An interpreter of Python ``minor`` (e.g. "3.11"): pyenv's, the system's, on PATH, or fetched by uv.

    The same search as .ci/run's; each candidate must really run (pyenv's shims
    exist for versions not selected).

    Raises:
        RuntimeError: none here, and uv could not fetch one.
    """
    if minor == _this_minor():
        return sys.executable
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [*sorted(root.glob(f"versions/{minor}.*/bin/python{minor}")), Path(f"/usr/bin/python{minor}"),
                  *([Path(w)] if (w := shutil.which(f"python{minor}")) else [])]
    for p in candidates:
        if p.is_file() and subprocess.run([str(p), "-c", "import venv"], capture_output=True,
                                          timeout=60).returncode == 0:
            return str(p)
    uv = subprocess.run([sys.executable, "-m", "uv", "python", "find", minor], capture_output=True, text=True,
                        timeout=600)
    if uv.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uv"], capture_output=True, timeout=PIP_TIMEOUT_S)
        subprocess.run([sys.executable, "-m", "uv", "python", "install", "-q", minor], capture_output=True,
                       timeout=PIP_TIMEOUT_S)
        uv = subprocess.run([sys.executable, "-m", "uv", "python", "find", minor], capture_output=True, text=True,
                            timeout=600)
    if uv.returncode != 0 or not uv.stdout.strip():
        raise RuntimeError(f"no Python {minor} here, and uv could not fetch one")
    return uv.stdout.strip()


def _installed_versions(python: str) -> tuple[str, str]:
    """(paramiko, cryptography) as ``python`` imports them."""
    out = subprocess.run([python, "-c", "import cryptography, paramiko, gevent; "
                          "print(paramiko.__version__, cryptography.__version__)"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{python}: paramiko, cryptography or gevent does not import: {out.stderr.strip()[-500:]}")
    paramiko_version, cryptography_version = out.stdout.split()[-2:]
    return paramiko_version, cryptography_version


def _made(name: str, python: str) -> Release:
    return Release(name, python, *_installed_versions(python))


def _pip_install(python: str, requirements: list[str], upgrade: bool) -> None:
    cmd = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           *(["--upgrade"] if upgrade else []), *requirements]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed: {res.stderr.strip()[-1000:]}")


def ensure(name: str, cache_dir: Path = CACHE_DIR, refresh: bool = False) -> Release:
    """Make (or reuse) the venv of paramiko release ``name``; see the module docstring.

    Args:
        name: a version such as ``2.12.0``, ``newest`` or ``current``.
        cache_dir: where the venvs live.
        refresh: rebuild the venv from scratch.

    Raises:
        RuntimeError: the venv could not be made (no network, no wheel for this Python, ...).
    """
    if name == "current":
        return _made(name, sys.executable)
    if name == "system":
        return _made(name, SYSTEM_PYTHON)
    minor, paramiko_version, pins = DISTRIBUTIONS.get(name, (_this_minor(), name, ()))
    cache_dir.mkdir(parents=True, exist_ok=True)
    home = cache_dir / f"paramiko-{name}-py{minor}"
    python = str(home / "bin" / "python")
    marker = home / "x2go-bench-ready.json"
    # Two benchmark runs at once must not build the same venv together.
    with open(cache_dir / f".{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if refresh and home.exists():
            shutil.rmtree(home)
        if marker.exists():
            made = json.loads(marker.read_text())
            if "cryptography" not in made:  # a venv from before the marker named it
                made["cryptography"] = _made(name, python).cryptography
                marker.write_text(json.dumps(made))
            if name != "newest" or time.time() - made["checked"] < NEWEST_RECHECK_S:
                return Release(name, python, made["version"], made.get("cryptography", "?"))
            try:
                _pip_install(python, ["paramiko", *EXTRA_PACKAGES], upgrade=True)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # Offline: keep measuring with the newest we have, and say so.
                print(f"# venvs: could not check for a newer paramiko ({exc}); using {made['version']}",
                      file=sys.stderr, flush=True)
                return Release(name, python, made["version"], made.get("cryptography", "?"))
        else:
            if home.exists():
                shutil.rmtree(home)  # a half-made venv from an interrupted run
            subprocess.run([find_python(minor), "-m", "venv", str(home)], check=True, timeout=300)
            spec = "paramiko" if name == "newest" else f"paramiko=={paramiko_version}"
            pinned = {p.split("==")[0] for p in pins}
            _pip_install(python, [spec, *pins, *(p for p in EXTRA_PACKAGES if p not in pinned)], upgrade=False)
        release = _made(name, python)
        marker.write_text(json.dumps({"version": release.version, "cryptography": release.cryptography,
                                      "checked": time.time()}))
        return release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("releases", nargs="?", default=",".join(SUPPORTED))
    parser.add_argument("--refresh", action="store_true", help="rebuild the venvs from scratch")
    args = parser.parse_args(argv)
    for name in filter(None, args.releases.split(",")):
        release = ensure(name, refresh=args.refresh)
        print(f"{release.name}: paramiko {release.version}, cryptography {release.cryptography}: {release.python}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
