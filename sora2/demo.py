"""The demo: a topic becomes an MP4 on disk, on the simulator and Prefect's embedded server.

It starts the NanoPhoto simulator (100x faster than real time by default),
runs the ``topic-to-video`` flow on Prefect's embedded SQLite server with the
watch schedule compressed by the same factor, and prints the task id, the
credits used and the path of the downloaded video.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from nanophoto_simulator.config import SANDBOX_TIME_SCALE, SimulatorConfig

DEMO_KEY = "demo-key"
DEMO_CREDITS = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options."""
    parser = argparse.ArgumentParser(
        prog="python -m sora2.demo",
        description="Topic to finished Sora 2 video, on the local NanoPhoto simulator.",
    )
    parser.add_argument("--topic", default="A red fox crossing a snowy forest at dawn")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=SANDBOX_TIME_SCALE,
        help="real seconds per simulated second (0.01: a 4-minute video takes 2.4 s)",
    )
    parser.add_argument("--output-dir", default="videos")
    return parser.parse_args(argv)


def demo_config(args: argparse.Namespace) -> SimulatorConfig:
    """The demo's simulator: its edge on, as in the sandbox, so the demo's path is the one
    NanoPhoto's edge would see."""
    return SimulatorConfig(keys={DEMO_KEY: DEMO_CREDITS}, time_scale=args.time_scale, edge=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = parse_args(argv)
    # Before Prefect is imported: a private embedded server, and no network.
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect/demo").resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The first start migrates a new SQLite database: slow on a 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.pop("PREFECT_API_URL", None)

    from nanophoto.watch import WatchSchedule
    from nanophoto_simulator import SimulatorThread

    config = demo_config(args)
    with SimulatorThread(config) as simulator:
        os.environ["NANOPHOTO_BASE_URL"] = simulator.base_url
        os.environ["NANOPHOTO_API_KEY"] = DEMO_KEY
        # NanoPhoto's schedule and hourly budget, compressed like the simulator's clock.
        os.environ["NANOPHOTO_TIME_SCALE"] = str(args.time_scale)
        print(
            f"NanoPhoto simulator at {simulator.base_url} "
            f"(time scale {args.time_scale:g}, {DEMO_CREDITS} demo credits)",
            flush=True,
        )
        from flows.video import topic_to_video
        from sora2.commands import output_folder_for_flow
        from tasks.ratelimit import create_rate_limit

        # The embedded server keeps leases in memory: slots of an earlier demo are free.
        print(asyncio.run(create_rate_limit(config.rate_limit, reset=True)), flush=True)

        result = asyncio.run(
            topic_to_video(
                topic=args.topic,
                schedule=WatchSchedule(),
                output_dir=output_folder_for_flow(args.output_dir),
            )
        )
        balance = simulator.snapshot()["credits"][DEMO_KEY]["balance"]

    path = Path(result.video_path or "")
    print()
    print(f"task:        {result.task_id}")
    print(
        f"credits:     {result.credits_used} used "
        f"(prompt {result.prompt_credits} + video {result.video_credits}), {balance} left"
    )
    print(f"generation:  {result.generation_time:g} simulated seconds")
    print(
        f"video:       {path.resolve()} ({result.video_size} bytes, sha256 {result.video_sha256})"
    )
    return 0 if path.is_file() and path.stat().st_size > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
