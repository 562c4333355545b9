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

import sys

# Checked before anything that needs 3.9 runs, so an older interpreter (that
# can still parse this file: 3.7 and 3.8) gets one line instead of a traceback.
# Older ones cannot parse ``from __future__ import annotations``; the bundle's
# __main__.py checks before importing this module, for every Python.
if sys.version_info < (3, 9):
    raise SystemExit("noyo-listener: error: needs Python 3.9 or newer, this is %s (%s); "
                     "run it with python3.9 or later" % (sys.version.split()[0], sys.executable))

import _thread
import argparse
import base64
import bisect
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
import io
import ipaddress
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
import tempfile
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

# dataclass(slots=True) arrived in Python 3.10. On 3.9 these small records are
# plain dataclasses: the same fields and behaviour, a little more memory each.
_SLOTS: dict[str, bool] = {"slots": True} if sys.version_info >= (3, 10) else {}


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
    if text == "/metrics":
        raise ValueError("/metrics is reserved for Prometheus")
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


def _positive_number(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("must be a number, e.g. 2 or 0.5") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a number above 0")
    return value


def _optional_ip_address(text: str) -> str:
    """Empty, or an IP address in the spelling waitress compares peers with."""
    text = text.strip()
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("must be the IP address the proxy connects from, like 127.0.0.1, or empty") from None


# (section, key) -> (converter, default, is_secret). The default is ini text,
# converted like any value from the file, so check-config shows one truth.
_SCHEMA: dict[str, dict[str, tuple[Callable[[str], Any], str, bool]]] = {
    "server": {
        "host": (_nonempty, "127.0.0.1", False),
        "port": (_int_in(0, 65535), "8080", False),  # 0 picks a free port
        "path": (_url_path, "/noyo/webhooks", False),
        "threads": (_int_in(1, 256), "16", False),  # measured: see README, Performance
        "max_body_bytes": (_int_in(1, 64 * 1024 * 1024), "1048576", False),
        # A TLS proxy in front: when it is the peer, its X-Forwarded-For names the client in logs.
        "trusted_proxy": (_optional_ip_address, "", False),
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
        "history_days": (_int_in(0, 36500), "365", False),  # rows of `changes` kept; 0 = forever
        "busy_timeout": (_duration_at_least(0.001), "5s", False),
        # external: no checkpoint of our own; a WAL replicator (Litestream) does them
        "checkpoints": (_choice("auto", "external"), "auto", False),
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
    "sync": {
        "interval": (_duration_at_least(0), "6h", False),  # 0 = no periodic passes
        "rate": (_positive_number, "2", False),  # list requests per second, at most
        "page_size": (_int_in(5, 100), "100", False),  # Noyo accepts 5..100
    },
    "log": {
        "level": (_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", False),
    },
}

# [lists]: kind -> Noyo's paged list of that kind (reconciliation walks it).
DEFAULT_LISTS = {
    "difference": "{tracking_url}/api/v1/differences",
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
    lists: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LISTS))

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

    def list_url(self, kind: str, page_size: int, offset: int) -> str | None:
        """The URL of one page of Noyo's list of ``kind``, or None."""
        template = self.lists.get(kind)
        if template is None:
            return None
        api = self.values["noyo_api"]
        url = template.format(tracking_url=api["tracking_url"], fulfillment_url=api["fulfillment_url"])
        query = urllib.parse.urlencode({"page_size": page_size, "offset": offset})
        return url + ("&" if "?" in url else "?") + query

    @property
    def fetching_enabled(self) -> bool:
        api = self.values["noyo_api"]
        return bool(api["client_id"] and api["client_secret"])


def _read_secret_overrides(environ: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Secrets from ``$CREDENTIALS_DIRECTORY`` and the environment: name -> (value, source)."""
    found: dict[str, tuple[str, str]] = {}
    for name in _SECRET_SOURCES:
        if environ.get(name):
            # Python hands undecodable bytes of the environment over as lone
            # surrogates; they would fail later, when the secret is used.
            try:
                environ[name].encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"environment variable {name} is not valid UTF-8 text; "
                                  "set it again as UTF-8") from None
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
            except UnicodeDecodeError:
                raise ConfigError(f"credential {path} is not valid UTF-8 text; write it again as UTF-8 "
                                  "(systemd-creds encrypt takes the plain text)") from None
            if value:  # an empty file means "not set", like an empty variable
                found[name] = (value, "credential")
    return found


# What a command needs beyond a valid ini, checked by require(). Commands that
# only read or maintain the database need none of it, so they work on the
# production layout, where the secrets are systemd credentials that an
# operator's shell does not see. A command declares what it needs (the
# parser's ``needs``); one that declares nothing needs nothing.
NEEDS_WEBHOOK_SECRETS = "webhook_secrets"  # [webhook] secrets is set
NEEDS_API = "api"  # [noyo_api] and [fetch] are safe to use as configured (credentials may be absent)
NEEDS_API_CREDENTIALS = "api_credentials"  # NEEDS_API, and client_id and client_secret are set
SERVE_NEEDS = (NEEDS_WEBHOOK_SECRETS, NEEDS_API)  # serve, check-config and SIGHUP reload


def load_settings(path: str, environ: dict[str, str] | None = None, needs: Iterable[str] = ()) -> Settings:
    """Read and validate the ini at ``path``; raise ConfigError with one line.

    ``needs`` (see NEEDS_*) adds the checks of what the caller will use:
    `serve` needs the webhook secrets and a safe API setup; `status` needs
    neither.
    """
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
        if section not in _SCHEMA and section not in ("fetch", "lists"):
            known = ", ".join([*_SCHEMA, "fetch", "lists"])
            raise ConfigError(f"{path}: unknown section [{section}]; known: {known}")
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
    lists = _list_templates(parser["lists"] if parser.has_section("lists") else {})
    settings = Settings(values=values, fetch=fetch, sources=sources, config_path=path, lists=lists)
    _validate_together(settings)
    require(settings, needs)
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


def _list_templates(entries: Any) -> dict[str, str]:
    """[lists] laid over the defaults; an empty entry turns a kind's passes off."""
    lists = dict(DEFAULT_LISTS)
    for kind, template in entries.items():
        template = template.strip()
        if not template:
            lists.pop(kind, None)
            continue
        try:
            template.format(tracking_url="T", fulfillment_url="F")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(
                f"[lists] {kind}: only {{tracking_url}} and {{fulfillment_url}} may appear in the template "
                f"(got {template!r})"
            ) from None
        lists[kind] = template
    return lists


def _validate_together(settings: Settings) -> None:
    """Refuse combinations of keys that are each valid but wrong together."""
    webhook, database, worker = settings["webhook"], settings["database"], settings["worker"]
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


def require(settings: Settings, needs: Iterable[str]) -> None:
    """Refuse settings that lack what a command needs (see NEEDS_*); one line."""
    needs = set(needs)
    api = settings["noyo_api"]
    if NEEDS_WEBHOOK_SECRETS in needs and not settings["webhook"]["secrets"]:
        raise ConfigError(
            "[webhook] secrets is empty: set it in the ini, in NOYO_WEBHOOK_SECRETS "
            "or as the systemd credential NOYO_WEBHOOK_SECRETS"
        )
    if needs & {NEEDS_API, NEEDS_API_CREDENTIALS}:
        if bool(api["client_id"]) != bool(api["client_secret"]):
            raise ConfigError("[noyo_api] set both client_id and client_secret, or neither (fetching off)")
        for key in ("token_url", "tracking_url", "fulfillment_url"):
            check_api_url(f"[noyo_api] {key}", api[key])
        check_url_templates(settings, "fetch", settings.fetch)
        check_url_templates(settings, "lists", settings.lists)
    if NEEDS_API_CREDENTIALS in needs and not settings.fetching_enabled:
        raise ConfigError(
            "[noyo_api] client_id and client_secret are not set: set them in the ini, in NOYO_CLIENT_ID and "
            "NOYO_CLIENT_SECRET, or as the systemd credentials of those names"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_url(where: str, url: str) -> None:
    """Refuse a URL the worker cannot reach (no scheme or host) or would send a
    token or the client secret over in clear (http:// to a host that is not
    this machine)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        host, parts = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{where}: {url!r} is not an http:// or https:// URL with a host; "
                          "write it like https://tracking.noyo.com/...")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigError(f"{where}: {url!r} would send credentials and tokens in clear to {host}; "
                          "use https:// (plain http:// is allowed only to a loopback address like 127.0.0.1)")


def check_url_templates(settings: Settings, section: str, templates: dict[str, str]) -> None:
    """Check each URL template of ``section`` ([fetch], [lists]) as it resolves
    with the [noyo_api] URLs: a scheme, a host, https unless loopback."""
    api = settings["noyo_api"]
    for kind, template in templates.items():
        try:
            url = template.format(id="ID", tracking_url=api["tracking_url"], fulfillment_url=api["fulfillment_url"])
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"[{section}] {kind}: only {{id}}, {{tracking_url}} and {{fulfillment_url}} "
                              f"may appear in the template (got {template!r})") from None
        check_api_url(f"[{section}] {kind}", url)


def settings_warnings(settings: Settings) -> list[str]:
    """Valid settings an operator should know are weaker than the defaults
    (`serve` logs each once at start; check-config prints them)."""
    warnings = []
    synchronous = settings["database"]["synchronous"]
    if synchronous in ("OFF", "NORMAL"):
        warnings.append(f"[database] synchronous = {synchronous}: a 200 no longer means the event survives a "
                        "power loss or OS crash (FULL, the default, does)")
    if settings["webhook"]["max_timestamp_age"] == 0:
        warnings.append("[webhook] max_timestamp_age = 0: the timestamp check is off, so a captured request "
                        "can be replayed once its event id has been pruned (after dedupe_days)")
    return warnings


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
    lines.append("[lists]")
    lines.extend(f"{kind} = {template}" for kind, template in sorted(settings.lists.items()))
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


_FRACTION_RE = re.compile(r"(?<=:\d\d)\.(\d+)")


def parse_utc_iso(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 timestamp (naive means UTC)."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):  # fromisoformat reads "Z" only from Python 3.11 on
        text = text[:-1] + "+00:00"
    # Before 3.11, fromisoformat reads only 3 or 6 fraction digits; give it 6 so
    # "...:45.1Z" or "...:45.0395871+00:00" mean the same on every Python.
    text = _FRACTION_RE.sub(lambda m: "." + (m.group(1) + "00000")[:6], text, count=1)
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
    """
    -- The change feed (SPEC, History): one row per newer version of an object
    -- stored, and per state an event alone changed. Written by the worker's
    -- commits, never by the acknowledgement path. AUTOINCREMENT: a seq is never
    -- handed out twice, even once prune has emptied the table, so a consumer's
    -- saved seq stays a valid bookmark.
    CREATE TABLE changes (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        id          TEXT NOT NULL,
        version     INTEGER,
        modified    INTEGER,
        state_from  TEXT,                  -- NULL the first time the object is seen
        state_to    TEXT,
        observed_at TEXT NOT NULL,         -- UTC ISO 8601
        source      TEXT NOT NULL CHECK (source IN ('fetch', 'sync', 'event')),
        event_type  TEXT                   -- the event behind a fetch or event row
    );
    CREATE INDEX changes_object ON changes (id, seq);
    CREATE INDEX changes_observed ON changes (observed_at);  -- prune by age without a scan

    -- Views for operators: sqlite3 -box noyo_listener.sqlite3 'select * from open_discrepancy_ages'
    CREATE VIEW open_discrepancy_ages AS
        SELECT difference_id, group_id, employee_id, carrier_id, difference_type, open_since,
               printf('%dd %02dh %02dm', open_seconds / 86400, open_seconds % 86400 / 3600,
                      open_seconds % 3600 / 60) AS open_for,
               noticed_at
        FROM (
            SELECT d.id AS difference_id, d.group_id, d.employee_id, d.carrier_id, d.difference_type,
                   n.noticed_at,
                   coalesce(datetime(d.discrepancy_time, 'unixepoch'), datetime(n.noticed_at)) AS open_since,
                   CAST((julianday('now') - julianday(coalesce(datetime(d.discrepancy_time, 'unixepoch'),
                                                             n.noticed_at))) * 86400 AS INTEGER) AS open_seconds
            FROM differences d
            LEFT JOIN (SELECT id, MAX(observed_at) AS noticed_at FROM changes
                       WHERE kind = 'difference' AND state_to = 'discrepancy'
                         AND state_from IS NOT 'discrepancy' GROUP BY id) n ON n.id = d.id
            WHERE d.state = 'discrepancy'
        )
        ORDER BY open_seconds DESC;
    CREATE VIEW difference_timeline AS
        SELECT id AS difference_id, seq, observed_at, state_from, state_to, source, event_type,
               datetime(modified, 'unixepoch') AS modified, version
        FROM changes WHERE kind = 'difference' ORDER BY id, seq;
    CREATE VIEW recent_changes AS
        SELECT seq, observed_at, kind, id, state_from, state_to, source, event_type
        FROM changes ORDER BY seq DESC LIMIT 100;
    """,
    """
    -- Reconciliation passes: one row per pass over one [lists] kind.
    CREATE TABLE syncs (
        id          INTEGER PRIMARY KEY,
        kind        TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        finished_at TEXT,
        status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        pages       INTEGER NOT NULL DEFAULT 0,
        seen        INTEGER NOT NULL DEFAULT 0,
        new         INTEGER NOT NULL DEFAULT 0,  -- no row existed: no webhook announced it, or it was lost
        updated     INTEGER NOT NULL DEFAULT 0,  -- replaced an older row
        unchanged   INTEGER NOT NULL DEFAULT 0,  -- the row was as new or newer
        skipped     INTEGER NOT NULL DEFAULT 0,  -- items without an id
        error       TEXT
    );
    CREATE INDEX syncs_kind ON syncs (kind, status, id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: str, synchronous: str = "FULL", busy_timeout: float = 5.0, mode: str = "write",
            checkpoints: str = "auto") -> sqlite3.Connection:
    """Open ``path`` with the pragmas every connection of this program uses.

    ``mode`` is ``write`` (sets up WAL, synchronous and auto_vacuum: only the
    writer and the CLI's own writers), ``read`` (a reader of a database the
    writer has set up: it must never wait for a write lock) or ``readonly``
    (the file opened read-only, for `status` and `backup`).

    Autocommit mode: writers say ``BEGIN IMMEDIATE`` themselves, so a
    transaction never upgrades from read to write halfway (which can fail
    with SQLITE_BUSY regardless of the busy timeout).

    ``checkpoints = "external"`` (``[database] checkpoints``) leaves every WAL
    checkpoint to a replicator such as Litestream, see ``leave_checkpoints_to_others``.
    """
    if mode == "readonly":
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if checkpoints == "external":
        leave_checkpoints_to_others(conn)
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


def leave_checkpoints_to_others(conn: sqlite3.Connection) -> None:
    """Make ``conn`` start no WAL checkpoint by itself.

    A replicator that streams the WAL (Litestream) wants to be the only one
    that checkpoints: it copies frames before it lets them leave the WAL.
    SQLite checkpoints on its own in two places: after a commit that takes
    the WAL past ``wal_autocheckpoint`` pages, and when the last connection
    to the database closes. The first is turned off here for every
    connection; the second can be turned off only from Python 3.12 on
    (``setconfig``). Before that it cannot happen while the replicator runs,
    because the replicator's own open connection means ours is never the
    last one (tests/test_litestream.py).
    """
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    no_checkpoint_on_close = getattr(sqlite3, "SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE", None)
    if no_checkpoint_on_close is not None and hasattr(conn, "setconfig"):
        conn.setconfig(no_checkpoint_on_close, True)


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

    def __init__(self, path: str, synchronous: str = "FULL", busy_timeout: float = 5.0,
                 checkpoints: str = "auto") -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        # "external": this process runs no checkpoint at all ([database] checkpoints)
        self.checkpoints = checkpoints
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
            conn = connect(self.path, self.synchronous, self.busy_timeout, checkpoints=self.checkpoints)
            migrate(conn, self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot open database {self.path}: {exc.strerror}") from None
        # Checkpoints run on their own thread (PASSIVE: they never block the
        # committer) instead of inside whichever commit crosses the WAL threshold.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        if self.checkpoints == "auto":
            # A WAL that grew while it could not start over (a long reader) is
            # cut back to this size when it next does. (With a replicator the
            # WAL is its business.)
            conn.execute(f"PRAGMA journal_size_limit = {self.WAL_SIZE_LIMIT}")
        self._conn = conn
        self._writer = threading.Thread(target=self._run_writer, name="noyo-writer", daemon=True)
        self._writer.start()
        if self.checkpoints == "auto":
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
            self._take_role_for_writer()
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
            lead = False
            if not self._committing:
                # Idle: commit it here; under load: the writer thread. Never the
                # main thread, whose signal handlers raise (_Shutdown): raised in
                # the middle of a hand-off, they would leave the role with nobody.
                if self._last_batch <= 1 and threading.current_thread() is not threading.main_thread():
                    self._committing = lead = True
                else:
                    self._take_role_for_writer()
        if lead:
            self._lead(job)
        return self.result_of(job, timeout)

    def _take_role_for_writer(self) -> None:
        """Give the committer role to the writer thread. Called holding ``_lock``:
        the flag and the wake-up happen together, with no call in between where
        a signal handler could raise and leave the role set but unhanded."""
        self._committing = True
        self._writer_turn.release()

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
            self._writer_turn.release()  # under _lock, as in _take_role_for_writer
        return False

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (cannot run inside a transaction).

        Does nothing with ``checkpoints = external``: the replicator checkpoints.
        """
        if self.checkpoints == "external":
            return
        conn = self.read()
        try:
            self._checkpoint(conn, "TRUNCATE")
        finally:
            conn.close()

    def read(self) -> sqlite3.Connection:
        """A new connection for reading (WAL readers never block the writer)."""
        return connect(self.path, self.synchronous, self.busy_timeout, mode="read", checkpoints=self.checkpoints)

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
            if self.checkpoints == "auto":
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


@dataclasses.dataclass(**_SLOTS)
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


DAEMON_VIEW_KEY = "api_state"  # the meta row `status` reads the daemon's own view from


def record_daemon_view(store: "Store", fetching: bool, api: dict) -> None:
    """Record what `serve` itself sees: whether it fetches and the API state
    (``api``: at least ``state``). `status` runs in another process, often
    without the credentials, so it reads this row instead of guessing from
    its own environment. Call it whenever either changes."""
    view = {**api, "fetching": fetching, "pid": os.getpid(), "recorded_at": utc_iso()}
    store.write(lambda conn: set_meta(conn, DAEMON_VIEW_KEY, json.dumps(view)))


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
    vacuum_in_steps(store)
    store.checkpoint()
    return total_events, total_deliveries


def prune_history(store: "Store", history_days: int, now: float | None = None) -> int:
    """Forget change-feed rows observed more than ``history_days`` ago (0 keeps
    them forever), PRUNE_BATCH rows per transaction; returns how many.

    ``seq`` is AUTOINCREMENT, so a consumer's saved seq stays valid however
    much is pruned: it resumes at the oldest row kept.
    """
    if history_days <= 0:
        return 0
    cutoff = utc_iso((time.time() if now is None else now) - history_days * 86400)
    total = 0
    while True:
        deleted = store.write(lambda conn: conn.execute(
            f"DELETE FROM changes WHERE seq IN (SELECT seq FROM changes WHERE observed_at < ? "
            f"ORDER BY observed_at LIMIT {PRUNE_BATCH})", (cutoff,)).rowcount)
        total += deleted
        if deleted < PRUNE_BATCH:
            return total


VACUUM_STEP_PAGES = 256  # pages given back per transaction: each step is a short write


def vacuum_in_steps(store: "Store", max_steps: int = 1_000_000) -> int:
    """Give free pages back to the file system a few at a time, each step its
    own short transaction, so intake never waits behind one long vacuum."""
    freed = 0
    for _ in range(max_steps):
        def step(conn: sqlite3.Connection) -> int:
            before = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if before:
                conn.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})").fetchall()
            return before - conn.execute("PRAGMA freelist_count").fetchone()[0]

        done = store.write(step)
        if done <= 0:
            break
        freed += done
    return freed


def own_like_directory(fd: int, directory: str) -> None:
    """Give the open file ``fd`` the owner and group of ``directory`` when
    running as root. Under ``DynamicUser=`` the service runs as a user of its
    own, and systemd does not re-own files inside a state directory that
    already has the right owner: a root-owned file there would make `serve`
    fail with EACCES and restart in a loop."""
    if os.geteuid() != 0:
        return
    owner = os.stat(directory)
    os.fchown(fd, owner.st_uid, owner.st_gid)


class InstanceLock:
    """One `serve` per database: a second one would race the first's worker.
    `restore` takes it too, so that no `serve` starts while it writes.

    With ``suffix=SYNC_LOCK_SUFFIX`` it is the lock of `sync` commands: each
    holds it shared (several may run, beside a `serve`); `restore` takes it
    exclusively, so it never replaces a database that a `sync` writes to.
    """

    # `status` takes the lock shared for an instant to see whether a `serve`
    # holds it; a `serve` starting at that very instant waits this long.
    ACQUIRE_PATIENCE = 1.0

    def __init__(self, db_path: str, suffix: str = ".lock") -> None:
        self.db_path = db_path
        self.path = db_path + suffix
        self._fd: int | None = None

    def acquire(self, busy_message: str | None = None, shared: bool = False) -> None:
        """Take the lock (``shared``: beside other shared holders) or raise
        StoreError (``busy_message`` when another holds it)."""
        require_directory_of(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            own_like_directory(fd, os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            raise StoreError(f"cannot create lock file {self.path}: {exc.strerror}") from None
        deadline = time.monotonic() + self.ACQUIRE_PATIENCE
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise StoreError(busy_message or (
                        f"another noyo-listener is already serving {os.path.abspath(self.db_path)} "
                        f"(lock {self.path} is held); stop it first")) from None
                raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from None
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @staticmethod
    def holder(db_path: str) -> tuple[bool | None, int | None]:
        """Whether a process (a `serve`) holds the lock of ``db_path``, and its
        pid: ``(True, pid)``, ``(False, None)``, or ``(None, None)`` when this
        user may not look. Takes the lock shared for an instant, never waits."""
        path = db_path + ".lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False, None
        except OSError:
            return None, None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    return None, None
                text = os.read(fd, 32).decode("ascii", "replace").strip()
                return True, int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False, None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


SYNC_LOCK_SUFFIX = ".sync.lock"


def open_backup(source: str) -> sqlite3.Connection:
    """``source`` opened as a file nothing writes to (``immutable=1``): SQLite
    then creates no -shm or -journal beside it, so a backup in a directory
    this user cannot write (or one of an old version, still in WAL mode)
    opens, and nothing is left behind. A WAL beside it would be ignored, so
    such a source (a live database, not a backup) is refused."""
    wal = source + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        raise StoreError(f"{source} has a write-ahead log beside it ({wal}): it is a live database, not a "
                         "backup; copy it with `noyo_listener.py backup` first; nothing was changed")
    return _open_immutable(source)


def _open_immutable(path: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?immutable=1"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


def check_backup(source: str) -> tuple[int, int]:
    """Refuse ``source`` unless it is an intact noyo-listener database of a
    schema this program understands; return (schema version, events)."""
    if not os.path.isfile(source):
        raise StoreError(f"{source} does not exist or is not a file; nothing was changed")
    try:
        conn = open_backup(source)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {source}: {exc}; nothing was changed") from None
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] if "events" in tables else 0
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{source} cannot be read as a SQLite database ({exc}): it is damaged or not a "
                         "backup; nothing was changed") from None
    finally:
        conn.close()
    if problems != ["ok"]:
        raise StoreError(f"{source} fails SQLite's integrity check ({problems[0]}); nothing was changed: "
                         "pick another backup")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{source} has schema version {version}, newer than this program's {SCHEMA_VERSION}; "
                         "restore it with the newer noyo_listener.py; nothing was changed")
    if version < 1 or "events" not in tables:
        raise StoreError(f"{source} is not a noyo-listener database (no events table); nothing was changed")
    return version, events


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def change_feed_high_water(path: str) -> int | None:
    """The highest seq the change feed of the database at ``path`` has handed
    out (AUTOINCREMENT's counter); None when there is no database, no feed or
    nothing readable."""
    if not os.path.isfile(path):
        return None
    wal = path + "-wal"
    try:
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            # A crash left rows in its WAL, which immutable=1 would ignore. The
            # -shm this may create goes with the old WAL before the rename.
            conn = connect(path, mode="readonly")
        else:
            conn = _open_immutable(path)  # creates no root-owned -shm beside the service's database
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:  # damaged, or a schema without the feed: nothing to carry forward
        return None
    return row[0] if row else None


def _carry_change_feed_forward(copy: sqlite3.Connection, high_water: int | None) -> int | None:
    """Make the change feed of ``copy`` hand out seqs above ``high_water``;
    return the copy's own high-water mark before (None: it has no feed).

    An older backup has handed out fewer seqs than the database it replaces;
    without this, new rows would get seqs a consumer already saved as its
    bookmark, and `changes --since` would skip them. A backup whose schema
    predates the feed gets the counter too: the migration that creates the
    table later leaves an existing sqlite_sequence row alone."""
    has_feed = copy.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'").fetchone() is not None
    has_counter = copy.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone() is not None
    row = copy.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone() if has_counter else None
    own = row[0] if row else 0
    if high_water is not None and high_water > own:
        copy.execute("BEGIN IMMEDIATE")
        if not has_counter:
            # SQLite creates its counter table with the first AUTOINCREMENT table; it then stays.
            copy.execute("CREATE TABLE restore_creates_sqlite_sequence (n INTEGER PRIMARY KEY AUTOINCREMENT)")
            copy.execute("DROP TABLE restore_creates_sqlite_sequence")
        if row is None:
            copy.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('changes', ?)", (high_water,))
        else:
            copy.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'changes'", (high_water,))
        copy.execute("COMMIT")
    return own if has_feed else None


def restore_database(source: str, target: str) -> tuple[int | None, int | None]:
    """Put a copy of ``source`` in place of the database ``target``; the caller
    holds the instance lock (no `serve` runs). Return (the replaced database's
    change-feed high-water mark, the backup's own), None where there is none.

    The copy is written through SQLite's backup API into a temporary file in
    the target's directory (mode 0600, owned like the directory), its change
    feed's seq counter carried forward to the replaced database's, checked,
    made self-contained (no WAL) and fsynced, then renamed over the target:
    at every moment the target is the old database or the whole new one.
    """
    directory = os.path.dirname(os.path.abspath(target))
    require_directory_of(target)
    replaced_high_water = change_feed_high_water(target)
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(target) + ".restore-", suffix=".tmp", dir=directory)
    renamed = False
    try:
        try:
            os.fchmod(fd, 0o600)  # it holds member data
            own_like_directory(fd, directory)
        finally:
            os.close(fd)
        source_conn = open_backup(source)
        copy = sqlite3.connect(temporary, isolation_level=None)
        try:
            source_conn.backup(copy)  # one step: a single consistent snapshot
            backup_high_water = _carry_change_feed_forward(copy, replaced_high_water)
            check = copy.execute("PRAGMA quick_check").fetchone()[0]
            # The copy must be one file: a WAL beside it would not follow the rename.
            journal = copy.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        finally:
            copy.close()
            source_conn.close()
        if check != "ok" or journal.lower() != "delete" or os.path.exists(temporary + "-wal"):
            raise StoreError(f"the copy of {source} did not check out (quick_check: {check}); nothing was changed")
        _fsync_path(temporary)
        # The old database's WAL, shared memory and rollback journal go first:
        # SQLite would replay a stale WAL or journal into the new file. A crash
        # right here leaves the old database as of its last checkpoint.
        for suffix in ("-wal", "-shm", "-journal"):
            _unlink_if_present(target + suffix)
        os.replace(temporary, target)
        renamed = True
        _fsync_path(directory)  # the rename itself survives a power loss
        return replaced_high_water, backup_high_water
    except sqlite3.Error as exc:
        raise StoreError(f"restore of {source} failed: {exc}; nothing was changed") from None
    except OSError as exc:
        raise StoreError(f"restore of {source} into {directory} failed: {exc.strerror or exc}") from None
    finally:
        if not renamed:
            for leftover in (temporary, temporary + "-journal", temporary + "-wal", temporary + "-shm"):
                _unlink_if_present(leftover)


# --- Signature -------------------------------------------------------------


FORM_TIMESTAMP_BODY = "timestamp.body"
FORM_BODY = "body"
MAX_SIGNATURES = 16  # more entries in one header are ignored (bounded work)


@dataclasses.dataclass(**_SLOTS)
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
    return _age_reason("timestamp", now - sent, max_age, max_skew)


def check_signed_created(created: int | float | None, now: float, max_age: float, max_skew: float) -> str | None:
    """Return why ``event.created`` is outside the window, or None if it is fine.

    A body-form signature leaves ``x-noyo-timestamp`` unsigned, so a captured
    body could be replayed with a fresh header; ``event.created`` is inside
    the signed body, so the window is applied to it as well. An event without
    a usable ``created`` cannot be dated, so in that form it is refused.
    ``max_age`` of 0 turns the check off, as for the header.
    """
    if max_age <= 0:
        return None
    if created is None:
        return "no_event_created"
    return _age_reason("event_created", now - created, max_age, max_skew)


def _age_reason(what: str, age: float, max_age: float, max_skew: float) -> str | None:
    if age > max_age:
        return f"{what}_too_old"
    if -age > max_skew:
        return f"{what}_in_future"
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


# Printable ASCII but space, '"', '=' and backslash: such a value cannot end
# its field early, start a new line or add a key=value of its own.
_BARE_LOG_VALUE = re.compile(r'[!#-<>-\[\]-~]+')


def log_value(value: Any) -> str:
    """``value`` (anything a request chose: path, header, event id or type) as
    one field of a key=value log line: as is when it is plain, else quoted
    with JSON escapes, so a hostile value can neither start a new line (no
    CR, LF or other control character survives) nor add a field. None is
    ``-``. Every request-derived value in a log line goes through here."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    if _BARE_LOG_VALUE.fullmatch(text):
        return text
    return json.dumps(text)  # ensure_ascii: everything outside printable ASCII becomes an escape


class BadEvent(ValueError):
    """An authentic body that cannot be an event (answer 400)."""


@dataclasses.dataclass(**_SLOTS)
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


# Metrics (GET /metrics). Counters live in this process since it started;
# the gauges read from the database come from a connection of their own,
# read at most every few seconds by a low-priority thread (DatabaseGauges),
# so a scrape never waits for, or takes the CPU from, an acknowledgement.

# Every reason a 401, 400 or 413 is logged with, and counted under in
# noyo_listener_rejected_total. A new reason is one more line here (a reason
# missing from this tuple is counted as "other": tests/test_metrics.py fails).
REJECT_REASONS = (
    "bad_content_length",         # 400: Content-Length is not a number
    "body_too_large",             # 413: Content-Length over max_body_bytes
    "no_signature",               # 401
    "no_matching_signature",      # 401
    "no_timestamp",               # 401: check_timestamp
    "bad_timestamp",              # 401
    "timestamp_too_old",          # 401
    "timestamp_in_future",        # 401
    "no_event_created",           # 401: body-form signature without a usable event.created (replay protection)
    "event_created_too_old",      # 401: body-form signature, check_signed_created
    "event_created_in_future",    # 401
    "body_is_not_UTF-8_JSON",     # 400: BadEvent, spaces made underscores
    "body_is_not_a_JSON_object",  # 400
    "bad_request",                # 400 from waitress (broken framing), before the app sees the request
    "request_entity_too_large",   # 413 from waitress (a chunked body over the limit)
    "request_header_fields_too_large",  # 431 from waitress
)
# The kinds Noyo documents today (SPEC, Facts about Noyo); [fetch] and [lists]
# keys are added at start. Any other kind is labelled "other".
NOYO_KINDS = ("difference", "member_snapshot", "member_snapshot_carrier_fulfillment_status", "group",
              "group_connection_request", "group_disconnection_request", "test")
API_STATES = ("healthy", "backing_off", "auth_failed", "fetching_off")
EVENT_STATUSES = ("pending", "done", "ignored", "dead")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Idle, an ack takes about a millisecond; under load p99 is 10-40 ms (bench/README.md).
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label_value(value: Any) -> str:
    """A label value as the text format wants it quoted: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Metrics:
    """This process's counters and ack histogram, and the text Prometheus reads.

    Each update takes one lock for a dict update or two (well under a
    microsecond): read-modify-write of a dict entry is not atomic under the
    GIL, and a lost increment would make a counter lie. Label values come
    from bounded sets only (known kinds, REJECT_REASONS, status codes the
    program itself sends), so no sender can create series.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: frozenset = frozenset(NOYO_KINDS)
        self._reasons = frozenset(REJECT_REASONS)
        self._requests: dict[str, int] = {code: 0 for code in ("200", "400", "401", "413", "503")}
        self._rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._received: dict[tuple[str, str], int] = {}
        self._ack_counts = [0] * (len(ACK_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self._ack_sum = 0.0
        self._fetches: dict[tuple[str, str], int] = {}
        self._sync_new: dict[str, int] = {}
        self._last_sync: dict[str, float] = {}

    def configure(self, fetch_kinds: Iterable[str], list_kinds: Iterable[str] = ()) -> None:
        """Add the [fetch] and [lists] kinds to the known ones; start their series at 0."""
        list_kinds = list(list_kinds)
        with self._lock:
            self._kinds = frozenset(NOYO_KINDS) | frozenset(fetch_kinds) | frozenset(list_kinds)
            for kind in (*sorted(self._kinds), "other"):
                for duplicate in ("false", "true"):
                    self._received.setdefault((kind, duplicate), 0)
            for kind in list_kinds:
                self._sync_new.setdefault(kind, 0)
                self._last_sync.setdefault(kind, 0.0)

    def kind_label(self, kind: str) -> str:
        return kind if kind in self._kinds else "other"

    def acknowledged(self, event_type: str, duplicate: bool, seconds: float) -> None:
        """A 200 for an event, ``seconds`` after its request reached the handler."""
        key = (self.kind_label(event_kind(event_type)), "true" if duplicate else "false")
        bucket = bisect.bisect_left(ACK_BUCKETS, seconds)
        with self._lock:
            self._requests["200"] += 1
            self._received[key] = self._received.get(key, 0) + 1
            self._ack_counts[bucket] += 1
            self._ack_sum += seconds

    def rejected(self, status: int, reason: str) -> None:
        """A 401/400/413 (or waitress's own 400/413/431) with the reason its log line gives."""
        reason = reason if reason in self._reasons else "other"
        code = str(status)
        with self._lock:
            self._requests[code] = self._requests.get(code, 0) + 1
            self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def answered(self, status: int) -> None:
        """Any other answer worth counting (503, 404, 405, 500)."""
        code = str(status)
        with self._lock:
            self._requests[code] = self._requests.get(code, 0) + 1

    def fetched(self, kind: str, outcome: str) -> None:
        """The worker got an answer for one object GET: ``ok`` or the failure's kind."""
        key = (self.kind_label(kind), outcome)
        with self._lock:
            self._fetches[key] = self._fetches.get(key, 0) + 1

    def sync_finished(self, kind: str, new_objects: int, finished_at: float | None = None) -> None:
        """A reconciliation pass of ``kind`` completed, finding ``new_objects``
        no webhook announced (``finished_at``: unix seconds, default now)."""
        kind = self.kind_label(kind)
        with self._lock:
            self._sync_new[kind] = self._sync_new.get(kind, 0) + int(new_objects)
            self._last_sync[kind] = max(self._last_sync.get(kind, 0.0),
                                        time.time() if finished_at is None else float(finished_at))

    def exposition(self, database: "DatabaseReading | None" = None, api_state: str | None = None) -> bytes:
        """Every metric in the Prometheus text format 0.0.4."""
        with self._lock:
            requests, rejected, received = dict(self._requests), dict(self._rejected), dict(self._received)
            ack_counts, ack_sum = list(self._ack_counts), self._ack_sum
            fetches, sync_new, last_sync = dict(self._fetches), dict(self._sync_new), dict(self._last_sync)
        if database is not None:
            for kind, finished in database.last_sync.items():
                kind = self.kind_label(kind)
                # syncs is the record (also of `sync` run by another process), unless
                # this process finished a pass after the reading was taken.
                if last_sync.get(kind, 0.0) <= database.taken_at:
                    last_sync[kind] = finished
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, dict, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for suffix, labels, value in samples:
                text = ",".join(f'{key}="{_label_value(val)}"' for key, val in labels.items())
                out.append(f"{name}{suffix}{{{text}}} {_sample_value(value)}" if text
                           else f"{name}{suffix} {_sample_value(value)}")

        family("noyo_listener_requests_total", "counter",
               "Requests answered, by HTTP status (health checks and scrapes not counted).",
               (("", {"code": code}, n) for code, n in sorted(requests.items())))
        family("noyo_listener_rejected_total", "counter",
               "Requests refused with 401, 400 or 413, by the reason the log line gives.",
               (("", {"reason": reason}, n) for reason, n in sorted(rejected.items())))
        family("noyo_listener_events_received_total", "counter",
               "Authentic events acknowledged, by kind (type before the first dot) and whether already seen.",
               (("", {"kind": kind, "duplicate": dup}, n) for (kind, dup), n in sorted(received.items())))
        cumulative, buckets = 0, []
        for bound, count in zip((*ACK_BUCKETS, math.inf), ack_counts):
            cumulative += count
            buckets.append(("_bucket", {"le": "+Inf" if math.isinf(bound) else repr(bound)}, cumulative))
        family("noyo_listener_ack_seconds", "histogram",
               "Seconds from a POST reaching the handler to its 200 answer (200s only).",
               [*buckets, ("_sum", {}, ack_sum), ("_count", {}, cumulative)])
        # Without a database reading (or a worker) a family is announced without samples.
        family("noyo_listener_events", "gauge", "Rows of the events table, by status.",
               () if database is None else (("", {"status": status}, database.events.get(status, 0))
                                            for status in sorted({*EVENT_STATUSES, *database.events})))
        family("noyo_listener_oldest_pending_seconds", "gauge",
               "Age of the oldest pending event in seconds (0 when none is pending).",
               () if database is None else [("", {}, database.oldest_pending_age())])
        family("noyo_listener_fetches_total", "counter", "Object GETs to the Noyo API, by kind and outcome.",
               (("", {"kind": kind, "outcome": outcome}, n) for (kind, outcome), n in sorted(fetches.items())))
        family("noyo_listener_api_state", "gauge", "The worker's view of the Noyo API: 1 for the current state.",
               () if api_state is None else (("", {"state": state}, int(state == api_state)) for state in
                                             (*API_STATES, *((api_state,) if api_state not in API_STATES else ()))))
        family("noyo_listener_sync_new_objects_total", "counter",
               "Objects reconciliation found that no webhook announced, by kind.",
               (("", {"kind": kind}, n) for kind, n in sorted(sync_new.items())))
        family("noyo_listener_last_sync_timestamp_seconds", "gauge",
               "Unix time the last completed reconciliation pass of a kind finished (0: none yet).",
               (("", {"kind": kind}, finished) for kind, finished in sorted(last_sync.items())))
        family("noyo_listener_build_info", "gauge", "The running version; always 1.",
               [("", {"version": __version__, "python": "%d.%d.%d" % sys.version_info[:3]}, 1)])
        return ("\n".join(out) + "\n").encode("utf-8")


METRICS = Metrics()  # the process's one registry; the worker and reconciliation report into it too


@dataclasses.dataclass(frozen=True)
class DatabaseReading:
    """What one look at the database found, for the gauges."""

    events: dict[str, int]
    oldest_pending_at: float | None  # unix seconds of the oldest pending event's arrival
    last_sync: dict[str, float]  # kind -> unix seconds its last completed pass finished
    taken_at: float  # unix seconds the reading started

    def oldest_pending_age(self) -> float:
        return 0.0 if self.oldest_pending_at is None else max(0.0, round(time.time() - self.oldest_pending_at, 3))


def read_pending(conn: sqlite3.Connection) -> tuple[int, float | None]:
    """How many events are pending, and when the oldest arrived: through the
    partial index ``events_due``, so it costs what the backlog is, not the table."""
    count, first = conn.execute("SELECT COUNT(*), MIN(received_at) FROM events WHERE status = 'pending'").fetchone()
    return count, parse_utc_iso(first) if first else None


def read_event_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows of ``events`` by status: a scan of the whole table (0.65 s at a
    million rows; an index on status would cost every acknowledgement)."""
    return dict(conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status").fetchall())


def read_last_syncs(conn: sqlite3.Connection) -> dict[str, float]:
    """When the last completed reconciliation pass of each kind finished, if
    there is a ``syncs`` table (SPEC, Reconciliation)."""
    last_sync: dict[str, float] = {}
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'syncs'").fetchone():
        for kind, finished in conn.execute(
                "SELECT kind, MAX(finished_at) FROM syncs WHERE status = 'done' GROUP BY kind"):
            try:
                last_sync[kind] = parse_utc_iso(finished)
            except (TypeError, ValueError, AttributeError):
                continue
    return last_sync


class DatabaseGauges:
    """The gauges' database reading, kept fresh for scrapes without costing acks.

    One thread of its own takes each reading on its own read connection
    (never the writer's), at a low CPU priority (nice 10: about a tenth of
    the CPU a request thread gets when the core is busy). Not nice 19: a
    reading starved for a minute would hold its WAL snapshot that long, and
    the WAL could not be checkpointed meanwhile.

    What the alerts need (pending count, oldest pending) is cheap and read
    at most every ``MIN_AGE`` seconds. The other statuses need a scan of
    ``events``, read at most every ``COUNTS_MIN_AGE`` seconds. Each is also
    reused ``COST_FACTOR`` times as long as it took, so frequent scrapes of
    a large database cost at most about 3% of a core. A scrape that finds
    the reading old asks for a new one and waits up to ``WAIT`` seconds for
    it, else answers with the previous one.
    """

    NICE = 10
    MIN_AGE = 5.0
    COUNTS_MIN_AGE = 30.0
    COST_FACTOR = 30
    WAIT = 1.0
    LOG_EVERY = 60.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reading: DatabaseReading | None = None
        self._due = 0.0  # monotonic time after which a scrape asks for a new reading
        self._counts: dict[str, int] | None = None  # by status, from the last scan
        self._counts_due = 0.0
        self._taken = 0  # readings taken (or failed) so far
        self._changed = threading.Condition()
        self._wanted = threading.Event()
        self._busy = False  # a reading is being taken: scrapes wait for it rather than ask for another
        self._thread: threading.Thread | None = None
        self._error_logged = -math.inf

    def current(self) -> DatabaseReading | None:
        """The latest reading (None until the first succeeds, or after a failure)."""
        if time.monotonic() < self._due:
            return self.reading
        with self._changed:
            taken = self._taken
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="noyo-metrics", daemon=True)
                self._thread.start()
            if not self._busy:
                self._wanted.set()
            self._changed.wait_for(lambda: self._taken != taken, self.WAIT)
        return self.reading

    def _take(self, conn: sqlite3.Connection) -> tuple[DatabaseReading, float]:
        """A new reading, and the monotonic time after which the next is due."""
        started, taken_at = time.monotonic(), time.time()
        if self._counts is None or started >= self._counts_due:
            self._counts = read_event_counts(conn)
            self._counts_due = time.monotonic() + max(self.COUNTS_MIN_AGE,
                                                      self.COST_FACTOR * (time.monotonic() - started))
        cheap = time.monotonic()
        pending, oldest = read_pending(conn)
        reading = DatabaseReading({**self._counts, "pending": pending}, oldest, read_last_syncs(conn), taken_at)
        return reading, time.monotonic() + max(self.MIN_AGE, self.COST_FACTOR * (time.monotonic() - cheap))

    def _run(self) -> None:
        try:  # Linux: a thread is a task with its own nice value; raising it needs no privilege
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.NICE)
        except (AttributeError, OSError):
            pass
        conn: sqlite3.Connection | None = None
        while True:
            self._wanted.wait()
            with self._changed:
                self._wanted.clear()
                self._busy = True
            try:
                conn = conn or self.store.read()
                reading, due = self._take(conn)
            except (sqlite3.Error, StoreError, ValueError) as exc:
                reading, due, self._counts = None, time.monotonic() + self.MIN_AGE, None
                if conn is not None:
                    conn.close()
                    conn = None
                if time.monotonic() - self._error_logged > self.LOG_EVERY:
                    self._error_logged = time.monotonic()
                    logger.warning("metrics cannot read the database; events gauges left out error=%s", exc)
            with self._changed:  # reading before due: a scrape never sees a new due with an old reading
                self.reading = reading
                self._due = due
                self._taken += 1
                self._busy = False
                self._changed.notify_all()


class SharedCheck:
    """Single-flight: one call of ``check`` runs at a time; callers that arrive
    meanwhile wait for it and share its result; a healthy result stays fresh
    for ``fresh`` seconds. A caller that waits longer than ``wait`` gets a
    problem saying so (the check itself is then stuck)."""

    def __init__(self, check: Callable[[], list[str]], fresh: float, wait: float) -> None:
        self.check = check
        self.fresh = fresh
        self.wait = wait
        self._lock = threading.Lock()
        self._result: tuple[float, list[str]] | None = None  # (monotonic when finished, problems)
        self._running: threading.Event | None = None

    def verdict(self) -> list[str]:
        with self._lock:
            result = self._result
            # Only a healthy verdict is reused after its check ended: a recovery
            # must show at once, and a failure is shared by the callers that
            # waited for it.
            if result is not None and not result[1] and time.monotonic() - result[0] < self.fresh:
                return []
            running = self._running
            leader = running is None
            if leader:
                running = self._running = threading.Event()
        assert running is not None
        if not leader:
            if not running.wait(self.wait):
                return [f"health check did not finish within {self.wait:g}s"]
            with self._lock:
                return list(self._result[1]) if self._result else ["health check failed"]
        try:
            problems = self.check()
        except Exception as exc:  # noqa: BLE001 - every waiter needs an answer
            problems = [f"health check failed: {exc.__class__.__name__}: {exc}"]
        with self._lock:
            self._result = (time.monotonic(), problems)
            self._running = None
        running.set()
        return list(problems)


class Receiver:
    """The webhook route and the health check, as a Bottle app."""

    HEALTH_FRESH = 1.0  # seconds one health verdict is shared

    def __init__(self, settings: Settings, store: Store, worker: "Worker | None" = None) -> None:
        self.store = store
        self.worker = worker
        self.path = settings["server"]["path"]
        self.policy = RequestPolicy.from_settings(settings)
        self._health = SharedCheck(self._check_health, fresh=self.HEALTH_FRESH,
                                   wait=store.busy_timeout * 2 + 5)
        METRICS.configure(settings.fetch, settings.lists)
        self.database_gauges = DatabaseGauges(store)
        self.app = self._build_app()

    def _build_app(self) -> bottle.Bottle:
        app = bottle.Bottle(catchall=True)
        app.config["json.enable"] = False  # answers are pre-encoded bytes
        app.route(self.path, "POST", self.receive_webhook)
        app.route("/healthz", "GET", self.healthz)
        app.route("/metrics", "GET", self.metrics)
        for code in (404, 405, 500):
            app.error(code)(self._error_page)
        return app

    @staticmethod
    def _answer(status: int, body: bytes) -> bottle.HTTPResponse:
        return bottle.HTTPResponse(body=body, status=status, headers=_JSON)

    @staticmethod
    def _log_request(level: int, environ: dict, status: int, started: float | None, details: str) -> None:
        """The one line each request gets: never a payload, never a secret."""
        if not logger.isEnabledFor(level):
            return
        elapsed = f"{(time.perf_counter() - started) * 1000:.1f}" if started is not None else "-"
        log_line(level, f"request method={log_value(environ.get('REQUEST_METHOD'))} "
                        f"path={log_value(environ.get('PATH_INFO'))} status={status} ms={elapsed} {details} "
                        f"remote={log_value(environ.get('REMOTE_ADDR'))}")

    def _reject(self, status: int, reason: str, environ: dict, started: float, message: str) -> bottle.HTTPResponse:
        self._log_request(logging.WARNING, environ, status, started,
                          f"reason={reason} trace={log_value(environ.get('HTTP_X_CLOUD_TRACE_CONTEXT'))}")
        METRICS.rejected(status, reason)
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
        if match.form == FORM_BODY:
            replay = check_signed_created(parsed.created, time.time(), policy.max_age, policy.max_skew)
            if replay is not None:
                return self._reject(401, replay, environ, started, "unauthorized")

        delivery = Delivery(
            received_at=utc_iso(), noyo_timestamp=timestamp,
            trace_context=environ.get("HTTP_X_CLOUD_TRACE_CONTEXT"),
            secret_name=match.secret_name, signature_form=match.form,
        )
        event_fields = f"event_id={log_value(parsed.event_id)} type={log_value(parsed.type or None)}"
        try:
            duplicate = self.store.write(None, batch_fn=store_events, item=(parsed, delivery))
        except StoreError as exc:
            self._log_request(logging.ERROR, environ, 503, started,
                              f"{event_fields} reason=not_stored error={log_value(str(exc))}")
            METRICS.answered(503)
            return self._answer(503, _json_error("cannot store the event now; retry later"))
        self._log_request(logging.INFO, environ, 200, started,
                          f"{event_fields} stored={parsed.status} duplicate={int(duplicate)} "
                          f"secret={log_value(match.secret_name)} form={match.form}")
        if not duplicate and parsed.status == "pending" and self.worker is not None:
            self.worker.wake_for_new_event()
        METRICS.acknowledged(parsed.type, duplicate, time.perf_counter() - started)
        return self._answer(200, _OK_DUPLICATE if duplicate else _OK)

    def health_problems(self) -> list[str]:
        """Why the service is unhealthy (empty when a write commits and the worker progresses).

        Concurrent callers share one check in flight, and its verdict for
        HEALTH_FRESH seconds after: any number of probes (the watchdog's
        included) cost one commit and get the same answer.
        """
        return self._health.verdict()

    def _check_health(self) -> list[str]:
        problems = []
        if not self.store.writer_alive():
            problems.append("database writer thread is not running")
        else:
            try:
                self.store.write(lambda conn: set_meta(conn, "healthz_at", utc_iso()),
                                 timeout=self.store.busy_timeout + 2)
            except StoreError as exc:
                problems.append(f"database not writable: {exc}")
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

    def metrics(self) -> bottle.HTTPResponse:
        """GET /metrics: the Prometheus text format; no auth (keep it off the TLS proxy)."""
        started = time.perf_counter()
        worker = self.worker
        api_state = None if worker is None else (worker.health.state if worker.client is not None else "fetching_off")
        body = METRICS.exposition(self.database_gauges.current(), api_state)
        # A scrape every 15 s would flood the journal at INFO: DEBUG, like /healthz.
        self._log_request(logging.DEBUG, bottle.request.environ, 200, started, "check=metrics")
        return bottle.HTTPResponse(body=body, status=200, headers=[("Content-Type", METRICS_CONTENT_TYPE)])

    def _error_page(self, error: bottle.HTTPError) -> bytes:
        environ = bottle.request.environ
        if error.status_code == 500:
            self._log_request(logging.ERROR, environ, 500, None, f"error={log_value(repr(error.exception))}")
        else:
            reason = "_".join(error.status_line.split(" ", 1)[1].lower().split())  # not_found, method_not_allowed
            self._log_request(logging.INFO, environ, error.status_code, None, f"reason={reason}")
        METRICS.answered(error.status_code)
        bottle.response.content_type = "application/json"
        return _json_error(error.status_line.split(" ", 1)[1].lower())


class _LoggedErrorTask(waitress.task.ErrorTask):
    """waitress answers some bad requests itself (413 on Content-Length, 400 on
    broken framing) before our app sees them; log those like our own."""

    def execute(self) -> None:
        error = self.request.error
        logger.warning("request rejected by the http layer status=%d reason=%s remote=%s",
                       error.code, log_value("_".join(error.reason.lower().split())),
                       log_value(self.channel.addr[0] if self.channel.addr else None))
        METRICS.rejected(error.code, "_".join(error.reason.lower().split()))
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
        # With a TLS proxy in front, every peer is the proxy: when the peer is
        # [server] trusted_proxy, waitress puts the last X-Forwarded-For hop
        # (the address the proxy saw) in REMOTE_ADDR. From anyone else the
        # header is dropped, so a client cannot choose the address we log.
        **({"trusted_proxy": server_cfg["trusted_proxy"], "trusted_proxy_count": 1,
            "trusted_proxy_headers": {"x-forwarded-for"}} if server_cfg["trusted_proxy"] else {}),
        clear_untrusted_proxy_headers=True,
    )
    server.channel_class = _Channel
    return server


# --- Noyo client -----------------------------------------------------------


class FetchError(Exception):
    """A failed API exchange. ``kind`` names what failed, one of FETCH_FAILURES;
    what that means for the event and for the API is FAILURE_POLICY's to say."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        assert kind in FETCH_FAILURES, kind
        self.kind = kind
        self.retry_after = retry_after


# What can fail in an exchange with the API (a small fixed set: logs and
# metrics use these names).
FETCH_FAILURES = (
    "transient",     # connection refused/reset, timeout, 5xx, a 2xx body that is not JSON at all
    "rate_limited",  # 429
    "credentials",   # the token endpoint refused client_id/client_secret
    "not_found",     # object GET answered 404 (maybe not visible yet)
    "refused",       # object GET answered 403, 400, 410, 422, or 401 with a fresh token
    "not_object",    # the answer is JSON, but not an object
)

# Object answers that no retry will change: the event is dead until an operator acts.
_REFUSED_OBJECT_STATUSES = {400: "Bad Request", 403: "Forbidden", 410: "Gone", 422: "Unprocessable Entity"}

_DIGITS = re.compile(r"[0-9]+")
# What an Authorization header can carry: visible ASCII, no spaces, no CR/LF.
_SENDABLE_TOKEN = re.compile(r"[\x21-\x7e]+")  # ASCII only: str.isdigit() accepts "²", which float() refuses


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date).

    None when absent or malformed; never raises, whatever the header holds
    (the caller caps the result at ``backoff_max``).
    """
    if not value:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(min(int(value[:30]), 10**12)) if len(value) <= 30 else 1e12
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def token_lifetime(expires_in: Any) -> float:
    """How long to trust a token, in seconds.

    Noyo says tokens live about 10 minutes but its ``expires_in`` unit is
    unreliable (seconds or milliseconds), so: read huge values as
    milliseconds, never trust more than 10 minutes, refresh a margin early.
    """
    try:
        seconds = float(expires_in)
    except OverflowError:  # an int too large for a float: "very long", which 10 minutes caps
        seconds = 600.0
    except (TypeError, ValueError):
        seconds = 600.0
    if not math.isfinite(seconds):
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
        raise FetchError("not_object", f"answer is JSON but not an object ({type(data).__name__})")
    # Both are answers about the wrong thing, which no retry changes (a list,
    # or another object): dead at once, and the API itself works.
    if "id" not in data:
        raise FetchError("not_object", "answer is a JSON object without an id; the [fetch] URL probably "
                         "points at a list, not at one object: fix it, then requeue")
    if str(data["id"]) != expected_id:
        raise FetchError("not_object", f"answer is for id {str(data['id'])[:80]!r}, not {expected_id!r}; "
                         "the [fetch] URL probably points at another object: fix it, then requeue")
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
                # A socket operation that timed out has waited the whole timeout
                # too. (socket.timeout is TimeoutError only from Python 3.10 on.)
                if fired.is_set() or isinstance(exc, (TimeoutError, socket.timeout)):
                    raise TimeoutError(f"no complete answer within {self.timeout:g}s") from None
                # A kept-alive connection the server already closed fails at
                # once; retry that on a fresh one, but never a timeout.
                if reused:
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


class _TokenRefresh:
    """One token request in flight; the threads that need a token meanwhile
    wait for it and share its result, success or failure."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.token: str | None = None
        self.error: FetchError | None = None


class NoyoClient:
    """Talks to Noyo's REST API with a shared, refreshed token.

    Every failure is raised as a FetchError whose ``kind`` FAILURE_POLICY
    interprets; this class only says what happened.
    """

    def __init__(self, settings: Settings) -> None:
        api = settings["noyo_api"]
        self.token_url = api["token_url"]
        self.timeout = api["timeout"]
        self._basic = "Basic " + base64.b64encode(f"{api['client_id']}:{api['client_secret']}".encode()).decode()
        self._http = _HttpPool(api["timeout"])
        self._lock = threading.Lock()  # guards the fields below; never held across I/O
        self._token: str | None = None
        self._token_expires = 0.0
        self._refresh: _TokenRefresh | None = None

    def _token_for(self, stale: str | None = None) -> str:
        """A valid token; ``stale`` is one the API just refused (refresh it once).

        Single-flight: one thread requests a token, the others that need one
        meanwhile wait for that request and share its answer.
        """
        with self._lock:
            if self._token and self._token != stale and time.monotonic() < self._token_expires:
                return self._token
            refresh = self._refresh
            leader = refresh is None
            if leader:
                refresh = self._refresh = _TokenRefresh()
                self._token = None
        assert refresh is not None
        if not leader:
            if not refresh.done.wait(self.timeout + 5):
                raise FetchError("transient", "token request of another thread did not finish")
            if refresh.error is not None:
                raise refresh.error
            assert refresh.token is not None
            return refresh.token
        try:
            token, lifetime = self._request_token()
        except FetchError as error:
            refresh.error = error
            raise
        except Exception as exc:  # noqa: BLE001 - waiters must be answered whatever happened
            refresh.error = FetchError("transient", f"token request failed: {exc.__class__.__name__}")
            raise refresh.error from exc
        else:
            refresh.token = token
            with self._lock:
                self._token, self._token_expires = token, time.monotonic() + lifetime
            return token
        finally:
            with self._lock:
                self._refresh = None
            refresh.done.set()

    def _request_token(self) -> tuple[str, float]:
        """POST the client credentials; the token and how long to trust it."""
        try:
            status, headers, body = self._http.request("POST", self.token_url, {
                "Authorization": self._basic, "Content-Type": "application/json",
                "Accept": "application/json", "User-Agent": USER_AGENT,
            }, b'{"grant_type": "client_credentials"}')
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise FetchError("transient", f"token request failed: {exc.__class__.__name__}: {exc}") from None
        if status in (400, 401, 403):
            raise FetchError("credentials", f"token endpoint {self.token_url} answered {status}; "
                             "check [noyo_api] client_id and client_secret")
        self._raise_for_status(status, headers, f"token endpoint {self.token_url}")
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            answer = None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise FetchError("transient", "token endpoint answered without an access_token")
        if not _SENDABLE_TOKEN.fullmatch(token):
            raise FetchError("transient", "token endpoint answered an access_token that cannot be sent in a "
                             "header (not printable ASCII)")
        return token, token_lifetime(answer.get("expires_in"))

    @staticmethod
    def _raise_for_status(status: int, headers: dict[str, str], what: str) -> None:
        if 200 <= status < 300:
            return
        retry_after = parse_retry_after(headers.get("retry-after"))
        if status == 429:
            raise FetchError("rate_limited", f"{what} answered 429 Too Many Requests", retry_after)
        raise FetchError("transient", f"{what} answered HTTP {status}", retry_after)

    @staticmethod
    def longest_fetch(timeout: float) -> float:
        """The longest one get_json can take: a token request (or the wait for
        another thread's, ``timeout + 5``), the GET, on a 401 a second token
        request and a second GET; each GET or POST bounded by ``timeout``."""
        token_request = timeout + 5
        return 2 * (token_request + timeout)

    def get_json(self, url: str) -> Any:
        """GET ``url`` with a token (refreshed once on a 401); the parsed JSON answer.

        Four exchanges at most (see longest_fetch, which the worker's health
        check relies on: keep them in step)."""
        token = self._token_for()
        for retry_on_401 in (True, False):
            try:
                status, headers, body = self._http.request("GET", url, {
                    "Authorization": f"Bearer {token}", "Accept": "application/json", "User-Agent": USER_AGENT,
                })
            except (http.client.HTTPException, OSError, ValueError) as exc:
                # ValueError: http.client refused to send a header (a token or URL it cannot encode).
                raise FetchError("transient", f"GET failed: {exc.__class__.__name__}: {exc}") from None
            if status == 401 and retry_on_401:
                token = self._token_for(stale=token)
                continue
            if status == 401:
                raise FetchError("refused", "API answered 401 Unauthorized with a fresh token; check that "
                                 "[noyo_api] client_id may read this object, then requeue")
            if status in _REFUSED_OBJECT_STATUSES:
                raise FetchError("refused", f"API answered {status} {_REFUSED_OBJECT_STATUSES[status]} for this "
                                 "object; fix the cause (access, [fetch] URL), then requeue")
            if status == 404:
                raise FetchError("not_found", "API answered 404 Not Found")
            self._raise_for_status(status, headers, "API")
            try:
                return json.loads(body)
            except ValueError:
                raise FetchError("transient", "answer is not JSON") from None
            except RecursionError:
                raise FetchError("transient", "answer is JSON nested too deeply to read") from None
        raise AssertionError("unreachable")

    def fetch(self, url: str, object_id: str) -> dict:
        """GET the object at ``url``; it must carry ``id == object_id``."""
        return unwrap_object(self.get_json(url), object_id)


# --- Worker ----------------------------------------------------------------


def _as_number(value: Any) -> int | float | None:
    """A ``modified``/``version`` value as a number (unix, numeric text or ISO 8601).

    Any JSON number compares safely: an int stays an int (float() of one past
    1e308 raises OverflowError; ints and floats compare exactly), NaN is None.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    number = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            try:
                number = parse_utc_iso(value)
            except (ValueError, OverflowError):
                return None
    return None if number is None or math.isnan(number) else number


def newness(obj: dict) -> tuple[int | float, int | float]:
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


CHANGE_SOURCES = ("fetch", "sync", "event")
_INSERT_CHANGE = ("INSERT INTO changes (kind, id, version, modified, state_from, state_to, observed_at, source, "
                  "event_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def record_change(conn: sqlite3.Connection, kind: str, obj: dict, state_from: str | None, state_to: str | None,
                  observed_at: str, source: str, event_type: str | None) -> None:
    """Append one row to the change feed, inside the caller's transaction."""
    if source not in CHANGE_SOURCES:
        raise ValueError(f"change source must be one of {', '.join(CHANGE_SOURCES)} (got {source!r})")
    conn.execute(_INSERT_CHANGE, (kind, str(obj["id"]), _scalar(obj.get("version")), _scalar(obj.get("modified")),
                                  state_from, state_to, observed_at, source, event_type))


def newest_event_type(conn: sqlite3.Connection, event_ids: list[str]) -> str | None:
    """The type of the newest of these events (``event_order``): what a fetch row names as its cause."""
    newest: tuple | None = None
    placeholders = ", ".join("?" * len(event_ids))
    for event_type, created in conn.execute(
            f"SELECT type, created FROM events WHERE event_id IN ({placeholders})", event_ids):
        if newest is None or event_order(created, event_type) >= newest:
            newest = event_order(created, event_type)
    return newest[2] if newest else None


def object_status(obj: dict) -> str | None:
    """The state the feed records for kinds other than differences: ``status`` when it is text."""
    status = obj.get("status")
    return status if isinstance(status, str) else None


def apply_difference(conn: sqlite3.Connection, obj: dict, body: str, event_ids: list[str], fetched_at: str, *,
                     source: str = "fetch", event_type: str | None = None) -> str:
    """Merge a fetched difference and the events that asked for it into its row.

    The result does not depend on the order of events and fetches: the row
    keeps the newest object (a fetch with an older ``modified`` never wins),
    the ``replaced`` flag only ever turns on, and ``last_event_type`` is the
    type of the newest event by ``created``.

    Returns ``new`` (first sighting), ``updated`` (a newer object, or the same
    version in another state) or ``unchanged`` (an older or identical one).
    The change feed gets a row, in this transaction, for ``new`` and
    ``updated``, and a row with source ``event`` when a ``difference.replaced``
    event alone changed the state. ``event_type`` names the event behind a
    fetch; by default the newest of ``event_ids`` (none for a sync pass).
    """
    diff_id = str(obj["id"])
    observed_at = fetched_at
    row = conn.execute("SELECT body, replaced, replaced_by, last_event_type, last_event_created, fetched_at, state "
                       "FROM differences WHERE id = ?", (diff_id,)).fetchone()
    stored = json.loads(row[0]) if row else None
    replaced, replaced_by = (bool(row[1]), row[2]) if row else (False, None)
    was_replaced, state_from = replaced, (row[6] if row else None)
    last_type, last_created = (row[3], row[4]) if row else (None, None)
    cause: tuple | None = None  # event_order of the newest event in event_ids

    placeholders = ", ".join("?" * len(event_ids))
    for type_, created, payload in conn.execute(
            f"SELECT type, created, payload FROM events WHERE event_id IN ({placeholders})", event_ids):
        if type_ == "difference.replaced":
            replaced = True
            try:
                data = json.loads(payload).get("data")
            except (ValueError, AttributeError):
                data = None
            replaced_by = replaced_by or find_replaced_by(data)
        if last_type is None or event_order(created, type_) >= event_order(last_created, last_type):
            last_type, last_created = type_, created
        if cause is None or event_order(created, type_) >= cause:
            cause = event_order(created, type_)
    if source == "sync":
        event_type = None  # a pass is behind it, not an event
    elif event_type is None and cause is not None:
        event_type = cause[2]

    newer = stored is None or newness(obj) > newness(stored)
    if stored is not None and newness(obj) < newness(stored):
        obj, body, fetched_at = stored, row[0], row[5]  # an older fetch: keep the newer object we have
    replaced_by = find_replaced_by(obj) or replaced_by
    state = difference_state(obj, replaced)
    conn.execute(_UPSERT_DIFFERENCE, (
        diff_id, state, _scalar(obj.get("resolved")), _scalar(obj.get("discrepancy_time")),
        _scalar(obj.get("modified")), _scalar(obj.get("version")), _scalar(obj.get("group_id")),
        _scalar(obj.get("employee_id")), _scalar(obj.get("carrier_id")), _scalar(obj.get("difference_type")),
        _scalar(obj.get("difference_classification")), last_type, last_created, int(replaced), replaced_by,
        fetched_at, body,
    ))
    if not newer and state == state_from:
        return "unchanged"
    # No newer object, yet another state: the replaced event of this call did
    # it (else an object whose modified and version did not move).
    by_event = not newer and replaced and not was_replaced
    record_change(conn, "difference", obj, state_from, state, observed_at,
                  "event" if by_event else source, "difference.replaced" if by_event else event_type)
    if stored is None:
        return "new"
    return "unchanged" if by_event else "updated"


def apply_resource(conn: sqlite3.Connection, kind: str, obj: dict, body: str, fetched_at: str, *,
                   source: str = "fetch", event_type: str | None = None) -> str:
    """Keep the newest fetched state of any other kind in ``resources``.

    Returns ``new``, ``updated`` or ``unchanged`` as ``apply_difference`` does,
    and appends to the change feed for the first two (state: ``status``).
    """
    object_id = str(obj["id"])
    row = conn.execute("SELECT body FROM resources WHERE kind = ? AND id = ?", (kind, object_id)).fetchone()
    stored = json.loads(row[0]) if row else None
    if stored is not None and newness(obj) < newness(stored):
        return "unchanged"
    conn.execute(
        "INSERT INTO resources (kind, id, modified, fetched_at, body) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (kind, id) DO UPDATE SET modified = excluded.modified, "
        "fetched_at = excluded.fetched_at, body = excluded.body",
        (kind, object_id, _scalar(obj.get("modified")), fetched_at, body),
    )
    state_from = object_status(stored) if stored is not None else None
    if stored is not None and newness(obj) == newness(stored) and object_status(obj) == state_from:
        return "unchanged"  # the same version again (its body and fetched_at refreshed)
    record_change(conn, kind, obj, state_from, object_status(obj), fetched_at, source,
                  None if source == "sync" else event_type)
    return "new" if stored is None else "updated"


def apply_object(conn: sqlite3.Connection, kind: str, obj: dict, body: str, event_ids: list[str],
                 fetched_at: str, source: str = "fetch", event_type: str | None = None) -> str:
    """Store one object from the API, whoever brought it (a fetch or a sync pass)."""
    if kind == "difference":
        return apply_difference(conn, obj, body, event_ids, fetched_at, source=source, event_type=event_type)
    if event_type is None and source == "fetch" and event_ids:
        event_type = newest_event_type(conn, event_ids)  # the change feed names the event behind a fetch
    return apply_resource(conn, kind, obj, body, fetched_at, source=source, event_type=event_type)


@dataclasses.dataclass
class _Claim:
    """Events that point at one object, fetched by one GET."""

    kind: str
    data_id: str | None
    events: list[tuple[str, int]]  # (event_id, attempts spent before this one)
    probe: bool = False  # dispatched as the single probe of a failing API

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.kind, self.data_id)


# --- Worker: the failure policy ---


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one kind of failed exchange means (a row of SPEC's failure table).

    ``event``: ``retry`` (backoff, spends an attempt, dead at max_attempts),
    ``dead`` (at once: no retry can help), ``wait`` (until the API pause
    ends, spends nothing). ``api``: ``failing`` (counts toward the API-wide
    pause), ``auth_failed`` (pauses everything now), ``answered`` (the API
    works; this object is the problem).
    """

    event: str
    api: str


FAILURE_POLICY: dict[str, Verdict] = {
    "transient": Verdict("retry", "failing"),
    "rate_limited": Verdict("retry", "failing"),
    "credentials": Verdict("wait", "auth_failed"),
    "not_found": Verdict("retry", "answered"),
    "refused": Verdict("dead", "answered"),
    "not_object": Verdict("dead", "answered"),
}

# The outcome of one fetch, as logs and metrics name it: a small fixed set.
FETCH_OUTCOMES = ("ok", *FETCH_FAILURES)

STOPPED_DURING_FETCH = "process stopped during fetch"


@dataclasses.dataclass(frozen=True)
class EventOutcome:
    """What becomes of one event after an exchange: its row's new values."""

    status: str  # done | pending | dead
    spent: int  # attempts this exchange cost (0 or 1)
    due: float | None  # next_attempt_at, unix seconds (pending only)
    last_error: str | None


class FailurePolicy:
    """The one place that turns an exchange's result into an event's fate
    and counts attempts (FAILURE_POLICY says what each failure means)."""

    def __init__(self, max_attempts: int, backoff_initial: float, backoff_max: float) -> None:
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

    @staticmethod
    def classify(error: FetchError) -> Verdict:
        return FAILURE_POLICY[error.kind]

    def retry_delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds before attempt ``attempts + 1``: between 0.5x and 1x of
        ``min(backoff_max, backoff_initial * 2^(attempts-1))``, or longer when
        ``Retry-After`` asks, up to ``backoff_max``."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(max(attempts, 1) - 1, 60))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > delay:
            delay = min(retry_after, self.backoff_max)
        return delay

    def decide(self, event: str, attempts_before: int, reason: str | None, now: float,
               retry_after: float | None = None, wait_until: float | None = None) -> EventOutcome:
        """``event`` is ``done``, a Verdict's ``retry``/``dead``/``wait``; attempts are counted here only."""
        if event == "wait":
            return EventOutcome("pending", 0, max(now, wait_until or now), reason)
        attempts = attempts_before + 1
        if event == "done":
            return EventOutcome("done", 1, None, None)
        if event == "dead":
            return EventOutcome("dead", 1, None, reason)
        if attempts >= self.max_attempts:
            return EventOutcome("dead", 1, None, f"gave up after {attempts} attempts: {reason}")
        return EventOutcome("pending", 1, now + self.retry_delay(attempts, retry_after), reason)


class ApiHealth:
    """Whether the Noyo API as a whole is usable, and when to try it again.

    Failures that FAILURE_POLICY says count (``failing``) from several
    different objects in a row mean the API, not an object, is the problem:
    then nothing is dispatched until a pause ends, and after it a single
    probe decides. The first answer resumes full speed. ``state`` is the one
    place to read the API's state: ``healthy``, ``backing_off`` or
    ``auth_failed``.
    """

    STATES = ("healthy", "backing_off", "auth_failed")
    FAILURES_BEFORE_PAUSE = 3  # different objects failing in a row
    LOG_EVERY = 30.0
    # Probe at least once a minute, whatever backoff_max says: a down API then
    # sees a request a minute, and a recovered one is used within a minute.
    MAX_PROBE_INTERVAL = 60.0

    def __init__(self, backoff_initial: float, backoff_max: float) -> None:
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.longest_pause = min(backoff_max, self.MAX_PROBE_INTERVAL)
        self.lock = threading.Lock()
        self.state = "healthy"
        self.failing_objects: set = set()  # objects that failed since the last answer
        self.pause = 0.0
        self.paused_until = 0.0
        self.last_error = ""
        self._last_log = 0.0
        self.changed = False  # set when `status` should learn the new state

    @property
    def consecutive_failures(self) -> int:
        return len(self.failing_objects)

    def probing(self) -> bool:
        return self.state != "healthy"

    def success(self) -> None:
        """The API answered (whatever it said about the object)."""
        with self.lock:
            if self.state != "healthy":
                logger.info("noyo api recovered state=healthy after_failures=%d", len(self.failing_objects))
                self.changed = True
            self.state, self.pause, self.paused_until = "healthy", 0.0, 0.0
            self.failing_objects.clear()

    def record(self, error: FetchError, key: Any) -> None:
        """Account one failed exchange about object ``key`` as FAILURE_POLICY says."""
        verdict = FailurePolicy.classify(error).api
        if verdict == "answered":
            self.success()
        elif verdict == "auth_failed":
            self._credentials_refused(error)
        else:
            self._failure(error, key)

    def _credentials_refused(self, error: FetchError) -> None:
        now = time.time()
        with self.lock:
            self.last_error = str(error)
            self.paused_until = now + self.longest_pause
            if self.state != "auth_failed":
                self.changed = True
                self._last_log = 0.0
            self.state = "auth_failed"
            if now - self._last_log >= self.LOG_EVERY:
                self._last_log = now
                logger.error("noyo api refused our credentials; fetching paused until %s (then a probe). "
                             "Fix [noyo_api] client_id/client_secret (or NOYO_CLIENT_ID/NOYO_CLIENT_SECRET) "
                             "and restart. error=%s",
                             utc_iso(self.paused_until), log_value(str(error)))

    def _failure(self, error: FetchError, key: Any) -> None:
        now = time.time()
        with self.lock:
            self.last_error = str(error)
            if len(self.failing_objects) < 64:  # enough to count "different objects"; bounded in a long outage
                self.failing_objects.add(key)
            retry_after = error.retry_after if error.retry_after and math.isfinite(error.retry_after) else 0.0
            if len(self.failing_objects) < self.FAILURES_BEFORE_PAUSE and not retry_after:
                return
            if len(self.failing_objects) >= self.FAILURES_BEFORE_PAUSE:
                self.pause = min(self.longest_pause, max(self.backoff_initial, self.pause * 2))
            wait = max(min(retry_after, self.longest_pause), self.pause / 2 + random.uniform(0, self.pause / 2))
            self.paused_until = max(self.paused_until, now + wait)
            if self.state == "healthy":
                self.changed = True
                self.state = "backing_off"
            if now - self._last_log >= self.LOG_EVERY:
                self._last_log = now
                logger.warning("noyo api failing; backing off until %s consecutive_errors=%d error=%s",
                               utc_iso(self.paused_until), len(self.failing_objects), log_value(str(error)))

    def snapshot(self) -> dict:
        with self.lock:
            return {"state": self.state, "until": utc_iso(self.paused_until) if self.state != "healthy" else None,
                    "consecutive_failures": len(self.failing_objects), "last_error": self.last_error or None}


class _OncePer:
    """Log a repeating failure once per cause and ``seconds``."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds
        self._last: dict[str, float] = {}

    def due(self, cause: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(cause, float("-inf")) < self.seconds:
            return False
        if len(self._last) > 100:
            self._last.clear()  # bounded, whatever the causes
        self._last[cause] = now
        return True


# --- Worker: recording outcomes ---


class OutcomeRecorder:
    """Writes what became of each claim, and frees the claim once committed.

    A fetch thread hands its outcome to the writer and goes on to its next
    GET; the recorder thread waits for each commit and only then releases the
    object for new claims (and logs it), so an fsync never delays a GET.
    """

    _SETTLE = ("UPDATE events SET status = ?, attempts = attempts + ?, next_attempt_at = ?, last_error = ?, "
               "processed_at = ?, lease_until = NULL WHERE event_id = ? AND status = 'pending'")

    def __init__(self, store: Store, release: Callable[[_Claim], None], policy: FailurePolicy) -> None:
        self.store = store
        self.release = release
        self.policy = policy
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()  # (write job, claim, log line) to see committed
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="noyo-recorder", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        if self._thread is not None:
            self._outcomes.put(_STOP)  # after every outcome the fetchers handed over
            self._thread.join(timeout)

    @classmethod
    def settle_rows(cls, conn: sqlite3.Connection, rows: list[tuple[str, EventOutcome]]) -> None:
        """Write each (event_id, outcome) to its events row."""
        stamp = utc_iso()
        conn.executemany(cls._SETTLE, [
            (o.status, o.spent, utc_iso(o.due) if o.due is not None else None, o.last_error,
             stamp if o.status != "pending" else None, event_id) for event_id, o in rows])

    def fetched(self, claim: _Claim, obj: dict, outcome: EventOutcome, started: float) -> bool:
        """The object arrived: store it and mark its events done."""
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        event_ids = [event_id for event_id, _ in claim.events]
        fetched_at = utc_iso()

        def record(conn: sqlite3.Connection) -> None:
            apply_object(conn, claim.kind, obj, body, event_ids, fetched_at, source="fetch")
            self.settle_rows(conn, [(event_id, outcome) for event_id in event_ids])
            set_meta(conn, "last_fetch_ok_at", fetched_at)

        return self.submit(claim, record, (
            logging.INFO, "object fetched kind=%s id=%s events=%d ms=%.1f", log_value(claim.kind),
            log_value(claim.data_id), len(event_ids), (time.monotonic() - started) * 1000))

    def failed(self, claim: _Claim, reason: str, rows: list[tuple[str, EventOutcome]]) -> bool:
        dead = sum(1 for _, o in rows if o.status == "dead")
        return self.submit(claim, lambda conn: self.settle_rows(conn, rows), (
            logging.ERROR if dead else logging.WARNING, "fetch failed kind=%s id=%s events=%d dead=%d error=%s",
            log_value(claim.kind), log_value(claim.data_id), len(rows), dead, log_value(reason)))

    def given_back(self, claim: _Claim, rows: list[tuple[str, EventOutcome]]) -> bool:
        return self.submit(claim, lambda conn: self.settle_rows(conn, rows))

    def submit(self, claim: _Claim, fn: Callable[[sqlite3.Connection], None], line: tuple | None = None) -> bool:
        """Queue an outcome for the writer; the recorder frees ``claim`` and
        logs ``line`` once it is committed. False if it could not be queued."""
        try:
            job = self.store.submit(fn)
        except StoreError as exc:
            logger.error("worker cannot record a fetch outcome error=%s", log_value(str(exc)))
            return False
        self._outcomes.put((job, claim, line))
        return True

    def _run(self) -> None:
        while True:
            item = self._outcomes.get()
            if item is _STOP:
                return
            job, claim, line = item
            try:
                self.store.result_of(job)
                if line:
                    logger.log(*line)
            except Exception as exc:  # noqa: BLE001 - the recorder must outlive one bad outcome
                self._settle_unrecorded(claim, exc)
            finally:
                self.release(claim)

    def _settle_unrecorded(self, claim: _Claim, exc: Exception) -> None:
        """The outcome could not be written (say, the object broke apply_object):
        the attempt still counts, so the event dies at max_attempts instead of
        coming back with its lease forever."""
        reason = f"cannot record the fetch outcome: {exc.__class__.__name__}: {exc}"[:500]
        now = time.time()
        rows = [(event_id, self.policy.decide("retry", attempts, reason, now)) for event_id, attempts in claim.events]
        logger.error("worker cannot record a fetch outcome kind=%s id=%s error=%s",
                     log_value(claim.kind), log_value(claim.data_id), log_value(reason))
        try:
            self.store.write(lambda conn: self.settle_rows(conn, rows))
        except StoreError as error:
            # The database itself refuses: the lease returns these events later.
            logger.error("worker cannot record a fetch outcome error=%s", log_value(str(error)))


# --- Worker: fetching ---


class InFlight:
    """The objects claimed and not yet settled: the scheduler skips them, the
    health check measures how long the oldest has been in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[tuple[str, str | None], float] = {}  # key -> monotonic claim or fetch start

    def __len__(self) -> int:
        return len(self._since)

    def keys(self) -> set:
        with self._lock:
            return set(self._since)

    def add(self, keys: Iterable[tuple[str, str | None]]) -> None:
        now = time.monotonic()
        with self._lock:
            self._since.update((key, now) for key in keys)

    def started(self, key: tuple[str, str | None]) -> None:
        """Its GET starts now (a queued claim waited behind another fetch)."""
        with self._lock:
            self._since[key] = time.monotonic()

    def remove(self, key: tuple[str, str | None]) -> None:
        with self._lock:
            self._since.pop(key, None)

    def oldest_age(self) -> float:
        now = time.monotonic()
        with self._lock:
            return now - min(self._since.values(), default=now)


class Fetchers:
    """``concurrency`` threads; each takes a claim, GETs its object, asks the
    failure policy what a failure means, and hands the outcome to the
    recorder. A claim whose turn comes while the API is paused is given back
    unfetched (only the scheduler's probe may ask)."""

    def __init__(self, client: NoyoClient | None, policy: FailurePolicy, health: ApiHealth,
                 recorder: OutcomeRecorder, inflight: InFlight, release: Callable[[_Claim], None]) -> None:
        self.client = client
        self.policy = policy
        self.health = health
        self.recorder = recorder
        self.inflight = inflight
        self.release = release
        self.stopping = threading.Event()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._errors = _OncePer(30.0)

    def start(self, count: int) -> None:
        for number in range(count):
            thread = threading.Thread(target=self._run, name=f"noyo-fetch-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def hand_out(self, claim: _Claim, url: str) -> None:
        self._tasks.put((claim, url))

    def stop(self, deadline: float) -> int:
        """Stop taking claims; how many threads were still busy at ``deadline``."""
        self.stopping.set()
        for _ in self._threads:
            self._tasks.put(_STOP)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self._threads)

    def _run(self) -> None:
        while True:
            item = self._tasks.get()
            if item is _STOP:
                return
            claim, url = item
            if self.stopping.is_set():
                continue  # a queued claim: its lease returns it at the next start
            handed_over = False
            try:
                if self.health.probing() and not claim.probe:
                    handed_over = self._give_back(claim)
                    continue
                self.inflight.started(claim.key)
                handed_over = self._fetch(claim, url)
            except Exception as exc:  # noqa: BLE001 - one bad object must not stop the fetcher
                if self._errors.due(f"fetch {exc.__class__.__name__}"):
                    logger.exception("worker failed on an object kind=%s id=%s",
                                     log_value(claim.kind), log_value(claim.data_id))
                # A fault of ours, not the API's: the attempt counts all the same,
                # so the event dies at max_attempts instead of looping.
                try:
                    handed_over = self._settle(claim, "retry",
                                               f"internal error: {exc.__class__.__name__}: {exc}"[:500])
                except Exception:  # noqa: BLE001 - then its lease returns it
                    logger.exception("worker cannot settle an object kind=%s id=%s",
                                     log_value(claim.kind), log_value(claim.data_id))
            finally:
                if not handed_over:
                    self.release(claim)

    def _fetch(self, claim: _Claim, url: str) -> bool:
        """GET the object and hand the outcome to the recorder; True once handed over."""
        assert self.client is not None and claim.data_id is not None
        started = time.monotonic()
        try:
            obj = self.client.fetch(url, claim.data_id)
        except FetchError as error:
            METRICS.fetched(claim.kind, error.kind)
            self.health.record(error, claim.key)
            return self._failed(claim, error)
        METRICS.fetched(claim.kind, "ok")
        self.health.success()
        return self.recorder.fetched(claim, obj, self.policy.decide("done", 0, None, time.time()), started)

    def _failed(self, claim: _Claim, error: FetchError) -> bool:
        return self._settle(claim, self.policy.classify(error).event, f"{error.kind}: {error}", error.retry_after)

    def _settle(self, claim: _Claim, event: str, reason: str, retry_after: float | None = None) -> bool:
        """Hand a failed fetch's outcome (``event`` as in FailurePolicy.decide) to the recorder."""
        now = time.time()
        rows = [(event_id, self.policy.decide(event, attempts, reason, now, retry_after, self.health.paused_until))
                for event_id, attempts in claim.events]
        return self.recorder.failed(claim, reason, rows)

    def _give_back(self, claim: _Claim) -> bool:
        """Not fetched, its attempt not spent, due again when the pause ends."""
        now = time.time()
        reason = f"not fetched yet: the API is paused ({self.health.last_error})"
        rows = [(event_id, self.policy.decide("wait", attempts, reason, now, wait_until=self.health.paused_until))
                for event_id, attempts in claim.events]
        return self.recorder.given_back(claim, rows)


# --- Worker: scheduling ---


class Worker:
    """Drains the inbox: fetches each referenced object and records its state.

    Its pieces, each readable alone: the scheduling (this class: one thread
    picks due events, groups those that point at the same object so one GET
    serves them all, claims them with a lease and hands them out), the
    fetching (Fetchers), the recording of outcomes (OutcomeRecorder), the
    failure policy (FAILURE_POLICY, FailurePolicy) and the API-wide pause
    (ApiHealth).

    It keeps one claimed object queued per fetch thread, so a thread that
    finishes starts its next GET at once instead of waiting for a scheduler
    cycle (a read and a commit): one cycle per finished fetch capped the
    drain at about 60% of concurrency / latency. It sleeps until it is woken
    (a new event, a finished fetch), the next event is due, or another
    process committed (a `requeue`).
    """

    MAX_SLEEP = 30.0
    # How often the scheduler looks for commits by other processes (`requeue`):
    # one PRAGMA data_version per look.
    REQUEUE_POLL = 1.0
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
        self.policy = FailurePolicy(worker["max_attempts"], worker["backoff_initial"], worker["backoff_max"])
        self.max_attempts = worker["max_attempts"]
        self.backoff_initial = worker["backoff_initial"]
        self.backoff_max = worker["backoff_max"]
        self.fetch_deadline = NoyoClient.longest_fetch(settings["noyo_api"]["timeout"])
        # A claimed event comes back by itself if this process dies mid-fetch;
        # it may wait behind one other fetch before its own starts.
        self.lease = 2 * self.fetch_deadline + 30
        self.health = ApiHealth(self.backoff_initial, self.backoff_max)
        self.inflight = InFlight()
        self.capacity = 2 * self.concurrency  # claims fetching or queued for a fetch thread
        self.recorder = OutcomeRecorder(store, self._release, self.policy)
        self.fetchers = Fetchers(client, self.policy, self.health, self.recorder, self.inflight, self._release)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = _OncePer(30.0)
        self.last_progress = time.monotonic()

    def retry_delay(self, attempts: int, retry_after: float | None = None) -> float:
        """See FailurePolicy.retry_delay."""
        return self.policy.retry_delay(attempts, retry_after)

    # Lifecycle

    def start(self) -> None:
        """Settle what a previous process left in flight, then start the threads."""
        self.store.write(self._settle_abandoned_leases)
        if self.client is None:
            logger.warning("fetching is off: set [noyo_api] client_id and client_secret (or NOYO_CLIENT_ID and "
                           "NOYO_CLIENT_SECRET) to fetch objects; events are stored and wait as pending")
        self._publish_state(force=True)
        self._thread = threading.Thread(target=self._run, name="noyo-worker", daemon=True)
        self._thread.start()
        self.recorder.start()
        self.fetchers.start(self.concurrency)

    def _settle_abandoned_leases(self, conn: sqlite3.Connection) -> None:
        """Events still leased were in flight when a previous process stopped:
        that attempt counts (so a crash loop cannot fetch an object forever)."""
        now = time.time()
        rows = [(event_id, self.policy.decide("retry", attempts, STOPPED_DURING_FETCH, now))
                for event_id, attempts in conn.execute(
                    "SELECT event_id, attempts FROM events WHERE status = 'pending' AND lease_until IS NOT NULL")]
        # Due now, not after a backoff: the stop was ours, not the API's.
        rows = [(event_id, dataclasses.replace(o, due=now) if o.status == "pending" else o) for event_id, o in rows]
        OutcomeRecorder.settle_rows(conn, rows)
        dead = sum(1 for _, o in rows if o.status == "dead")
        if rows:
            logger.info("worker took back events leased by a previous run count=%d dead=%d", len(rows), dead)

    def wake(self) -> None:
        """Something changed (a new event, a finished fetch): look again now."""
        self._wake.set()

    def wake_for_new_event(self) -> None:
        """A new event was stored: wake the scheduler only if it could dispatch it
        now. With fetching off or every slot busy, a finishing fetch (or the
        next timer) looks at the inbox anyway; waking per event would cost a
        scheduler cycle per request during a burst."""
        if self.client is not None and len(self.inflight) < self.capacity and not self._wake.is_set():
            self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stalled(self) -> str | None:
        """Why the worker is not making progress, or None (for /healthz and the watchdog).

        Only the listener's own faults count: a dead thread, a loop that
        stopped turning, a fetch past its own deadline. A failing API is not
        one (its fetches end within their timeout, and the loop keeps turning).
        """
        if not self.alive():
            return "worker thread is not running"
        if self.recorder.started and not self.recorder.alive():
            return "worker recorder thread is not running"
        idle = time.monotonic() - self.last_progress
        if idle > self.MAX_SLEEP + 30:
            return f"worker loop has not run for {idle:.0f}s"
        oldest = self.inflight.oldest_age()
        if oldest > self.fetch_deadline + 30:
            return f"a fetch has been in flight for {oldest:.0f}s"
        return None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop dispatching; fetches in flight are abandoned (their leases return them)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
        busy = self.fetchers.stop(deadline)
        if busy:
            logger.warning("worker stopped with fetches in flight count=%d; they are fetched again at next start", busy)
        self.recorder.stop(max(0.0, deadline - time.monotonic()))

    def _release(self, claim: _Claim) -> None:
        """The object may be claimed again (its outcome is on disk, or there is none)."""
        self.inflight.remove(claim.key)
        self.wake()

    # Scheduling

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        seen_version = None
        delay = 0.0
        while not self._stop.is_set():
            self.last_progress = time.monotonic()
            try:
                if conn is None:
                    conn = self.store.read()
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if self._wake.is_set() or version != seen_version or delay <= 0:
                    self._wake.clear()
                    seen_version = version
                    delay = self._dispatch(conn)
                self._publish_state()
            except Exception as exc:  # noqa: BLE001 - nothing may stop the scheduler
                cause = f"{exc.__class__.__name__}: {exc}"
                if self._errors.due(cause):
                    logger.error("worker scheduler failed; trying again error=%s", log_value(cause[:300]))
                if isinstance(exc, sqlite3.Error) and conn is not None:
                    conn.close()
                    conn = None
                delay = self.backoff_initial
            started = time.monotonic()
            self._wake.wait(min(self.REQUEUE_POLL, max(0.0, delay)))
            delay -= time.monotonic() - started
        if conn is not None:
            conn.close()

    def _dispatch(self, conn: sqlite3.Connection) -> float:
        """Claim and hand out what is due; return seconds until the next look."""
        now = time.time()
        if self.client is None:
            return self.MAX_SLEEP
        if self.health.probing() and now < self.health.paused_until:
            return self.health.paused_until - now
        busy = self.inflight.keys()
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
            claim.events.append((event_id, attempts))
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
            # The attempt is counted when its outcome is known (OutcomeRecorder),
            # or at the next start if this process stops meanwhile.
            conn.executemany("UPDATE events SET lease_until = ?, next_attempt_at = ? "
                             "WHERE event_id = ? AND status = 'pending'", leased)
            # The kind lost its [fetch] entry (or the event its id) since it was stored.
            conn.executemany("UPDATE events SET status = ?, last_error = ?, processed_at = ?, "
                             "next_attempt_at = NULL WHERE event_id = ?", settled)

        self.store.write(claim_rows)
        self.inflight.add(claim.key for claim, _ in fetchable)
        for claim, url in fetchable:
            self.fetchers.hand_out(claim, url)

    def _publish_state(self, force: bool = False) -> None:
        """Tell `status` (another process) what the API state is."""
        if not (force or self.health.changed):
            return
        self.health.changed = False
        snapshot = self.health.snapshot() if self.client else {"state": "fetching_off", "until": None}
        try:
            record_daemon_view(self.store, fetching=self.client is not None, api=snapshot)
        except StoreError as exc:
            logger.warning("cannot record api state error=%s", log_value(str(exc)))


# --- Worker: reconciliation ---


class SyncError(Exception):
    """A reconciliation pass could not complete; the message is one line for the operator."""


SYNC_COUNTS = ("pages", "seen", "new", "updated", "unchanged", "skipped")
INTERRUPTED_PASS = "interrupted: the process stopped during the pass"


def parse_list_page(data: Any) -> tuple[list, int | None]:
    """The items and ``meta.total_records`` of one page of a Noyo list."""
    if not isinstance(data, dict) or not isinstance(data.get("response"), list):
        raise FetchError("not_object", "list answer has no \"response\" list; check the [lists] URL")
    meta = data.get("meta")
    total = meta.get("total_records") if isinstance(meta, dict) else None
    if isinstance(total, bool) or not isinstance(total, int):
        total = None
    return data["response"], total


class RateLimit:
    """At most ``rate`` calls of ``wait`` return per second (spaced, not bursty)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    def wait(self, stop: threading.Event) -> bool:
        """Sleep until the next request may go; False if ``stop`` was set meanwhile."""
        delay = self._next - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return False
        self._next = max(time.monotonic(), self._next) + self.interval
        return not stop.is_set()


class SyncPass:
    """One reconciliation pass over one [lists] kind.

    Walks Noyo's list page by page at most ``[sync] rate`` requests a second
    and applies each item exactly as a fetched object (apply_object: the same
    newer-wins rule and state derivation). Each page commits in its own short
    transaction through the store's writer, together with the pass's counts,
    so a running `serve` keeps acknowledging and a crash keeps what was
    applied. A failed list request means what FAILURE_POLICY says, with the
    same ApiHealth pause as fetches; past ``max_attempts`` the pass fails.
    """

    # A runaway list (one that never ends: new items on every page) ends the
    # pass failed after this many pages; Noyo's largest lists are far shorter.
    MAX_PAGES = 100_000

    def __init__(self, settings: Settings, store: Store, client: NoyoClient, kind: str,
                 health: ApiHealth | None = None, stop: threading.Event | None = None) -> None:
        worker = settings["worker"]
        self.settings = settings
        self.store = store
        self.client = client
        self.kind = kind
        self.page_size = settings["sync"]["page_size"]
        self.limit = RateLimit(settings["sync"]["rate"])
        self.policy = FailurePolicy(worker["max_attempts"], worker["backoff_initial"], worker["backoff_max"])
        self.health = health or ApiHealth(worker["backoff_initial"], worker["backoff_max"])
        self.stop = stop or threading.Event()
        self.counts = dict.fromkeys(SYNC_COUNTS, 0)
        self.requests = 0
        self.seconds = 0.0
        self.sync_id: int | None = None

    def summary(self) -> str:
        """The line `sync` prints."""
        counts = " ".join(f"{name}={self.counts[name]}" for name in SYNC_COUNTS)
        return f"sync kind={self.kind} {counts} seconds={self.seconds:.1f}"

    def run(self) -> dict[str, int]:
        """Run the pass to the end; its counts. Raises SyncError when it cannot complete."""
        started = time.monotonic()
        inserted = self.store.submit(lambda conn: conn.execute(
            "INSERT INTO syncs (kind, started_at, status) VALUES (?, ?, 'running')", (self.kind, utc_iso())).lastrowid)
        committing: _WriteJob | None = None
        try:
            self.sync_id = self.store.result_of(inserted)
            logger.info("sync pass started kind=%s id=%d page_size=%d", self.kind, self.sync_id, self.page_size)
            offset, previous = 0, None
            while True:
                items, total = self._get_page(offset)
                # The previous page committed while this one was on the wire.
                self._count(committing)
                if items and items == previous:
                    raise SyncError(f"the list of {self.kind} answered the same page again at offset {offset}: it "
                                    "seems to ignore offset; check the [lists] URL")
                previous = items
                committing = self._submit_page(items)
                offset += len(items)
                # Offset drift: an item added meanwhile shifts the pages; the next pass or a webhook covers it.
                if self._last_page(items, total, offset):
                    break
                if self.counts["pages"] >= self.MAX_PAGES:
                    raise SyncError(f"the list of {self.kind} did not end within {self.MAX_PAGES} pages; "
                                    "check the [lists] URL")
            self._count(committing)
        except BaseException as exc:
            self.seconds = time.monotonic() - started
            if self.sync_id is None:
                # A signal while the pass's row was being written: end that row too.
                if not (inserted.wait(30) and inserted.error is None):
                    raise
                self.sync_id = inserted.result
            if committing is not None and not isinstance(exc, StoreError):
                try:
                    self._count(committing)  # what was applied stays applied, and counted
                except StoreError:
                    pass
            error = str(exc) if isinstance(exc, SyncError) else f"{exc.__class__.__name__}: {exc}"
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                error = "interrupted"  # SIGINT, or SIGTERM (the CLI's handler raises SystemExit)
            self._finish("failed", error)
            logger.error("sync pass failed kind=%s id=%d pages=%d seen=%d error=%s", log_value(self.kind),
                         self.sync_id, self.counts["pages"], self.counts["seen"], log_value(error))
            if isinstance(exc, (SyncError, KeyboardInterrupt, SystemExit)):
                raise
            raise SyncError(f"sync of {self.kind} failed: {error}") from exc
        self.seconds = time.monotonic() - started
        self._finish("done", None)
        METRICS.sync_finished(self.kind, self.counts["new"])
        counts = " ".join(f"{name}={self.counts[name]}" for name in SYNC_COUNTS)
        logger.info("sync pass done kind=%s id=%d %s requests=%d seconds=%.1f", self.kind, self.sync_id, counts,
                    self.requests, self.seconds)
        if self.counts["new"]:
            logger.warning("sync found %d %s object(s) no webhook announced: webhooks were missed (Noyo gave up "
                           "retrying, a subscription was paused, or the listener was unreachable); they are stored "
                           "now. kind=%s id=%d", self.counts["new"], self.kind, self.kind, self.sync_id)
        return dict(self.counts)

    def _last_page(self, items: list, total: int | None, offset: int) -> bool:
        """Whether the list ends here: at ``total`` when the API says it, else at
        a short page; always at an empty one."""
        if not items:
            return True
        if total is not None:
            return offset >= total  # a short page is not the end: the API may cap page_size lower
        return len(items) < self.page_size

    def _submit_page(self, items: list) -> _WriteJob:
        """Queue a page for the writer in chunks of at most page_size items, each
        its own short transaction, so that a page that ignores page_size never
        holds the write lock for long; waits for all but the last chunk."""
        fetched_at = utc_iso()
        start = 0
        while True:
            chunk = items[start:start + self.page_size]
            job = self.store.submit(lambda conn, chunk=chunk, pages=int(start == 0):
                                    self._apply_items(conn, chunk, fetched_at, pages))
            start += self.page_size
            if start >= len(items):
                return job
            self._count(job)

    def _count(self, job: _WriteJob | None) -> None:
        """Wait for a chunk's commit and add its counts (StoreError if it failed).

        Waits as long as the writer lives: a commit that queues behind a burst
        of webhooks is late, not failed."""
        if job is None:
            return
        while not job.wait(1.0):
            if not self.store.writer_alive():
                raise StoreError("the database writer stopped before the page was committed")
        for name, value in self.store.result_of(job).items():
            self.counts[name] += value

    def _get_page(self, offset: int) -> tuple[list, int | None]:
        """One page, with the fetch failure policy: retries, the API pause, max_attempts."""
        assert self.sync_id is not None
        url = self.settings.list_url(self.kind, self.page_size, offset)
        if url is None:
            raise SyncError(f"no [lists] entry for kind {self.kind!r}")
        attempts = 0
        while True:
            self._wait_out_api_pause()
            if not self.limit.wait(self.stop):
                raise SyncError("stopped: the listener is shutting down")
            self.requests += 1
            try:
                page = parse_list_page(self.client.get_json(url))
            except FetchError as error:
                if error.kind == "not_found":
                    # An object may not be visible yet; a list URL that is not found is a configuration error.
                    error = FetchError("refused", f"the list URL answered 404 Not Found; check [lists] {self.kind}")
                self.health.record(error, ("list", self.kind))
                verdict = self.policy.classify(error)
                outcome = self.policy.decide(verdict.event, attempts, f"{error.kind}: {error}", time.time(),
                                             error.retry_after, self.health.paused_until)
                attempts += outcome.spent
                if outcome.status == "dead" or verdict.event == "wait":
                    raise SyncError(f"list request for {self.kind} at offset {offset} failed: "
                                    f"{outcome.last_error}") from None
                logger.warning("sync list request failed kind=%s offset=%d attempts=%d error=%s",
                               log_value(self.kind), offset, attempts, log_value(outcome.last_error))
                if self.stop.wait(max(0.0, (outcome.due or 0.0) - time.time())):
                    raise SyncError("stopped: the listener is shutting down") from None
                continue
            self.health.success()
            return page

    def _wait_out_api_pause(self) -> None:
        while self.health.probing() and time.time() < self.health.paused_until:
            if self.stop.wait(min(1.0, self.health.paused_until - time.time())):
                raise SyncError("stopped: the listener is shutting down")

    def _apply_items(self, conn: sqlite3.Connection, items: list, fetched_at: str, pages: int) -> dict[str, int]:
        added = dict.fromkeys(SYNC_COUNTS, 0)
        added["pages"] = pages
        for item in items:
            added["seen"] += 1
            object_id = item.get("id") if isinstance(item, dict) else None
            if object_id is None or isinstance(object_id, (bool, dict, list)) or str(object_id) == "":
                added["skipped"] += 1
                continue
            body = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
            added[apply_object(conn, self.kind, item, body, [], fetched_at, source="sync")] += 1
        conn.execute("UPDATE syncs SET " + ", ".join(f"{name} = {name} + ?" for name in SYNC_COUNTS) + " WHERE id = ?",
                     [added[name] for name in SYNC_COUNTS] + [self.sync_id])
        return added

    def _finish(self, status: str, error: str | None) -> None:
        try:
            self.store.write(lambda conn: conn.execute(
                "UPDATE syncs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                (status, utc_iso(), error, self.sync_id)))
        except StoreError as exc:
            logger.error("cannot record the end of sync pass id=%s error=%s", self.sync_id, log_value(str(exc)))


def mark_interrupted_passes(conn: sqlite3.Connection) -> int:
    """Passes left `running` by a process that stopped: they are `failed`."""
    return conn.execute("UPDATE syncs SET status = 'failed', finished_at = ?, error = ? WHERE status = 'running'",
                        (utc_iso(), INTERRUPTED_PASS)).rowcount


def last_completed_pass(conn: sqlite3.Connection, kind: str) -> str | None:
    """finished_at of the last `done` pass of ``kind``."""
    row = conn.execute("SELECT finished_at FROM syncs WHERE kind = ? AND status = 'done' ORDER BY id DESC LIMIT 1",
                       (kind,)).fetchone()
    return row[0] if row else None


class Reconciler:
    """`serve`'s periodic passes: each [lists] kind when none has completed
    yet or the last completed one is older than ``[sync] interval`` (so a
    restart does not repeat a fresh pass). Its own thread; the worker's
    client (one token) and ApiHealth (one pause)."""

    CHECK_EVERY = 60.0
    RETRY_FAILED_AFTER = 600.0

    def __init__(self, settings: Settings, store: Store, worker: Worker) -> None:
        self.settings = settings
        self.store = store
        self.worker = worker
        self.interval = settings["sync"]["interval"]
        self._stop = threading.Event()
        self._failed_at: dict[str, float] = {}
        self._announced: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="noyo-sync", daemon=True)

    def start(self) -> None:
        interrupted = self._mark_interrupted_passes()
        if interrupted:
            logger.warning("sync passes interrupted by a previous stop are marked failed count=%d", interrupted)
        if self.interval <= 0 or self.worker.client is None or not self.settings.lists:
            logger.info("periodic sync off reason=%s", "interval=0" if self.interval <= 0 else
                        "no API credentials" if self.worker.client is None else "no [lists] entries")
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)

    def _mark_interrupted_passes(self) -> int:
        """Mark `running` passes failed, unless a `sync` command is running:
        then some of them are its live passes (the next start marks the rest)."""
        probe = InstanceLock(self.store.path, SYNC_LOCK_SUFFIX)
        try:
            probe.acquire()
        except StoreError:
            logger.info("a sync command is running; passes marked running stay so until the next start")
            return 0
        try:
            return self.store.write(mark_interrupted_passes)
        finally:
            probe.release()

    def seconds_until_due(self, kind: str) -> float:
        conn = self.store.read()
        try:
            finished = last_completed_pass(conn, kind)
        finally:
            conn.close()
        due = parse_utc_iso(finished) + self.interval if finished else 0.0
        failed = self._failed_at.get(kind)
        if failed is not None:
            due = max(due, failed + min(self.interval, self.RETRY_FAILED_AFTER))
        return due - time.time()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.CHECK_EVERY
            for kind in sorted(self.settings.lists):
                try:
                    remaining = self.seconds_until_due(kind)
                    if remaining > 0:
                        wait = min(wait, remaining)
                        next_at = utc_iso(time.time() + remaining)[:19]
                        if self._announced.get(kind) != next_at:  # once per due time, not every look
                            self._announced[kind] = next_at
                            logger.info("sync pass not due kind=%s next_at=%sZ", kind, next_at)
                        continue
                    assert self.worker.client is not None
                    SyncPass(self.settings, self.store, self.worker.client, kind, self.worker.health,
                             self._stop).run()
                    self._failed_at.pop(kind, None)
                except (SyncError, StoreError):
                    self._failed_at[kind] = time.time()  # logged by the pass
                except Exception:  # noqa: BLE001 - the thread outlives one bad pass
                    self._failed_at[kind] = time.time()
                    logger.exception("sync pass failed kind=%s", kind)
                if self._stop.is_set():
                    return
                wait = min(wait, 1.0)  # look again soon: another kind may be due
            self._stop.wait(max(0.05, wait))


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
    """Seconds between WATCHDOG=1 pings systemd expects (None when it expects none).

    systemd names the process it watches in WATCHDOG_PID. That is us, or the
    process that started us when it is a wrapper that passes its environment
    on and does not ping itself: ``litestream replicate -exec`` (the unit's
    main process in systemd/noyo-listener.service.d/litestream.conf, with
    NotifyAccess=all so that our pings count).
    """
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid not in (str(os.getpid()), str(os.getppid()))):
        return None
    try:
        return int(usec) / 1_000_000
    except ValueError:
        return None


class Housekeeper:
    """Everything periodic and quick, off the request path, in one thread:
    SIGHUP reloads, systemd's watchdog and status line. Pruning, which can
    take long, has its own thread (Pruner) so it never delays the watchdog."""

    STATUS_EVERY = 10.0

    def __init__(self, service: "Service") -> None:
        self.service = service
        self.watchdog = watchdog_interval()
        self.tick = min(self.STATUS_EVERY, self.watchdog / 3) if self.watchdog else self.STATUS_EVERY
        self.reload_requested = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._unhealthy_logged = 0.0
        self._queue_logged = 0.0
        self._thread = threading.Thread(target=self._run, name="noyo-housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_reload(self) -> None:
        """Called from the SIGHUP handler: only sets flags."""
        self.reload_requested = True
        self._wake.set()

    def stop(self, wait: bool = True) -> None:
        """Stop the chores (``wait``: and the thread, up to 5 s)."""
        self._stop.set()
        self._wake.set()
        if wait:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            for chore in (self._reload_if_asked, self._feed_watchdog, self._report_status):
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
        elif time.monotonic() - self._unhealthy_logged > 30 and not self._stop.is_set():
            self._unhealthy_logged = time.monotonic()  # (a check that met the shutdown is no news)
            logger.error("withholding the systemd watchdog ping problems=%s", json.dumps("; ".join(problems)))

    def _report_status(self) -> None:
        sd_notify("STATUS=" + self.service.status_line())
        queued, running = self.service.requests_in_flight()
        if queued and time.monotonic() - self._queue_logged > 30:
            self._queue_logged = time.monotonic()
            logger.warning("requests are waiting for an HTTP thread queued=%d running=%d threads=%d",
                           queued, running, self.service.settings["server"]["threads"])


class Pruner:
    """Prunes at start and daily on its own thread: a long prune must never
    keep the housekeeper from feeding the watchdog."""

    PRUNE_EVERY = 86400.0
    RETRY_AFTER_FAILURE = 3600.0

    def __init__(self, prune: Callable[[], Any]) -> None:
        self.prune = prune
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="noyo-prune", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)

    def _run(self) -> None:
        wait = 0.0  # at start, then daily
        while not self._stop.wait(wait):
            try:
                self.prune()
                wait = self.PRUNE_EVERY
            except StoreError as exc:
                logger.error("prune failed; trying again in an hour error=%s", exc)
                wait = self.RETRY_AFTER_FAILURE
            except Exception:  # noqa: BLE001 - the thread outlives one bad prune
                logger.exception("prune failed; trying again in an hour")
                wait = self.RETRY_AFTER_FAILURE


def _receiving_a_request(channel: Any) -> bool:
    """Whether a connection's request has its headers in and its body on the way."""
    request = getattr(channel, "request", None)
    return request is not None and request.headers_finished and not request.completed


def _idle(channel: Any) -> bool:
    """A connection with nothing to finish: no request being received, run or answered."""
    return (getattr(channel, "request", None) is None and not getattr(channel, "requests", None)
            and not getattr(channel, "total_outbufs_len", 0))


def _finish_requests_at_shutdown(server: Any, grace: float, on_stop: Callable[[], None]) -> None:
    """Make waitress finish the requests it has begun before it stops its threads.

    On SystemExit waitress calls ``task_dispatcher.shutdown()``, which lets
    running tasks finish but cancels queued ones, and its I/O loop has
    stopped, so a request whose body is still arriving is never read: both
    clients would get a closed connection. Instead, for up to ``grace``
    seconds: call ``on_stop``, stop accepting (the listening socket
    closes), close idle keep-alive connections, and keep the loop reading
    the connections that are receiving a request, until every request
    received is run. Relies on
    waitress internals (the dispatcher's ``queue``, ``active_count``,
    ``lock``; the server's ``_map``; a channel's ``request`` parser with
    ``headers_finished`` and ``completed``); tests/test_waitress_internals.py
    fails if they change.
    """
    dispatcher = server.task_dispatcher
    original = dispatcher.shutdown

    def shutdown(cancel_pending: bool = True, timeout: float = grace) -> bool:
        logger.info("stop requested; finishing requests in flight")
        on_stop()
        # The listening socket only: the loop's trigger stays, so a task that
        # ends still wakes the loop below.
        waitress.wasyncore.dispatcher.close(server)
        channels = server._map
        deadline = time.monotonic() + grace
        receiving = 0
        while time.monotonic() < deadline:
            receiving = 0
            for channel in list(channels.values()):
                if isinstance(channel, waitress.channel.HTTPChannel):
                    if _receiving_a_request(channel):
                        receiving += 1
                    elif _idle(channel):
                        channel.close()  # nothing new starts on a kept-alive connection
            with dispatcher.lock:
                busy = len(dispatcher.queue) + dispatcher.active_count
            if not busy and not receiving:
                break
            waitress.wasyncore.loop(timeout=0.05, map=channels, use_poll=True, count=1)
        if receiving:
            logger.warning("stopping with requests still arriving count=%d; their senders retry", receiving)
        return original(cancel_pending=cancel_pending, timeout=max(0.1, deadline - time.monotonic()))

    dispatcher.shutdown = shutdown


class Service:
    """`serve`: the store, the worker, the HTTP server, and their lifecycle."""

    REQUESTS_GRACE = 5.0  # seconds for requests in flight (arriving, queued or running) to finish
    SHUTDOWN_FLUSH = 2.0  # seconds to send the answers of requests that finished

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        db = settings["database"]
        self.lock = InstanceLock(db["path"])
        self.store = Store(db["path"], db["synchronous"], db["busy_timeout"], db["checkpoints"])
        self.worker: Worker | None = None
        self.reconciler: Reconciler | None = None
        self.receiver: Receiver | None = None
        self.server: Any = None
        self.housekeeper = Housekeeper(self)
        self.pruner = Pruner(self.prune)

    def open(self) -> None:
        """Take the lock, open the database, bind the port. Raises StoreError."""
        self.lock.acquire()
        self.store.open()
        client = NoyoClient(self.settings) if self.settings.fetching_enabled else None
        self.worker = Worker(self.settings, self.store, client)
        self.reconciler = Reconciler(self.settings, self.store, self.worker)
        self.receiver = Receiver(self.settings, self.store, self.worker)
        server = self.settings["server"]
        try:
            self.server = create_http_server(self.settings, self.receiver.app)
        except OSError as exc:
            raise StoreError(f"cannot listen on {server['host']}:{server['port']}: {exc.strerror}; "
                             "is another program using the port?") from None
        _finish_requests_at_shutdown(self.server, self.REQUESTS_GRACE, self._stopping)

    def _stopping(self) -> None:
        """The stop has begun: tell systemd, and end the periodic chores now (a
        watchdog self-check would find the port closed and cry wolf)."""
        sd_notify("STOPPING=1")
        self.housekeeper.stop(wait=False)

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
            self.pruner.start()
            assert self.reconciler is not None
            self.reconciler.start()
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
        self.pruner.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
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
            new = load_settings(self.settings.config_path, needs=SERVE_NEEDS)
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
        restart_needed = ([s for s in ("server", "database", "noyo_api", "worker", "sync")
                           if new[s] != self.settings[s]]
                          + (["fetch"] if new.fetch != self.settings.fetch else [])
                          + (["lists"] if new.lists != self.settings.lists else []))
        logger.info("reloaded secrets=%s signature_payload=%s log_level=%s%s",
                    ",".join(name for name, _ in new["webhook"]["secrets"]),
                    new["webhook"]["signature_payload"], new["log"]["level"],
                    f" restart_needed_for={','.join(restart_needed)}" if restart_needed else "")
        _warn_about_development_secret(self.settings)

    def prune(self, include_dead: bool = False) -> tuple[int, int]:
        history_days = self.settings["database"]["history_days"]
        if history_days:  # first: prune's vacuum then gives these pages back too
            changes = prune_history(self.store, history_days)
            logger.info("pruned changes=%d older_than_days=%d", changes, history_days)
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


def _escape_unprintable(text: str) -> str:
    """``text`` with every character that is not printable (newlines, CR,
    escape sequences, Unicode line separators) written as a ``\\x``/``\\u`` escape."""
    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] if ord(char) > 0xff
                   else f"\\x{ord(char):02x}" for char in text)


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

    def line(self, levelno: int, message: str, created: float) -> str:
        """One log line, without a LogRecord (see log_line)."""
        if not message.isprintable():
            # A second line of defence behind log_value(), for messages from
            # libraries (waitress) too: one record is one line, whatever it holds.
            message = _escape_unprintable(message)
        if self.journal:
            return f"<{_PRIORITIES.get(levelno, 6)}>{logging.getLevelName(levelno)} {message}"
        return f"{self._clock(created)} {logging.getLevelName(levelno)} {message}"

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(record.levelno, record.getMessage(), record.created)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class _CoalescingStreamHandler(logging.StreamHandler):
    """Lines go out together: under load, one write() every ``interval`` seconds.

    Every acknowledgement logs a line. Line-buffered, each is a write() to
    journald's socket, a system call during which another of the threads
    sharing the one pinned core takes the GIL (bench/README.md measures the
    cost). Here a line is written at once when the last write was more than
    ``interval`` ago (an idle service logs as before) or when it is a WARNING
    or worse (with everything before it, in order); otherwise it waits in the
    buffer for the flusher thread, at most ``interval`` seconds. The price: a
    SIGKILL or power cut can lose the INFO lines of the last ``interval``.
    """

    def __init__(self, stream: Any, interval: float) -> None:
        super().__init__(stream)
        self.interval = interval
        self._last_write = -math.inf
        self._flush_due = False
        self._wake = threading.Event()  # set to start the flusher's countdown
        threading.Thread(target=self._run_flusher, name="noyo-log", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        # Called holding the handler's lock (Handler.handle).
        try:
            self._write(record.levelno, self.format(record))
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def emit_line(self, levelno: int, message: str) -> None:
        """``message`` as a line of this handler's format, without a LogRecord (log_line)."""
        formatter = self.formatter
        self.acquire()
        try:
            self._write(levelno, formatter.line(levelno, message, time.time()))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - as emit: a log line never fails a request
            self.handleError(logging.makeLogRecord({"msg": message, "levelno": levelno}))
        finally:
            self.release()

    def _write(self, levelno: int, line: str) -> None:
        self.stream.write(line + "\n")
        now = time.monotonic()
        if levelno >= logging.WARNING or now - self._last_write >= self.interval:
            self.stream.flush()
            self._last_write = now
        elif not self._flush_due:
            self._flush_due = True
            self._wake.set()

    def _run_flusher(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a failed write (disk full, EPIPE) loses lines, never this thread
                pass

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_due = False
            self._last_write = time.monotonic()
            super().flush()
        finally:
            self.release()


class _StderrAfterLog(io.TextIOBase):
    """``sys.stderr`` while a coalescing handler logs: what is written straight
    to stderr (a traceback, a warning, a one-line error) goes out through the
    handler's stream, after the log lines before it instead of ahead of them."""

    def __init__(self, handler: _CoalescingStreamHandler) -> None:
        super().__init__()
        self._handler = handler

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.stream.flush()
        finally:
            handler.release()
        return len(text)

    def flush(self) -> None:
        self._handler.flush()

    def fileno(self) -> int:
        return self._handler.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._handler.stream.encoding


LOG_COALESCE_SECONDS = 0.1


def _own_stderr_stream() -> Any:
    """A block-buffered text stream of its own on stderr's descriptor (None
    if stderr has none). sys.stderr stays line-buffered for tracebacks and
    one-line errors, and main() flushes the log before printing one."""
    try:
        return open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",
                    errors="backslashreplace", closefd=False)
    except (AttributeError, OSError, ValueError):  # no stderr, or one without a descriptor
        return None


_line_handler: _CoalescingStreamHandler | None = None  # set by configure_logging for serve


def log_line(level: int, message: str) -> None:
    """Log ``message`` (already escaped, no %-arguments) from this module.

    ``serve`` logs a line per request. A LogRecord passed through the logging
    module's filters and formatter costs several times the line itself, and
    on a busy core every microsecond of Python counts more than once
    (bench/README.md). With the coalescing handler installed (``serve``), the
    line goes straight to it, in the same format and order as every other line.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _line_handler
    if handler is None:
        logger.log(level, "%s", message)
    else:
        handler.emit_line(level, message)


def flush_logs() -> None:
    """Write out log lines still held by a coalescing handler."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure_logging(level: str = "INFO", stream: Any = None, coalesce: bool = False) -> None:
    """Only the entry point configures logging; the module just logs.

    The lines never show source file, thread or process, so the logging
    module is told not to collect them (its HOWTO's "Optimization" section):
    that walk of the stack was a measurable part of every request. With
    ``coalesce`` (``serve``), lines are written to stderr at most every
    LOG_COALESCE_SECONDS, warnings at once (_CoalescingStreamHandler).
    """
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _line_handler
    own = _own_stderr_stream() if coalesce and stream is None else None
    handler: logging.Handler = _CoalescingStreamHandler(own, LOG_COALESCE_SECONDS) if own is not None \
        else logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_LineFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    flush_logs()
    if isinstance(handler, _CoalescingStreamHandler):
        _line_handler = handler
        sys.stderr = _StderrAfterLog(handler)
    else:
        _line_handler = None
    root.handlers[:] = [handler]
    root.setLevel(level)


def _config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("NOYO_LISTENER_CONFIG") or "noyo_listener.ini"


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings, checked for what this command needs (its parser's
    ``needs``; a command that declares nothing needs no secrets)."""
    return load_settings(_config_path(args), needs=getattr(args, "needs", ()))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the ini exactly as `serve` does and print the effective settings."""
    settings = settings_for(args)
    print("\n".join(describe_settings(settings)))
    if not settings.fetching_enabled:
        print("# fetching is off: [noyo_api] client_id and client_secret are not set")
    if any(secret == DEVELOPMENT_SECRET for _, secret in settings["webhook"]["secrets"]):
        print("# WARNING: [webhook] secrets holds the public development secret; replace it before production")
    for warning in settings_warnings(settings):
        print(f"# WARNING: {warning}")
    print("# configuration is valid")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP server and the worker until SIGTERM or SIGINT."""
    settings = settings_for(args)
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
    for warning in settings_warnings(settings):
        logger.warning("%s", warning)
    if settings["database"]["checkpoints"] == "external":
        logger.info("checkpoints=external: this process runs no WAL checkpoint; the replicator "
                    "(Litestream) must, or the -wal file grows without bound")


def _warn_about_development_secret(settings: Settings) -> None:
    for name, secret in settings["webhook"]["secrets"]:
        if secret == DEVELOPMENT_SECRET:
            logger.warning(
                "!!! webhook secret %r is the public DEVELOPMENT secret from the example ini: anyone can forge "
                "events. Set [webhook] secrets (or NOYO_WEBHOOK_SECRETS) to your Noyo subscription secret !!!", name)


# --- bundle: one file for a VM without pip ---------------------------------
# Only `bundle` needs zipfile and importlib.metadata; they are imported there
# so that every other command starts as before.

BUNDLED_DEPENDENCIES = ("bottle", "waitress")

# The bundle's entry point. Kept to syntax that any Python parses (no f-strings),
# so that an interpreter older than 3.9 says so in one line before it meets the
# module. Python puts the archive itself first on sys.path (after site and any
# .pth or sitecustomize has run, with -I and -P too), so the bundled bottle and
# waitress win over any the VM has installed (a test checks).
BUNDLE_MAIN = '''\
# noyo-listener bundle: python3 THIS_FILE [--config PATH] COMMAND
import sys

if sys.version_info < (3, 9):
    sys.stderr.write("noyo-listener: error: needs Python 3.9 or newer, this is %s (%s); "
                     "run the bundle with python3.9 or later\\n" % (sys.version.split()[0], sys.executable))
    sys.exit(1)

import noyo_listener  # noqa: E402

sys.exit(noyo_listener.main())
'''


class BundleError(Exception):
    """`bundle` cannot write a correct bundle; the message says why and what to do."""


def pinned_requirements(path: str) -> dict[str, str]:
    """``name==version`` pins of a requirements file, names normalised (PEP 503)."""
    pins: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            requirement = line.split("#", 1)[0].split(";", 1)[0].strip()
            name, sep, version = requirement.partition("==")
            if sep and name.strip():
                pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return pins


def _dependency_sources(name: str, pinned: str) -> tuple[str, list[tuple[str, str]]]:
    """The installed version of one dependency and its source files as (path on disk, name in the bundle).

    Refuses a version other than the pinned one, and a module that is not the
    one its installed distribution describes (shadowed on ``sys.path``).
    """
    import importlib
    import importlib.metadata

    try:
        version = importlib.metadata.version(name)
        module = importlib.import_module(name)
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise BundleError(f"{name} is not installed in this Python ({sys.executable}); "
                          f"run bundle with the venv's python after pip install -r requirements.txt") from None
    if version != pinned:
        raise BundleError(f"{name} {version} is installed but requirements.txt pins {pinned}; "
                          f"run pip install -r requirements.txt in this venv, then bundle again")
    origin = os.path.realpath(module.__file__ or "")
    distribution = importlib.metadata.distribution(name)
    recorded = {os.path.realpath(str(distribution.locate_file(f))) for f in (distribution.files or ())}
    if origin not in recorded:
        raise BundleError(f"{name} imports from {origin}, which is not the installed {name} {version}; "
                          f"remove it from the path (PYTHONPATH, current directory) and bundle again")
    # Their licences ask that the notice travel with every copy.
    files = [(str(distribution.locate_file(f)), f"licenses/{name}/{f.name}") for f in distribution.files or ()
             if re.match(r"(LICEN[CS]E|COPYING|NOTICE)", f.name, re.IGNORECASE)]
    if os.path.basename(origin) != "__init__.py":
        return version, [(origin, os.path.basename(origin))] + files
    package_dir = os.path.dirname(origin)
    base = os.path.dirname(package_dir)
    for folder, subfolders, names in os.walk(package_dir):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        files.extend((os.path.join(folder, n), os.path.relpath(os.path.join(folder, n), base))
                     for n in sorted(names) if n.endswith(".py"))
    return version, files


def write_bundle(out: str, members: list[tuple[str, bytes]]) -> int:
    """Write an executable zipapp to ``out`` atomically; never replaces an existing file.

    The archive is built in a temporary file beside ``out`` and hard-linked to
    its name: the link fails if ``out`` exists, so a file that appeared since
    the check is not overwritten either, and no half-written bundle is ever
    seen under the real name. Returns the size in bytes.
    """
    import zipfile

    folder = os.path.dirname(os.path.abspath(out))
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    except OSError as exc:
        raise BundleError(f"cannot create {out}: {exc.strerror}") from None
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"#!/usr/bin/env python3\n")
                with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
                    for arcname, data in members:
                        info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))  # same input, same bytes
                        info.compress_type = zipfile.ZIP_DEFLATED
                        info.external_attr = 0o644 << 16
                        archive.writestr(info, data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, 0o755)
        except OSError as exc:
            raise BundleError(f"cannot write {temp}: {exc.strerror}") from None
        try:
            os.link(temp, out)
        except FileExistsError:
            raise BundleError(f"{out} already exists; choose a new name (bundle never overwrites)") from None
        except OSError as exc:
            raise BundleError(f"cannot create {out}: {exc.strerror}") from None
        return os.path.getsize(out)
    finally:
        os.unlink(temp)


def build_bundle(out: str) -> str:
    """Bundle this module with the installed, pinned bottle and waitress into ``out``; return a summary."""
    module_path = os.path.realpath(__file__)
    if os.path.lexists(out):
        raise BundleError(f"{out} already exists; choose a new name (bundle never overwrites)")
    requirements = os.path.join(os.path.dirname(module_path), "requirements.txt")
    if not os.path.isfile(requirements):
        raise BundleError(f"bundle needs requirements.txt beside noyo_listener.py (not found at {requirements}); "
                          f"run it from a checkout with its venv: .venv/bin/python noyo_listener.py bundle OUT")
    pins = pinned_requirements(requirements)
    with open(module_path, "rb") as handle:
        members = [("__main__.py", BUNDLE_MAIN.encode()), ("noyo_listener.py", handle.read())]
    versions = []
    for name in BUNDLED_DEPENDENCIES:
        if name not in pins:
            raise BundleError(f"{requirements} pins no version of {name} (expected a line {name}==VERSION)")
        version, files = _dependency_sources(name, pins[name])
        versions.append(f"{name} {version}")
        for path, arcname in files:
            with open(path, "rb") as handle:
                members.append((arcname.replace(os.sep, "/"), handle.read()))
    size = write_bundle(out, members)
    return (f"wrote {out}: noyo-listener {__version__}, {', '.join(versions)}, {size} bytes; "
            f"run it with: python3 {out} serve")


def cmd_bundle(args: argparse.Namespace) -> int:
    """Write a one-file zipapp of the program and its pinned dependencies (needs no config)."""
    try:
        print(build_bundle(args.out))
    except BundleError as exc:
        print(f"noyo-listener: error: {exc}", file=sys.stderr)
        return 1
    return 0


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
        view = json.loads(get_meta(conn, DAEMON_VIEW_KEY) or "null")
        last_fetch = get_meta(conn, "last_fetch_ok_at")
        last_sync = last_sync_by_kind(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()
    running, pid = InstanceLock.holder(path)
    return {
        "database": path,
        "daemon": {"running": running, "pid": pid},
        "events": {status: by_status.get(status, 0) for status in ("pending", "done", "ignored", "dead")},
        "by_type": by_type,
        "oldest_pending_age_seconds": round(time.time() - parse_utc_iso(oldest), 1) if oldest else None,
        "last_received_at": last,
        "dead": by_status.get("dead", 0),
        "last_fetch_ok_at": last_fetch,
        "fetching": _fetching_text(view),
        "api": view,
        "last_sync": last_sync,
    }


def _fetching_text(view: dict | None) -> str:
    """Whether the daemon fetches, as it recorded it (not this shell's config:
    the daemon may see credentials this shell does not)."""
    if not isinstance(view, dict):
        return "unknown (no serve has recorded its state in this database yet)"
    fetching = view.get("fetching", view.get("state") != "fetching_off")
    return "on" if fetching else "off (set [noyo_api] client_id and client_secret for serve)"


def last_sync_by_kind(conn: sqlite3.Connection) -> dict[str, dict]:
    """The last reconciliation pass of each kind (a database older than the syncs table has none)."""
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM syncs WHERE id IN (SELECT MAX(id) FROM syncs GROUP BY kind) "
                            "ORDER BY kind").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.row_factory = None
    return {row["kind"]: {key: row[key] for key in row.keys() if key != "kind"} for row in rows}


def cmd_status(args: argparse.Namespace) -> int:
    """Print counts, ages and the API state; --json for scripts."""
    status = gather_status(settings_for(args))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    events = status["events"]
    print(f"database:        {status['database']}")
    daemon = status["daemon"]
    if daemon["running"]:
        print("daemon:          running" + (f" (pid {daemon['pid']})" if daemon["pid"] else ""))
    elif daemon["running"] is None:
        print("daemon:          unknown (this user may not read the lock file; try as root or the service user)")
    else:
        recorded = (status["api"] or {}).get("recorded_at")
        print("daemon:          not running (no serve holds the database's lock)"
              + (f"; fetching and noyo api below are as it recorded them at {recorded}" if recorded else ""))
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
    for kind, last in status["last_sync"].items():
        counts = " ".join(f"{name}={last[name]}" for name in SYNC_COUNTS)
        ended = f" finished {last['finished_at']}" if last["finished_at"] else f" started {last['started_at']}"
        print(f"last sync:       {kind} {last['status']}{ended} {counts}"
              + (f"  error: {last['error']}" if last["error"] else ""))
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
    conn = connect(path, settings["database"]["synchronous"], settings["database"]["busy_timeout"],
                   checkpoints=settings["database"]["checkpoints"])
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
    print(f"requeued {count} event(s); a running listener picks them up within 2s")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """One reconciliation pass per [lists] kind (or --kind) now, in the foreground."""
    settings = settings_for(args)  # API credentials, not webhook secrets (the parser's needs)
    if args.kind is not None and args.kind not in settings.lists:
        known = ", ".join(sorted(settings.lists)) or "none"
        raise ConfigError(f"no [lists] entry for kind {args.kind!r}; known: {known}")
    kinds = [args.kind] if args.kind else sorted(settings.lists)
    db = settings["database"]
    lock = InstanceLock(db["path"], SYNC_LOCK_SUFFIX)
    lock.acquire(busy_message=f"a restore is replacing {os.path.abspath(db['path'])} (lock {lock.path} is held); "
                 "run sync again once it is done")
    # SIGTERM/SIGINT end the pass in progress `failed` ("interrupted"), never leave it `running`.
    previous = {sig: signal.signal(sig, _raise_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    store = Store(db["path"], db["synchronous"], db["busy_timeout"], db["checkpoints"])
    try:
        store.open()
        client = NoyoClient(settings)
        for kind in kinds:
            sync_pass = SyncPass(settings, store, client, kind)
            sync_pass.run()
            print(sync_pass.summary(), flush=True)
    except _Shutdown:
        raise SyncError("sync interrupted by a signal; the pass in progress is recorded failed "
                        "(what it applied stays applied)") from None
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the close short
        store.close()
        lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _open_store(settings: Settings) -> Store:
    db = settings["database"]
    store = Store(existing_database(settings), db["synchronous"], db["busy_timeout"], db["checkpoints"])
    store.open()
    return store


def cmd_prune(args: argparse.Namespace) -> int:
    """Forget done/ignored events (and, with --dead, dead ones) older than dedupe_days."""
    settings = load_settings(_config_path(args))
    store = _open_store(settings)
    try:
        changes = prune_history(store, settings["database"]["history_days"])  # first: prune vacuums after
        events, deliveries = prune(store, settings["database"]["dedupe_days"], include_dead=args.dead)
    finally:
        store.close()
    kinds = "done, ignored and dead" if args.dead else "done and ignored"
    print(f"pruned {events} {kinds} event(s) and {deliveries} deliveries older than "
          f"{settings['database']['dedupe_days']} days")
    history_days = settings["database"]["history_days"]
    print(f"pruned {changes} change(s) older than {history_days} days" if history_days
          else "kept every change (history_days = 0)")
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
            # The copy carries the database's WAL mode; reading such a file needs a
            # -shm beside it. A backup is one self-contained file that any reader
            # can open where it lies, even read-only.
            journal = target.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            check = target.execute("PRAGMA quick_check").fetchone()[0]
            events = target.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            target.close()
            source.close()
    except sqlite3.Error as exc:
        os.unlink(args.dest)
        raise StoreError(f"backup of {path} failed: {exc}") from None
    if journal.lower() != "delete":
        raise StoreError(f"backup {args.dest} stayed in journal mode {journal}; delete it and try again")
    if check != "ok":
        raise StoreError(f"backup {args.dest} failed its integrity check: {check}")
    size = os.path.getsize(args.dest)
    print(f"backed up {path} to {args.dest}: {events} events, {size} bytes, "
          f"{time.monotonic() - started:.2f}s, integrity ok")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Put a backup in place of the database while `serve` is stopped."""
    settings = settings_for(args)
    path = settings["database"]["path"]
    version, events = check_backup(args.source)
    lock = InstanceLock(path)
    lock.acquire(busy_message=(
        f"noyo-listener is serving {os.path.abspath(path)} (lock {lock.path} is held); stop it first "
        "(sudo systemctl stop noyo-listener), then run restore again; nothing was changed"))
    sync_lock = InstanceLock(path, SYNC_LOCK_SUFFIX)
    try:
        sync_lock.acquire(busy_message=(
            f"a sync command is writing to {os.path.abspath(path)} (lock {sync_lock.path} is held); let it finish "
            "or stop it, then run restore again; nothing was changed"))
        try:
            replaced_high_water, backup_high_water = restore_database(args.source, path)
        finally:
            sync_lock.release()
    finally:
        lock.release()
    info = os.stat(path)
    migration = (f"; serve migrates it from schema version {version} to {SCHEMA_VERSION} at start"
                 if version < SCHEMA_VERSION else "")
    print(f"restored {args.source} to {path}: {events} events, integrity ok, mode {info.st_mode & 0o777:04o}, "
          f"owner {info.st_uid}:{info.st_gid} like its directory{migration}. "
          f"{_change_feed_text(replaced_high_water, backup_high_water)}"
          "Start serve again (sudo systemctl start noyo-listener).")
    return 0


def _change_feed_text(replaced: int | None, backup: int | None) -> str:
    """What restore did to the change feed's seqs, for consumers' saved bookmarks."""
    if not replaced or (backup is not None and backup >= replaced):
        return ""
    backups = "the backup predates the feed" if backup is None else f"the backup's is {backup}"
    return (f"The change feed continues after seq {replaced}, the replaced database's last ({backups}): "
            "consumers' saved seqs stay valid. ")


# The change feed, read-only: `history` for people, `changes` for scripts.

CHANGE_COLUMNS = ("seq", "kind", "id", "version", "modified", "state_from", "state_to", "observed_at", "source",
                  "event_type")
_SELECT_CHANGES = f"SELECT {', '.join(CHANGE_COLUMNS)} FROM changes"
FOLLOW_POLL = 0.25  # seconds between looks for new rows (the SPEC promises them within 1 s)
CHANGES_PAGE = 1000  # rows per read: a long backlog never holds one read transaction open


def _open_feed(settings: Settings) -> sqlite3.Connection:
    """The database opened read-only, with its change feed present."""
    path = existing_database(settings)
    try:
        conn = connect(path, busy_timeout=settings["database"]["busy_timeout"], mode="readonly",
                       checkpoints=settings["database"]["checkpoints"])
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'").fetchone()
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"cannot read {path}: {exc}") from None
    if not found:
        conn.close()
        raise StoreError(f"{path} has no change history yet (its schema predates it); "
                         "start `serve` of this version once to migrate it")
    return conn


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None if it is gone: `restore` renames a new
    file over the database, which a connection opened before keeps reading."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _printable(value: Any) -> str:
    """Text for a terminal: values from the API cannot move the cursor or start a line."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _modified_text(value: Any) -> str:
    """``modified`` as UTC text when it is unix seconds, else as stored."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):
            pass
    return _printable(value)


def format_change(row: dict) -> str:
    """One line of `history`: observed_at, kind, state_from -> state_to, modified, source."""
    cause = f" ({_printable(row['event_type'])})" if row["event_type"] else ""
    version = f" version={_printable(row['version'])}" if row["version"] is not None else ""
    return (f"{row['observed_at']}  {_printable(row['kind'])}  "
            f"{'(new)' if row['state_from'] is None else _printable(row['state_from'])} -> "
            f"{_printable(row['state_to'])}  modified={_modified_text(row['modified'])}{version}  "
            f"source={row['source']}{cause}")


def cmd_history(args: argparse.Namespace) -> int:
    """Print one object's timeline from the change feed, oldest first."""
    settings = settings_for(args)  # declares no needs: no secrets or credentials
    conn = _open_feed(settings)
    try:
        rows = [dict(zip(CHANGE_COLUMNS, row)) for row in conn.execute(
            f"{_SELECT_CHANGES} WHERE id = ? ORDER BY seq", (args.id,))]
        known = bool(rows) or conn.execute(
            "SELECT 1 FROM differences WHERE id = ? UNION ALL SELECT 1 FROM resources WHERE id = ? LIMIT 1",
            (args.id, args.id)).fetchone() is not None
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the change history: {exc}") from None
    finally:
        conn.close()
    if not known:
        raise StoreError(f"no object has id {_printable(args.id)!r}; list ids with "
                         "`noyo_listener.py changes` or: select id from differences")
    if not rows:
        print(f"no changes recorded for {_printable(args.id)}: they are older than [database] history_days, "
              "or it was stored before history was kept", file=sys.stderr)
    for row in rows:
        print(json.dumps(row) if args.json else format_change(row))
    return 0


class _StopFlag:
    """Set by SIGINT/SIGTERM; the handler does nothing else."""

    def __init__(self) -> None:
        self.raised = False

    def handle(self, _signum: int, _frame: Any) -> None:
        self.raised = True


def cmd_changes(args: argparse.Namespace) -> int:
    """Write the change feed as JSON lines; with --follow, keep writing until SIGINT/SIGTERM."""
    settings = settings_for(args)  # declares no needs: no secrets or credentials
    path = settings["database"]["path"]
    # Taken before opening: a replacement in between costs one needless reopen, never a missed file.
    identity = _file_identity(path)
    conn = _open_feed(settings)
    stop = _StopFlag()
    if args.follow:
        signal.signal(signal.SIGINT, stop.handle)
        signal.signal(signal.SIGTERM, stop.handle)
    where, params = "seq > ?", []
    if args.kind is not None:
        where, params = "seq > ? AND kind = ?", [args.kind]
    last, left = args.since, args.limit
    try:
        while not stop.raised:
            # Read data_version before the rows: a commit in between is then seen twice, never missed.
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            page = CHANGES_PAGE if left is None else min(CHANGES_PAGE, left)
            rows = conn.execute(f"{_SELECT_CHANGES} WHERE {where} ORDER BY seq LIMIT ?",
                                [last, *params, page]).fetchall()
            for row in rows:
                sys.stdout.write(json.dumps(dict(zip(CHANGE_COLUMNS, row))) + "\n")
                last = row[0]
            sys.stdout.flush()
            if left is not None:
                left -= len(rows)
                if left <= 0:
                    break
            if len(rows) == page:
                continue  # more are waiting
            if not args.follow:
                break
            while not stop.raised and conn.execute("PRAGMA data_version").fetchone()[0] == version:
                if _file_identity(path) != identity:
                    # Restored: the old file gets no more rows. Read on from the same
                    # seq in the new one; restore carries the seq counter forward, so
                    # rows written from now on still come after `last`.
                    print(f"noyo-listener: {path} was replaced (restore); following the new file "
                          f"after seq {last}", file=sys.stderr, flush=True)
                    conn.close()
                    identity = _file_identity(path)
                    conn = _open_feed(settings)
                    break
                time.sleep(FOLLOW_POLL)  # a signal ends the sleep; its handler only sets the flag
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the change feed: {exc}") from None
    except BrokenPipeError:
        # The reader went away (`changes | head`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        conn.close()
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
        secrets = settings_for(args)["webhook"]["secrets"]
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


def _count_argument(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more (got {value})")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noyo_listener.py", description="Receive Noyo webhooks, store them in SQLite, fetch the objects.")
    parser.add_argument("--config", metavar="PATH",
                        help="ini file (default: $NOYO_LISTENER_CONFIG, else ./noyo_listener.ini)")
    parser.add_argument("--version", action="version", version=f"noyo-listener {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ``needs``: what a command needs beyond a valid ini (see NEEDS_*). Leave it
    # out for a command that only reads or maintains the database.
    commands.add_parser("serve", help="run the HTTP server and the worker"
                        ).set_defaults(func=cmd_serve, needs=SERVE_NEEDS)
    commands.add_parser("check-config", help="validate the ini and print the effective settings"
                        ).set_defaults(func=cmd_check_config, needs=SERVE_NEEDS)
    bundle = commands.add_parser("bundle", help="write one executable file with this program, bottle and waitress")
    bundle.add_argument("out", metavar="OUT", help="new file to write, e.g. noyo-listener.pyz (never overwritten)")
    bundle.set_defaults(func=cmd_bundle)  # reads no ini: needs no config and no secrets

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
    send.set_defaults(func=cmd_send_test, needs=(NEEDS_WEBHOOK_SECRETS,))

    prune_cmd = commands.add_parser("prune", help="forget old done/ignored events now (serve does it daily)")
    prune_cmd.add_argument("--dead", action="store_true", help="also dead events older than dedupe_days")
    prune_cmd.set_defaults(func=cmd_prune)

    backup = commands.add_parser("backup", help="consistent copy of the database, safe while serving")
    backup.add_argument("dest", metavar="DEST", help="new file to write (never overwritten)")
    backup.set_defaults(func=cmd_backup)

    restore = commands.add_parser("restore", help="put a backup in place of the database while serve is stopped")
    restore.add_argument("source", metavar="SRC", help="a backup written by `backup` (checked before anything changes)")
    restore.set_defaults(func=cmd_restore)

    history = commands.add_parser("history", help="the timeline of one object, oldest first")
    history.add_argument("id", metavar="ID", help="a difference's or other object's id")
    history.add_argument("--json", action="store_true", help="JSON lines with every column")
    history.set_defaults(func=cmd_history)

    changes = commands.add_parser("changes", help="the change feed as JSON lines, for scripts")
    changes.add_argument("--since", type=_count_argument(0), default=0, metavar="SEQ",
                         help="only rows after this seq (the last one you handled)")
    changes.add_argument("--kind", metavar="K", help="only this kind (difference, member_snapshot, ...)")
    changes.add_argument("--limit", type=_count_argument(1), metavar="N", help="at most N rows")
    changes.add_argument("--follow", action="store_true",
                         help="keep writing new rows as they commit, until SIGINT or SIGTERM")
    changes.set_defaults(func=cmd_changes)

    requeue = commands.add_parser("requeue", help="put events back to pending")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="every dead event")
    which.add_argument("--type", help="every non-pending event of this type")
    which.add_argument("event_ids", nargs="*", default=[], metavar="EVENT_ID")
    requeue.set_defaults(func=cmd_requeue)

    sync = commands.add_parser("sync", help="reconcile with Noyo's lists now (one pass per [lists] kind)")
    sync.add_argument("--kind", help="only this [lists] kind (default: every one)")
    sync.set_defaults(func=cmd_sync, needs=(NEEDS_API_CREDENTIALS,))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, run a command, turn known errors into one line."""
    args = build_parser().parse_args(argv)
    configure_logging(coalesce=args.func is cmd_serve)
    try:
        return args.func(args)
    except (ConfigError, StoreError, SyncError) as exc:
        flush_logs()  # the log lines before it come before it
        print(f"noyo-listener: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
