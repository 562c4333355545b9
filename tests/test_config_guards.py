"""Settings that are valid ini but wrong for production: URLs the worker
cannot use or would leak credentials over are refused; weaker durability and
replay protection are warned about."""

from __future__ import annotations

import pytest

from conftest import run_cli


def one_line_error(result) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    ({"fetch": {"difference": "tracking.noyo.com/api/v1/differences/{id}"}},
     "[fetch] difference: 'tracking.noyo.com/api/v1/differences/ID' is not an http:// or https:// URL with a host"),
    ({"fetch": {"group": "https:///api/v1/groups/{id}"}}, "[fetch] group: 'https:///api/v1/groups/ID' is not an"),
    ({"fetch": {"group": "http://noyo.example.com/api/v1/groups/{id}"}},
     "[fetch] group: 'http://noyo.example.com/api/v1/groups/ID' would send credentials and tokens in clear"),
    ({"noyo_api": {"token_url": "http://accounts.noyo.com/auth/public/token"}},
     "[noyo_api] token_url: 'http://accounts.noyo.com/auth/public/token' would send credentials and tokens "
     "in clear to accounts.noyo.com; use https://"),
    ({"noyo_api": {"tracking_url": "http://10.0.0.7:8000"}}, "[noyo_api] tracking_url: 'http://10.0.0.7:8000' would"),
    # a [fetch] template inherits an http:// [noyo_api] URL
    ({"noyo_api": {"fulfillment_url": "http://fulfillment.example"}}, "[noyo_api] fulfillment_url:"),
])
def test_check_config_and_serve_refuse_unusable_or_cleartext_api_urls(make_ini, overrides, expected):
    ini = str(make_ini(**overrides))
    for command in ("check-config", "serve"):
        line = one_line_error(run_cli("--config", ini, command))
        assert expected in line, line


@pytest.mark.parametrize("url", ["http://127.0.0.1:9999", "http://localhost:9999", "http://[::1]:9999",
                                 "https://tracking.example"])
def test_https_anywhere_and_http_to_loopback_are_fine(make_ini, url):
    ini = str(make_ini(noyo_api={"token_url": url + "/token", "tracking_url": url, "fulfillment_url": url}))
    result = run_cli("--config", ini, "check-config")
    assert result.returncode == 0, result.stderr


def test_status_is_not_stopped_by_an_api_url_problem(listener):
    # Only the commands that talk to the API check its URLs.
    listener.ini.write_text(listener.ini.read_text() + "\n[fetch]\ndifference = nohost/{id}\n")
    assert run_cli("--config", str(listener.ini), "status").returncode == 0


WEAK = {"database": {"synchronous": "NORMAL"}, "webhook": {"max_timestamp_age": "0"}}


def test_check_config_warns_about_weaker_durability_and_no_replay_window(make_ini):
    result = run_cli("--config", str(make_ini(**WEAK)), "check-config")
    assert result.returncode == 0, result.stderr
    assert "# WARNING: [database] synchronous = NORMAL: a 200 no longer means the event survives" in result.stdout
    assert "# WARNING: [webhook] max_timestamp_age = 0: the timestamp check is off" in result.stdout
    assert "# configuration is valid" in result.stdout

    default = run_cli("--config", str(make_ini("default.ini")), "check-config")
    assert "WARNING" not in default.stdout


def test_serve_warns_once_at_start(start_listener):
    listener = start_listener(**WEAK)
    listener.wait_for_log(r"listening url=")
    log = listener.log()
    assert log.count("WARNING [database] synchronous = NORMAL") == 1, log
    assert log.count("WARNING [webhook] max_timestamp_age = 0") == 1, log
    assert listener.get("/healthz")[0] == 200
    assert listener.log().count("synchronous = NORMAL") == 1


# --- secrets that are not UTF-8 text ---------------------------------------------------------


@pytest.mark.parametrize("command", [["check-config"], ["serve"], ["sync"]])
def test_a_credential_file_that_is_not_utf8_is_one_line_and_exit_1(make_ini, tmp_path, command):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "NOYO_CLIENT_SECRET").write_bytes(b"\xffsecret")
    result = run_cli("--config", str(make_ini()), *command, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    line = one_line_error(result)
    assert "NOYO_CLIENT_SECRET is not valid UTF-8" in line and "secret" not in line.split("UTF-8", 1)[1]


@pytest.mark.parametrize("command", [["check-config"], ["serve"]])
def test_an_environment_secret_that_is_not_utf8_is_one_line_and_exit_1(make_ini, command):
    # os.environ carries undecodable bytes as lone surrogates; subprocess turns them back into the bytes.
    env = {"NOYO_WEBHOOK_SECRETS": "primary:\udcffsecret"}
    line = one_line_error(run_cli("--config", str(make_ini()), *command, env=env))
    assert "NOYO_WEBHOOK_SECRETS is not valid UTF-8" in line and "\udcff" not in line
