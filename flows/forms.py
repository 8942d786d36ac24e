"""The run forms' descriptions: each parameter described once.

Prefect takes the description of a flow's top-level parameter only from the
``Args:`` of the flow's docstring (nested models keep their ``Field``
descriptions). So the flows keep flat parameters, as users call them, and
``described`` writes the ``Args:`` line of every option parameter from the
option's own field (``nanophoto.models``): a description is written once,
and a new option needs no docstring edit.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any, Final, TypeVar

from prefect.utilities.callables import parameter_docstrings
from pydantic.fields import FieldInfo

from nanophoto.models import PromptOptions, PromptRequest, VideoOptions, VideoRequest

F = TypeVar("F", bound=Callable[..., Any])

OPTION_FIELDS: Final[dict[str, FieldInfo]] = {
    **PromptOptions.model_fields,
    **VideoOptions.model_fields,
    "topic": PromptRequest.model_fields["topic"],
    "prompt": VideoRequest.model_fields["prompt"],
}
# The flows' own parameters that several flows share, described once too.
SHARED: Final[dict[str, str]] = {
    "schedule": "When to check the video, in NanoPhoto's seconds after submit: first "
    "check, interval, and when to stop watching.",
    "output_dir": "Where to save the video, named by its task id: a folder inside the "
    "worker's output folder (SORA2_OUTPUT_ROOT, by default the project's videos/; . is that "
    "folder, and no path leads out of it), or a remote fsspec URL (s3://bucket/videos). "
    "Empty: no download.",
    "idempotency_key": "Runs with the same key make one video, paid once: a rerun resumes "
    "the video already submitted instead of paying again. 1 to 200 letters, digits and "
    "the characters _ . : - (no spaces). Empty: this flow run's id (so a retry of this "
    "run resumes it).",
    "resubmit_unknown_up_to_credits": "For a submit whose outcome is unknown (it may have "
    "reached NanoPhoto before its answer was lost): send it again only if the video costs "
    "at most this many credits, and report it as possibly charged twice. 0 (the default): "
    "never; the submissions ledger says how to resolve or release it.",
}
_WIDTH: Final = 88


def described(function: F) -> F:
    """Give ``function``'s docstring an ``Args:`` line for every parameter.

    The ``Args:`` section is rebuilt in signature order: a parameter described
    by hand keeps its text; an option gets its field's description, a shared
    parameter its ``SHARED`` one. A parameter with none is an error.
    """
    doc = inspect.getdoc(function) or ""
    by_hand = parameter_docstrings(doc)
    head, returns = doc, ""
    if "\nReturns:" in doc:
        head, _, after = doc.partition("\nReturns:")
        returns = "Returns:" + after
    head = head.partition("\nArgs:\n")[0]
    lines = []
    for name in inspect.signature(function).parameters:
        text = by_hand.get(name)
        if text is None and name in OPTION_FIELDS:
            text = OPTION_FIELDS[name].description
        text = text or SHARED.get(name)
        if text is None:
            raise TypeError(f"{function.__name__}: parameter {name!r} has no description")
        lines += textwrap.wrap(
            f"{name}: {' '.join(text.split())}",
            width=_WIDTH,
            initial_indent="    ",
            subsequent_indent="        ",
            break_on_hyphens=False,
        )
    document = f"{head.rstrip()}\n\nArgs:\n" + "\n".join(lines)
    if returns:
        document += "\n\n" + returns.strip("\n")
    function.__doc__ = document + "\n"
    return function
