""""200 means committed" and "one row per event", made to fail on purpose.

- A commit that fails must give a 503 and leave no row. The commit is made to
  fail without mounting anything (no root): the listener's file-size limit
  (RLIMIT_FSIZE, set on the running process with prlimit) stops the WAL from
  growing past a size, so SQLite's write of a large event gets EFBIG at COMMIT
  while small commits still fit. Lifting the limit makes it commit again.
- Identical deliveries that land in ONE commit batch must still leave one row,
  one non-duplicate answer and a delivery_count of every copy. The test makes
  them land together: it holds the database's write lock while a first event
  and then the copies are queued, so the writer takes them as one batch.
"""

from __future__ import annotations

import http.client
import json
import resource
import threading
import time

from conftest import event_body, signed_headers, wait_until

HEADROOM = 96 * 1024  # bytes the files may grow while limited: room for small commits and log lines
WAITRESS_SPOOLS_AT = 512 * 1024  # waitress writes larger bodies to a temporary file, which the limit would stop


def limit_file_size(pid: int, size: int) -> None:
    """Set the running listener's RLIMIT_FSIZE; a CI that forbids it fails here, it does not skip.

    Python ignores SIGXFSZ at start-up, so a write past the limit returns
    EFBIG instead of killing the process."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def event_ids(listener) -> set[str]:
    with listener.db() as conn:
        return {r[0] for r in conn.execute("SELECT event_id FROM events")}


def test_a_commit_that_cannot_be_written_is_503_with_no_row_then_200_once_it_can(start_listener):
    listener = start_listener(server={"max_body_bytes": 2 * 1024 * 1024}, database={"busy_timeout": "1s"})
    assert listener.send(event_body(event_id="before"))[0] == 200
    # Every file the listener writes may stay as it is, none may grow by a large event.
    files = [listener.ini.parent / name for name in ("noyo.sqlite3", "noyo.sqlite3-wal")] + [listener.log_path]
    limit = max(path.stat().st_size for path in files) + HEADROOM
    assert limit + HEADROOM < WAITRESS_SPOOLS_AT, f"the files are already {limit - HEADROOM} bytes"

    limit_file_size(listener.proc.pid, limit)
    big = event_body(event_id="too-big-for-the-wal", padding="x" * (limit + HEADROOM // 2))
    status, answer = listener.send(big)
    assert status == 503, answer
    assert "too-big-for-the-wal" not in event_ids(listener)
    listener.wait_for_log(r"status=503 .*event_id=too-big-for-the-wal .*reason=not_stored")
    # Small commits still fit under the limit: the writer survived the failure.
    assert listener.send(event_body(event_id="small-while-limited"))[0] == 200
    assert listener.proc.poll() is None

    limit_file_size(listener.proc.pid, resource.RLIM_INFINITY)
    # Noyo retries; once the file may grow, a retry is stored.
    wait_until(lambda: listener.send(big)[0] == 200, 15, "the large event accepted once the limit is lifted")
    assert {"before", "small-while-limited", "too-big-for-the-wal"} <= event_ids(listener)
    assert "Traceback" not in listener.log()


def server_read_everything(port: int, connections: int) -> bool:
    """True once ``connections`` established server-side sockets on ``port``
    have nothing left unread in the kernel (from /proc/net/tcp)."""
    unread = []
    with open("/proc/net/tcp") as handle:
        for line in handle.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
                unread.append(int(fields[4].split(":")[1], 16))
    return len(unread) >= connections and all(n == 0 for n in unread)


def post_on_its_own_connection(port: int, path: str, body: bytes, answers: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=signed_headers(body))
        response = conn.getresponse()
        answers.append((response.status, json.loads(response.read())))
    finally:
        conn.close()


COPIES = 12
ROUNDS = 3


def test_identical_deliveries_in_one_commit_batch_leave_one_row_and_count_every_copy(start_listener):
    listener = start_listener(server={"threads": COPIES + 4}, database={"busy_timeout": "20s"})
    for round_number in range(ROUNDS):
        event_id = f"same-{round_number}"
        body = event_body("group.created", event_id=event_id)
        blocker = listener.db()
        blocker.isolation_level = None
        blocker.execute("BEGIN IMMEDIATE")  # the writer waits here with the first job it took
        answers: list = []
        first = threading.Thread(target=post_on_its_own_connection, args=(
            listener.port, listener.path, event_body("group.created", event_id=f"first-{round_number}"), answers))
        first.start()
        wait_until(lambda: server_read_everything(listener.port, 1), message="the first event read")
        copies = [threading.Thread(target=post_on_its_own_connection,
                                   args=(listener.port, listener.path, body, answers)) for _ in range(COPIES)]
        for thread in copies:
            thread.start()
        wait_until(lambda: server_read_everything(listener.port, COPIES + 1), message="every copy read")
        # Margin for the request threads to verify and queue what they read. It
        # only decides how likely a broken in-batch dedupe is caught; the
        # assertions below hold for a correct listener however it falls.
        time.sleep(0.5)
        blocker.execute("ROLLBACK")
        blocker.close()
        for thread in [first, *copies]:
            thread.join(60)

        assert [status for status, _ in answers] == [200] * (COPIES + 1)
        with listener.db() as conn:
            row = conn.execute("SELECT delivery_count FROM events WHERE event_id = ?", (event_id,)).fetchone()
            deliveries = conn.execute("SELECT COUNT(*), SUM(duplicate) FROM deliveries WHERE event_id = ?",
                                      (event_id,)).fetchone()
        new_answers = sum(1 for _, answer in answers if not answer.get("duplicate"))
        assert new_answers == 2, f"round {round_number}: {new_answers - 1} copies were answered as new"
        assert row[0] == COPIES, f"round {round_number}: delivery_count {row[0]}"
        assert tuple(deliveries) == (COPIES, COPIES - 1)
