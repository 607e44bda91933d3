"""The control token: loading it from the environment or a file, and checking what peers present."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeshift.errors import UserError
from pipeshift.runtime.security import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    bearer_matches,
    load_control_token,
    token_matches,
)


def test_no_token_configured_means_open() -> None:
    assert load_control_token({}) is None
    assert token_matches(None, None)
    assert token_matches(None, "anything")
    assert bearer_matches(None, None)


def test_token_is_read_from_the_environment_variable() -> None:
    assert load_control_token({TOKEN_ENV: "s3cret value"}) == "s3cret value"


def test_token_file_has_its_trailing_newline_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    assert load_control_token({TOKEN_FILE_ENV: str(path)}) == "from-a-file"
    path.write_text("windows-style\r\n")
    assert load_control_token({TOKEN_FILE_ENV: str(path)}) == "windows-style"


def test_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "token"
    path.write_text("mounted\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(path))
    assert load_control_token() == "mounted"


def test_missing_token_file_is_a_user_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="nope"):
        load_control_token({TOKEN_FILE_ENV: str(missing)})


@pytest.mark.parametrize("content", ["", "\n"])
def test_empty_token_is_refused_rather_than_running_open(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(UserError, match="empty"):
        load_control_token({TOKEN_FILE_ENV: str(path)})
    with pytest.raises(UserError, match="empty"):
        load_control_token({TOKEN_ENV: ""})


def test_setting_both_variables_is_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("a\n")
    with pytest.raises(UserError, match="only one"):
        load_control_token({TOKEN_ENV: "a", TOKEN_FILE_ENV: str(path)})


def test_configured_token_refuses_missing_and_wrong_tokens() -> None:
    assert token_matches("right", "right")
    assert not token_matches("right", None)
    assert not token_matches("right", "wrong")
    assert not token_matches("right", "righ")
    assert not token_matches("right", "right\n")
    assert not token_matches("right", "\ud800")


@settings(max_examples=200, deadline=None)
@given(expected=st.text(min_size=1), other=st.one_of(st.none(), st.text()), present_expected=st.booleans())
def test_token_matches_exactly_when_strings_are_equal(
    expected: str, other: str | None, present_expected: bool
) -> None:
    presented = expected if present_expected else other
    assert token_matches(expected, presented) == (presented == expected)


def test_bearer_header_is_checked_against_the_token() -> None:
    assert bearer_matches("tok", "Bearer tok")
    assert bearer_matches("tok", "bearer tok")
    assert not bearer_matches("tok", "Bearer nope")
    assert not bearer_matches("tok", "Basic tok")
    assert not bearer_matches("tok", "tok")
    assert not bearer_matches("tok", None)
