"""Prefect flows: a topic or a ready prompt becomes a finished Sora 2 video."""

from flows.video import prompt_to_video, resume_video, topic_to_video

__all__ = ["prompt_to_video", "resume_video", "topic_to_video"]
