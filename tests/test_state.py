"""Pure pieces of the worker: state derivation, ordering, token and Retry-After rules.

The order-independence property runs against a real SQLite database built by
the program's own migrations.
"""

from __future__ import annotations

import email.utils
import json
import sqlite3

import pytest
from hypothesis import given, strategies as st

import noyo_listener
from noyo_listener import FetchError, difference_state, newness, parse_retry_after, token_lifetime, unwrap_object


@pytest.mark.parametrize("obj, replaced, state", [
    ({"resolved": 5, "discrepancy_time": 3}, True, "resolved"),
    ({"resolved": None, "discrepancy_time": 3}, True, "replaced"),
    ({"resolved": None, "discrepancy_time": 3}, False, "discrepancy"),
    ({"resolved": None, "discrepancy_time": None}, False, "pending"),
    ({}, False, "pending"),
])
def test_difference_state_follows_the_spec(obj, replaced, state):
    assert difference_state(obj, replaced) == state


def test_newness_orders_by_modified_then_version_and_reads_iso():
    assert newness({"modified": 2, "version": 1}) > newness({"modified": 1, "version": 9})
    assert newness({"modified": 2, "version": 2}) > newness({"modified": 2, "version": 1})
    assert newness({"modified": "2024-05-08T21:27:45+00:00"}) > newness({"modified": 1_000_000_000})
    assert newness({}) < newness({"modified": 0})


@pytest.mark.parametrize("expires_in, low, high", [
    (600, 500, 600), (600000, 500, 600), (36000, 500, 600), ("600", 500, 600),
    (None, 500, 600), ("soon", 500, 600), (10, 5, 10), (0, 5, 5),
])
def test_token_lifetime_is_defensive(expires_in, low, high):
    assert low <= token_lifetime(expires_in) <= high


def test_retry_after_in_seconds_or_as_an_http_date():
    assert parse_retry_after("120") == 120
    assert parse_retry_after(email.utils.formatdate(1000 + 30, usegmt=True), now=1000) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(900, usegmt=True), now=1000) == 0
    assert parse_retry_after("soonish") is None and parse_retry_after(None) is None


def test_unwrap_object_accepts_bare_or_wrapped_and_refuses_the_rest():
    assert unwrap_object({"id": "a", "x": 1}, "a") == {"id": "a", "x": 1}
    assert unwrap_object({"response": {"id": "a"}}, "a") == {"id": "a"}
    for answer in ([{"id": "a"}], {"response": {"no": "id"}}, {"id": "b"}, "a", None):
        with pytest.raises(FetchError):
            unwrap_object(answer, "a")


# --- any order, same row ------------------------------------------------------

EVENT_TYPES = ["difference.created", "difference.discrepancy", "difference.resolved", "difference.replaced"]

versions = st.lists(
    st.fixed_dictionaries({
        "modified": st.integers(1, 50),
        "resolved": st.one_of(st.none(), st.integers(1, 50)),
        "discrepancy_time": st.one_of(st.none(), st.integers(1, 50)),
    }),
    min_size=1, max_size=5, unique_by=lambda v: v["modified"],
)
events = st.lists(st.tuples(st.sampled_from(EVENT_TYPES), st.integers(1, 5)), min_size=1, max_size=6)


def fresh_db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    noyo_listener.migrate(conn, ":memory:")
    return conn


def apply_all(steps: list[tuple[dict, tuple[str, int]]]) -> dict:
    """Each step: one fetch result together with the event that asked for it."""
    conn = fresh_db()
    for number, (obj, (event_type, created)) in enumerate(steps):
        obj = {"id": "d", "version": obj["modified"], **obj}
        event_id = f"e{number}"
        payload = json.dumps({"data": {"id": "d", "replaced_by": "d2"}, "event": {"id": event_id}})
        conn.execute("INSERT INTO events (event_id, type, data_id, created, received_at, payload, status) "
                     "VALUES (?, ?, 'd', ?, 'now', ?, 'pending')", (event_id, event_type, created, payload))
        noyo_listener.apply_difference(conn, obj, json.dumps(obj), [event_id], f"t{number}")
    row = conn.execute("SELECT state, resolved, discrepancy_time, modified, version, last_event_type, "
                       "replaced, replaced_by, body FROM differences").fetchone()
    return dict(zip(("state", "resolved", "discrepancy_time", "modified", "version", "last_event_type",
                     "replaced", "replaced_by", "body"), row))


@given(versions=versions, events=events, data=st.data())
def test_any_order_of_events_and_fetches_ends_in_the_same_row(versions, events, data):
    # Pair every event with some fetched version; then shuffle the whole history.
    pairs = [(data.draw(st.sampled_from(versions)), event) for event in events]
    pairs += [(version, (events[0][0], events[0][1])) for version in versions]  # every version is seen once
    first = apply_all(pairs)
    shuffled = data.draw(st.permutations(pairs))
    assert apply_all(shuffled) == first

    newest = max(versions, key=lambda v: v["modified"])
    replaced = any(t == "difference.replaced" for t, _ in events)
    assert first["modified"] == newest["modified"]
    assert first["state"] == difference_state(newest, replaced)
    assert first["last_event_type"] == max(events, key=lambda e: noyo_listener.event_order(e[1], e[0]))[0]
    assert first["replaced_by"] == ("d2" if replaced else None)


def test_a_fetched_object_with_numbers_sqlite_cannot_hold_is_still_recorded():
    """Never trust the API's shapes: an out-of-range value must not make the record fail forever."""
    conn = fresh_db()
    conn.execute("INSERT INTO events (event_id, type, data_id, received_at, payload, status) "
                 "VALUES ('e', 'difference.created', 'd', 'now', '{}', 'pending')")
    obj = {"id": "d", "modified": 2**70, "version": float("inf"), "resolved": None, "group_id": 10**30}
    noyo_listener.apply_difference(conn, obj, json.dumps(obj), ["e"], "t")
    noyo_listener.apply_resource(conn, "group", {"id": "g", "modified": -(2**64)}, "{}", "t")
    modified, version, group_id, body = conn.execute(
        "SELECT modified, version, group_id, body FROM differences").fetchone()
    # INTEGER affinity keeps a too-large number as REAL; the exact value is in body.
    assert float(modified) == float(2**70) and version is None and group_id == str(10**30)
    assert json.loads(body)["modified"] == 2**70
    assert float(conn.execute("SELECT modified FROM resources").fetchone()[0]) == float(-(2**64))
