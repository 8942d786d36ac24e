"""The key is found where the published tools look, and never shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from nanophoto.client import NanoPhotoClient
from nanophoto.errors import MissingAPIKeyError
from nanophoto.settings import NanoPhotoSettings, current_settings, resolve_api_key

SECRET = "np-live-secret-1234567890"


def write_openclaw(path: Path, skill: str, key: str) -> None:
    document = {"skills": {"entries": {skill: {"env": {"NANOPHOTO_API_KEY": key}}}}}
    path.write_text(json.dumps(document), encoding="utf-8")


def test_explicit_key_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOPHOTO_API_KEY", "from-env")
    assert resolve_api_key("explicit").get_secret_value() == "explicit"
    assert resolve_api_key(None).get_secret_value() == "from-env"


def test_empty_values_count_as_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NANOPHOTO_API_KEY", "   ")
    openclaw = tmp_path / "openclaw.json"
    write_openclaw(openclaw, "sora-2-generate", "from-file")
    monkeypatch.setenv("NANOPHOTO_OPENCLAW_FILE", str(openclaw))
    assert resolve_api_key("").get_secret_value() == "from-file"


@pytest.mark.parametrize("skill", ["sora-2-generate", "video-prompt-generator"])
def test_openclaw_file_is_the_last_resort(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, skill: str
) -> None:
    openclaw = tmp_path / "openclaw.json"
    write_openclaw(openclaw, skill, SECRET)
    monkeypatch.setenv("NANOPHOTO_OPENCLAW_FILE", str(openclaw))
    assert resolve_api_key().get_secret_value() == SECRET


def test_extra_sources_come_between_environment_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    openclaw = tmp_path / "openclaw.json"
    write_openclaw(openclaw, "sora-2-generate", "from-file")
    monkeypatch.setenv("NANOPHOTO_OPENCLAW_FILE", str(openclaw))
    key = resolve_api_key(extra_sources=(("the Prefect block 'x'", SecretStr("from-block")),))
    assert key.get_secret_value() == "from-block"


def test_missing_key_names_every_place_looked(tmp_path: Path) -> None:
    with pytest.raises(MissingAPIKeyError) as caught:
        resolve_api_key()
    message = str(caught.value)
    assert "--api-key" in message
    assert "NANOPHOTO_API_KEY" in message
    assert "openclaw.json" in message
    assert "sora-2-generate" in message
    assert "video-prompt-generator" in message


def test_broken_openclaw_file_counts_as_no_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    openclaw = tmp_path / "openclaw.json"
    openclaw.write_text("{not json", encoding="utf-8")
    monkeypatch.setenv("NANOPHOTO_OPENCLAW_FILE", str(openclaw))
    with pytest.raises(MissingAPIKeyError):
        resolve_api_key()


def test_key_never_shows_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOPHOTO_API_KEY", SECRET)
    settings = NanoPhotoSettings()
    client = NanoPhotoClient(settings=settings)
    for text in (repr(settings), str(settings), repr(client), str(settings.model_dump())):
        assert SECRET not in text


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NanoPhotoSettings().base_url == "https://nanophoto.ai"
    monkeypatch.setenv("NANOPHOTO_BASE_URL", "http://127.0.0.1:8765")
    monkeypatch.setenv("NANOPHOTO_READ_TIMEOUT", "5")
    settings = NanoPhotoSettings()
    assert (settings.base_url, settings.read_timeout) == ("http://127.0.0.1:8765", 5.0)


def test_shared_settings_follow_every_change_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-process settings are built once per environment, never served stale."""
    monkeypatch.setenv("NANOPHOTO_READ_TIMEOUT", "5")
    first = current_settings()
    assert current_settings() is first  # built once, not before every call
    monkeypatch.setenv("NANOPHOTO_READ_TIMEOUT", "7")
    assert current_settings().read_timeout == 7.0
    monkeypatch.delenv("NANOPHOTO_READ_TIMEOUT")
    monkeypatch.setenv("nanophoto_read_timeout", "9")  # any case, as pydantic reads it
    assert current_settings().read_timeout == 9.0
    monkeypatch.setenv("NANOPHOTO_READ_TIMEOUT", "5")
    monkeypatch.delenv("nanophoto_read_timeout")
    assert current_settings() is first


@pytest.mark.parametrize(
    "url",
    [
        "http://nanophoto.ai",
        "ftp://nanophoto.ai",
        "nanophoto.ai",
        "http://127.evil.example:8765",  # a name that looks like loopback is not
        "http://localhost.evil.example",
        "http://0.0.0.0:8977",
    ],
)
def test_the_key_only_travels_over_https_or_to_this_machine(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        NanoPhotoSettings(base_url=url)
    for fine in (
        "https://nanophoto.ai",
        "http://127.0.0.1:8765",
        "http://127.3.4.5:80",
        "http://localhost:1",
        "http://[::1]:8765",
    ):
        assert NanoPhotoSettings(base_url=fine).base_url == fine
