"""Signature and timestamp checks as pure functions (the HTTP side is in test_receiver)."""

from __future__ import annotations

import datetime as dt
import hmac
import inspect

import pytest
from hypothesis import given, strategies as st

import noyo_listener
from noyo_listener import SignatureMatch, SignatureVerifier, check_timestamp, parse_signature_header
from conftest import hmac_hex

TS = "2024-05-08T21:27:45.039587+00:00"
NOW = dt.datetime.fromisoformat(TS).timestamp()


def test_matches_noyo_sample_code_form():
    body = b'{"data": {"id": "x"}}'
    verifier = SignatureVerifier([("s", "k")])
    assert verifier.verify(hmac_hex("k", TS.encode() + b"." + body), TS, body) == SignatureMatch("s", "timestamp.body")
    assert verifier.verify(hmac_hex("k", body), TS, body) == SignatureMatch("s", "body")
    assert verifier.verify(hmac_hex("k", body), None, body) == SignatureMatch("s", "body")


@given(body=st.binary(max_size=2000), secret=st.text(min_size=1, max_size=40), other=st.text(min_size=1, max_size=40))
def test_only_the_right_secret_and_body_verify(body, secret, other):
    verifier = SignatureVerifier([("only", secret)])
    good = hmac_hex(secret, TS.encode() + b"." + body)
    assert verifier.verify(good, TS, body) is not None
    assert verifier.verify(good, TS, body + b"!") is None
    if other != secret:
        assert verifier.verify(hmac_hex(other, TS.encode() + b"." + body), TS, body) is None


@given(header=st.text(max_size=300))
def test_arbitrary_headers_never_raise(header):
    verifier = SignatureVerifier([("a", "k")])
    assert verifier.verify(header, TS, b"{}") is None


def test_the_comparison_is_constant_time():
    """Guard the property, not just a result: verify() must use hmac.compare_digest."""
    assert "hmac.compare_digest" in inspect.getsource(SignatureVerifier.verify)
    assert "==" not in inspect.getsource(SignatureVerifier.verify).split("compare_digest")[1].split("\n")[0]


def test_header_parsing_tolerates_spaces_empties_and_case():
    assert parse_signature_header(" AB , ,cd,") == [b"ab", b"cd"]
    assert parse_signature_header(None) == [] and parse_signature_header("") == []
    assert len(parse_signature_header(",".join(["ab"] * 100))) == noyo_listener.MAX_SIGNATURES


@pytest.mark.parametrize("mode, form, ok", [
    ("auto", "timestamp.body", True), ("auto", "body", True),
    ("timestamp.body", "timestamp.body", True), ("timestamp.body", "body", False),
    ("body", "body", True), ("body", "timestamp.body", False),
])
def test_signature_payload_modes(mode, form, ok):
    body = b"{}"
    message = TS.encode() + b"." + body if form == "timestamp.body" else body
    result = SignatureVerifier([("s", "k")], mode).verify(hmac_hex("k", message), TS, body)
    assert (result is not None) == ok


@pytest.mark.parametrize("header, now, reason", [
    (TS, NOW, None),
    (TS, NOW + 3600 - 1, None),
    (TS, NOW + 3600 + 1, "timestamp_too_old"),
    (TS, NOW - 300 + 1, None),
    (TS, NOW - 300 - 1, "timestamp_in_future"),
    ("2024-05-08T21:27:45Z", NOW, None),
    ("2024-05-08T21:27:45", NOW, None),  # naive means UTC
    ("2024-05-08T23:27:45+02:00", NOW, None),
    (None, NOW, "no_timestamp"),
    ("", NOW, "no_timestamp"),
    ("1715203665", NOW, "bad_timestamp"),
    ("next tuesday", NOW, "bad_timestamp"),
])
def test_timestamp_window(header, now, reason):
    assert check_timestamp(header, now, max_age=3600, max_skew=300) == reason


def test_an_age_of_zero_turns_the_check_off():
    assert check_timestamp(None, NOW, 0, 300) is None
    assert check_timestamp("garbage", NOW, 0, 300) is None


def test_sign_matches_an_independent_hmac():
    assert noyo_listener.sign("k", b"body", TS) == hmac.new(b"k", TS.encode() + b".body", "sha256").hexdigest()
    assert noyo_listener.sign("k", b"body") == hmac_hex("k", b"body")


def test_a_truncated_or_extended_signature_never_verifies():
    """Each hex digit counts: a verifier that compared a prefix would accept a
    1-digit signature 1 time in 16 (an audit found the fuzz never noticed)."""
    verifier = SignatureVerifier([("primary", "s3cret")], "auto")
    body = b'{"event": {"id": "e"}}'
    for timestamp in (TS, None):
        good = noyo_listener.sign("s3cret", body, timestamp)
        assert verifier.verify(good, timestamp or TS, body) is not None
        for length in range(1, len(good)):
            assert verifier.verify(good[:length], timestamp or TS, body) is None, length
            assert verifier.verify(good[length:], timestamp or TS, body) is None, length
        assert verifier.verify(good + "0", timestamp or TS, body) is None
        assert verifier.verify(good + good, timestamp or TS, body) is None
