"""The Python interpreters on this machine, for the runtime and bundle tests.

Looks in pyenv's versions (``$PYENV_ROOT``, else ``~/.pyenv``) and for
``python3.X`` on PATH. Each candidate is asked its version (in isolated mode),
so a broken or foreign binary is simply not found.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

SUPPORTED = [(3, 9), (3, 10), (3, 11), (3, 12), (3, 13)]
ONE_LINE = "noyo-listener: error: needs Python 3.9 or newer"


@functools.lru_cache(maxsize=None)
def find_interpreters() -> dict[tuple[int, int], str]:
    """{(major, minor): path} of every interpreter found (the first one found per version)."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = sorted(glob.glob(os.path.join(root, "versions", "*", "bin", "python")))
    candidates += [path for path in (shutil.which(f"python{major}.{minor}") for major, minor in
                                     [(2, 7)] + [(3, m) for m in range(6, 15)]) if path]
    found: dict[tuple[int, int], str] = {}
    for path in candidates:
        version = _version_of(path)
        if version and version not in found:
            found[version] = path
    return found


def _version_of(path: str) -> tuple[int, int] | None:
    try:
        done = subprocess.run([path, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = done.stdout.split()
    return (int(parts[0]), int(parts[1])) if done.returncode == 0 and len(parts) == 2 else None


def cannot_import(argv: list[str], *modules: str) -> bool:
    """True if ``argv`` (an interpreter and its flags) fails to import each of ``modules``."""
    for module in modules:
        done = subprocess.run([*argv, "-c", f"import {module}"], capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        if done.returncode == 0:
            return False
    return True


def bare_interpreter(scratch: Path) -> tuple[list[str], str]:
    """An interpreter of a supported version that cannot import bottle or waitress, as (argv, description).

    Prefers the oldest supported one found, run with ``-I`` (no site-packages
    of the user, no PYTHON* variables, no script directory); else makes a venv
    without pip from the running Python's base interpreter. Returns ([], why)
    if neither can be had.
    """
    for version in SUPPORTED:
        path = find_interpreters().get(version)
        if path and cannot_import([path, "-I"], "bottle", "waitress"):
            return [path, "-I"], f"Python {version[0]}.{version[1]} at {path}, -I"
    target = scratch / "bare-venv"
    try:
        venv.EnvBuilder(with_pip=False, system_site_packages=False).create(target)
    except (OSError, subprocess.CalledProcessError) as exc:
        return [], f"no supported interpreter without bottle/waitress, and no venv could be made: {exc}"
    python = str(target / "bin" / "python")
    if cannot_import([python, "-I"], "bottle", "waitress"):
        return [python, "-I"], f"a venv without pip of {sys.version.split()[0]} at {target}"
    return [], "every interpreter found (and a fresh venv) can import bottle or waitress"


def one_line_refusal(python: str, *args: str) -> None:
    """``python ARGS --version`` exits 1 with one line saying the version is too old."""
    done = subprocess.run([python, *args, "--version"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ONE_LINE), done.stderr
