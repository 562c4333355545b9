"""Reconciliation (SPEC "Reconciliation"): passes over Noyo's paged lists.

The `sync` command and `serve`'s periodic passes against the fake API's
paged list, with the real SQLite file read afterwards.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading

import pytest

import noyo_listener as nl
from conftest import api_sections, event_body, run_cli, wait_until
from fake_noyo import Fault
from test_worker import difference, statuses

SUMMARY = re.compile(r"^sync kind=difference pages=(\d+) seen=(\d+) new=(\d+) updated=(\d+) unchanged=(\d+) "
                     r"skipped=(\d+) seconds=\d+\.\d$")


def sync_sections(fake, sync=None, **worker) -> dict:
    sections = api_sections(fake, **worker)
    sections["sync"] = {"page_size": 5, "rate": 1000, "interval": 0, **(sync or {})}
    return sections


def run_sync(ini, *args):
    return run_cli("--config", str(ini), "sync", *args, timeout=60)


def db_rows(ini_db, sql: str, params=()) -> list[dict]:
    conn = sqlite3.connect(ini_db, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "noyo.sqlite3"


def summary_counts(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
    return dict(zip(("pages", "seen", "new", "updated", "unchanged", "skipped"), map(int, match.groups())))


# --- a pass ----------------------------------------------------------------------


def test_sync_discovers_objects_no_event_announced(make_ini, fake_noyo, db_path):
    for n in range(12):
        fake_noyo.put("difference", difference(f"d-{n:02d}", discrepancy_time=90 if n % 3 == 1 else None,
                                               resolved=95 if n % 3 == 2 else None))
    ini = make_ini(**sync_sections(fake_noyo))
    result = run_sync(ini)
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout) == {"pages": 3, "seen": 12, "new": 12, "updated": 0, "unchanged": 0,
                                             "skipped": 0}
    assert re.search(r"WARNING sync found 12 difference object\(s\) no webhook announced: webhooks were missed",
                     result.stderr)
    rows = {r["id"]: r for r in db_rows(db_path, "SELECT * FROM differences")}
    assert len(rows) == 12
    assert [rows[f"d-{n:02d}"]["state"] for n in range(3)] == ["pending", "discrepancy", "resolved"]
    assert json.loads(rows["d-04"]["body"]) == difference("d-04", discrepancy_time=90)
    [sync] = db_rows(db_path, "SELECT * FROM syncs")
    assert (sync["kind"], sync["status"], sync["error"]) == ("difference", "done", None)
    assert (sync["pages"], sync["seen"], sync["new"], sync["updated"], sync["unchanged"], sync["skipped"]) == \
        (3, 12, 12, 0, 0, 0)
    assert sync["started_at"] <= sync["finished_at"]
    assert [r.path for r in fake_noyo.list_requests()] == [
        "/api/v1/differences?page_size=5&offset=0", "/api/v1/differences?page_size=5&offset=5",
        "/api/v1/differences?page_size=5&offset=10"]
    assert fake_noyo.object_requests("/differences/") == []  # items are applied as they come, no GET each


def test_newer_wins_in_both_directions_and_items_without_id_are_skipped(start_listener, fake_noyo, db_path):
    fake_noyo.put("difference", difference("newer-here", modified=100, resolved=100))
    fake_noyo.put("difference", difference("older-here", modified=50))
    fake_noyo.put("difference", difference("same", modified=70))
    listener = start_listener(**sync_sections(fake_noyo))
    for diff_id in ("newer-here", "older-here", "same"):
        listener.send(event_body("difference.created", data_id=diff_id, event_id=f"e-{diff_id}"))
    wait_until(lambda: set(statuses(listener).values()) == {"done"}, 15, "webhook fetches")

    fake_noyo.put("difference", difference("newer-here", modified=60))  # Noyo's list lags: older than our row
    fake_noyo.put("difference", difference("older-here", modified=80, discrepancy_time=79))
    fake_noyo.objects[("difference", "no-id")] = {"modified": 1, "state": "no id at all"}
    fake_noyo.put("difference", difference("brand-new"))
    result = run_sync(listener.ini)
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout) == {"pages": 1, "seen": 5, "new": 1, "updated": 1, "unchanged": 2,
                                             "skipped": 1}
    rows = {r["id"]: r for r in db_rows(db_path, "SELECT * FROM differences")}
    assert (rows["newer-here"]["modified"], rows["newer-here"]["state"]) == (100, "resolved")  # never overwritten
    assert (rows["older-here"]["modified"], rows["older-here"]["state"]) == (80, "discrepancy")
    assert rows["older-here"]["last_event_type"] == "difference.created"  # the events' part of the row stays
    assert set(rows) == {"newer-here", "older-here", "same", "brand-new"}


def test_the_rate_limit_spaces_list_requests(make_ini, fake_noyo):
    for n in range(20):
        fake_noyo.put("difference", difference(f"d-{n}"))
    ini = make_ini(**sync_sections(fake_noyo, sync={"rate": 4}))
    result = run_sync(ini)
    assert result.returncode == 0, result.stderr
    times = [r.at for r in fake_noyo.list_requests()]
    assert len(times) == 4  # 4 full pages; total_records says there is no fifth
    # At most 4 per second: 4 requests span at least 0.75 s. The span, not each
    # gap: the fake stamps a request when it answers, and on a busy machine one
    # late answer makes the next gap look short although the requests were spaced.
    assert times[-1] - times[0] >= 0.6, times


def test_a_429_mid_pass_is_waited_out(make_ini, fake_noyo):
    for n in range(12):
        fake_noyo.put("difference", difference(f"d-{n}"))
    fake_noyo.add_fault(Fault("status", status=429, retry_after="1", match="offset=5"))
    ini = make_ini(**sync_sections(fake_noyo))
    result = run_sync(ini)
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout)["new"] == 12
    requests = fake_noyo.list_requests()
    assert [r.status for r in requests] == [200, 429, 200, 200]
    assert requests[2].at - requests[1].at >= 0.95  # Retry-After, though backoff_initial is 50ms


def test_a_pass_failing_mid_way_keeps_what_it_applied_and_exits_1(make_ini, fake_noyo, db_path):
    for n in range(12):
        fake_noyo.put("difference", difference(f"d-{n:02d}"))
    fake_noyo.add_fault(Fault("status", status=503, times=10**6, match="offset=5"))
    ini = make_ini(**sync_sections(fake_noyo, max_attempts=2))
    result = run_sync(ini)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("noyo-listener: error:")]
    assert error_lines == ["noyo-listener: error: list request for difference at offset 5 failed: gave up after "
                           "2 attempts: transient: API answered HTTP 503"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(db_rows(db_path, "SELECT id FROM differences")) == 5  # the first page stays applied
    [sync] = db_rows(db_path, "SELECT * FROM syncs")
    assert (sync["status"], sync["pages"], sync["new"]) == ("failed", 1, 5)
    assert "gave up after 2 attempts" in sync["error"] and sync["finished_at"]

    fake_noyo.faults.clear()  # the next pass starts over from the first page
    result = run_sync(ini)
    assert result.returncode == 0
    assert summary_counts(result.stdout) == {"pages": 3, "seen": 12, "new": 7, "updated": 0, "unchanged": 5,
                                             "skipped": 0}


def test_a_refused_list_fails_the_pass_at_once(make_ini, fake_noyo):
    fake_noyo.put("difference", difference("d-1"))
    fake_noyo.add_fault(Fault("status", status=403, times=10**6, match="/differences?"))
    result = run_sync(make_ini(**sync_sections(fake_noyo)))
    assert result.returncode == 1
    assert "refused: API answered 403 Forbidden" in result.stderr
    assert len(fake_noyo.list_requests()) == 1


# --- credentials --------------------------------------------------------------


def test_sync_without_api_credentials_says_so_in_one_line(make_ini, fake_noyo):
    ini = make_ini(sync={"page_size": 5})
    result = run_sync(ini)
    assert result.returncode == 1
    assert result.stderr.strip() == ("noyo-listener: error: [noyo_api] client_id and client_secret are not set: "
                                     "set them in the ini, in NOYO_CLIENT_ID and NOYO_CLIENT_SECRET, or as the "
                                     "systemd credentials of those names")
    assert fake_noyo.requests == []


def test_sync_with_refused_credentials_exits_1_with_one_line(make_ini, fake_noyo):
    ini = make_ini(**sync_sections(fake_noyo))
    fake_noyo.client_secret = "rotated-by-someone"  # the ini still has the old one
    result = run_sync(ini)
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("noyo-listener: error:")]
    assert "credentials" in line and "client_id and client_secret" in line
    assert "test-client-secret" not in result.stderr


def test_sync_needs_no_webhook_secrets(make_ini, fake_noyo):
    fake_noyo.put("difference", difference("d-1"))
    ini = make_ini(webhook={"secrets": ""}, **sync_sections(fake_noyo))
    result = run_sync(ini)
    assert result.returncode == 0, result.stderr


def test_sync_of_an_unknown_kind_is_refused(make_ini, fake_noyo):
    result = run_sync(make_ini(**sync_sections(fake_noyo)), "--kind", "nope")
    assert result.returncode == 1
    assert result.stderr.strip() == "noyo-listener: error: no [lists] entry for kind 'nope'; known: difference"


@pytest.mark.parametrize("key, value, message", [
    ("page_size", "4", "[sync] page_size: must be between 5 and 100"),
    ("page_size", "101", "[sync] page_size: must be between 5 and 100"),
    ("rate", "0", "[sync] rate: must be a number above 0"),
    ("interval", "soon", "[sync] interval:"),
])
def test_bad_sync_settings_are_refused_in_one_line(make_ini, key, value, message):
    result = run_cli("--config", str(make_ini(sync={key: value})), "check-config")
    assert result.returncode == 1
    assert result.stderr.startswith(f"noyo-listener: error: {message}"), result.stderr


# --- serve's periodic passes ------------------------------------------------------


def done_passes(db_path) -> list[dict]:
    return db_rows(db_path, "SELECT * FROM syncs WHERE status = 'done' ORDER BY id")


def test_serve_runs_a_pass_when_due_and_a_restart_does_not_repeat_it(start_listener, fake_noyo, db_path):
    for n in range(7):
        fake_noyo.put("difference", difference(f"d-{n}"))
    listener = start_listener(**sync_sections(fake_noyo, sync={"interval": "1h"}))
    wait_until(lambda: done_passes(db_path), 15, "the first pass")
    listener.wait_for_log(r"WARNING sync found 7 difference object\(s\) no webhook announced")
    requests = len(fake_noyo.list_requests())
    assert listener.stop() == 0

    listener.start()
    listener.wait_for_log(r"sync pass not due kind=difference next_at=")
    assert len(done_passes(db_path)) == 1 and len(fake_noyo.list_requests()) == requests
    status = json.loads(run_cli("--config", str(listener.ini), "status", "--json").stdout)
    last = status["last_sync"]["difference"]
    assert (last["status"], last["pages"], last["seen"], last["new"]) == ("done", 2, 7, 7)
    text = run_cli("--config", str(listener.ini), "status").stdout
    assert re.search(r"last sync: +difference done finished \S+ pages=2 seen=7 new=7", text), text


def test_serve_repeats_passes_every_interval(start_listener, fake_noyo, db_path):
    fake_noyo.put("difference", difference("d-1"))
    start_listener(**sync_sections(fake_noyo, sync={"interval": "1s"}))
    wait_until(lambda: len(done_passes(db_path)) >= 2, 20, "a second pass")
    first, second = done_passes(db_path)[:2]
    assert (first["new"], second["new"], second["unchanged"]) == (1, 0, 1)


def test_a_pass_cut_by_a_crash_is_marked_failed_at_the_next_start(start_listener, fake_noyo, db_path):
    fake_noyo.put("difference", difference("d-1"))
    fake_noyo.hold_lists()
    listener = start_listener(**sync_sections(fake_noyo, sync={"interval": "1h"}))
    wait_until(lambda: db_rows(db_path, "SELECT status FROM syncs") == [{"status": "running"}], 15, "a pass running")
    listener.kill()
    fake_noyo.release_lists()
    listener.start()
    wait_until(lambda: done_passes(db_path), 15, "a new pass")
    first = db_rows(db_path, "SELECT * FROM syncs ORDER BY id")[0]
    assert (first["status"], first["error"]) == ("failed", "interrupted: the process stopped during the pass")
    listener.wait_for_log(r"sync passes interrupted by a previous stop are marked failed count=1")


def test_sync_while_serve_takes_webhooks_never_causes_a_503(start_listener, fake_noyo):
    for n in range(1500):
        fake_noyo.put("difference", difference(f"d-{n:04d}"))
    listener = start_listener(**sync_sections(fake_noyo, sync={"page_size": 100}))
    answers: list[int] = []
    stop = threading.Event()

    def post() -> None:
        while not stop.is_set():
            answers.append(listener.send(event_body("member_snapshot.status_change"))[0])

    senders = [threading.Thread(target=post) for _ in range(3)]
    for sender in senders:
        sender.start()
    try:
        result = run_sync(listener.ini)
    finally:
        stop.set()
        for sender in senders:
            sender.join(30)
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout)["new"] == 1500
    assert answers and set(answers) == {200}, {a: answers.count(a) for a in set(answers)}


# --- the interface other parts share ----------------------------------------------


def test_apply_says_new_updated_or_unchanged(tmp_path):
    store = nl.Store(str(tmp_path / "a.sqlite3"))
    store.open()
    try:
        def apply(obj: dict, kind: str = "difference") -> str:
            return store.write(lambda conn: nl.apply_object(conn, kind, obj, json.dumps(obj), [], nl.utc_iso(),
                                                            source="sync"))
        assert apply(difference("x", modified=10)) == "new"
        assert apply(difference("x", modified=10)) == "unchanged"  # identical
        assert apply(difference("x", modified=5)) == "unchanged"  # older
        assert apply(difference("x", modified=20)) == "updated"
        assert apply({"id": "g", "modified": 1}, "group") == "new"
        assert apply({"id": "g", "modified": 0}, "group") == "unchanged"
        assert apply({"id": "g", "modified": 2}, "group") == "updated"
    finally:
        store.close()


def test_a_pass_in_serve_shares_the_workers_api_pause(start_listener, fake_noyo, db_path):
    # A 429 with Retry-After on a list page pauses the API for everyone (one
    # ApiHealth), exactly as after a fetch: an event that arrives meanwhile is
    # not fetched before the pause ends. Then the pass completes.
    fake_noyo.put("difference", difference("d-1"))
    fake_noyo.add_fault(Fault("status", status=429, retry_after="2", match="/differences?"))
    listener = start_listener(**sync_sections(fake_noyo, sync={"interval": "1h"}, backoff_max="3s"))
    listener.wait_for_log(r"WARNING noyo api failing; backing off until")
    refused_at = fake_noyo.list_requests()[0].at
    listener.send(event_body("difference.created", data_id="d-1", event_id="during-pause"))
    wait_until(lambda: statuses(listener) == {"during-pause": "done"}, 15, "the event fetched after the pause")
    first_get = fake_noyo.object_requests("/differences/d-1")[0].at
    assert first_get - refused_at >= 1.9  # Retry-After: 2 held the worker too
    wait_until(lambda: done_passes(db_path), 15, "the pass completes after the pause")
