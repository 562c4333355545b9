"""What the listener survives: SIGKILL under load, an API outage, a full disk.

Each test prints a FAULTS line with its figures (run pytest with -s to see
them); the README's fault table is made from those lines.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from conftest import SECRET, api_sections, event_body, signed_headers, wait_until
from fake_noyo import Fault


def report(scenario: str, **figures) -> None:
    print(f"\nFAULTS scenario={scenario} " + " ".join(f"{k}={v}" for k, v in figures.items()))


class KeepAliveSender(threading.Thread):
    """Posts events over one keep-alive connection; retries each until it gets a 200, like Noyo."""

    def __init__(self, listener, bodies: list[bytes], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.listener = listener
        self.bodies = bodies
        self.stop = stop
        self.acked: list[str] = []
        self.failures = 0
        self.conn: http.client.HTTPConnection | None = None

    def _post(self, body: bytes) -> int:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.listener.port, timeout=10)
        self.conn.request("POST", self.listener.path, body=body, headers=signed_headers(body))
        response = self.conn.getresponse()
        response.read()
        return response.status

    def run(self) -> None:
        for body in self.bodies:
            while not self.stop.is_set():
                try:
                    if self._post(body) == 200:
                        self.acked.append(body)
                        break
                except (OSError, http.client.HTTPException):
                    pass
                self.failures += 1
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                time.sleep(0.05)  # the listener is down: Noyo would also wait before retrying
            if self.stop.is_set():
                return


def expected_state(obj: dict) -> str:
    if obj.get("resolved") is not None:
        return "resolved"
    return "discrepancy" if obj.get("discrepancy_time") is not None else "pending"


def test_sigkill_under_load_loses_no_acknowledged_event(start_listener, fake_noyo):
    rng = random.Random(20261128)
    differences = []
    for n in range(200):
        obj = {"id": f"diff-{n}", "modified": rng.randint(1, 100), "version": 1,
               "resolved": rng.choice([None, 50]), "discrepancy_time": rng.choice([None, 40]), "group_id": "g"}
        differences.append(fake_noyo.put("difference", obj))
    types = ["difference.created", "difference.discrepancy", "difference.resolved"]
    senders_count, per_sender, kills = 4, 600, 3
    bodies = [[event_body(rng.choice(types), data_id=rng.choice(differences)["id"], event_id=str(uuid.uuid4()))
               for _ in range(per_sender)] for _ in range(senders_count)]

    # One fixed port across the restarts: with port 0 the senders' retries in
    # the gap would go to the old port, which another listener on this shared
    # machine (same test secret) may have taken, and its 200s would count here.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = start_listener(server={"threads": 8, "port": port}, **api_sections(fake_noyo))
    stop = threading.Event()
    senders = [KeepAliveSender(listener, b, stop) for b in bodies]
    for sender in senders:
        sender.start()
    try:
        for _ in range(kills):
            baseline = sum(len(s.acked) for s in senders)
            wait_until(lambda: sum(len(s.acked) for s in senders) > baseline + 100, 30, "traffic before a kill")
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment in the middle of that traffic
            listener.kill()
            listener.start()
        for sender in senders:
            sender.join(120)
            assert not sender.is_alive()
    finally:
        stop.set()

    acked = {b for s in senders for b in s.acked}
    assert len(acked) == senders_count * per_sender
    wait_until(lambda: listener.db().execute("SELECT COUNT(*) FROM events WHERE status != 'done'").fetchone()[0] == 0,
               60, "the worker to finish every event")
    with listener.db() as conn:
        stored = {r[0] for r in conn.execute("SELECT payload FROM events")}
        rows = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM differences")}
    acked_text = {b.decode() for b in acked}
    missing = acked_text - stored
    assert not missing, f"{len(missing)} acknowledged events are missing"
    referenced = {json.loads(b)["data"]["id"] for b in acked}
    assert referenced <= set(rows), f"no row for {sorted(referenced - set(rows))[:5]}"
    for obj in differences:
        if obj["id"] in referenced:
            assert rows[obj["id"]]["state"] == expected_state(obj), obj
            assert rows[obj["id"]]["modified"] == obj["modified"]
    report("sigkill_under_load", events_acknowledged=len(acked), events_found=len(acked_text & stored),
           kills=kills, sender_retries=sum(s.failures for s in senders),
           differences_checked=len(rows), fetches=len(fake_noyo.object_requests()))


def test_api_outage_sees_probes_loses_nothing_and_drains(start_listener, fake_noyo):
    sections = api_sections(fake_noyo, backoff_initial="100ms", backoff_max="1s", concurrency=4)
    sections["noyo_api"]["timeout"] = "500ms"
    listener = start_listener(**sections)
    stop = threading.Event()
    sent: list[str] = []

    def stream() -> None:  # a steady 20 events/s
        while not stop.is_set():
            diff_id = str(uuid.uuid4())
            fake_noyo.put("difference", {"id": diff_id, "modified": 1})
            if listener.send(event_body("difference.created", data_id=diff_id))[0] == 200:
                sent.append(diff_id)
            stop.wait(0.05)

    streamer = threading.Thread(target=stream)
    per_phase = 20  # events sent in each phase: phases end on what happened, not after a fixed time

    def phase_until(what: str, api_saw: Callable[[], int]) -> None:
        start = len(sent)
        wait_until(lambda: len(sent) >= start + per_phase and api_saw() >= 2, 60, what)

    fake_noyo.stop()  # 1. connection refused
    outage_started = time.monotonic()
    streamer.start()
    try:
        phase_until("refused attempts", lambda: len(re.findall(r"fetch failed .*ConnectionRefused", listener.log())))
        refused_attempts = len(re.findall(r"fetch failed .*ConnectionRefused", listener.log()))
        fake_noyo.add_fault(Fault("status", times=10**6, status=503))  # 2. 503 for everything
        fake_noyo.start()
        phase_until("503 answers", lambda: len(fake_noyo.object_requests()))
        fake_noyo.faults.clear()
        arrivals_before_slow = len(fake_noyo.arrivals)
        fake_noyo.add_fault(Fault("slow", times=10**6, delay=2.0))  # 3. answers later than the timeout
        phase_until("slow answers", lambda: len(fake_noyo.arrivals) - arrivals_before_slow)
        outage_seconds = time.monotonic() - outage_started
        answered_attempts = len(fake_noyo.object_requests())
        arrivals = len(fake_noyo.arrivals)
        fake_noyo.faults.clear()
        recovered = time.monotonic()
    finally:
        stop.set()
        streamer.join(30)

    wait_until(lambda: listener.db().execute("SELECT COUNT(*) FROM events WHERE status != 'done'").fetchone()[0] == 0,
               30, "the backlog to drain")
    drain = time.monotonic() - recovered
    attempts = refused_attempts + arrivals
    with listener.db() as conn:
        done = conn.execute("SELECT COUNT(*) FROM events WHERE status = 'done'").fetchone()[0]
        assert conn.execute("SELECT COUNT(*) FROM differences").fetchone()[0] == len(sent)
    assert done == len(sent)
    # Without the global backoff every event would cost at least one request;
    # with it the API sees about one probe per probe interval (1s here), plus
    # the first failures of the fetches in flight. A loaded machine only makes
    # probes rarer, so this bound cannot fail from load.
    assert attempts <= outage_seconds * 1.5 + 12, (attempts, len(sent), outage_seconds)
    report("api_outage", outage_seconds=f"{outage_seconds:.1f}", events_sent=len(sent),
           api_attempts_during_outage=attempts, refused=refused_attempts, answered_or_timed_out=answered_attempts,
           requests_per_minute=f"{attempts / outage_seconds * 60:.0f}", drain_seconds=f"{drain:.1f}")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a real file system that really fills up (needs root to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path) -> int:
    """Write until the file system says ENOSPC; return the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                written += handle.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                written += handle.write(b"\0" * 512)
        except OSError:
            pass
    return written


def test_a_full_disk_gets_503_never_200_and_recovers(start_listener, small_disk):
    listener = start_listener(database={"path": small_disk / "noyo.sqlite3", "busy_timeout": "1s"})
    assert listener.send(event_body(event_id="before"))[0] == 200

    filler = small_disk / "filler"
    fill(filler)
    answers: dict[str, int] = {}
    for n in range(400):  # until the WAL has to grow and cannot
        event_id = f"full-{n}"
        answers[event_id] = listener.send(event_body(event_id=event_id, padding="x" * 2000))[0]
        if answers[event_id] == 503:
            break
    assert 503 in answers.values(), "the disk never filled up"
    listener.wait_for_log(r"status=503 .*error=\"?database or disk is full")
    assert set(answers.values()) <= {200, 503}
    assert listener.get("/healthz")[0] == 503
    assert listener.proc.poll() is None  # still up

    filler.unlink()
    wait_until(lambda: listener.send(event_body(event_id="after"))[0] == 200, 15, "accepting again")
    assert listener.get("/healthz")[0] == 200
    with listener.db() as conn:
        stored = {r[0] for r in conn.execute("SELECT event_id FROM events")}
    acked = {e for e, status in answers.items() if status == 200} | {"before", "after"}
    refused = {e for e, status in answers.items() if status == 503}
    assert acked <= stored
    assert not (refused & stored)
    assert "Traceback" not in listener.log()
    report("disk_full", acknowledged_before_full=len(acked) - 2, answered_503=len(refused),
           acknowledged_and_found=len(acked & stored))
