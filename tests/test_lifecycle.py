"""Running as a service: systemd notify and watchdog, SIGTERM, SIGHUP, retention,
backup, views, the journal log format and the unit file."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import OTHER_SECRET, ROOT, SECRET, event_body, run_cli, signed_headers, wait_until


class NotifySocket:
    """A real unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.cond:
                self.messages.append((time.monotonic(), data.decode()))
                self.cond.notify_all()

    def wait_for(self, text: str, after: float = 0.0, timeout: float = 15.0) -> float:
        """Wait for a message containing ``text`` received after ``after``; return when."""
        def found():
            return next((at for at, m in self.messages if at > after and text in m), None)
        with self.cond:
            if not self.cond.wait_for(found, timeout):
                raise AssertionError(f"no {text!r} after {after}; got {self.messages}")
            return found()

    def count(self, text: str, since: float) -> int:
        with self.cond:
            return sum(1 for at, m in self.messages if at > since and text in m)

    def close(self) -> None:
        self.sock.close()


def hold_write_lock(listener) -> sqlite3.Connection:
    conn = listener.db()
    conn.isolation_level = None
    conn.execute("BEGIN IMMEDIATE")
    return conn


# --- systemd notify and watchdog ------------------------------------------------


def test_ready_status_watchdog_and_stopping_over_the_notify_socket(start_listener, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        # 1.5 s: the self-check gets 0.75 s for a GET /healthz, ample on a loaded machine.
        listener = start_listener(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1500000"})
        ready = notify.wait_for("READY=1")
        assert any("STATUS=pending=0 dead=0 fetching off requests_running=0 requests_queued=0" in m
                   for _, m in notify.messages)
        first = notify.wait_for("WATCHDOG=1", after=ready)
        notify.wait_for("WATCHDOG=1", after=first)

        # The database stops committing: the service makes no progress, so the pings stop...
        blocker = hold_write_lock(listener)
        listener.wait_for_log(r"withholding the systemd watchdog ping problems=")
        quiet_from = time.monotonic() + 1.0  # a ping already on its way may still land
        time.sleep(2.0)  # a window of four housekeeping ticks, observed, not waited for
        assert notify.count("WATCHDOG=1", since=quiet_from) == 0

        # ...and resume once it commits again.
        blocker.execute("ROLLBACK")
        blocker.close()
        notify.wait_for("WATCHDOG=1", after=time.monotonic())

        assert listener.stop() == 0
        notify.wait_for("STOPPING=1", after=ready)
    finally:
        notify.close()


def test_no_notify_socket_no_problem(listener):
    assert listener.get("/healthz")[0] == 200
    assert "cannot notify" not in listener.log()


# --- SIGTERM ----------------------------------------------------------------------


def server_read_everything(port: int, connections: int) -> bool:
    """True once ``connections`` established sockets of the server on ``port``
    have nothing left unread in the kernel (read from /proc/net/tcp)."""
    server_side = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED
            tx_queue, rx_queue = (int(x, 16) for x in fields[4].split(":"))
            server_side.append(rx_queue)
    return len(server_side) >= connections and all(rx == 0 for rx in server_side)


def test_sigterm_with_requests_in_flight_answers_them_all_and_exits_0(start_listener):
    listener = start_listener(server={"threads": 1}, database={"busy_timeout": "10s"})
    blocker = hold_write_lock(listener)  # the first request blocks in its commit; the others queue
    answers: dict[str, int] = {}
    sent: list[str] = []

    def send(event_id: str) -> None:
        body = event_body(event_id=event_id)
        conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
        try:
            conn.request("POST", listener.path, body=body, headers=signed_headers(body))
            sent.append(event_id)
            answers[event_id] = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            answers[event_id] = repr(exc)
        finally:
            conn.close()

    senders = [threading.Thread(target=send, args=(f"inflight-{n}",)) for n in range(3)]
    for sender in senders:
        sender.start()
    # All three in flight (one running, two queued) once every request was sent
    # and the server has read every byte of them (a connected socket whose
    # request is not sent yet also shows nothing unread).
    wait_until(lambda: len(sent) == 3 and server_read_everything(listener.port, connections=3),
               message="requests sent and read by the server")
    listener.proc.terminate()
    listener.wait_for_log(r"stop requested; finishing requests in flight")
    blocker.execute("ROLLBACK")
    blocker.close()
    for sender in senders:
        sender.join(30)

    assert listener.proc.wait(15) == 0
    assert answers == {f"inflight-{n}": 200 for n in range(3)}
    with listener.db() as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 3
    assert "Traceback" not in listener.log()
    # The WAL was checkpointed into the database at exit.
    wal = Path(re.search(r"database=(\S+)", listener.log()).group(1) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


# --- SIGHUP -------------------------------------------------------------------------


def test_sighup_rotates_secrets_without_a_restart_and_a_broken_file_changes_nothing(start_listener, make_ini):
    listener = start_listener()
    pid = listener.proc.pid
    assert listener.send(event_body(), secret=OTHER_SECRET)[0] == 401

    make_ini(webhook={"secrets": f"old:{SECRET}, new:{OTHER_SECRET}"}, log={"level": "DEBUG"})
    listener.proc.send_signal(1)  # SIGHUP
    listener.wait_for_log(r"reloaded secrets=old,new signature_payload=auto log_level=DEBUG")
    assert listener.send(event_body(event_id="after-reload"), secret=OTHER_SECRET)[0] == 200
    assert listener.send(event_body(), secret=SECRET)[0] == 200

    listener.ini.write_text("[server]\nport = not-a-port\n")
    listener.proc.send_signal(1)
    listener.wait_for_log(r"ERROR reload failed, keeping the running settings: \[server\] port")
    assert listener.send(event_body(), secret=OTHER_SECRET)[0] == 200
    assert listener.proc.pid == pid and listener.proc.poll() is None
    with listener.db() as conn:
        assert conn.execute("SELECT secret_name FROM deliveries WHERE event_id = 'after-reload'").fetchone()[0] == "new"


# --- retention ------------------------------------------------------------------------


def age_everything(listener, days: int) -> None:
    with listener.db() as conn:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - days * 86400))
        conn.execute("UPDATE events SET received_at = ?", (stamp,))
        conn.execute("UPDATE deliveries SET received_at = ?", (stamp,))


def test_prune_forgets_old_done_and_ignored_events_keeps_pending_and_dead(listener):
    listener.send(event_body("test.hello_world", event_id="old-ignored"))
    listener.send(event_body("difference.created", event_id="old-pending"))
    listener.send(json.dumps({"data": {}, "event": {"id": "old-dead", "type": "difference.created"}}).encode())
    age_everything(listener, days=31)
    listener.send(event_body("test.hello_world", event_id="new-ignored"))
    ini = str(listener.ini)

    result = run_cli("--config", ini, "prune")
    assert result.returncode == 0, result.stderr
    assert "pruned 1 done and ignored event(s) and 3 deliveries" in result.stdout
    with listener.db() as conn:
        assert {r[0] for r in conn.execute("SELECT event_id FROM events")} == {"old-pending", "old-dead", "new-ignored"}

    result = run_cli("--config", ini, "prune", "--dead")
    assert "pruned 1 done, ignored and dead event(s)" in result.stdout
    with listener.db() as conn:
        assert {r[0] for r in conn.execute("SELECT event_id FROM events")} == {"old-pending", "new-ignored"}
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


def test_the_running_service_prunes_at_start_and_then_daily(start_listener):
    listener = start_listener()
    listener.send(event_body("test.hello_world", event_id="old"))
    listener.send(event_body("difference.created", event_id="old-but-pending"))
    age_everything(listener, days=31)
    assert listener.stop() == 0
    listener.start()
    listener.wait_for_log(r"pruned events=1 deliveries=2 older_than_days=30")
    with listener.db() as conn:
        assert [r[0] for r in conn.execute("SELECT event_id FROM events")] == ["old-but-pending"]


# --- backup ---------------------------------------------------------------------------


def test_backup_while_serving_is_consistent_private_and_never_overwrites(listener, tmp_path):
    stop = threading.Event()
    sent: list[str] = []

    def keep_sending() -> None:
        while not stop.is_set():
            event_id = f"b-{len(sent)}"
            if listener.send(event_body(event_id=event_id))[0] == 200:
                sent.append(event_id)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        wait_until(lambda: len(sent) >= 20, message="some traffic")
        dest = tmp_path / "backup.sqlite3"
        result = run_cli("--config", str(listener.ini), "backup", str(dest))
        assert result.returncode == 0, result.stderr
        assert "integrity ok" in result.stdout
    finally:
        stop.set()
        sender.join(30)
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(dest) as conn:
        backed_up = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # Every delivery row in the copy has its event: one consistent snapshot.
        assert conn.execute("SELECT COUNT(*) FROM deliveries WHERE event_id NOT IN "
                            "(SELECT event_id FROM events)").fetchone()[0] == 0
    assert 20 <= backed_up <= len(sent)

    again = run_cli("--config", str(listener.ini), "backup", str(dest))
    assert again.returncode == 1 and "already exists" in again.stderr


# --- views and logs ---------------------------------------------------------------------


def test_views_for_the_sqlite3_cli(listener):
    listener.send(event_body("difference.created", event_id="p1"))
    listener.send(json.dumps({"data": {}, "event": {"id": "d1", "type": "difference.created"}}).encode())
    body = event_body("test.hello_world", event_id="r1")
    listener.send(body)
    listener.send(body)
    with listener.db() as conn:
        assert [r[0] for r in conn.execute("SELECT event_id FROM pending_events")] == ["p1"]
        assert [r[0] for r in conn.execute("SELECT event_id FROM dead_events")] == ["d1"]
        assert {r[0] for r in conn.execute("SELECT event_id FROM recent_events")} == {"p1", "d1", "r1"}
        assert [r[0] for r in conn.execute("SELECT event_id FROM repeated_deliveries")] == ["r1", "r1"]
        assert conn.execute("SELECT COUNT(*) FROM open_discrepancies").fetchone()[0] == 0
    out = subprocess.run(["sqlite3", "-box", str(listener.ini.parent / "noyo.sqlite3"),
                          "select event_id, status from recent_events"], capture_output=True, text=True) \
        if shutil.which("sqlite3") else None
    if out is not None:
        assert "p1" in out.stdout


def test_under_journald_lines_carry_a_priority_and_no_timestamp(start_listener):
    listener = start_listener(env={"JOURNAL_STREAM": "8:12345"})
    listener.send(event_body(), secret="wrong")
    listener.wait_for_log(r"(?m)^<4>WARNING request method=POST .*status=401")
    lines = [line for line in listener.log().splitlines() if line]
    assert lines and all(re.match(r"<[0-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line) for line in lines), lines
    assert any(line.startswith("<6>INFO listening url=") for line in lines)


# --- the unit file ------------------------------------------------------------------------


UNIT = ROOT / "systemd" / "noyo-listener.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_file_is_hardened_to_1_5_or_better():
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout).group(1))
    assert score <= 1.5, result.stdout[-2000:]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_file_verifies_clean(tmp_path):
    # verify checks that ExecStart exists: lay out the documented /opt tree under tmp.
    prefix = tmp_path / "opt" / "noyo-listener"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, prefix / ".venv" / "bin" / "python3")
    os.symlink(ROOT / "noyo_listener.py", prefix / "noyo_listener.py")
    unit = tmp_path / "noyo-listener.service"
    unit.write_text(UNIT.read_text().replace("/opt/noyo-listener", str(prefix)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
