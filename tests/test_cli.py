"""Commands other than serve: send-test, status, requeue; SIGTERM; the README."""

from __future__ import annotations

import json
import re
import signal

import pytest

import noyo_listener
from conftest import ROOT, SECRET, event_body, run_cli


def test_send_test_signs_like_noyo_and_the_event_lands(listener):
    result = run_cli("send-test", listener.url, "--secret", SECRET)
    assert result.returncode == 0, result.stderr
    assert 'HTTP 200 {"ok": true}' in result.stdout
    event_id = re.search(r"event_id=(\S+)", result.stdout).group(1)
    with listener.db() as conn:
        row = conn.execute("SELECT type, status, payload FROM events WHERE event_id = ?", (event_id,)).fetchone()
    assert (row["type"], row["status"]) == ("test.hello_world", "ignored")
    assert json.loads(row["payload"])["data"] == {"message": "Hello world!"}


@pytest.mark.parametrize("form", ["timestamp.body", "body"])
def test_send_test_with_type_data_id_and_form(listener, form):
    result = run_cli("send-test", listener.url, "--secret", SECRET, "--type", "difference.created",
                     "--data-id", "d-42", "--form", form)
    assert result.returncode == 0, result.stderr
    with listener.db() as conn:
        assert tuple(conn.execute("SELECT data_id, status FROM events").fetchone()) == ("d-42", "pending")
        assert conn.execute("SELECT signature_form FROM deliveries").fetchone()[0] == form


def test_send_test_takes_the_secret_from_the_config_when_not_given(listener):
    result = run_cli("--config", str(listener.ini), "send-test", listener.url)
    assert result.returncode == 0 and "HTTP 200" in result.stdout


def test_send_test_reports_a_refusal_with_exit_1(listener):
    result = run_cli("send-test", listener.url, "--secret", "wrong")
    assert result.returncode == 1 and "HTTP 401" in result.stdout


def test_send_test_to_nothing_is_one_line(tmp_path):
    result = run_cli("send-test", "http://127.0.0.1:9/noyo/webhooks", "--secret", "x")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot reach" in result.stderr


def test_status_counts_events_and_says_fetching_is_off(listener):
    listener.send(event_body("difference.created"))
    listener.send(event_body("test.hello_world"))
    result = run_cli("--config", str(listener.ini), "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["events"] == {"pending": 1, "done": 0, "ignored": 1, "dead": 0}
    assert status["by_type"] == {"difference.created": {"pending": 1}, "test.hello_world": {"ignored": 1}}
    assert status["oldest_pending_age_seconds"] >= 0
    assert status["last_received_at"]
    assert status["fetching"].startswith("off")
    assert status["api"]["state"] == "fetching_off"

    human = run_cli("--config", str(listener.ini), "status")
    assert human.returncode == 0 and "pending=1" in human.stdout and "fetching:        off" in human.stdout


def test_status_without_a_database_is_one_line(make_ini):
    result = run_cli("--config", str(make_ini()), "status")
    assert result.returncode == 1 and "start `serve` first" in result.stderr


def test_requeue_puts_dead_and_chosen_events_back(listener):
    listener.send(json.dumps({"data": {}, "event": {"id": "dead-1", "type": "difference.created"}}).encode())
    listener.send(event_body("test.hello_world", event_id="hello-1"))
    ini = str(listener.ini)

    result = run_cli("--config", ini, "requeue", "--dead")
    assert result.returncode == 0 and "requeued 1 event" in result.stdout
    result = run_cli("--config", ini, "requeue", "hello-1", "no-such-id")
    assert "requeued 1 event" in result.stdout
    with listener.db() as conn:
        rows = dict(conn.execute("SELECT event_id, status FROM events"))
    # Fetching is off, so they wait; with no data.id the worker would mark dead-1 dead again.
    assert rows == {"dead-1": "pending", "hello-1": "pending"}
    assert run_cli("--config", ini, "requeue").returncode == 2  # argparse: say what to requeue


def test_sigterm_and_sigint_exit_0_with_everything_committed(start_listener):
    for sig in (signal.SIGTERM, signal.SIGINT):
        listener = start_listener()
        assert listener.send(event_body(event_id=f"before-{sig}"))[0] == 200
        assert listener.stop(sig) == 0
        assert "stopped" in listener.log() and "Traceback" not in listener.log()
        with listener.db() as conn:
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] >= 1
        listener.ini.with_suffix(".log").unlink()
        (listener.ini.parent / "noyo.sqlite3").unlink()


def test_the_development_secret_makes_serve_warn_loudly(start_listener):
    listener = start_listener(webhook={"secrets": f"dev:{noyo_listener.DEVELOPMENT_SECRET}"})
    listener.wait_for_log(r"WARNING !!! webhook secret 'dev' is the public DEVELOPMENT secret")
    assert noyo_listener.DEVELOPMENT_SECRET not in listener.log()


def test_every_command_is_in_the_readme_and_has_help():
    readme = (ROOT / "README.md").read_text()
    parser = noyo_listener.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        assert f"noyo_listener.py {name}" in readme, name
        assert sub.format_help()
        assert run_cli(name, "--help").returncode == 0


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"```sh\n([^\n]*-m pytest[^\n]*)\n```", readme).group(1)
    assert command in ci


def test_serve_on_a_port_in_use_says_so_and_exits_1(make_ini):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ini = make_ini(server={"port": taken.getsockname()[1]})
        result = run_cli("--config", str(ini), "serve")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot listen on 127.0.0.1" in last and "Address already in use" in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["notaurl", "http://[::1", "ftp://127.0.0.1/x"])
def test_send_test_refuses_a_malformed_url_without_a_traceback(url):
    result = run_cli("send-test", url, "--secret", "x")
    assert result.returncode == 2
    assert "is not an http:// or https:// URL" in result.stderr and "Traceback" not in result.stderr
