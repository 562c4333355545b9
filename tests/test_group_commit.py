"""The store's commit path: who commits (an idle caller itself, else the
writer thread), what every job is told, and the WAL starting over under load.

Each test holds the committer's role on purpose: a job that waits on a gate
inside its transaction keeps everyone else queued, so the order of events is
set by the test, not by the scheduler. The store is the real one, on a real
SQLite file.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import uuid

import pytest

import noyo_listener
from conftest import wait_until
from noyo_listener import StoreError, set_meta


@pytest.fixture
def store(tmp_path):
    store = noyo_listener.Store(str(tmp_path / "commit.sqlite3"), synchronous="NORMAL")
    store.open()
    yield store
    store.close()


def committed_keys(store) -> set[str]:
    with sqlite3.connect(store.path) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM meta")}


def record(key: str):
    """A job that writes ``key`` and answers with the name of the thread that committed it."""
    def job(conn: sqlite3.Connection) -> str:
        set_meta(conn, key, "v")
        return threading.current_thread().name
    return job


def failing(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO no_such_table VALUES (1)")


class Holder:
    """A thread whose write holds the role inside its transaction until released."""

    def __init__(self, store, name: str = "holder") -> None:
        self.gate = threading.Event()
        self.inside = threading.Event()
        self.answer: list = []

        def job(conn: sqlite3.Connection) -> str:
            self.inside.set()
            assert self.gate.wait(30)
            set_meta(conn, name, "v")
            return threading.current_thread().name

        self.thread = threading.Thread(target=lambda: self.answer.append(store.write(job)), name=name)
        self.thread.start()
        assert self.inside.wait(10), "the holder never started its transaction"

    def release(self) -> None:
        self.gate.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def writers(store, jobs: dict[str, object], timeout: float | None = None) -> tuple[dict, list[threading.Thread]]:
    """One thread per job, each waiting for its own write; answers collected by name."""
    answers: dict[str, tuple[str, object]] = {}

    def call(name: str, fn) -> None:
        try:
            answers[name] = ("ok", store.write(fn, timeout=timeout))
        except StoreError as exc:
            answers[name] = ("error", str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported to the test, not swallowed
            answers[name] = ("raised", repr(exc))

    threads = [threading.Thread(target=call, args=(name, fn), name=name) for name, fn in jobs.items()]
    for thread in threads:
        thread.start()
    return answers, threads


def queued(store, count: int) -> None:
    wait_until(lambda: len(store._pending) == count, message=f"{count} queued jobs")


def test_an_idle_caller_commits_its_own_job_and_leaves_the_queue_to_the_writer(store):
    # Idle: committed on the caller's own thread, no hand-off ...
    answer: list = []
    caller = threading.Thread(target=lambda: answer.append(store.write(record("idle"))), name="caller")
    caller.start()
    caller.join(30)
    assert answer == ["caller"]
    # ... but never on the main thread: its signal handlers raise (_Shutdown),
    # and a hand-off cut short there would leave the role with nobody.
    assert store.write(record("main")) == "noyo-writer"

    holder = Holder(store)  # an idle caller, now committing
    jobs = {f"t{i}": (failing if i == 4 else record(f"t{i}")) for i in range(8)}
    answers, threads = writers(store, jobs)
    queued(store, 8)
    holder.release()
    for thread in threads:
        thread.join(30)

    # The holder committed its own job only (its answer is not held up) ...
    assert holder.answer == ["holder"]
    # ... the writer thread committed what queued meanwhile as one batch ...
    assert answers["t4"][0] == "error" and "no_such_table" in answers["t4"][1]
    good = {name: answer for name, answer in answers.items() if name != "t4"}
    assert good == {name: ("ok", "noyo-writer") for name in good}, answers
    # ... and its bad job failed alone: every other row is there.
    assert committed_keys(store) == {"idle", "main", "holder"} | set(good)


def test_jobs_nobody_waits_for_are_committed_by_the_writer_thread(store):
    job = store.submit(record("idle"))
    assert job.wait(10) and job.error is None and job.result == "noyo-writer"

    # Queued while a caller commits its own job: the writer thread commits them.
    holder = Holder(store)
    jobs = [store.submit(record(f"async{i}")) for i in range(3)]
    holder.release()
    for job in jobs:
        assert job.wait(10), "a submitted job was never committed"
        assert job.error is None and job.result == "noyo-writer"
    assert holder.answer == ["holder"]
    assert {"idle", "async0", "async1", "async2"} <= committed_keys(store)


def test_a_caller_that_gave_up_is_told_so_and_its_job_still_commits(store):
    holder = Holder(store)
    answers, threads = writers(store, {"impatient": record("impatient")}, timeout=0.2)
    threads[0].join(30)
    assert answers["impatient"][0] == "error" and "did not finish" in answers["impatient"][1]
    holder.release()
    # Nobody waits for it any more: it is committed all the same (a retried
    # event is deduplicated), and the store keeps working.
    wait_until(lambda: "impatient" in committed_keys(store), message="the abandoned job's row")
    store.write(record("after"))
    assert "after" in committed_keys(store)


def test_close_commits_everything_queued_then_refuses_new_jobs(store):
    holder = Holder(store)
    submitted = [store.submit(record(f"queued{i}")) for i in range(5)]
    answers, threads = writers(store, {"waiting": record("waiting")})
    queued(store, 6)
    closing = threading.Thread(target=store.close)
    closing.start()
    wait_until(lambda: store._closed, message="close() to start")
    with pytest.raises(StoreError, match="closed"):
        store.submit(record("late"))
    holder.release()
    closing.join(30)
    threads[0].join(30)
    assert not closing.is_alive()
    assert all(job.finished and job.error is None for job in submitted)
    assert answers["waiting"][0] == "ok"
    assert committed_keys(store) == {"holder", "waiting"} | {f"queued{i}" for i in range(5)}


def test_an_interrupted_caller_rolls_back_and_the_queue_still_commits(store):
    """A caller committing its own job can be interrupted (Ctrl-C in the main
    thread): its transaction is rolled back, and what queued meanwhile is
    committed by the writer thread; nobody waits for ever."""
    gate, inside = threading.Event(), threading.Event()

    def interrupted(conn: sqlite3.Connection) -> None:
        set_meta(conn, "interrupted", "v")
        inside.set()
        assert gate.wait(30)
        raise KeyboardInterrupt

    answers, threads = writers(store, {"leader": interrupted})
    assert inside.wait(10)
    queued_answers, queued_threads = writers(store, {"a": record("a"), "b": record("b")})
    queued(store, 2)
    gate.set()
    for thread in threads + queued_threads:
        thread.join(30)
    assert answers["leader"][0] == "raised" and "KeyboardInterrupt" in answers["leader"][1]
    assert queued_answers == {"a": ("ok", "noyo-writer"), "b": ("ok", "noyo-writer")}
    assert committed_keys(store) == {"a", "b"}


def test_a_job_that_raises_systemexit_fails_its_batch_not_the_writer(store):
    holder = Holder(store)
    answers, threads = writers(store, {"a": record("a"), "exit": lambda conn: sys.exit(3)})
    queued(store, 2)
    holder.release()
    for thread in threads:
        thread.join(30)
    assert {status for status, _ in answers.values()} == {"error"}, answers
    assert store.writer_alive()
    job = store.submit(record("after"))
    assert job.wait(10) and job.result == "noyo-writer"
    assert committed_keys(store) == {"holder", "after"}


def test_the_wal_starts_over_while_writes_never_pause(tmp_path):
    """A checkpoint on another connection cannot copy frames committed while
    it runs, so under sustained writes the WAL never started over and grew by
    every frame ever written."""
    store = noyo_listener.Store(str(tmp_path / "wal.sqlite3"), synchronous="FULL")
    store.CHECKPOINT_EVERY = 0.01
    passes = []
    backfill = store._backfill
    store._backfill = lambda conn: (backfill(conn), passes.append(1))  # counted, not changed
    store.open()
    try:
        def write_until_enough_checkpoints() -> None:
            for _ in range(100_000):  # bounded, whatever the machine's speed
                if len(passes) >= 20 and store.commits >= 2000:
                    return
                store.write(record(str(uuid.uuid4())))

        threads = [threading.Thread(target=write_until_enough_checkpoints) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert len(passes) >= 20 and store.commits >= 2000
        wal_bytes = os.path.getsize(store.path + "-wal")
        # Each commit writes at least one 4 KiB frame: a WAL that never started
        # over holds them all.
        assert wal_bytes < store.commits * 4096 / 4, (wal_bytes, store.commits)
    finally:
        store.close()
