"""The key comes from the environment or a Prefect block, inside the task."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from flows.video import prompt_to_video
from nanophoto.errors import ConfigurationError, MissingAPIKeyError
from nanophoto.watch import WatchSchedule
from nanophoto_simulator import Simulator
from tasks.credentials import NanoPhotoCredentials
from tests.helpers import MakeSimulator

FAST = WatchSchedule()  # NanoPhoto's seconds: NANOPHOTO_TIME_SCALE compresses them
BLOCK_KEY = "np-block-key-42"


@pytest.fixture
def keyless_simulator(make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """A simulator that only knows the block's key; the environment has no key."""
    simulator = make_simulator(keys={BLOCK_KEY: 100})
    monkeypatch.setenv("NANOPHOTO_RETRY_BASE_DELAY", "0.01")
    monkeypatch.setenv("NANOPHOTO_TIME_SCALE", str(simulator.config.time_scale))
    return simulator


async def test_the_block_supplies_key_and_base_url(
    keyless_simulator: Simulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    await NanoPhotoCredentials(
        api_key=SecretStr(BLOCK_KEY), base_url=keyless_simulator.base_url
    ).asave("video-team", overwrite=True)
    monkeypatch.setenv("SORA2_CREDENTIALS_BLOCK", "video-team")
    result = await prompt_to_video(prompt="a fox", schedule=FAST, output_dir=str(tmp_path))
    assert result.video_credits == 4
    assert keyless_simulator.snapshot()["submits"] == 1


async def test_the_environment_wins_over_the_block(
    make_simulator: MakeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulator = make_simulator(keys={"env-key": 100})
    await NanoPhotoCredentials(api_key=SecretStr("block-key")).asave("nanophoto", overwrite=True)
    monkeypatch.setenv("NANOPHOTO_API_KEY", "env-key")
    monkeypatch.setenv("NANOPHOTO_BASE_URL", simulator.base_url)
    monkeypatch.setenv("NANOPHOTO_TIME_SCALE", str(simulator.config.time_scale))
    await prompt_to_video(prompt="a fox", schedule=FAST, output_dir="")
    assert simulator.snapshot()["requests"].keys() == {"env-key"}


async def test_no_key_anywhere_names_every_place_including_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SORA2_CREDENTIALS_BLOCK", "does-not-exist")
    state = await prompt_to_video(prompt="a fox", schedule=FAST, return_state=True)
    assert state.is_failed()
    with pytest.raises(MissingAPIKeyError) as caught:
        await state.aresult()
    message = str(caught.value)
    assert "NANOPHOTO_API_KEY" in message
    assert "nanophoto-credentials/does-not-exist" in message
    assert "openclaw" in message


@pytest.mark.parametrize("url", ["http://0.0.0.0:8977", "http://nanophoto.ai", "ftp://127.0.0.1"])
def test_a_block_refuses_a_base_url_that_would_send_the_key_in_clear_text(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        NanoPhotoCredentials(api_key=SecretStr(BLOCK_KEY), base_url=url)
    assert "base_url" in str(refused.value)
    assert "https" in str(refused.value)
    assert BLOCK_KEY not in str(refused.value)


async def test_a_stored_block_with_a_clear_text_base_url_stops_the_run_before_any_request(
    keyless_simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saved without validation, as an older version or a hand-edited document could hold it.
    plain = keyless_simulator.base_url.replace("127.0.0.1", "0.0.0.0")
    block = NanoPhotoCredentials.model_construct(api_key=SecretStr(BLOCK_KEY), base_url=plain)
    await block.asave("clear-text", overwrite=True)
    monkeypatch.setenv("SORA2_CREDENTIALS_BLOCK", "clear-text")
    state = await prompt_to_video(prompt="a fox", schedule=FAST, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigurationError) as caught:
        await state.aresult()
    assert "nanophoto-credentials/clear-text" in str(caught.value)
    assert "base_url" in str(caught.value)
    assert BLOCK_KEY not in str(caught.value)
    assert keyless_simulator.snapshot()["total_requests"] == 0
