"""The run forms: a description for every field, a dropdown for every choice.

Prefect builds each deployment's form from the flow's parameter schema; the
options' descriptions come from their fields, written once (``flows.forms``).
"""

from __future__ import annotations

from typing import Any

import pytest
from prefect import Flow
from prefect.utilities.callables import parameter_schema

from flows import batch_of_videos, prompt_to_video, resume_video, topic_to_video
from flows.forms import OPTION_FIELDS

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
