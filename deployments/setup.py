"""Prepare a Prefect server for sora2-flows, idempotently, then deploy prefect.yaml.

Run it as often as you like (``make deploy``): it creates what is missing and
leaves the rest alone. It needs ``PREFECT_API_URL`` pointing at your server.

1. the process work pool ``sora2-process``;
2. the ``nanophoto-credentials`` block type (and, with ``--store-key``, a block
   named ``nanophoto`` holding ``NANOPHOTO_API_KEY`` from the environment);
3. the global rate limit ``nanophoto-api`` (100 requests an hour by default);
4. the zombie-run automation from ``deployments/automations.yaml``;
5. every deployment in ``prefect.yaml``, without prompting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectAlreadyExists
from pydantic import SecretStr

from nanophoto.contract import RATE_LIMIT_PER_HOUR
from tasks.credentials import DEFAULT_BLOCK_NAME, NanoPhotoCredentials

PROJECT_DIR: Final = Path(__file__).resolve().parent.parent
WORK_POOL: Final = "sora2-process"
RATE_LIMIT: Final = "nanophoto-api"
ZOMBIE_AUTOMATION: Final = "crash-zombie-video-runs"


def say(message: str) -> None:
    """One line of progress, flushed, for people and CI logs."""
    print(f"setup: {message}", flush=True)


async def ensure_work_pool() -> None:
    """The process work pool; an existing one (and its edits) is kept."""
    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
            say(f"created work pool {WORK_POOL}")
        except ObjectAlreadyExists:
            say(f"work pool {WORK_POOL} already exists")


async def ensure_credentials(store_key: bool, block_name: str) -> None:
    """Register the block type; with ``store_key``, save the key from the environment."""
    await NanoPhotoCredentials.aregister_type_and_schema()
    say("registered block type nanophoto-credentials")
    if not store_key:
        return
    key = os.environ.get("NANOPHOTO_API_KEY", "").strip()
    if not key:
        raise SystemExit("setup: --store-key needs NANOPHOTO_API_KEY in the environment")
    block = NanoPhotoCredentials(
        api_key=SecretStr(key), base_url=os.environ.get("NANOPHOTO_BASE_URL") or None
    )
    await block.asave(block_name, overwrite=True)
    say(f"saved the key in block nanophoto-credentials/{block_name}")


async def ensure_rate_limit(per_hour: int) -> None:
    """A global limit used as a rate limit: ``per_hour`` slots refilled over an hour."""
    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(
            RATE_LIMIT, per_hour, slot_decay_per_second=per_hour / 3600
        )
    say(f"rate limit {RATE_LIMIT}: {per_hour} requests an hour")


async def ensure_zombie_automation() -> None:
    """Crash runs whose heartbeats stop, so they never sit Running forever."""
    document: dict[str, Any] = yaml.safe_load(
        (PROJECT_DIR / "deployments" / "automations.yaml").read_text(encoding="utf-8")
    )
    spec = next(a for a in document["automations"] if a["name"] == ZOMBIE_AUTOMATION)
    async with get_client() as client:
        if await client.read_automations_by_name(ZOMBIE_AUTOMATION):
            say(f"automation {ZOMBIE_AUTOMATION} already exists")
            return
        await client.create_automation(AutomationCore.model_validate(spec))
    say(f"created automation {ZOMBIE_AUTOMATION}")


def deploy_all() -> None:
    """``prefect deploy --all`` without prompts, from the project folder."""
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "--no-prompt", "deploy", "--all"]
    say("deploying everything in prefect.yaml")
    subprocess.run(command, cwd=PROJECT_DIR, check=True)


async def prepare(args: argparse.Namespace) -> None:
    """Everything but the deploy, in order."""
    await ensure_work_pool()
    await ensure_credentials(args.store_key, args.block_name)
    await ensure_rate_limit(args.rate_limit)
    await ensure_zombie_automation()


def main(argv: list[str] | None = None) -> int:
    """Prepare the server named by ``PREFECT_API_URL`` and deploy."""
    parser = argparse.ArgumentParser(
        prog="python -m deployments.setup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--store-key",
        action="store_true",
        help="save NANOPHOTO_API_KEY (and NANOPHOTO_BASE_URL) in a block",
    )
    parser.add_argument("--block-name", default=DEFAULT_BLOCK_NAME)
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=RATE_LIMIT_PER_HOUR,
        help="requests an hour for the key (default: %(default)s)",
    )
    parser.add_argument("--no-deploy", action="store_true", help="prepare only")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit(
            "setup: set PREFECT_API_URL to your Prefect server (e.g. "
            "http://127.0.0.1:4200/api); `make server` starts one"
        )
    asyncio.run(prepare(args))
    if not args.no_deploy:
        deploy_all()
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
