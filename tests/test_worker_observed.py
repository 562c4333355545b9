"""Worker promises checked from outside, through the fake API's request log
and the database rows, so they hold whatever the worker's insides look like:
newer-object-wins for `resources`, and retry spacing that follows backoff."""

from __future__ import annotations

import json

from conftest import api_sections, event_body, wait_until
from fake_noyo import Fault


def statuses(listener) -> dict[str, str]:
    with listener.db() as conn:
        return dict(conn.execute("SELECT event_id, status FROM events"))


def wait_done(listener, *event_ids: str, timeout: float = 20.0) -> None:
    wait_until(lambda: all(statuses(listener).get(e) == "done" for e in event_ids), timeout,
               f"events {event_ids} done")


def test_an_older_fetch_never_overwrites_a_newer_resource_row(start_listener, fake_noyo):
    listener = start_listener(**api_sections(fake_noyo))
    fake_noyo.put("group", {"id": "g-1", "modified": 200, "status": "active"})
    listener.send(event_body("group.created", data_id="g-1", event_id="newer"))
    wait_done(listener, "newer")

    # The API now serves an older copy (a lagging replica, a stale cache).
    fake_noyo.put("group", {"id": "g-1", "modified": 100, "status": "pending"})
    listener.send(event_body("group.created", data_id="g-1", event_id="older"))
    wait_done(listener, "older")
    assert len(fake_noyo.object_requests("/groups/g-1")) == 2  # the older copy was fetched...
    with listener.db() as conn:
        modified, body = conn.execute("SELECT modified, body FROM resources WHERE kind = 'group' AND id = 'g-1'").fetchone()
    assert (modified, json.loads(body)["status"]) == (200, "active")  # ...and not kept

    fake_noyo.put("group", {"id": "g-1", "modified": 300, "status": "closed"})
    listener.send(event_body("group.created", data_id="g-1", event_id="newest"))
    wait_done(listener, "newest")
    with listener.db() as conn:
        assert conn.execute("SELECT modified FROM resources WHERE id = 'g-1'").fetchone()[0] == 300


INITIAL = 1.5  # seconds: large next to scheduling noise, so the lower bounds below cannot flake


def test_retries_are_spaced_by_the_backoff_not_immediate(start_listener, fake_noyo):
    """SPEC: attempt n waits between 0.5x and 1x of backoff_initial * 2^(n-1).
    Only the lower bound is asserted (a loaded machine can only make gaps longer)."""
    fake_noyo.put("difference", {"id": "d-retry", "modified": 1})
    fake_noyo.add_fault(Fault("status", times=2, status=500))
    listener = start_listener(**api_sections(fake_noyo, backoff_initial=f"{INITIAL}s", backoff_max="60s"))
    listener.send(event_body("difference.created", data_id="d-retry", event_id="retried"))
    wait_done(listener, "retried", timeout=30)
    attempts = fake_noyo.object_requests("/differences/d-retry")
    assert [r.status for r in attempts] == [500, 500, 200]
    gaps = [later.at - earlier.at for earlier, later in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.5 * INITIAL * 0.9, gaps
    assert gaps[1] >= 0.5 * INITIAL * 2 * 0.9, gaps
