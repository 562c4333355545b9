#!/usr/bin/env python3
"""Alert on every new discrepancy in noyo-listener's change feed.

Follows `noyo_listener.py changes --follow --kind difference --since LAST` and,
for each row that turns a difference into a discrepancy, runs ALERT_COMMAND
(a shell command; the row arrives as one JSON line on its stdin) or, without
one, logs a warning. After each row it saves the row's seq in SEQ_FILE, so a
restart resumes where it stopped: no row is skipped. A crash between an alert
and saving its seq repeats that one alert (at least once, never lost). A
failing ALERT_COMMAND stops this script with exit 1; under systemd it is
restarted and tries the same row again.

Environment: NOYO_LISTENER (how to run the listener; default: the /opt layout
of the README), NOYO_LISTENER_CONFIG (its ini), SEQ_FILE, ALERT_COMMAND.
Stops with exit 0 on SIGTERM or SIGINT.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

LISTENER = shlex.split(os.environ.get(
    "NOYO_LISTENER", "/opt/noyo-listener/.venv/bin/python3 /opt/noyo-listener/noyo_listener.py"))
SEQ_FILE = os.environ.get("SEQ_FILE", "/var/lib/noyo-discrepancy-alert/last_seq")
ALERT_COMMAND = os.environ.get("ALERT_COMMAND", "")


def load_seq() -> int:
    try:
        with open(SEQ_FILE) as handle:
            return int(handle.read().strip() or 0)
    except FileNotFoundError:
        return 0


def save_seq(seq: int) -> None:
    """Write then rename: a crash leaves the old seq or the new one, never half a number."""
    temporary = SEQ_FILE + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(f"{seq}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, SEQ_FILE)


_BARE = re.compile(r'[!#-<>-\[\]-~]+')  # printable ASCII but space, '"', '=' and '\\'


def log_value(value) -> str:
    """A value the API chose as one key=value field (like noyo_listener.log_value):
    quoted with JSON escapes unless plain, so it can neither start a journal
    line of its own (with a forged <priority>) nor add a field."""
    if value is None:
        return "-"
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def alert(row: dict) -> None:
    if ALERT_COMMAND:
        subprocess.run(ALERT_COMMAND, shell=True, input=json.dumps(row) + "\n", text=True, check=True)
    else:  # <4> is WARNING in the journal
        print(f"<4>new discrepancy difference={log_value(row['id'])} was={log_value(row['state_from'])} "
              f"observed_at={log_value(row['observed_at'])} seq={log_value(row['seq'])}", flush=True)


def main() -> int:
    feed = subprocess.Popen([*LISTENER, "changes", "--follow", "--kind", "difference", "--since", str(load_seq())],
                            stdout=subprocess.PIPE, text=True)
    # Ask the feed to stop; it ends its output cleanly, and so does this loop.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: feed.send_signal(signal.SIGTERM))
    for line in feed.stdout:
        if not line.endswith("\n"):
            break  # cut short: it is read again at the next start
        row = json.loads(line)
        if row["state_to"] == "discrepancy" and row["state_from"] != "discrepancy":
            try:
                alert(row)
            except (OSError, subprocess.CalledProcessError) as exc:
                print(f"<3>alert failed for seq={row['seq']}: {exc}; it is retried at the next start",
                      file=sys.stderr, flush=True)
                feed.send_signal(signal.SIGTERM)
                feed.wait()
                return 1
        save_seq(row["seq"])
    return feed.wait()


if __name__ == "__main__":
    sys.exit(main())
