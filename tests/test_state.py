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


# --- the change feed: what the SPEC's rule predicts, whatever the order ------------------------
#
# Literal equality of the feed across reorderings cannot hold: an older object
# that arrives after a newer one writes nothing (SPEC), so the versions a feed
# passes through depend on arrival order. What does hold, and is checked here:
# for ANY order and duplication of events, fetches and sync-pass applies, the
# feed is exactly the one the SPEC's rule predicts (a row per newer object, one
# `event` row when a replaced event alone changes the state, none otherwise);
# duplicates add no row at all; and every order ends the feed in the same state.

feed_steps = st.lists(
    st.tuples(st.integers(0, 4), st.lists(st.integers(0, 5), max_size=3), st.sampled_from(["fetch", "sync"])),
    min_size=1, max_size=8,
)


def spec_state(obj: dict, replaced: bool) -> str:
    """SPEC, differences.state, restated for the model."""
    if obj["resolved"] is not None:
        return "resolved"
    if replaced:
        return "replaced"
    return "discrepancy" if obj["discrepancy_time"] is not None else "pending"


def model_feed(steps: list[tuple[dict, list[tuple[str, str, int]], str]]) -> list[tuple]:
    """The feed the SPEC predicts: (version, modified, state_from, state_to, source, event_type) per row."""
    stored, replaced, state, feed = None, False, None, []
    for obj, step_events, source in steps:
        newly_replaced = not replaced and any(t == "difference.replaced" for _, t, _ in step_events)
        replaced = replaced or newly_replaced
        newer = stored is None or obj["modified"] > stored["modified"]
        stored = obj if newer else stored
        new_state = spec_state(stored, replaced)
        if newer:
            cause = None
            if source == "fetch" and step_events:
                cause = max(step_events, key=lambda e: noyo_listener.event_order(e[2], e[1]))[1]
            feed.append((stored["version"], stored["modified"], state, new_state, source, cause))
        elif new_state != state:
            feed.append((stored["version"], stored["modified"], state, new_state, "event", "difference.replaced"))
        state = new_state
    return feed


def feed_of(steps: list[tuple[dict, list[tuple[str, str, int]], str]]) -> tuple[list[tuple], str]:
    """Apply each step as the worker (fetch) or a sync pass would; the feed without seq/observed_at."""
    conn = fresh_db()
    stored_events: set[str] = set()
    for number, (obj, step_events, source) in enumerate(steps):
        for event_id, event_type, created in step_events:
            if event_id not in stored_events:  # a repeated delivery is one row (the dedupe store)
                stored_events.add(event_id)
                payload = json.dumps({"data": {"id": "d"}, "event": {"id": event_id}})
                conn.execute("INSERT INTO events (event_id, type, data_id, created, received_at, payload, status) "
                             "VALUES (?, ?, 'd', ?, 'now', ?, 'done')", (event_id, event_type, created, payload))
        ids = [event_id for event_id, _, _ in step_events] if source == "fetch" else []
        noyo_listener.apply_difference(conn, obj, json.dumps(obj), ids, f"t{number}", source=source)
    rows = conn.execute("SELECT seq, kind, id, version, modified, state_from, state_to, source, event_type "
                        "FROM changes ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})  # seq increases, never repeats
    assert {(r[1], r[2]) for r in rows} <= {("difference", "d")}
    state = conn.execute("SELECT state FROM differences").fetchone()[0]
    return [tuple(r[3:]) for r in rows], state


def build_steps(versions: list[dict], pool: list[tuple[str, int]], raw: list) -> list:
    objs = [{"id": "d", "version": v["modified"], **v} for v in versions]
    events_pool = [(f"e{n}", t, c) for n, (t, c) in enumerate(pool)]
    return [(objs[i % len(objs)], [events_pool[j % len(events_pool)] for j in js] if source == "fetch" else [],
             source) for i, js, source in raw]


@given(versions=versions, pool=events, raw=feed_steps, data=st.data())
def test_the_feed_is_what_the_spec_predicts_for_any_order_and_has_no_duplicates(versions, pool, raw, data):
    steps = build_steps(versions, pool, raw)
    feed, state = feed_of(steps)
    assert feed == model_feed(steps)
    assert len(feed) == len(set(feed))  # no row twice
    assert feed[-1][3] == state  # the feed ends where the table is

    # Duplicates (a redelivered event, a repeated fetch, a sync pass over
    # something already seen) add nothing: the same feed, row for row.
    repeats = data.draw(st.lists(st.tuples(st.integers(0, len(steps) - 1), st.integers(0, len(steps))), max_size=5))
    duplicated = list(range(len(steps)))  # indexes into steps; a copy always lands after its original
    for original, offset in repeats:
        after = duplicated.index(original) + 1
        duplicated.insert(after + offset % (len(duplicated) - after + 1), original)
    duplicated = [steps[i] for i in duplicated]
    sync_again = [(obj, [], "sync") for obj, _, _ in steps]
    assert feed_of(duplicated + sync_again)[0] == feed

    # Any other order: its own predicted feed, the same final state.
    shuffled = data.draw(st.permutations(steps))
    other, other_state = feed_of(shuffled)
    assert other == model_feed(shuffled) and other_state == state and other[-1][3] == state
