"""`bundle OUT`: one executable zipapp that runs on a bare Python 3.9+.

The bundle is built by the real command from this test run's environment,
then run by an interpreter that cannot import bottle or waitress: it serves,
stores an authentic event, fetches its object from the fake API and stops
cleanly on SIGTERM. Plus the refusals (existing OUT, version mismatch, no
requirements.txt) and the import on every supported interpreter found.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import MODULE, ROOT, Listener, api_sections, event_body, run_cli, wait_until
from interpreters import SUPPORTED, bare_interpreter, cannot_import, find_interpreters, one_line_refusal

OLDER = [(2, 7), (3, 6), (3, 7), (3, 8)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle built by `bundle` with an ini that does not exist: it needs no config and no secrets."""
    out = tmp_path_factory.mktemp("bundle") / "noyo-listener.pyz"
    done = run_cli("--config", str(out.parent / "missing.ini"), "bundle", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "bottle " in done.stdout and "waitress " in done.stdout
    return out


def _leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def test_bundle_is_an_executable_zipapp_with_the_module_and_the_pinned_dependencies(bundle: Path):
    assert bundle.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o755
    with zipfile.ZipFile(bundle) as archive:
        names = set(archive.namelist())
        assert archive.read("noyo_listener.py") == MODULE.read_bytes()
    assert {"__main__.py", "noyo_listener.py", "bottle.py", "waitress/__init__.py", "waitress/server.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert _leftovers(bundle.parent, bundle.name) == []


def test_bundle_serves_stores_fetches_and_stops_on_a_python_without_bottle(bundle, make_ini, fake_noyo, tmp_path):
    argv, described = bare_interpreter(tmp_path)
    if not argv:
        pytest.skip(described)
    assert cannot_import(argv, "bottle"), f"{described} can import bottle"
    assert cannot_import(argv, "waitress"), f"{described} can import waitress"
    fake_noyo.put("difference", {"id": "d-bundle", "version": 1, "modified": 100, "discrepancy_time": 90})

    listener = Listener(make_ini(**api_sections(fake_noyo)))
    listener.launcher = [*argv, str(bundle)]
    try:
        listener.start()
        status, answer = listener.send(event_body("difference.created", data_id="d-bundle", event_id="e-bundle"))
        assert (status, answer) == (200, {"ok": True}), listener.log()
        with listener.db() as db:
            row = db.execute("SELECT type, data_id FROM events WHERE event_id = 'e-bundle'").fetchone()
        assert tuple(row) == ("difference.created", "d-bundle")
        wait_until(lambda: _difference_state(listener, "d-bundle") == "discrepancy", 20,
                   f"the worker in the bundle on {described} to fetch the difference")
        assert listener.stop(signal.SIGTERM) == 0, listener.log()
    finally:
        listener.kill()
    assert "Traceback" not in listener.log()


def _difference_state(listener: Listener, data_id: str) -> str | None:
    with listener.db() as db:
        row = db.execute("SELECT state FROM differences WHERE id = ?", (data_id,)).fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("version", SUPPORTED, ids=[f"{v[0]}.{v[1]}" for v in SUPPORTED])
def test_bundle_imports_and_parses_alike_on_every_supported_python(bundle, version):
    """Imports the module (every class and decorator runs) with -I and only the bundled dependencies.

    This is the fast guard against 3.10+ library arguments at import time in
    merged code; the full suite on each interpreter (.ci/run) covers the rest.
    """
    python = find_interpreters().get(version)
    if not python:
        pytest.skip(f"no Python {version[0]}.{version[1]} on this machine")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import noyo_listener as n; "
              "print(n.__version__, n.parse_utc_iso('2024-05-08T21:27:45.1Z'), "
              "n.parse_utc_iso('2024-05-08T21:27:45.0395871+00:00'), n.parse_utc_iso('2024-05-08T21:27:45.12345'))")
    done = subprocess.run([python, "-I", "-c", script, str(bundle)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["1715203665.1", "1715203665.039587", "1715203665.12345"]


def test_bundled_dependencies_win_over_a_path_put_in_front_of_them(bundle, tmp_path):
    """Even a directory that a sitecustomize or .pth puts first on sys.path (old easy-install.pth did) comes after."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "bottle.py").write_text("raise ImportError('the bottle in front of the bundle was imported')\n")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(shadow)!r})\n")
    env = {**os.environ, "PYTHONPATH": str(custom)}
    done = subprocess.run([sys.executable, str(bundle), "--version"], capture_output=True, text=True, env=env,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("noyo-listener ")


@pytest.mark.parametrize("version", OLDER, ids=[f"{v[0]}.{v[1]}" for v in OLDER])
def test_the_bundle_on_any_older_python_says_so_in_one_line(bundle, version):
    """The bundle's __main__.py checks before it imports the module, in syntax even Python 2.7 parses."""
    python = find_interpreters().get(version)
    if not python:
        pytest.skip(f"no Python {version[0]}.{version[1]} on this machine")
    one_line_refusal(python, str(bundle))


def test_bundle_never_overwrites(tmp_path):
    out = tmp_path / "noyo-listener.pyz"
    out.write_text("keep me")
    done = run_cli("bundle", str(out))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"noyo-listener: error: {out} already exists; choose a new name (bundle never overwrites)"]
    assert out.read_text() == "keep me"
    assert _leftovers(tmp_path, out.name) == []


def test_bundle_refuses_dependencies_that_differ_from_requirements(tmp_path):
    copy = tmp_path / "noyo_listener.py"
    shutil.copy(MODULE, copy)
    requirements = (ROOT / "requirements.txt").read_text()
    installed = importlib.metadata.version("bottle")
    assert f"bottle=={installed}" in requirements
    (tmp_path / "requirements.txt").write_text(requirements.replace(f"bottle=={installed}", "bottle==0.0.1"))
    out = tmp_path / "noyo-listener.pyz"
    done = subprocess.run([sys.executable, str(copy), "bundle", str(out)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"noyo-listener: error: bottle {installed} is installed but requirements.txt pins 0.0.1; "
        "run pip install -r requirements.txt in this venv, then bundle again"]
    assert not out.exists() and _leftovers(tmp_path, out.name) == []


def test_bundle_from_a_bundle_says_what_to_do(bundle, tmp_path):
    """Inside a bundle there is no requirements.txt to check the versions against."""
    out = tmp_path / "again.pyz"
    done = subprocess.run([sys.executable, str(bundle), "bundle", str(out)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs requirements.txt" in lines[0] and "noyo_listener.py bundle OUT" in lines[0]
    assert not out.exists()


UNIT = ROOT / "systemd" / "noyo-listener.service"
DROP_IN = ROOT / "systemd" / "noyo-listener.service.d" / "bundle.conf"


def _verify_with_drop_in(tmp_path: Path, bundle: Path, drop_in_text: str) -> subprocess.CompletedProcess:
    """systemd-analyze verify of the unit plus the drop-in, with the documented /opt layout under tmp."""
    prefix = tmp_path / "opt" / "noyo-listener"
    prefix.mkdir(parents=True)
    os.symlink(bundle, prefix / "noyo-listener.pyz")
    units = tmp_path / "units"
    (units / "noyo-listener.service.d").mkdir(parents=True)
    # Without the venv on disk, the unit verifies only if the drop-in's ExecStart replaces its own.
    (units / "noyo-listener.service").write_text(UNIT.read_text().replace("/opt/noyo-listener", str(prefix)))
    (units / "noyo-listener.service.d" / "bundle.conf").write_text(
        drop_in_text.replace("/opt/noyo-listener", str(prefix)))
    return subprocess.run(["systemd-analyze", "verify", str(units / "noyo-listener.service")],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="the drop-in runs /usr/bin/python3, absent here")
def test_bundle_drop_in_verifies_clean_and_replaces_the_venv_command(bundle, tmp_path):
    result = _verify_with_drop_in(tmp_path, bundle, DROP_IN.read_text())
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # The same check sees a drop-in that points at a missing file.
    broken = _verify_with_drop_in(tmp_path / "broken", bundle,
                                  DROP_IN.read_text().replace("/usr/bin/python3", "/usr/bin/no-such-python3"))
    assert broken.returncode != 0 and "no-such-python3" in broken.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, smaller than a bundle: a real file system that really fills up (needs root to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_bundle_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    out = small_disk / "noyo-listener.pyz"
    done = run_cli("bundle", str(out))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noyo-listener: error: cannot write ") and "space" in lines[0]
    assert list(small_disk.iterdir()) == []
