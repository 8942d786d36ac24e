"""Property-based: every invalid input is refused naming its field, before any
request; every valid input is accepted. For the flow parameters (through
Prefect's own parameter validation, then the flow's first lines) and for the
``sora2 submit`` arguments (against the simulator's ledger)."""

from __future__ import annotations

import io
import os
import re
from typing import Any
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prefect.exceptions import ParameterTypeError
from pydantic import ValidationError

from flows.video import topic_to_video
from nanophoto.contract import (
    MAX_IMAGE_URLS,
    MIN_STATUS_CHECK_INTERVAL_S,
    AspectRatio,
    Locale,
    Mode,
    ModelTier,
    Technique,
)
from nanophoto.models import PromptRequest
from nanophoto_simulator import DEFAULT_KEY, SimulatorConfig, SimulatorThread
from sora2.cli import main

URLS = [
    "https://example.com/a.png",
    "http://cdn.example.org/b.jpg",
    "  https://example.com/c.png ",
    "/home/me/cat.png",
    "file:///tmp/cat.png",
    "data:image/png;base64,iVBORw0KGgo=",
    "ftp://example.com/a.png",
    "https://",
    "example.com/a.png",
]


def choice(valid: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(valid), st.text(max_size=12))


def trimmed(text: str) -> str:
    """The contract's "after trimming": any whitespace, and invisible marks (BOM, ZWSP)."""
    return text.strip().strip("\ufeff\u200b").strip()


def url_ok(url: str) -> bool:
    parts = urlsplit(url.strip())
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


inputs = st.fixed_dictionaries(
    {
        "topic": st.one_of(st.text(max_size=520), st.just("x" * 500), st.just(" " * 3)),
        "technique": choice([t.value for t in Technique]),
        "locale": choice([loc.value for loc in Locale]),
        "duration": st.sampled_from([10, 15, 12, 0, -10, 20]),
        "mode": choice([m.value for m in Mode]),
        "image_urls": st.lists(st.sampled_from(URLS), max_size=MAX_IMAGE_URLS + 2),
        "model_tier": choice([t.value for t in ModelTier]),
        "aspect_ratio": choice([a.value for a in AspectRatio]),
    }
)


def invalid_fields(values: dict[str, Any]) -> set[str]:
    """The oracle: which fields the contract refuses."""
    bad = set()
    if not 1 <= len(trimmed(values["topic"])) <= 500:
        bad.add("topic")
    for name, enum in (
        ("technique", Technique),
        ("locale", Locale),
        ("mode", Mode),
        ("model_tier", ModelTier),
        ("aspect_ratio", AspectRatio),
    ):
        if values[name] not in {e.value for e in enum}:
            bad.add(name)
    if values["duration"] not in (10, 15):
        bad.add("duration")
    urls = values["image_urls"]
    if len(urls) > MAX_IMAGE_URLS or not all(map(url_ok, urls)):
        bad.add("image_urls")
    if values["mode"] == Mode.IMAGE_TO_VIDEO and not urls:
        bad.add("image_urls")
    return bad


def refused_fields(values: dict[str, Any]) -> set[str]:
    """What the flow refuses before its first request, and which fields it names."""
    try:
        checked = topic_to_video.validate_parameters(values)
    except ParameterTypeError as error:
        # Prefect lists each bad parameter as " - name: message" or " - name.0: ...".
        return set(re.findall(r"^ - ([a-z_]+)[.:]", str(error), flags=re.MULTILINE))
    try:  # the flow's first line: the rules a schema cannot hold, by the flow's own builder
        PromptRequest.pick(checked)
    except ValidationError as error:
        return {str(e["loc"][0]) for e in error.errors()}
    return set()


@settings(max_examples=300, deadline=None)
@given(inputs)
def test_flow_parameters_are_refused_naming_every_bad_field_and_valid_ones_pass(
    values: dict[str, Any],
) -> None:
    expected = invalid_fields(values)
    refused = refused_fields(values)
    if expected:
        assert refused, f"accepted invalid input {values}"
        assert refused <= expected, f"named {refused}, expected among {expected}"
    else:
        assert refused == set(), f"refused valid input {values}: {refused}"


FLAG_OF = {
    "mode": "--mode",
    "image_urls": "--image-url",
    "model_tier": "--model-tier",
    "aspect_ratio": "--aspect-ratio",
    "duration": "--video-duration",
    "interval": "--status-check-interval",
    "max_wait": "--max-wait",
    "prompt": "--prompt",
}

cli_inputs = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            st.text(min_size=1, max_size=40).filter(lambda t: not t.startswith("-")), st.just("   ")
        ),
        "mode": choice([m.value for m in Mode]).filter(lambda t: not t.startswith("-")),
        "image_urls": st.lists(st.sampled_from(URLS), max_size=MAX_IMAGE_URLS + 2),
        "model_tier": choice([t.value for t in ModelTier]).filter(lambda t: not t.startswith("-")),
        "aspect_ratio": choice([a.value for a in AspectRatio]).filter(
            lambda t: not t.startswith("-")
        ),
        "duration": st.sampled_from(["10", "15", "12", "0"]),
        "interval": st.sampled_from(["20", "5", "4.9", "0.5", "0", "-1", "inf", "nan"]),
        "max_wait": st.sampled_from(["1200", "30", "0", "-5", "inf"]),
    }
)


def cli_invalid(values: dict[str, Any]) -> set[str]:
    bad = set()
    if not trimmed(values["prompt"]):
        bad.add("prompt")
    for name, enum in (("mode", Mode), ("model_tier", ModelTier), ("aspect_ratio", AspectRatio)):
        if values[name] not in {e.value for e in enum}:
            bad.add(name)
    if values["duration"] not in ("10", "15"):
        bad.add("duration")
    urls = values["image_urls"]
    if (
        len(urls) > MAX_IMAGE_URLS
        or not all(map(url_ok, urls))
        or (values["mode"] == Mode.IMAGE_TO_VIDEO and not urls)
    ):
        bad.add("image_urls")
    interval, max_wait = float(values["interval"]), float(values["max_wait"])
    if not MIN_STATUS_CHECK_INTERVAL_S <= interval < float("inf"):  # nan fails too
        bad.add("interval")
    if not 0 < max_wait < float("inf"):
        bad.add("max_wait")
    return bad


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cli_inputs)
def test_submit_arguments_exit_2_naming_the_flag_or_submit_exactly_once(
    values: dict[str, Any],
) -> None:
    with SimulatorThread(SimulatorConfig(time_scale=0.01, rate_limit=10_000)) as sim:
        argv = [
            "submit",
            "--prompt",
            values["prompt"],
            "--mode",
            values["mode"],
            "--model-tier",
            values["model_tier"],
            "--aspect-ratio",
            values["aspect_ratio"],
            "--video-duration",
            values["duration"],
            "--status-check-interval",
            values["interval"],
            "--max-wait",
            values["max_wait"],
            "--api-key",
            DEFAULT_KEY,
            "--timeout",
            "10",
        ]
        for url in values["image_urls"]:
            argv += ["--image-url", url]
        err = io.StringIO()
        os.environ["NANOPHOTO_BASE_URL"] = sim.base_url
        try:
            code = main(argv, stdout=io.StringIO(), stderr=err)
        finally:
            del os.environ["NANOPHOTO_BASE_URL"]
        expected = cli_invalid(values)
        ledger = sim.snapshot()
    if expected:
        assert code == 2, f"accepted {argv}"
        assert any(FLAG_OF[name] in err.getvalue() for name in expected), err.getvalue()
        assert ledger["total_requests"] == 0
    else:
        assert code == 0, err.getvalue()
        assert ledger["submits"] == 1
