"""The NanoPhoto credentials block, and the client the tasks open with it.

The key is resolved inside each task, in this order: ``NANOPHOTO_API_KEY``,
then the Prefect block (``SORA2_CREDENTIALS_BLOCK``, default ``nanophoto``),
then the OpenClaw file. It is never a flow parameter, a task argument or a
job variable, so it never lands in a run's stored parameters.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from prefect import get_run_logger
from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from pydantic import Field, SecretStr, ValidationError, field_validator

from nanophoto.client import NanoPhotoClient
from nanophoto.errors import ConfigurationError
from nanophoto.lite import check_base_url
from nanophoto.settings import NanoPhotoSettings, current_settings
from tasks.ratelimit import shared_limiter

DEFAULT_BLOCK_NAME: Final = "nanophoto"
BLOCK_NAME_VARIABLE: Final = "SORA2_CREDENTIALS_BLOCK"


class NanoPhotoCredentials(Block):
    """A NanoPhoto.AI API key, stored encrypted by the Prefect server.

    The flows' tasks load it themselves; you never pass it to a flow.

    Example:
        Load the stored block (the tasks do this for you):
        ```python
        from tasks.credentials import NanoPhotoCredentials

        credentials = NanoPhotoCredentials.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "NanoPhoto Credentials"
    _block_type_slug = "nanophoto-credentials"
    _description = "The API key (and optionally the base URL) for NanoPhoto.AI's Sora 2 API."
    _documentation_url = "https://nanophoto.ai/settings/apikeys"  # type: ignore[assignment]

    api_key: SecretStr = Field(
        description="Your NanoPhoto API key, from https://nanophoto.ai/settings/apikeys. "
        "Stored encrypted; never shown again in the UI, logs or run parameters."
    )
    base_url: str | None = Field(
        default=None,
        description="The API's base URL. Leave empty for https://nanophoto.ai. Must be "
        "https, or http only to this machine (localhost, 127.0.0.1), for example the "
        "local simulator: the key would otherwise travel in clear text.",
    )

    @field_validator("base_url")
    @classmethod
    def _https_unless_local(cls, url: str | None) -> str | None:
        return check_base_url(url) if url and url.strip() else None


def block_name() -> str:
    """The credentials block the tasks load: ``$SORA2_CREDENTIALS_BLOCK`` or ``nanophoto``."""
    return os.environ.get(BLOCK_NAME_VARIABLE, "").strip() or DEFAULT_BLOCK_NAME


async def load_credentials(name: str | None = None) -> NanoPhotoCredentials | None:
    """The credentials block, or None if there is none by that name.

    A block that exists but no longer validates is an error, not "absent":
    falling through to another key source could bill another account.
    """
    name = name or block_name()
    try:
        block = await NanoPhotoCredentials.aload(name)
    except (RuntimeError, ValueError) as error:
        # Prefect wraps both causes: a missing document (ObjectNotFound) and one
        # that no longer validates (pydantic's ValidationError).
        if isinstance(error.__cause__, ObjectNotFound):
            return None
        if isinstance(error.__cause__, ValidationError):
            raise ConfigurationError(
                f"the Prefect block nanophoto-credentials/{name} is invalid: "
                f"{_first_problem(error.__cause__)}; fix it in the UI (Blocks) or with "
                "`make deploy ARGS=--store-key`. Nothing was sent."
            ) from None
        raise
    return block if isinstance(block, NanoPhotoCredentials) else None


def _first_problem(error: ValidationError) -> str:
    detail = error.errors()[0]
    field = ".".join(str(part) for part in detail["loc"]) or "block"
    return f"{field}: {detail['msg'].removeprefix('Value error, ')}"


# One block load per flow run and block name, not one per task (a video's
# status checks would otherwise each read the block).
_per_run: dict[tuple[str, str], NanoPhotoCredentials | None] = {}


async def _credentials_for_this_run() -> NanoPhotoCredentials | None:
    key = (str(flow_run.id or ""), block_name())
    if not key[0] or key not in _per_run:
        if len(_per_run) > 256:
            _per_run.clear()
        _per_run[key] = await load_credentials()
    return _per_run[key]


@asynccontextmanager
async def open_client() -> AsyncIterator[NanoPhotoClient]:
    """A client whose key is resolved here, inside the task, held to the shared budget.

    The block is loaded only when the environment has no key, so a worker
    configured by environment makes no extra API call per task.
    """
    settings = current_settings()
    extra: tuple[tuple[str, SecretStr | None], ...] = ()
    if settings.api_key is None or not settings.api_key.get_secret_value().strip():
        block = await _credentials_for_this_run()
        if block is not None:
            extra = ((f"the Prefect block nanophoto-credentials/{block_name()}", block.api_key),)
            if block.base_url and "NANOPHOTO_BASE_URL" not in os.environ:
                # Built anew, never copied: the https-unless-loopback rule runs again.
                settings = NanoPhotoSettings(base_url=block.base_url)
        else:
            extra = ((f"the Prefect block nanophoto-credentials/{block_name()} (absent)", None),)
    async with NanoPhotoClient(
        settings=settings,
        logger=get_run_logger(),
        extra_key_sources=extra,
        limiter=shared_limiter(settings),
    ) as client:
        yield client
