"""Break the metrics on purpose, one breakage at a time, and check that a test fails.

Applies each breakage to noyo_listener.py, runs the named tests of
tests/test_metrics.py, and restores the file (also on Ctrl-C). Run it before
changing the metrics: every line must say CAUGHT.

    python3 tests/metrics_breakages.py ["name of one breakage" ...]
"""
import subprocess
import sys
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
P = str(ROOT / "noyo_listener.py")
T = "tests/test_metrics.py"
BREAKS = [
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
original = open(P).read()
only = sys.argv[1:]
try:
    for name, old, new, tests in BREAKS:
        if new is None or (only and name not in only):
            continue
        assert original.count(old) == 1, name
        open(P, "w").write(original.replace(old, new))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", T, "-k", tests],
                           cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        last = r.stdout.strip().splitlines()[-1]
        print(f"{'CAUGHT' if r.returncode else 'MISSED'}  {name:32} -k '{tests}': {last}", flush=True)
finally:
    open(P, "w").write(original)
