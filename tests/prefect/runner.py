"""Flow runs in a process of their own, for tests that need a second worker or a kill.

``python -m tests.prefect.runner '<json>'`` runs ``prompt_to_video`` (or
``topic_to_video``) for each of ``runs``, ``concurrency`` at a time, against
the Prefect server and the simulator its environment names, and prints one
JSON line per run as it ends: its idempotency key, its final state, its error
code and its task id. With ``hog_slots``, it first takes that many slots of
this process's request budget, so its submits wait for the next window (a run
"queued for a slot", for a kill).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from prefect import State

from flows.video import prompt_to_video, topic_to_video
from nanophoto.errors import NanoPhotoError
from nanophoto.ratelimit import Priority
from nanophoto.settings import NanoPhotoSettings
from tasks.ratelimit import shared_limiter


async def _one(flow: str, parameters: dict[str, Any]) -> dict[str, Any]:
    runner = prompt_to_video if flow == "prompt_to_video" else topic_to_video
    state: State[Any] = await runner(**parameters, return_state=True)
    line: dict[str, Any] = {"key": parameters.get("idempotency_key"), "state": state.type.value}
    try:
        result = await state.aresult()
        line["task_id"] = result.task_id
    except NanoPhotoError as error:
        line["code"] = error.code
    except Exception as error:
        line["code"] = type(error).__name__
    return line


async def main(spec: dict[str, Any]) -> None:
    limiter = shared_limiter(NanoPhotoSettings())
    for _ in range(int(spec.get("hog_slots", 0))):
        await limiter.acquire(Priority.CHECK)
    print(json.dumps({"ready": True}), flush=True)
    gate = asyncio.Semaphore(int(spec.get("concurrency", 5)))

    async def run(parameters: dict[str, Any]) -> None:
        async with gate:
            print(
                json.dumps(await _one(spec.get("flow", "prompt_to_video"), parameters)), flush=True
            )

    await asyncio.gather(*(run(p) for p in spec["runs"]))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
