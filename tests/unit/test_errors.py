"""An error keeps what it says across pickling: Prefect pickles exceptions into states."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import cloudpickle
import pytest

from nanophoto.errors import (
    APIError,
    GatewayError,
    InsufficientCreditsError,
    NanoPhotoError,
    RateLimitError,
    SubmitOutcomeUnknownError,
)


def _credits_error() -> NanoPhotoError:
    error = InsufficientCreditsError("not enough credits", status=402)
    error.required_credits = 2
    return error


def _rate_limit_error() -> NanoPhotoError:
    error = RateLimitError("over the limit", status=429)
    error.retry_after = 30.0
    return error


ERRORS: list[Callable[[], NanoPhotoError]] = [
    lambda: APIError("an unknown code", code="SOMETHING_NEW", status=418),
    lambda: GatewayError("cdn page", status=524),
    lambda: SubmitOutcomeUnknownError("may have started", status=500, retryable=False),
    _credits_error,
    _rate_limit_error,
]


@pytest.mark.parametrize("make", ERRORS)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_an_error_keeps_its_code_status_and_flags_across_pickling(
    make: Callable[[], NanoPhotoError], dumps: Callable[[object], bytes]
) -> None:
    error = make()
    copy = pickle.loads(dumps(error))
    assert type(copy) is type(error)
    assert (copy.code, copy.status, copy.retryable, copy.may_have_started) == (
        error.code,
        error.status,
        error.retryable,
        error.may_have_started,
    )
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
