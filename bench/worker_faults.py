#!/usr/bin/env python3
"""Worker behaviour under an API outage and under same-object bursts.

Runs the real listener (a subprocess) against the fake Noyo API from tests/
and prints one line per figure:

- requests/min the API sees while it answers 503 to everything, under a
  steady stream of new events (the baseline in the same run: what the same
  events would cost without the global backoff = events x attempts);
- how long after the API comes back until every event is done;
- fetches per event when each difference gets created/discrepancy/resolved
  in a burst;
- the drain rate of a burst with one object whose GET answers 403, against
  the same burst without it, in the same run (a refused object must cost its
  own event, not everyone's throughput).

    python3 bench/worker_faults.py [--outage 60] [--rate 5] [--only refused]
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
[sync]
interval = 0
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


def still_pending(db: Path) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT COUNT(*) FROM events WHERE status = 'pending'").fetchone()[0]


def refused_object(objects: int, latency: float, rounds: int = 3) -> None:
    """Drain rate of bursts with and without one 403 object, alternated in one run."""
    fake = FakeNoyo().start()
    fake.latency = latency
    with tempfile.TemporaryDirectory() as tmp:
        # Production backoff (1s .. 1h): under the old policy the 403 paused all fetching for an hour.
        proc, port, db = start_listener(Path(tmp), fake, concurrency="4")
        try:
            sender = Sender(port)
            rates: dict[str, list[float]] = {"clean": [], "one_403": []}
            for round_number in range(rounds):
                for case in ("clean", "one_403"):
                    ids = [f"{case}-{round_number}-{n}" for n in range(objects)]
                    for diff_id in ids:
                        fake.put("difference", {"id": diff_id, "modified": 1})
                    if case == "one_403":
                        fake.add_fault(Fault("status", times=10**9, status=403, match=f"/differences/{ids[0]}"))
                    started = time.monotonic()
                    for diff_id in ids:
                        sender.send("difference.created", diff_id, 1)
                    while still_pending(db):
                        time.sleep(0.02)
                        if time.monotonic() - started > 300:
                            raise SystemExit(f"burst {case} did not drain in 300 s; see the log in {tmp}")
                    rates[case].append(objects / (time.monotonic() - started))
            with sqlite3.connect(db) as conn:
                dead = conn.execute("SELECT COUNT(*) FROM events WHERE status = 'dead'").fetchone()[0]
            clean, bad = sorted(rates["clean"])[rounds // 2], sorted(rates["one_403"])[rounds // 2]
            print(f"refused_object burst_objects={objects} api_latency_ms={latency * 1000:g} rounds={rounds} "
                  f"events_per_s_clean={clean:.0f} events_per_s_with_one_403={bad:.0f} ratio={bad / clean:.2f} "
                  f"dead_events={dead} (median of alternated rounds; shared machine)")
        finally:
            proc.terminate()
            proc.wait(15)
            fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the API answers 503")
    parser.add_argument("--rate", type=float, default=5.0, help="new events per second during the outage")
    parser.add_argument("--burst-objects", type=int, default=200)
    parser.add_argument("--only", choices=("burst", "refused", "outage"), help="run one case")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python={platform.python_version()} "
          f"{platform.platform()}")
    if args.only in (None, "burst"):
        burst(args.burst_objects, 0.02)
    if args.only in (None, "refused"):
        refused_object(args.burst_objects, 0.02)
    if args.only in (None, "outage"):
        outage(args.outage, args.rate)


if __name__ == "__main__":
    main()
