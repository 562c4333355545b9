"""The worker's failure policy (SPEC "Failures toward the REST API").

One policy decides what each failed exchange means for the event and for the
others; nothing the API sends stops the worker; /healthz gives concurrent
callers one verdict; `requeue` is picked up within 2 s. The real listener
over HTTP against the fake API, plus unit tests of the pure policy.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from hypothesis import example, given, strategies as st

import noyo_listener as nl
from conftest import api_sections, event_body, run_cli, wait_until
from fake_noyo import Fault
from test_worker import difference, event_row, statuses, wait_all_done


@pytest.fixture
def fetching(start_listener, fake_noyo):
    def start(env=None, **worker):
        return start_listener(env=env, **api_sections(fake_noyo, **worker))
    return start


def api_state(listener) -> dict:
    return json.loads(run_cli("--config", str(listener.ini), "status", "--json").stdout)["api"]


# --- object-level refusals: that event is dead at once, the others go on -------


@pytest.mark.parametrize("fault, error", [
    (Fault("status", status=403, match="/differences/bad"), "refused: API answered 403 Forbidden for this object"),
    (Fault("status", status=400, match="/differences/bad"), "refused: API answered 400 Bad Request"),
    (Fault("status", status=410, match="/differences/bad"), "refused: API answered 410 Gone"),
    (Fault("status", status=422, match="/differences/bad"), "refused: API answered 422 Unprocessable"),
    (Fault("not_object", match="/differences/bad"), "not_object: answer is JSON but not an object"),
], ids=["403", "400", "410", "422", "json-not-object"])
def test_an_object_refusal_kills_that_event_at_once_and_nothing_else(fetching, fake_noyo, fault, error):
    fault.times = 10**6
    fake_noyo.add_fault(fault)
    others = [f"good-{n}" for n in range(6)]
    for diff_id in ["bad", *others]:
        fake_noyo.put("difference", difference(diff_id))
    listener = fetching(concurrency=2, max_attempts=5)
    listener.send(event_body("difference.created", data_id="bad", event_id="bad-event"))
    for diff_id in others:
        listener.send(event_body("difference.created", data_id=diff_id, event_id=f"{diff_id}-event"))

    wait_until(lambda: set(statuses(listener).values()) == {"done", "dead"}, 20, "all settled")
    row = event_row(listener, "bad-event")
    assert (row["status"], row["attempts"]) == ("dead", 1)
    assert row["last_error"].startswith(error), row["last_error"]
    assert "requeue" in row["last_error"] or "not_object" in row["last_error"]
    assert all(event_row(listener, f"{d}-event")["status"] == "done" for d in others)
    assert len(fake_noyo.object_requests("/differences/bad")) == 1  # never asked again
    log = listener.log()
    assert "refused our credentials" not in log and "backing off" not in log
    assert api_state(listener)["state"] == "healthy"


def test_refused_objects_of_many_kinds_never_pause_the_api(fetching, fake_noyo):
    # Old behaviour: three object-level failures in a row paused everything.
    fake_noyo.add_fault(Fault("status", status=422, times=10**6, match="/differences/bad"))
    for n in range(5):
        fake_noyo.put("difference", difference(f"bad-{n}"))
    fake_noyo.put("difference", difference("fine"))
    listener = fetching(concurrency=1, max_attempts=5)
    for n in range(5):
        listener.send(event_body("difference.created", data_id=f"bad-{n}", event_id=f"b{n}"))
    listener.send(event_body("difference.created", data_id="fine", event_id="fine"))
    wait_until(lambda: event_row(listener, "fine")["status"] == "done", 15, "the good object fetched")
    wait_until(lambda: list(statuses(listener).values()).count("dead") == 5, 15, "five dead")
    assert "backing off" not in listener.log()


def test_a_second_401_on_an_object_is_a_refusal_after_one_token_refresh(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-401"))
    fake_noyo.add_fault(Fault("status", status=401, times=2, match="/differences/d-401"))
    listener = fetching()
    listener.send(event_body("difference.created", data_id="d-401", event_id="e401"))
    wait_until(lambda: statuses(listener) == {"e401": "dead"}, 15, "dead after the second 401")
    row = event_row(listener, "e401")
    assert row["last_error"].startswith("refused: API answered 401 Unauthorized with a fresh token")
    assert [r.status for r in fake_noyo.object_requests()] == [401, 401]
    assert len(fake_noyo.token_requests()) == 2  # the first token, then one refresh
    assert "refused our credentials" not in listener.log()


def test_404_is_retried_until_max_attempts(fetching, fake_noyo):
    listener = fetching(max_attempts=3)
    listener.send(event_body("difference.created", data_id="d-none", event_id="none"))
    wait_until(lambda: statuses(listener) == {"none": "dead"}, 15, "dead letter")
    row = event_row(listener, "none")
    assert row["attempts"] == 3 and row["last_error"].startswith("gave up after 3 attempts: not_found")
    assert len(fake_noyo.object_requests()) == 3
    assert "backing off" not in listener.log()


# --- Retry-After: capped, and never a crash -------------------------------------


@pytest.mark.parametrize("header", [
    "86400",                           # a day: capped at backoff_max (1s here)
    "99999999999999999999",            # raised OverflowError in utc_iso and killed the thread
    "9" * 400,                         # float() of this is inf
    "\u00b2",                          # "²": str.isdigit() says yes, float() says ValueError
    "Fri, 31 Dec 9999 23:59:59 GMT",   # the largest date there is
    "Sat, 01 Jan 99999 00:00:00 GMT",  # not a date datetime can hold
    "soon",
], ids=["a-day", "20-digits", "400-digits", "superscript-two", "year-9999", "year-99999", "word"])
def test_any_retry_after_is_capped_or_ignored_and_the_worker_lives(fetching, fake_noyo, header):
    fake_noyo.put("difference", difference("d-ra"))
    fake_noyo.add_fault(Fault("status", status=429, times=1, retry_after=header))
    listener = fetching(backoff_max="1s")
    listener.send(event_body("difference.created", data_id="d-ra", event_id="ra"))
    wait_all_done(listener, timeout=15)  # within backoff_max (+ scheduling), not a day
    assert listener.get("/healthz")[0] == 200
    assert "Traceback" not in listener.log()
    assert event_row(listener, "ra")["attempts"] == 2


# --- crashes: the attempt counts ------------------------------------------------


def test_an_event_in_flight_at_every_crash_dies_at_max_attempts(fetching, fake_noyo):
    fake_noyo.put("difference", difference("d-crash"))
    fake_noyo.hold()  # every GET hangs: each run is killed while fetching
    listener = fetching(max_attempts=2)
    listener.send(event_body("difference.created", data_id="d-crash", event_id="crash"))
    fake_noyo.wait_for_arrivals(1)
    listener.kill()
    listener.start()
    fake_noyo.wait_for_arrivals(2)
    listener.kill()
    listener.start()
    wait_until(lambda: event_row(listener, "crash")["status"] == "dead", 10, "dead after two stopped fetches")
    row = event_row(listener, "crash")
    assert row["attempts"] == 2
    assert "process stopped during fetch" in row["last_error"]
    assert len(fake_noyo.arrivals) == 2  # not fetched a third time
    fake_noyo.release()


# --- nothing stops the scheduler --------------------------------------------------


def test_the_scheduler_survives_an_unexpected_error_and_logs_it_once(fetching, fake_noyo):
    listener = fetching()
    # A row whose next_attempt_at is not a timestamp: reading the next due
    # time raises ValueError inside the scheduler, on every cycle.
    with listener.db() as conn:
        conn.execute("INSERT INTO events (event_id, type, data_id, received_at, payload, status, next_attempt_at) "
                     "VALUES ('odd', 'difference.created', 'x', '2026-01-01T00:00:00.000Z', '{}', 'pending', 'zzz')")
    listener.wait_for_log(r"ERROR worker scheduler failed; trying again error=.*ValueError")
    fake_noyo.put("difference", difference("d-after"))
    listener.send(event_body("difference.created", data_id="d-after", event_id="after"))
    wait_until(lambda: event_row(listener, "after")["status"] == "done", 15, "fetching goes on")
    assert listener.get("/healthz")[0] == 200
    assert len([line for line in listener.log().splitlines() if "worker scheduler failed" in line]) == 1


# --- the token: one request in flight, shared by every thread that needs one -----


def test_a_hanging_token_endpoint_costs_one_request_for_all_fetch_threads(fetching, fake_noyo):
    for n in range(4):
        fake_noyo.put("difference", difference(f"d-{n}"))
    fake_noyo.token_delay = 3.0  # longer than the 2s timeout
    listener = fetching(concurrency=4, backoff_initial="2s", backoff_max="4s")
    for n in range(4):
        listener.send(event_body("difference.created", data_id=f"d-{n}", event_id=f"e{n}"))
    wait_until(lambda: all(event_row(listener, f"e{n}")["last_error"] for n in range(4)), 20,
               "every fetch to fail")
    # Held under a lock, each fetch thread made its own request in turn (4 x timeout).
    assert len(fake_noyo.token_arrivals) <= 2, fake_noyo.token_arrivals
    fake_noyo.token_delay = 0.0
    wait_all_done(listener, timeout=20)


# --- /healthz: one shared verdict ------------------------------------------------


def test_concurrent_health_checks_all_get_the_same_verdict(listener):
    answers: list[int] = []
    lock = threading.Lock()

    def check() -> None:
        for _ in range(5):
            status = listener.get("/healthz")[0]
            with lock:
                answers.append(status)

    threads = [threading.Thread(target=check) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [200] * 30
    assert "previous health check" not in listener.log()


# --- requeue is picked up within 2 s --------------------------------------------


def test_a_running_serve_picks_up_requeue_promptly(fetching, fake_noyo):
    listener = fetching(max_attempts=1)
    listener.send(event_body("difference.created", data_id="d-rq", event_id="rq"))
    wait_until(lambda: statuses(listener) == {"rq": "dead"}, 10, "dead letter")
    time.sleep(1.5)  # let the scheduler settle into its long idle sleep (30 s before this fix)
    fake_noyo.put("difference", difference("d-rq"))
    result = run_cli("--config", str(listener.ini), "requeue", "--dead")
    assert result.returncode == 0 and "within 2s" in result.stdout
    wait_until(lambda: event_row(listener, "rq")["status"] == "done", 5, "requeued event fetched")


# --- prune: bounded vacuum steps ---------------------------------------------------


def test_vacuum_gives_pages_back_in_bounded_steps(tmp_path):
    store = nl.Store(str(tmp_path / "v.sqlite3"))
    store.open()
    try:
        store.write(lambda conn: conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)", [(f"k{n}", "x" * 2000) for n in range(3000)]))
        store.write(lambda conn: conn.execute("DELETE FROM meta"))
        conn = store.read()
        free_before = conn.execute("PRAGMA freelist_count").fetchone()[0]
        commits_before = store.commits
        freed = nl.vacuum_in_steps(store)
        free_after = conn.execute("PRAGMA freelist_count").fetchone()[0]
        conn.close()
    finally:
        store.close()
    assert free_before > 3 * nl.VACUUM_STEP_PAGES
    assert (freed, free_after) == (free_before, 0)
    assert store.commits - commits_before > free_before // nl.VACUUM_STEP_PAGES  # one short step per commit


# --- the policy as data (pure functions) ----------------------------------------


def test_the_policy_table_is_the_specs():
    table = {kind: (v.event, v.api) for kind, v in nl.FAILURE_POLICY.items()}
    assert table == {
        "transient": ("retry", "failing"), "rate_limited": ("retry", "failing"),
        "credentials": ("wait", "auth_failed"), "not_found": ("retry", "answered"),
        "refused": ("dead", "answered"), "not_object": ("dead", "answered"),
    }
    assert set(nl.FAILURE_POLICY) == set(nl.FETCH_FAILURES)


@given(attempts=st.integers(1, 200), initial=st.floats(0.001, 10), spread=st.floats(1, 10_000))
def test_retry_delay_is_between_half_and_all_of_the_exponential_value(attempts, initial, spread):
    policy = nl.FailurePolicy(20, initial, initial * spread)
    expected = min(initial * spread, initial * 2 ** min(attempts - 1, 60))
    # Many draws per example: Hypothesis seeds `random` the same way for every example.
    delays = [policy.retry_delay(attempts) for _ in range(64)]
    assert all(expected / 2 <= delay <= expected for delay in delays), (min(delays), max(delays), expected)


@given(header=st.text(max_size=60))
@example(header="\u00b2")
@example(header="99999999999999999999")
@example(header="Sat, 01 Jan 99999 00:00:00 GMT")
def test_parse_retry_after_never_raises(header):
    value = nl.parse_retry_after(header)
    assert value is None or (value >= 0 and value == value and value != float("inf"))


@given(retry_after=st.one_of(st.none(), st.floats(0, 1e300)))
def test_retry_after_is_honoured_up_to_backoff_max(retry_after):
    policy = nl.FailurePolicy(20, 0.1, 60.0)
    delay = policy.retry_delay(1, retry_after)
    assert delay <= 60.0
    if retry_after is not None:
        assert delay >= min(retry_after, 60.0)
    nl.utc_iso(time.time() + delay)  # and the due time is writable


def test_a_stopped_fetch_counts_and_dies_at_max_attempts():
    policy = nl.FailurePolicy(2, 1.0, 10.0)
    first = policy.decide("retry", 0, nl.STOPPED_DURING_FETCH, 0.0)
    second = policy.decide("retry", 1, nl.STOPPED_DURING_FETCH, 0.0)
    assert (first.status, first.spent) == ("pending", 1)
    assert (second.status, second.spent) == ("dead", 1) and "process stopped during fetch" in second.last_error
    assert policy.decide("wait", 5, "paused", 0.0, wait_until=30.0) == nl.EventOutcome("pending", 0, 30.0, "paused")
