"""The SQLite file: WAL, durability settings, privacy, schema, and the 503 path."""

from __future__ import annotations

import os
import sqlite3
import stat
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import noyo_listener
from conftest import event_body


def test_database_is_in_wal_mode_with_a_versioned_schema(listener):
    listener.send(event_body())
    with listener.db() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == noyo_listener.SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"events", "deliveries", "differences", "resources"} <= tables


def test_database_files_are_readable_by_their_owner_only(listener, tmp_path):
    listener.send(event_body())
    files = [tmp_path / "noyo.sqlite3", tmp_path / "noyo.sqlite3-wal", tmp_path / "noyo.sqlite3-shm"]
    for path in files:
        assert path.exists(), path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_a_world_readable_database_is_made_private_at_start(start_listener, tmp_path):
    path = tmp_path / "noyo.sqlite3"
    sqlite3.connect(path).close()
    os.chmod(path, 0o644)
    listener = start_listener()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    listener.wait_for_log(r"mode set to 0600")


@given(st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=20))
def test_utc_iso_matches_strftime_for_timestamps_in_any_order(stamps):
    # utc_iso keeps the text of the last second it formatted; any order of
    # seconds must still give each its own text.
    for stamp in stamps:
        whole = int(stamp)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % int((stamp - whole) * 1000)
        assert noyo_listener.utc_iso(stamp) == expected


@pytest.mark.parametrize("level, number", [("OFF", 0), ("NORMAL", 1), ("FULL", 2), ("EXTRA", 3)])
def test_connections_carry_the_configured_pragmas(tmp_path, level, number):
    conn = noyo_listener.connect(str(tmp_path / "p.sqlite3"), level, busy_timeout=2.5)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == number
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrations_run_once_and_a_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "m.sqlite3")
    conn = noyo_listener.connect(path)
    assert noyo_listener.migrate(conn, path) == 0
    assert noyo_listener.migrate(conn, path) == noyo_listener.SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {noyo_listener.SCHEMA_VERSION + 1}")
    with pytest.raises(noyo_listener.StoreError, match="newer than this program"):
        noyo_listener.migrate(conn, path)


def test_a_version_2_database_keeps_its_rows_and_loses_the_deliveries_index(tmp_path):
    path = str(tmp_path / "v2.sqlite3")
    conn = noyo_listener.connect(path)
    for version, script in enumerate(noyo_listener.MIGRATIONS[:2], start=1):
        for statement in noyo_listener._split_sql(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO events (event_id, type, received_at, payload, status, delivery_count) "
                 "VALUES ('e1', 'difference.created', 'now', '{}', 'ignored', 2)")
    conn.executemany("INSERT INTO deliveries (event_id, received_at, secret_name, signature_form, duplicate) "
                     "VALUES ('e1', 'now', 's', 'body', ?)", [(0,), (1,)])
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'deliveries_event'").fetchone()[0] == 1

    assert noyo_listener.migrate(conn, path) == 2

    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'deliveries_event'").fetchone()[0] == 0
    assert [r[0] for r in conn.execute("SELECT event_id FROM repeated_deliveries")] == ["e1", "e1"]


def hold_write_lock(listener) -> sqlite3.Connection:
    """Another process's writer (a backup, an operator's sqlite3) holding the lock."""
    conn = listener.db()
    conn.isolation_level = None
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_503_when_the_database_stays_locked_then_200_again(listener):
    """busy_timeout is 1s in the test ini: past it the commit fails and nothing is acknowledged."""
    blocker = hold_write_lock(listener)
    try:
        status, answer = listener.send(event_body(event_id="while-locked"))
        assert status == 503 and answer["ok"] is False
        health, _ = listener.get("/healthz")
        assert health == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    listener.wait_for_log(r"status=503 ms=\S+ event_id=while-locked type=difference.created reason=not_stored")
    with listener.db() as conn:
        assert conn.execute("SELECT COUNT(*) FROM events WHERE event_id = 'while-locked'").fetchone()[0] == 0

    # Noyo retries: once the lock is gone the same event is accepted as new.
    assert listener.send(event_body(event_id="while-locked")) == (200, {"ok": True})
    assert listener.get("/healthz")[0] == 200
    assert "Traceback" not in listener.log()


def test_503_when_the_disk_is_full(tmp_path):
    """SQLITE_FULL at commit (max_page_count stands in for a full disk) fails the job, never acks."""
    store = noyo_listener.Store(str(tmp_path / "full.sqlite3"))
    store.open()
    try:
        pages = store.write(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
        store.write(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages + 1}"))
        big = "x" * 100_000
        with pytest.raises(noyo_listener.StoreError, match="full"):
            store.write(lambda conn: conn.execute(
                "INSERT INTO meta (key, value) VALUES ('big', ?)", (big,)))
        # The writer survives and commits small things again.
        store.write(lambda conn: noyo_listener.set_meta(conn, "small", "ok"))
    finally:
        store.close()


def test_one_failing_job_does_not_fail_the_others_in_its_batch(tmp_path):
    store = noyo_listener.Store(str(tmp_path / "batch.sqlite3"))
    store.open()
    try:
        jobs = [store.submit(lambda conn, i=i: noyo_listener.set_meta(conn, f"k{i}", "v")) for i in range(20)]
        jobs.insert(10, store.submit(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)")))
        for job in jobs:
            assert job.wait(10)
        assert [job.error is None for job in jobs].count(False) == 1
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0] == 20
    finally:
        store.close()


def test_a_second_serve_on_the_same_database_refuses_to_start(listener, make_ini):
    from conftest import run_cli
    result = run_cli("--config", str(listener.ini), "serve", timeout=20)
    assert result.returncode == 1
    assert "already serving" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
