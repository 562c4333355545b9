"""SIGTERM while a request is still arriving: it is finished and answered
within the grace; nothing new is accepted; the exit is clean."""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

from conftest import event_body, signed_headers, wait_until


def server_read_everything(port: int, connections: int) -> bool:
    """True once ``connections`` established sockets of the server on ``port``
    have nothing left unread in the kernel (read from /proc/net/tcp)."""
    unread = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            unread.append(int(fields[4].split(":")[1], 16))
    return len(unread) >= connections and not any(unread)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_body_still_arriving_at_sigterm_is_finished_answered_and_stored(start_listener):
    listener = start_listener()
    body = event_body(event_id="half-received")
    head = f"POST {listener.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in signed_headers(body).items()) + "\r\n"
    half = len(body) // 2

    sender = socket.create_connection(("127.0.0.1", listener.port), timeout=30)
    idle = socket.create_connection(("127.0.0.1", listener.port), timeout=30)  # a kept-alive connection
    try:
        sender.sendall(head.encode() + body[:half])
        wait_until(lambda: server_read_everything(listener.port, connections=2),
                   message="the headers and half the body read by the server")
        listener.proc.terminate()
        listener.wait_for_log(r"stop requested; finishing requests in flight")

        # Nothing new is accepted, and the idle connection is closed unserved...
        wait_until(lambda: refused(listener.port), message="the listening socket closed")
        assert idle.recv(1) == b""
        # ...but the request already begun is read to its end and answered.
        sender.sendall(body[half:])
        response = http.client.HTTPResponse(sender)
        response.begin()
        assert (response.status, response.read()) == (200, b'{"ok": true}')
    finally:
        sender.close()
        idle.close()

    assert listener.proc.wait(15) == 0
    assert "Traceback" not in listener.log()
    with listener.db() as conn:
        assert conn.execute("SELECT status FROM events WHERE event_id = 'half-received'").fetchone()[0] == "pending"


def test_a_request_that_stalls_past_the_grace_does_not_hold_the_stop(start_listener):
    listener = start_listener()
    body = event_body()
    head = f"POST {listener.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in signed_headers(body).items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sender:
        sender.sendall(head.encode() + body[:10])  # and never the rest
        wait_until(lambda: server_read_everything(listener.port, connections=1), message="the request read")
        listener.proc.terminate()
        assert listener.proc.wait(20) == 0  # the grace is 5 s; systemd's TimeoutStopSec is 20 s
        assert sender.recv(1) == b""  # closed unanswered: Noyo retries it
    listener.wait_for_log(r"stopping with requests still arriving count=1")
    with listener.db() as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


def test_the_watchdog_self_check_does_not_cry_wolf_during_the_grace(start_listener, tmp_path):
    from test_lifecycle import NotifySocket
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        # A watchdog tick every 0.1 s: a self-check during the grace would find the port closed.
        listener = start_listener(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"})
        notify.wait_for("WATCHDOG=1")
        body = event_body()
        head = f"POST {listener.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in signed_headers(body).items()) + "\r\n"
        with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sender:
            sender.sendall(head.encode() + body[:10])
            wait_until(lambda: server_read_everything(listener.port, connections=1), message="the request read")
            listener.proc.terminate()
            stopping = notify.wait_for("STOPPING=1")  # at the start of the grace, not after it
            time.sleep(1.0)  # a window of ten watchdog ticks inside the grace, observed, not waited for
            assert notify.count("WATCHDOG=1", since=stopping) == 0
            sender.sendall(body[10:])
            response = http.client.HTTPResponse(sender)
            response.begin()
            assert response.status == 200
        assert listener.proc.wait(15) == 0
        assert "withholding the systemd watchdog ping" not in listener.log()
    finally:
        notify.close()
