"""The worker against a fake Noyo API that is a real HTTP server on loopback."""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import api_sections, event_body, run_cli, wait_until
from fake_noyo import Fault


def difference(diff_id: str, modified: int = 100, resolved: int | None = None,
               discrepancy_time: int | None = None, **extra) -> dict:
    return {
        "id": diff_id, "version": modified, "created": 50, "modified": modified, "resolved": resolved,
        "discrepancy_time": discrepancy_time, "group_id": "g-1", "carrier_id": "c-1", "employee_id": "e-1",
        "organization_id": "o-1", "object_type": "member", "object_id": "m-1", "difference_type": "missing",
        "difference_classification": "enrollment", "impact_score": 3, "is_dismissed": False,
        "is_suppressed": False, "fields": [{"name": "plan"}], "sources": [], **extra,
    }


@pytest.fixture
def fetching(start_listener, fake_noyo):
    """``fetching(**worker)`` -> a listener whose worker talks to the fake API."""
    def start(env=None, **worker):
        return start_listener(env=env, **api_sections(fake_noyo, **worker))
    return start


def statuses(listener) -> dict[str, str]:
    with listener.db() as conn:
        return dict(conn.execute("SELECT event_id, status FROM events"))


def wait_all_done(listener, timeout: float = 15.0) -> None:
    wait_until(lambda: set(statuses(listener).values()) == {"done"}, timeout, "every event done")


def event_row(listener, event_id: str) -> dict:
    with listener.db() as conn:
        return dict(conn.execute("SELECT * FROM events WHERE event_id = ?", (event_id,)).fetchone())


def difference_row(listener, diff_id: str) -> dict:
    with listener.db() as conn:
        row = conn.execute("SELECT * FROM differences WHERE id = ?", (diff_id,)).fetchone()
    return dict(row) if row else {}


# --- each kind ---------------------------------------------------------------


def test_a_difference_event_fills_the_differences_row(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-1", discrepancy_time=90))
    listener = fetching()
    listener.send(event_body("difference.discrepancy", data_id="d-1", event_id="e-1", created=90))
    wait_all_done(listener)

    row = difference_row(listener, "d-1")
    assert row["state"] == "discrepancy"
    assert (row["modified"], row["version"], row["discrepancy_time"], row["resolved"]) == (100, 100, 90, None)
    assert (row["group_id"], row["employee_id"], row["carrier_id"]) == ("g-1", "e-1", "c-1")
    assert (row["difference_type"], row["difference_classification"]) == ("missing", "enrollment")
    assert row["last_event_type"] == "difference.discrepancy"
    assert json.loads(row["body"]) == difference("d-1", discrepancy_time=90)
    assert row["fetched_at"].endswith("Z")
    event = event_row(listener, "e-1")
    assert (event["attempts"], event["last_error"]) == (1, None) and event["processed_at"]
    assert fake_noyo.object_requests()[0].path == "/api/v1/differences/d-1"
    assert fake_noyo.object_requests()[0].authorization.startswith("Bearer ")


@pytest.mark.parametrize("event_type, kind", [
    ("member_snapshot.status_change", "member_snapshot"),
    ("member_snapshot_carrier_fulfillment_status.status_change", None),  # no [fetch] entry: ignored
    ("group.created", "group"),
    ("group_connection_request.created", "group_connection_request"),
    ("group_disconnection_request.status_change", "group_disconnection_request"),
])
def test_other_kinds_go_to_resources(fetching, fake_noyo, event_type, kind):
    object_id = str(uuid.uuid4())
    if kind:
        fake_noyo.put(kind, {"id": object_id, "modified": 7, "status": "approved"})
    listener = fetching()
    listener.send(event_body(event_type, data_id=object_id, event_id="e"))
    if kind is None:
        assert statuses(listener) == {"e": "ignored"}
        return
    wait_all_done(listener)
    with listener.db() as conn:
        row = dict(conn.execute("SELECT * FROM resources").fetchone())
    assert (row["kind"], row["id"], row["modified"]) == (kind, object_id, 7)
    assert json.loads(row["body"])["status"] == "approved"


def test_a_wrapped_single_object_answer_is_accepted(fetching, fake_noyo):
    fake_noyo.wrap_objects = True
    fake_noyo.put("difference", difference("d-w"))
    listener = fetching()
    listener.send(event_body("difference.created", data_id="d-w"))
    wait_all_done(listener)
    assert difference_row(listener, "d-w")["state"] == "pending"


# --- order, duplication, coalescing ---------------------------------------------


def test_resolved_first_then_an_older_created_keeps_the_resolved_row(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-o", modified=300, resolved=300))
    listener = fetching()
    listener.send(event_body("difference.resolved", data_id="d-o", event_id="r", created=300))
    wait_all_done(listener)
    assert difference_row(listener, "d-o")["state"] == "resolved"

    # A lagging replica answers with an older object for the late, older event.
    fake_noyo.put("difference", difference("d-o", modified=100))
    listener.send(event_body("difference.created", data_id="d-o", event_id="c", created=100))
    wait_all_done(listener)
    row = difference_row(listener, "d-o")
    assert (row["state"], row["modified"], row["resolved"]) == ("resolved", 300, 300)
    assert row["last_event_type"] == "difference.resolved"  # the newest event by created
    assert len(fake_noyo.object_requests()) == 2


def test_replaced_state_and_replacement_id_from_the_event(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-r", discrepancy_time=90))
    listener = fetching()
    listener.send(event_body("difference.replaced", data_id="d-r", created=200, replaced_by="d-new"))
    wait_all_done(listener)
    row = difference_row(listener, "d-r")
    assert (row["state"], row["replaced_by"], row["last_event_type"]) == ("replaced", "d-new", "difference.replaced")

    # A later fetch of the same difference (an older event) keeps it replaced.
    listener.send(event_body("difference.discrepancy", data_id="d-r", created=90))
    wait_all_done(listener)
    assert difference_row(listener, "d-r")["state"] == "replaced"

    # ...unless the newest object is resolved: resolved wins.
    fake_noyo.put("difference", difference("d-r", modified=400, resolved=400))
    listener.send(event_body("difference.resolved", data_id="d-r", created=400))
    wait_all_done(listener)
    assert difference_row(listener, "d-r")["state"] == "resolved"


def test_a_duplicated_event_is_fetched_once(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-d"))
    listener = fetching()
    body = event_body("difference.created", data_id="d-d")
    listener.send(body)
    wait_all_done(listener)
    assert listener.send(body)[1] == {"ok": True, "duplicate": True}
    # A later event for another object, fetched and done, proves the worker has
    # looked at the inbox since the duplicate arrived.
    fake_noyo.put("difference", difference("d-later"))
    listener.send(event_body("difference.created", data_id="d-later"))
    wait_all_done(listener)
    assert [r.path for r in fake_noyo.object_requests()] == [
        "/api/v1/differences/d-d", "/api/v1/differences/d-later"]
    with listener.db() as conn:
        assert tuple(conn.execute("SELECT status, delivery_count FROM events WHERE data_id = 'd-d'").fetchone()) \
            == ("done", 2)


def test_a_burst_for_one_object_is_served_by_two_gets_not_three(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-b", modified=300, resolved=300, discrepancy_time=200))
    listener = fetching()
    fake_noyo.hold()
    listener.send(event_body("difference.created", data_id="d-b", created=100))
    fake_noyo.wait_for_arrivals(1)  # the first fetch is in flight...
    listener.send(event_body("difference.discrepancy", data_id="d-b", created=200))
    listener.send(event_body("difference.resolved", data_id="d-b", created=300))
    fake_noyo.release()  # ...the other two wait for it, then share one GET
    wait_all_done(listener)
    assert len(fake_noyo.object_requests()) == 2
    assert difference_row(listener, "d-b")["state"] == "resolved"


# --- failures -----------------------------------------------------------------


def test_500s_are_retried_with_backoff_until_it_works(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-5"))
    fake_noyo.add_fault(Fault("status", times=2, status=500))
    listener = fetching()
    listener.send(event_body("difference.created", data_id="d-5", event_id="e5"))
    wait_all_done(listener)
    assert event_row(listener, "e5")["attempts"] == 3
    assert [r.status for r in fake_noyo.object_requests()] == [500, 500, 200]
    listener.wait_for_log(r"fetch failed kind=difference id=d-5 events=1 dead=0 error=transient: API answered HTTP 500")


def test_429_retry_after_is_honoured(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-429"))
    fake_noyo.add_fault(Fault("status", times=1, status=429, retry_after="1"))
    listener = fetching()
    listener.send(event_body("difference.created", data_id="d-429"))
    wait_all_done(listener)
    first, second = fake_noyo.object_requests()
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.95  # waited at least Retry-After, though backoff_initial is 50ms


def test_an_expired_token_is_refreshed_once(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-t"))
    listener = fetching()
    listener.send(event_body("difference.created", data_id="d-t"))
    wait_all_done(listener)
    fake_noyo.expire_tokens()
    listener.send(event_body("difference.resolved", data_id="d-t", event_id="after-expiry"))
    wait_all_done(listener)
    assert [r.status for r in fake_noyo.object_requests()] == [200, 401, 200]
    assert len(fake_noyo.token_requests()) == 2
    assert event_row(listener, "after-expiry")["attempts"] == 1


def test_a_token_with_a_millisecond_expires_in_is_still_reused(fetching, fake_noyo):
    fake_noyo.token_expires_in = 600000  # ms, or 7 days in seconds: either way reuse, refresh within 10 min
    for n in range(3):
        fake_noyo.put("difference", difference(f"d-{n}"))
    listener = fetching()
    for n in range(3):
        listener.send(event_body("difference.created", data_id=f"d-{n}"))
    wait_all_done(listener)
    assert len(fake_noyo.token_requests()) == 1


def test_404_for_a_while_then_found(fetching, fake_noyo):
    listener = fetching()
    listener.send(event_body("difference.created", data_id="d-late", event_id="late"))
    wait_until(lambda: len(fake_noyo.object_requests()) >= 2, message="two 404s")
    fake_noyo.put("difference", difference("d-late"))
    wait_all_done(listener)
    assert event_row(listener, "late")["attempts"] >= 3
    assert difference_row(listener, "d-late")["state"] == "pending"


@pytest.mark.parametrize("fault, error", [
    (Fault("slow", delay=8.0), "TimeoutError: no complete answer within 2s"),  # far past the 2s timeout
    (Fault("trickle", delay=0.3), "TimeoutError: no complete answer within 2s"),  # a byte every 0.3s
    (Fault("drop", times=2), "RemoteDisconnected"),  # a reused connection is retried once on a fresh one
    (Fault("invalid_json"), "answer is not JSON"),
    (Fault("wrong_id"), "answer is for id 'someone-else'"),
], ids=["slow", "trickle", "dropped", "invalid-json", "wrong-id"])  # not-an-object: test_failure_policy.py
def test_broken_answers_are_failed_fetches_never_data(fetching, fake_noyo, fault, error):
    fake_noyo.put("difference", difference("d-x"))
    fake_noyo.add_fault(fault)
    listener = fetching()
    listener.send(event_body("difference.created", data_id="d-x", event_id="x"))
    wait_all_done(listener, timeout=20)
    listener.wait_for_log(r"fetch failed kind=difference id=d-x .*" + error)
    assert event_row(listener, "x")["attempts"] == 2
    assert json.loads(difference_row(listener, "d-x")["body"])["id"] == "d-x"


def test_after_max_attempts_an_event_is_dead_and_requeue_revives_it(fetching, fake_noyo):
    listener = fetching(max_attempts=2)
    listener.send(event_body("difference.created", data_id="d-gone", event_id="gone"))
    wait_until(lambda: statuses(listener) == {"gone": "dead"}, message="dead letter")
    row = event_row(listener, "gone")
    assert row["attempts"] == 2 and row["last_error"].startswith("gave up after 2 attempts: not_found")
    assert len(fake_noyo.object_requests()) == 2
    assert listener.stop() == 0

    fake_noyo.put("difference", difference("d-gone"))
    assert run_cli("--config", str(listener.ini), "requeue", "--dead").returncode == 0
    listener.start()
    wait_all_done(listener)


def test_wrong_credentials_pause_fetching_without_burning_attempts(fetching, fake_noyo):
    # (An object GET answering 403 is the object's problem, not ours: test_failure_policy.py.)
    fake_noyo.put("difference", difference("d-a"))
    listener = fetching()
    fake_noyo.client_secret = "rotated-by-someone"  # the listener still has the old one
    listener.send(event_body("difference.created", data_id="d-a", event_id="a"))
    listener.wait_for_log(r"ERROR noyo api refused our credentials; fetching paused until .* Fix \[noyo_api\]")
    wait_until(lambda: event_row(listener, "a")["last_error"], message="the failure recorded")
    row = event_row(listener, "a")
    assert (row["status"], row["attempts"]) == ("pending", 0)
    status = json.loads(run_cli("--config", str(listener.ini), "status", "--json").stdout)
    assert status["api"]["state"] == "auth_failed" and status["api"]["until"]
    assert "rotated-by-someone" not in listener.log() and "test-client-secret" not in listener.log()


def test_a_failing_api_sees_probes_not_a_flood_and_recovery_is_immediate(fetching, fake_noyo):
    events = 40
    for n in range(events):
        fake_noyo.put("difference", difference(f"d-{n}"))
    fake_noyo.add_fault(Fault("status", times=10**6, status=503))
    listener = fetching(concurrency=4, backoff_initial="100ms", backoff_max="500ms")
    for n in range(events):
        listener.send(event_body("difference.created", data_id=f"d-{n}"))
    listener.wait_for_log(r"noyo api failing; backing off until")
    failing = len(fake_noyo.object_requests())
    # Fetches handed out before the pause (at most one per fetch thread and one
    # queued behind it: 2 x concurrency) may still land after the log line;
    # past them, every further request must be a lone, spaced probe. The
    # counts are bounds, not exact figures, so load cannot change the verdict.
    stragglers = 2 * 4
    wait_until(lambda: len(fake_noyo.object_requests()) >= failing + stragglers + 3, 30, message="three probes")
    seen = fake_noyo.object_requests()
    probes = seen[-3:]
    assert all(b.at - a.at >= 0.05 for a, b in zip(probes, probes[1:])), [r.at for r in probes]
    assert len(seen) < events, "every event got its own request: a flood, not probes"

    fake_noyo.faults.clear()
    wait_all_done(listener, timeout=20)
    listener.wait_for_log(r"noyo api recovered state=healthy")
    with listener.db() as conn:
        assert conn.execute("SELECT COUNT(*) FROM differences").fetchone()[0] == events


def test_a_claim_queued_when_fetching_pauses_is_given_back_unfetched(start_listener, fake_noyo):
    # One fetch thread, so a second claim waits in its queue while the first
    # GET is held. Meanwhile the credentials stop working: that GET gets a
    # 401, the token endpoint refuses (fetching pauses); the queued claim
    # must then not be asked for, and must keep its attempt.
    for n in range(2):
        fake_noyo.put("difference", difference(f"d-{n}"))
    fake_noyo.hold()
    sections = api_sections(fake_noyo, concurrency=1)
    # The held GET must outlast the wait below on a busy machine: a 2 s
    # timeout could expire first and turn the 401 this test needs into a timeout.
    sections["noyo_api"]["timeout"] = "60s"
    listener = start_listener(**sections)
    for n in range(2):
        listener.send(event_body("difference.created", data_id=f"d-{n}", event_id=f"e-{n}"))
    wait_until(lambda: all(event_row(listener, f"e-{n}")["lease_until"] for n in range(2)),
               message="both claimed: one GET in flight, one queued")
    fake_noyo.client_secret = "rotated-by-someone"
    fake_noyo.expire_tokens()
    fake_noyo.release()
    wait_until(lambda: not any(event_row(listener, f"e-{n}")["lease_until"] for n in range(2)),
               message="both claims settled")

    fake_noyo.wait_for_requests(1)  # the fake records a request just after answering it
    assert len(fake_noyo.object_requests()) == 1
    rows = [event_row(listener, f"e-{n}") for n in range(2)]
    assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 0), ("pending", 0)]
    assert all(r["next_attempt_at"] > r["received_at"] for r in rows)  # when the pause ends


def test_without_credentials_events_wait_and_nothing_is_fetched(start_listener, fake_noyo):
    listener = start_listener()  # no [noyo_api] client_id
    listener.send(event_body("difference.created", event_id="waits"))
    listener.wait_for_log(r"fetching is off: set \[noyo_api\] client_id and client_secret")
    assert listener.get("/healthz")[0] == 200
    assert statuses(listener) == {"waits": "pending"}
    assert fake_noyo.requests == []


def test_a_crash_mid_fetch_loses_nothing(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-k"))
    listener = fetching()
    fake_noyo.hold()
    listener.send(event_body("difference.created", data_id="d-k", event_id="k"))
    fake_noyo.wait_for_arrivals(1)
    listener.kill()  # SIGKILL while the GET is in flight
    fake_noyo.release()
    assert event_row(listener, "k")["status"] == "pending"

    listener.start()
    wait_all_done(listener)
    listener.wait_for_log(r"worker took back events leased by a previous run count=1")
    assert event_row(listener, "k")["attempts"] == 2
    assert difference_row(listener, "d-k")["state"] == "pending"
