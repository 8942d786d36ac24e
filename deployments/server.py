"""Start a local Prefect server for sora2-flows: ``make server`` (``python -m deployments.server``).

Two settings that ``prefect server start --port`` alone gets wrong:

* the UI's API URL: the UI asks ``/ui-settings`` where the API is, and the
  answer comes from settings, not from ``--port``, so on any port but 4200 the
  UI would call ``127.0.0.1:4200/api``;
* leases on disk: a restart must not orphan the ``nanophoto-api`` limit's
  slots (the default keeps them in memory).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

LEASES_ON_DISK = "prefect.server.concurrency.lease_storage.filesystem"


def server_environment(host: str, port: int, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus what a server on ``host:port`` needs; a value set by the user wins
    except the UI's API URL, which must name this server."""
    url = f"http://{host}:{port}/api"
    env = dict(base)
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASES_ON_DISK)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_API_HOST"] = host
    env["PREFECT_SERVER_API_PORT"] = str(port)
    env["PREFECT_UI_API_URL"] = url
    # The server's own client (its services) talks to itself, not to another server.
    env["PREFECT_API_URL"] = url
    return env


def main(argv: list[str] | None = None) -> int:
    """Replace this process with ``prefect server start`` on ``--host``/``--port``."""
    parser = argparse.ArgumentParser(prog="python -m deployments.server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = server_environment(args.host, args.port, os.environ)
    print(
        f"Prefect server and UI on http://{args.host}:{args.port} (API {env['PREFECT_UI_API_URL']})"
    )
    sys.stdout.flush()
    command = [prefect, "server", "start", "--host", args.host, "--port", str(args.port)]
    os.execve(prefect, command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
