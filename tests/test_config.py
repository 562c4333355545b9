"""The ini file: defaults, validation, overrides from env and credentials, masking."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

import noyo_listener
from conftest import ROOT, SECRET, run_cli


def one_line_error(result) -> str:
    """A broken config: exit 1, exactly one line on stderr, no traceback."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_the_example_ini_is_valid_and_its_secret_is_masked():
    result = run_cli("--config", str(ROOT / "noyo_listener.ini"), "check-config")
    assert result.returncode == 0, result.stderr
    assert "secrets = dev:********" in result.stdout
    assert noyo_listener.DEVELOPMENT_SECRET not in result.stdout
    assert "development secret" in result.stdout
    assert "# configuration is valid" in result.stdout


def test_check_config_shows_effective_values_and_never_a_secret(make_ini):
    ini = make_ini(noyo_api={"client_id": "my-client", "client_secret": "client-secret-value"},
                   worker={"backoff_initial": "500ms"})
    result = run_cli("--config", str(ini), "check-config")
    assert result.returncode == 0, result.stderr
    assert "client_id = my-client" in result.stdout
    assert "client_secret = ********" in result.stdout
    assert "backoff_initial = 500ms" in result.stdout
    assert "max_timestamp_age = 4d" in result.stdout  # a default
    for secret in ("client-secret-value", SECRET):
        assert secret not in result.stdout + result.stderr


def test_config_path_comes_from_the_environment_when_not_given(make_ini):
    ini = make_ini()
    result = run_cli("check-config", env={"NOYO_LISTENER_CONFIG": str(ini)})
    assert result.returncode == 0 and str(ini) in result.stdout


def test_environment_and_credentials_override_the_file(make_ini, tmp_path):
    ini = make_ini()
    env = {"NOYO_WEBHOOK_SECRETS": "fromenv:env-secret", "NOYO_CLIENT_ID": "env-id", "NOYO_CLIENT_SECRET": "env-cs"}
    result = run_cli("--config", str(ini), "check-config", env=env)
    assert "secrets = fromenv:********  # from environment NOYO_WEBHOOK_SECRETS" in result.stdout
    assert "client_id = env-id" in result.stdout

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "NOYO_WEBHOOK_SECRETS").write_text("fromcred:cred-secret\n")
    result = run_cli("--config", str(ini), "check-config", env={**env, "CREDENTIALS_DIRECTORY": str(creds)})
    assert "secrets = fromcred:********  # from credential NOYO_WEBHOOK_SECRETS" in result.stdout
    assert "cred-secret" not in result.stdout and "env-secret" not in result.stdout


def test_a_secret_from_the_environment_authenticates_requests(start_listener):
    from conftest import event_body
    listener = start_listener(env={"NOYO_WEBHOOK_SECRETS": "envname:env-only-secret"})
    assert listener.send(event_body(), secret="env-only-secret")[0] == 200
    assert listener.send(event_body(), secret=SECRET)[0] == 401  # the file's secret is overridden


@pytest.mark.parametrize("overrides, expected", [
    ({"server": {"port": "99999"}}, "[server] port: must be between 0 and 65535 (got '99999')"),
    ({"server": {"port": "eighty"}}, "[server] port: expected a whole number"),
    ({"server": {"path": "noyo"}}, "[server] path: must start with /"),
    ({"server": {"threads": "0"}}, "[server] threads: must be between 1 and 256"),
    ({"server": {"prot": "80"}}, "[server] prot is not a known key"),
    ({"surver": {"port": "80"}}, "unknown section [surver]"),
    ({"webhook": {"secrets": ""}}, "[webhook] secrets is empty"),
    ({"webhook": {"secrets": "a:x, a:y"}}, "secret name 'a' is used twice"),
    ({"webhook": {"secrets": "name: "}}, "[webhook] secrets:"),
    ({"webhook": {"signature_payload": "sha1"}}, "[webhook] signature_payload: must be one of auto, timestamp.body, body"),
    ({"webhook": {"max_timestamp_age": "4 days"}}, "[webhook] max_timestamp_age: expected a number with a unit"),
    ({"webhook": {"max_timestamp_age": "40d"}}, "must not exceed [database] dedupe_days"),
    ({"database": {"synchronous": "SOMETIMES"}}, "[database] synchronous: must be one of OFF, NORMAL, FULL, EXTRA"),
    ({"noyo_api": {"token_url": "accounts.noyo.com"}}, "[noyo_api] token_url: must be an http:// or https:// URL"),
    ({"noyo_api": {"client_id": "only-id"}}, "set both client_id and client_secret"),
    ({"worker": {"backoff_initial": "2h"}}, "[worker] backoff_max must be >= backoff_initial"),
    ({"worker": {"max_attempts": "0"}}, "[worker] max_attempts: must be between 1 and 1000"),
    ({"fetch": {"difference": "{tracking_url}/differences"}}, "[fetch] difference: the template must contain {id}"),
    ({"fetch": {"difference": "{nope}/{id}"}}, "[fetch] difference: only {id}"),
])
def test_a_broken_ini_is_one_readable_line_and_exit_1(make_ini, overrides, expected):
    ini = make_ini(**overrides)
    for command in ("check-config", "serve"):
        line = one_line_error(run_cli("--config", str(ini), command))
        assert expected in line


def test_a_secret_value_is_never_echoed_in_an_error(make_ini):
    ini = make_ini(webhook={"secrets": "ok:fine, ok:super-secret-value"})
    line = one_line_error(run_cli("--config", str(ini), "check-config"))
    assert "super-secret-value" not in line


@pytest.mark.parametrize("text", ["[server\nport = 1", "no section header\n", "[server]\nport = 1\nport = 2\n"])
def test_a_file_that_is_not_an_ini_is_one_line(tmp_path, text):
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    line = one_line_error(run_cli("--config", str(ini), "check-config"))
    assert "not a valid ini file" in line


def test_a_missing_config_file_says_how_to_point_at_one(tmp_path):
    line = one_line_error(run_cli("--config", str(tmp_path / "nope.ini"), "check-config"))
    assert "not found" in line and "--config" in line


def test_serve_refuses_a_database_directory_that_does_not_exist(make_ini, tmp_path):
    ini = make_ini(database={"path": tmp_path / "missing" / "db.sqlite3"})
    assert "does not exist" in one_line_error(run_cli("--config", str(ini), "serve"))


def test_an_empty_fetch_entry_turns_a_kind_off(make_ini):
    settings = noyo_listener.load_settings(str(make_ini(fetch={"group": ""})), environ={})
    assert "group" not in settings.fetch and "difference" in settings.fetch


def test_fetch_urls_quote_the_id(make_ini):
    settings = noyo_listener.load_settings(str(make_ini(noyo_api={"tracking_url": "https://t.example/"})), environ={})
    assert settings.fetch_url("difference", "a/b c") == "https://t.example/api/v1/differences/a%2Fb%20c"
    assert settings.fetch_url("unknown", "x") is None


# --- pure parsers -------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("10s", 10), ("10", 10), ("5m", 300), ("1h", 3600), ("4d", 345600), (" 1.5s ", 1.5), ("0", 0),
])
def test_parse_duration(text, seconds):
    assert noyo_listener.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-1s", "1w", "1 hour", "1e3s"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        noyo_listener.parse_duration(text)


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_format_duration_round_trips(number, unit):
    seconds = noyo_listener.parse_duration(f"{number}{unit}")
    assert noyo_listener.parse_duration(noyo_listener.format_duration(seconds)) == pytest.approx(seconds)


def test_parse_secrets_names_and_positions():
    assert noyo_listener.parse_secrets("a:one, two ,, b.c-1:th:ree") == [
        ("a", "one"), ("secret2", "two"), ("b.c-1", "th:ree")]
