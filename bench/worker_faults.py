#!/usr/bin/env python3
"""Worker behaviour under an API outage and under same-object bursts.

Runs the real listener (a subprocess) against the fake Noyo API from tests/
and prints one line per figure:

- requests/min the API sees while it answers 503 to everything, under a
  steady stream of new events (the baseline in the same run: what the same
  events would cost without the global backoff = events x attempts);
- how long after the API comes back until every event is done;
- fetches per event when each difference gets created/discrepancy/resolved
  in a burst.

    python3 bench/worker_faults.py [--outage 60] [--rate 5]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fake_noyo import FakeNoyo, Fault  # noqa: E402

SECRET = "bench-secret"


def start_listener(tmp: Path, fake: FakeNoyo, **worker: str) -> tuple[subprocess.Popen, int, Path]:
    db = tmp / "bench.sqlite3"
    worker_lines = "\n".join(f"{k} = {v}" for k, v in worker.items())
    ini = tmp / "bench.ini"
    ini.write_text(f"""[server]
port = 0
[webhook]
secrets = bench:{SECRET}
[database]
path = {db}
[noyo_api]
client_id = {fake.client_id}
client_secret = {fake.client_secret}
token_url = {fake.url}/auth/public/token
tracking_url = {fake.url}
fulfillment_url = {fake.url}
timeout = 2s
[worker]
{worker_lines}
[log]
level = WARNING
""")
    log = tmp / "bench.log"
    proc = subprocess.Popen([sys.executable, str(ROOT / "noyo_listener.py"), "--config", str(ini), "serve"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    # WARNING level hides the start-up line: find the port from the lock-free way, /proc.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        port = _listening_port(proc.pid)
        if port:
            return proc, port, db
        time.sleep(0.05)
    raise SystemExit("listener did not start:\n" + log.read_text())


def _listening_port(pid: int) -> int | None:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for line in open("/proc/net/tcp").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                return int(fields[1].split(":")[1], 16)
    except OSError:
        return None
    return None


class Sender:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def send(self, event_type: str, data_id: str, created: int) -> None:
        body = json.dumps({"data": {"id": data_id}, "event": {
            "id": str(uuid.uuid4()), "created": created, "type": event_type}}).encode()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        sig = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        self.conn.request("POST", "/noyo/webhooks", body=body, headers={
            "Content-Type": "application/json", "x-noyo-signature": sig, "x-noyo-timestamp": ts})
        response = self.conn.getresponse()
        response.read()
        assert response.status == 200, response.status


def pending(db: Path) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT COUNT(*) FROM events WHERE status != 'done'").fetchone()[0]


def outage(seconds: float, rate: float) -> None:
    fake = FakeNoyo().start()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, db = start_listener(Path(tmp), fake)  # production defaults: 1s .. 1h, concurrency 4
        try:
            sender = Sender(port)
            fake.add_fault(Fault("status", times=10**9, status=503))
            started, sent = time.monotonic(), 0
            while time.monotonic() - started < seconds:
                diff_id = str(uuid.uuid4())
                fake.put("difference", {"id": diff_id, "modified": 1})
                sender.send("difference.created", diff_id, int(time.time()))
                sent += 1
                time.sleep(1 / rate)  # a steady stream, not synchronisation
            during = len(fake.object_requests())
            fake.faults.clear()
            back = time.monotonic()
            while pending(db):
                time.sleep(0.1)
                if time.monotonic() - back > 3700:
                    raise SystemExit("events did not drain")
            drain = time.monotonic() - back
            print(f"outage_seconds={seconds:g} events_sent={sent} event_rate={rate:g}/s")
            print(f"api_requests_during_outage={during} requests_per_minute={during / seconds * 60:.1f}")
            print(f"baseline_without_global_backoff>={sent}x attempts (one request per event at least) "
                  f"ratio={during / sent:.3f} requests per event")
            print(f"drain_seconds_after_recovery={drain:.1f} (at most the probe interval reached, <= 60s)")
        finally:
            proc.terminate()
            proc.wait(15)
            fake.stop()


def burst(objects: int, latency: float) -> None:
    fake = FakeNoyo().start()
    fake.latency = latency
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, db = start_listener(Path(tmp), fake, concurrency="4")
        try:
            sender = Sender(port)
            ids = [str(uuid.uuid4()) for _ in range(objects)]
            for diff_id in ids:
                fake.put("difference", {"id": diff_id, "modified": 3, "resolved": 3, "discrepancy_time": 2})
            started = time.monotonic()
            for diff_id in ids:
                for created, kind in enumerate(("created", "discrepancy", "resolved"), start=1):
                    sender.send(f"difference.{kind}", diff_id, created)
            while pending(db):
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            fetches = len(fake.object_requests())
            events = objects * 3
            print(f"burst_objects={objects} events={events} api_latency_ms={latency * 1000:g} "
                  f"fetches={fetches} fetches_per_event={fetches / events:.2f} seconds={elapsed:.1f}")
        finally:
            proc.terminate()
            proc.wait(15)
            fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the API answers 503")
    parser.add_argument("--rate", type=float, default=5.0, help="new events per second during the outage")
    parser.add_argument("--burst-objects", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python={platform.python_version()} "
          f"{platform.platform()}")
    burst(args.burst_objects, 0.02)
    outage(args.outage, args.rate)


if __name__ == "__main__":
    main()
