"""Run the simulator: ``python -m nanophoto.simulator --port 8765 --time-scale 0.01``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from nanophoto.simulator.config import DEFAULT_KEY, Faults, SimulatorConfig
from nanophoto.simulator.server import Simulator


def _key(text: str) -> tuple[str, int]:
    key, _, credits = text.partition("=")
    if not key or not credits.isdigit():
        raise argparse.ArgumentTypeError(f"expected KEY=CREDITS, got {text!r}")
    return key, int(credits)


def _fault(text: str) -> tuple[str, float]:
    name, _, chance = text.partition("=")
    if name not in Faults.model_fields:
        raise argparse.ArgumentTypeError(
            f"unknown fault {name!r}; one of {sorted(Faults.model_fields)}"
        )
    try:
        return name, float(chance)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=PROBABILITY, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The simulator's command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m nanophoto.simulator",
        description="A local server that speaks the NanoPhoto Sora 2 API contract.",
        epilog="Example: python -m nanophoto.simulator --port 8765 --time-scale 0.01 "
        "--key demo-key=100 --fault gateway_error=0.1",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="API port (0: any free port)")
    parser.add_argument("--media-port", type=int, default=0, help="video host port (0: any)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="real seconds per simulated second (0.01: 100x faster)",
    )
    parser.add_argument(
        "--key",
        type=_key,
        action="append",
        default=[],
        help=f"KEY=CREDITS, repeatable (default {DEFAULT_KEY}=1000)",
    )
    parser.add_argument(
        "--generation-seconds", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(120.0, 480.0)
    )
    parser.add_argument("--rate-limit", type=int, default=100, help="requests per hour per key")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        help="NAME=PROBABILITY, repeatable; NAME is a field of Faults",
    )
    return parser.parse_args(argv)


async def _serve(config: SimulatorConfig, args: argparse.Namespace) -> None:
    simulator = Simulator(config)
    await simulator.start(args.host, args.port, args.media_port)
    print(
        json.dumps(
            {
                "base_url": simulator.base_url,
                "media_url": simulator.media_url,
                "keys": sorted(config.keys),
                "time_scale": config.time_scale,
            }
        ),
        flush=True,
    )
    key = sorted(config.keys)[0]
    print(
        f"point sora2 and the Prefect workers at it: export NANOPHOTO_BASE_URL="
        f"{simulator.base_url} NANOPHOTO_API_KEY={key} NANOPHOTO_TIME_SCALE={config.time_scale:g}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await simulator.stop()


def main(argv: list[str] | None = None) -> int:
    """Start the simulator and serve until interrupted."""
    args = parse_args(argv)
    config = SimulatorConfig(
        keys=dict(args.key) or {DEFAULT_KEY: 1000},
        time_scale=args.time_scale,
        generation_seconds=tuple(args.generation_seconds),
        rate_limit=args.rate_limit,
        seed=args.seed,
        faults=Faults(**dict(args.fault)),
    )
    asyncio.run(_serve(config, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
