"""A fake Noyo REST API: a real HTTP server on 127.0.0.1 with programmable faults.

It serves the token endpoint, the five object endpoints the listener
fetches and their paged lists (``GET /api/v1/<collection>?page_size=&offset=``,
Noyo's shape and its page_size limits of 5..100), records every request, and can be told to fail in the ways the real
API might: N x 500, 429 with Retry-After, expired tokens, 404 for a while,
slow answers, dropped connections, invalid JSON, or no server at all.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import threading
import time
import urllib.parse
import uuid
from typing import Any

TOKEN_PATH = "/auth/public/token"
COLLECTIONS = {
    "differences": "difference",
    "member_snapshots": "member_snapshot",
    "groups": "group",
    "group_connections": "group_connection_request",
    "group_disconnection_requests": "group_disconnection_request",
}


@dataclasses.dataclass
class Fault:
    """Answer the next ``times`` requests whose path contains ``match`` with ``action``."""

    action: str  # "status", "drop", "invalid_json", "slow", "wrong_id", "not_object"
    times: int = 1
    match: str = "/api/"
    status: int = 500
    retry_after: str | None = None
    delay: float = 0.0


@dataclasses.dataclass
class Recorded:
    at: float
    method: str
    path: str
    authorization: str | None
    status: int


class FakeNoyo:
    """Start with ``start()``; point [noyo_api] token_url/tracking_url/fulfillment_url at ``url``."""

    def __init__(self, client_id: str = "test-client", client_secret: str = "test-client-secret") -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.objects: dict[tuple[str, str], dict] = {}
        self.faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self.arrivals: list[str] = []
        self.valid_tokens: set[str] = set()
        self.token_expires_in: Any = 600
        self.wrap_objects = False
        self.latency = 0.0
        self.list_latency = 0.0  # seconds each list page takes
        self.list_gate = threading.Event()  # cleared by hold_lists(): list pages wait until release_lists()
        self.list_gate.set()
        self.token_delay = 0.0  # seconds the token endpoint takes to answer (a hanging token endpoint)
        self.token_arrivals: list[float] = []  # when each token request arrived (before any delay)
        self.gate = threading.Event()  # cleared by hold(): object GETs wait until release()
        self.gate.set()
        self.lock = threading.Lock()
        self.request_seen = threading.Condition(self.lock)
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = 0

    # Control

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeNoyo":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _QuietServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering: connections are refused until ``start()`` again (same port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def put(self, kind: str, obj: dict) -> dict:
        with self.lock:
            self.objects[(kind, obj["id"])] = obj
        return obj

    def remove(self, kind: str, object_id: str) -> None:
        with self.lock:
            self.objects.pop((kind, object_id), None)

    def add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def hold(self) -> None:
        """Keep object GETs in flight (they wait) until ``release()``."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def hold_lists(self) -> None:
        """Keep list requests in flight (they wait) until ``release_lists()``."""
        self.list_gate.clear()

    def release_lists(self) -> None:
        self.list_gate.set()

    def list_requests(self, collection: str = "differences") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(f"/api/v1/{collection}?")]

    def expire_tokens(self) -> None:
        with self.lock:
            self.valid_tokens.clear()

    def object_requests(self, path_part: str = "/api/") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if path_part in r.path]

    def token_requests(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path == TOKEN_PATH]

    def wait_for_requests(self, count: int, path_part: str = "/api/", timeout: float = 10.0) -> list[Recorded]:
        """Block until at least ``count`` matching requests were recorded."""
        deadline = time.monotonic() + timeout
        with self.request_seen:
            while True:
                seen = [r for r in self.requests if path_part in r.path]
                if len(seen) >= count:
                    return seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} requests to {path_part}, saw {len(seen)}")
                self.request_seen.wait(remaining)

    # Serving

    def _take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match in path:
                    fault.times -= 1
                    return fault
        return None

    def _record_arrival(self, handler: "_Handler") -> None:
        with self.request_seen:
            self.arrivals.append(handler.path)
            self.request_seen.notify_all()

    def wait_for_arrivals(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` object GETs have arrived (answered or not)."""
        with self.request_seen:
            if not self.request_seen.wait_for(lambda: len(self.arrivals) >= count, timeout):
                raise AssertionError(f"expected {count} GETs to arrive, saw {len(self.arrivals)}")

    def _record(self, handler: "_Handler", status: int) -> None:
        with self.request_seen:
            self.requests.append(Recorded(time.time(), handler.command, handler.path,
                                          handler.headers.get("Authorization"), status))
            self.request_seen.notify_all()


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a slow or trickling answer is the point of the fault


class _Handler(http.server.BaseHTTPRequestHandler):
    fake: FakeNoyo
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes | dict, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.fake._record(self, status)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != TOKEN_PATH:
            return self._send(404, {"error": "not found"})
        with self.fake.lock:
            self.fake.token_arrivals.append(time.time())
        if self.fake.token_delay:
            time.sleep(self.fake.token_delay)  # a slow token endpoint, not synchronisation
        fault = self.fake._take_fault(self.path)
        if fault is not None:
            return self._apply(fault, {})
        expected = "Basic " + base64.b64encode(f"{self.fake.client_id}:{self.fake.client_secret}".encode()).decode()
        try:
            grant = json.loads(body).get("grant_type")
        except ValueError:
            grant = None
        if self.headers.get("Authorization") != expected or grant != "client_credentials":
            return self._send(401, {"error": "invalid_client"})
        token = uuid.uuid4().hex
        with self.fake.lock:
            self.fake.valid_tokens.add(token)
        self._send(200, {"access_token": token, "expires_in": self.fake.token_expires_in, "token_type": "Bearer"})

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["api", "v1"] and parts[2] in COLLECTIONS:
            return self._list(COLLECTIONS[parts[2]])
        if len(parts) != 4 or parts[:2] != ["api", "v1"] or parts[2] not in COLLECTIONS:
            return self._send(404, {"error": "no such endpoint"})
        kind, object_id = COLLECTIONS[parts[2]], parts[3]
        self.fake._record_arrival(self)
        self.fake.gate.wait(60)
        if self.fake.latency:
            time.sleep(self.fake.latency)  # simulated network latency, not synchronisation
        fault = self.fake._take_fault(self.path)
        auth = self.headers.get("Authorization", "")
        with self.fake.lock:
            token_ok = auth.startswith("Bearer ") and auth[7:] in self.fake.valid_tokens
            obj = self.fake.objects.get((kind, object_id))
        if fault is not None:
            return self._apply(fault, obj or {"id": object_id})
        if not token_ok:
            return self._send(401, {"error": "invalid token"})
        if obj is None:
            return self._send(404, {"error": "not found"})
        self._send(200, {"response": obj} if self.fake.wrap_objects else obj)

    def _list(self, kind: str) -> None:
        """One page of a Noyo list: items under ``response``, the total under ``meta``."""
        self.fake.list_gate.wait(60)
        if self.fake.list_latency:
            time.sleep(self.fake.list_latency)  # simulated network latency, not synchronisation
        fault = self.fake._take_fault(self.path)
        if fault is not None:
            return self._apply(fault, {"meta": {}, "response": []})
        auth = self.headers.get("Authorization", "")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        with self.fake.lock:
            token_ok = auth.startswith("Bearer ") and auth[7:] in self.fake.valid_tokens
            items = [obj for (k, _), obj in self.fake.objects.items() if k == kind]
        if not token_ok:
            return self._send(401, {"error": "invalid token"})
        try:
            page_size = int(query.get("page_size", ["20"])[0])
            offset = int(query.get("offset", ["0"])[0])
        except ValueError:
            return self._send(400, {"error": "page_size and offset must be integers"})
        if not 5 <= page_size <= 100 or offset < 0:
            return self._send(400, {"error": "page_size must be between 5 and 100"})
        self._send(200, {"meta": {"offset": offset, "page_size": page_size, "total_records": len(items)},
                         "response": items[offset:offset + page_size]})

    def _apply(self, fault: Fault, obj: dict) -> None:
        if fault.action == "drop":
            self.fake._record(self, 0)
            self.close_connection = True
            return
        if fault.action == "trickle":
            # Headers one byte at a time: every read is quick, the answer never completes.
            try:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 10:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(fault.delay)
            except OSError:
                pass
            self.fake._record(self, 0)
            self.close_connection = True
            return
        if fault.action == "slow":
            time.sleep(fault.delay)  # longer than the client's timeout
            return self._send(200, obj)
        if fault.action == "invalid_json":
            return self._send(200, b"<html>bad gateway</html>")
        if fault.action == "wrong_id":
            return self._send(200, {**obj, "id": "someone-else"})
        if fault.action == "not_object":
            return self._send(200, [obj])
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
        self._send(fault.status, {"error": "injected"}, headers)
