"""The README's install, backup and restore steps, run as written against a
temporary copy of the production layout: /opt, /etc and /var/lib under a
temporary root, secrets as credential files, an ini without secrets, and the
service run as its own unprivileged user (as DynamicUser= does), while the
operator's commands run as root.

What stands in for what the test cannot run: `systemctl` starts and stops
`serve` as the user `nobody` with the credentials copied to a directory that
user can read (systemd's $CREDENTIALS_DIRECTORY) and the state directory
owned by it (StateDirectory=); `sudo` runs its command as root (the tests run
as root). Installing packages, cloning and creating the venv are done by the
fixture. The one change to the README's ini: port 0 instead of 8080.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, event_body, signed_headers

NOBODY = 65534
SUBSCRIPTION_SECRET = "subscription-secret-from-noyo"
SUDO = 'sudo() { if [ "$1" = "-u" ]; then shift 2; fi; env "$@"; }\n'
NOT_HERE = ("sudo apt-get ", "sudo git clone ", "cd /opt/noyo-listener && sudo python3 -m venv", "sudo cp systemd/")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs the operator's steps as root, the service as nobody")


def readme_commands(section: str) -> list[str]:
    """The shell commands of the README section titled ``section``, in order."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n### {section}\n")
    end = readme.find("\n### ", start + 1)
    text = readme[start:end if end != -1 else None]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        block = textwrap.dedent(re.sub(r"(?m)^   ", "", block)) if block.startswith("   ") else block
        commands.extend(line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip())
    assert commands, section
    return commands


def python_for(uid: int) -> tuple[str, dict[str, str]]:
    """An interpreter that user ``uid`` can run with bottle and waitress importable."""
    import bottle
    import waitress
    paths = os.pathsep.join(sorted({str(Path(bottle.__file__).parent), str(Path(waitress.__file__).parent.parent)}))
    for python, env in ((sys.executable, {}), ("/usr/bin/python3", {"PYTHONPATH": paths})):
        try:
            probe = subprocess.run([python, "-c", "import bottle, waitress, sqlite3"], user=uid, group=uid,
                                   extra_groups=[], env={**env, "PATH": "/usr/bin:/bin"}, cwd="/",
                                   capture_output=True, timeout=30)
        except OSError:
            continue
        if probe.returncode == 0:
            return python, env
    pytest.skip("no Python here that an unprivileged user can run with bottle and waitress")


class Layout:
    """A temporary root with the README's paths under it, and a fake systemctl."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opt = root / "opt" / "noyo-listener"
        self.etc = root / "etc" / "noyo-listener"
        self.state = root / "var" / "lib" / "noyo-listener"
        self.credentials = root / "run" / "credentials" / "noyo-listener.service"
        self.service: subprocess.Popen | None = None
        self.port = 0
        self.log = root / "journal.log"
        self.service_python = python_for(NOBODY)
        # "git clone" and the venv: the repository's files, a venv whose python is this one.
        venv_python = self.opt / ".venv" / "bin" / "python3"
        venv_python.parent.mkdir(parents=True)
        venv_python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this venv, under the README's name
        venv_python.chmod(0o755)
        for name in ("noyo_listener.py", "noyo_listener.ini", "requirements.txt"):
            shutil.copy(ROOT / name, self.opt / name)
        shutil.copytree(ROOT / "systemd", self.opt / "systemd")
        (root / "root").mkdir(mode=0o700)

    def localize(self, command: str) -> str:
        for path in ("/root/", "/opt/noyo-listener", "/etc/noyo-listener", "/var/lib/noyo-listener"):
            command = command.replace(path, str(self.root) + path)
        return command

    def run(self, command: str) -> subprocess.CompletedProcess:
        """One README command: the fake systemctl, or bash as root."""
        if command.startswith(NOT_HERE):
            return subprocess.CompletedProcess(command, 0, "", "")
        action = re.search(r"systemctl (?:.*--now|(stop|start|status)) noyo-listener", command)
        if action:
            {"stop": self.stop, "status": self.assert_running}.get(action.group(1), self.start)()
            return subprocess.CompletedProcess(command, 0, "", "")
        env = {"PATH": os.environ["PATH"], "YOUR_SUBSCRIPTION_SECRET": SUBSCRIPTION_SECRET,
               "CLIENT_ID": "", "CLIENT_SECRET": ""}  # empty: fetching stays off (no Noyo here)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", SUDO + self.localize(command)], env=env,
                                cwd=self.opt, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        return result

    def start(self) -> None:
        """systemctl start: StateDirectory=, LoadCredential=, DynamicUser=, ExecStart=."""
        ini = self.etc / "noyo_listener.ini"
        ini.write_text(ini.read_text().replace("\nport = 8080\n", "\nport = 0\n"))
        self.state.mkdir(parents=True, exist_ok=True)
        os.chown(self.state, NOBODY, NOBODY)
        self.state.chmod(0o700)
        shutil.rmtree(self.credentials, ignore_errors=True)
        shutil.copytree(self.etc / "credentials", self.credentials)
        for path in (self.credentials, *self.credentials.iterdir()):
            os.chown(path, NOBODY, NOBODY)
        offset = self.log.stat().st_size if self.log.exists() else 0
        python, extra_env = self.service_python
        with open(self.log, "ab") as log:
            self.service = subprocess.Popen(
                [python, str(self.opt / "noyo_listener.py"), "--config", str(ini), "serve"],
                user=NOBODY, group=NOBODY, extra_groups=[], cwd=self.state, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                env={**extra_env, "PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(self.credentials)})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode("utf-8", "replace")
            match = re.search(r"listening url=http://127\.0\.0\.1:(\d+)", text)
            if match:
                self.port = int(match.group(1))
                return
            assert self.service.poll() is None, f"serve exited with {self.service.returncode}:\n{text}"
            time.sleep(0.05)  # polling the log for the start-up line, bounded by the deadline
        raise AssertionError(f"serve did not start:\n{text}")

    def stop(self) -> None:
        assert self.service is not None
        self.service.send_signal(signal.SIGTERM)
        assert self.service.wait(30) == 0

    def assert_running(self) -> None:
        assert self.service is not None and self.service.poll() is None

    def kill(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.kill()
            self.service.wait(10)

    def deliver(self, event_id: str) -> int:
        body = event_body("difference.created", event_id=event_id)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/noyo/webhooks", body=body, headers=signed_headers(body, secret=SUBSCRIPTION_SECRET))
            return conn.getresponse().status
        finally:
            conn.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """A command as an operator types it: root, no credentials in sight."""
        return subprocess.run([str(self.opt / ".venv" / "bin" / "python3"), str(self.opt / "noyo_listener.py"),
                               "--config", str(self.etc / "noyo_listener.ini"), *args],
                              capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})

    def events(self) -> set[str]:
        with sqlite3.connect(self.state / "noyo_listener.sqlite3") as conn:
            return {row[0] for row in conn.execute("SELECT event_id FROM events")}


@pytest.fixture
def layout():
    root = Path(tempfile.mkdtemp(prefix="noyo-layout-", dir="/tmp"))
    root.chmod(0o755)  # the service's user must reach its directories, as under /
    layout = Layout(root)
    yield layout
    layout.kill()
    shutil.rmtree(root, ignore_errors=True)


def test_the_readme_restore_steps_cover_the_change_feed_consumers():
    readme = (ROOT / "README.md").read_text()
    restore = readme[readme.index("\n### Restore\n"):readme.index("\n### Upgrade and retention\n")]
    assert "noyo-discrepancy-alert" in restore and "changes --follow" in restore
    assert "seq counter forward" in restore


def test_the_readme_install_backup_and_restore_steps_work_as_written(layout):
    # Install on a VM, up to the running service.
    for command in readme_commands("Install on a VM"):
        result = layout.run(command)
        if command.endswith(" status"):
            assert "daemon:          running" in result.stdout, result.stdout
        if command.endswith(" check-config"):
            assert "# configuration is valid" in result.stdout
    ini = (layout.etc / "noyo_listener.ini").read_text()
    assert re.search(r"(?m)^secrets =$", ini) and str(layout.state / "noyo_listener.sqlite3") in ini
    assert oct((layout.etc / "credentials" / "NOYO_WEBHOOK_SECRETS").stat().st_mode & 0o777) == "0o600"
    assert layout.deliver("before-backup-1") == 200
    assert layout.deliver("before-backup-2") == 200

    # The tools an operator reaches for, as root, without the secrets.
    for args in (["status"], ["status", "--json"], ["requeue", "--dead"], ["prune"]):
        result = layout.cli(*args)
        assert result.returncode == 0, (args, result.stderr)
    assert json.loads(layout.cli("status", "--json").stdout)["daemon"]["running"] is True

    # Backup, while serving.
    (command,) = readme_commands("Backup")
    layout.run(command)
    backups = list((layout.root / "root").glob("noyo-*.sqlite3"))
    assert len(backups) == 1 and oct(backups[0].stat().st_mode & 0o777) == "0o600"
    assert layout.deliver("after-backup") == 200

    # Restore: stop, restore, start, as the README's steps say.
    for command in readme_commands("Restore"):
        layout.run(command)
    db = layout.state / "noyo_listener.sqlite3"
    info = db.stat()
    assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o600, NOBODY, NOBODY)
    assert layout.events() == {"before-backup-1", "before-backup-2"}
    # The backup is one self-contained file, and restore only read it: nothing beside it.
    assert list((layout.root / "root").iterdir()) == backups
    assert backups[0].read_bytes()[18:20] == b"\x01\x01"  # rollback journal, not WAL
    # The service, as its own user, writes to the restored database.
    assert layout.deliver("after-restore") == 200
    assert "after-restore" in layout.events()
    assert "Traceback" not in layout.log.read_text()
