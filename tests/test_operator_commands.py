"""The operator's commands on the production layout: no secrets in the ini,
`status` telling the daemon's own view, and `restore`."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest

import noyo_listener
from conftest import SECRET, Listener, api_sections, event_body, run_cli, wait_until

# The production layout: the ini has no secrets; the service gets them from
# systemd credentials, which an operator's shell does not see.
NO_SECRETS = {"webhook": {"secrets": ""}}
SERVICE_ENV = {"NOYO_WEBHOOK_SECRETS": f"primary:{SECRET}"}


def one_line_error(result) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def event_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT event_id FROM events")}


# --- commands that only read or maintain the database need no secrets -------------


def test_database_commands_work_with_an_ini_without_secrets(start_listener, tmp_path):
    listener = start_listener(env=SERVICE_ENV, **NO_SECRETS)
    assert listener.send(event_body("difference.created", event_id="e1"))[0] == 200
    listener.send(json.dumps({"data": {}, "event": {"id": "dead-1", "type": "difference.created"}}).encode())
    ini = str(listener.ini)

    for args in (["status"], ["status", "--json"], ["requeue", "--dead"], ["requeue", "e1"],
                 ["requeue", "--type", "difference.created"], ["prune"], ["prune", "--dead"],
                 ["backup", str(tmp_path / "b.sqlite3")]):
        result = run_cli("--config", ini, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert "secrets" not in result.stderr

    assert listener.stop() == 0
    result = run_cli("--config", ini, "restore", str(tmp_path / "b.sqlite3"))
    assert result.returncode == 0, result.stderr


def test_a_command_that_declares_no_needs_needs_no_secrets():
    # The rule is per command, with "nothing" as the default: a command added
    # later that only reads the database is right without saying anything.
    parser = noyo_listener.build_parser()
    needs = {name: sub.get_default("needs") or ()
             for name, sub in next(a for a in parser._actions if a.dest == "command").choices.items()}
    for name in ("status", "backup", "restore", "requeue", "prune"):
        assert needs[name] == (), name
    assert noyo_listener.NEEDS_WEBHOOK_SECRETS in needs["serve"]
    assert noyo_listener.NEEDS_WEBHOOK_SECRETS in needs["check-config"]


def test_serve_and_check_config_still_require_the_webhook_secrets(make_ini):
    ini = str(make_ini(**NO_SECRETS))
    for command in ("serve", "check-config"):
        assert "[webhook] secrets is empty" in one_line_error(run_cli("--config", ini, command))
    # ...and find them in the credentials, as the service does.
    assert run_cli("--config", ini, "check-config", env=SERVICE_ENV).returncode == 0


def test_send_test_takes_its_secret_from_the_config_as_before(make_ini):
    ini = str(make_ini(**NO_SECRETS))
    line = one_line_error(run_cli("--config", ini, "send-test", "http://127.0.0.1:9/noyo/webhooks"))
    assert "[webhook] secrets is empty" in line


def test_a_client_id_in_the_ini_with_its_secret_in_credentials_does_not_stop_status(start_listener):
    # client_id is not a secret and may sit in the ini; client_secret is a credential.
    listener = start_listener(env={**SERVICE_ENV, "NOYO_CLIENT_SECRET": "elsewhere"},
                              noyo_api={"client_id": "my-client"}, **NO_SECRETS)
    result = run_cli("--config", str(listener.ini), "status")
    assert result.returncode == 0, result.stderr


# --- status tells what the daemon sees ------------------------------------------------


def test_status_reports_the_daemons_view_not_the_shells(start_listener, fake_noyo):
    sections = api_sections(fake_noyo)
    credentials = {"NOYO_CLIENT_ID": fake_noyo.client_id, "NOYO_CLIENT_SECRET": fake_noyo.client_secret}
    sections["noyo_api"].update(client_id="", client_secret="")  # the daemon gets them from its environment
    listener = start_listener(env={**SERVICE_ENV, **credentials}, **NO_SECRETS, **sections)
    ini = str(listener.ini)

    # The shell has no credentials; the daemon has, and fetches.
    status = json.loads(run_cli("--config", ini, "status", "--json").stdout)
    assert status["daemon"] == {"running": True, "pid": listener.proc.pid}
    assert status["fetching"] == "on"
    assert status["api"]["state"] == "healthy"
    human = run_cli("--config", ini, "status").stdout
    assert f"daemon:          running (pid {listener.proc.pid})" in human
    assert "fetching:        on" in human

    assert listener.stop() == 0
    status = json.loads(run_cli("--config", ini, "status", "--json").stdout)
    assert status["daemon"]["running"] is False
    human = run_cli("--config", ini, "status").stdout
    assert "daemon:          not running" in human and "as it recorded them at" in human


def test_status_says_fetching_is_off_when_the_daemon_has_no_credentials(start_listener):
    listener = start_listener(env=SERVICE_ENV, **NO_SECRETS)
    # The shell has credentials the daemon lacks: status still says what the daemon does.
    shell = {"NOYO_CLIENT_ID": "id", "NOYO_CLIENT_SECRET": "secret"}
    status = json.loads(run_cli("--config", str(listener.ini), "status", "--json", env=shell).stdout)
    assert status["fetching"].startswith("off") and status["api"]["state"] == "fetching_off"


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_a_status_probe_of_the_lock_does_not_make_a_starting_serve_refuse(make_ini, tmp_path):
    # status takes the instance lock shared for an instant to see whether a
    # serve holds it; a serve starting at that instant waits it out.
    ini = make_ini()
    lock_path = tmp_path / "noyo.sqlite3.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a status probe, caught in the act
    listener = Listener(ini)
    outcome: list = []

    def start() -> None:
        try:
            outcome.append(listener.start())
        except AssertionError as exc:
            outcome.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        # serve has opened the lock file: it is trying to take the lock.
        wait_until(lambda: listener.proc is not None and _has_open(listener.proc.pid, lock_path),
                   timeout=20, message="serve opening its lock file")
    finally:
        os.close(fd)  # the probe ends
        starter.join(30)
    try:
        assert outcome and outcome[0] is listener, outcome
        assert listener.get("/healthz")[0] == 200
    finally:
        listener.kill()


# --- restore ------------------------------------------------------------------------------


def make_stale_wal(db: Path) -> None:
    """Leave beside ``db`` a valid WAL holding a row, as a crash would: SQLite
    replays such a file into whatever database then has this name."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("INSERT INTO events (event_id, type, received_at, payload, status) "
                 "VALUES ('stale', 'x.y', '2020-01-01T00:00:00.000Z', '{}', 'done')")
    wal = Path(str(db) + "-wal").read_bytes()
    conn.close()  # checkpoints and removes the WAL; put it back as a crash leaves it
    Path(str(db) + "-wal").write_bytes(wal)
    assert "stale" in event_ids(db)  # SQLite does replay it (which checkpoints it again)...
    Path(str(db) + "-wal").write_bytes(wal)  # ...so leave it once more


def test_restore_round_trip_private_owned_like_the_directory(start_listener, tmp_path):
    listener = start_listener()
    for event_id in ("a", "b"):
        assert listener.send(event_body(event_id=event_id))[0] == 200
    backup = tmp_path / "backup.sqlite3"
    assert run_cli("--config", str(listener.ini), "backup", str(backup)).returncode == 0
    assert listener.send(event_body(event_id="after-backup"))[0] == 200
    db = tmp_path / "noyo.sqlite3"

    # While serve runs: refused, nothing changed.
    line = one_line_error(run_cli("--config", str(listener.ini), "restore", str(backup)))
    assert "is serving" in line and "stop it first" in line
    assert "after-backup" in event_ids(db)

    assert listener.stop() == 0
    make_stale_wal(db)
    # The state directory belongs to the service's own user (DynamicUser=):
    # the restored file must too, or serve could not open it.
    os.chown(tmp_path, 65534, 65534)
    result = run_cli("--config", str(listener.ini), "restore", str(backup))
    assert result.returncode == 0, result.stderr
    assert "restored" in result.stdout and "integrity ok" in result.stdout

    info = db.stat()
    assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o600, 65534, 65534)
    assert event_ids(db) == {"a", "b"}  # the stale WAL was not replayed into it
    assert sorted(p.name for p in tmp_path.iterdir() if ".restore-" in p.name) == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    listener.start()
    assert listener.send(event_body(event_id="c"))[0] == 200
    assert event_ids(db) == {"a", "b", "c"}


def _newer_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {noyo_listener.SCHEMA_VERSION + 1}")


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_ours(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE other (x)")


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 200)


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("spoil, expected", [
    (_newer_schema, "newer than this program's"),
    (_truncated, ""),
    (_not_ours, "not a noyo-listener database"),
    (_not_sqlite, "cannot be read as a SQLite database"),
    (_missing, "does not exist"),
])
def test_restore_refuses_a_bad_backup_and_changes_nothing(start_listener, tmp_path, spoil, expected):
    listener = start_listener()
    listener.send(event_body(event_id="kept"))
    for number in range(50):  # enough pages that half a file is missing some
        listener.send(event_body(event_id=f"filler-{number}", padding="x" * 2000))
    backup = tmp_path / "backup.sqlite3"
    assert run_cli("--config", str(listener.ini), "backup", str(backup)).returncode == 0
    assert listener.stop() == 0
    db = tmp_path / "noyo.sqlite3"
    before = db.read_bytes()

    spoil(backup)
    line = one_line_error(run_cli("--config", str(listener.ini), "restore", str(backup)))
    assert expected in line and "nothing was changed" in line
    assert db.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".restore-" in p.name] == []


def test_restore_onto_a_fresh_install_creates_the_database(make_ini, start_listener, tmp_path):
    listener = start_listener()
    listener.send(event_body(event_id="moved"))
    backup = tmp_path / "backup.sqlite3"
    assert run_cli("--config", str(listener.ini), "backup", str(backup)).returncode == 0
    assert listener.stop() == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    os.chown(fresh, 65534, 65534)  # a new state directory of the service's user
    ini = make_ini("fresh.ini", database={"path": fresh / "db.sqlite3"})
    result = run_cli("--config", str(ini), "restore", str(backup))
    assert result.returncode == 0, result.stderr
    assert event_ids(fresh / "db.sqlite3") == {"moved"}
    # Every file restore created there belongs to that user: serve can open them.
    assert {(p.name, p.stat().st_uid, p.stat().st_gid) for p in fresh.iterdir()} == {
        ("db.sqlite3", 65534, 65534), ("db.sqlite3.lock", 65534, 65534)}


# --- a backup is one self-contained file, read without writing beside it ------------------------


def test_backup_writes_one_self_contained_file_in_rollback_journal_mode(start_listener, tmp_path):
    listener = start_listener()
    assert listener.send(event_body(event_id="a"))[0] == 200
    backups = tmp_path / "backups"
    backups.mkdir()
    assert run_cli("--config", str(listener.ini), "backup", str(backups / "b.sqlite3")).returncode == 0
    # Bytes 18 and 19 of the header: 1 = rollback journal, 2 = WAL (which needs a -shm to read).
    assert (backups / "b.sqlite3").read_bytes()[18:20] == b"\x01\x01"
    assert [p.name for p in backups.iterdir()] == ["b.sqlite3"]


def _wal_mode_backup(path: Path) -> None:
    """As `backup` wrote them before: the database's WAL mode copied along."""
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    conn.close()  # the last connection: no -wal or -shm stays behind
    assert path.read_bytes()[18:20] == b"\x02\x02"


@pytest.mark.parametrize("backup_form", [None, _wal_mode_backup], ids=["as-written", "older-wal-mode-backup"])
def test_restore_as_the_service_user_reads_a_backup_in_a_directory_it_cannot_write(start_listener, tmp_path,
                                                                                  backup_form):
    import shutil
    import subprocess
    import tempfile
    from test_readme_layout import NOBODY, python_for

    listener = start_listener()
    for event_id in ("a", "b"):
        assert listener.send(event_body(event_id=event_id))[0] == 200
    assert listener.stop() == 0
    # A tree `nobody` can walk: its state directory (its own) and a backup
    # directory of root's that it may read but not write.
    root = Path(tempfile.mkdtemp(prefix="noyo-restore-", dir="/tmp"))
    try:
        root.chmod(0o755)
        state, backups = root / "state", root / "backups"
        state.mkdir(mode=0o700)
        backups.mkdir(mode=0o755)
        backup = backups / "b.sqlite3"
        assert run_cli("--config", str(listener.ini), "backup", str(backup)).returncode == 0
        if backup_form:
            backup_form(backup)
        os.chown(backup, NOBODY, NOBODY)  # readable by it; the directory stays root's
        spoiled = backups / "not-ours.sqlite3"
        spoiled.touch()
        _not_ours(spoiled)
        os.chown(spoiled, NOBODY, NOBODY)
        shutil.copy(noyo_listener.__file__, root / "noyo_listener.py")
        ini = root / "noyo.ini"
        ini.write_text(listener.ini.read_text().replace(str(tmp_path / "noyo.sqlite3"), str(state / "db.sqlite3")))
        ini.chmod(0o644)
        os.chown(state, NOBODY, NOBODY)
        python, env = python_for(NOBODY)

        def restore(source: Path) -> subprocess.CompletedProcess:
            return subprocess.run([python, str(root / "noyo_listener.py"), "--config", str(ini), "restore", str(source)],
                                  user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True, text=True,
                                  env={**env, "PATH": "/usr/bin:/bin"}, timeout=60, stdin=subprocess.DEVNULL)

        assert "not a noyo-listener database" in one_line_error(restore(spoiled))
        result = restore(backup)
        assert result.returncode == 0, result.stderr
        assert event_ids(state / "db.sqlite3") == {"a", "b"}
        # Nothing was left beside the backups: no -shm, -wal or -journal.
        assert sorted(p.name for p in backups.iterdir()) == ["b.sqlite3", "not-ours.sqlite3"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_restore_refuses_a_live_database_with_its_wal_beside_it(start_listener, tmp_path):
    listener = start_listener()
    assert listener.send(event_body(event_id="a"))[0] == 200
    assert listener.stop() == 0
    live = tmp_path / "live.sqlite3"
    shutil_copy = __import__("shutil").copy
    shutil_copy(tmp_path / "noyo.sqlite3", live)
    make_stale_wal(live)  # a WAL holding a committed row that immutable=1 would ignore
    line = one_line_error(run_cli("--config", str(listener.ini), "restore", str(live)))
    assert "write-ahead log beside it" in line and "nothing was changed" in line
