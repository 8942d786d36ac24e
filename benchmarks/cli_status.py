"""How fast ``sora2 status`` answers, against a standard-library client of the same call.

Runs the installed ``sora2`` console script and ``benchmarks/stdlib_status.py``
(the published tool's status call, with the standard library alone) against
the simulator, alternately, ``RUNS`` times each: the whole process, start to
exit. Prints both medians and their ratio (goal: 1.5 or less). Both print the
same document; the benchmark checks that too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from nanophoto_simulator import DEFAULT_KEY, SimulatorConfig, SimulatorThread

RUNS = 20


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one run, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stdout


def main() -> int:
    """Print the timings and the ratio."""
    sora2 = Path(sys.executable).with_name("sora2")
    baseline = Path(__file__).with_name("stdlib_status.py")
    with SimulatorThread(SimulatorConfig(time_scale=0.01)) as sim:
        task_id = httpx.post(
            f"{sim.base_url}/api/sora-2/generate",
            json={"prompt": "a fox", "mode": "textToVideo"},
            headers={"Authorization": f"Bearer {DEFAULT_KEY}"},
        ).json()["taskId"]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NANOPHOTO_")},
            "NANOPHOTO_BASE_URL": sim.base_url,
            "NANOPHOTO_API_KEY": DEFAULT_KEY,
        }
        ours = [str(sora2), "status", "--task-id", task_id]
        theirs = [sys.executable, str(baseline), task_id]
        _, our_out = timed(ours, env)  # warm the caches
        _, their_out = timed(theirs, env)
        if json.loads(our_out) != json.loads(their_out):
            raise SystemExit(f"the two printed different documents:\n{our_out}\n{their_out}")
        our_times, their_times = [], []
        for _ in range(RUNS):  # alternately: a busy moment slows both alike
            our_times.append(timed(ours, env)[0])
            their_times.append(timed(theirs, env)[0])
    ours_median, theirs_median = statistics.median(our_times), statistics.median(their_times)
    print(
        f"sora2 status, {RUNS} runs each, alternating with a standard-library client of the "
        f"same call:\n"
        f"  standard-library client (baseline): median {theirs_median * 1000:.0f} ms, "
        f"worst {max(their_times) * 1000:.0f} ms\n"
        f"  sora2 status:                       median {ours_median * 1000:.0f} ms, "
        f"worst {max(our_times) * 1000:.0f} ms\n"
        f"  ratio (goal <= 1.5): {ours_median / theirs_median:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
