"""The one back-off rule for every retried call.

Capped exponential back-off with jitter, as the OpenAI SDK does it:
``min(base * 2**n, cap) * (1 - 0.25 * random())``, except that a
``Retry-After`` the server sent is honoured (up to ``max_retry_after``).
Which errors may be retried is the caller's decision: it depends on the call.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from nanophoto.errors import NanoPhotoError, RateLimitError


class RetryPolicy(NamedTuple):
    """How often and how long to back off before calling again (a tuple: no import of
    ``dataclasses`` for ``sora2 status``)."""

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    rate_limit_delay: float = 15.0

    def delay(self, retry: int, error: NanoPhotoError) -> float:
        """Seconds to wait before retry number ``retry`` (0-based) after ``error``.

        A 429 without ``Retry-After`` waits longer than other errors: the
        budget is per hour, so half a second later it is still spent.
        """
        if isinstance(error, RateLimitError):
            if error.retry_after is not None:
                return min(float(error.retry_after), self.max_retry_after)
            return min(self.rate_limit_delay * 2.0**retry, self.max_retry_after)
        backoff = min(self.base_delay * 2.0**retry, self.max_delay)
        return backoff * (1 - 0.25 * random.random())


def retry_note(call: str, error: NanoPhotoError, retry: int, max_retries: int, delay: float) -> str:
    """What a person is told when ``call`` is tried again (``retry`` counts from 1)."""
    return f"{call} failed with {error.code}; retry {retry} of {max_retries} in {delay:.1f} s"
