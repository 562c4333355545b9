"""The webhook route over real HTTP: every row of SPEC.md's HTTP table."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import uuid

import pytest

from conftest import OTHER_SECRET, SECRET, event_body, hmac_hex, noyo_timestamp, signed_headers


def count(listener, table: str = "events") -> int:
    with listener.db() as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def nothing_stored(listener) -> bool:
    return count(listener, "events") == 0 and count(listener, "deliveries") == 0


# --- 200: authentic and new -------------------------------------------------


def test_authentic_new_event_is_committed_with_its_delivery(listener):
    body = event_body("difference.created", data_id="diff-1", event_id="evt-1", created=1715203665,
                      extra_field={"kept": True})
    headers = signed_headers(body, trace="trace-abc/1;o=1")

    status, answer = listener.post(body, headers)

    assert (status, answer) == (200, {"ok": True})
    with listener.db() as conn:
        event = dict(conn.execute("SELECT * FROM events").fetchone())
        delivery = dict(conn.execute("SELECT * FROM deliveries").fetchone())
    assert event["event_id"] == "evt-1"
    assert event["type"] == "difference.created"
    assert event["data_id"] == "diff-1"
    assert event["created"] == 1715203665
    assert event["payload"] == body.decode()  # the raw text, extra fields included
    assert event["status"] == "pending"
    assert event["attempts"] == 0
    assert event["delivery_count"] == 1
    assert event["received_at"].endswith("Z") and event["next_attempt_at"]
    assert delivery["event_id"] == "evt-1"
    assert delivery["noyo_timestamp"] == headers["x-noyo-timestamp"]
    assert delivery["trace_context"] == "trace-abc/1;o=1"
    assert delivery["secret_name"] == "primary"
    assert delivery["signature_form"] == "timestamp.body"
    assert delivery["duplicate"] == 0


@pytest.mark.parametrize("event_type, status", [
    ("difference.created", "pending"),
    ("member_snapshot.status_change", "pending"),
    ("group_connection_request.status_change", "pending"),
    ("test.hello_world", "ignored"),
    ("brand_new_kind.appeared", "ignored"),
])
def test_kinds_without_a_fetch_entry_are_stored_as_ignored(listener, event_type, status):
    body = event_body(event_type)
    assert listener.send(body)[0] == 200
    with listener.db() as conn:
        assert conn.execute("SELECT status FROM events").fetchone()[0] == status


def test_hello_world_without_data_id_is_stored(listener):
    body = json.dumps({"data": {"message": "Hello world!"},
                       "event": {"id": str(uuid.uuid4()), "created": 1, "type": "test.hello_world"}}).encode()
    assert listener.send(body) == (200, {"ok": True})
    with listener.db() as conn:
        assert tuple(conn.execute("SELECT data_id, status FROM events").fetchone()) == (None, "ignored")


def test_fetchable_event_without_data_id_is_kept_as_dead_with_a_reason(listener):
    body = json.dumps({"data": {}, "event": {"id": "e-no-data", "type": "difference.created"}}).encode()
    assert listener.send(body)[0] == 200
    with listener.db() as conn:
        status, error = conn.execute("SELECT status, last_error FROM events").fetchone()
    assert status == "dead" and "data.id" in error


@pytest.mark.parametrize("created", [10**30, -(10**30), 1e400, "yesterday", True])
def test_an_unusable_event_created_is_kept_in_the_payload_not_in_the_column(listener, created):
    """SQLite INTEGER is 64-bit: a bigger number must not turn an authentic event into a 503 forever."""
    body = json.dumps({"data": {"id": "d"}, "event": {"id": "odd-created", "created": created,
                                                      "type": "difference.created"}}).encode()
    assert listener.send(body) == (200, {"ok": True})
    with listener.db() as conn:
        stored_created, payload = conn.execute("SELECT created, payload FROM events").fetchone()
    assert stored_created is None and payload == body.decode()
    assert "Traceback" not in listener.log()


def test_event_without_event_id_is_stored_under_a_body_hash_and_deduplicated(listener):
    body = json.dumps({"data": {"id": "d1"}, "event": {"type": "difference.created"}}).encode()
    assert listener.send(body) == (200, {"ok": True})
    assert listener.send(body) == (200, {"ok": True, "duplicate": True})
    with listener.db() as conn:
        rows = conn.execute("SELECT event_id, delivery_count FROM events").fetchall()
    assert [tuple(r) for r in rows] == [("sha256:" + hashlib.sha256(body).hexdigest(), 2)]


# --- 200: authentic, already seen -------------------------------------------


def test_redelivery_answers_duplicate_and_only_counts(listener):
    body = event_body(event_id="evt-dup")
    assert listener.send(body) == (200, {"ok": True})
    # Noyo's retry: same body, maybe a fresh timestamp and trace.
    assert listener.send(body) == (200, {"ok": True, "duplicate": True})
    assert listener.send(body, form="body") == (200, {"ok": True, "duplicate": True})
    with listener.db() as conn:
        assert tuple(conn.execute("SELECT COUNT(*), SUM(delivery_count) FROM events").fetchone()) == (1, 3)
        duplicates = [r[0] for r in conn.execute("SELECT duplicate FROM deliveries ORDER BY id")]
    assert duplicates == [0, 1, 1]


def test_concurrent_deliveries_of_one_event_leave_exactly_one_row(listener):
    body = event_body(event_id="evt-race")
    senders = 16
    answers: list[tuple[int, dict]] = []
    barrier = threading.Barrier(senders)

    def send() -> None:
        headers = signed_headers(body)
        conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
        conn.connect()
        barrier.wait()
        conn.request("POST", listener.path, body=body, headers=headers)
        response = conn.getresponse()
        answers.append((response.status, json.loads(response.read())))
        conn.close()

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert [status for status, _ in answers] == [200] * senders
    assert sum(1 for _, a in answers if not a.get("duplicate")) == 1
    with listener.db() as conn:
        assert tuple(conn.execute("SELECT COUNT(*), delivery_count FROM events").fetchone()) == (1, senders)
        assert tuple(conn.execute("SELECT COUNT(*), SUM(duplicate) FROM deliveries").fetchone()) == (senders, senders - 1)


# --- 401: signature and timestamp -------------------------------------------


def test_missing_signature_is_401_and_nothing_is_stored(listener):
    body = event_body()
    headers = signed_headers(body)
    del headers["x-noyo-signature"]
    status, answer = listener.post(body, headers)
    assert status == 401 and answer["ok"] is False
    assert nothing_stored(listener)
    listener.wait_for_log(r"WARNING request method=POST path=/noyo/webhooks status=401 ms=\S+ reason=no_signature")


@pytest.mark.parametrize("make_headers", [
    lambda body: signed_headers(body, secret="not-the-secret"),
    lambda body: {**signed_headers(body), "x-noyo-signature": "0" * 64},
    lambda body: {**signed_headers(body), "x-noyo-signature": "not hex at all, ünïcode"},
    lambda body: signed_headers(body + b" "),  # a valid signature for another body
    lambda body: {**signed_headers(body), "x-noyo-timestamp": noyo_timestamp(-1)},  # signed another timestamp
], ids=["wrong-secret", "zeros", "garbage", "other-body", "other-timestamp"])
def test_wrong_signature_is_401_and_nothing_is_stored(listener, make_headers):
    body = event_body()
    assert listener.post(body, make_headers(body))[0] == 401
    assert nothing_stored(listener)
    listener.wait_for_log(r"reason=no_matching_signature")


def test_any_of_several_signatures_in_the_header_may_match(listener):
    body = event_body()
    headers = signed_headers(body)
    good = headers["x-noyo-signature"]
    headers["x-noyo-signature"] = f"{'a' * 64}, ,{good.upper()} ,"  # spaces, empties, uppercase hex
    assert listener.post(body, headers) == (200, {"ok": True})


def test_rotation_accepts_every_configured_secret_and_records_its_name(start_listener):
    listener = start_listener(webhook={"secrets": f"old:{SECRET}, new:{OTHER_SECRET}"})
    assert listener.send(event_body(event_id="by-old"), secret=SECRET)[0] == 200
    assert listener.send(event_body(event_id="by-new"), secret=OTHER_SECRET)[0] == 200
    assert listener.send(event_body(event_id="by-none"), secret="third")[0] == 401
    with listener.db() as conn:
        names = dict(conn.execute("SELECT event_id, secret_name FROM deliveries"))
    assert names == {"by-old": "old", "by-new": "new"}


def test_bare_secrets_are_named_by_position(start_listener):
    listener = start_listener(webhook={"secrets": f"{SECRET},{OTHER_SECRET}"})
    assert listener.send(event_body(), secret=OTHER_SECRET)[0] == 200
    with listener.db() as conn:
        assert conn.execute("SELECT secret_name FROM deliveries").fetchone()[0] == "secret2"


def test_auto_accepts_both_forms_and_records_which_matched(listener):
    assert listener.send(event_body(event_id="ts"), form="timestamp.body")[0] == 200
    assert listener.send(event_body(event_id="b"), form="body")[0] == 200
    with listener.db() as conn:
        forms = dict(conn.execute("SELECT event_id, signature_form FROM deliveries"))
    assert forms == {"ts": "timestamp.body", "b": "body"}


@pytest.mark.parametrize("pinned, accepted, refused", [
    ("timestamp.body", "timestamp.body", "body"),
    ("body", "body", "timestamp.body"),
])
def test_a_pinned_signature_payload_refuses_the_other_form(start_listener, pinned, accepted, refused):
    listener = start_listener(webhook={"signature_payload": pinned})
    assert listener.send(event_body(), form=accepted)[0] == 200
    assert listener.send(event_body(), form=refused)[0] == 401
    assert count(listener) == 1


def test_body_form_needs_no_timestamp_when_the_age_check_is_off(start_listener):
    listener = start_listener(webhook={"max_timestamp_age": "0"})
    body = event_body()
    headers = signed_headers(body, form="body")
    del headers["x-noyo-timestamp"]
    assert listener.post(body, headers)[0] == 200


@pytest.mark.parametrize("offset, expected, reason", [
    (-3600 + 30, 200, None),             # 59m30s old, window 1h
    (-3600 - 30, 401, "timestamp_too_old"),
    (300 - 30, 200, None),               # 4m30s ahead, skew 5m
    (300 + 30, 401, "timestamp_in_future"),
])
def test_timestamp_window_edges(start_listener, offset, expected, reason):
    listener = start_listener(webhook={"max_timestamp_age": "1h", "max_clock_skew": "5m"})
    status, _ = listener.send(event_body(), timestamp=noyo_timestamp(offset))
    assert status == expected
    assert count(listener) == (1 if expected == 200 else 0)
    if reason:
        listener.wait_for_log(rf"status=401 ms=\S+ reason={reason}")


@pytest.mark.parametrize("timestamp, reason", [
    (None, "no_timestamp"),
    ("yesterday-ish", "bad_timestamp"),
])
def test_missing_or_unparsable_timestamp_is_401(listener, timestamp, reason):
    body = event_body()
    headers = signed_headers(body, form="body")
    if timestamp is None:
        del headers["x-noyo-timestamp"]
    else:
        headers["x-noyo-timestamp"] = timestamp
    assert listener.post(body, headers)[0] == 401
    assert nothing_stored(listener)
    listener.wait_for_log(rf"reason={reason}")


def test_age_check_off_accepts_an_old_timestamp(start_listener):
    listener = start_listener(webhook={"max_timestamp_age": "0"})
    assert listener.send(event_body(), timestamp="2020-01-01T00:00:00+00:00")[0] == 200


# --- 413: body too large ----------------------------------------------------


def padded_event(size: int) -> bytes:
    """A valid event JSON of exactly ``size`` bytes."""
    base = event_body(padding="")
    body = base.replace(b'"padding": ""', b'"padding": "' + b"x" * (size - len(base)) + b'"')
    assert len(body) == size
    return body


def test_body_of_exactly_max_body_bytes_is_accepted(start_listener):
    listener = start_listener(server={"max_body_bytes": 4096})
    assert listener.send(padded_event(4096)) == (200, {"ok": True})


@pytest.mark.parametrize("size", [4097, 10 * 1024 * 1024])  # just over; far over (refused unread)
def test_body_over_max_body_bytes_is_413_and_nothing_is_stored(start_listener, size):
    listener = start_listener(server={"max_body_bytes": 4096})
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
    body = padded_event(size)
    conn.putrequest("POST", listener.path)
    for name, value in {**signed_headers(body), "Content-Length": str(size)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    try:
        conn.send(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before reading 10 MiB: that is the point
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    assert nothing_stored(listener)
    listener.wait_for_log(r"status=413")


@pytest.mark.parametrize("size, expected", [(4096, 200), (4097, 413)])
def test_chunked_bodies_obey_the_same_limit(start_listener, size, expected):
    listener = start_listener(server={"max_body_bytes": 4096})
    body = padded_event(size)
    headers = signed_headers(body)
    headers["Transfer-Encoding"] = "chunked"
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]
    conn.request("POST", listener.path, body=iter(chunks), headers=headers, encode_chunked=True)
    assert conn.getresponse().status == expected
    conn.close()
    assert count(listener) == (1 if expected == 200 else 0)


# --- 400: authentic but not a JSON object -----------------------------------


@pytest.mark.parametrize("body", [
    b"[1, 2, 3]", b'"a string"', b"null", b"{not json", b"", b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000,
], ids=["array", "string", "null", "broken", "empty", "not-utf8", "deeply-nested"])
def test_authentic_body_that_is_not_a_json_object_is_400(listener, body):
    status, answer = listener.send(body)
    assert status == 400 and answer["ok"] is False
    assert nothing_stored(listener)
    assert "Traceback" not in listener.log()


def test_unauthenticated_junk_is_401_not_400(listener):
    """The signature is checked before the body is even parsed."""
    assert listener.post(b"[1, 2", {"x-noyo-signature": "ab", "x-noyo-timestamp": noyo_timestamp()})[0] == 401


# --- other routes ------------------------------------------------------------


def test_healthz_is_200_when_the_database_is_writable_and_the_worker_runs(listener):
    assert listener.get("/healthz") == (200, {"ok": True})


def test_unknown_path_is_404_and_wrong_method_is_405(listener):
    assert listener.get("/nope")[0] == 404
    assert listener.get(listener.path)[0] == 405
    assert listener.post(b"", {}, method="PUT")[0] == 405
    listener.wait_for_log(r"method=GET path=/noyo/webhooks status=405")


# --- what the log may say ----------------------------------------------------


def test_log_never_carries_a_secret_or_a_payload(start_listener):
    listener = start_listener(webhook={"secrets": f"primary:{SECRET}, second:{OTHER_SECRET}"})
    marker = "PII-MARKER-JANE-DOE-1970"
    listener.send(event_body(member_name=marker))
    listener.send(event_body(member_name=marker), secret="wrong")
    listener.send(b'["' + marker.encode() + b'"]')
    listener.post(event_body(member_name=marker), {"x-noyo-signature": hmac_hex(SECRET, b"x")})
    assert listener.stop() == 0
    log = listener.log()
    assert "status=200" in log and "status=401" in log and "status=400" in log
    for forbidden in (SECRET, OTHER_SECRET, marker):
        assert forbidden not in log
    assert "Traceback" not in log
