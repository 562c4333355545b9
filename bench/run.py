#!/usr/bin/env python3
"""noyo-listener benchmark: durable acks against the HTTP ceiling, measured side by side.

Prints one line per figure; the last line is ``ratio=<x> c=16`` (listener
acks/s / ceiling req/s, server pinned to one core, client to the other).
Every figure is compared with a baseline measured in the same run.

    python3 bench/run.py            # full run (~10 min)
    python3 bench/run.py --quick    # under 2 minutes
    python3 bench/run.py --parts scrape   # acks/s with and without a /metrics scraper
    python3 bench/run.py --parts sync     # acks/s with and without serve's own sync pass
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import loadgen  # noqa: E402

SERVER_CPU, CLIENT_CPU = 0, 1
# Servers run under the default scheduler policy, as the systemd unit leaves
# it; --policy batch runs both under SCHED_BATCH (see README: it speeds the
# ceiling up, not the listener).
POLICIES = {"other": [], "batch": ["chrt", "--batch", "0"]}
server_policy = "other"
ALL_CPUS = set(range(os.cpu_count() or 1))


def say(line: str) -> None:
    print(line, flush=True)


def machine() -> str:
    model = "unknown cpu"
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import sqlite3 as sq
    import waitress  # noqa: F401
    from importlib.metadata import version
    return (f"machine cpus={os.cpu_count()} cpu={model!r} python={platform.python_version()} "
            f"sqlite={sq.sqlite_version} waitress={version('waitress')} bottle={version('bottle')} "
            f"kernel={platform.release()}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_ini(tmp: Path, name: str = "bench", **sections: dict) -> Path:
    base = {
        "server": {"host": "127.0.0.1", "port": free_port(), "threads": 16},
        "webhook": {"secrets": f"bench:{loadgen.SECRET}"},
        "database": {"path": tmp / f"{name}.sqlite3", "synchronous": "FULL"},
        "log": {"level": "INFO"},
    }
    for section, keys in sections.items():
        base.setdefault(section, {}).update(keys)
    ini = tmp / f"{name}.ini"
    ini.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {v}" for k, v in keys.items()) for s, keys in base.items()))
    return ini


class Process:
    """A server subprocess, optionally pinned to one CPU, that tells its port."""

    def __init__(self, argv: list[str], port_from: str, cpus: set[int] | None, log: Path) -> None:
        prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
        prefix += POLICIES[server_policy]
        self.log = log
        self.proc = subprocess.Popen(prefix + argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if port_from.startswith("file:"):
                text = Path(port_from[5:]).read_text() if Path(port_from[5:]).exists() else ""
                if text:
                    self.port = int(text)
                    return
            else:
                try:
                    socket.create_connection(("127.0.0.1", int(port_from)), timeout=1).close()
                    self.port = int(port_from)
                    return
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        raise SystemExit("server did not start")

    def rss_peak_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


LISTENER = ROOT / "noyo_listener.py"  # --listener: another copy, for an A/B run of one figure


def listener(ini: Path, cpus: set[int] | None) -> Process:
    port = re.search(r"^port = (\d+)$", ini.read_text(), re.M).group(1)
    return Process([sys.executable, str(LISTENER), "--config", str(ini), "serve"],
                   port, cpus, ini.with_suffix(".log"))


def ceiling(ini: Path, cpus: set[int] | None) -> Process:
    port_file = ini.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    return Process([sys.executable, str(BENCH / "ceiling.py"), "ceiling", str(ini), str(port_file)],
                   f"file:{port_file}", cpus, ini.with_suffix(".ceiling.log"))


def drive(port: int, connections: int, seconds: float, client_cpus: set[int], expected_rate: float = 12000) -> dict:
    requests = loadgen.build_requests(int(expected_rate * seconds) + 5000)
    os.sched_setaffinity(0, client_cpus)
    try:
        loadgen.run(port, requests[:2000], connections, 0.5)  # warm-up (unique ids too)
        return loadgen.run(port, requests[2000:], connections, seconds)
    finally:
        os.sched_setaffinity(0, ALL_CPUS)


def fmt(result: dict) -> str:
    return (f"rps={result['rps']:.0f} p50_ms={result['p50_ms']:.1f} p90_ms={result['p90_ms']:.1f} "
            f"p99_ms={result['p99_ms']:.1f} non_2xx={result['non_2xx']} errors={result['errors']}")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def http_figures(tmp: Path, seconds: float, connections: list[int], modes: list[str], rounds: int) -> dict:
    """Ceiling and listener side by side: both servers up on the same CPU(s),
    load alternating between them in short rounds, so that the machine's
    drift (neighbours on a shared VM) hits both alike. Reports medians."""
    figures = {}
    canned_port_file = tmp / "canned.port"
    canned = Process([sys.executable, str(BENCH / "ceiling.py"), "canned", str(canned_port_file)],
                     f"file:{canned_port_file}", {SERVER_CPU}, tmp / "canned.log")
    try:
        result = drive(canned.port, 16, seconds, {CLIENT_CPU}, 30000)
        say(f"client_capacity c=16 pinned {fmt(result)}  (bare socket server: the load generator's own limit)")
    finally:
        canned.stop()
    for mode in modes:
        server_cpus = {SERVER_CPU} if mode == "pinned" else None
        client_cpus = {CLIENT_CPU} if mode == "pinned" else ALL_CPUS
        for c in connections:
            name = f"l-{mode}-{c}"
            # Same settings, own port each: both stay up while the load alternates.
            base = ceiling(write_ini(tmp, f"{name}-ceiling"), server_cpus)
            server = listener(write_ini(tmp, name), server_cpus)
            tops, ours = [], []
            try:
                for _ in range(rounds):
                    tops.append(drive(base.port, c, seconds, client_cpus))
                    ours.append(drive(server.port, c, seconds, client_cpus))
            finally:
                base.stop()
                server.stop()
            with sqlite3.connect(tmp / f"{name}.sqlite3") as conn:
                stored = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            if stored < sum(o["ok"] for o in ours):
                raise SystemExit(f"the listener stored {stored} events but acknowledged more: not the listener?")
            ratios = [o["rps"] / t["rps"] for t, o in zip(tops, ours) if t["rps"]]
            ratio = median(ratios)
            figures[(mode, c)] = ratio
            say(f"ceiling c={c} {mode} rps={median([t['rps'] for t in tops]):.0f} "
                f"p99_ms={median([t['p99_ms'] for t in tops]):.1f} (median of {rounds} rounds)")
            say(f"listener c={c} {mode} rps={median([o['rps'] for o in ours]):.0f} "
                f"p50_ms={median([o['p50_ms'] for o in ours]):.1f} p99_ms={median([o['p99_ms'] for o in ours]):.1f} "
                f"non_2xx={sum(o['non_2xx'] for o in ours)} errors={sum(o['errors'] for o in ours)} "
                f"acked={sum(o['ok'] for o in ours)} stored={stored} "
                f"round_ratios={','.join(f'{r:.2f}' for r in ratios)} ratio={ratio:.2f}")
    return figures


def medians(runs: list[dict]) -> str:
    """acks/s and p99 of a condition's rounds, as medians."""
    return f"rps={median([r['rps'] for r in runs]):.0f} p99_ms={median([r['p99_ms'] for r in runs]):.1f}"


def round_ratios(base: list[dict], other: list[dict]) -> tuple[float, str]:
    """The median of ``other``/``base`` acks/s over rounds run back to back, and each round's ratio."""
    ratios = [o["rps"] / b["rps"] for b, o in zip(base, other) if b["rps"]]
    return median(ratios), ",".join(f"{r:.2f}" for r in ratios)


def prefill(db: Path, rows: int) -> None:
    """``rows`` done events with realistic payloads, written straight to the file."""
    import noyo_listener
    store = noyo_listener.Store(str(db))
    store.open()
    store.close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    stamp = noyo_listener.utc_iso(time.time() - 3600)
    batch = 50_000
    for start in range(0, rows, batch):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO events (event_id, type, data_id, created, received_at, payload, status, processed_at) "
            "VALUES (?, 'difference.created', ?, 1, ?, ?, 'done', ?)",
            ((eid, did, stamp, f'{{"data": {{"id": "{did}"}}, "event": {{"id": "{eid}", "created": 1, '
              f'"type": "difference.created"}}}}', stamp)
             for eid, did in ((str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(min(batch, rows - start)))))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def big_table_figure(tmp: Path, rows: int, seconds: float, rounds: int) -> None:
    """acks/s with ``rows`` events already stored vs an empty table: both
    listeners up on the server CPU, load alternating in rounds, medians."""
    empty_ini = write_ini(tmp, "empty")
    full_ini = write_ini(tmp, "full")
    started = time.monotonic()
    prefill(tmp / "full.sqlite3", rows)
    say(f"prefill rows={rows} seconds={time.monotonic() - started:.0f}")
    servers = {"empty": listener(empty_ini, {SERVER_CPU}), "full": listener(full_ini, {SERVER_CPU})}
    results: dict[str, list[dict]] = {"empty": [], "full": []}
    try:
        for _ in range(rounds):
            for name, server in servers.items():
                results[name].append(drive(server.port, 16, seconds, {CLIENT_CPU}))
    finally:
        for server in servers.values():
            server.stop()
    for name, runs in results.items():
        say(f"listener c=16 pinned table={name} rows_before={0 if name == 'empty' else rows} {medians(runs)} "
            f"(median of {rounds} rounds)")
    ratio, each = round_ratios(results["empty"], results["full"])
    say(f"big_table_ratio={ratio:.2f} rows={rows} round_ratios={each} "
        f"(acks/s with {rows} rows / acks/s with an empty table)")


def rss_figure(tmp: Path, events: int) -> None:
    ini = write_ini(tmp, "rss")
    server = listener(ini, {SERVER_CPU})
    try:
        idle = server.rss_peak_kib()
        requests = loadgen.build_requests(events)
        os.sched_setaffinity(0, {CLIENT_CPU})
        try:
            result = loadgen.run(server.port, requests, 16, 600)
        finally:
            os.sched_setaffinity(0, ALL_CPUS)
        peak = server.rss_peak_kib()
    finally:
        server.stop()
    say(f"rss_peak_mib={peak / 1024:.1f} after_events={result['ok']} idle_mib={idle / 1024:.1f}")


class Scraper:
    """GET /metrics every ``interval`` seconds, as Prometheus would, from the client's CPU."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        self.port, self.interval = port, interval
        self.durations: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        import http.client
        os.sched_setaffinity(0, {CLIENT_CPU})
        while True:
            started = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                if response.status != 200 or b"noyo_listener_events{" not in body:
                    self.failures += 1
            except OSError:
                self.failures += 1
            self.durations.append(time.perf_counter() - started)
            if self._stop.wait(max(0.0, self.interval - (time.perf_counter() - started))):
                return


def scrape_figure(tmp: Path, seconds: float, rounds: int) -> None:
    """acks/s with and without a scraper hitting /metrics every second: one
    listener, pinned, load alternating between the two conditions in rounds
    (order swapped every round, so the growing table hits both alike)."""
    server = listener(write_ini(tmp, "scrape"), {SERVER_CPU})
    results: dict[str, list[dict]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}  # the listener's CPU seconds per ack

    def cpu_seconds() -> float:  # utime + stime of the whole process, all threads
        fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    scrapes: list[float] = []
    failures = 0
    try:
        for number in range(rounds):
            for condition in (("without", "with") if number % 2 == 0 else ("with", "without")):
                used = cpu_seconds()
                if condition == "without":
                    results[condition].append(drive(server.port, 16, seconds, {CLIENT_CPU}))
                else:
                    with Scraper(server.port) as scraper:
                        results[condition].append(drive(server.port, 16, seconds, {CLIENT_CPU}))
                    scrapes += scraper.durations
                    failures += scraper.failures
                cpu[condition].append((cpu_seconds() - used) / max(1, results[condition][-1]["ok"]))
        # The gauge thread is the one task of the process at nice 10 (noyo_listener.DatabaseGauges).
        gauge_cpu = 0.0
        for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[16]) == 10:
                gauge_cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        total_cpu = cpu_seconds()
    finally:
        server.stop()
    with sqlite3.connect(tmp / "scrape.sqlite3") as conn:
        rows = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    for name, runs in results.items():
        say(f"listener c=16 pinned scraper={name} {medians(runs)} cpu_us_per_ack={median(cpu[name]) * 1e6:.0f} "
            f"(median of {rounds} rounds)")
    ratio, each = round_ratios(results["without"], results["with"])
    say(f"scrape_ratio={ratio:.2f} round_ratios={each} "
        f"scrapes={len(scrapes)} scrape_failures={failures} scrape_p50_ms={median(scrapes) * 1000:.1f} "
        f"scrape_max_ms={max(scrapes) * 1000:.1f} rows_at_end={rows} "
        f"cpu_per_ack_ratio={median(cpu['with']) / median(cpu['without']):.2f} "
        f"gauge_thread_cpu_s={gauge_cpu:.2f} listener_cpu_s={total_cpu:.1f} "
        "(acks/s with a scraper every second / acks/s without)")


FAKE_API_SCRIPT = """
import sys, time, uuid
sys.path.insert(0, sys.argv[1])
from fake_noyo import FakeNoyo
fake = FakeNoyo()
fake.latency = float(sys.argv[2])
for n in range(int(sys.argv[3])):
    for kind in ("difference", "member_snapshot"):
        fake.put(kind, {"id": str(uuid.UUID(int=n)), "modified": 1})
fake.start()
print(fake.url, fake.client_id, fake.client_secret, flush=True)
sys.stdin.read()  # until the bench closes our stdin
"""


class FakeApi:
    """The fake Noyo API from tests/ in a process of its own (in this one it
    would share the load generator's GIL), holding ``objects`` differences
    and member snapshots; every request takes ``latency`` seconds."""

    def __init__(self, latency: float, objects: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FAKE_API_SCRIPT, str(ROOT / "tests"), str(latency),
                                      str(objects)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url, self.client_id, self.client_secret = self.proc.stdout.readline().split()

    def ini_section(self) -> dict:
        return {"client_id": self.client_id, "client_secret": self.client_secret,
                "token_url": self.url + "/auth/public/token", "tracking_url": self.url, "fulfillment_url": self.url}

    def stop(self) -> None:
        self.proc.stdin.close()  # it serves until its stdin closes
        self.proc.wait(30)


def sync_figure(tmp: Path, seconds: float, rounds: int, rate: float) -> None:
    """acks/s of a listener whose own reconciliation pass runs (serve's
    Reconciler, [sync] rate as given: 2 list requests/s is the shipped
    default) against the same listener without passes, both up and pinned,
    load alternating between them in rounds. The pass walks ``objects`` new
    differences, so every item it applies is a write. Fetching is off in both
    (the load's events are stored as ignored), so the pass is the only difference."""
    # Enough objects that the pass is still writing new ones when the last
    # round ends (at most 50 pages of 100 a second: the fake API's 20 ms).
    objects = max(20_000, int(min(rate, 50) * 100 * (rounds * 2 * (seconds + 2) + 30)))
    api = FakeApi(0.02, objects)
    common = {"noyo_api": api.ini_section(), "fetch": {"difference": "", "member_snapshot": ""}}
    try:
        plain = listener(write_ini(tmp, "sync-off", sync={"interval": 0}, **common), {SERVER_CPU})
        syncing = listener(write_ini(tmp, "sync-on", sync={"interval": "1s", "rate": rate, "page_size": 100},
                                     **common), {SERVER_CPU})
        db = tmp / "sync-on.sqlite3"

        def applied() -> int:
            with sqlite3.connect(db, timeout=10) as conn:
                return conn.execute("SELECT COUNT(*) FROM differences").fetchone()[0]
        results: dict[str, list[dict]] = {"without": [], "with": []}
        applied_per_s: list[float] = []
        try:
            for number in range(rounds):
                for name in (("without", "with") if number % 2 == 0 else ("with", "without")):
                    if name == "without":
                        results[name].append(drive(plain.port, 16, seconds, {CLIENT_CPU}))
                        continue
                    before, started = applied(), time.monotonic()
                    results[name].append(drive(syncing.port, 16, seconds, {CLIENT_CPU}))
                    applied_per_s.append((applied() - before) / (time.monotonic() - started))
        finally:
            plain.stop()
            syncing.stop()
    finally:
        api.stop()
    for name, runs in results.items():
        say(f"listener c=16 pinned sync_pass={'running' if name == 'with' else 'none'} {medians(runs)} "
            f"non_2xx={sum(r['non_2xx'] for r in runs)} (median of {rounds} rounds)")
    ratio, each = round_ratios(results["without"], results["with"])
    say(f"sync_ratio={ratio:.2f} round_ratios={each} "
        f"sync_rate={rate:g}/s objects_applied_per_s={median(applied_per_s):.0f} objects_listed={objects} "
        "(acks/s while serve's own pass writes new objects / acks/s of the same listener without passes)")


def drain_figures(tmp: Path, objects: int, latency: float) -> None:
    from fake_noyo import FakeNoyo
    for burst in (False, True):
        for concurrency in (1, 4, 8):
            fake = FakeNoyo().start()
            fake.latency = latency
            name = f"drain-{int(burst)}-{concurrency}"
            ini = write_ini(tmp, name, log={"level": "WARNING"})
            requests = loadgen.build_requests(objects * (3 if burst else 1), data_ids=objects)
            for n in range(objects):
                fake.put("difference", {"id": str(uuid.UUID(int=n)), "modified": 1})
                fake.put("member_snapshot", {"id": str(uuid.UUID(int=n)), "modified": 1})
            # Fill the inbox with fetching off, then time the drain alone.
            server = listener(write_ini(tmp, name, log={"level": "INFO"}), None)
            try:
                loadgen.run(server.port, requests, 8, 600)
            finally:
                server.stop()
            ini = write_ini(tmp, name, log={"level": "INFO"}, worker={"concurrency": concurrency},
                            sync={"interval": 0}, noyo_api={
                "client_id": fake.client_id, "client_secret": fake.client_secret,
                "token_url": fake.url + "/auth/public/token", "tracking_url": fake.url, "fulfillment_url": fake.url})
            db = tmp / f"{name}.sqlite3"
            server = listener(ini, None)
            try:
                give_up = time.monotonic() + 120  # bounded: a broken worker must not hang the run
                while True:
                    with sqlite3.connect(db, timeout=10) as conn:
                        left = conn.execute("SELECT COUNT(*) FROM events WHERE status = 'pending'").fetchone()[0]
                    if not left:
                        break
                    if time.monotonic() > give_up:
                        raise SystemExit(f"worker drain: {left} events still pending after 120 s; "
                                         f"see {ini.with_suffix('.log')}")
                    time.sleep(0.01)
                finished = time.time()
            finally:
                server.stop()
                fake.stop()
            # From the first GET's start to the last event done: the process's
            # start-up (about half a second) is not the worker's drain rate.
            gets = fake.object_requests()
            elapsed = finished - (min(r.at for r in gets) - latency)
            events = len(requests)
            fetches = len(gets)
            say(f"worker_drain concurrency={concurrency} burst={'3-per-object' if burst else 'no'} "
                f"api_latency_ms={latency * 1000:g} events={events} events_per_s={events / elapsed:.0f} "
                f"fetches_per_s={fetches / elapsed:.0f} fetches_per_event={fetches / events:.2f} "
                f"ideal_fetches_per_s={concurrency / latency:.0f}")




def burst_figure(tmp: Path, events: int, objects: int, latency: float, concurrency: int, limit: float) -> None:
    """``events`` posted as fast as the load generator can (c=64) to a listener
    that fetches at ``concurrency`` from a fake API answering in ``latency``:
    time to acknowledge all, time until none is pending, peak RSS, database
    size. The fake API runs in its own process (in this one it would share
    the load generator's GIL); the server is pinned as the unit pins it."""
    api = FakeApi(latency, objects)
    try:
        ini = write_ini(tmp, "burst", worker={"concurrency": concurrency}, sync={"interval": 0},
                        noyo_api=api.ini_section())
        db = tmp / "burst.sqlite3"
        requests = loadgen.build_requests(events, data_ids=objects)
        server = listener(ini, {SERVER_CPU})
        try:
            started = time.monotonic()
            os.sched_setaffinity(0, {CLIENT_CPU})
            try:
                result = loadgen.run(server.port, requests, 64, limit, answer_all=True)
            finally:
                os.sched_setaffinity(0, ALL_CPUS)
            acked = time.monotonic()
            wal_peak = left = 0
            while time.monotonic() - started < limit:  # bounded: a stuck worker must not hang the run
                wal = Path(f"{db}-wal")
                wal_peak = max(wal_peak, wal.stat().st_size if wal.exists() else 0)
                with sqlite3.connect(db, timeout=10) as conn:
                    left = conn.execute("SELECT COUNT(*) FROM events WHERE status = 'pending'").fetchone()[0]
                if not left:
                    break
                time.sleep(0.2)
            drained = time.monotonic()
            with sqlite3.connect(db, timeout=10) as conn:
                stored = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            if stored < result["ok"]:
                raise SystemExit(f"burst: {result['ok']} acknowledged but {stored} stored")
            rss = server.rss_peak_kib()
            size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
        finally:
            server.stop()
    finally:
        api.stop()
    say(f"burst events={events} objects={objects} c=64 acked={result['ok']} stored={stored} non_2xx={result['non_2xx']} "
        f"errors={result['errors']} ack_seconds={acked - started:.1f} acks_per_s={result['rps']:.0f} "
        f"p99_ms={result['p99_ms']:.1f} drain_seconds={drained - started:.1f} "
        f"{'pending_left=' + str(left) + ' (gave up) ' if left else ''}"
        f"api_latency_ms={latency * 1000:g} worker_concurrency={concurrency} rss_peak_mib={rss / 1024:.1f} "
        f"db_mib={size / 2**20:.1f} wal_peak_mib={wal_peak / 2**20:.1f}")


def main() -> None:
    global LISTENER, server_policy
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, fewer figures (under 2 minutes)")
    parser.add_argument("--seconds", type=float, help="length of each HTTP run")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="other",
                        help="both servers' scheduling policy (default: other, the kernel's and the unit's)")
    parser.add_argument("--parts", default="drain,rss,bigtable,scrape,sync,burst,http",
                        help="comma-separated subset of: drain, rss, bigtable, scrape, sync, burst, http "
                             "(default: all)")
    parser.add_argument("--sync-rate", type=float, default=2,
                        help="[sync] rate of the sync figure's pass (default 2, the shipped default)")
    parser.add_argument("--burst-events", type=int, default=100_000, help="events in the burst figure")
    parser.add_argument("--burst-objects", type=int, default=0,
                        help="objects they point to (default: one per event, as a large member snapshot sends)")
    parser.add_argument("--listener", type=Path, default=LISTENER,
                        help="the noyo_listener.py to measure (default: this checkout's)")
    args = parser.parse_args()
    LISTENER = args.listener.resolve()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    parts = set(args.parts.split(","))
    server_policy = args.policy
    say(machine() + f" server_policy={server_policy}")
    with tempfile.TemporaryDirectory(prefix="noyo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.quick:
            if "drain" in parts:
                drain_figures(tmp, 100, 0.02)
            asked = args.parts != parser.get_default("parts")  # these two only when asked for
            if "sync" in parts and asked:
                sync_figure(tmp, seconds, rounds=3, rate=args.sync_rate)
            if "burst" in parts and asked:
                burst_figure(tmp, args.burst_events, args.burst_objects or args.burst_events, 0.02, 8, limit=300)
            figures = http_figures(tmp, seconds, [64, 16], ["pinned"], rounds=3) if "http" in parts else {}
        else:
            if "drain" in parts:
                drain_figures(tmp, 400, 0.02)
            if "rss" in parts:
                rss_figure(tmp, 100_000)
            if "bigtable" in parts:
                big_table_figure(tmp, 1_000_000, seconds, rounds=5)
            if "scrape" in parts:
                scrape_figure(tmp, seconds, rounds=6)
            if "sync" in parts:
                sync_figure(tmp, seconds, rounds=6, rate=args.sync_rate)
            if "burst" in parts:
                burst_figure(tmp, args.burst_events, args.burst_objects or args.burst_events, 0.02, 8, limit=900)
            figures = http_figures(tmp, seconds, [64, 16], ["unpinned", "pinned"], rounds=5) if "http" in parts else {}
    if ("pinned", 16) in figures:
        say(f"ratio={figures[('pinned', 16)]:.2f} c=16")


if __name__ == "__main__":
    main()
