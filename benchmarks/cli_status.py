"""How fast ``sora2 status`` answers: the whole process, start to exit.

Runs the installed ``sora2`` console script against the simulator N times
and prints the median and worst wall time. Commands that need no flow run
must not start (or import) Prefect.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from nanophoto_simulator import DEFAULT_KEY, SimulatorConfig, SimulatorThread

RUNS = 10


def main() -> int:
    """Print the timings."""
    sora2 = Path(sys.executable).with_name("sora2")
    with SimulatorThread(SimulatorConfig(time_scale=0.01)) as sim:
        task_id = httpx.post(
            f"{sim.base_url}/api/sora-2/generate",
            json={"prompt": "a fox", "mode": "textToVideo"},
            headers={"Authorization": f"Bearer {DEFAULT_KEY}"},
        ).json()["taskId"]
        env = {**os.environ, "NANOPHOTO_BASE_URL": sim.base_url, "NANOPHOTO_API_KEY": DEFAULT_KEY}
        command = [str(sora2), "status", "--task-id", task_id]
        subprocess.run(command, env=env, capture_output=True, check=True)  # warm the caches
        times = []
        for _ in range(RUNS):
            started = time.perf_counter()
            subprocess.run(command, env=env, capture_output=True, check=True)
            times.append(time.perf_counter() - started)
    print(
        f"sora2 status, {RUNS} runs on a warm machine: median {statistics.median(times):.3f} s,"
        f" worst {max(times):.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
