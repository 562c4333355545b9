"""Log lines a request can influence: one line per record whatever the
request holds, no field it did not earn, the client's address behind a proxy,
and a journal rate limit that does not drop warnings in a burst."""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import socket
import threading

import pytest
from hypothesis import example, given, strategies as st

import noyo_listener
from conftest import ROOT, SECRET, event_body, signed_headers, wait_until

JOURNAL = {"JOURNAL_STREAM": "8:12345"}  # lines start with a syslog priority, as under systemd
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]\S*)')


def fields(line: str) -> dict[str, str]:
    """The key=value fields of a log line, quoted values decoded."""
    found = {}
    for key, value in FIELD.findall(line):
        assert key not in found, f"field {key} twice in {line!r}"
        found[key] = json.loads(value) if value.startswith('"') else value
    return found


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def request_lines(listener) -> list[str]:
    lines = listener.log().splitlines()
    assert all(re.match(r"<[0-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line) for line in lines), lines
    return [line for line in lines if " request " in line]


# --- escaping ------------------------------------------------------------------------------


def test_a_hostile_path_cannot_forge_a_line_or_a_field(start_listener):
    listener = start_listener(env=JOURNAL)
    forged = "<3>ERROR request method=POST path=/noyo/webhooks status=200 event_id=forged"
    path = "/x%0A" + forged.replace(" ", "%20") + "%0D%0A%1B[31m"
    answer = raw_request(listener.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404")

    listener.wait_for_log(r"status=404")
    lines = request_lines(listener)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("<6>INFO request ")
    got = fields(line)
    assert set(got) == {"method", "path", "status", "ms", "reason", "remote"}, got
    assert got["status"] == "404" and got["path"] == "/x\n" + forged + "\r\n\x1b[31m"
    assert "\x1b" not in listener.log()


def test_hostile_headers_cannot_add_fields_to_a_refusal(start_listener):
    listener = start_listener(env=JOURNAL)
    body = event_body()
    headers = signed_headers(body, secret="wrong", trace='a status=200 event_id=forged "quoted" \\ end')
    assert listener.post(body, headers)[0] == 401
    line = listener.wait_for_log(r"(?m)^.*status=401.*$").group(0)
    got = fields(line)
    assert set(got) == {"method", "path", "status", "ms", "reason", "trace", "remote"}, got
    assert got["status"] == "401" and got["trace"] == 'a status=200 event_id=forged "quoted" \\ end'


def test_event_id_and_type_from_an_authentic_body_are_escaped(start_listener):
    listener = start_listener(env=JOURNAL)
    body = json.dumps({"data": {"id": "d 1"}, "event": {
        "id": "e1\n<3>ERROR forged=1", "type": "difference.created status=500\r\u2028x", "created": 1}}).encode()
    assert listener.post(body, signed_headers(body))[0] == 200
    listener.wait_for_log(r"status=200")
    (line,) = request_lines(listener)
    got = fields(line)
    assert got["event_id"] == "e1\n<3>ERROR forged=1"
    assert got["type"] == "difference.created status=500\r\u2028x"
    assert got["status"] == "200" and "forged" not in got


@given(st.text(max_size=40))
@example("\x7f")
@example("a=b")
@example("")
@example("\u2028")
def test_log_value_is_one_field_that_decodes_back(value):
    text = noyo_listener.log_value(value)
    assert text.isprintable() and text.isascii() and text
    assert FIELD.fullmatch(f"k={text}")
    assert (json.loads(text) if text.startswith('"') else text) == value


def test_the_formatter_keeps_a_record_on_one_line_whatever_a_library_logs():
    record = logging.LogRecord("waitress", logging.WARNING, __file__, 1, "bad header %s", ("x\n<3>ERROR y",), None)
    for journal in (True, False):
        line = noyo_listener._LineFormatter(journal=journal).format(record)
        assert "\n" not in line and line.endswith(r"bad header x\x0a<3>ERROR y")


# --- the client's address behind a proxy ------------------------------------------------


@pytest.mark.parametrize("trusted_proxy, forwarded_for, remote", [
    ("127.0.0.1", "203.0.113.7", "203.0.113.7"),
    ("127.0.0.1", "198.51.100.66, 203.0.113.7", "203.0.113.7"),  # the hop the proxy added, not what the client wrote
    ("127.0.0.1", "203.0.113.7 status=200", '"203.0.113.7 status=200"'),
    ("127.0.0.2", "203.0.113.7", "127.0.0.1"),  # the peer is not the proxy: the header is ignored
    ("", "203.0.113.7", "127.0.0.1"),  # default: no proxy trusted
])
def test_remote_comes_from_the_trusted_proxys_forwarded_for(start_listener, trusted_proxy, forwarded_for, remote):
    listener = start_listener(server={"trusted_proxy": trusted_proxy})
    body = event_body()
    assert listener.post(body, {**signed_headers(body), "X-Forwarded-For": forwarded_for})[0] == 200
    line = listener.wait_for_log(r"(?m)^.*request method=POST.*status=200.*$").group(0)
    assert line.endswith(f" remote={remote}"), line


def test_trusted_proxy_must_be_an_address(make_ini):
    from conftest import run_cli
    result = run_cli("--config", str(make_ini(server={"trusted_proxy": "nginx.local"})), "check-config")
    assert result.returncode == 1
    assert "[server] trusted_proxy: must be the IP address the proxy connects from" in result.stderr


# --- the journal's rate limit -------------------------------------------------------------------


def test_the_unit_lets_a_burst_of_request_lines_through_the_journal():
    unit = (ROOT / "systemd" / "noyo-listener.service").read_text()
    interval = re.search(r"(?m)^LogRateLimitIntervalSec=(\d+)s$", unit)
    burst = re.search(r"(?m)^LogRateLimitBurst=(\d+)$", unit)
    assert interval and burst, "set LogRateLimitIntervalSec= and LogRateLimitBurst= in the unit"
    # One line per request; the listener acknowledges about 3.5k requests/s on
    # one core (bench/README.md). Leave room for warnings on top of a peak.
    lines_per_second = int(burst.group(1)) / int(interval.group(1))
    assert lines_per_second >= 3 * 3500, lines_per_second


# --- coalesced writes ----------------------------------------------------------------------------


class Published(io.StringIO):
    """A stream whose readers see only what was flushed, as the journal does."""

    def __init__(self) -> None:
        super().__init__()
        self.published = ""
        self.flushes = 0

    def flush(self) -> None:
        self.published = self.getvalue()
        self.flushes += 1


def coalescing(interval: float) -> tuple[logging.Logger, Published]:
    stream = Published()
    handler = noyo_listener._CoalescingStreamHandler(stream, interval)
    handler.setFormatter(noyo_listener._LineFormatter(journal=True))
    log = logging.Logger("coalescing-test")  # not registered: the real ones are untouched
    log.addHandler(handler)
    return log, stream


def test_info_lines_wait_together_and_a_warning_writes_them_all_in_order():
    log, stream = coalescing(interval=3600)
    log.info("one")  # nothing written for an interval: at once
    log.info("two")
    log.info("three")
    assert stream.published == "<6>INFO one\n" and stream.flushes == 1
    log.warning("four")
    assert stream.published == "<6>INFO one\n<6>INFO two\n<6>INFO three\n<4>WARNING four\n"
    assert stream.flushes == 2


def test_lines_left_waiting_are_written_by_the_flusher_within_the_interval():
    log, stream = coalescing(interval=0.05)
    for number in range(50):
        log.info("line %d", number)
    wait_until(lambda: stream.published.count("\n") == 50, timeout=5, message="the flusher")
    assert stream.flushes < 50


class FailsOnce(Published):
    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    def flush(self) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, "No space left on device")
        super().flush()


def test_the_flusher_outlives_a_write_that_fails():
    stream = FailsOnce()
    handler = noyo_listener._CoalescingStreamHandler(stream, 0.05)
    handler.setFormatter(noyo_listener._LineFormatter(journal=True))
    log = logging.Logger("coalescing-test")
    log.addHandler(handler)
    log.info("one")
    stream.fail_next = True
    log.info("two")  # waits; the flusher's write of it fails
    wait_until(lambda: not stream.fail_next, timeout=5, message="the failing flush")
    log.info("three")  # waits too: the flusher must still be there to write it
    wait_until(lambda: "three" in stream.published, timeout=5, message="a line after the failure")


def test_a_flush_from_outside_between_lines_is_harmless():
    log, stream = coalescing(interval=3600)
    errors = []
    log.handlers[0].handleError = lambda record: errors.append(record)  # type: ignore[method-assign]
    log.info("one")
    log.info("two")
    noyo_listener.flush_logs()  # what main() and logging.shutdown do
    log.handlers[0].flush()
    log.info("three")
    log.handlers[0].flush()
    log.info("four")
    log.warning("five")
    assert errors == []
    assert [line.split()[-1] for line in stream.published.splitlines()] == ["one", "two", "three", "four", "five"]


STDERR_ORDER = """
import logging, sys, warnings
sys.path.insert(0, sys.argv[1])
import noyo_listener
noyo_listener.configure_logging(coalesce=True)
log = logging.getLogger("noyo_listener")
log.info("first")
log.info("second, waiting in the buffer")
try:
    raise RuntimeError("a bug")
except RuntimeError:
    import traceback
    traceback.print_exc()  # what bottle and threading do with an uncaught error: straight to stderr
warnings.warn("a warning")
print("noyo-listener: error: one line", file=sys.stderr)
log.info("third")
"""


def test_what_goes_straight_to_stderr_comes_after_the_lines_logged_before_it(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "stderr.txt"
    with open(out, "wb") as stderr:
        subprocess.run([sys.executable, "-c", STDERR_ORDER, str(ROOT)], stderr=stderr, timeout=30, check=True)
    text = out.read_text()
    order = [text.index(marker) for marker in
             ("INFO first", "INFO second", "Traceback", "RuntimeError: a bug", "UserWarning: a warning",
              "noyo-listener: error: one line", "INFO third")]
    assert order == sorted(order), text


def test_the_direct_line_is_the_line_a_log_record_gives(monkeypatch):
    stream = Published()
    handler = noyo_listener._CoalescingStreamHandler(stream, 3600)
    handler.setFormatter(noyo_listener._LineFormatter(journal=True))
    monkeypatch.setattr(noyo_listener, "_line_handler", handler)
    monkeypatch.setattr(noyo_listener.logger, "handlers", [handler])
    monkeypatch.setattr(noyo_listener.logger, "propagate", False)
    monkeypatch.setattr(noyo_listener.logger, "level", logging.INFO)
    noyo_listener.logger.manager._clear_cache()
    noyo_listener.log_line(logging.INFO, "request status=200 x=\u2028")
    noyo_listener.logger.info("request status=200 x=\u2028")
    noyo_listener.log_line(logging.DEBUG, "not at INFO")
    noyo_listener.logger.warning("flush")
    assert stream.published.splitlines() == ["<6>INFO request status=200 x=\\u2028"] * 2 + ["<4>WARNING flush"]


def post_concurrently(listener, bodies: list[bytes], connections: int = 8) -> list[int]:
    """POST each body, signed, over ``connections`` keep-alive connections at once."""
    statuses: list[int] = []
    lock = threading.Lock()
    chunks = [bodies[n::connections] for n in range(connections)]

    def send(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=30)
        try:
            for body in chunk:
                conn.request("POST", listener.path, body=body, headers=signed_headers(body))
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses.append(response.status)
        finally:
            conn.close()
    threads = [threading.Thread(target=send, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def acknowledged_ids(listener) -> list[str]:
    return [fields(line)["event_id"] for line in request_lines(listener) if "status=200" in line]


def test_a_burst_is_logged_in_full_while_serving_and_a_refusal_comes_after_it(start_listener):
    listener = start_listener(env=JOURNAL)
    bodies = [event_body() for _ in range(150)]  # ~40 KB of lines: less than the buffer holds
    assert post_concurrently(listener, bodies) == [200] * 150
    # At once, while the last lines of the burst may still wait in the buffer:
    assert listener.post(b"{}", signed_headers(b"{}", secret="wrong"))[0] == 401
    sent = {json.loads(body)["event"]["id"] for body in bodies}
    wait_until(lambda: set(acknowledged_ids(listener)) == sent, timeout=5, message="every line of the burst")
    listener.wait_for_log(r"status=401")
    assert "status=401" in request_lines(listener)[-1]


def test_sigterm_right_after_a_burst_leaves_no_line_unwritten(start_listener):
    listener = start_listener(env=JOURNAL)
    bodies = [event_body() for _ in range(150)]
    assert post_concurrently(listener, bodies) == [200] * 150
    assert listener.stop() == 0
    assert sorted(acknowledged_ids(listener)) == sorted(json.loads(body)["event"]["id"] for body in bodies)
    assert listener.log().splitlines()[-1] == "<6>INFO stopped"  # logged a moment before the exit
