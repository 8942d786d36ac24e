"""A typed async client for NanoPhoto.AI's Sora 2 API. Imports nothing from Prefect.

The names below are imported on first use: ``import nanophoto.contract`` (or
``nanophoto.lite``) must not pay for httpx and pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanophoto.client import DownloadedVideo, NanoPhotoClient
    from nanophoto.errors import NanoPhotoError
    from nanophoto.models import PromptRequest, VideoOptions, VideoRequest, VideoStatus
    from nanophoto.settings import NanoPhotoSettings, resolve_api_key

_HOMES = {
    "DownloadedVideo": "nanophoto.client",
    "NanoPhotoClient": "nanophoto.client",
    "NanoPhotoError": "nanophoto.errors",
    "NanoPhotoSettings": "nanophoto.settings",
    "PromptRequest": "nanophoto.models",
    "VideoOptions": "nanophoto.models",
    "VideoRequest": "nanophoto.models",
    "VideoStatus": "nanophoto.models",
    "resolve_api_key": "nanophoto.settings",
}

__all__ = [
    "DownloadedVideo",
    "NanoPhotoClient",
    "NanoPhotoError",
    "NanoPhotoSettings",
    "PromptRequest",
    "VideoOptions",
    "VideoRequest",
    "VideoStatus",
    "resolve_api_key",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'nanophoto' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
