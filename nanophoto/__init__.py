"""A typed async client for NanoPhoto.AI's Sora 2 API. Imports nothing from Prefect."""

from nanophoto.client import DownloadedVideo, NanoPhotoClient
from nanophoto.errors import NanoPhotoError
from nanophoto.models import PromptRequest, VideoOptions, VideoRequest, VideoStatus
from nanophoto.settings import NanoPhotoSettings, resolve_api_key

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
