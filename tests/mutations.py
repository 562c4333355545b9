#!/usr/bin/env python3
"""Break the program on purpose, one breakage at a time, and check a test notices.

Each entry below is a breakage that once went unnoticed (issue 18's audit) or
a behaviour the README promises: the exact original text in a file, what to
put instead, and the tests that must then fail. For each one the script copies
the repository to a temporary directory, checks the named tests pass there
unbroken, applies the breakage, runs the named tests ``--runs`` times and
prints how many runs caught it. Run it before resolving an issue:

    /work/venv/bin/python tests/mutations.py               # everything, 5 runs each
    /work/venv/bin/python tests/mutations.py --runs 2 --only dedupe_in_batch
    /work/venv/bin/python tests/mutations.py --list

An entry whose original text is no longer in the file is reported as STALE:
the code moved; point the entry at the new text (and keep the breakage the
same). Entries marked ``worker`` touch the Worker section, which is being
rewritten (issue 10): re-point them after that merge.

Not collected by pytest (the file name does not start with ``test_``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "noyo_listener.py"


@dataclasses.dataclass
class Breakage:
    name: str
    what: str
    edits: list[tuple[str, str]]  # (exact original text, replacement), each original found exactly once
    tests: list[str]  # pytest node ids, relative to the repository
    file: str = MODULE
    runs: int | None = None  # fewer runs for slow tests (None = --runs)
    section: str = ""  # the module section the edits touch (who may move the text)


BREAKAGES = [
    Breakage(
        "release_before_commit", "the writer releases the waiting request before COMMIT",
        [('            results = self._run_jobs(conn, batch)\n            conn.execute("COMMIT")\n',
          '            results = self._run_jobs(conn, batch)\n            for job, result in zip(batch, results):\n'
          '                job.finish(result)\n            conn.execute("COMMIT")\n'),
         ('            self.last_commit_error = None\n        for job, result in zip(batch, results):\n'
          '            job.finish(result)\n',
          '            self.last_commit_error = None\n')],
        ["tests/test_commit.py::test_a_commit_that_cannot_be_written_is_503_with_no_row_then_200_once_it_can"],
        section="storage"),
    Breakage(
        "dedupe_in_batch", "dedupe inside one commit batch removed (seen.add)",
        [("            seen.add(event.event_id)  # a second copy within this group is a duplicate too\n",
          "            pass\n")],
        ["tests/test_commit.py::test_identical_deliveries_in_one_commit_batch_leave_one_row_and_count_every_copy"],
        section="storage"),
    Breakage(
        "signature_prefix", "signature compared on a prefix only",
        [("matched |= hmac.compare_digest(expected, candidate)",
          "matched |= hmac.compare_digest(expected[:len(candidate)], candidate)")],
        ["tests/test_signature.py::test_a_truncated_or_extended_signature_never_verifies"],
        section="signature"),
    Breakage(
        "resource_newer_wins", "newer-object-wins guard removed for resources",
        [("    stored = json.loads(row[0]) if row else None\n    if stored is not None and newness(obj) < newness(stored):\n"
          "        return \"unchanged\"\n",
          "    stored = json.loads(row[0]) if row else None\n    if False:\n        return \"unchanged\"\n")],
        ["tests/test_worker_observed.py::test_an_older_fetch_never_overwrites_a_newer_resource_row"],
        section="worker"),
    Breakage(
        "retry_delay_zero", "retry_delay returns 0 (every retry immediate)",
        [("        delay = random.uniform(ceiling / 2, ceiling)\n", "        delay = 0.0\n")],
        ["tests/test_worker_observed.py::test_retries_are_spaced_by_the_backoff_not_immediate"],
        section="worker"),
    Breakage(
        "shutdown_skips_answers", "shutdown skips sending the finished answers",
        [("            self._send_finished_answers()\n", "            self.server.close()\n")],
        ["tests/test_shutdown_and_health.py::test_answers_still_in_the_buffers_at_a_stop_are_sent"],
        section="service"),
    Breakage(
        "healthz_ignores_worker", "/healthz ignores a stalled worker",
        [("            stalled = self.worker.stalled()\n", "            stalled = None\n")],
        ["tests/test_shutdown_and_health.py::test_healthz_is_503_when_the_worker_has_stopped"],
        section="http app (healthz)"),
    Breakage(
        "watchdog_skips_http", "the watchdog self-check calls the health function directly",
        [("        host, port = self.self_address\n        conn = http.client.HTTPConnection(host, port, timeout=timeout)\n",
          "        return self.receiver.health_problems()\n        host, port = self.self_address\n"
          "        conn = http.client.HTTPConnection(host, port, timeout=timeout)\n")],
        ["tests/test_shutdown_and_health.py::test_a_wedged_http_server_stops_the_watchdog_pings"],
        section="service"),
    Breakage(
        "body_form_replay", "a body-form signature is not dated by event.created (replay gap)",
        [("        if match.form == FORM_BODY:\n            replay = check_signed_created(",
          "        if False:\n            replay = check_signed_created(")],
        ["tests/test_replay.py::test_a_captured_body_replayed_with_a_fresh_header_is_refused",
         "tests/test_replay.py::test_a_body_form_event_without_a_usable_created_is_refused_with_its_own_reason"],
        section="http app"),
    Breakage(
        "window_bypass", "the x-noyo-timestamp window is not checked",
        [("        window = check_timestamp(timestamp, time.time(), policy.max_age, policy.max_skew)\n",
          "        window = None\n")],
        ["tests/test_hostile.py"],
        section="http app"),
    Breakage(
        "log_flusher_idle", "lines left waiting in the log buffer are never written by the flusher",
        [("            try:\n                self.flush()\n            except Exception:",
          "            try:\n                pass\n            except Exception:")],
        ["tests/test_request_logs.py::test_lines_left_waiting_are_written_by_the_flusher_within_the_interval",
         "tests/test_request_logs.py::test_a_burst_is_logged_in_full_while_serving_and_a_refusal_comes_after_it"],
        section="command line (logging)"),
    Breakage(
        "log_flusher_dies", "a write that fails once ends the flusher thread",
        [("            try:\n                self.flush()\n            except Exception:  # noqa: BLE001 - a failed write (disk full, EPIPE) loses lines, never this thread\n                pass\n",
          "            self.flush()\n")],
        ["tests/test_request_logs.py::test_the_flusher_outlives_a_write_that_fails"],
        section="command line (logging)"),
    Breakage(
        "log_stderr_ahead", "tracebacks and warnings go straight to stderr, ahead of buffered lines",
        [("        sys.stderr = _StderrAfterLog(handler)\n", "        pass\n")],
        ["tests/test_request_logs.py::test_what_goes_straight_to_stderr_comes_after_the_lines_logged_before_it"],
        section="command line (logging)"),
    Breakage(
        "log_warning_bypasses_buffer", "a warning is written to the descriptor ahead of the lines waiting in the buffer",
        [("    def _write(self, levelno: int, line: str) -> None:\n",
          "    def _write(self, levelno: int, line: str) -> None:\n        if levelno >= logging.WARNING:\n"
          "            os.write(self.stream.fileno(), (line + \"\\n\").encode())\n            return\n")],
        ["tests/test_request_logs.py::test_a_burst_is_logged_in_full_while_serving_and_a_refusal_comes_after_it"],
        section="command line (logging)"),
    Breakage(
        "log_no_coalescing", "every log line is its own write again",
        [("        if levelno >= logging.WARNING or now - self._last_write >= self.interval:\n",
          "        if True:\n")],
        ["tests/test_request_logs.py::test_info_lines_wait_together_and_a_warning_writes_them_all_in_order"],
        section="command line (logging)"),
    Breakage(
        "log_warning_waits", "a warning waits in the buffer like an INFO line",
        [("        if levelno >= logging.WARNING or now - self._last_write >= self.interval:\n",
          "        if now - self._last_write >= self.interval:\n")],
        ["tests/test_request_logs.py::test_info_lines_wait_together_and_a_warning_writes_them_all_in_order"],
        section="command line (logging)"),
    Breakage(
        "log_lost_at_exit", "lines still buffered at a stop are dropped",
        [("            self._last_write = time.monotonic()\n            super().flush()\n",
          "            self._last_write = time.monotonic()\n"
          "            if threading.current_thread().name == \"noyo-log\":\n                super().flush()\n")],
        ["tests/test_request_logs.py::test_sigterm_right_after_a_burst_leaves_no_line_unwritten"],
        section="command line (logging)"),
    Breakage(
        "log_line_unescaped", "the direct log line skips the formatter's escaping",
        [("        if not message.isprintable():\n            # A second line of defence",
          "        if False:\n            # A second line of defence")],
        ["tests/test_request_logs.py::test_the_direct_line_is_the_line_a_log_record_gives"],
        section="command line (logging)"),
]


# The metrics (issue 14): (what, original, replacement, pytest -k expression
# over tests/test_metrics.py). Each becomes a Breakage below.
METRICS_BREAKS = [
    ("duplicates not counted", "        METRICS.acknowledged(parsed.type, duplicate, time.perf_counter() - started)\n",
     "        if not duplicate:\n            METRICS.acknowledged(parsed.type, duplicate, time.perf_counter() - started)\n", "counters_move"),
    ("reasons all other", '        reason = reason if reason in self._reasons else "other"\n', '        reason = "other"\n', "counters_move"),
    ("waitress rejects not counted", '        METRICS.rejected(error.code, "_".join(error.reason.lower().split()))\n', "", "counters_move"),
    ("histogram per-bucket", '            buckets.append(("_bucket", {"le": "+Inf" if math.isinf(bound) else repr(bound)}, cumulative))\n',
     '            buckets.append(("_bucket", {"le": "+Inf" if math.isinf(bound) else repr(bound)}, count))\n', "histogram or counters_move"),
    ("kinds unbounded", '        return kind if kind in self._kinds else "other"\n', '        return kind\n', "bounded"),
    ("fetch kinds not known", '            self._kinds = frozenset(NOYO_KINDS) | frozenset(fetch_kinds) | frozenset(list_kinds)\n',
     '            self._kinds = frozenset(NOYO_KINDS) | frozenset(list_kinds)\n', "bounded"),
    ("gauges through the writer", "                reading, due = self._take(conn)\n",
     "                reading, due = self.store.write(self._take)\n", "without_the_writer"),
    ("sync pass not reported", '        METRICS.sync_finished(self.kind, self.counts["new"])\n', "", "sync_metrics_follow"),
    ("503 not counted", "            METRICS.answered(503)\n", "", "without_the_writer"),
    ("503 in the ack histogram", "            METRICS.answered(503)\n",
     "            METRICS.acknowledged(parsed.type, False, 0.0)\n", "without_the_writer"),
    ("failed fetch not counted", "            METRICS.fetched(claim.kind, error.kind)\n", "", "fetches_are_counted or refused_credentials"),
    ("ok fetch not counted", '        METRICS.fetched(claim.kind, "ok")\n', "", "fetches_are_counted"),
    ("scrape logged at INFO", '        self._log_request(logging.DEBUG, bottle.request.environ, 200, started, "check=metrics")\n',
     '        self._log_request(logging.INFO, bottle.request.environ, 200, started, "check=metrics")\n', "neither_logged"),
    ("reason missing from tuple", '    "timestamp_in_future",        # 401\n', "", "own_label or counters_move"),
    ("syncs failed counted", "\"SELECT kind, MAX(finished_at) FROM syncs WHERE status = 'done' GROUP BY kind\"",
     "\"SELECT kind, MAX(finished_at) FROM syncs WHERE finished_at IS NOT NULL GROUP BY kind\"", "sync_metrics_follow"),
    ("oldest pending from newest", "SELECT COUNT(*), MIN(received_at) FROM events WHERE status = 'pending'",
     "SELECT COUNT(*), MAX(received_at) FROM events WHERE status = 'pending'", "gauges_equal"),
    ("pending count from the scan", '        reading = DatabaseReading({**self._counts, "pending": pending}, oldest, read_last_syncs(conn), taken_at)\n',
     '        reading = DatabaseReading(dict(self._counts), oldest, read_last_syncs(conn), taken_at)\n', "gauges_equal"),
    ("api state always healthy", '        api_state = None if worker is None else (worker.health.state if worker.client is not None else "fetching_off")\n',
     '        api_state = None if worker is None else "healthy"\n', "refused_credentials or spec_metric"),
    ("sync_finished does not add", "            self._sync_new[kind] = self._sync_new.get(kind, 0) + int(new_objects)\n",
     "            self._sync_new[kind] = int(new_objects)\n", "sync_finished"),
    ("scrapes counted as requests", "        body = METRICS.exposition(self.database_gauges.current(), api_state)\n",
     "        METRICS.answered(200)\n        body = METRICS.exposition(self.database_gauges.current(), api_state)\n", "neither_logged"),
    ("gauges never refreshed", "        return reading, time.monotonic() + max(self.MIN_AGE, self.COST_FACTOR * (time.monotonic() - cheap))\n",
     "        return reading, math.inf\n", "gauges_equal"),
    ("metrics path not reserved", '    if text == "/metrics":\n        raise ValueError("/metrics is reserved for Prometheus")\n', "", "reserved"),
]

BREAKAGES += [
    Breakage("metrics_" + "_".join(what.lower().replace("-", " ").split()), "metrics: " + what, [(old, new)],
             ["tests/test_metrics.py", "-k", expression], section="metrics")
    for what, old, new, expression in METRICS_BREAKS
]


def copy_repository(dest: Path) -> None:
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", ".pytest_cache", ".hypothesis", "*.sqlite3*", "*.log"))


def apply(repo: Path, breakage: Breakage) -> str | None:
    """Edit the copy; return why it cannot be applied (stale entry), or None."""
    path = repo / breakage.file
    text = path.read_text()
    for original, replacement in breakage.edits:
        found = text.count(original)
        if found != 1:
            return f"original text found {found} times in {breakage.file}: {original.strip()[:60]!r}"
        text = text.replace(original, replacement)
    path.write_text(text)
    return None


def run_tests(repo: Path, tests: list[str], timeout: float) -> tuple[int, list[str], float]:
    """(pytest exit code, failed node ids, seconds)."""
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=repo, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return -1, ["(timed out)"], time.monotonic() - started
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    why = re.search(r"^E +(.{1,90})", result.stdout, re.M)  # the first assertion line: caught for the right reason?
    if failed and why:
        failed[0] += f" ({why.group(1).strip()})"
    return result.returncode, failed, time.monotonic() - started


def check(breakage: Breakage, runs: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutation-{breakage.name}-") as tmp:
        repo = Path(tmp) / "repo"
        copy_repository(repo)
        code, failed, _ = run_tests(repo, breakage.tests, timeout)
        if code != 0:
            return {"verdict": "BASELINE FAILS", "detail": " ".join(failed) or f"pytest exit {code}"}
        problem = apply(repo, breakage)
        if problem:
            return {"verdict": "STALE", "detail": problem}
        caught, catchers, seconds = 0, set(), []
        for _ in range(runs):
            code, failed, took = run_tests(repo, breakage.tests, timeout)
            seconds.append(took)
            if code in (1, -1):  # tests failed (or hung): the breakage was noticed
                caught += 1
                catchers.update(failed)
            elif code != 0:
                return {"verdict": "ERROR", "detail": f"pytest exit {code}"}
        return {"verdict": f"caught {caught}/{runs}", "detail": " ".join(sorted(catchers)),
                "seconds": sum(seconds) / len(seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per breakage (default 5)")
    parser.add_argument("--only", nargs="*", help="names of the breakages to check")
    parser.add_argument("--list", action="store_true", help="list the breakages and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = parser.parse_args()
    chosen = [b for b in BREAKAGES if not args.only or b.name in args.only]
    if args.list:
        for b in chosen:
            print(f"{b.name:24} [{b.section}] {b.what}\n{'':24} {' '.join(b.tests)}")
        return 0
    print(f"| breakage | section | caught | catching test | s/run |\n| --- | --- | --- | --- | --- |")
    missed = 0
    for breakage in chosen:
        runs = min(args.runs, breakage.runs) if breakage.runs else args.runs
        result = check(breakage, runs, args.timeout)
        if not result["verdict"].startswith(f"caught {runs}/"):
            missed += 1
        print(f"| {breakage.what} (`{breakage.name}`) | {breakage.section} | {result['verdict']} | "
              f"{result['detail']} | {result.get('seconds', 0):.1f} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
