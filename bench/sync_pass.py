#!/usr/bin/env python3
"""Reconciliation: how fast a pass applies a large list, and what it costs intake.

Against the fake Noyo API from tests/ (a real HTTP server on loopback) holding
``--objects`` differences, every list request taking ``--latency``:

1. one `sync` pass with the rate limit lifted: objects applied per second and
   list requests made, against the ideal (pages x latency), in one line;
2. `serve`'s acknowledgement rate under a steady closed-loop load, without a
   pass and while a `sync` pass writes into the same database, alternated in
   rounds in the same run (the machine is shared: read the ratio, not the
   absolute figures).

    python3 bench/sync_pass.py [--objects 20000] [--latency 0.02] [--rounds 3]
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
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fake_noyo import FakeNoyo  # noqa: E402

SECRET = "bench-secret"
SUMMARY = re.compile(r"sync kind=difference pages=(\d+) seen=(\d+) new=(\d+) updated=(\d+) unchanged=(\d+) "
                     r"skipped=(\d+) seconds=([\d.]+)")


def write_ini(tmp: Path, fake: FakeNoyo) -> Path:
    ini = tmp / "bench.ini"
    ini.write_text(f"""[server]
port = 0
[webhook]
secrets = bench:{SECRET}
[database]
path = {tmp / 'bench.sqlite3'}
[noyo_api]
client_id = {fake.client_id}
client_secret = {fake.client_secret}
token_url = {fake.url}/auth/public/token
tracking_url = {fake.url}
fulfillment_url = {fake.url}
timeout = 10s
[sync]
# the rate limit lifted: the pass goes as fast as the API answers
rate = 100000
page_size = 100
interval = 0
[log]
level = WARNING
""")
    return ini


def put_differences(fake: FakeNoyo, count: int, modified: int) -> None:
    with fake.lock:
        for n in range(count):
            diff_id = f"bench-{n:06d}"
            fake.objects[("difference", diff_id)] = {
                "id": diff_id, "version": modified, "modified": modified, "created": 1, "resolved": None,
                "discrepancy_time": modified if n % 2 else None, "group_id": f"g-{n % 50}", "carrier_id": "c",
                "employee_id": f"e-{n}", "difference_type": "missing", "difference_classification": "enrollment",
                "fields": [{"name": "plan", "value": "x" * 40}], "sources": []}


def run_sync(ini: Path) -> tuple[dict, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "noyo_listener.py"), "--config", str(ini), "sync"],
                            capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - started
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or not match:
        raise SystemExit(f"sync failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    keys = ("pages", "seen", "new", "updated", "unchanged", "skipped")
    counts = dict(zip(keys, map(int, match.groups()[:6])))
    counts["seconds"] = float(match.group(7))
    return counts, elapsed


def start_serve(ini: Path) -> tuple[subprocess.Popen, int]:
    log = open(ini.with_suffix(".log"), "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "noyo_listener.py"), "--config", str(ini), "serve"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    sys.path.insert(0, str(ROOT / "bench"))
    from worker_faults import _listening_port  # noqa: E402 - the same /proc lookup
    while time.monotonic() < deadline:
        port = _listening_port(proc.pid)
        if port:
            return proc, port
        time.sleep(0.05)
    raise SystemExit("serve did not start; see " + str(ini.with_suffix(".log")))


class Load:
    """Closed-loop senders over keep-alive connections; counts 200s and anything else."""

    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.connections = connections
        self.ok = 0
        self.other = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _sender(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            body = json.dumps({"data": {"id": str(uuid.uuid4())}, "event": {
                "id": str(uuid.uuid4()), "created": int(time.time()), "type": "member_snapshot.status_change"}}).encode()
            ts = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
            sig = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            conn.request("POST", "/noyo/webhooks", body=body, headers={
                "Content-Type": "application/json", "x-noyo-signature": sig, "x-noyo-timestamp": ts})
            response = conn.getresponse()
            response.read()
            with self.lock:
                if response.status == 200:
                    self.ok += 1
                else:
                    self.other += 1

    def measure(self, during: "callable[[], None] | float") -> tuple[float, int, float]:
        """acks/s while ``during`` runs (a callable) or for ``during`` seconds."""
        self.ok = self.other = 0
        self.stop.clear()
        threads = [threading.Thread(target=self._sender, daemon=True) for _ in range(self.connections)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        if callable(during):
            during()
        else:
            time.sleep(during)  # a fixed measuring window, not synchronisation
        elapsed = time.monotonic() - started
        ok, other = self.ok, self.other
        self.stop.set()
        for thread in threads:
            thread.join(30)
        return ok / elapsed, other, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=20000)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per list request")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the ack comparison")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python={platform.python_version()} "
          f"{platform.platform()} (shared with other work: compare ratios)")
    fake = FakeNoyo().start()
    fake.list_latency = args.latency
    with tempfile.TemporaryDirectory() as tmp:
        ini = write_ini(Path(tmp), fake)
        put_differences(fake, args.objects, modified=1)
        counts, wall = run_sync(ini)
        requests = len(fake.list_requests())
        ideal = counts["pages"] * args.latency
        print(f"sync_pass objects={counts['seen']} new={counts['new']} pages={counts['pages']} requests={requests} "
              f"seconds={counts['seconds']:.1f} objects_per_s={counts['seen'] / counts['seconds']:.0f} "
              f"ideal_seconds={ideal:.1f} (pages x {args.latency * 1000:g} ms) "
              f"ratio_to_ideal={counts['seconds'] / ideal:.2f} process_seconds={wall:.1f}")

        proc, port = start_serve(ini)
        try:
            load = Load(port, args.connections)
            load.measure(2.0)  # warm-up
            rows = []
            for round_number in range(args.rounds):
                put_differences(fake, args.objects, modified=10 + round_number)  # every item an update
                with_pass: dict = {}

                def sync_now() -> None:
                    with_pass["counts"], _ = run_sync(ini)

                rate_with, other_with, seconds_with = load.measure(sync_now)
                rate_without, other_without, _ = load.measure(seconds_with)
                rows.append((rate_without, rate_with, other_without + other_with, with_pass["counts"]))
                print(f"round={round_number + 1} acks_per_s_without_pass={rate_without:.0f} "
                      f"acks_per_s_during_pass={rate_with:.0f} ratio={rate_with / rate_without:.2f} "
                      f"non_200={other_without + other_with} pass_updated={with_pass['counts']['updated']} "
                      f"pass_seconds={with_pass['counts']['seconds']:.1f}")
            ratios = sorted(r[1] / r[0] for r in rows)
            print(f"ack_rate_during_pass_vs_without median_ratio={ratios[len(ratios) // 2]:.2f} "
                  f"non_200_total={sum(r[2] for r in rows)} connections={args.connections}")
        finally:
            proc.terminate()
            proc.wait(15)
            fake.stop()


if __name__ == "__main__":
    main()
