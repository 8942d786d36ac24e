"""Serve every flow from this one process: no work pool, no worker needed.

``make serve`` (with ``PREFECT_API_URL`` set, or Prefect's embedded server)
registers the deployments and runs whatever is triggered from the UI or API
until you press Ctrl-C.
"""

from __future__ import annotations

import asyncio
import sys

from prefect import aserve

from flows.video import prompt_to_video, resume_video, topic_to_video


async def serve() -> None:
    """Register the on-demand deployments and run them here."""
    await aserve(
        await topic_to_video.ato_deployment(name="served", tags=["sora2", "served"]),
        await prompt_to_video.ato_deployment(name="served", tags=["sora2", "served"]),
        await resume_video.ato_deployment(name="served", tags=["sora2", "served"]),
        limit=4,
    )


def main() -> int:
    """Serve until interrupted."""
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
