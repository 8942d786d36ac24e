"""Prefect flows: a topic or a ready prompt becomes a finished Sora 2 video, one or many."""

from flows.batch import BatchItem, batch_of_videos, batch_part
from flows.submissions import submissions
from flows.video import prompt_to_video, resume_video, topic_to_video

__all__ = [
    "BatchItem",
    "batch_of_videos",
    "batch_part",
    "prompt_to_video",
    "resume_video",
    "submissions",
    "topic_to_video",
]
