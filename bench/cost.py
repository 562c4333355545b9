#!/usr/bin/env python3
"""CPU, context switches and syscalls per acknowledgement: figures a busy machine cannot blur.

Wall-clock acks/s on a shared 2-core VM swing with the neighbours; what one
ack *costs* the server barely does. This starts each given copy of the
module as a listener pinned to one CPU, sends the same fixed number of
signed events at a fixed concurrency from the other CPU, and reads the
server's own counters from /proc before and after (utime+stime of all its
threads, voluntary and involuntary context switches of all its threads).
With ``--strace`` it also counts syscalls per ack (strace slows the server,
so those rounds are separate and their CPU figures are not reported).
Copies alternate round by round; medians are printed.

    python3 bench/cost.py A=/path/to/dir_a B=/path/to/dir_b --requests 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import loadgen  # noqa: E402
import run as bench_run  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime of every thread


def switches(pid: int) -> tuple[int, int]:
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        voluntary += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
        involuntary += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
    return voluntary, involuntary


def start(module_dir: Path, tmp: Path, name: str, threads: int) -> tuple[subprocess.Popen, int, Path]:
    ini = bench_run.write_ini(tmp, name, server={"threads": threads})
    port = int(re.search(r"^port = (\d+)$", ini.read_text(), re.M).group(1))
    log = ini.with_suffix(".log")
    if str(module_dir) == "ceiling":  # the bare Bottle + waitress route of bench/run.py
        argv = [str(BENCH / "ceiling.py"), "ceiling", str(ini), str(tmp / f"{name}.port")]
        ready = lambda: (tmp / f"{name}.port").exists()  # noqa: E731
    else:
        argv = [str(module_dir / "noyo_listener.py"), "--config", str(ini), "serve"]
        ready = lambda: "listening url=" in log.read_text(errors="replace")  # noqa: E731
    proc = subprocess.Popen(["taskset", "-c", str(bench_run.SERVER_CPU), sys.executable, *argv],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return proc, port, log


def one_round(module_dir: Path, tmp: Path, name: str, args: argparse.Namespace, strace: bool) -> dict:
    proc, port, log = start(module_dir, tmp, name, args.threads)
    tracer = None
    try:
        requests = loadgen.build_requests(args.requests + 2000)
        os.sched_setaffinity(0, {bench_run.CLIENT_CPU})
        loadgen.run(port, requests[:2000], args.connections, 30)  # warm-up
        if strace:
            out = tmp / f"{name}.strace"
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(proc.pid)],
                                      stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # strace attaches to every thread
        cpu0, (vol0, inv0) = cpu_seconds(proc.pid), switches(proc.pid)
        result = loadgen.run(port, requests[2000:], args.connections, 120)
        cpu1, (vol1, inv1) = cpu_seconds(proc.pid), switches(proc.pid)
        os.sched_setaffinity(0, bench_run.ALL_CPUS)
        figures = {"acks": result["ok"], "non2xx": result["non_2xx"], "errors": result["errors"], "rps": result["rps"], "p99_ms": result["p99_ms"],
                   "cpu_us": (cpu1 - cpu0) / result["ok"] * 1e6,
                   "vcsw": (vol1 - vol0) / result["ok"], "ivcsw": (inv1 - inv0) / result["ok"]}
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            figures["syscalls"] = parse_strace(out.read_text(), result["ok"])
    finally:
        os.sched_setaffinity(0, bench_run.ALL_CPUS)
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    match = re.search(r"writes_per_commit=([\d.]+)", log.read_text(errors="replace") if log.exists() else "")
    figures["per_commit"] = float(match.group(1)) if match else float("nan")
    return figures


def parse_strace(text: str, acks: int) -> dict[str, float]:
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and not parts[-1].startswith("total"):
            counts[parts[-1]] = int(parts[3]) / acks
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("copies", nargs="+", help="NAME=DIR with a noyo_listener.py in DIR")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strace", action="store_true", help="count syscalls per ack instead of CPU")
    args = parser.parse_args()
    copies = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]) if c.endswith("=ceiling") else
               Path(c.split("=", 1)[1]).resolve()) for c in args.copies]
    results: dict[str, list[dict]] = {name: [] for name, _ in copies}
    with tempfile.TemporaryDirectory(prefix="noyo-cost-") as tmp_name:
        tmp = Path(tmp_name)
        for n in range(args.rounds):
            for name, directory in copies:
                figures = one_round(directory, tmp, f"{name}-{n}", args, args.strace)
                results[name].append(figures)
                line = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in figures.items() if k != "syscalls")
                print(f"round={n} copy={name} {line}", flush=True)
                if "syscalls" in figures:
                    top = sorted(figures["syscalls"].items(), key=lambda kv: -kv[1])[:12]
                    print("   syscalls/ack " + " ".join(f"{k}={v:.2f}" for k, v in top), flush=True)
    for name, runs in results.items():
        keys = [k for k in runs[0] if k != "syscalls"]
        print(f"median copy={name} " + " ".join(
            f"{k}={bench_run.median([r[k] for r in runs]):.2f}" for k in keys), flush=True)


if __name__ == "__main__":
    main()
