"""GET /metrics over real HTTP, parsed with prometheus_client's own parser.

Counters are compared before and after a known sequence of requests (the
listener is a subprocess: its counters are read only through the endpoint),
gauges against the listener's real SQLite file, fetch counts against what
the fake Noyo API recorded.
"""

from __future__ import annotations

import ast
import http.client
import json
import socket
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODULE, ROOT, api_sections, event_body, noyo_timestamp, run_cli, signed_headers, wait_until
from fake_noyo import Fault
from test_worker import difference

sys.path.insert(0, str(ROOT))
import noyo_listener  # noqa: E402  (only for its constants and pure functions)

SPEC_METRICS = {  # SPEC.md, Metrics: name -> type
    "noyo_listener_requests_total": "counter",
    "noyo_listener_rejected_total": "counter",
    "noyo_listener_events_received_total": "counter",
    "noyo_listener_ack_seconds": "histogram",
    "noyo_listener_events": "gauge",
    "noyo_listener_oldest_pending_seconds": "gauge",
    "noyo_listener_fetches_total": "counter",
    "noyo_listener_api_state": "gauge",
    "noyo_listener_sync_new_objects_total": "counter",
    "noyo_listener_last_sync_timestamp_seconds": "gauge",
    "noyo_listener_build_info": "gauge",
}


class Scrape:
    """One parsed answer of GET /metrics."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            # The parser names a counter family without its _total suffix.
            self.types[family.name + ("_total" if family.type == "counter" else "")] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for labels in self.series(name)}


def scrape(listener) -> Scrape:
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
    try:
        conn.request("GET", "/metrics")  # no credentials: the endpoint needs none
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, body
    assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(body.decode("utf-8"))


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are (broken framing included); the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        answer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            pass
    return answer.split(b"\r\n", 1)[0].split(b" ", 1)[-1]  # "431 Request Header..." (waitress may say HTTP/1.0)


def db_counts(listener) -> dict[str, int]:
    with listener.db() as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status").fetchall())


# --- The format ---------------------------------------------------------------


def test_every_spec_metric_is_there_with_its_type_and_the_text_parses(listener):
    result = scrape(listener)
    for name, kind in SPEC_METRICS.items():
        assert result.types.get(name) == kind, f"{name}: {result.types.get(name)}"
    assert result.value("noyo_listener_build_info", version=noyo_listener.__version__,
                        python="%d.%d.%d" % sys.version_info[:3]) == 1
    # Counters start at 0 for every reason and known kind, so rate() works from the first scrape.
    assert result.labels("noyo_listener_rejected_total", "reason") == set(noyo_listener.REJECT_REASONS)
    assert {"difference", "member_snapshot", "test", "other"} <= result.labels(
        "noyo_listener_events_received_total", "kind")
    # Fetching is off in this listener.
    assert result.value("noyo_listener_api_state", state="fetching_off") == 1
    assert sum(result.series("noyo_listener_api_state").values()) == 1


def test_scrapes_are_neither_logged_at_info_nor_counted_as_requests(start_listener, make_ini, tmp_path):
    quiet = start_listener()
    first = scrape(quiet)
    for _ in range(3):
        scrape(quiet)
    assert sum(scrape(quiet).series("noyo_listener_requests_total").values()) == \
        sum(first.series("noyo_listener_requests_total").values()) == 0
    assert "path=/metrics" not in quiet.log()
    # At DEBUG the scrape is logged (so the INFO check above can see a line if there were one).
    verbose = start_listener(ini=make_ini("verbose.ini", log={"level": "DEBUG"},
                                          database={"path": tmp_path / "verbose.sqlite3"}))
    scrape(verbose)
    verbose.wait_for_log(r"DEBUG request method=GET path=/metrics status=200 ms=\S+ check=metrics")


def test_metrics_is_reserved_and_cannot_be_the_webhook_path(make_ini):
    result = run_cli("--config", str(make_ini(server={"path": "/metrics"})), "check-config")
    assert result.returncode == 1
    assert "[server] path: /metrics is reserved for Prometheus" in result.stderr


# --- Counters -------------------------------------------------------------------


def test_counters_move_by_exactly_what_a_known_sequence_of_requests_adds(start_listener):
    listener = start_listener(server={"max_body_bytes": 4096})
    before = scrape(listener)

    duplicated = event_body("difference.created")
    accepted = [duplicated, duplicated, event_body("difference.resolved"),
                event_body("member_snapshot.status_change"), event_body("test.hello_world")]
    for body in accepted:
        assert listener.send(body)[0] == 200

    def post(body: bytes, headers: dict) -> int:
        return listener.post(body, headers)[0]

    body = event_body()
    rejections = {
        "no_signature": post(body, {k: v for k, v in signed_headers(body).items() if k != "x-noyo-signature"}),
        "no_matching_signature": post(body, signed_headers(body, secret="wrong")),
        "no_timestamp": post(body, {k: v for k, v in signed_headers(body, form="body").items()
                                    if k != "x-noyo-timestamp"}),
        "bad_timestamp": post(body, signed_headers(body, timestamp="yesterday-ish")),
        "timestamp_too_old": post(body, signed_headers(body, timestamp=noyo_timestamp(-5 * 86400))),
        "timestamp_in_future": post(body, signed_headers(body, timestamp=noyo_timestamp(3600))),
        "body_is_not_UTF-8_JSON": post(b"\xff{", signed_headers(b"\xff{")),
        "body_is_not_a_JSON_object": post(b"[1]", signed_headers(b"[1]")),
        "body_too_large": post(b"x" * 5000, signed_headers(b"x" * 5000)),
    }
    assert rejections == {"no_signature": 401, "no_matching_signature": 401, "no_timestamp": 401,
                          "bad_timestamp": 401, "timestamp_too_old": 401, "timestamp_in_future": 401,
                          "body_is_not_UTF-8_JSON": 400, "body_is_not_a_JSON_object": 400, "body_too_large": 413}
    # Refused by waitress before the app sees them.
    path = listener.path.encode()
    assert raw_request(listener.port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nzz\r\n").startswith(b"400 ")
    assert raw_request(listener.port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000
                       + b"\r\n\r\n").startswith(b"431 ")
    huge = 10 * 1024 * 1024
    assert raw_request(listener.port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                       + str(huge).encode() + b"\r\n\r\n" + b"x" * 1024).startswith(b"413 ")
    waitress_reasons = {"bad_request": 1, "request_header_fields_too_large": 1, "request_entity_too_large": 1}
    assert listener.get("/no-such-path")[0] == 404
    assert listener.get(listener.path)[0] == 405
    listener.wait_for_log(r"status=413 reason=request_entity_too_large")  # waitress logs once it answered

    after = scrape(listener)
    assert {code: delta(before, after, "noyo_listener_requests_total", code=code)
            for code in ("200", "400", "401", "404", "405", "413", "431", "503")} == {
        "200": 5, "400": 3, "401": 6, "404": 1, "405": 1, "413": 2, "431": 1, "503": 0}
    expected_reasons = {**dict.fromkeys(rejections, 1), **waitress_reasons}
    assert {reason: delta(before, after, "noyo_listener_rejected_total", reason=reason)
            for reason in (*noyo_listener.REJECT_REASONS, "other")} == {
        reason: expected_reasons.get(reason, 0) for reason in (*noyo_listener.REJECT_REASONS, "other")}
    received = {labels: value - before.series("noyo_listener_events_received_total").get(labels, 0)
                for labels, value in after.series("noyo_listener_events_received_total").items()}
    assert {tuple(sorted(labels)): n for labels, n in received.items() if n} == {
        (("duplicate", "false"), ("kind", "difference")): 2,
        (("duplicate", "true"), ("kind", "difference")): 1,
        (("duplicate", "false"), ("kind", "member_snapshot")): 1,
        (("duplicate", "false"), ("kind", "test")): 1,
    }

    # The histogram counts the 200s, and only them; its buckets are cumulative.
    assert delta(before, after, "noyo_listener_ack_seconds_count") == 5
    assert delta(before, after, "noyo_listener_ack_seconds_sum") > 0
    buckets = sorted(((float(dict(labels)["le"]), value) for labels, value in
                      after.series("noyo_listener_ack_seconds_bucket").items()))
    assert buckets[-1] == (float("inf"), after.value("noyo_listener_ack_seconds_count"))
    assert [value for _, value in buckets] == sorted(value for _, value in buckets)
    assert len(buckets) == len(noyo_listener.ACK_BUCKETS) + 1


def test_every_reason_the_code_rejects_with_has_its_own_label():
    """A new 401/400/413 reason must be added to REJECT_REASONS, or it is counted as "other"."""
    tree = ast.parse(Path(MODULE).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_reject" and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant):
            found.add(node.args[1].value)
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                getattr(node.exc.func, "id", None) == "BadEvent" and isinstance(node.exc.args[0], ast.Constant):
            found.add(node.exc.args[0].value.replace(" ", "_"))  # _reject(400, str(exc).replace(" ", "_"))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("check_"):  # check_timestamp & co
            found.update(ret.value.value for ret in ast.walk(node)
                         if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Constant)
                         and isinstance(ret.value.value, str))
    import waitress.utilities
    for error in (waitress.utilities.BadRequest, waitress.utilities.RequestEntityTooLarge,
                  waitress.utilities.RequestHeaderFieldsTooLarge):
        found.add("_".join(error.reason.lower().split()))
    assert len(found) >= 12
    assert found - set(noyo_listener.REJECT_REASONS) == set()


def test_label_values_stay_bounded_whatever_kinds_senders_invent(start_listener):
    listener = start_listener(fetch={"custom_kind": "{fulfillment_url}/api/v1/custom/{id}"})
    before = scrape(listener)
    invented = [f"kind{uuid.uuid4().hex}.created" for _ in range(60)] + \
        ['evil"kind\n{x="1"}.created', "", ".", "no-dot-at-all", "Difference.created", "x" * 500]
    for event_type in invented:
        assert listener.send(event_body(event_type))[0] == 200
    assert listener.send(event_body("custom_kind.created"))[0] == 200  # a [fetch] key is a known kind
    after = scrape(listener)
    assert set(after.samples) == set(before.samples)  # not one new series
    assert delta(before, after, "noyo_listener_events_received_total", kind="other", duplicate="false") == \
        len(invented)
    assert delta(before, after, "noyo_listener_events_received_total", kind="custom_kind", duplicate="false") == 1


# --- Fetches and the API state --------------------------------------------------


def test_fetches_are_counted_by_kind_and_outcome_as_the_api_answered(start_listener, fake_noyo):
    fake_noyo.put("difference", {"id": "present", "modified": 1})
    fake_noyo.put("difference", {"id": "flaky", "modified": 1})
    fake_noyo.put("member_snapshot", {"id": "snap", "modified": 1})
    fake_noyo.add_fault(Fault("status", times=1, match="/differences/flaky", status=500))
    listener = start_listener(**api_sections(fake_noyo, max_attempts=2))
    before = scrape(listener)
    for event_type, data_id in [("difference.created", "present"), ("difference.created", "flaky"),
                                ("difference.created", "missing"), ("member_snapshot.status_change", "snap")]:
        assert listener.send(event_body(event_type, data_id=data_id))[0] == 200
    wait_until(lambda: db_counts(listener).get("pending", 0) == 0 and sum(db_counts(listener).values()) == 4,
               timeout=30, message="every event done or dead")
    assert db_counts(listener) == {"done": 3, "dead": 1}

    after = scrape(listener)
    fetches = {tuple(sorted(labels)): value - before.series("noyo_listener_fetches_total").get(labels, 0)
               for labels, value in after.series("noyo_listener_fetches_total").items()}
    assert {key: n for key, n in fetches.items() if n} == {
        (("kind", "difference"), ("outcome", "ok")): 2,
        (("kind", "difference"), ("outcome", "transient")): 1,
        (("kind", "difference"), ("outcome", "not_found")): 2,  # max_attempts = 2, then dead
        (("kind", "member_snapshot"), ("outcome", "ok")): 1,
    }
    by_status: dict[int, int] = {}
    for request in fake_noyo.object_requests():
        by_status[request.status] = by_status.get(request.status, 0) + 1
    assert by_status == {200: 3, 500: 1, 404: 2}  # the same GETs, seen from the API's side
    assert after.value("noyo_listener_api_state", state="healthy") == 1
    assert sum(after.series("noyo_listener_api_state").values()) == 1


def test_api_state_shows_refused_credentials(start_listener, fake_noyo):
    sections = api_sections(fake_noyo)
    sections["noyo_api"]["client_secret"] = "not-the-secret"
    listener = start_listener(**sections)
    assert listener.send(event_body("difference.created"))[0] == 200
    result = wait_until(lambda: (lambda s: s if s.value("noyo_listener_api_state", state="auth_failed") else None)(
        scrape(listener)), timeout=20, message="api_state auth_failed")
    assert {dict(labels)["state"]: value for labels, value in result.series("noyo_listener_api_state").items()} == {
        "healthy": 0, "backing_off": 0, "auth_failed": 1, "fetching_off": 0}
    # The token endpoint refused the credentials (the outcome is the failure's kind).
    assert result.value("noyo_listener_fetches_total", kind="difference", outcome="credentials") >= 1


# --- Gauges from the database ---------------------------------------------------


def test_event_gauges_equal_the_database(start_listener, fake_noyo):
    for object_id in ("done-one", "requeued"):
        fake_noyo.put("difference", {"id": object_id, "modified": 1})
    listener = start_listener(**api_sections(fake_noyo))
    assert listener.send(event_body("difference.created", data_id="done-one"))[0] == 200
    assert listener.send(event_body("difference.created", data_id="requeued", event_id="requeued-event"))[0] == 200
    wait_until(lambda: db_counts(listener).get("done") == 2, timeout=20, message="the first events done")
    fake_noyo.hold()  # the next GETs wait: their events stay pending
    try:
        # Back to pending, with its first arrival: the oldest pending event by far.
        assert run_cli("--config", str(listener.ini), "requeue", "requeued-event").returncode == 0
        for event_type in ("difference.created", "difference.discrepancy"):
            assert listener.send(event_body(event_type))[0] == 200
        assert listener.send(event_body("test.hello_world"))[0] == 200                  # ignored
        assert listener.send(event_body("some_new_kind.created"))[0] == 200             # ignored
        body = json.dumps({"data": {}, "event": {"id": "no-data-id", "type": "group.created"}}).encode()
        assert listener.send(body)[0] == 200                                             # dead at arrival
        expected = {"done": 1, "pending": 3, "ignored": 2, "dead": 1}
        assert db_counts(listener) == expected

        def gauges():
            before = time.time()
            result = scrape(listener)
            after = time.time()
            found = {dict(labels)["status"]: value for labels, value in result.series("noyo_listener_events").items()}
            return (found, result, before, after) if found == expected else None

        _, result, before, after = wait_until(gauges, timeout=20, message=f"events gauges == {expected}")
        with listener.db() as conn:
            oldest = conn.execute("SELECT MIN(received_at) FROM events WHERE status = 'pending'").fetchone()[0]
            first = conn.execute("SELECT received_at FROM events WHERE event_id = 'requeued-event'").fetchone()[0]
        assert oldest == first
        received = noyo_listener.parse_utc_iso(oldest)
        age = result.value("noyo_listener_oldest_pending_seconds")
        assert before - received - 0.001 <= age <= after - received + 0.001
    finally:
        fake_noyo.release()
    wait_until(lambda: db_counts(listener).get("pending", 0) == 0, timeout=40, message="the held events done")
    # The pending gauges follow within seconds (the scan for the other statuses runs less often).
    wait_until(lambda: (lambda result: result.value("noyo_listener_oldest_pending_seconds") == 0
                        and result.value("noyo_listener_events", status="pending") == 0)(scrape(listener)),
               timeout=20, message="pending gauges back to 0 once none is pending")


def test_gauges_are_read_without_the_writer_and_503s_are_counted(listener):
    """With the database's write lock held elsewhere the writer cannot commit
    (an event gets 503); a scrape still reads the gauges (WAL readers do not
    wait for writers)."""
    for _ in range(3):
        assert listener.send(event_body("difference.created"))[0] == 200
    blocker = sqlite3.connect(listener.db().execute("PRAGMA database_list").fetchone()[2],
                              isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        result = scrape(listener)  # the first scrape of this process: its first reading, taken now
        assert {dict(labels)["status"]: value for labels, value in
                result.series("noyo_listener_events").items()} == {"pending": 3, "done": 0, "ignored": 0, "dead": 0}
        assert listener.send(event_body("difference.created"))[0] == 503  # busy_timeout is 1s in tests
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    after = scrape(listener)
    assert after.value("noyo_listener_requests_total", code="503") == 1
    assert after.value("noyo_listener_requests_total", code="200") == 3
    assert after.value("noyo_listener_ack_seconds_count") == 3  # 200s only


def test_sync_metrics_follow_real_passes_and_the_syncs_table(start_listener, fake_noyo):
    """serve's pass at start counts what it found; the last-sync gauge comes
    from ``syncs`` (only `done` passes), so it also shows a `sync` run by
    another process and survives a restart, while counters start again at 0."""
    for n in range(7):
        fake_noyo.put("difference", difference(f"d-{n}"))
    sections = api_sections(fake_noyo)
    sections["sync"] = {"page_size": 5, "rate": 1000, "interval": "1h"}
    listener = start_listener(**sections)

    def done_passes() -> list:
        with listener.db() as conn:
            return conn.execute("SELECT finished_at FROM syncs WHERE status = 'done' ORDER BY id").fetchall()

    first = wait_until(done_passes, timeout=20, message="serve's first pass")[0][0]
    listener.wait_for_log(r"sync pass done kind=difference")  # logged once the registry was told
    result = wait_until(lambda: (lambda r: r if r.value("noyo_listener_last_sync_timestamp_seconds",
                                                           kind="difference") else None)(scrape(listener)),
                        timeout=20, message="the last sync gauge")
    assert result.value("noyo_listener_sync_new_objects_total", kind="difference") == 7
    assert result.value("noyo_listener_last_sync_timestamp_seconds", kind="difference") == \
        noyo_listener.parse_utc_iso(first)

    # A failed pass that finished later does not count as the last sync.
    with listener.db() as conn:
        conn.execute("INSERT INTO syncs (kind, started_at, finished_at, status, pages, seen, new, updated, "
                     "unchanged, skipped, error) VALUES ('difference', ?, ?, 'failed', 0, 0, 0, 0, 0, 0, 'test')",
                     ("2099-01-01T00:00:00.000Z", "2099-01-01T00:00:01.000Z"))
    # `sync` in another process: serve's counter stays, its gauge follows the table.
    assert run_cli("--config", str(listener.ini), "sync", timeout=60).returncode == 0
    second = done_passes()[-1][0]
    assert second > first
    result = wait_until(lambda: (lambda r: r if r.value("noyo_listener_last_sync_timestamp_seconds",
                                                           kind="difference") != noyo_listener.parse_utc_iso(first)
                                 else None)(scrape(listener)), timeout=20, message="the gauge after `sync`")
    assert result.value("noyo_listener_last_sync_timestamp_seconds", kind="difference") == \
        noyo_listener.parse_utc_iso(second)
    assert result.value("noyo_listener_sync_new_objects_total", kind="difference") == 7

    assert listener.stop() == 0
    listener.start()  # the last pass is fresh: no pass at this start
    listener.wait_for_log(r"sync pass not due kind=difference")
    result = wait_until(lambda: (lambda r: r if r.value("noyo_listener_last_sync_timestamp_seconds",
                                                           kind="difference") else None)(scrape(listener)),
                        timeout=20, message="the last sync gauge after a restart")
    assert result.value("noyo_listener_last_sync_timestamp_seconds", kind="difference") == \
        noyo_listener.parse_utc_iso(second)
    assert result.value("noyo_listener_sync_new_objects_total", kind="difference") == 0  # since this process started


# --- The registry's interface for reconciliation (in process) -------------------


def test_sync_finished_moves_the_sync_metrics_and_list_kinds_start_at_zero():
    metrics = noyo_listener.Metrics()
    metrics.configure(noyo_listener.DEFAULT_FETCH, ["difference", "group"])
    start = Scrape(metrics.exposition().decode())
    assert start.series("noyo_listener_sync_new_objects_total") == {
        frozenset({("kind", "difference")}): 0, frozenset({("kind", "group")}): 0}
    assert start.value("noyo_listener_last_sync_timestamp_seconds", kind="group") == 0
    metrics.sync_finished("difference", 7, finished_at=1_800_000_000.5)
    metrics.sync_finished("difference", 0, finished_at=1_800_000_100.0)
    metrics.sync_finished("somebody's kind", 2, finished_at=1_800_000_200.0)
    result = Scrape(metrics.exposition().decode())
    assert result.value("noyo_listener_sync_new_objects_total", kind="difference") == 7
    assert result.value("noyo_listener_last_sync_timestamp_seconds", kind="difference") == 1_800_000_100.0
    assert result.value("noyo_listener_sync_new_objects_total", kind="other") == 2
    assert result.value("noyo_listener_sync_new_objects_total", kind="group") == 0


@pytest.mark.parametrize("seconds", [0.0, 0.0005, 0.0007, 3.0, 99.0])
def test_histogram_buckets_count_each_observation_in_every_bucket_at_or_above_it(seconds):
    metrics = noyo_listener.Metrics()
    metrics.acknowledged("difference.created", False, seconds)
    result = Scrape(metrics.exposition().decode())
    for labels, value in result.series("noyo_listener_ack_seconds_bucket").items():
        assert value == (1 if seconds <= float(dict(labels)["le"]) else 0), dict(labels)
    assert result.value("noyo_listener_ack_seconds_sum") == seconds
