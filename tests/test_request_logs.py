"""Log lines a request can influence: one line per record whatever the
request holds, no field it did not earn, the client's address behind a proxy,
and a journal rate limit that does not drop warnings in a burst."""

from __future__ import annotations

import json
import logging
import re
import socket

import pytest
from hypothesis import example, given, strategies as st

import noyo_listener
from conftest import ROOT, SECRET, event_body, signed_headers

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
