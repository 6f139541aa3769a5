"""Signed socket tokens and the secret policy."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import SecretStr

from gateway_svc import tokens
from gateway_svc.config import Settings

KEY = b"k" * 32


def test_valid_token_gives_the_user() -> None:
    assert tokens.verify(tokens.mint("alice", KEY, ttl=60), KEY) == "alice"


def test_tampered_token_is_refused() -> None:
    token = tokens.mint("alice", KEY, ttl=60)
    body, _, signature = token.partition(".")
    forged_body = tokens.mint("mallory", KEY, ttl=60).partition(".")[0]
    for bad in (
        f"{forged_body}.{signature}",
        f"{body}.{signature[:-2]}AA",
        token + "x",
        tokens.mint("alice", b"another key of thirty-two bytes!", ttl=60),
        "",
        "no-dot",
        ".",
        f"{body}.",
        "é.é",
    ):
        with pytest.raises(tokens.TokenError):
            tokens.verify(bad, KEY)


def test_expired_token_is_refused() -> None:
    token = tokens.mint("alice", KEY, ttl=10, now=1000.0)
    assert tokens.verify(token, KEY, now=1009.0) == "alice"
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(token, KEY, now=1010.0)


def test_development_uses_the_dev_secret_and_production_needs_a_real_one() -> None:
    assert tokens.secret_from(Settings(switchboard_env="development")) == tokens.DEV_SECRET
    with pytest.raises(tokens.SecretConfigError):
        tokens.secret_from(Settings(switchboard_env="production"))
    with pytest.raises(tokens.SecretConfigError):
        tokens.secret_from(
            Settings(switchboard_env="production", switchboard_secret=SecretStr("short"))
        )
    long = "s" * 32
    assert (
        tokens.secret_from(
            Settings(switchboard_env="production", switchboard_secret=SecretStr(long))
        )
        == long.encode()
    )


def test_command_prints_a_valid_token() -> None:
    env = {"SWITCHBOARD_ENV": "development", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-m", "gateway_svc.tokens", "alice", "--ttl", "60"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    assert tokens.verify(out, tokens.DEV_SECRET) == "alice"


def test_gateway_refuses_to_start_in_production_without_secret() -> None:
    env = {"SWITCHBOARD_ENV": "production", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-m", "gateway_svc"], capture_output=True, text=True, env=env
    )
    assert result.returncode != 0
    assert "SWITCHBOARD_SECRET" in result.stderr
