"""Hostile HTTP against the real server: fuzzed requests over raw sockets, slow
and idle clients. Invariants: no 500, no traceback, the server stays up, and
nothing unauthenticated reaches the database."""

from __future__ import annotations

import http.client
import json
import socket
import string
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import SECRET, Listener, base_sections, event_body, hmac_hex, ini_text, noyo_timestamp, signed_headers

PATH = "/noyo/webhooks"
FUZZ_EXAMPLES = 600


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    sections = base_sections(tmp)
    sections["server"]["max_body_bytes"] = 65536
    ini = tmp / "noyo_listener.ini"
    ini.write_text(ini_text(sections))
    listener = Listener(ini).start()
    listener.signed_payloads: set[str] = set()
    listener.examples = 0
    listener.authentic = 0  # well-framed, signed with the secret, timestamp inside the window
    listener.authentic_stored = 0
    yield listener
    listener.kill()


def exchange(port: int, raw: bytes, timeout: float = 30.0) -> list[int]:
    """Send raw bytes, half-close, and return the status codes of every answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer (413) and close before reading everything
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")
            and len(line.split()) > 1 and line.split()[1].isdigit()]


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


bodies = st.one_of(
    st.builds(lambda eid, t: event_body(t, event_id=eid), st.text(max_size=30), st.sampled_from(
        ["difference.created", "test.hello_world", "group.created", "x.y", ""])),
    st.binary(max_size=2000),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5)),
    st.builds(lambda eid, t, did, created: json.dumps(
        {"data": {"id": did}, "event": {"id": eid, "type": t, "created": created}}).encode(),
              st.text(max_size=40), st.text(max_size=40), st.one_of(st.text(max_size=20), st.integers(), st.none()),
              st.one_of(st.integers(), st.floats(), st.text(max_size=10), st.booleans(), st.none())),
    st.integers(1, 50_000).map(nested),
    st.sampled_from([b"\xff\xfe\x00{", b"\xc3\x28", b"[]", b"null", b'"x"', b"{}", b"x" * 70_000]),
)
# Lists repeat the well-formed choice so that a good share of cases reach the storing path too.
signatures = st.sampled_from(["valid", "valid", "valid", "valid", "valid-upper", "valid-among-junk", "other-body", "random-hex", "junk",
                              "empty", "commas", "absent", "huge"])
timestamps = st.sampled_from(["now", "now", "now", "now", "old", "future", "garbage", "absent", "non-latin"])
lengths = st.sampled_from(["correct", "correct", "correct", "correct", "absent", "shorter", "longer", "negative", "garbage", "chunked", "bad-chunked"])
methods = st.one_of(st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
                    st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=8))
paths = st.sampled_from([PATH] * 6 + [PATH + "/", PATH + "?x=1", "/", "/healthz", "//noyo/webhooks", "/noyo/%2e%2e/webhooks",
                         "/" + "a" * 5000])
extra_headers = st.lists(st.tuples(st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=20),
                                   st.text(alphabet=string.printable.strip(), max_size=50)), max_size=4)


def build_request(method, path, body, signature, timestamp, length, extra) -> tuple[bytes, bool]:
    """Raw request bytes, and whether its signature was made with the real secret."""
    ts = {"now": noyo_timestamp(), "old": noyo_timestamp(-10 * 86400), "future": noyo_timestamp(3600),
          "garbage": "yesterday", "absent": None, "non-latin": "2024-05-08T21:27:45+00:00\u00e9"}[timestamp]
    ts_bytes = ts.encode("latin-1", "replace") if ts else None
    good = hmac_hex(SECRET, (ts_bytes + b"." if ts_bytes else b"") + body)
    sig = {"valid": good, "valid-upper": good.upper(), "valid-among-junk": f"zz, ,{good},00",
           "other-body": hmac_hex(SECRET, body + b"!"), "random-hex": uuid.uuid4().hex * 2, "junk": "!!@@##",
           "empty": "", "commas": ",,,,", "absent": None, "huge": "ab," * 3000}[signature]
    headers = [("Host", "127.0.0.1"), ("Content-Type", "application/json")]
    if sig is not None:
        headers.append(("x-noyo-signature", sig))
    if ts_bytes is not None:
        headers.append(("x-noyo-timestamp", ts_bytes.decode("latin-1")))
    headers.extend(extra)
    if length == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 700]), body[i:i + 700]) for i in range(0, len(body), 700))
        payload += b"0\r\n\r\n"
    elif length == "bad-chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload = b"zz\r\n" + body
    else:
        value = {"correct": str(len(body)), "absent": None, "shorter": str(max(0, len(body) // 2)),
                 "longer": str(len(body) + 10), "negative": "-5", "garbage": "12abc"}[length]
        if value is not None:
            headers.append(("Content-Length", value))
        payload = body
    head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1", "replace")
    head += b"".join(f"{k}: {v}\r\n".encode("latin-1", "replace") for k, v in headers)
    # "Signed" means what the listener must accept: the secret AND a timestamp
    # inside the window; a valid HMAC over an old timestamp is a replay.
    signed_with_secret = signature in ("valid", "valid-upper", "valid-among-junk") and timestamp == "now"
    return head + b"\r\n" + payload, signed_with_secret


# A quarter of the cases are authentic and well framed (they must be stored),
# so the fuzz also exercises the storing path, not only the refusals.
authentic_events = st.builds(lambda eid, t, did: event_body(t, data_id=did, event_id=eid),
                             st.text(min_size=1, max_size=30).filter(str.strip),
                             st.sampled_from(["difference.created", "test.hello_world", "group.created", "x.y"]),
                             st.text(min_size=1, max_size=20))
authentic = st.fixed_dictionaries({
    "method": st.just("POST"), "path": st.just(PATH), "body": authentic_events, "signature": st.sampled_from(
        ["valid", "valid-upper", "valid-among-junk"]), "timestamp": st.just("now"),
    "length": st.sampled_from(["correct", "chunked"]), "extra": st.just([]), "authentic": st.just(True)})
# As authentic, but signed over a timestamp outside the window: a replay.
stale = st.fixed_dictionaries({
    "method": st.just("POST"), "path": st.just(PATH), "body": authentic_events, "signature": st.just("valid"),
    "timestamp": st.sampled_from(["old", "future"]), "length": st.just("correct"), "extra": st.just([]),
    "authentic": st.just(False)})
hostile_cases = st.fixed_dictionaries({
    "method": methods, "path": paths, "body": bodies, "signature": signatures, "timestamp": timestamps,
    "length": lengths, "extra": extra_headers, "authentic": st.just(False)})


@settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=st.one_of(authentic, stale, hostile_cases, hostile_cases))
def test_fuzzed_requests_never_500_and_never_store_the_unauthenticated(hostile, case):
    case = dict(case)
    authentic_case = case.pop("authentic")
    raw, signed_with_secret = build_request(**case)
    if signed_with_secret:
        hostile.signed_payloads.add(case["body"].decode("utf-8", "replace"))
    statuses = exchange(hostile.port, raw)
    hostile.examples += 1
    # Every complete request gets an answer (only a body shorter than its
    # Content-Length is left waiting until the client hangs up).
    if case["length"] != "longer":
        assert statuses, "no answer"
    # The database is healthy throughout, so even a 503 would be a bug here.
    assert all(s < 500 for s in statuses), statuses
    assert hostile.proc.poll() is None
    if case["timestamp"] in ("old", "future") and case["signature"] == "valid" and statuses[:1] == [200]:
        raise AssertionError("a request signed outside the window was accepted")
    if authentic_case:
        hostile.authentic += 1
        assert statuses[:1] == [200], statuses
        event_id = json.loads(case["body"])["event"]["id"]  # an earlier case may have sent the same id
        with hostile.db() as conn:
            stored = conn.execute("SELECT COUNT(*) FROM events WHERE event_id = ?", (event_id,)).fetchone()[0]
        assert stored == 1, "an acknowledged authentic event is not in the database"
        hostile.authentic_stored += 1


# Leaves include the edges of SQLite's 64-bit INTEGER, where a column write fails.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
              st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30])),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@example(event={"id": "edge-created", "type": "difference.created", "created": 2**63}, data={"id": "d"}, top={})
@given(event=st.dictionaries(st.sampled_from(["id", "type", "created", "extra"]), json_values),
       data=st.dictionaries(st.sampled_from(["id", "message", "replaced_by"]), json_values),
       top=st.dictionaries(st.text(max_size=8), json_values, max_size=3))
def test_any_authentic_json_object_is_stored_never_refused(hostile, event, data, top):
    """Signed and well framed, whatever its content: 200 and on disk (nothing is lost)."""
    body = json.dumps({**top, "event": event, "data": data}).encode()
    hostile.signed_payloads.add(body.decode())
    status, answer = hostile.post(body, signed_headers(body))
    assert status == 200, (status, answer)
    if not answer.get("duplicate"):  # an earlier example may have used the same event.id
        with hostile.db() as conn:
            assert conn.execute("SELECT COUNT(*) FROM events WHERE payload = ?", (body.decode(),)).fetchone()[0] == 1


def test_after_the_fuzz_the_server_is_healthy_and_the_database_clean(hostile):
    assert hostile.examples >= FUZZ_EXAMPLES  # the fuzz test ran first, in this module
    # A meaningful share of the fuzz reached the database, not only the refusals.
    assert hostile.authentic_stored >= FUZZ_EXAMPLES // 8, (hostile.authentic, hostile.authentic_stored)
    assert hostile.get("/healthz")[0] == 200
    log = hostile.log()
    assert "Traceback" not in log and "status=500" not in log
    with hostile.db() as conn:
        stored = [r[0] for r in conn.execute("SELECT payload FROM events")]
        assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] >= len(stored)
    assert set(stored) <= hostile.signed_payloads, "an event reached the database without the secret"
    print(f"\nFAULTS scenario=hostile_http fuzz_cases={hostile.examples} authentic_cases={hostile.authentic} "
          f"stored_authentic={len(stored)} "
          f"status_500=0 tracebacks=0")


# --- slow and idle clients ----------------------------------------------------------


def test_slow_and_idle_clients_do_not_stop_others(start_listener):
    listener = start_listener(server={"threads": 4})
    idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(300)]
    bodiless = socket.create_connection(("127.0.0.1", listener.port))
    bodiless.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode())

    slow_body = event_body(event_id="slow-one")
    slow_raw = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(slow_body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in signed_headers(slow_body).items()) + "\r\n").encode() + slow_body
    slow_status: list[int] = []

    def byte_at_a_time() -> None:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=60) as sock:
            for i in range(len(slow_raw)):
                sock.sendall(slow_raw[i:i + 1])
                time.sleep(0.01)  # a slow client, on purpose
            slow_status.append(int(sock.recv(4096).split()[1]))

    slow = threading.Thread(target=byte_at_a_time)
    slow.start()
    latencies = []
    try:
        for n in range(20):
            started = time.perf_counter()
            # A 10 s client timeout: a server stuck behind the slow clients would take 60 s (channel_timeout).
            conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
            body = event_body(event_id=f"normal-{n}")
            conn.request("POST", PATH, body=body, headers=signed_headers(body))
            assert conn.getresponse().status == 200
            conn.close()
            latencies.append(time.perf_counter() - started)
        assert slow.is_alive(), "the slow client should still be sending while the others were answered"
        slow.join(60)
        assert slow_status == [200]
    finally:
        for sock in idle + [bodiless]:
            sock.close()
    print(f"\nFAULTS scenario=slow_clients idle_connections=300 bodiless=1 byte_at_a_time=1 "
          f"normal_requests=20 max_latency_ms={max(latencies) * 1000:.1f}")
