"""Closed-loop HTTP load over K keep-alive connections, one selectors loop.

Every request is a unique, correctly signed Noyo event (own event.id, ISO
timestamp, HMAC per request), built before the clock starts so that signing
does not slow the client. wrk cannot sign per request; this can.

    python3 bench/loadgen.py --port 8080 --connections 16 --seconds 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import selectors
import socket
import time
import uuid

SECRET = "bench-secret"
PATH = "/noyo/webhooks"
TYPES = ["difference.created", "difference.discrepancy", "difference.resolved", "member_snapshot.status_change"]


def build_requests(count: int, secret: str = SECRET, path: str = PATH, data_ids: int = 0) -> list[bytes]:
    """``count`` distinct signed requests; ``data_ids`` > 0 spreads them over that many objects."""
    timestamp = dt.datetime.now(dt.timezone.utc).isoformat()
    key = secret.encode()
    created = int(time.time())
    requests = []
    for n in range(count):
        data_id = str(uuid.UUID(int=n % data_ids)) if data_ids else str(uuid.uuid4())
        body = json.dumps({"data": {"id": data_id}, "event": {
            "id": str(uuid.uuid4()), "created": created, "type": TYPES[n % len(TYPES)]}}).encode()
        signature = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        requests.append(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nx-noyo-signature: {signature}\r\nx-noyo-timestamp: {timestamp}\r\n"
            f"x-cloud-trace-context: {n:032x}/1;o=1\r\n\r\n".encode() + body)
    return requests


class _Conn:
    __slots__ = ("sock", "inbuf", "started", "index")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.started = 0.0
        self.index = -1  # which of the requests is in flight


def _complete(buffer: bytes) -> int:
    """Length of the first complete response in ``buffer`` (0 if incomplete)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buffer[:end + 2].lower()  # keep the last header's CRLF
    at = head.find(b"content-length:")
    length = int(head[at + 15:head.find(b"\r\n", at)]) if at >= 0 else 0
    total = end + 4 + length
    return total if len(buffer) >= total else 0


def run(port: int, requests: list[bytes], connections: int, seconds: float, host: str = "127.0.0.1",
        acked: list | None = None, answer_all: bool = False) -> dict:
    """Drive the server at full speed for ``seconds``; return counts and latency percentiles.

    With ``acked``, every 200 appends ``(index into requests, time.perf_counter())``
    to it (bench/litestream.py: which acknowledged events a restore lacks).
    Out of requests, the clock stops at the next answer; with ``answer_all``
    it stops at the last one (bench/run.py's burst: time to acknowledge all).
    """
    selector = selectors.DefaultSelector()
    conns = []
    for _ in range(connections):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        conns.append(conn)
        selector.register(sock, selectors.EVENT_READ, conn)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    next_request = 0
    in_flight = 0
    clock = time.perf_counter

    def send(conn: _Conn) -> bool:
        nonlocal next_request, in_flight
        if next_request >= len(requests):
            return False
        in_flight += 1
        data = requests[next_request]
        conn.index = next_request
        next_request += 1
        conn.started = clock()
        conn.sock.setblocking(True)  # small requests: one blocking send is cheapest
        conn.sock.sendall(data)
        conn.sock.setblocking(False)
        return True

    started = clock()
    deadline = started + seconds
    for conn in conns:
        send(conn)
    while conns:
        now = clock()
        if now >= deadline:
            break
        for key, _ in selector.select(timeout=deadline - now):
            conn = key.data
            try:
                chunk = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                errors += 1
                selector.unregister(conn.sock)
                conn.sock.close()
                conns.remove(conn)
                continue
            conn.inbuf += chunk
            size = _complete(conn.inbuf)
            if size:
                in_flight -= 1
                latencies.append(clock() - conn.started)
                status = int(conn.inbuf[9:12])
                statuses[status] = statuses.get(status, 0) + 1
                if acked is not None and status == 200:
                    acked.append((conn.index, clock()))
                conn.inbuf = conn.inbuf[size:]
                if not send(conn) and not (answer_all and in_flight):
                    deadline = clock()  # out of pre-built requests: stop the clock here
    elapsed = clock() - started
    for conn in conns:
        conn.sock.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000 if latencies else float("nan")

    ok = statuses.get(200, 0)
    return {"rps": ok / elapsed, "ok": ok, "non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300),
            "errors": errors, "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "seconds": elapsed,
            "exhausted": next_request >= len(requests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--requests", type=int, default=150_000)
    parser.add_argument("--data-ids", type=int, default=0, help="spread events over this many objects (0: unique)")
    args = parser.parse_args()
    requests = build_requests(args.requests, data_ids=args.data_ids)
    print(json.dumps(run(args.port, requests, args.connections, args.seconds)))


if __name__ == "__main__":
    main()
