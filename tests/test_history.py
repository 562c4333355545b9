"""History: the change feed (`changes` table), `history`, `changes [--follow]`,
retention, the migration that adds it, and the discrepancy-alert consumer.

End-to-end tests run the real listener against the fake Noyo API; the CLI
tests run the real program on a database built by the program's own
migrations and apply functions.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import noyo_listener
from conftest import MODULE, ROOT, _clean_environ, api_sections, event_body, run_cli, wait_until

COLUMNS = list(noyo_listener.CHANGE_COLUMNS)


def difference(diff_id: str, modified: int, resolved: int | None = None, discrepancy_time: int | None = None,
               **extra) -> dict:
    return {"id": diff_id, "version": modified, "modified": modified, "resolved": resolved,
            "discrepancy_time": discrepancy_time, "group_id": "g-1", "employee_id": "e-1", "carrier_id": "c-1",
            "difference_type": "missing", **extra}


def feed_rows(db_path, object_id: str | None = None) -> list[dict]:
    conn = sqlite3.connect(str(db_path), timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        if object_id is None:
            return [dict(r) for r in conn.execute("SELECT * FROM changes ORDER BY seq")]
        return [dict(r) for r in conn.execute("SELECT * FROM changes WHERE id = ? ORDER BY seq", (object_id,))]
    finally:
        conn.close()


def summary(rows: list[dict]) -> list[tuple]:
    return [(r["kind"], r["state_from"], r["state_to"], r["modified"], r["source"], r["event_type"]) for r in rows]


def all_done(listener) -> bool:
    with listener.db() as conn:
        return {s for (s,) in conn.execute("SELECT status FROM events")} == {"done"}


def deliver(listener, fake_noyo, kind: str, obj: dict, event_type: str, event_id: str, **data) -> None:
    """Noyo's state becomes ``obj``; an event about it arrives and is processed."""
    fake_noyo.put(kind, obj)
    status, _ = listener.send(event_body(event_type, data_id=obj["id"], event_id=event_id, **data))
    assert status == 200
    wait_until(lambda: all_done(listener), 15, f"{event_id} processed")


# --- the feed, written by the real worker -----------------------------------------


def test_a_difference_lifecycle_gives_three_rows_and_repeats_or_older_objects_none(start_listener, fake_noyo,
                                                                                     tmp_path):
    listener = start_listener(**api_sections(fake_noyo))
    path = tmp_path / "noyo.sqlite3"
    deliver(listener, fake_noyo, "difference", difference("d-1", 100), "difference.created", "e-1")
    deliver(listener, fake_noyo, "difference", difference("d-1", 200, discrepancy_time=150),
            "difference.discrepancy", "e-2")
    deliver(listener, fake_noyo, "difference", difference("d-1", 300, discrepancy_time=150, resolved=250),
            "difference.resolved", "e-3")
    expected = [
        ("difference", None, "pending", 100, "fetch", "difference.created"),
        ("difference", "pending", "discrepancy", 200, "fetch", "difference.discrepancy"),
        ("difference", "discrepancy", "resolved", 300, "fetch", "difference.resolved"),
    ]
    rows = feed_rows(path, "d-1")
    assert summary(rows) == expected
    assert [r["version"] for r in rows] == [100, 200, 300]
    assert all(r["observed_at"].endswith("Z") for r in rows)
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)

    # The same delivery again, a new event that fetches the same object, and
    # one whose fetch returns an older object: none adds a row.
    status, answer = listener.send(event_body("difference.resolved", data_id="d-1", event_id="e-3"))
    assert status == 200 and answer.get("duplicate") is True
    deliver(listener, fake_noyo, "difference", difference("d-1", 300, discrepancy_time=150, resolved=250),
            "difference.resolved", "e-4")
    deliver(listener, fake_noyo, "difference", difference("d-1", 200, discrepancy_time=150),
            "difference.discrepancy", "e-5")
    assert summary(feed_rows(path, "d-1")) == expected
    with listener.db() as conn:
        row = conn.execute("SELECT state, modified FROM differences WHERE id = 'd-1'").fetchone()
    assert tuple(row) == ("resolved", 300)


def test_a_replaced_event_and_a_member_snapshot_status_change_each_write_their_row(start_listener, fake_noyo,
                                                                                   tmp_path, make_ini):
    listener = start_listener(**api_sections(fake_noyo))
    deliver(listener, fake_noyo, "difference", difference("d-2", 100, discrepancy_time=90),
            "difference.discrepancy", "e-1")
    # Noyo's object does not move; the replaced event alone changes the state.
    deliver(listener, fake_noyo, "difference", difference("d-2", 100, discrepancy_time=90),
            "difference.replaced", "e-2", replaced_by="d-3")
    snapshot = {"id": "m-1", "version": 1, "modified": 100, "status": "processing"}
    deliver(listener, fake_noyo, "member_snapshot", snapshot, "member_snapshot.status_change", "e-3")
    deliver(listener, fake_noyo, "member_snapshot", {**snapshot, "version": 2, "modified": 200, "status": "completed"},
            "member_snapshot.status_change", "e-4")
    # A later replaced event for the same difference changes nothing more.
    deliver(listener, fake_noyo, "difference", difference("d-2", 100, discrepancy_time=90),
            "difference.replaced", "e-5", replaced_by="d-3")

    path = tmp_path / "noyo.sqlite3"
    assert summary(feed_rows(path, "d-2")) == [
        ("difference", None, "discrepancy", 100, "fetch", "difference.discrepancy"),
        ("difference", "discrepancy", "replaced", 100, "event", "difference.replaced"),
    ]
    assert summary(feed_rows(path, "m-1")) == [
        ("member_snapshot", None, "processing", 100, "fetch", "member_snapshot.status_change"),
        ("member_snapshot", "processing", "completed", 200, "fetch", "member_snapshot.status_change"),
    ]
    with listener.db() as conn:
        assert tuple(conn.execute("SELECT state, replaced_by FROM differences WHERE id = 'd-2'").fetchone()) == (
            "replaced", "d-3")

    # While serve runs, `history` reads the same file with an ini that has no
    # secrets at all (the production layout).
    reader_ini = make_ini("reader.ini", webhook={"secrets": ""})
    result = run_cli("--config", str(reader_ini), "history", "d-2")
    assert result.returncode == 0, result.stderr
    assert [line.split("  ")[2] for line in result.stdout.splitlines()] == ["(new) -> discrepancy",
                                                                            "discrepancy -> replaced"]
    assert result.stdout.splitlines()[1].endswith("source=event (difference.replaced)")


# --- apply_* return values and the sync source (the interface reconciliation uses) --------


def fresh_db(path=":memory:") -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    noyo_listener.migrate(conn, str(path))
    return conn


def test_apply_functions_say_new_updated_or_unchanged_and_sync_rows_name_no_event():
    conn = fresh_db()
    apply = noyo_listener.apply_difference
    v1, v2 = difference("d", 1), difference("d", 2, discrepancy_time=2)
    assert apply(conn, v1, json.dumps(v1), [], "t1", source="sync") == "new"
    assert apply(conn, v1, json.dumps(v1), [], "t2", source="sync") == "unchanged"
    assert apply(conn, v2, json.dumps(v2), [], "t3", source="sync") == "updated"
    assert apply(conn, v1, json.dumps(v1), [], "t4") == "unchanged"
    resource = noyo_listener.apply_resource
    g1, g2 = {"id": "g", "modified": 5, "status": "active"}, {"id": "g", "modified": 6, "status": "inactive"}
    assert resource(conn, "group", g1, json.dumps(g1), "t5", source="sync", event_type="ignored") == "new"
    assert resource(conn, "group", g2, json.dumps(g2), "t6", event_type="group.created") == "updated"
    assert resource(conn, "group", g1, json.dumps(g1), "t7") == "unchanged"
    assert resource(conn, "group", g2, json.dumps(g2), "t8") == "unchanged"
    assert resource(conn, "group", {"id": "h"}, "{}", "t9", source="sync") == "new"  # no status: NULL state
    rows = conn.execute("SELECT kind, id, state_from, state_to, observed_at, source, event_type "
                        "FROM changes ORDER BY seq").fetchall()
    assert rows == [
        ("difference", "d", None, "pending", "t1", "sync", None),
        ("difference", "d", "pending", "discrepancy", "t3", "sync", None),
        ("group", "g", None, "active", "t5", "sync", None),
        ("group", "g", "active", "inactive", "t6", "fetch", "group.created"),
        ("group", "h", None, None, "t9", "sync", None),
    ]
    with pytest.raises(ValueError, match="change source"):
        apply(conn, difference("x", 1), "{}", [], "t", source="webhook")


# --- migration ---------------------------------------------------------------------------


def build_v3(path: Path) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    for script in noyo_listener.MIGRATIONS[:3]:
        for statement in noyo_listener._split_sql(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO events (event_id, type, data_id, received_at, payload, status) "
                 "VALUES ('e-1', 'difference.created', 'd-1', '2026-01-01T00:00:00.000Z', '{}', 'done')")
    conn.execute("INSERT INTO differences (id, state, modified, body) VALUES ('d-1', 'discrepancy', 5, '{}')")
    conn.execute("INSERT INTO resources (kind, id, modified, fetched_at, body) VALUES ('group', 'g', 1, 't', '{}')")
    conn.close()


def test_a_v3_database_migrates_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    build_v3(path)
    conn = sqlite3.connect(str(path), isolation_level=None)
    assert noyo_listener.migrate(conn, str(path)) == 3
    assert conn.execute("PRAGMA user_version").fetchone()[0] == noyo_listener.SCHEMA_VERSION
    assert conn.execute("SELECT event_id, status FROM events").fetchall() == [("e-1", "done")]
    assert conn.execute("SELECT id, state FROM differences").fetchall() == [("d-1", "discrepancy")]
    assert conn.execute("SELECT kind, id FROM resources").fetchall() == [("group", "g")]
    assert conn.execute("SELECT COUNT(*) FROM changes").fetchone()[0] == 0
    # The views work on the migrated file (the open discrepancy has no feed row yet).
    assert conn.execute("SELECT difference_id FROM open_discrepancy_ages").fetchall() == [("d-1",)]
    assert conn.execute("SELECT COUNT(*) FROM difference_timeline").fetchone()[0] == 0
    conn.close()


def test_history_and_changes_open_the_database_read_only_and_never_migrate_it(tmp_path, make_ini):
    ini = make_ini(webhook={"secrets": ""}, database={"path": tmp_path / "old.sqlite3"})
    build_v3(tmp_path / "old.sqlite3")
    for args in (["history", "d-1"], ["changes"]):
        result = run_cli("--config", str(ini), *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "predates" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    conn = sqlite3.connect(str(tmp_path / "old.sqlite3"))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()


# --- `history` and `changes` ---------------------------------------------------------------


@pytest.fixture
def feed_db(tmp_path, make_ini):
    """A database with a difference's lifecycle and a snapshot, and an ini
    without webhook secrets or API credentials (the production layout)."""
    path = tmp_path / "feed.sqlite3"
    ini = make_ini(webhook={"secrets": ""}, database={"path": path})
    conn = noyo_listener.connect(str(path))
    noyo_listener.migrate(conn, str(path))
    conn.close()
    add_rows(path, [
        ("difference", difference("d-1", 1_700_000_000), "2026-01-01T00:00:00.000Z"),
        ("member_snapshot", {"id": "m-1", "modified": 5, "status": "processing"}, "2026-01-01T00:00:01.000Z"),
        ("difference", difference("d-1", 1_700_000_100, discrepancy_time=9), "2026-01-01T00:00:02.000Z"),
        ("difference", difference("d-1", 1_700_000_200, discrepancy_time=9, resolved=10),
         "2026-01-01T00:00:03.000Z"),
    ])
    return path, ini


def add_rows(path: Path, items: list[tuple[str, dict, str]]) -> None:
    """Store objects as the worker does: one write transaction each."""
    conn = noyo_listener.connect(str(path))
    try:
        for kind, obj, at in items:
            conn.execute("BEGIN IMMEDIATE")
            if kind == "difference":
                noyo_listener.apply_difference(conn, obj, json.dumps(obj), [], at)
            else:
                noyo_listener.apply_resource(conn, kind, obj, json.dumps(obj), at)
            conn.execute("COMMIT")
    finally:
        conn.close()


def test_history_prints_one_readable_line_per_change_oldest_first(feed_db):
    path, ini = feed_db
    result = run_cli("--config", str(ini), "history", "d-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "2026-01-01T00:00:00.000Z  difference  (new) -> pending  modified=2023-11-14T22:13:20Z version=1700000000"
        "  source=fetch",
        "2026-01-01T00:00:02.000Z  difference  pending -> discrepancy  modified=2023-11-14T22:15:00Z "
        "version=1700000100  source=fetch",
        "2026-01-01T00:00:03.000Z  difference  discrepancy -> resolved  modified=2023-11-14T22:16:40Z "
        "version=1700000200  source=fetch",
    ]
    as_json = run_cli("--config", str(ini), "history", "m-1", "--json")
    assert as_json.returncode == 0
    (row,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert list(row) == COLUMNS
    assert (row["kind"], row["state_from"], row["state_to"], row["modified"]) == ("member_snapshot", None,
                                                                                  "processing", 5)


def test_history_of_an_unknown_id_exits_1_with_one_line(feed_db):
    path, ini = feed_db
    result = run_cli("--config", str(ini), "history", "no-such-id")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no object has id 'no-such-id'" in result.stderr


def test_history_of_an_object_whose_rows_were_pruned_says_so_and_exits_0(feed_db):
    path, ini = feed_db
    conn = sqlite3.connect(str(path))
    conn.execute("DELETE FROM changes WHERE id = 'm-1'")
    conn.commit()
    conn.close()
    result = run_cli("--config", str(ini), "history", "m-1")
    assert result.returncode == 0 and result.stdout == ""
    assert "no changes recorded for m-1" in result.stderr


def changes_out(ini: Path, *args: str) -> list[dict]:
    result = run_cli("--config", str(ini), "changes", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_changes_writes_every_column_and_filters_by_since_kind_and_limit(feed_db):
    path, ini = feed_db
    everything = changes_out(ini)
    assert everything == feed_rows(path)  # every column, oldest first
    assert [r["seq"] for r in everything] == [1, 2, 3, 4]
    assert [r["seq"] for r in changes_out(ini, "--since", "2")] == [3, 4]
    assert [r["seq"] for r in changes_out(ini, "--kind", "difference")] == [1, 3, 4]
    assert [r["seq"] for r in changes_out(ini, "--kind", "member_snapshot")] == [2]
    assert [r["seq"] for r in changes_out(ini, "--limit", "2")] == [1, 2]
    assert [r["seq"] for r in changes_out(ini, "--since", "1", "--kind", "difference", "--limit", "1")] == [3]
    assert changes_out(ini, "--since", "4") == []


@pytest.mark.parametrize("args", [["--since", "-1"], ["--limit", "0"], ["--since", "x"]])
def test_changes_refuses_bad_arguments_without_a_traceback(feed_db, args):
    path, ini = feed_db
    result = run_cli("--config", str(ini), "changes", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_changes_reads_a_long_backlog_in_pages(feed_db, monkeypatch):
    path, ini = feed_db
    add_rows(path, [("group", {"id": f"g-{n}", "status": "a"}, "2026-01-02T00:00:00.000Z") for n in range(25)])
    monkeypatch.setattr(noyo_listener, "CHANGES_PAGE", 3)
    args = noyo_listener.build_parser().parse_args(["--config", str(ini), "changes", "--since", "1"])
    read = []

    class Out:
        def write(self, text):
            read.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Out())
    assert noyo_listener.cmd_changes(args) == 0
    seqs = [json.loads(line)["seq"] for line in "".join(read).splitlines()]
    assert seqs == list(range(2, 30))


class Follower:
    """`changes --follow` as a subprocess; its lines collected by a thread."""

    def __init__(self, ini: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(MODULE), "--config", str(ini), "changes", "--follow", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=_clean_environ(), stdin=subprocess.DEVNULL)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def take(self, count: int, timeout: float = 15.0) -> list[dict]:
        rows = []
        deadline = time.monotonic() + timeout
        while len(rows) < count:
            try:
                rows.append(json.loads(self.lines.get(timeout=max(0.0, deadline - time.monotonic()))))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"got {len(rows)} of {count} rows; stderr: {self.proc.stderr.read()}") from None
        return rows

    def stop(self, sig: int) -> tuple[int, list[str]]:
        self.proc.send_signal(sig)
        code = self.proc.wait(15)
        leftover = []
        while not self.lines.empty():
            leftover.append(self.lines.get())
        return code, leftover


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_follow_streams_new_rows_until_a_signal_and_resuming_sees_each_row_once(feed_db, sig):
    path, ini = feed_db
    follower = Follower(ini, "--since", "1")
    first = follower.take(3)  # the rows already there; the follower now has its handlers
    add_rows(path, [("difference", difference("d-9", 5), "2026-01-03T00:00:00.000Z")])
    add_rows(path, [("member_snapshot", {"id": "m-1", "modified": 6, "status": "done"}, "2026-01-03T00:00:01.000Z")])
    streamed = follower.take(2)
    code, leftover = follower.stop(sig)
    assert code == 0 and leftover == []
    assert follower.proc.stderr.read() == ""

    # A consumer resumes from the last seq it handled: nothing skipped, nothing repeated.
    add_rows(path, [("difference", difference("d-9", 6, discrepancy_time=6), "2026-01-03T00:00:02.000Z")])
    last = streamed[-1]["seq"]
    resumed = changes_out(ini, "--since", str(last))
    seen = [r["seq"] for r in first + streamed + resumed]
    assert seen == [r["seq"] for r in feed_rows(path)][1:]
    assert len(seen) == len(set(seen))
    assert [r["id"] for r in streamed] == ["d-9", "m-1"] and resumed[0]["state_to"] == "discrepancy"


def test_follow_with_a_limit_stops_after_that_many_rows(feed_db):
    path, ini = feed_db
    follower = Follower(ini, "--since", "3", "--limit", "2")
    assert [r["seq"] for r in follower.take(1)] == [4]
    add_rows(path, [("group", {"id": "g", "status": "a"}, "2026-01-03T00:00:00.000Z")])
    assert [r["seq"] for r in follower.take(1)] == [5]
    assert follower.proc.wait(15) == 0


# --- restore and the change feed ---------------------------------------------------------------


@pytest.fixture
def restorable(tmp_path, make_ini):
    """A feed database at seq 1 with a backup of it, then grown to seq 4."""
    path = tmp_path / "noyo.sqlite3"
    ini = make_ini(webhook={"secrets": ""}, database={"path": path})
    conn = noyo_listener.connect(str(path))
    noyo_listener.migrate(conn, str(path))
    conn.close()
    add_rows(path, [("difference", difference("d-1", 1), "2026-01-01T00:00:00.000Z")])
    backup = tmp_path / "backup.sqlite3"
    result = run_cli("--config", str(ini), "backup", str(backup))
    assert result.returncode == 0, result.stderr
    add_rows(path, [("difference", difference("d-1", 2, discrepancy_time=2), "2026-01-01T00:00:01.000Z"),
                    ("difference", difference("d-2", 1), "2026-01-01T00:00:02.000Z"),
                    ("difference", difference("d-3", 1), "2026-01-01T00:00:03.000Z")])
    assert [r["seq"] for r in feed_rows(path)] == [1, 2, 3, 4]
    return path, ini, backup


def test_restoring_an_older_backup_never_hands_out_a_seq_again(restorable):
    path, ini, backup = restorable
    result = run_cli("--config", str(ini), "restore", str(backup))
    assert result.returncode == 0, result.stderr
    assert "change feed continues after seq 4" in result.stdout and "the backup's is 1" in result.stdout
    assert [r["seq"] for r in feed_rows(path)] == [1]

    # A consumer that had handled seq 4 resumes with --since 4 and misses nothing.
    add_rows(path, [("difference", difference("d-5", 1, discrepancy_time=1), "2026-01-02T00:00:00.000Z")])
    assert [(r["seq"], r["id"]) for r in changes_out(ini, "--since", "4")] == [(5, "d-5")]


def test_restore_counts_the_seqs_a_crash_left_in_the_replaced_databases_wal(restorable):
    path, ini, backup = restorable
    conn = noyo_listener.connect(str(path))
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("BEGIN IMMEDIATE")
    obj = difference("d-5", 1)
    noyo_listener.apply_difference(conn, obj, json.dumps(obj), [], "2026-01-02T00:00:00.000Z")
    conn.execute("COMMIT")
    main, wal = path.read_bytes(), Path(f"{path}-wal").read_bytes()  # seq 5 is only in the WAL
    conn.close()  # checkpoints and removes the WAL; put both back as a crash leaves them
    path.write_bytes(main)
    Path(f"{path}-wal").write_bytes(wal)
    result = run_cli("--config", str(ini), "restore", str(backup))
    assert result.returncode == 0, result.stderr
    assert "change feed continues after seq 5" in result.stdout


def test_restoring_a_backup_older_than_the_change_feed_never_hands_out_a_seq_again(restorable, tmp_path):
    path, ini, _backup = restorable
    old_backup = tmp_path / "v3.sqlite3"
    build_v3(old_backup)
    result = run_cli("--config", str(ini), "restore", str(old_backup))
    assert result.returncode == 0, result.stderr
    assert "change feed continues after seq 4" in result.stdout and "the backup predates the feed" in result.stdout
    conn = sqlite3.connect(str(path), isolation_level=None)
    noyo_listener.migrate(conn, str(path))  # as serve does at start
    conn.close()
    add_rows(path, [("difference", difference("d-5", 1), "2026-01-02T00:00:00.000Z")])
    assert [(r["seq"], r["id"]) for r in changes_out(ini, "--since", "4")] == [(5, "d-5")]


def test_a_follower_reads_on_in_the_restored_file_from_its_last_seq(restorable):
    path, ini, backup = restorable
    follower = Follower(ini)
    assert [r["seq"] for r in follower.take(4)] == [1, 2, 3, 4]
    result = run_cli("--config", str(ini), "restore", str(backup))
    assert result.returncode == 0, result.stderr
    add_rows(path, [("difference", difference("d-5", 1), "2026-01-02T00:00:00.000Z")])
    assert [(r["seq"], r["id"]) for r in follower.take(1)] == [(5, "d-5")]
    code, leftover = follower.stop(signal.SIGTERM)
    assert code == 0 and leftover == []
    stderr = follower.proc.stderr.read()
    assert f"{path} was replaced (restore); following the new file after seq 4" in stderr, stderr
    assert len(stderr.splitlines()) == 1


# --- retention --------------------------------------------------------------------------------


def test_prune_history_removes_old_rows_in_bounded_steps_and_seq_is_never_reused(tmp_path, monkeypatch):
    path = tmp_path / "prune.sqlite3"
    store = noyo_listener.Store(str(path))
    store.open()
    try:
        now = time.time()
        old, recent = noyo_listener.utc_iso(now - 400 * 86400), noyo_listener.utc_iso(now - 10 * 86400)
        for number in range(5):
            obj = difference(f"old-{number}", 1)
            store.write(lambda conn, obj=obj: noyo_listener.apply_difference(conn, obj, json.dumps(obj), [], old))
        obj = difference("recent", 1)
        store.write(lambda conn: noyo_listener.apply_difference(conn, obj, json.dumps(obj), [], recent))

        assert noyo_listener.prune_history(store, 0) == 0  # 0 = forever
        monkeypatch.setattr(noyo_listener, "PRUNE_BATCH", 2)
        commits = store.commits
        assert noyo_listener.prune_history(store, 365, now=now) == 5
        assert store.commits - commits == 3  # 2 + 2 + 1 rows: one bounded transaction each
        assert [r["id"] for r in feed_rows(path)] == ["recent"]

        # Everything pruned: the next row still gets a seq above any handed out before.
        assert noyo_listener.prune_history(store, 1, now=now) == 1
        obj = difference("next", 1)
        store.write(lambda conn: noyo_listener.apply_difference(conn, obj, json.dumps(obj), [], recent))
        assert [r["seq"] for r in feed_rows(path)] == [7]
    finally:
        store.close()


def test_the_prune_command_prunes_the_change_feed_too(tmp_path, make_ini):
    path = tmp_path / "noyo.sqlite3"
    ini = make_ini(database={"path": path, "history_days": 30})
    conn = noyo_listener.connect(str(path))
    noyo_listener.migrate(conn, str(path))
    conn.close()
    add_rows(path, [("difference", difference("a", 1), noyo_listener.utc_iso(time.time() - 31 * 86400)),
                    ("difference", difference("b", 1), noyo_listener.utc_iso(time.time() - 29 * 86400))])
    result = run_cli("--config", str(ini), "prune")
    assert result.returncode == 0, result.stderr
    assert "pruned 1 change(s) older than 30 days" in result.stdout
    assert [r["id"] for r in feed_rows(path)] == ["b"]


@pytest.mark.parametrize("value, ok", [("0", True), ("365", True), ("-1", False), ("a year", False)])
def test_history_days_is_validated_like_the_other_keys(make_ini, value, ok):
    result = run_cli("--config", str(make_ini(database={"history_days": value})), "check-config")
    if ok:
        assert result.returncode == 0 and f"history_days = {value}" in result.stdout
    else:
        assert result.returncode == 1 and "[database] history_days:" in result.stderr
        assert f"(got '{value}')" in result.stderr and "Traceback" not in result.stderr


def test_history_days_defaults_to_365(make_ini):
    result = run_cli("--config", str(make_ini()), "check-config")
    assert "history_days = 365  # from default" in result.stdout


# --- the README's consumer and its unit ----------------------------------------------------------


CONSUMER = ROOT / "systemd" / "noyo-discrepancy-alert.py"
CONSUMER_UNIT = ROOT / "systemd" / "noyo-discrepancy-alert.service"


def test_the_readme_shows_the_shipped_consumer_and_unit():
    readme = (ROOT / "README.md").read_text()
    assert CONSUMER.read_text().strip() in readme
    assert CONSUMER_UNIT.read_text().strip() in readme


def run_consumer(ini: Path, seq_file: Path, alerts: Path) -> subprocess.Popen:
    env = _clean_environ()
    env.update(NOYO_LISTENER=f"{sys.executable} {MODULE} --config {ini}", SEQ_FILE=str(seq_file),
               ALERT_COMMAND=f"cat >> {alerts}")
    return subprocess.Popen([sys.executable, str(CONSUMER)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def alerted(alerts: Path) -> list[str]:
    return [json.loads(line)["id"] for line in alerts.read_text().splitlines()] if alerts.exists() else []


def test_the_consumer_alerts_once_per_new_discrepancy_across_restarts(feed_db, tmp_path):
    path, ini = feed_db  # d-1 already went through discrepancy
    seq_file, alerts = tmp_path / "last_seq", tmp_path / "alerts.jsonl"
    consumer = run_consumer(ini, seq_file, alerts)
    wait_until(lambda: seq_file.exists() and seq_file.read_text().strip() == "4", 15, "the backlog handled")
    assert alerted(alerts) == ["d-1"]
    add_rows(path, [("difference", difference("d-2", 1, discrepancy_time=1), "2026-01-04T00:00:00.000Z")])
    wait_until(lambda: alerted(alerts) == ["d-1", "d-2"], 15, "the new discrepancy alerted")
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(15) == 0, consumer.stderr.read()

    # While it is down: one new discrepancy, one pending difference. After a
    # restart only the new discrepancy is alerted; nothing is repeated.
    add_rows(path, [("difference", difference("d-3", 1, discrepancy_time=1), "2026-01-04T00:00:01.000Z"),
                    ("difference", difference("d-4", 1), "2026-01-04T00:00:02.000Z")])
    consumer = run_consumer(ini, seq_file, alerts)
    wait_until(lambda: seq_file.read_text().strip() == "7", 15, "the rows written while down handled")
    consumer.send_signal(signal.SIGINT)
    assert consumer.wait(15) == 0
    assert alerted(alerts) == ["d-1", "d-2", "d-3"]


def test_the_consumers_journal_line_escapes_what_the_api_chose(feed_db, tmp_path):
    path, ini = feed_db
    forged = "d1 was=pending seq=999\n<0>EMERG forged line"
    add_rows(path, [("difference", difference(forged, 1, discrepancy_time=1), "2026-01-04T00:00:00.000Z")])
    seq_file = tmp_path / "last_seq"
    seq_file.write_text("4\n")  # only the new row
    env = _clean_environ()
    env.update(NOYO_LISTENER=f"{sys.executable} {MODULE} --config {ini}", SEQ_FILE=str(seq_file))
    consumer = subprocess.Popen([sys.executable, str(CONSUMER)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    wait_until(lambda: seq_file.read_text().strip() == "5", 15, "the forged row handled")
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(15) == 0
    lines = consumer.stdout.read().splitlines()
    assert lines == ['<4>new discrepancy difference="d1 was=pending seq=999\\n<0>EMERG forged line" was=- '
                     'observed_at=2026-01-04T00:00:00.000Z seq=5'], lines


@pytest.mark.parametrize("value", ["plain-id_1", "with space", "a=b", 'q"uote', "back\\slash", "tab\there",
                                   "caf\u00e9", "\u2028", "", None, 7])
def test_the_consumers_escaping_matches_the_listeners_log_value(value):
    namespace: dict = {"__name__": "consumer"}
    exec(compile(CONSUMER.read_text(), str(CONSUMER), "exec"), namespace)
    assert namespace["log_value"](value) == noyo_listener.log_value(value)


@pytest.mark.skipif(__import__("shutil").which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_consumer_unit_verifies_clean(tmp_path):
    prefix = tmp_path / "opt" / "noyo-listener"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / "systemd").mkdir()
    os.symlink(sys.executable, prefix / ".venv" / "bin" / "python3")
    os.symlink(CONSUMER, prefix / "systemd" / CONSUMER.name)
    unit = tmp_path / CONSUMER_UNIT.name
    unit.write_text(CONSUMER_UNIT.read_text().replace("/opt/noyo-listener", str(prefix)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    assert re.search(r"^ExecStart=/opt/noyo-listener/\S+ /opt/noyo-listener/systemd/noyo-discrepancy-alert.py$",
                     CONSUMER_UNIT.read_text(), re.M)
    # It stops with the listener (before a restore replaces the file it reads) and starts with it again.
    assert re.search(r"^PartOf=noyo-listener\.service$", CONSUMER_UNIT.read_text(), re.M)
    assert re.search(r"^WantedBy=noyo-listener\.service$", CONSUMER_UNIT.read_text(), re.M)
