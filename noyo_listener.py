#!/usr/bin/env python3
"""noyo-listener: receive Noyo webhooks, store them durably, fetch the truth.

A single-module daemon. A Bottle app served by waitress verifies each signed
POST and commits it to SQLite (WAL) before answering 200; a worker thread in
the same process drains that inbox, fetches the object each event points to
from the Noyo REST API, and keeps the latest state of every difference and
other object in tables an operator reads with the ``sqlite3`` CLI.

Sections, in the order data flows:
configuration -> storage -> signature -> HTTP app -> Noyo client -> worker
-> command line -> main().
"""

from __future__ import annotations

import _thread
import argparse
import base64
import collections
import configparser
import dataclasses
import datetime as dt
import email.utils
import errno
import fcntl
import hashlib
import hmac
import http.client
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Iterable

__version__ = "0.1.0"

logger = logging.getLogger("noyo_listener")

USER_AGENT = f"noyo-listener/{__version__}"

# The example ini ships this secret so the listener runs as is on a laptop.
# `serve` warns loudly while it is configured: anyone can read it here.
DEVELOPMENT_SECRET = "noyo-listener-development-secret-change-me"


# --- Configuration ---------------------------------------------------------


class ConfigError(Exception):
    """The configuration cannot be used; the message is one readable line."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SECRET_NAME_RE = re.compile(r"^([A-Za-z0-9_.-]{1,64}):(.*)$")
_FETCH_PLACEHOLDERS = {"id": "ID", "tracking_url": "T", "fulfillment_url": "F"}


def parse_duration(text: str) -> float:
    """Parse ``500ms``, ``10s``, ``5m``, ``1h``, ``4d`` or bare seconds into seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError("expected a number with a unit ms, s, m, h or d, like 10s")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration, for check-config output."""
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == 0:
        return "0s"
    return f"{seconds * 1000:.3f}".rstrip("0").rstrip(".") + "ms"


def parse_secrets(text: str) -> list[tuple[str, str]]:
    """Parse ``name:secret, other`` into ``[(name, secret), ...]``.

    A bare secret is named by its position (``secret1``, ``secret2``...), so
    the ``deliveries`` table can still say which one matched.
    """
    secrets: list[tuple[str, str]] = []
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        match = _SECRET_NAME_RE.match(item)
        name, secret = (match.group(1), match.group(2).strip()) if match else (f"secret{position}", item)
        if not secret:
            raise ValueError(f"secret {name!r} is empty")
        if any(name == other for other, _ in secrets):
            raise ValueError(f"secret name {name!r} is used twice")
        secrets.append((name, secret))
    return secrets


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _url_path(text: str) -> str:
    text = text.strip()
    if not text.startswith("/") or any(c.isspace() for c in text):
        raise ValueError("must start with / and contain no spaces")
    if text == "/healthz":
        raise ValueError("/healthz is reserved for the health check")
    return text


def is_http_url(text: str) -> bool:
    try:
        parsed = urllib.parse.urlsplit(text)
    except ValueError:  # e.g. an unclosed [IPv6 bracket
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _http_url(text: str) -> str:
    text = text.strip().rstrip("/")
    if not is_http_url(text):
        raise ValueError("must be an http:// or https:// URL")
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip()
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        raise ValueError("must be one of " + ", ".join(choices))

    return convert


def _duration_at_least(minimum: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        value = parse_duration(text)
        if value < minimum:
            raise ValueError(f"must be at least {format_duration(minimum)}")
        return value

    return convert


def _optional(text: str) -> str:
    return text.strip()


# (section, key) -> (converter, default, is_secret). The default is ini text,
# converted like any value from the file, so check-config shows one truth.
_SCHEMA: dict[str, dict[str, tuple[Callable[[str], Any], str, bool]]] = {
    "server": {
        "host": (_nonempty, "127.0.0.1", False),
        "port": (_int_in(0, 65535), "8080", False),  # 0 picks a free port
        "path": (_url_path, "/noyo/webhooks", False),
        "threads": (_int_in(1, 256), "16", False),  # measured: see README, Performance
        "max_body_bytes": (_int_in(1, 64 * 1024 * 1024), "1048576", False),
    },
    "webhook": {
        "secrets": (parse_secrets, "", True),
        "signature_payload": (_choice("auto", "timestamp.body", "body"), "auto", False),
        "max_timestamp_age": (_duration_at_least(0), "4d", False),  # 0 = no age check
        "max_clock_skew": (_duration_at_least(0), "5m", False),
    },
    "database": {
        "path": (_nonempty, "noyo_listener.sqlite3", False),
        "synchronous": (_choice("OFF", "NORMAL", "FULL", "EXTRA"), "FULL", False),
        "dedupe_days": (_int_in(1, 3650), "30", False),
        "busy_timeout": (_duration_at_least(0.001), "5s", False),
    },
    "noyo_api": {
        "client_id": (_optional, "", False),  # an identifier; may come from env/credentials all the same
        "client_secret": (_optional, "", True),
        "token_url": (_http_url, "https://accounts.noyo.com/auth/public/token", False),
        "tracking_url": (_http_url, "https://tracking.noyo.com", False),
        "fulfillment_url": (_http_url, "https://fulfillment.noyo.com", False),
        "timeout": (_duration_at_least(0.001), "10s", False),
    },
    "worker": {
        "concurrency": (_int_in(1, 64), "4", False),
        "max_attempts": (_int_in(1, 1000), "20", False),
        "backoff_initial": (_duration_at_least(0.001), "1s", False),
        "backoff_max": (_duration_at_least(0.001), "1h", False),
    },
    "log": {
        "level": (_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", False),
    },
}

DEFAULT_FETCH = {
    "difference": "{tracking_url}/api/v1/differences/{id}",
    "member_snapshot": "{fulfillment_url}/api/v1/member_snapshots/{id}",
    "group": "{fulfillment_url}/api/v1/groups/{id}",
    "group_connection_request": "{fulfillment_url}/api/v1/group_connections/{id}",
    "group_disconnection_request": "{fulfillment_url}/api/v1/group_disconnection_requests/{id}",
}

# Secrets that may come from the environment or systemd credentials; those win
# over the file (credentials over environment: they are the more deliberate).
_SECRET_SOURCES = {
    "NOYO_WEBHOOK_SECRETS": ("webhook", "secrets"),
    "NOYO_CLIENT_ID": ("noyo_api", "client_id"),
    "NOYO_CLIENT_SECRET": ("noyo_api", "client_secret"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective configuration: defaults, then the ini, then env/credentials."""

    values: dict[str, dict[str, Any]]
    fetch: dict[str, str]
    sources: dict[tuple[str, str], str]  # where a secret came from, for check-config
    config_path: str

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    def fetch_url(self, kind: str, object_id: str) -> str | None:
        """The URL of the object an event of ``kind`` points to, or None."""
        template = self.fetch.get(kind)
        if template is None:
            return None
        api = self.values["noyo_api"]
        return template.format(
            id=urllib.parse.quote(object_id, safe=""),
            tracking_url=api["tracking_url"],
            fulfillment_url=api["fulfillment_url"],
        )

    @property
    def fetching_enabled(self) -> bool:
        api = self.values["noyo_api"]
        return bool(api["client_id"] and api["client_secret"])


def _read_secret_overrides(environ: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Secrets from ``$CREDENTIALS_DIRECTORY`` and the environment: name -> (value, source)."""
    found: dict[str, tuple[str, str]] = {}
    for name in _SECRET_SOURCES:
        if environ.get(name):
            found[name] = (environ[name], "environment")
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        for name in _SECRET_SOURCES:
            path = os.path.join(cred_dir, name)
            try:
                with open(path, encoding="utf-8") as handle:
                    value = handle.read().strip()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConfigError(f"cannot read credential {path}: {exc.strerror}") from None
            if value:  # an empty file means "not set", like an empty variable
                found[name] = (value, "credential")
    return found


def load_settings(path: str, environ: dict[str, str] | None = None) -> Settings:
    """Read and validate the ini at ``path``; raise ConfigError with one line."""
    environ = dict(os.environ if environ is None else environ)
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found; pass --config PATH or set NOYO_LISTENER_CONFIG"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a valid ini file: " + " ".join(str(exc).split())) from None

    for section in parser.sections():
        if section not in _SCHEMA and section != "fetch":
            raise ConfigError(f"{path}: unknown section [{section}]; known: " + ", ".join([*_SCHEMA, "fetch"]))
        if section in _SCHEMA:
            for key in parser[section]:
                if key not in _SCHEMA[section]:
                    known = ", ".join(_SCHEMA[section])
                    raise ConfigError(f"[{section}] {key} is not a known key; known keys: {known}")

    raw = {section: {key: spec[1] for key, spec in keys.items()} for section, keys in _SCHEMA.items()}
    sources: dict[tuple[str, str], str] = {}
    for section in _SCHEMA:
        if parser.has_section(section):
            for key, text in parser[section].items():
                raw[section][key] = text
                sources[(section, key)] = "file"
    for name, (text, source) in _read_secret_overrides(environ).items():
        section, key = _SECRET_SOURCES[name]
        raw[section][key] = text
        sources[(section, key)] = f"{source} {name}"

    values: dict[str, dict[str, Any]] = {}
    for section, keys in _SCHEMA.items():
        values[section] = {}
        for key, (convert, _default, is_secret) in keys.items():
            text = raw[section][key]
            try:
                values[section][key] = convert(text)
            except ValueError as exc:
                shown = "" if is_secret else f" (got {text!r})"
                raise ConfigError(f"[{section}] {key}: {exc}{shown}") from None

    fetch = _fetch_templates(parser["fetch"] if parser.has_section("fetch") else {})
    settings = Settings(values=values, fetch=fetch, sources=sources, config_path=path)
    _validate_together(settings)
    return settings


def _fetch_templates(entries: Any) -> dict[str, str]:
    """[fetch] laid over the defaults; an empty entry turns a kind off."""
    fetch = dict(DEFAULT_FETCH)
    for kind, template in entries.items():
        template = template.strip()
        if not template:
            fetch.pop(kind, None)
            continue
        try:
            template.format(**_FETCH_PLACEHOLDERS)
        except (KeyError, IndexError, ValueError):
            raise ConfigError(
                f"[fetch] {kind}: only {{id}}, {{tracking_url}} and {{fulfillment_url}} "
                f"may appear in the template (got {template!r})"
            ) from None
        if "{id}" not in template:
            raise ConfigError(f"[fetch] {kind}: the template must contain {{id}} (got {template!r})")
        fetch[kind] = template
    return fetch


def _validate_together(settings: Settings) -> None:
    """Refuse combinations of keys that are each valid but wrong together."""
    webhook, database, worker, api = (
        settings["webhook"], settings["database"], settings["worker"], settings["noyo_api"])
    if not webhook["secrets"]:
        raise ConfigError(
            "[webhook] secrets is empty: set it in the ini, in NOYO_WEBHOOK_SECRETS "
            "or as the systemd credential NOYO_WEBHOOK_SECRETS"
        )
    if webhook["max_timestamp_age"] > database["dedupe_days"] * 86400:
        raise ConfigError(
            "[webhook] max_timestamp_age must not exceed [database] dedupe_days, or a replay "
            f"older than the dedupe window would be accepted (got {format_duration(webhook['max_timestamp_age'])} "
            f"> {database['dedupe_days']}d)"
        )
    if worker["backoff_max"] < worker["backoff_initial"]:
        raise ConfigError(
            f"[worker] backoff_max must be >= backoff_initial (got {format_duration(worker['backoff_max'])} "
            f"< {format_duration(worker['backoff_initial'])})"
        )
    if bool(api["client_id"]) != bool(api["client_secret"]):
        raise ConfigError("[noyo_api] set both client_id and client_secret, or neither (fetching off)")


def mask_secret(secret: str) -> str:
    """Show that a secret is set without revealing it."""
    return "********" if secret else "(not set)"


def describe_settings(settings: Settings) -> list[str]:
    """The effective settings as ini lines, secrets masked (for check-config)."""
    lines = [f"# effective settings of {settings.config_path}"]
    for section, keys in _SCHEMA.items():
        lines.append(f"[{section}]")
        for key, (_convert, _default, is_secret) in keys.items():
            value = settings[section][key]
            if key == "secrets":
                shown = ", ".join(f"{name}:{mask_secret(secret)}" for name, secret in value)
            elif is_secret:
                shown = mask_secret(value)
            elif value == "":
                shown = "(not set)"
            elif isinstance(value, float):
                shown = format_duration(value)
            else:
                shown = str(value)
            source = settings.sources.get((section, key), "default")
            suffix = f"  # from {source}" if source not in ("file",) else ""
            lines.append(f"{key} = {shown}{suffix}")
    lines.append("[fetch]")
    lines.extend(f"{kind} = {template}" for kind, template in sorted(settings.fetch.items()))
    return lines


# --- Storage ---------------------------------------------------------------


class StoreError(Exception):
    """The database could not commit a write; the caller must not acknowledge."""


class _SecondText:
    """``strftime`` of a whole second, redone only when the second changes:
    every acknowledgement stamps its row and logs a line, and strftime was
    most of the cost of both."""

    def __init__(self, pattern: str, convert: Callable[[float], time.struct_time]) -> None:
        self.pattern = pattern
        self.convert = convert
        self._last: tuple[int, str] = (-1, "")  # one tuple: threads never see half an update

    def text(self, whole: int) -> str:
        second, text = self._last
        if second != whole:
            text = time.strftime(self.pattern, self.convert(whole))
            self._last = (whole, text)
        return text


_UTC_SECONDS = _SecondText("%Y-%m-%dT%H:%M:%S", time.gmtime)


def utc_iso(timestamp: float | None = None) -> str:
    """UTC ISO 8601 text with milliseconds, as every timestamp this program writes."""
    if timestamp is None:
        timestamp = time.time()
    whole = int(timestamp)
    return f"{_UTC_SECONDS.text(whole)}.{int((timestamp - whole) * 1000):03d}Z"


def parse_utc_iso(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 timestamp (naive means UTC)."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):  # fromisoformat reads "Z" only from Python 3.11 on
        text = text[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


# Each migration and its user_version commit together (sqlite-utils style).
# Migration N takes the schema from version N-1 to N; never edit a shipped one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE events (
        event_id        TEXT PRIMARY KEY,
        type            TEXT NOT NULL,
        data_id         TEXT,
        created         INTEGER,               -- Noyo's event.created, unix seconds
        received_at     TEXT NOT NULL,         -- first arrival, UTC ISO 8601
        payload         TEXT NOT NULL,         -- the raw JSON body
        status          TEXT NOT NULL CHECK (status IN ('pending', 'done', 'ignored', 'dead')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT,
        last_error      TEXT,
        delivery_count  INTEGER NOT NULL DEFAULT 1,
        processed_at    TEXT,
        lease_until     TEXT                   -- set while a fetch is in flight
    );
    -- Every index costs each acknowledgement a b-tree update: only those the
    -- daemon needs. Operators' ad-hoc queries by type or data_id scan.
    CREATE INDEX events_due ON events (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX events_received ON events (received_at);

    CREATE TABLE deliveries (
        id             INTEGER PRIMARY KEY,
        event_id       TEXT NOT NULL,
        received_at    TEXT NOT NULL,
        noyo_timestamp TEXT,
        trace_context  TEXT,
        secret_name    TEXT NOT NULL,
        signature_form TEXT NOT NULL CHECK (signature_form IN ('timestamp.body', 'body')),
        duplicate      INTEGER NOT NULL CHECK (duplicate IN (0, 1))
    );
    CREATE INDEX deliveries_event ON deliveries (event_id);
    -- Deliveries are append-only: pruning walks them from the oldest rowid.

    CREATE TABLE differences (
        id                        TEXT PRIMARY KEY,
        state                     TEXT NOT NULL CHECK (state IN ('pending', 'discrepancy', 'resolved', 'replaced')),
        resolved                  INTEGER,
        discrepancy_time          INTEGER,
        modified                  INTEGER,
        version                   INTEGER,
        group_id                  TEXT,
        employee_id               TEXT,
        carrier_id                TEXT,
        difference_type           TEXT,
        difference_classification TEXT,
        last_event_type           TEXT,
        last_event_created        INTEGER,
        replaced                  INTEGER NOT NULL DEFAULT 0,  -- a difference.replaced event was seen
        replaced_by               TEXT,
        fetched_at                TEXT,
        body                      TEXT
    );
    CREATE INDEX differences_state ON differences (state, group_id);

    CREATE TABLE resources (
        kind       TEXT NOT NULL,
        id         TEXT NOT NULL,
        modified   INTEGER,
        fetched_at TEXT NOT NULL,
        body       TEXT NOT NULL,
        PRIMARY KEY (kind, id)
    );

    -- Small facts the daemon shares with `status` (API state, last fetch...).
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    """
    -- Views for operators: sqlite3 -box noyo_listener.sqlite3 'select * from open_discrepancies'
    CREATE VIEW open_discrepancies AS
        SELECT id AS difference_id, group_id, employee_id, carrier_id, difference_type,
               difference_classification, datetime(discrepancy_time, 'unixepoch') AS discrepancy_since,
               last_event_type, fetched_at
        FROM differences WHERE state = 'discrepancy' ORDER BY discrepancy_time;
    CREATE VIEW pending_events AS
        SELECT event_id, type, data_id, attempts, next_attempt_at, last_error, received_at
        FROM events WHERE status = 'pending' ORDER BY next_attempt_at;
    CREATE VIEW dead_events AS
        SELECT event_id, type, data_id, attempts, last_error, received_at
        FROM events WHERE status = 'dead' ORDER BY received_at;
    CREATE VIEW recent_events AS
        SELECT event_id, type, data_id, status, attempts, delivery_count, received_at, processed_at, last_error
        FROM events ORDER BY received_at DESC LIMIT 100;
    CREATE VIEW repeated_deliveries AS
        SELECT d.event_id, e.type, e.delivery_count, d.received_at, d.noyo_timestamp, d.secret_name,
               d.signature_form
        FROM deliveries d JOIN events e USING (event_id) WHERE e.delivery_count > 1
        ORDER BY d.event_id, d.received_at;
    """,
    """
    -- deliveries_event put each acknowledgement's random event id into a
    -- second b-tree: a third of the pages every commit wrote to the WAL
    -- (bench/run.py). Only operators' ad-hoc queries used it; the daemon
    -- looks deliveries up by rowid and age, and repeated_deliveries joins
    -- through the events primary key.
    DROP INDEX IF EXISTS deliveries_event;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: str, synchronous: str = "FULL", busy_timeout: float = 5.0, mode: str = "write") -> sqlite3.Connection:
    """Open ``path`` with the pragmas every connection of this program uses.

    ``mode`` is ``write`` (sets up WAL, synchronous and auto_vacuum: only the
    writer and the CLI's own writers), ``read`` (a reader of a database the
    writer has set up: it must never wait for a write lock) or ``readonly``
    (the file opened read-only, for `status` and `backup`).

    Autocommit mode: writers say ``BEGIN IMMEDIATE`` themselves, so a
    transaction never upgrades from read to write halfway (which can fail
    with SQLITE_BUSY regardless of the busy timeout).
    """
    if mode == "readonly":
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    if mode == "write":
        # Lets prune give pages back. Only takes effect on a new, empty file,
        # and only if set before WAL mode writes the header.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        journal = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if journal.lower() != "wal":
            conn.close()
            raise StoreError(f"{path}: SQLite refused WAL mode (journal_mode is {journal}); is it on a network filesystem?")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


def _create_private_file(path: str) -> None:
    """Create the database file readable by its owner only (it holds PII).

    SQLite gives the -wal and -shm files the mode of the database file, so
    this one decision covers all three.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            logger.warning("database file was readable by others; mode set to 0600 path=%s was=%o", path, mode)
    finally:
        os.close(fd)


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring the schema to SCHEMA_VERSION; return the version found before."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {found}, newer than this program's {SCHEMA_VERSION}; "
            "run the newer noyo_listener.py or restore a backup"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(MIGRATIONS[version - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        logger.info("database schema migrated path=%s version=%d", path, version)
    return found


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (executescript would COMMIT on its own)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return [s for s in statements if s]


def require_directory_of(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(f"directory {directory} for [database] path does not exist; create it first")


class _WriteJob:
    """One unit of work for the committer; its submitter may wait on it.

    Completion is a bare lock, held from creation and released once the job
    is committed or has failed: threading.Event is Python code over a
    Condition, and its wait/set pair cost more CPU per request than the
    INSERTs themselves (bench/run.py).
    """

    __slots__ = ("fn", "batch_fn", "item", "_done", "result", "error", "finished")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any] | None,
                 batch_fn: Callable[[sqlite3.Connection, list], list] | None = None, item: Any = None) -> None:
        self.fn = fn
        self.batch_fn = batch_fn  # jobs with the same batch_fn run as one call
        self.item = item
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False

    def wait(self, timeout: float) -> bool:
        """True once the job was committed or failed, False after ``timeout`` seconds."""
        if self._done.acquire(timeout=timeout):
            self._done.release()  # later waits return at once
            return True
        return False

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.finished = True
        self._done.release()


_STOP = object()


class Store:
    """The SQLite database: one write connection, group commit, short reads.

    Every write goes through one connection, used by one thread at a time:
    whoever holds the committer's role. Jobs queued while a transaction is
    being committed are committed together in the next one, so many
    acknowledgements share one fsync while each still waits for its own row
    to be on disk. Several connections writing at once would instead make
    SQLite's busy handler sleep for milliseconds (see PERF-NOTES).

    Under load the writer thread holds the role and commits whatever queued
    up meanwhile. Idle (nobody committing, the last commit carried one job),
    a thread that waits for its job commits it itself: no hand-off to the
    writer thread and back, 17% less CPU and 60% fewer context switches per
    request at one connection (bench/README.md). Such a leader commits only
    until its own job is committed, then leaves what queued meanwhile to the
    writer thread, so its own answer is not held up. Handing the role to a
    waiting request thread under load too (leader/follower) was measured and
    not kept: commits got smaller (9 instead of 12.5 jobs) and an ack cost
    8-15% more CPU. Jobs nobody waits for (``submit``) always go to the
    writer thread.
    """

    MAX_BATCH = 256

    def __init__(self, path: str, synchronous: str = "FULL", busy_timeout: float = 5.0) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._writer: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._stopped = threading.Event()
        self._checkpointer: threading.Thread | None = None
        # The committer's role and the queue: _lock guards _pending, _committing
        # (someone holds the role) and _closed.
        self._lock = _thread.allocate_lock()
        self._pending: list[_WriteJob] = []
        self._committing = False
        self._writer_turn = _thread.allocate_lock()  # released to hand the role to the writer thread
        self._writer_turn.acquire()
        self._catch_up_since: int | None = None  # set by the checkpointer: see _backfill
        self._last_batch = 0
        self.last_commit_error: str | None = None
        self.commits = 0  # transactions committed, and the jobs they carried
        self.jobs_committed = 0
        self._error_logged = 0.0

    def open(self) -> None:
        """Create or migrate the database and start the writer thread."""
        require_directory_of(self.path)
        try:
            _create_private_file(self.path)
            conn = connect(self.path, self.synchronous, self.busy_timeout)
            migrate(conn, self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot open database {self.path}: {exc.strerror}") from None
        # Checkpoints run on their own thread (PASSIVE: they never block the
        # committer) instead of inside whichever commit crosses the WAL threshold.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        # A WAL that grew while it could not start over (a long reader) is cut
        # back to this size when it next does.
        conn.execute(f"PRAGMA journal_size_limit = {self.WAL_SIZE_LIMIT}")
        self._conn = conn
        self._writer = threading.Thread(target=self._run_writer, name="noyo-writer", daemon=True)
        self._writer.start()
        self._checkpointer = threading.Thread(target=self._run_checkpointer, name="noyo-checkpoint", daemon=True)
        self._checkpointer.start()

    CHECKPOINT_EVERY = 1.0  # seconds
    CATCH_UP_JOBS = 256  # at most about this many jobs' frames are copied by the committer itself
    WAL_SIZE_LIMIT = 64 * 1024 * 1024

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection, mode: str) -> tuple[int, int, int] | None:
        """PASSIVE copies what it can without waiting; TRUNCATE also empties the WAL file.
        Returns SQLite's (busy, frames in the WAL, frames copied), or None if it failed."""
        try:
            return tuple(conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint failed mode=%s error=%s", mode, exc)
            return None

    def _run_checkpointer(self) -> None:
        conn = self.read()
        try:
            while not self._stopped.wait(self.CHECKPOINT_EVERY):
                self._backfill(conn)
        finally:
            conn.close()

    def _backfill(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database, then have the committer copy the last frames.

        SQLite starts the WAL over from its first frame only when a write
        transaction begins with every frame copied. Under sustained load new
        frames arrive while any other connection checkpoints, so the WAL
        never started over: it grew by ~8 KB per event (250 MB after 30,000),
        and each commit appended to new file blocks, which the file system
        allocates and zeroes. Passes here copy the bulk (each pass copies what
        was committed during the one before); once a pass was short, the
        committer copies the few frames committed during it from its own
        connection between two commits, and the next commit writes at the
        start of the WAL again (bench/README.md).
        """
        for _ in range(4):
            jobs = self.jobs_committed
            counts = self._checkpoint(conn, "PASSIVE")
            if counts is None or counts[1] <= 0:  # failed, busy, not WAL, or nothing written
                return
            if self.jobs_committed - jobs <= self.CATCH_UP_JOBS:
                self._catch_up_since = jobs
                return

    def _catch_up(self) -> None:
        """Holding the role: copy the frames committed since the checkpointer's
        last pass, if few (else its next pass will)."""
        since, self._catch_up_since = self._catch_up_since, None
        if since is not None and self.jobs_committed - since <= 2 * self.CATCH_UP_JOBS:
            self._checkpoint(self._conn, "PASSIVE")

    def writer_alive(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def submit(self, fn: Callable[[sqlite3.Connection], Any] | None,
               batch_fn: Callable[[sqlite3.Connection, list], list] | None = None, item: Any = None) -> _WriteJob:
        """Queue ``fn(conn)`` to run inside a write transaction; it is committed
        whether or not anyone waits for it (``result_of``).

        With ``batch_fn``, the job is ``item``: queued jobs with the same
        ``batch_fn`` are handed over together as ``batch_fn(conn, items)``,
        which returns one result per item (fewer SQLite calls per commit).
        """
        job = _WriteJob(fn, batch_fn, item)
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            self._pending.append(job)
            if self._committing:
                return job  # whoever commits now leaves queued jobs to the writer thread
            self._committing = True
        self._writer_turn.release()
        return job

    def write(self, fn: Callable[[sqlite3.Connection], Any] | None, timeout: float | None = None,
              batch_fn: Callable[[sqlite3.Connection, list], list] | None = None, item: Any = None) -> Any:
        """Run ``fn(conn)`` (or ``batch_fn`` on ``item``) in a write transaction;
        return its result once committed.

        Raises StoreError if the commit failed or did not finish in ``timeout``
        seconds; then nothing may be acknowledged (the job may still commit
        later, which is safe: events are deduplicated by id).
        """
        job = _WriteJob(fn, batch_fn, item)
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            self._pending.append(job)
            lead = None  # someone commits now: wait for them
            if not self._committing:
                self._committing = True
                lead = self._last_batch <= 1  # idle: commit it here; under load: the writer thread
        if lead:
            self._lead(job)
        elif lead is not None:
            self._writer_turn.release()
        return self.result_of(job, timeout)

    def result_of(self, job: _WriteJob, timeout: float | None = None) -> Any:
        """Wait for a submitted job's commit; its result, or StoreError as in ``write``."""
        if timeout is None:
            timeout = self.busy_timeout * 2 + 5  # room for two lock waits and the commit
        if not job.wait(timeout):
            raise StoreError(f"commit did not finish within {timeout:g}s")
        if job.error is not None:
            raise StoreError(str(job.error)) from job.error
        return job.result

    def _lead(self, job: _WriteJob) -> None:
        """Holding the role: commit the queue until ``job`` is committed, then pass the role on."""
        try:
            while not job.finished:
                self._commit(self._take_batch())
        finally:
            self._hand_over(by_writer=False)

    def _take_batch(self) -> list[_WriteJob]:
        with self._lock:
            batch = self._pending[:self.MAX_BATCH]
            del self._pending[:self.MAX_BATCH]
        return batch

    def _hand_over(self, by_writer: bool) -> bool:
        """After a commit: give the role up if nothing is left to do, else make
        sure the writer thread has it (queued jobs, a WAL catch-up, close).
        True if the calling writer thread keeps it."""
        with self._lock:
            if not self._pending and not self._closed and self._catch_up_since is None:
                self._committing = False
                return False
            if by_writer:
                return True
        self._writer_turn.release()
        return False

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (cannot run inside a transaction)."""
        conn = self.read()
        try:
            self._checkpoint(conn, "TRUNCATE")
        finally:
            conn.close()

    def read(self) -> sqlite3.Connection:
        """A new connection for reading (WAL readers never block the writer)."""
        return connect(self.path, self.synchronous, self.busy_timeout, mode="read")

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, stop the writer, close. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no new jobs; the role ends with the writer thread
            idle = not self._committing
            self._committing = True
        self._stopped.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout)
        if self._writer is not None:
            if idle:
                self._writer_turn.release()
            self._writer.join(timeout)
            if self._writer.is_alive():
                logger.warning("database writer did not stop within %gs", timeout)
                return
        if self.commits:
            logger.info("database writer stopped commits=%d writes=%d writes_per_commit=%.1f",
                        self.commits, self.jobs_committed, self.jobs_committed / self.commits)
        if self._conn is not None:
            self._checkpoint(self._conn, "TRUNCATE")
            self._conn.close()
            self._conn = None

    def _run_writer(self) -> None:
        while True:
            self._writer_turn.acquire()  # the role is this thread's until _hand_over gives it up
            while True:
                if self._catch_up_since is not None:
                    self._catch_up()
                if self._last_batch > 1:
                    # Under load, let the request threads that are between reading
                    # and submitting join this commit before it starts: each commit
                    # costs ~400 us of CPU around its fsync, and this one yield
                    # takes writes per commit from 5.4 to 15 at 16 connections
                    # (+12-17% acks/s, same p99; bench/run.py). Idle, nothing waits.
                    os.sched_yield()
                batch = self._take_batch()
                if batch:
                    try:
                        self._commit(batch)
                    except BaseException:  # noqa: BLE001 - a job raised SystemExit or the like; its batch was told
                        logger.exception("database write job interrupted the commit")
                elif self._closed:
                    return  # drained; the role stays taken, so nobody uses the connection
                if not self._hand_over(by_writer=True):
                    break

    @staticmethod
    def _run_jobs(conn: sqlite3.Connection, batch: list[_WriteJob]) -> list:
        results: list = []
        start = 0
        while start < len(batch):
            job = batch[start]
            if job.batch_fn is None:
                results.append(job.fn(conn))
                start += 1
                continue
            end = start + 1
            while end < len(batch) and batch[end].batch_fn is job.batch_fn:
                end += 1
            results.extend(job.batch_fn(conn, [j.item for j in batch[start:end]]))
            start = end
        return results

    def _commit(self, batch: list[_WriteJob]) -> None:
        """One transaction for ``batch``; every job gets its answer, whatever happens."""
        try:
            self._commit_or_split(batch)
        except BaseException as exc:
            # Not a failed job but this thread interrupted (KeyboardInterrupt in
            # the main thread): nobody may wait for ever, the connection must
            # be left outside a transaction.
            self._rollback()
            for job in batch:
                if not job.finished:
                    job.finish(error=StoreError(f"commit interrupted: {exc!r}"))
            raise

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _commit_or_split(self, batch: list[_WriteJob]) -> None:
        conn = self._conn
        assert conn is not None
        self._last_batch = len(batch)
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = self._run_jobs(conn, batch)
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - every job must get an answer
            self._rollback()
            if len(batch) > 1:
                # One bad job must not fail the others: retry each on its own.
                for job in batch:
                    self._commit_or_split([job])
                return
            job = batch[0]
            if not isinstance(exc, sqlite3.Error):
                logger.exception("database write job failed")
            elif str(exc) != self.last_commit_error or time.monotonic() - self._error_logged > 30:
                # Each refused request logs its own line; this says why, once per cause and 30 s.
                self._error_logged = time.monotonic()
                logger.error("database commit failed error=%s", exc)
            self.last_commit_error = str(exc)
            job.finish(error=exc)
            return
        self.commits += 1
        self.jobs_committed += len(batch)
        if self.last_commit_error is not None:
            logger.info("database commits work again")
            self.last_commit_error = None
        for job, result in zip(batch, results):
            job.finish(result)


# Writes that several sections share. Each takes the writer's connection.

_INSERT_EVENT = """
    INSERT INTO events (event_id, type, data_id, created, received_at, payload,
                        status, next_attempt_at, last_error)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (event_id) DO NOTHING
"""
_COUNT_DELIVERY = "UPDATE events SET delivery_count = delivery_count + 1 WHERE event_id = ?"
_INSERT_DELIVERY = """
    INSERT INTO deliveries (event_id, received_at, noyo_timestamp, trace_context,
                            secret_name, signature_form, duplicate)
    VALUES (?, ?, ?, ?, ?, ?, ?)
"""


@dataclasses.dataclass(slots=True)
class Delivery:
    """How one authentic POST arrived (a row of ``deliveries``)."""

    received_at: str
    noyo_timestamp: str | None
    trace_context: str | None
    secret_name: str
    signature_form: str


def store_events(conn: sqlite3.Connection, items: list[tuple["ParsedEvent", Delivery]]) -> list[bool]:
    """Insert each event (or count a repeat) and its delivery; return which were duplicates.

    Runs in the single writer's ``BEGIN IMMEDIATE`` transaction, so reading
    which ids exist and then inserting cannot race with another writer; the
    primary key (``ON CONFLICT DO NOTHING``) still has the last word. One
    statement per kind of row for the whole group keeps the writer's calls
    into SQLite (each a GIL hand-off) few.
    """
    ids = [event.event_id for event, _ in items]
    seen = {row[0] for row in conn.execute(
        f"SELECT event_id FROM events WHERE event_id IN ({', '.join('?' * len(ids))})", ids)}
    new_events, repeats, deliveries, duplicates = [], [], [], []
    for event, delivery in items:
        duplicate = event.event_id in seen
        if duplicate:
            repeats.append((event.event_id,))
        else:
            seen.add(event.event_id)  # a second copy within this group is a duplicate too
            new_events.append((
                event.event_id, event.type, event.data_id, event.created, delivery.received_at, event.payload,
                event.status, delivery.received_at if event.status == "pending" else None, event.last_error))
        deliveries.append((event.event_id, delivery.received_at, delivery.noyo_timestamp, delivery.trace_context,
                           delivery.secret_name, delivery.signature_form, int(duplicate)))
        duplicates.append(duplicate)
    if new_events:
        conn.executemany(_INSERT_EVENT, new_events)
    if repeats:
        conn.executemany(_COUNT_DELIVERY, repeats)
    conn.executemany(_INSERT_DELIVERY, deliveries)
    return duplicates


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


PRUNE_BATCH = 2000  # rows per transaction: ingestion never waits long behind a prune


def _prune_batch(conn: sqlite3.Connection, cutoff: str, statuses: tuple[str, ...]) -> tuple[int, int]:
    marks = ", ".join("?" * len(statuses))
    events = conn.execute(
        f"DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE status IN ({marks}) "
        f"AND received_at < ? LIMIT {PRUNE_BATCH})", (*statuses, cutoff)).rowcount
    deliveries = conn.execute(
        f"DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE received_at < ? "
        f"ORDER BY id LIMIT {PRUNE_BATCH})", (cutoff,)).rowcount
    return events, deliveries


def prune(store: "Store", dedupe_days: int, include_dead: bool = False, now: float | None = None) -> tuple[int, int]:
    """Forget events older than ``dedupe_days`` that are done or ignored (and dead
    ones with ``include_dead``), and deliveries of that age. Returns the counts.

    Pending events are never pruned. Freed pages go back to the file system
    (auto_vacuum = INCREMENTAL) and the WAL is checkpointed.
    """
    cutoff = utc_iso((time.time() if now is None else now) - dedupe_days * 86400)
    statuses = ("done", "ignored", "dead") if include_dead else ("done", "ignored")
    total_events = total_deliveries = 0
    while True:
        events, deliveries = store.write(lambda conn: _prune_batch(conn, cutoff, statuses))
        total_events += events
        total_deliveries += deliveries
        if events < PRUNE_BATCH and deliveries < PRUNE_BATCH:
            break
    store.write(lambda conn: conn.execute("PRAGMA incremental_vacuum").fetchall())
    store.checkpoint()
    return total_events, total_deliveries


class InstanceLock:
    """One `serve` per database: a second one would race the first's worker."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        require_directory_of(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise StoreError(
                    f"another noyo-listener is already serving {os.path.abspath(self.db_path)} "
                    f"(lock {self.path} is held); stop it first"
                ) from None
            raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- Signature -------------------------------------------------------------


FORM_TIMESTAMP_BODY = "timestamp.body"
FORM_BODY = "body"
MAX_SIGNATURES = 16  # more entries in one header are ignored (bounded work)


@dataclasses.dataclass(slots=True)
class SignatureMatch:
    secret_name: str
    form: str


class SignatureVerifier:
    """Checks ``x-noyo-signature`` against every configured secret.

    Noyo's docs contradict themselves on what is signed, so ``auto`` accepts
    an HMAC over ``<timestamp>.<body>`` or over the body alone and reports
    which one matched. Comparison is constant-time (``hmac.compare_digest``).
    """

    def __init__(self, secrets: list[tuple[str, str]], payload_mode: str = "auto") -> None:
        self._keys = [(name, secret.encode("utf-8")) for name, secret in secrets]
        self._forms = {
            "auto": (FORM_TIMESTAMP_BODY, FORM_BODY),
            FORM_TIMESTAMP_BODY: (FORM_TIMESTAMP_BODY,),
            FORM_BODY: (FORM_BODY,),
        }[payload_mode]

    def verify(self, header: str | None, timestamp: str | None, body: bytes) -> SignatureMatch | None:
        """Return which secret and form matched, or None if none did."""
        candidates = parse_signature_header(header)
        if not candidates:
            return None
        for form in self._forms:
            if form == FORM_TIMESTAMP_BODY and timestamp is None:
                continue
            message = signed_message(body, timestamp if form == FORM_TIMESTAMP_BODY else None)
            for name, key in self._keys:
                expected = hmac.digest(key, message, "sha256").hex().encode("ascii")
                matched = False
                for candidate in candidates:
                    # Do every comparison: which entry matched must not show in the timing.
                    matched |= hmac.compare_digest(expected, candidate)
                if matched:
                    return SignatureMatch(name, form)
        return None


def parse_signature_header(header: str | None) -> list[bytes]:
    """Split a comma-separated signature header into lowercase byte strings."""
    if not header:
        return []
    # WSGI gives header values as latin-1 decoded text; undo that losslessly.
    entries = [entry.strip().lower() for entry in header.split(",")]
    return [entry.encode("latin-1", "replace") for entry in entries if entry][:MAX_SIGNATURES]


def signed_message(body: bytes, timestamp: str | None = None) -> bytes:
    """What Noyo signs: ``<timestamp>.<body>``, or the body alone."""
    # Header values arrive latin-1 decoded (WSGI); encoding back gives the bytes sent.
    return body if timestamp is None else timestamp.encode("latin-1", "replace") + b"." + body


def sign(secret: str, body: bytes, timestamp: str | None = None) -> str:
    """Noyo's signature: hex HMAC-SHA256 of ``signed_message(body, timestamp)``."""
    return hmac.digest(secret.encode("utf-8"), signed_message(body, timestamp), "sha256").hex()


def check_timestamp(header: str | None, now: float, max_age: float, max_skew: float) -> str | None:
    """Return why ``x-noyo-timestamp`` is outside the window, or None if it is fine.

    ``max_age`` of 0 turns the check off entirely.
    """
    if max_age <= 0:
        return None
    if not header:
        return "no_timestamp"
    try:
        sent = parse_utc_iso(header)
    except ValueError:
        return "bad_timestamp"
    age = now - sent
    if age > max_age:
        return "timestamp_too_old"
    if -age > max_skew:
        return "timestamp_in_future"
    return None


# --- HTTP app --------------------------------------------------------------

import bottle  # noqa: E402  (third-party imports sit with the section that needs them)
import waitress  # noqa: E402
import waitress.channel  # noqa: E402
import waitress.task  # noqa: E402
import waitress.wasyncore  # noqa: E402

_JSON = [("Content-Type", "application/json")]
_OK = b'{"ok": true}'
_OK_DUPLICATE = b'{"ok": true, "duplicate": true}'
MAX_EVENT_ID_LENGTH = 200


def _json_error(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode()


class BadEvent(ValueError):
    """An authentic body that cannot be an event (answer 400)."""


@dataclasses.dataclass(slots=True)
class ParsedEvent:
    """What the ``events`` row needs from an authentic body."""

    event_id: str
    type: str
    data_id: str | None
    created: int | float | None
    status: str
    last_error: str | None
    payload: str


def event_kind(event_type: str) -> str:
    """``difference`` for ``difference.created``: what [fetch] is keyed by."""
    return event_type.split(".", 1)[0]


def disposition(kind: str, data_id: str | None, fetch_kinds: Iterable[str]) -> tuple[str, str | None]:
    """``(status, last_error)`` an event of ``kind`` deserves: ``pending`` if
    there is something to fetch, else ``ignored`` or ``dead`` (with why).
    Decided at arrival, and again by the worker in case [fetch] changed."""
    if kind == "test" or kind not in fetch_kinds:
        return "ignored", None
    if data_id is None:
        return "dead", "event has no data.id, so there is nothing to fetch"
    return "pending", None


_SQLITE_INTEGER = range(-(2**63), 2**63)


def _unix_seconds(value: Any) -> int | float | None:
    """``event.created`` if it can be a column value: a number SQLite can hold.

    Anything else (text, a bool, infinity, an int beyond 64 bits) is left in
    the payload only; an unstorable value must not make the commit fail, or
    the event would get a 503 on every retry.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in _SQLITE_INTEGER else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def parse_event(body: bytes, fetch_kinds: Iterable[str]) -> ParsedEvent:
    """Decode an authentic body; raise BadEvent if it is not a UTF-8 JSON object.

    An event without ``event.id`` is stored under ``sha256:<hex of body>`` so
    it is not lost and its retries still deduplicate.
    """
    try:
        text = body.decode("utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadEvent("body is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise BadEvent("body is not a JSON object")
    event = obj.get("event") if isinstance(obj.get("event"), dict) else {}
    data = obj.get("data") if isinstance(obj.get("data"), dict) else {}

    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > MAX_EVENT_ID_LENGTH:
        event_id = "sha256:" + hashlib.sha256(body).hexdigest()
    event_type = event.get("type") if isinstance(event.get("type"), str) else ""
    data_id = data.get("id")
    data_id = str(data_id) if isinstance(data_id, (str, int)) and not isinstance(data_id, bool) and str(data_id) else None
    created = _unix_seconds(event.get("created"))

    status, last_error = disposition(event_kind(event_type), data_id, fetch_kinds)
    return ParsedEvent(event_id, event_type, data_id, created, status, last_error, text)


@dataclasses.dataclass(frozen=True)
class RequestPolicy:
    """Everything a request is judged by; swapped whole on SIGHUP, so a request
    never sees half-old, half-new settings."""

    verifier: SignatureVerifier
    max_age: float
    max_skew: float
    max_body: int
    fetch_kinds: frozenset

    @classmethod
    def from_settings(cls, settings: Settings) -> "RequestPolicy":
        webhook = settings["webhook"]
        return cls(SignatureVerifier(webhook["secrets"], webhook["signature_payload"]),
                   webhook["max_timestamp_age"], webhook["max_clock_skew"],
                   settings["server"]["max_body_bytes"], frozenset(settings.fetch))


class Receiver:
    """The webhook route and the health check, as a Bottle app."""

    def __init__(self, settings: Settings, store: Store, worker: "Worker | None" = None) -> None:
        self.store = store
        self.worker = worker
        self.path = settings["server"]["path"]
        self.policy = RequestPolicy.from_settings(settings)
        self._health_write = threading.Lock()
        self.app = self._build_app()

    def _build_app(self) -> bottle.Bottle:
        app = bottle.Bottle(catchall=True)
        app.config["json.enable"] = False  # answers are pre-encoded bytes
        app.route(self.path, "POST", self.receive_webhook)
        app.route("/healthz", "GET", self.healthz)
        for code in (404, 405, 500):
            app.error(code)(self._error_page)
        return app

    @staticmethod
    def _answer(status: int, body: bytes) -> bottle.HTTPResponse:
        return bottle.HTTPResponse(body=body, status=status, headers=_JSON)

    @staticmethod
    def _log_request(level: int, environ: dict, status: int, started: float | None, details: str) -> None:
        """The one line each request gets: never a payload, never a secret."""
        elapsed = f"{(time.perf_counter() - started) * 1000:.1f}" if started is not None else "-"
        logger.log(level, "request method=%s path=%s status=%d ms=%s %s remote=%s",
                   environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), status, elapsed, details,
                   environ.get("REMOTE_ADDR", "-"))

    def _reject(self, status: int, reason: str, environ: dict, started: float, message: str) -> bottle.HTTPResponse:
        self._log_request(logging.WARNING, environ, status, started,
                          f"reason={reason} trace={environ.get('HTTP_X_CLOUD_TRACE_CONTEXT', '-')}")
        return self._answer(status, _json_error(message))

    def receive_webhook(self) -> bottle.HTTPResponse:
        """POST <path>: verify, store durably, then answer."""
        started = time.perf_counter()
        environ = bottle.request.environ
        policy = self.policy
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return self._reject(400, "bad_content_length", environ, started, "invalid Content-Length")
        if length > policy.max_body:
            return self._reject(413, "body_too_large", environ, started, "body too large")
        body = environ["wsgi.input"].read(length) if length > 0 else b""

        signature = environ.get("HTTP_X_NOYO_SIGNATURE")
        timestamp = environ.get("HTTP_X_NOYO_TIMESTAMP")
        if not signature:
            return self._reject(401, "no_signature", environ, started, "unauthorized")
        match = policy.verifier.verify(signature, timestamp, body)
        if match is None:
            return self._reject(401, "no_matching_signature", environ, started, "unauthorized")
        window = check_timestamp(timestamp, time.time(), policy.max_age, policy.max_skew)
        if window is not None:
            return self._reject(401, window, environ, started, "unauthorized")

        try:
            parsed = parse_event(body, policy.fetch_kinds)
        except BadEvent as exc:
            return self._reject(400, str(exc).replace(" ", "_"), environ, started, str(exc))

        delivery = Delivery(
            received_at=utc_iso(), noyo_timestamp=timestamp,
            trace_context=environ.get("HTTP_X_CLOUD_TRACE_CONTEXT"),
            secret_name=match.secret_name, signature_form=match.form,
        )
        event_fields = f"event_id={parsed.event_id} type={parsed.type or '-'}"
        try:
            duplicate = self.store.write(None, batch_fn=store_events, item=(parsed, delivery))
        except StoreError as exc:
            self._log_request(logging.ERROR, environ, 503, started, f"{event_fields} reason=not_stored error={exc}")
            return self._answer(503, _json_error("cannot store the event now; retry later"))
        self._log_request(logging.INFO, environ, 200, started,
                          f"{event_fields} stored={parsed.status} duplicate={int(duplicate)} "
                          f"secret={match.secret_name} form={match.form}")
        if not duplicate and parsed.status == "pending" and self.worker is not None:
            self.worker.wake_for_new_event()
        return self._answer(200, _OK_DUPLICATE if duplicate else _OK)

    def health_problems(self) -> list[str]:
        """Why the service is unhealthy (empty when a write commits and the worker progresses)."""
        problems = []
        if not self.store.writer_alive():
            problems.append("database writer thread is not running")
        # One health write at a time: probes against a stuck disk must not
        # pile up and take every HTTP thread.
        elif self._health_write.acquire(blocking=False):
            try:
                self.store.write(lambda conn: set_meta(conn, "healthz_at", utc_iso()),
                                 timeout=self.store.busy_timeout + 2)
            except StoreError as exc:
                problems.append(f"database not writable: {exc}")
            finally:
                self._health_write.release()
        else:
            problems.append("database not writable: the previous health check's write has not finished")
        if self.worker is not None:
            stalled = self.worker.stalled()
            if stalled:
                problems.append(stalled)
        return problems

    def healthz(self) -> bottle.HTTPResponse:
        """GET /healthz: 200 when a write commits and the worker progresses, else 503."""
        started = time.perf_counter()
        problems = self.health_problems()
        environ = bottle.request.environ
        if problems:
            self._log_request(logging.WARNING, environ, 503, started, "problems=" + json.dumps("; ".join(problems)))
            return self._answer(503, json.dumps({"ok": False, "problems": problems}).encode())
        self._log_request(logging.DEBUG, environ, 200, started, "check=healthz")
        return self._answer(200, _OK)

    def _error_page(self, error: bottle.HTTPError) -> bytes:
        environ = bottle.request.environ
        if error.status_code == 500:
            self._log_request(logging.ERROR, environ, 500, None, f"error={error.exception!r}")
        else:
            reason = "_".join(error.status_line.split(" ", 1)[1].lower().split())  # not_found, method_not_allowed
            self._log_request(logging.INFO, environ, error.status_code, None, f"reason={reason}")
        bottle.response.content_type = "application/json"
        return _json_error(error.status_line.split(" ", 1)[1].lower())


class _LoggedErrorTask(waitress.task.ErrorTask):
    """waitress answers some bad requests itself (413 on Content-Length, 400 on
    broken framing) before our app sees them; log those like our own."""

    def execute(self) -> None:
        error = self.request.error
        logger.warning("request rejected by the http layer status=%d reason=%s remote=%s",
                       error.code, "_".join(error.reason.lower().split()), self.channel.addr[0] if self.channel.addr else "-")
        super().execute()


class _Channel(waitress.channel.HTTPChannel):
    """waitress's channel, with two changes (guarded by tests/test_waitress_internals.py):

    - its own bad-request answers are logged;
    - it is not "writable" while its task runs and the output fits in the
      buffer. Stock waitress counts it writable whenever output is pending, so
      while a task thread is mid-send the I/O loop spins on poll() and takes
      the GIL from the very thread that would finish the response (on two
      cores the acks/s collapse, see PERF-NOTES). The task thread flushes its
      own output, and waitress pulls the loop's trigger when a task ends, so
      nothing waits for the loop's timeout.
    """

    error_task_class = _LoggedErrorTask

    def writable(self) -> bool:
        if (self.requests and not self.will_close and not self.close_when_flushed
                and self.total_outbufs_len < self.adj.outbuf_high_watermark):
            return False
        return super().writable()


# Chunked bodies are counted by waitress with their framing; leave room for it
# so a chunked body of exactly max_body_bytes is still ours to judge.
_CHUNK_FRAMING_SLACK = 64 * 1024


def create_http_server(settings: Settings, app: Callable) -> Any:
    """A waitress server for ``app``, configured from ``[server]``."""
    server_cfg = settings["server"]
    server = waitress.create_server(
        app,
        host=server_cfg["host"],
        port=server_cfg["port"],
        threads=server_cfg["threads"],
        ident="noyo-listener",
        # waitress refuses Content-Length >= its limit before reading the body;
        # +1 makes a body of exactly max_body_bytes acceptable.
        max_request_body_size=server_cfg["max_body_bytes"] + 1 + _CHUNK_FRAMING_SLACK,
        asyncore_use_poll=True,  # select() stops at fd 1024
        connection_limit=1000,
        channel_timeout=60,
        expose_tracebacks=False,
    )
    server.channel_class = _Channel
    return server


# --- Noyo client -----------------------------------------------------------


class FetchError(Exception):
    """A fetch failed. ``kind`` tells the worker how to react:

    ``transient`` (network, timeout, 5xx, a broken answer), ``rate_limited``
    (429), ``not_found`` (404: maybe not visible yet), ``auth`` (credentials
    wrong: pause everything, do not burn attempts).
    """

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def token_lifetime(expires_in: Any) -> float:
    """How long to trust a token, in seconds.

    Noyo says tokens live about 10 minutes but its ``expires_in`` unit is
    unreliable (seconds or milliseconds), so: read huge values as
    milliseconds, never trust more than 10 minutes, refresh a margin early.
    """
    try:
        seconds = float(expires_in)
    except (TypeError, ValueError):
        seconds = 600.0
    if seconds > 86400:
        seconds /= 1000.0
    seconds = min(seconds, 600.0)
    return max(5.0, seconds - max(30.0, seconds * 0.1))


def unwrap_object(data: Any, expected_id: str) -> dict:
    """The object in a single-object answer, bare or wrapped as ``{"response": {...}}``."""
    if isinstance(data, dict) and "id" not in data and isinstance(data.get("response"), dict):
        data = data["response"]
    if not isinstance(data, dict):
        raise FetchError("transient", "answer is not a JSON object")
    if "id" not in data:
        raise FetchError("transient", "answer has no id")
    if str(data["id"]) != expected_id:
        raise FetchError("transient", f"answer is for id {str(data['id'])[:80]!r}, not {expected_id!r}")
    return data


def _abort_connection(conn: http.client.HTTPConnection, fired: threading.Event) -> None:
    fired.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv()
        except OSError:
            pass


class _HttpPool:
    """Keep-alive HTTP(S) connections, one per host per thread.

    ``timeout`` bounds the whole exchange, not each socket operation: a
    server that trickles a byte a second would otherwise hold a fetch forever.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._local = threading.local()
        self._ssl = ssl.create_default_context()

    def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.netloc)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conns: dict = self._local.__dict__.setdefault("conns", {})
        while True:
            conn = conns.pop(key, None)
            reused = conn is not None
            if conn is None:
                if parts.scheme == "https":
                    conn = http.client.HTTPSConnection(parts.netloc, timeout=self.timeout, context=self._ssl)
                else:
                    conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout)
            fired = threading.Event()
            deadline = threading.Timer(self.timeout, _abort_connection, (conn, fired))
            deadline.daemon = True
            deadline.start()
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                if fired.is_set():
                    raise TimeoutError(f"no complete answer within {self.timeout:g}s") from None
                # A kept-alive connection the server already closed fails at
                # once; retry that on a fresh one, but never a timeout.
                if reused and not isinstance(exc, TimeoutError):
                    continue
                raise
            finally:
                deadline.cancel()
            if fired.is_set():
                conn.close()
                raise TimeoutError(f"no complete answer within {self.timeout:g}s")
            if response.will_close:
                conn.close()
            else:
                conns[key] = conn
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data


class NoyoClient:
    """Fetches objects from Noyo's REST API with a shared, refreshed token."""

    def __init__(self, settings: Settings) -> None:
        api = settings["noyo_api"]
        self.token_url = api["token_url"]
        self._basic = "Basic " + base64.b64encode(f"{api['client_id']}:{api['client_secret']}".encode()).decode()
        self._http = _HttpPool(api["timeout"])
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expires = 0.0

    def _token_for(self, stale: str | None = None) -> str:
        """A valid token; ``stale`` is one the API just refused (refresh it once)."""
        with self._lock:
            if self._token and self._token != stale and time.monotonic() < self._token_expires:
                return self._token
            self._token = None
            try:
                status, headers, body = self._http.request("POST", self.token_url, {
                    "Authorization": self._basic, "Content-Type": "application/json",
                    "Accept": "application/json", "User-Agent": USER_AGENT,
                }, b'{"grant_type": "client_credentials"}')
            except (http.client.HTTPException, OSError) as exc:
                raise FetchError("transient", f"token request failed: {exc.__class__.__name__}: {exc}") from None
            if status in (400, 401, 403):
                raise FetchError("auth", f"token endpoint {self.token_url} answered {status}; "
                                 "check [noyo_api] client_id and client_secret")
            self._raise_for_status(status, headers, f"token endpoint {self.token_url}")
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            token = answer.get("access_token") if isinstance(answer, dict) else None
            if not isinstance(token, str) or not token:
                raise FetchError("transient", "token endpoint answered without an access_token")
            self._token = token
            self._token_expires = time.monotonic() + token_lifetime(answer.get("expires_in"))
            return token

    @staticmethod
    def _raise_for_status(status: int, headers: dict[str, str], what: str) -> None:
        if 200 <= status < 300:
            return
        retry_after = parse_retry_after(headers.get("retry-after"))
        if status == 429:
            raise FetchError("rate_limited", f"{what} answered 429 Too Many Requests", retry_after)
        if status == 404:
            raise FetchError("not_found", f"{what} answered 404 Not Found")
        raise FetchError("transient", f"{what} answered HTTP {status}", retry_after)

    def fetch(self, url: str, object_id: str) -> dict:
        """GET the object at ``url``; it must carry ``id == object_id``."""
        token = self._token_for()
        for retry_on_401 in (True, False):
            try:
                status, headers, body = self._http.request("GET", url, {
                    "Authorization": f"Bearer {token}", "Accept": "application/json", "User-Agent": USER_AGENT,
                })
            except (http.client.HTTPException, OSError) as exc:
                raise FetchError("transient", f"GET failed: {exc.__class__.__name__}: {exc}") from None
            if status == 401 and retry_on_401:
                token = self._token_for(stale=token)
                continue
            if status in (401, 403):
                raise FetchError("auth", f"API answered {status} with a fresh token; "
                                 "check that [noyo_api] client_id may read this object")
            self._raise_for_status(status, headers, "API")
            try:
                data = json.loads(body)
            except ValueError:
                raise FetchError("transient", "answer is not JSON") from None
            return unwrap_object(data, object_id)
        raise AssertionError("unreachable")


# --- Worker ----------------------------------------------------------------


def _as_number(value: Any) -> float | None:
    """A ``modified``/``version`` value as a number (unix, numeric text or ISO 8601)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            try:
                return parse_utc_iso(value)
            except ValueError:
                return None
    return None


def newness(obj: dict) -> tuple[float, float]:
    """Order two fetches of one object: by ``modified``, then ``version``."""
    modified, version = _as_number(obj.get("modified")), _as_number(obj.get("version"))
    return (float("-inf") if modified is None else modified, float("-inf") if version is None else version)


def difference_state(obj: dict, replaced_seen: bool) -> str:
    """SPEC's rule, from the newest object and whether a replaced event was seen."""
    if obj.get("resolved") is not None:
        return "resolved"
    if replaced_seen:
        return "replaced"
    if obj.get("discrepancy_time") is not None:
        return "discrepancy"
    return "pending"


# Where an event or object may name the difference that replaces this one.
# Noyo does not document the field, so look in the likely places.
_REPLACED_BY_KEYS = ("replaced_by", "replaced_by_id", "replacement_id", "replacement_difference_id",
                     "new_difference_id", "superseded_by")


def find_replaced_by(*sources: Any) -> str | None:
    for source in sources:
        if isinstance(source, dict):
            for key in _REPLACED_BY_KEYS:
                value = source.get(key)
                if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                    return str(value)
    return None


# Events of one second are ordered by where they sit in a difference's life,
# so that last_event_type does not depend on the order they arrived in.
_LIFECYCLE_RANK = {"difference.created": 0, "difference.discrepancy": 1, "difference.replaced": 2,
                   "difference.resolved": 3}


def event_order(created: Any, event_type: str | None) -> tuple:
    """Sort key of events for ``last_event_type``: by ``created``, then lifecycle, then name."""
    number = _as_number(created)
    return (float("-inf") if number is None else number, _LIFECYCLE_RANK.get(event_type or "", -1), event_type or "")


_DIFFERENCE_COLUMNS = ("id", "state", "resolved", "discrepancy_time", "modified", "version", "group_id",
                       "employee_id", "carrier_id", "difference_type", "difference_classification",
                       "last_event_type", "last_event_created", "replaced", "replaced_by", "fetched_at", "body")
_UPSERT_DIFFERENCE = (
    f"INSERT INTO differences ({', '.join(_DIFFERENCE_COLUMNS)}) VALUES ({', '.join('?' * len(_DIFFERENCE_COLUMNS))}) "
    "ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in _DIFFERENCE_COLUMNS[1:])
)


def _scalar(value: Any) -> Any:
    """A JSON value fit for a typed column: objects and lists become JSON text,
    a number SQLite cannot hold becomes text (or NULL for infinity), so no
    answer from the API can make recording it fail."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, int) and not isinstance(value, bool) and value not in _SQLITE_INTEGER:
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def apply_difference(conn: sqlite3.Connection, obj: dict, body: str, event_ids: list[str], fetched_at: str) -> None:
    """Merge a fetched difference and the events that asked for it into its row.

    The result does not depend on the order of events and fetches: the row
    keeps the newest object (a fetch with an older ``modified`` never wins),
    the ``replaced`` flag only ever turns on, and ``last_event_type`` is the
    type of the newest event by ``created``.
    """
    diff_id = str(obj["id"])
    row = conn.execute("SELECT body, replaced, replaced_by, last_event_type, last_event_created, fetched_at "
                       "FROM differences WHERE id = ?", (diff_id,)).fetchone()
    stored = json.loads(row[0]) if row else None
    replaced, replaced_by = (bool(row[1]), row[2]) if row else (False, None)
    last_type, last_created = (row[3], row[4]) if row else (None, None)

    placeholders = ", ".join("?" * len(event_ids))
    for event_type, created, payload in conn.execute(
            f"SELECT type, created, payload FROM events WHERE event_id IN ({placeholders})", event_ids):
        if event_type == "difference.replaced":
            replaced = True
            try:
                data = json.loads(payload).get("data")
            except (ValueError, AttributeError):
                data = None
            replaced_by = replaced_by or find_replaced_by(data)
        if last_type is None or event_order(created, event_type) >= event_order(last_created, last_type):
            last_type, last_created = event_type, created

    if stored is not None and newness(obj) < newness(stored):
        obj, body, fetched_at = stored, row[0], row[5]  # an older fetch: keep the newer object we have
    replaced_by = find_replaced_by(obj) or replaced_by
    conn.execute(_UPSERT_DIFFERENCE, (
        diff_id, difference_state(obj, replaced), _scalar(obj.get("resolved")), _scalar(obj.get("discrepancy_time")),
        _scalar(obj.get("modified")), _scalar(obj.get("version")), _scalar(obj.get("group_id")),
        _scalar(obj.get("employee_id")), _scalar(obj.get("carrier_id")), _scalar(obj.get("difference_type")),
        _scalar(obj.get("difference_classification")), last_type, last_created, int(replaced), replaced_by,
        fetched_at, body,
    ))


def apply_resource(conn: sqlite3.Connection, kind: str, obj: dict, body: str, fetched_at: str) -> None:
    """Keep the newest fetched state of any other kind in ``resources``."""
    object_id = str(obj["id"])
    row = conn.execute("SELECT body FROM resources WHERE kind = ? AND id = ?", (kind, object_id)).fetchone()
    if row is not None and newness(obj) < newness(json.loads(row[0])):
        return
    conn.execute(
        "INSERT INTO resources (kind, id, modified, fetched_at, body) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (kind, id) DO UPDATE SET modified = excluded.modified, "
        "fetched_at = excluded.fetched_at, body = excluded.body",
        (kind, object_id, _scalar(obj.get("modified")), fetched_at, body),
    )


@dataclasses.dataclass
class _Claim:
    """Events that point at one object, fetched by one GET."""

    kind: str
    data_id: str | None
    events: list[tuple[str, int]]  # (event_id, attempts including this one)
    probe: bool = False  # dispatched as the single probe of a failing API

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.kind, self.data_id)


class ApiHealth:
    """Whether the Noyo API as a whole is usable, and when to try it again.

    Several failures in a row across different objects mean the API, not an
    object, is the problem: then nothing is dispatched until a pause ends,
    and after it a single probe decides. The first success resumes full speed.
    """

    FAILURES_BEFORE_PAUSE = 3
    LOG_EVERY = 30.0
    # Probe at least once a minute, whatever backoff_max says: a down API then
    # sees a request a minute, and a recovered one is used within a minute.
    MAX_PROBE_INTERVAL = 60.0

    def __init__(self, backoff_initial: float, backoff_max: float) -> None:
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.lock = threading.Lock()
        self.state = "healthy"  # healthy | backing_off | auth_failed
        self.consecutive_failures = 0
        self.pause = 0.0
        self.paused_until = 0.0
        self.last_error = ""
        self._last_log = 0.0
        self.changed = False  # set when `status` should learn the new state

    def probing(self) -> bool:
        return self.state != "healthy"

    def success(self) -> None:
        with self.lock:
            if self.state != "healthy":
                logger.info("noyo api recovered state=healthy after_failures=%d", self.consecutive_failures)
                self.changed = True
            self.state, self.consecutive_failures, self.pause, self.paused_until = "healthy", 0, 0.0, 0.0

    def failure(self, error: FetchError) -> None:
        now = time.time()
        with self.lock:
            self.last_error = str(error)
            if error.kind == "auth":
                self.state = "auth_failed"
                self.paused_until = now + self.backoff_max
                self.changed = True
                logger.error("noyo api refused our credentials; fetching paused until %s. Fix [noyo_api] client_id/"
                             "client_secret (or NOYO_CLIENT_ID/NOYO_CLIENT_SECRET) and restart. error=%s",
                             utc_iso(self.paused_until), error)
                return
            self.consecutive_failures += 1
            retry_after = error.retry_after or 0.0
            if self.consecutive_failures < self.FAILURES_BEFORE_PAUSE and not retry_after:
                return
            if self.consecutive_failures >= self.FAILURES_BEFORE_PAUSE:
                ceiling = min(self.backoff_max, self.MAX_PROBE_INTERVAL)
                self.pause = min(ceiling, max(self.backoff_initial, self.pause * 2))
            wait = max(retry_after, self.pause / 2 + random.uniform(0, self.pause / 2))
            self.paused_until = max(self.paused_until, now + wait)
            if self.state != "backing_off":
                self.changed = True
            self.state = "backing_off"
            if now - self._last_log >= self.LOG_EVERY:
                self._last_log = now
                logger.warning("noyo api failing; backing off until %s consecutive_errors=%d error=%s",
                               utc_iso(self.paused_until), self.consecutive_failures, error)

    def snapshot(self) -> dict:
        with self.lock:
            return {"state": self.state, "until": utc_iso(self.paused_until) if self.state != "healthy" else None,
                    "consecutive_failures": self.consecutive_failures, "last_error": self.last_error or None}


class Worker:
    """Drains the inbox: fetches each referenced object and records its state.

    One scheduler thread picks due events, groups those that point at the
    same object (one GET serves them all), claims them with a lease and hands
    them to ``concurrency`` fetch threads. It keeps one claimed object queued
    per fetch thread, so a thread that finishes starts its next GET at once
    instead of waiting for a scheduler cycle (a read and a commit): one cycle
    per finished fetch capped the drain at about 60% of concurrency / latency.
    A fetch thread hands its outcome to the writer and goes on to its next
    GET; a recorder thread waits for each commit and only then frees the
    object for new claims (and logs it), so an fsync never delays a GET.
    It sleeps until it is woken (a new event, a finished fetch) or the next
    event is due.
    """

    MAX_SLEEP = 30.0  # also bounds how long a `requeue` from the CLI waits
    # Due rows read per look: a wide window is what lets a burst's events for
    # one object share a GET even when other objects' events sit between them
    # (bench: 0.33 fetches per event; a 100-row window gave 1.00).
    SCAN_LIMIT = 2000

    def __init__(self, settings: Settings, store: Store, client: NoyoClient | None) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        worker = settings["worker"]
        self.concurrency = worker["concurrency"]
        self.max_attempts = worker["max_attempts"]
        self.backoff_initial = worker["backoff_initial"]
        self.backoff_max = worker["backoff_max"]
        # A fetch is a token request plus a GET, each bounded by the timeout.
        self.fetch_deadline = settings["noyo_api"]["timeout"] * 2
        # A claimed event comes back by itself if this process dies mid-fetch;
        # it may wait behind one other fetch before its own starts.
        self.lease = 2 * self.fetch_deadline + 30
        self.health = ApiHealth(self.backoff_initial, self.backoff_max)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight: dict[tuple[str, str | None], float] = {}  # claimed key -> monotonic claim or start
        self.capacity = 2 * self.concurrency  # claims fetching or queued for a fetch thread
        self._inflight_lock = threading.Lock()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()  # (write job, claim, log line) to see committed
        self._recorder: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._fetchers: list[threading.Thread] = []
        self.last_progress = time.monotonic()

    # Lifecycle

    def start(self) -> None:
        """Return leases a previous process left behind, then start the threads."""
        now_iso = utc_iso()
        returned = self.store.write(lambda conn: conn.execute(
            "UPDATE events SET next_attempt_at = ?, lease_until = NULL "
            "WHERE status = 'pending' AND lease_until IS NOT NULL", (now_iso,)).rowcount)
        if returned:
            logger.info("worker took back events leased by a previous run count=%d", returned)
        if self.client is None:
            logger.warning("fetching is off: set [noyo_api] client_id and client_secret (or NOYO_CLIENT_ID and "
                           "NOYO_CLIENT_SECRET) to fetch objects; events are stored and wait as pending")
        self._publish_state(force=True)
        self._thread = threading.Thread(target=self._run, name="noyo-worker", daemon=True)
        self._thread.start()
        self._recorder = threading.Thread(target=self._record_loop, name="noyo-recorder", daemon=True)
        self._recorder.start()
        for number in range(self.concurrency):
            fetcher = threading.Thread(target=self._fetch_loop, name=f"noyo-fetch-{number}", daemon=True)
            fetcher.start()
            self._fetchers.append(fetcher)

    def wake(self) -> None:
        """Something changed (a new event, a finished fetch): look again now."""
        self._wake.set()

    def wake_for_new_event(self) -> None:
        """A new event was stored: wake the scheduler only if it could dispatch it
        now. With fetching off or every slot busy, a finishing fetch (or the
        next timer) looks at the inbox anyway; waking per event would cost a
        scheduler cycle per request during a burst."""
        if self.client is not None and len(self._inflight) < self.capacity and not self._wake.is_set():
            self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stalled(self) -> str | None:
        """Why the worker is not making progress, or None (for /healthz and the watchdog)."""
        if not self.alive():
            return "worker thread is not running"
        if self._recorder is not None and not self._recorder.is_alive():
            return "worker recorder thread is not running"
        now = time.monotonic()
        idle = now - self.last_progress
        if idle > self.MAX_SLEEP + 30:
            return f"worker loop has not run for {idle:.0f}s"
        with self._inflight_lock:
            oldest = min(self._inflight.values(), default=now)
        if now - oldest > self.fetch_deadline + 30:
            return f"a fetch has been in flight for {now - oldest:.0f}s"
        return None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop dispatching; fetches in flight are abandoned (their leases return them)."""
        self._stop.set()
        self._wake.set()
        for _ in self._fetchers:
            self._tasks.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        for fetcher in self._fetchers:
            fetcher.join(max(0.0, deadline - time.monotonic()))
        busy = sum(f.is_alive() for f in self._fetchers)
        if busy:
            logger.warning("worker stopped with fetches in flight count=%d; they are fetched again at next start", busy)
        if self._recorder is not None:
            self._outcomes.put(_STOP)  # after every outcome the fetchers handed over
            self._recorder.join(max(0.0, deadline - time.monotonic()))

    # Scheduling

    def _run(self) -> None:
        conn = self.store.read()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self.last_progress = time.monotonic()
                try:
                    delay = self._dispatch(conn)
                except (StoreError, sqlite3.Error) as exc:
                    logger.error("worker cannot read or claim events error=%s", exc)
                    delay = self.backoff_initial
                self._publish_state()
                self._wake.wait(min(self.MAX_SLEEP, delay))
        finally:
            conn.close()

    def _dispatch(self, conn: sqlite3.Connection) -> float:
        """Claim and hand out what is due; return seconds until the next look."""
        now = time.time()
        if self.client is None:
            return self.MAX_SLEEP
        if self.health.probing() and now < self.health.paused_until:
            return self.health.paused_until - now
        with self._inflight_lock:
            busy = set(self._inflight)
        slots = (1 if self.health.probing() else self.capacity) - len(busy)
        if slots <= 0:
            return self.MAX_SLEEP  # a finishing fetch wakes us
        now_iso = utc_iso(now)
        claims: dict[tuple[str, str | None], _Claim] = {}
        for event_id, event_type, data_id, attempts in conn.execute(
                "SELECT event_id, type, data_id, attempts FROM events "
                "WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                (now_iso, self.SCAN_LIMIT)):
            key = (event_kind(event_type), data_id)
            if key in busy:
                continue  # its fetch may predate this event: fetch again once it is back
            claim = claims.get(key)
            if claim is None:
                if len(claims) >= slots:
                    continue
                claim = claims[key] = _Claim(key[0], data_id, [], probe=self.health.probing())
            claim.events.append((event_id, attempts + 1))
        if claims:
            self._claim_and_hand_out(list(claims.values()), now)
        row = conn.execute("SELECT MIN(next_attempt_at) FROM events WHERE status = 'pending' "
                           "AND next_attempt_at > ?", (now_iso,)).fetchone()
        return max(0.0, parse_utc_iso(row[0]) - time.time()) if row[0] else self.MAX_SLEEP

    def _claim_and_hand_out(self, claims: list[_Claim], now: float) -> None:
        fetchable, settled = [], []
        for claim in claims:
            status, last_error = disposition(claim.kind, claim.data_id, self.settings.fetch)
            if status == "pending":
                fetchable.append((claim, self.settings.fetch_url(claim.kind, claim.data_id)))
            else:
                settled.extend((status, last_error, utc_iso(now), event_id) for event_id, _ in claim.events)
        lease_iso = utc_iso(now + self.lease)
        leased = [(lease_iso, lease_iso, event_id) for claim, _ in fetchable for event_id, _ in claim.events]

        def claim_rows(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE events SET attempts = attempts + 1, lease_until = ?, next_attempt_at = ? "
                             "WHERE event_id = ? AND status = 'pending'", leased)
            # The kind lost its [fetch] entry (or the event its id) since it was stored.
            conn.executemany("UPDATE events SET status = ?, last_error = ?, processed_at = ?, "
                             "next_attempt_at = NULL WHERE event_id = ?", settled)

        self.store.write(claim_rows)
        with self._inflight_lock:
            started = time.monotonic()
            self._inflight.update((claim.key, started) for claim, _ in fetchable)
        for claim, url in fetchable:
            self._tasks.put((claim, url))

    # Fetching

    def _fetch_loop(self) -> None:
        while True:
            item = self._tasks.get()
            if item is _STOP:
                return
            claim, url = item
            if self._stop.is_set():
                continue  # a queued claim: its lease returns it at the next start
            handed_over = False
            try:
                if self.health.probing() and not claim.probe:
                    handed_over = self._give_back(claim)
                    continue
                with self._inflight_lock:
                    self._inflight[claim.key] = time.monotonic()  # what stalled() measures
                handed_over = self._fetch_and_record(claim, url)
            except Exception:  # noqa: BLE001 - one bad object must not stop the fetcher
                logger.exception("worker failed on an object kind=%s id=%s", claim.kind, claim.data_id)
            finally:
                if not handed_over:
                    self._release(claim)

    def _release(self, claim: _Claim) -> None:
        """The object may be claimed again (its outcome is on disk, or there is none)."""
        with self._inflight_lock:
            self._inflight.pop(claim.key, None)
        self.wake()

    def _record_loop(self) -> None:
        while True:
            item = self._outcomes.get()
            if item is _STOP:
                return
            job, claim, line = item
            try:
                self.store.result_of(job)
                if line:
                    logger.log(*line)
            except StoreError as exc:
                # The lease returns these events; they are fetched again later.
                logger.error("worker cannot record a fetch outcome error=%s", exc)
            except Exception:  # noqa: BLE001 - the recorder must outlive one bad line
                logger.exception("worker recorder failed kind=%s id=%s", claim.kind, claim.data_id)
            finally:
                self._release(claim)

    def _fetch_and_record(self, claim: _Claim, url: str) -> bool:
        """GET the object and hand the outcome to the writer; True once handed over."""
        assert self.client is not None and claim.data_id is not None
        started = time.monotonic()
        try:
            obj = self.client.fetch(url, claim.data_id)
        except FetchError as error:
            if error.kind == "not_found":
                self.health.success()  # the API answered; this object is just not there (yet)
            else:
                self.health.failure(error)
            return self._record_failure(claim, error)
        self.health.success()
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        event_ids = [event_id for event_id, _ in claim.events]
        fetched_at = utc_iso()

        def record(conn: sqlite3.Connection) -> None:
            if claim.kind == "difference":
                apply_difference(conn, obj, body, event_ids, fetched_at)
            else:
                apply_resource(conn, claim.kind, obj, body, fetched_at)
            conn.executemany("UPDATE events SET status = 'done', processed_at = ?, lease_until = NULL, "
                             "next_attempt_at = NULL, last_error = NULL WHERE event_id = ? AND status = 'pending'",
                             [(fetched_at, event_id) for event_id in event_ids])
            set_meta(conn, "last_fetch_ok_at", fetched_at)

        return self._write_outcome(claim, record, (
            logging.INFO, "object fetched kind=%s id=%s events=%d ms=%.1f", claim.kind, claim.data_id,
            len(event_ids), (time.monotonic() - started) * 1000))

    def _give_back(self, claim: _Claim) -> bool:
        """A queued claim whose turn came after the API started failing: not
        fetched (only the probe may ask), its attempt not spent, due again
        when the pause ends."""
        due = utc_iso(max(self.health.paused_until, time.time()))
        rows = [(attempts - 1, due, event_id) for event_id, attempts in claim.events]
        return self._write_outcome(claim, lambda conn: conn.executemany(
            "UPDATE events SET attempts = ?, next_attempt_at = ?, lease_until = NULL "
            "WHERE event_id = ? AND status = 'pending'", rows))

    def retry_delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Exponential backoff with full jitter, at least ``Retry-After``."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(attempts - 1, 60))
        return max(retry_after or 0.0, random.uniform(0, ceiling))

    def _record_failure(self, claim: _Claim, error: FetchError) -> bool:
        now = time.time()
        message = f"{error.kind}: {error}"
        updates = []
        for event_id, attempts in claim.events:
            if error.kind == "auth":
                # Our credentials, not this event, are at fault: give the attempt back.
                updates.append(("pending", attempts - 1, utc_iso(self.health.paused_until), message, event_id))
            elif attempts >= self.max_attempts:
                updates.append(("dead", attempts, None, f"gave up after {attempts} attempts: {message}", event_id))
            else:
                due = utc_iso(now + self.retry_delay(attempts, error.retry_after))
                updates.append(("pending", attempts, due, message, event_id))

        def record(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE events SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
                             "lease_until = NULL WHERE event_id = ? AND status = 'pending'", updates)

        dead = sum(1 for u in updates if u[0] == "dead")
        return self._write_outcome(claim, record, (
            logging.ERROR if dead else logging.WARNING, "fetch failed kind=%s id=%s events=%d dead=%d error=%s",
            claim.kind, claim.data_id, len(updates), dead, message))

    def _write_outcome(self, claim: _Claim, fn: Callable[[sqlite3.Connection], None],
                       line: tuple | None = None) -> bool:
        """Queue a fetch's outcome for the writer; the recorder frees ``claim``
        and logs ``line`` once it is committed. False if it could not be queued."""
        try:
            job = self.store.submit(fn)
        except StoreError as exc:
            logger.error("worker cannot record a fetch outcome error=%s", exc)
            return False
        self._outcomes.put((job, claim, line))
        return True

    def _publish_state(self, force: bool = False) -> None:
        """Tell `status` (another process) what the API state is."""
        if not (force or self.health.changed):
            return
        self.health.changed = False
        snapshot = self.health.snapshot() if self.client else {"state": "fetching_off", "until": None}
        try:
            self.store.write(lambda conn: set_meta(conn, "api_state", json.dumps(snapshot)))
        except StoreError as exc:
            logger.warning("cannot record api state error=%s", exc)


# --- Service ---------------------------------------------------------------


def sd_notify(message: str) -> bool:
    """Send one systemd notify message (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1).

    The protocol is a datagram to ``$NOTIFY_SOCKET``; a leading ``@`` means
    the abstract namespace. Without the variable it does nothing.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("cannot notify systemd socket=%s error=%s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (None when it expects none)."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000
    except ValueError:
        return None


class Housekeeper:
    """Everything periodic, off the request path, in one thread: SIGHUP reloads,
    systemd's watchdog and status line, daily pruning."""

    STATUS_EVERY = 10.0
    PRUNE_EVERY = 86400.0

    def __init__(self, service: "Service") -> None:
        self.service = service
        self.watchdog = watchdog_interval()
        self.tick = min(self.STATUS_EVERY, self.watchdog / 3) if self.watchdog else self.STATUS_EVERY
        self.reload_requested = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_prune = time.monotonic()  # at start, then daily
        self._unhealthy_logged = 0.0
        self._queue_logged = 0.0
        self._thread = threading.Thread(target=self._run, name="noyo-housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_reload(self) -> None:
        """Called from the SIGHUP handler: only sets flags."""
        self.reload_requested = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    def _run(self) -> None:
        self._prune_if_due()
        while not self._stop.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            for chore in (self._reload_if_asked, self._feed_watchdog, self._report_status, self._prune_if_due):
                try:
                    chore()
                except Exception:  # noqa: BLE001 - one failing chore must not stop the others
                    logger.exception("housekeeping failed chore=%s", chore.__name__)

    def _reload_if_asked(self) -> None:
        if self.reload_requested:
            self.reload_requested = False
            self.service.reload()

    def _feed_watchdog(self) -> None:
        if not self.watchdog:
            return
        problems = self.service.self_check(timeout=self.watchdog / 2)
        if not problems:
            sd_notify("WATCHDOG=1")
        elif time.monotonic() - self._unhealthy_logged > 30:
            self._unhealthy_logged = time.monotonic()
            logger.error("withholding the systemd watchdog ping problems=%s", json.dumps("; ".join(problems)))

    def _report_status(self) -> None:
        sd_notify("STATUS=" + self.service.status_line())
        queued, running = self.service.requests_in_flight()
        if queued and time.monotonic() - self._queue_logged > 30:
            self._queue_logged = time.monotonic()
            logger.warning("requests are waiting for an HTTP thread queued=%d running=%d threads=%d",
                           queued, running, self.service.settings["server"]["threads"])

    def _prune_if_due(self) -> None:
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + self.PRUNE_EVERY
            try:
                self.service.prune()
            except StoreError as exc:
                logger.error("prune failed; trying again in an hour error=%s", exc)
                self._next_prune = time.monotonic() + 3600


def _finish_queued_requests_at_shutdown(dispatcher: Any, grace: float) -> None:
    """Make waitress finish queued requests before it stops its threads.

    On SystemExit waitress calls ``task_dispatcher.shutdown()``, which lets
    running tasks finish but cancels queued ones: their clients would get a
    closed connection. Wait (bounded) for the queue to drain first. Relies on
    waitress internals (``queue``, ``active_count``, ``lock``);
    tests/test_waitress_internals.py fails if they change.
    """
    original = dispatcher.shutdown

    def shutdown(cancel_pending: bool = True, timeout: float = grace) -> bool:
        logger.info("stop requested; finishing requests in flight")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with dispatcher.lock:
                busy = len(dispatcher.queue) + dispatcher.active_count
            if not busy:
                break
            time.sleep(0.01)
        return original(cancel_pending=cancel_pending, timeout=max(0.1, deadline - time.monotonic()))

    dispatcher.shutdown = shutdown


class Service:
    """`serve`: the store, the worker, the HTTP server, and their lifecycle."""

    REQUESTS_GRACE = 5.0  # seconds for requests in flight (running or queued) to finish
    SHUTDOWN_FLUSH = 2.0  # seconds to send the answers of requests that finished

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        db = settings["database"]
        self.lock = InstanceLock(db["path"])
        self.store = Store(db["path"], db["synchronous"], db["busy_timeout"])
        self.worker: Worker | None = None
        self.receiver: Receiver | None = None
        self.server: Any = None
        self.housekeeper = Housekeeper(self)

    def open(self) -> None:
        """Take the lock, open the database, bind the port. Raises StoreError."""
        self.lock.acquire()
        self.store.open()
        client = NoyoClient(self.settings) if self.settings.fetching_enabled else None
        self.worker = Worker(self.settings, self.store, client)
        self.receiver = Receiver(self.settings, self.store, self.worker)
        server = self.settings["server"]
        try:
            self.server = create_http_server(self.settings, self.receiver.app)
        except OSError as exc:
            raise StoreError(f"cannot listen on {server['host']}:{server['port']}: {exc.strerror}; "
                             "is another program using the port?") from None
        _finish_queued_requests_at_shutdown(self.server.task_dispatcher, self.REQUESTS_GRACE)

    @property
    def self_address(self) -> tuple[str, int]:
        host = self.server.effective_host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return host, int(self.server.effective_port)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; then shut down cleanly and return 0."""
        assert self.worker is not None and self.receiver is not None
        signal.signal(signal.SIGTERM, _raise_shutdown)
        signal.signal(signal.SIGINT, _raise_shutdown)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.housekeeper.request_reload())
        try:
            self.worker.start()
            self.housekeeper.start()
            _log_startup(self.settings, *self.self_address)
            sd_notify("READY=1\nSTATUS=" + self.status_line())
            # waitress leaves its loop on SystemExit raised in this thread; it
            # then lets its task threads finish (up to 5 s) before returning.
            self.server.run()
        except _Shutdown:
            pass
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop accepting, answer what finished, stop the worker, checkpoint."""
        sd_notify("STOPPING=1")
        logger.info("shutting down")
        if self.server is not None:
            self._send_finished_answers()
        self.housekeeper.stop()
        if self.worker is not None:
            self.worker.stop(timeout=2.0)
        self.store.close()
        self.lock.release()
        logger.info("stopped")

    def _send_finished_answers(self) -> None:
        """The requests that finished during shutdown have answers in waitress's
        output buffers; its loop has stopped, so run it a little longer to send
        them (with the listening socket closed: no new connections)."""
        server = self.server
        server.close()
        channels = server._map  # waitress internals: tests/test_waitress_internals.py
        deadline = time.monotonic() + self.SHUTDOWN_FLUSH
        while time.monotonic() < deadline and any(
                getattr(channel, "total_outbufs_len", 0) for channel in list(channels.values())):
            waitress.wasyncore.loop(timeout=0.05, map=channels, use_poll=True, count=1)
        for channel in list(channels.values()):
            channel.close()

    def self_check(self, timeout: float) -> list[str]:
        """A real GET /healthz through the HTTP server: proves the loop, a task
        thread, a database commit and the worker all make progress."""
        host, port = self.self_address
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return [f"health check request failed: {exc.__class__.__name__}: {exc}"]
        finally:
            conn.close()
        if response.status == 200:
            return []
        try:
            return json.loads(body).get("problems") or [f"healthz answered {response.status}"]
        except (ValueError, AttributeError):
            return [f"healthz answered {response.status}"]

    def requests_in_flight(self) -> tuple[int, int]:
        """(queued, running) HTTP requests, from waitress's dispatcher."""
        dispatcher = self.server.task_dispatcher if self.server is not None else None
        if dispatcher is None:
            return 0, 0
        with dispatcher.lock:
            return len(dispatcher.queue), dispatcher.active_count

    def status_line(self) -> str:
        """A short summary for `systemctl status`."""
        conn = self.store.read()
        try:
            pending = conn.execute("SELECT COUNT(*) FROM events WHERE status = 'pending'").fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM events WHERE status = 'dead'").fetchone()[0]
        finally:
            conn.close()
        if self.worker is None or self.worker.client is None:
            api = "fetching off"
        else:
            api = "api " + self.worker.health.snapshot()["state"].replace("_", " ")
        queued, running = self.requests_in_flight()
        return f"pending={pending} dead={dead} {api} requests_running={running} requests_queued={queued}"

    def reload(self) -> None:
        """SIGHUP: re-read [webhook] and [log]; keep everything if the file is broken."""
        assert self.receiver is not None
        try:
            new = load_settings(self.settings.config_path)
        except ConfigError as exc:
            logger.error("reload failed, keeping the running settings: %s", exc)
            return
        reloaded = ("webhook", "log")  # the rest takes effect at restart
        values = {**self.settings.values, **{section: new[section] for section in reloaded}}
        sources = {**{k: v for k, v in self.settings.sources.items() if k[0] not in reloaded},
                   **{k: v for k, v in new.sources.items() if k[0] in reloaded}}
        self.settings = dataclasses.replace(self.settings, values=values, sources=sources)
        self.receiver.policy = RequestPolicy.from_settings(self.settings)
        logging.getLogger().setLevel(new["log"]["level"])
        restart_needed = [s for s in ("server", "database", "noyo_api", "worker")
                          if new[s] != self.settings[s]] + (["fetch"] if new.fetch != self.settings.fetch else [])
        logger.info("reloaded secrets=%s signature_payload=%s log_level=%s%s",
                    ",".join(name for name, _ in new["webhook"]["secrets"]),
                    new["webhook"]["signature_payload"], new["log"]["level"],
                    f" restart_needed_for={','.join(restart_needed)}" if restart_needed else "")
        _warn_about_development_secret(self.settings)

    def prune(self, include_dead: bool = False) -> tuple[int, int]:
        events, deliveries = prune(self.store, self.settings["database"]["dedupe_days"], include_dead)
        logger.info("pruned events=%d deliveries=%d older_than_days=%d", events, deliveries,
                    self.settings["database"]["dedupe_days"])
        return events, deliveries


# --- Command line ----------------------------------------------------------


class _Shutdown(SystemExit):
    """Raised in the main thread by SIGTERM/SIGINT.

    waitress's documented way out of ``server.run()`` is SystemExit or
    KeyboardInterrupt raised in the main thread (its loop catches them and
    stops its task threads); raising is all the handler does.
    """


_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _LineFormatter(logging.Formatter):
    """``<time> LEVEL message``; under systemd ``<N>LEVEL message`` instead: the
    journal adds the time, and the ``<N>`` priority makes ``journalctl -p
    warning`` work.

    Every acknowledgement logs a line, so this is on the hot path: the clock
    text is formatted once per second, not per line as the stock Formatter's
    strftime does.
    """

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal
        self._seconds = _SecondText("%Y-%m-%d %H:%M:%S", time.localtime)

    def _clock(self, created: float) -> str:
        whole = int(created)
        return f"{self._seconds.text(whole)},{int((created - whole) * 1000):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if self.journal:
            line = f"<{_PRIORITIES.get(record.levelno, 6)}>{record.levelname} {record.getMessage()}"
        else:
            line = f"{self._clock(record.created)} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Only the entry point configures logging; the module just logs.

    The lines never show source file, thread or process, so the logging
    module is told not to collect them (its HOWTO's "Optimization" section):
    that walk of the stack was a measurable part of every request.
    """
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_LineFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("NOYO_LISTENER_CONFIG") or "noyo_listener.ini"


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the ini exactly as `serve` does and print the effective settings."""
    settings = load_settings(_config_path(args))
    print("\n".join(describe_settings(settings)))
    if not settings.fetching_enabled:
        print("# fetching is off: [noyo_api] client_id and client_secret are not set")
    if any(secret == DEVELOPMENT_SECRET for _, secret in settings["webhook"]["secrets"]):
        print("# WARNING: [webhook] secrets holds the public development secret; replace it before production")
    print("# configuration is valid")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP server and the worker until SIGTERM or SIGINT."""
    settings = load_settings(_config_path(args))
    logging.getLogger().setLevel(settings["log"]["level"])
    # waitress logs "Task queue depth is N" for every request that waits for a
    # thread: under load that is one formatted WARNING per request on its I/O
    # loop (15% of the loop's time in bench/run.py). The housekeeper reports
    # queueing instead, at most every 30 s.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    service = Service(settings)
    try:
        service.open()
    except BaseException:
        service.store.close()
        service.lock.release()
        raise
    return service.run()


def _raise_shutdown(_signum: int, _frame: Any) -> None:
    raise _Shutdown(0)


def _log_startup(settings: Settings, host: str, port: int) -> None:
    webhook = settings["webhook"]
    logger.info(
        "listening url=http://%s:%s%s database=%s secrets=%s signature_payload=%s fetching=%s version=%s",
        host, port, settings["server"]["path"], settings["database"]["path"],
        ",".join(name for name, _ in webhook["secrets"]), webhook["signature_payload"],
        "on" if settings.fetching_enabled else "off", __version__,
    )
    _warn_about_development_secret(settings)


def _warn_about_development_secret(settings: Settings) -> None:
    for name, secret in settings["webhook"]["secrets"]:
        if secret == DEVELOPMENT_SECRET:
            logger.warning(
                "!!! webhook secret %r is the public DEVELOPMENT secret from the example ini: anyone can forge "
                "events. Set [webhook] secrets (or NOYO_WEBHOOK_SECRETS) to your Noyo subscription secret !!!", name)


def existing_database(settings: Settings) -> str:
    """The database path, which must exist already (only `serve` creates it)."""
    path = settings["database"]["path"]
    if not os.path.exists(path):
        raise StoreError(f"no database at {path} yet; start `serve` first")
    return path


def gather_status(settings: Settings) -> dict:
    """What `status` shows, read straight from the database (no daemon needed)."""
    path = existing_database(settings)
    try:
        conn = connect(path, busy_timeout=settings["database"]["busy_timeout"], mode="readonly")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        by_status = dict(conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status"))
        by_type: dict[str, dict[str, int]] = {}
        for event_type, status, count in conn.execute(
                "SELECT type, status, COUNT(*) FROM events GROUP BY type, status ORDER BY type, status"):
            by_type.setdefault(event_type, {})[status] = count
        oldest = conn.execute("SELECT MIN(received_at) FROM events WHERE status = 'pending'").fetchone()[0]
        last = conn.execute("SELECT MAX(received_at) FROM events").fetchone()[0]
        api_state = json.loads(get_meta(conn, "api_state") or "null")
        last_fetch = get_meta(conn, "last_fetch_ok_at")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()
    return {
        "database": path,
        "events": {status: by_status.get(status, 0) for status in ("pending", "done", "ignored", "dead")},
        "by_type": by_type,
        "oldest_pending_age_seconds": round(time.time() - parse_utc_iso(oldest), 1) if oldest else None,
        "last_received_at": last,
        "dead": by_status.get("dead", 0),
        "last_fetch_ok_at": last_fetch,
        "fetching": "on" if settings.fetching_enabled else "off (set [noyo_api] client_id and client_secret)",
        "api": api_state,
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Print counts, ages and the API state; --json for scripts."""
    status = gather_status(load_settings(_config_path(args)))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    events = status["events"]
    print(f"database:        {status['database']}")
    print("events:          " + "  ".join(f"{k}={v}" for k, v in events.items()))
    age = status["oldest_pending_age_seconds"]
    print(f"oldest pending:  {'-' if age is None else format_duration(round(age)) + ' ago'}")
    print(f"last received:   {status['last_received_at'] or '-'}")
    print(f"dead letters:    {status['dead']}" + ("  (see: requeue --dead)" if status["dead"] else ""))
    print(f"last fetch ok:   {status['last_fetch_ok_at'] or '-'}")
    api = status["api"] or {}
    api_line = api.get("state", "unknown") + (f" until {api['until']}" if api.get("until") else "")
    print(f"fetching:        {status['fetching']}")
    print(f"noyo api:        {api_line}" + (f"  last error: {api['last_error']}" if api.get("last_error") else ""))
    if status["by_type"]:
        print("by type:")
        for event_type, counts in status["by_type"].items():
            print(f"  {event_type or '(no type)':<58} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    """Put events back to pending with a fresh attempt budget."""
    settings = load_settings(_config_path(args))
    path = existing_database(settings)
    if args.dead:
        where, params = "status = 'dead'", []
    elif args.type:
        where, params = "type = ? AND status != 'pending'", [args.type]
    else:
        where, params = f"event_id IN ({', '.join('?' * len(args.event_ids))}) AND status != 'pending'", args.event_ids
    conn = connect(path, settings["database"]["synchronous"], settings["database"]["busy_timeout"])
    try:
        conn.execute("BEGIN IMMEDIATE")
        count = conn.execute(
            f"UPDATE events SET status = 'pending', attempts = 0, next_attempt_at = ?, lease_until = NULL, "
            f"processed_at = NULL WHERE {where}", [utc_iso(), *params]).rowcount
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot requeue in {path}: {exc}") from None
    finally:
        conn.close()
    print(f"requeued {count} event(s); a running listener picks them up within {Worker.MAX_SLEEP:g}s")
    return 0


def _open_store(settings: Settings) -> Store:
    store = Store(existing_database(settings), settings["database"]["synchronous"], settings["database"]["busy_timeout"])
    store.open()
    return store


def cmd_prune(args: argparse.Namespace) -> int:
    """Forget done/ignored events (and, with --dead, dead ones) older than dedupe_days."""
    settings = load_settings(_config_path(args))
    store = _open_store(settings)
    try:
        events, deliveries = prune(store, settings["database"]["dedupe_days"], include_dead=args.dead)
    finally:
        store.close()
    kinds = "done, ignored and dead" if args.dead else "done and ignored"
    print(f"pruned {events} {kinds} event(s) and {deliveries} deliveries older than "
          f"{settings['database']['dedupe_days']} days")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the database with SQLite's online backup API (consistent while serving)."""
    settings = load_settings(_config_path(args))
    path = existing_database(settings)
    try:
        fd = os.open(args.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds member data
    except FileExistsError:
        raise StoreError(f"{args.dest} already exists; choose a new name (backup never overwrites)") from None
    except OSError as exc:
        raise StoreError(f"cannot create {args.dest}: {exc.strerror}") from None
    os.close(fd)
    started = time.monotonic()
    try:
        source = connect(path, busy_timeout=settings["database"]["busy_timeout"], mode="readonly")
        target = sqlite3.connect(args.dest, isolation_level=None)
        try:
            source.backup(target)  # one step: a single consistent snapshot
            check = target.execute("PRAGMA quick_check").fetchone()[0]
            events = target.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            target.close()
            source.close()
    except sqlite3.Error as exc:
        os.unlink(args.dest)
        raise StoreError(f"backup of {path} failed: {exc}") from None
    if check != "ok":
        raise StoreError(f"backup {args.dest} failed its integrity check: {check}")
    size = os.path.getsize(args.dest)
    print(f"backed up {path} to {args.dest}: {events} events, {size} bytes, "
          f"{time.monotonic() - started:.2f}s, integrity ok")
    return 0


def build_test_event(event_type: str, data_id: str | None) -> bytes:
    """A body shaped like Noyo's (``test.hello_world`` carries a message, not an id)."""
    if event_type == "test.hello_world" and data_id is None:
        data: dict[str, Any] = {"message": "Hello world!"}
    else:
        data = {"id": data_id or str(uuid.uuid4())}
    event = {"id": str(uuid.uuid4()), "created": int(time.time()), "type": event_type}
    return json.dumps({"data": data, "event": event}).encode()


def signed_headers(secret: str, body: bytes, form: str = FORM_TIMESTAMP_BODY) -> dict[str, str]:
    """The headers Noyo sends with ``body``."""
    timestamp = dt.datetime.now(dt.timezone.utc).isoformat()
    signature = sign(secret, body, timestamp if form == FORM_TIMESTAMP_BODY else None)
    return {
        "Content-Type": "application/json",
        "x-noyo-signature": signature,
        "x-noyo-timestamp": timestamp,
        "x-cloud-trace-context": f"{uuid.uuid4().hex}/1;o=1",
        "User-Agent": USER_AGENT + " send-test",
    }


def cmd_send_test(args: argparse.Namespace) -> int:
    """Sign and POST an event exactly as Noyo does; print the answer."""
    secret = args.secret
    if secret is None:
        secrets = load_settings(_config_path(args))["webhook"]["secrets"]
        name, secret = secrets[0]
        print(f"signing with secret {name!r} from the config", file=sys.stderr)
    body = build_test_event(args.type, args.data_id)
    request = urllib.request.Request(args.url, data=body, method="POST",
                                     headers=signed_headers(secret, body, args.form))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"noyo-listener: error: cannot reach {args.url}: {reason}; is `serve` running there?", file=sys.stderr)
        return 1
    print(f"sent event_id={json.loads(body)['event']['id']} type={args.type}")
    print(f"HTTP {status} {answer.decode('utf-8', 'replace').strip()}")
    return 0 if status == 200 else 1


def _url_argument(text: str) -> str:
    if not is_http_url(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noyo_listener.py", description="Receive Noyo webhooks, store them in SQLite, fetch the objects.")
    parser.add_argument("--config", metavar="PATH",
                        help="ini file (default: $NOYO_LISTENER_CONFIG, else ./noyo_listener.ini)")
    parser.add_argument("--version", action="version", version=f"noyo-listener {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser("serve", help="run the HTTP server and the worker").set_defaults(func=cmd_serve)
    commands.add_parser("check-config", help="validate the ini and print the effective settings"
                        ).set_defaults(func=cmd_check_config)

    status = commands.add_parser("status", help="counts, ages, dead letters and API state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    send = commands.add_parser("send-test", help="sign and POST a test event as Noyo does")
    send.add_argument("url", metavar="URL", type=_url_argument, help="e.g. http://127.0.0.1:8080/noyo/webhooks")
    send.add_argument("--secret", help="webhook secret (default: the first one in the config)")
    send.add_argument("--type", default="test.hello_world", help="event type (default: test.hello_world)")
    send.add_argument("--data-id", help="data.id of the event (default: a new uuid; none for test.hello_world)")
    send.add_argument("--form", choices=(FORM_TIMESTAMP_BODY, FORM_BODY), default=FORM_TIMESTAMP_BODY,
                      help="what to sign (default: timestamp.body)")
    send.set_defaults(func=cmd_send_test)

    prune_cmd = commands.add_parser("prune", help="forget old done/ignored events now (serve does it daily)")
    prune_cmd.add_argument("--dead", action="store_true", help="also dead events older than dedupe_days")
    prune_cmd.set_defaults(func=cmd_prune)

    backup = commands.add_parser("backup", help="consistent copy of the database, safe while serving")
    backup.add_argument("dest", metavar="DEST", help="new file to write (never overwritten)")
    backup.set_defaults(func=cmd_backup)

    requeue = commands.add_parser("requeue", help="put events back to pending")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="every dead event")
    which.add_argument("--type", help="every non-pending event of this type")
    which.add_argument("event_ids", nargs="*", default=[], metavar="EVENT_ID")
    requeue.set_defaults(func=cmd_requeue)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, run a command, turn known errors into one line."""
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.func(args)
    except (ConfigError, StoreError) as exc:
        print(f"noyo-listener: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
