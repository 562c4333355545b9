"""Service promises that only show in a failure: the answers a stop leaves in
waitress's buffers are still sent, /healthz reports a stopped worker, and the
watchdog self-check goes through the HTTP server (a wedged server stops the
WATCHDOG=1 pings)."""

from __future__ import annotations

import re
import resource
import socket
import threading
import time
from wsgiref.util import setup_testing_defaults

import noyo_listener
from conftest import event_body, wait_until
from test_lifecycle import NotifySocket


# --- answers left in the buffers at shutdown -----------------------------------------


REFUSED = (b"POST /noyo/webhooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 2\r\nx-noyo-signature: 00\r\n\r\n{}")


class SlowReader:
    """A client connection that sends requests and reads nothing, with a small
    window and small segments so the kernel buffers on both sides stay small
    (on loopback the server's send buffer would otherwise grow to megabytes)."""

    def __init__(self, listener) -> None:
        self.listener = listener
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        self.sock.connect(("127.0.0.1", listener.port))
        self.local_port = self.sock.getsockname()[1]
        self.baseline = answered(listener)
        self.sent = 0

    def send(self, count: int) -> None:
        threading.Thread(target=self.sock.sendall, args=(REFUSED * count,), daemon=True).start()
        self.sent += count

    def queues(self) -> tuple[int, int]:
        """(bytes the kernel holds for the client, bytes the server has not read)."""
        server_tx = server_rx = client_rx = 0
        with open("/proc/net/tcp") as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                local, remote = (int(x.split(":")[1], 16) for x in fields[1:3])
                tx, rx = (int(x, 16) for x in fields[4].split(":"))
                if (local, remote) == (self.listener.port, self.local_port):
                    server_tx, server_rx = tx, rx
                elif (local, remote) == (self.local_port, self.listener.port):
                    client_rx = rx
        return server_tx + client_rx, server_rx

    def settle(self, timeout: float = 30.0) -> tuple[int, int, int]:
        """(answered, bytes in the kernel, unread by the server) once they stay
        the same over three samples 50 ms apart."""
        deadline = time.monotonic() + timeout
        last, same = None, 0
        while same < 3:
            if time.monotonic() > deadline:
                raise AssertionError(f"the connection did not settle within {timeout}s: {last}")
            time.sleep(0.05)  # the sampling interval of a stability check, bounded by the deadline
            state = (answered(self.listener) - self.baseline, *self.queues())
            same = same + 1 if state == last else 0
            last = state
        return last


def answered(listener) -> int:
    return listener.log().count("status=401 ")


def test_answers_still_in_the_buffers_at_a_stop_are_sent(start_listener):
    """A client that reads slowly leaves an answer partly in waitress's buffer
    once the kernel's are full. At SIGTERM the event loop stops; the service
    must still send what is buffered, or the client loses answers it was owed.

    The test fills the kernel buffers until they hold fewer bytes than the
    server has answered (the rest is in the listener's own buffer), with every
    request read by the server (so it closes cleanly, without a reset). The
    stability waits only decide how often a broken shutdown is caught; a
    correct one passes however they fall."""
    listener = start_listener()
    size = len(b"HTTP/1.1 401 ") + len(exchange_one(listener.port, REFUSED).split(b"HTTP/1.1 401 ", 1)[1])

    probe = SlowReader(listener)  # how much the kernel holds for such a connection
    probe.send(5000)
    capacity = probe.settle()[1]
    probe.sock.close()
    assert capacity < 2_000_000, capacity

    for _attempt in range(5):
        reader = SlowReader(listener)
        reader.send(max(1, int(0.6 * capacity / size)))
        while True:
            done, in_kernel, unread = reader.settle()
            if done < reader.sent or unread:
                capacity = min(capacity, in_kernel)  # overshot (capacities vary): aim lower next time
                break
            if in_kernel < done * size:
                break  # the listener holds the rest of the answers itself
            room = (capacity - in_kernel) // size
            # Halve the distance to the probe's capacity; past it, small steps.
            reader.send(room // 2 if room > 2 else max(1, capacity // size // 50))
        if done == reader.sent and not unread:
            break
        reader.sock.close()
    else:
        raise AssertionError("could not fill the buffers without leaving requests unread")

    listener.proc.terminate()
    listener.wait_for_log(r"stop requested; finishing requests in flight")
    reader.sock.settimeout(20)
    received = b""
    try:
        while True:
            chunk = reader.sock.recv(65536)
            if not chunk:
                break
            received += chunk
    finally:
        reader.sock.close()
    assert listener.proc.wait(15) == 0
    assert received.count(b"HTTP/1.1 401 ") == reader.sent, (reader.sent, received.count(b"HTTP/1.1 401 "))
    assert len(received) == reader.sent * size


def exchange_one(port: int, raw: bytes) -> bytes:
    """One request on its own connection; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _length(data: bytes) -> int:
    match = re.search(rb"(?i)content-length: (\d+)", data)
    return int(match.group(1)) if match else 0


# --- /healthz and a stopped worker ------------------------------------------------------


def healthz(app) -> tuple[str, bytes]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], body


def test_healthz_is_503_when_the_worker_has_stopped(make_ini):
    """In-process, on the real Service: a worker thread that ended (a bug, a
    crash) must make /healthz answer 503, so the watchdog restarts the service."""
    settings = noyo_listener.load_settings(str(make_ini()))
    service = noyo_listener.Service(settings)
    service.open()
    try:
        service.worker.start()
        assert healthz(service.receiver.app)[0].startswith("200")
        service.worker.stop()
        # Probes share one verdict for a short while: wait for a fresh one.
        status, body = wait_until(lambda: (lambda answer: answer if answer[0].startswith("503") else None)(
            healthz(service.receiver.app)), 15, "a 503 from /healthz")
        assert b"worker" in body
    finally:
        service.server.close()
        service.store.close()
        service.lock.release()


# --- the watchdog self-check goes through HTTP ----------------------------------------------


def test_a_wedged_http_server_stops_the_watchdog_pings(start_listener, tmp_path):
    """With every connection slot taken, the HTTP server accepts nothing new:
    the service cannot answer Noyo, so the self-check (a real GET /healthz)
    fails and WATCHDOG=1 stops, though the database and worker are fine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    assert hard == resource.RLIM_INFINITY or hard >= 1200, f"this test needs 1200 open files, the hard limit is {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted, hard))
    notify = NotifySocket(tmp_path / "notify.sock")
    idle: list[socket.socket] = []
    try:
        listener = start_listener(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
        ready = notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", after=ready)
        for _ in range(1000):  # waitress's connection_limit
            idle.append(socket.create_connection(("127.0.0.1", listener.port)))
        listener.wait_for_log(r"no longer accepting new connections")
        listener.wait_for_log(r"withholding the systemd watchdog ping problems=.*health check request failed",
                              timeout=20)
        for sock in idle:
            sock.close()
        idle.clear()
        notify.wait_for("WATCHDOG=1", after=time.monotonic(), timeout=20)
        assert listener.send(event_body())[0] == 200
    finally:
        for sock in idle:
            sock.close()
        notify.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
