"""Requests refuse bad input, naming the field, before anything is sent."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from nanophoto.contract import VIDEO_COST, Locale, ModelTier, Technique
from nanophoto.models import (
    PromptRequest,
    VideoOptions,
    VideoRequest,
    VideoStatus,
    video_filename,
)

IMAGE = "https://example.com/a.png"

INVALID_PROMPT_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"topic": ""}, "topic"),
    ({"topic": "   "}, "topic"),
    ({"topic": "x" * 501}, "topic"),
    ({"topic": "fox", "technique": "dolly-zoom"}, "technique"),
    ({"topic": "fox", "locale": "it"}, "locale"),
    ({"topic": "fox", "duration": 12}, "duration"),
    ({"topic": "fox", "mode": "imageToVideo"}, "image_urls"),
    ({"topic": "fox", "image_urls": [IMAGE] * 4}, "image_urls"),
    ({"topic": "fox", "image_urls": ["/home/me/cat.png"]}, "image_urls"),
    ({"topic": "fox", "image_urls": ["data:image/png;base64,iVBORw0KGgo="]}, "image_urls"),
    ({"topic": "fox", "image_urls": ["file:///tmp/cat.png"]}, "image_urls"),
    ({"topic": "fox", "mode": "videoToVideo"}, "mode"),
]


@pytest.mark.parametrize(("fields", "named"), INVALID_PROMPT_INPUTS)
def test_prompt_request_refuses_invalid_input_naming_the_field(
    fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        PromptRequest(**fields)
    assert [error["loc"][0] for error in caught.value.errors()] == [named]
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"model_tier": "sora3"}, "model_tier"),
        ({"aspect_ratio": "square"}, "aspect_ratio"),
        ({"duration": 12}, "duration"),
        ({"mode": "imageToVideo"}, "image_urls"),
        ({"image_urls": ["ftp://example.com/a.png"]}, "image_urls"),
    ],
)
def test_video_options_refuse_invalid_input_naming_the_field(
    fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        VideoOptions(**fields)
    assert caught.value.errors()[0]["loc"][0] == named


def test_video_request_needs_a_prompt() -> None:
    with pytest.raises(ValidationError) as caught:
        VideoOptions().with_prompt("   ")
    assert caught.value.errors()[0]["loc"][0] == "prompt"


def test_topic_is_trimmed_and_500_characters_are_allowed() -> None:
    assert PromptRequest(topic="  fox  ").topic == "fox"
    assert len(PromptRequest(topic="x" * 500).topic) == 500
    assert PromptRequest(topic=" " + "x" * 500 + " ").topic == "x" * 500


def test_prompt_wire_format_sends_duration_as_a_number() -> None:
    body = PromptRequest(
        topic="fox", technique=Technique.POV, duration=15, locale=Locale.JA
    ).to_wire()
    assert body == {
        "topic": "fox",
        "mode": "textToVideo",
        "technique": "pov",
        "duration": 15,
        "model": "google/gemini-3-flash-preview",
        "locale": "ja",
    }


def test_video_wire_format_sends_duration_as_a_string() -> None:
    request = VideoOptions(
        mode="imageToVideo", image_urls=[IMAGE], model_tier="sora2-pro-high", duration=15
    ).with_prompt("a fox")
    assert request.to_wire() == {
        "prompt": "a fox",
        "mode": "imageToVideo",
        "modelTier": "sora2-pro-high",
        "aspectRatio": "portrait",
        "videoDuration": "15",
        "imageUrls": [IMAGE],
    }


@pytest.mark.parametrize(("tier", "duration"), list(VIDEO_COST))
def test_cost_comes_from_the_contract_table(tier: ModelTier, duration: int) -> None:
    options = VideoOptions(model_tier=tier, duration=duration)
    assert options.cost == VIDEO_COST[(tier, duration)]


def test_every_valid_combination_is_accepted() -> None:
    for technique in Technique:
        for locale in Locale:
            for duration in (10, 15):
                PromptRequest(topic="fox", technique=technique, locale=locale, duration=duration)
    assert isinstance(VideoRequest(prompt="p"), VideoRequest)


@pytest.mark.parametrize("status", ["processing", "pending", "generating", "queued", ""])
def test_any_status_but_completed_or_failed_is_still_running(status: str) -> None:
    assert VideoStatus(task_id="t", status=status).is_running


def test_completed_without_a_url_is_not_treated_as_done() -> None:
    assert VideoStatus(task_id="t", status="completed").is_running
    assert VideoStatus(task_id="t", status="completed", video_url="https://v/x.mp4").is_completed
    assert VideoStatus(task_id="t", status="failed").is_failed


@pytest.mark.parametrize("task_id", ["../etc/passwd", "a/b", "..", ".hidden", "", "x" * 200])
def test_unsafe_task_ids_never_become_file_names(task_id: str) -> None:
    with pytest.raises(ValueError, match="task_id"):
        video_filename(task_id)


def test_task_ids_name_their_video_file() -> None:
    assert video_filename("task_abc123") == "task_abc123.mp4"
