"""The simulator's command line: ``python -m nanophoto_simulator`` and ``sora2 sandbox``.

Example: ``python -m nanophoto_simulator --port 8765 --time-scale 0.01``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys

from nanophoto_simulator.config import (
    DEFAULT_CREDITS,
    DEFAULT_KEY,
    SANDBOX_PORT,
    Faults,
    SimulatorConfig,
)
from nanophoto_simulator.server import Simulator

_DEFAULTS = SimulatorConfig()


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


def build_parser(prog: str = "python -m nanophoto_simulator") -> argparse.ArgumentParser:
    """The simulator's options; ``sora2 sandbox`` adds its own defaults on top."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A local server that speaks the NanoPhoto Sora 2 API contract.",
        epilog=f"Example: {prog} --port {SANDBOX_PORT} --time-scale 0.01 "
        "--key demo-key=100 --fault gateway_error=0.1",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument(
        "--port", type=int, default=SANDBOX_PORT, help="API port, 0 for any (default: %(default)s)"
    )
    parser.add_argument("--media-port", type=int, default=0, help="video host port (0: any)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=_DEFAULTS.time_scale,
        help="real seconds per simulated second, 0.01 for 100x faster (default: %(default)s)",
    )
    parser.add_argument(
        "--key",
        type=_key,
        action="append",
        default=[],
        help=f"KEY=CREDITS, repeatable (default: {DEFAULT_KEY}={DEFAULT_CREDITS})",
    )
    parser.add_argument(
        "--generation-seconds",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=_DEFAULTS.generation_seconds,
        help="the range generation times are drawn from (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=_DEFAULTS.rate_limit,
        help="requests per hour per key (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="replayable randomness")
    parser.add_argument(
        "--edge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse, as NanoPhoto's CDN edge may, requests without a browser-like "
        "User-Agent or an Origin, with a 403 HTML page (default: on)",
    )
    parser.add_argument(
        "--failed-http-status",
        type=int,
        choices=[200, 500],
        default=_DEFAULTS.failed_http_status,
        help="the HTTP status of a failed video's status answer; the contract allows "
        "both (default: %(default)s)",
    )
    parser.add_argument(
        "--video-url-delay",
        type=float,
        default=_DEFAULTS.video_url_delay_seconds,
        metavar="SECONDS",
        help="how long a finished video's URL answers 404, as a CDN not caught up "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--tls",
        nargs=2,
        metavar=("CERT", "KEY"),
        default=None,
        help="serve https with this certificate and key (PEM files): how workers on other "
        "hosts reach it, since the key goes over https unless to this machine",
    )
    parser.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        help="NAME=PROBABILITY, repeatable; NAME is a field of Faults",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The simulator's command-line options."""
    return build_parser().parse_args(argv)


async def _serve(config: SimulatorConfig, args: argparse.Namespace) -> None:
    simulator = Simulator(config)
    tls = None
    if args.tls:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*args.tls)
    await simulator.start(args.host, args.port, args.media_port, tls)
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


def config_from(args: argparse.Namespace) -> SimulatorConfig:
    """The simulator's configuration from its command-line options."""
    return SimulatorConfig(
        keys=dict(args.key) or {DEFAULT_KEY: DEFAULT_CREDITS},
        time_scale=args.time_scale,
        generation_seconds=tuple(args.generation_seconds),
        rate_limit=args.rate_limit,
        seed=args.seed,
        edge=args.edge,
        failed_http_status=args.failed_http_status,
        video_url_delay_seconds=args.video_url_delay,
        faults=Faults(**dict(args.fault)),
    )


def main(argv: list[str] | None = None) -> int:
    """Start the simulator and serve until interrupted."""
    args = parse_args(argv)
    asyncio.run(_serve(config_from(args), args))
    return 0
