"""Serve every flow from this one process: no work pool, no worker needed.

``make serve`` registers the block type and the deployments on the server your
Prefect settings name, and runs whatever is triggered from the UI or API until
you press Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import sys

from prefect.runner import Runner

from deployments.setup import HEARTBEAT_S, require_api_url, seal_parameter_schemas
from flows import (
    batch_of_videos,
    batch_part,
    prompt_to_video,
    resume_video,
    submissions,
    topic_to_video,
)
from flows.batch import SERVED
from tasks.credentials import NanoPhotoCredentials


async def serve() -> None:
    """Register the block type and one deployment per flow, and run them here.

    Prefect's ``aserve``, with one step between registering and running: the
    deployments' schemas are sealed, so an undeclared parameter (an ``api_key``)
    is refused before a run exists, as it is for ``make deploy``'s.
    """
    await NanoPhotoCredentials.aregister_type_and_schema()
    tags = ["sora2", SERVED]
    runner = Runner(limit=4, pause_on_shutdown=True)
    flows = (topic_to_video, prompt_to_video, resume_video, batch_of_videos, submissions)
    for each in (*flows, batch_part):  # a batch in parts started here uses batch-part/served
        deployment = await each.ato_deployment(
            name=SERVED, tags=tags, enforce_parameter_schema=True
        )
        await runner.aadd_deployment(deployment)
    await seal_parameter_schemas()
    await runner.start()


def main() -> int:
    """Serve until interrupted."""
    require_api_url()
    # Heartbeats as often as the pool's flow runs send them: the zombie automation takes a
    # run whose heartbeats stop for HEARTBEAT_TIMEOUT_S as crashed.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
