"""The run forms: a description for every field, a dropdown for every choice.

Prefect builds each deployment's form from the flow's parameter schema; the
options' descriptions come from their fields, written once (``flows.forms``).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from prefect import Flow
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel

from flows import batch_of_videos, prompt_to_video, resume_video, topic_to_video
from flows.forms import OPTION_FIELDS
from nanophoto.models import PromptRequest, VideoRequest, fingerprint

FLOWS: list[Flow[Any, Any]] = [topic_to_video, prompt_to_video, resume_video, batch_of_videos]


def _properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every field of the form, the nested models' included."""
    fields = [(name, value) for name, value in schema["properties"].items()]
    for model, definition in schema.get("definitions", {}).items():
        fields += [
            (f"{model}.{name}", value) for name, value in definition.get("properties", {}).items()
        ]
    return fields


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_field_of_every_run_form_has_a_description(flow: Flow[Any, Any]) -> None:
    schema = parameter_schema(flow).model_dump()
    missing = [name for name, value in _properties(schema) if not value.get("description")]
    assert not missing
    for name, value in schema["properties"].items():
        if name in OPTION_FIELDS:  # one description, from the option's field
            described = " ".join(str(OPTION_FIELDS[name].description).split())
            assert " ".join(value["description"].split()) == described


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_choice_is_a_dropdown(flow: Flow[Any, Any]) -> None:
    schema = parameter_schema(flow).model_dump()
    choices = {"technique", "locale", "mode", "model_tier", "aspect_ratio", "duration"}
    for name, value in _properties(schema):
        if name.rsplit(".", 1)[-1] in choices:
            target = value
            if "$ref" in value or "allOf" in value:
                ref = value.get("$ref") or value["allOf"][0]["$ref"]
                target = schema["definitions"][ref.rsplit("/", 1)[-1]]
            assert target.get("enum"), f"{flow.name}: {name} is not a dropdown"


@pytest.mark.parametrize(
    ("flow", "request_model"),
    [(topic_to_video, PromptRequest), (prompt_to_video, VideoRequest)],
    ids=lambda f: getattr(f, "name", getattr(f, "__name__", "")),
)
def test_every_option_of_the_request_is_a_parameter_of_its_flow(
    flow: Flow[Any, Any], request_model: type[BaseModel]
) -> None:
    """A new option field that a flow forgot would silently take its default."""
    parameters = set(inspect.signature(flow.fn).parameters)
    assert set(request_model.model_fields) <= parameters


def test_every_option_changes_the_fingerprint() -> None:
    """An idempotency key reused for another video is noticed, whatever option differs."""
    topic = PromptRequest(topic="A fox")
    prompt = VideoRequest(prompt="A fox at dawn")
    other = {
        "mode": "imageToVideo",
        "image_urls": ["https://example.com/fox.png"],
        "model_tier": "sora2-pro-standard",
        "aspect_ratio": "landscape",
        "duration": 15,
        "technique": "time-lapse",
        "locale": "fr",
        "prompt_model": "another/model",
        "topic": "A hare",
        "prompt": "A hare at dawn",
    }
    for job in (topic, prompt):
        assert set(type(job).model_fields) <= set(other)  # every field is tried below
        for name in type(job).model_fields:
            changes = {name: other[name]}
            if name == "mode":
                changes["image_urls"] = other["image_urls"]
            changed = type(job).model_validate({**job.model_dump(), **changes})
            assert fingerprint(changed) != fingerprint(job), name


def test_the_fingerprint_layout_is_that_of_the_records_already_written() -> None:
    """Values computed by the first release's two builders (commit 018855b): a record
    written then must still match the same job."""
    assert fingerprint(PromptRequest(topic="A fox")) == (
        "8814e1587cee2faecf02861c28f6f66e64042cfe1fb0884e479373a536fb9c55"
    )
    assert fingerprint(VideoRequest(prompt="A fox at dawn")) == (
        "1837a707c52668983fda4b0a29128c97fc70c7a98e7a24c345b19281771b038e"
    )
