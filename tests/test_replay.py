"""Replay protection for body-form signatures (SPEC, Facts about Noyo: the age
window must bind something signed).

A signature over the body alone leaves ``x-noyo-timestamp`` unsigned, so the
window also applies to the signed ``event.created``; the timestamp.body form
is judged by its (signed) header alone.
"""

from __future__ import annotations

import ast
import json
import re
import time

import pytest

from conftest import MODULE, event_body, signed_headers

DAY = 86400


def stored(listener) -> tuple[int, int]:
    with listener.db() as conn:
        return (conn.execute("SELECT COUNT(*) FROM events").fetchone()[0],
                conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])


def test_a_captured_body_replayed_with_a_fresh_header_is_refused(listener):
    # Five days old: inside no window, but signed; the header is brand new.
    body = event_body(event_id="captured", created=int(time.time()) - 5 * DAY)
    status, answer = listener.post(body, signed_headers(body, form="body"))
    assert status == 401, answer
    assert stored(listener) == (0, 0)
    listener.wait_for_log(r"status=401 ms=\S+ reason=event_created_too_old")


def test_a_body_form_event_dated_in_the_future_is_refused(listener):
    body = event_body(created=int(time.time()) + 3600)  # skew allowed: 5m
    assert listener.post(body, signed_headers(body, form="body"))[0] == 401
    assert stored(listener) == (0, 0)
    listener.wait_for_log(r"reason=event_created_in_future")


@pytest.mark.parametrize("created", ["absent", None, "1715203665", True, 2**64, 1e400])
def test_a_body_form_event_without_a_usable_created_is_refused_with_its_own_reason(listener, created):
    event = {"id": "undated", "type": "difference.created"}
    if created != "absent":
        event["created"] = created
    text = json.dumps({"data": {"id": "d"}, "event": event}).replace("Infinity", "1e400")
    body = text.encode()
    status, answer = listener.post(body, signed_headers(body, form="body"))
    assert status == 401, answer
    assert stored(listener) == (0, 0)
    listener.wait_for_log(r"status=401 ms=\S+ reason=no_event_created")


def test_a_fresh_body_form_event_is_still_accepted(listener):
    body = event_body(event_id="fresh", created=int(time.time()) - 3600)
    assert listener.post(body, signed_headers(body, form="body"))[0] == 200
    assert stored(listener) == (1, 1)


def test_the_timestamp_body_form_is_judged_by_its_signed_header_alone(listener):
    old = event_body(event_id="old-but-ts", created=int(time.time()) - 5 * DAY)
    undated = json.dumps({"data": {"id": "d"}, "event": {"id": "undated-ts", "type": "difference.created"}}).encode()
    for body in (old, undated):
        assert listener.post(body, signed_headers(body, form="timestamp.body"))[0] == 200
    assert stored(listener) == (2, 2)


def test_with_the_age_check_off_the_body_form_is_not_dated_either(start_listener):
    listener = start_listener(webhook={"max_timestamp_age": "0"})
    body = event_body(event_id="ancient", created=1)
    assert listener.post(body, signed_headers(body, form="body"))[0] == 200
    assert stored(listener) == (1, 1)


def test_a_pinned_body_form_applies_the_same_rule(start_listener):
    listener = start_listener(webhook={"signature_payload": "body"})
    body = event_body(created=int(time.time()) - 5 * DAY)
    assert listener.post(body, signed_headers(body, form="body"))[0] == 401
    assert stored(listener) == (0, 0)


def test_every_reason_the_receiver_gives_is_in_the_one_list():
    """The rejected counter is labelled by REJECT_REASONS: a reason written in
    the code but missing from the list would be an unlabelled series."""
    source = MODULE.read_text()
    namespace: dict = {}
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "REJECT_REASONS" for t in node.targets):
            namespace["REJECT_REASONS"] = ast.literal_eval(node.value)
    reasons = set(namespace["REJECT_REASONS"])
    literal = set(re.findall(r'_reject\(\d+, "(\w+)"', source))
    returned = set(re.findall(r'return "(\w+)"', source[source.index("def check_timestamp"):
                                                        source.index("# --- HTTP app")]))
    built = {f"{what}_{edge}" for what in re.findall(r'_age_reason\("(\w+)"', source) for edge in ("too_old", "in_future")}
    bad_events = {m.replace(" ", "_") for m in re.findall(r'raise BadEvent\("([^"]+)"\)', source)}
    emitted = literal | returned | built | bad_events
    assert {"no_event_created", "event_created_too_old", "timestamp_too_old"} <= emitted
    assert emitted <= reasons, emitted - reasons
