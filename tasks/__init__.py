"""Prefect tasks wrapping each NanoPhoto call: prompt, submit, status, download."""

from tasks.video import check_video_status, download_video, generate_prompt, submit_video

__all__ = ["check_video_status", "download_video", "generate_prompt", "submit_video"]
