"""Shared fixtures: a temp ini, the real listener as a subprocess, a fake Noyo API.

Tests talk to the daemon over HTTP on 127.0.0.1 and read its real SQLite
file; nothing in the program under test is mocked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import settings

from fake_noyo import FakeNoyo

# No per-example deadline: a loaded 2-core CI machine must not turn speed into failures.
settings.register_profile("noyo", deadline=None, print_blob=True)
settings.load_profile("noyo")

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "noyo_listener.py"
SECRET = "test-secret-one"
OTHER_SECRET = "test-secret-two"


# --- Signing, independently of the module under test -----------------------


def noyo_timestamp(offset_seconds: float = 0.0) -> str:
    """An x-noyo-timestamp as Noyo writes it, ``offset_seconds`` from now."""
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=offset_seconds)
    return when.isoformat()


def hmac_hex(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(body: bytes, secret: str = SECRET, timestamp: str | None = None,
                   form: str = "timestamp.body", trace: str | None = None) -> dict[str, str]:
    timestamp = timestamp or noyo_timestamp()
    message = (timestamp.encode() + b"." + body) if form == "timestamp.body" else body
    return {
        "Content-Type": "application/json",
        "x-noyo-signature": hmac_hex(secret, message),
        "x-noyo-timestamp": timestamp,
        "x-cloud-trace-context": trace or f"{uuid.uuid4().hex}/1;o=1",
    }


def event_body(event_type: str = "difference.created", data_id: str | None = None,
               event_id: str | None = None, created: int | None = None, **data: Any) -> bytes:
    payload_data = {"id": data_id or str(uuid.uuid4()), **data}
    event = {"id": event_id or str(uuid.uuid4()), "created": created or int(time.time()), "type": event_type}
    return json.dumps({"data": payload_data, "event": event}).encode()


# --- The ini ---------------------------------------------------------------


def ini_text(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
        lines.append("")
    return "\n".join(lines)


def base_sections(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "path": "/noyo/webhooks", "threads": 4},
        "webhook": {"secrets": f"primary:{SECRET}"},
        "database": {"path": tmp_path / "noyo.sqlite3", "busy_timeout": "1s"},
        "worker": {"backoff_initial": "50ms", "backoff_max": "1s"},
        "log": {"level": "INFO"},
    }


@pytest.fixture
def make_ini(tmp_path: Path) -> Callable[..., Path]:
    """Write an ini: ``make_ini(webhook={"secrets": ...})`` overrides keys of the base one."""

    def write(name: str = "noyo_listener.ini", **overrides: dict[str, Any]) -> Path:
        sections = base_sections(tmp_path)
        for section, keys in overrides.items():
            sections.setdefault(section, {}).update(keys)
        path = tmp_path / name
        path.write_text(ini_text(sections))
        return path

    return write


# --- The listener process --------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``noyo_listener.py ARGS`` and capture its output."""
    full_env = _clean_environ()
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(MODULE), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)


def _clean_environ() -> dict[str, str]:
    """This environment without anything that would change the listener's config or log format."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("NOYO_") and k not in ("CREDENTIALS_DIRECTORY", "JOURNAL_STREAM")}


class Listener:
    """``noyo_listener.py serve`` in a subprocess, with its log in a file."""

    def __init__(self, ini: Path, env: dict[str, str] | None = None) -> None:
        self.ini = ini
        self.env = env or {}
        self.log_path = ini.with_suffix(".log")
        self.proc: subprocess.Popen | None = None
        self.base = ""
        self.path = ""
        self._log_offset = 0
        # What runs the program; a test of the one-file bundle swaps in [python, bundle].
        self.launcher = [sys.executable, str(MODULE)]

    what = "listener"  # how start-up failures name what was started

    def command(self) -> list[str]:
        """The argv that starts the listener (a subclass may wrap it)."""
        return [*self.launcher, "--config", str(self.ini), "serve"]

    def start(self, timeout: float = 20.0) -> "Listener":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = _clean_environ()
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening url=(http://[^/\s]+)(\S+)", self.log())
            if match:
                self.base, self.path = match.group(1), match.group(2)
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.what} exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)  # polling a log file for the start-up line, bounded by the deadline
        self.kill()  # not left running by a test that never got to stop it
        raise AssertionError(f"{self.what} did not start within {timeout}s:\n{self.log()}")

    @property
    def url(self) -> str:
        return self.base + self.path

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def log(self) -> str:
        """What this run has logged so far."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._log_offset)
            return handle.read().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            time.sleep(0.02)
        raise AssertionError(f"log never matched {pattern!r}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def post(self, body: bytes, headers: dict[str, str] | None = None, path: str | None = None,
             method: str = "POST") -> tuple[int, dict]:
        """Send one request on a fresh connection; return (status, JSON answer)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path or self.path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {"raw": data.decode("utf-8", "replace")}
        return response.status, answer

    def send(self, body: bytes, **sign_kwargs: Any) -> tuple[int, dict]:
        return self.post(body, signed_headers(body, **sign_kwargs))

    def get(self, path: str) -> tuple[int, dict]:
        return self.post(b"", {}, path=path, method="GET")

    def db(self) -> sqlite3.Connection:
        """A read connection to the listener's database."""
        path = re.search(r"database=(\S+)", self.log()).group(1)
        conn = sqlite3.connect(path, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn


@pytest.fixture
def start_listener(make_ini: Callable[..., Path]):
    """``start_listener(**ini_overrides)`` -> a running Listener, stopped after the test."""
    started: list[Listener] = []

    def start(env: dict[str, str] | None = None, ini: Path | None = None, **overrides: Any) -> Listener:
        listener = Listener(ini or make_ini(**overrides), env).start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.kill()


@pytest.fixture
def listener(start_listener) -> Listener:
    return start_listener()


@pytest.fixture
def fake_noyo():
    fake = FakeNoyo().start()
    yield fake
    fake.stop()


def api_sections(fake: FakeNoyo, **worker: Any) -> dict[str, dict[str, Any]]:
    """ini overrides that point the listener at the fake API."""
    return {
        "noyo_api": {
            "client_id": fake.client_id, "client_secret": fake.client_secret,
            "token_url": fake.url + "/auth/public/token", "tracking_url": fake.url,
            "fulfillment_url": fake.url, "timeout": "2s",
        },
        "worker": {"backoff_initial": "50ms", "backoff_max": "1s", **worker},
        # No periodic reconciliation pass unless a test asks (test_sync.py): its
        # list requests would mix with the object GETs other tests count.
        "sync": {"interval": 0},
    }


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.02)
