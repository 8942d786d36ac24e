"""Prepare a Prefect server for sora2-flows, idempotently, then deploy prefect.yaml.

Run it as often as you like (``make deploy``): it creates what is missing,
updates what changed, and keeps what you changed in the UI (schedules you
turned on stay on). It talks to the server your Prefect settings name
(``PREFECT_API_URL`` or the active profile).

1. the process work pool ``sora2-process``;
2. the Prefect Variable ``sora2_project_dir``: where workers find this project;
3. the ``nanophoto-credentials`` block type (and, with ``--store-key``, a block
   holding ``NANOPHOTO_API_KEY`` from the environment);
4. the global concurrency limit ``nanophoto-api``: the key's requests per
   hour, shared by every run and worker (``--rate-limit``, default
   ``NANOPHOTO_RATE_LIMIT`` or 100);
5. the automations from ``deployments/automations.yaml``: a run whose heartbeats
   stop (its worker killed) is marked Crashed, and a crashed run is retried;
6. for workers on several hosts (``--results-s3-bucket``, ``--lock-redis-url``):
   an ``S3Bucket`` result-storage block for the submission records, and the
   Redis URL of the idempotency-key lock, both put in the pool's flow-run
   environment so every worker's runs share them;
7. every deployment in ``prefect.yaml``, without prompting; then the schedules'
   on/off states and the parameters people changed in the UI since the last
   deploy are put back, and undeclared parameters are refused (sealed schemas).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Final
from uuid import UUID

import yaml
from prefect import get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate, WorkPoolUpdate
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import get_current_settings
from prefect.variables import Variable
from prefect.workers.process import ProcessWorker
from pydantic import SecretStr

from nanophoto.settings import NanoPhotoSettings
from tasks.credentials import DEFAULT_BLOCK_NAME, NanoPhotoCredentials, load_credentials
from tasks.locks import REDIS_URL_VARIABLE
from tasks.ratelimit import create_rate_limit

PROJECT_DIR: Final = Path(__file__).resolve().parent.parent
WORK_POOL: Final = "sora2-process"
PROJECT_VARIABLE: Final = "sora2_project_dir"
ZOMBIE_AUTOMATION: Final = "crash-zombie-video-runs"
# The result storage every worker shares (--results-s3-bucket), and its credentials' block.
RESULTS_BLOCK: Final = "sora2-results"
RESULTS_CREDENTIALS_BLOCK: Final = "sora2-results-credentials"
# What the last deploy wrote into each deployment's parameters (digests): a difference
# is an edit made in the UI, which the next deploy keeps.
DEPLOYED_PARAMETERS_VARIABLE: Final = "sora2_deployed_parameters"


def say(message: str) -> None:
    """One line of progress, flushed, for people and CI logs."""
    print(f"setup: {message}", flush=True)


def require_api_url() -> str:
    """The Prefect server's API URL from settings; stop with advice if there is none."""
    url = get_current_settings().api.url
    if not url:
        raise SystemExit(
            "no Prefect server configured: start one with `make server`, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` "
            "(or `prefect config set PREFECT_API_URL=...`)"
        )
    return url


# The flow-run command, set instead of left to the worker: a process worker left to choose
# prepares a "workspace" and writes its whole environment (NANOPHOTO_API_KEY, if the
# worker holds it) to a manifest in the temporary folder, which a killed worker leaves
# behind. With a command it starts the engine directly and writes no such file. `python`
# is the project's: `make worker` puts .venv/bin first on the PATH.
FLOW_RUN_COMMAND: Final = "python -m prefect.engine"
# A flow run sends a heartbeat every HEARTBEAT_S seconds (Prefect's default is 180; 30 is
# its minimum); one whose heartbeats stop for HEARTBEAT_TIMEOUT_S (its worker was killed,
# its machine lost) is marked Crashed and retried: a killed worker's runs hold their
# deployment's slots for about two minutes, not ten.
HEARTBEAT_S: Final = 30
HEARTBEAT_TIMEOUT_S: Final = 90.0
FLOW_RUN_ENV: Final = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}


def job_template() -> dict[str, Any]:
    """Prefect's process job template, with our flow-run command as its default."""
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = FLOW_RUN_COMMAND
    template["variables"]["properties"]["env"]["default"] = dict(FLOW_RUN_ENV)
    return template


async def ensure_work_pool() -> None:
    """The process work pool, with our job template; a person's edits are kept."""
    template = job_template()
    async with get_client() as client:
        try:
            await client.create_work_pool(
                WorkPoolCreate(name=WORK_POOL, type="process", base_job_template=template)
            )
            say(f"created work pool {WORK_POOL}")
        except ObjectAlreadyExists:
            pool = await client.read_work_pool(WORK_POOL)
            kept = pool.base_job_template or {}
            if not kept:
                await client.update_work_pool(WORK_POOL, WorkPoolUpdate(base_job_template=template))
                say(f"work pool {WORK_POOL} exists; gave it our job template ({FLOW_RUN_COMMAND})")
                return
            # Only our two fields, and only when unset: every other edit a person made stays.
            fields = kept.get("variables", {}).get("properties", {})
            changed = []
            command, env = fields.get("command"), fields.get("env")
            if isinstance(command, dict) and command.get("default") is None:
                command["default"] = FLOW_RUN_COMMAND
                changed.append(f"flow-run command {FLOW_RUN_COMMAND}")
            if isinstance(env, dict) and not set(FLOW_RUN_ENV) <= set(env.get("default") or {}):
                env["default"] = {**FLOW_RUN_ENV, **(env.get("default") or {})}
                changed.append(f"heartbeats every {HEARTBEAT_S} s")
            if changed:
                await client.update_work_pool(WORK_POOL, WorkPoolUpdate(base_job_template=kept))
                say(f"work pool {WORK_POOL} exists; now with {' and '.join(changed)}")
            else:
                say(f"work pool {WORK_POOL} already exists")


async def ensure_shared_results(bucket: str, endpoint: str | None) -> dict[str, str]:
    """The ``S3Bucket`` block ``sora2-results`` (and the bucket, if missing) for records
    every host reads; the flow-run environment that makes it the default result storage.

    Its credentials come from the usual AWS variables and go into a block, never into
    the pool's environment (which anyone who can read the pool sees).
    """
    # prefect-aws is the optional `aws` group: only this option needs it.
    from botocore.exceptions import ClientError
    from prefect_aws import AwsClientParameters, AwsCredentials
    from prefect_aws.s3 import S3Bucket

    if os.environ.get("AWS_ACCESS_KEY_ID"):
        credentials = AwsCredentials(
            aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=os.environ.get("AWS_SESSION_TOKEN"),
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
        )
        await credentials.asave(RESULTS_CREDENTIALS_BLOCK, overwrite=True)
    else:  # no keys in this environment: the block saved last time (or AWS's defaults)
        try:
            credentials = await AwsCredentials.aload(RESULTS_CREDENTIALS_BLOCK)
        except ValueError:
            credentials = AwsCredentials(
                aws_client_parameters=AwsClientParameters(endpoint_url=endpoint)
            )
            await credentials.asave(RESULTS_CREDENTIALS_BLOCK, overwrite=True)
    client = credentials.get_s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket"):
            raise  # there, but not ours to read (403), or S3 is not answering
        region = credentials.region_name or "us-east-1"
        where = {} if region == "us-east-1" else {"LocationConstraint": region}
        client.create_bucket(
            Bucket=bucket, **({"CreateBucketConfiguration": where} if where else {})
        )
        say(f"created bucket {bucket}")
    results = S3Bucket(bucket_name=bucket, bucket_folder="sora2", credentials=credentials)
    await results.asave(RESULTS_BLOCK, overwrite=True)
    say(f"result storage: s3-bucket/{RESULTS_BLOCK} (s3://{bucket}/sora2)")
    return {"PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": f"s3-bucket/{RESULTS_BLOCK}"}


async def set_flow_run_env(values: dict[str, str]) -> None:
    """Put ``values`` in the pool's flow-run environment (what these options ask for
    replaces what was there; every other variable stays)."""
    if not values:
        return
    async with get_client() as client:
        pool = await client.read_work_pool(WORK_POOL)
        template = pool.base_job_template
        env = template["variables"]["properties"]["env"]
        env["default"] = {**(env.get("default") or {}), **values}
        await client.update_work_pool(WORK_POOL, WorkPoolUpdate(base_job_template=template))
    say(f"work pool {WORK_POOL}: flow runs get {', '.join(sorted(values))}")


async def ensure_project_variable() -> None:
    """Where the pull step finds the project: this folder, unless you changed it."""
    current = await Variable.aget(PROJECT_VARIABLE)
    if current is None:
        await Variable.aset(PROJECT_VARIABLE, str(PROJECT_DIR))
        say(f"variable {PROJECT_VARIABLE} = {PROJECT_DIR}")
    else:
        say(f"variable {PROJECT_VARIABLE} already set ({current})")


async def ensure_credentials(store_key: bool, block_name: str) -> None:
    """Register the block type; with ``store_key``, save the key from the environment."""
    await NanoPhotoCredentials.aregister_type_and_schema()
    say("registered block type nanophoto-credentials")
    if not store_key:
        return
    key = os.environ.get("NANOPHOTO_API_KEY", "").strip()
    if not key:
        raise SystemExit("setup: --store-key needs NANOPHOTO_API_KEY in the environment")
    existing = await load_credentials(block_name)
    # Keep a base URL stored earlier unless a new one is given.
    base_url = os.environ.get("NANOPHOTO_BASE_URL") or (existing.base_url if existing else None)
    block = NanoPhotoCredentials(api_key=SecretStr(key), base_url=base_url)
    await block.asave(block_name, overwrite=True)
    say(f"saved the key in block nanophoto-credentials/{block_name}")


def automations(heartbeat_timeout: float) -> list[AutomationCore]:
    """The automations of ``deployments/automations.yaml``; a run whose heartbeats stop
    for ``heartbeat_timeout`` seconds is a zombie."""
    document: dict[str, Any] = yaml.safe_load(
        (PROJECT_DIR / "deployments" / "automations.yaml").read_text(encoding="utf-8")
    )
    found = []
    for spec in document["automations"]:
        if spec["name"] == ZOMBIE_AUTOMATION:
            spec["trigger"]["within"] = heartbeat_timeout
        found.append(AutomationCore.model_validate(spec))
    return found


async def ensure_automations(heartbeat_timeout: float) -> None:
    """Create each automation once; update it when the file (or the time-out) changed."""
    async with get_client() as client:
        for wanted in automations(heartbeat_timeout):
            existing = await client.read_automations_by_name(wanted.name)
            if not existing:
                await client.create_automation(wanted)
                say(f"created automation {wanted.name}")
                continue
            current = AutomationCore.model_validate(existing[0].model_dump())
            if current.model_dump(mode="json") != wanted.model_dump(mode="json"):
                await client.update_automation(existing[0].id, wanted)
                say(f"updated automation {wanted.name}")
            else:
                say(f"automation {wanted.name} already up to date")


async def schedule_states() -> dict[tuple[UUID, str], bool]:
    """Whether each named schedule of each deployment is on, as the server has it now."""
    async with get_client() as client:
        deployments = await client.read_deployments()
    return {
        (deployment.id, schedule.slug): schedule.active
        for deployment in deployments
        for schedule in deployment.schedules
        if schedule.slug
    }


async def restore_schedule_states(before: dict[tuple[UUID, str], bool]) -> None:
    """Put back the on/off state people chose in the UI; prefect.yaml only sets it once."""
    async with get_client() as client:
        for deployment in await client.read_deployments():
            for schedule in deployment.schedules:
                was = before.get((deployment.id, schedule.slug or ""))
                if was is not None and was != schedule.active:
                    # The server stores every field of the update, and an update
                    # without parameters erases them: send the schedule's own.
                    await client.update_deployment_schedule(
                        deployment.id,
                        schedule.id,
                        active=was,
                        parameters=dict(schedule.parameters),
                    )
                    state = "on" if was else "off"
                    say(f"kept schedule {deployment.name}/{schedule.slug} {state}")


def _digest(parameters: dict[str, Any]) -> str:
    """A short fingerprint of a deployment's parameters."""
    text = json.dumps(parameters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def parameter_edits() -> dict[UUID, dict[str, Any]]:
    """Parameters people changed in the UI since the last deploy (a scheduled video's
    topic, a weekly batch's items): those that differ from what that deploy wrote."""
    deployed: Any = await Variable.aget(DEPLOYED_PARAMETERS_VARIABLE, default={})
    if not isinstance(deployed, dict):
        return {}
    async with get_client() as client:
        deployments = await client.read_deployments()
    return {
        deployment.id: dict(deployment.parameters)
        for deployment in deployments
        if str(deployment.id) in deployed
        and deployed[str(deployment.id)] != _digest(dict(deployment.parameters))
    }


async def restore_parameter_edits(edits: dict[UUID, dict[str, Any]]) -> None:
    """Put back the parameters people changed in the UI, and remember what this deploy wrote.

    ``prefect deploy`` writes prefect.yaml's parameters over a deployment's; a
    topic edited in the UI (as the README says to) would silently go back.
    """
    wrote: dict[str, str] = {}
    async with get_client() as client:
        for deployment in await client.read_deployments():
            if "sora2" not in (deployment.tags or []):
                continue
            wrote[str(deployment.id)] = _digest(dict(deployment.parameters))
            kept = edits.get(deployment.id)
            if kept is not None and kept != dict(deployment.parameters):
                await client.update_deployment(deployment.id, DeploymentUpdate(parameters=kept))
                say(
                    f"kept the parameters of {deployment.name} changed in the UI "
                    "(prefect.yaml's are not applied to it)"
                )
    await Variable.aset(DEPLOYED_PARAMETERS_VARIABLE, wrote, overwrite=True)


async def seal_parameter_schemas() -> None:
    """Refuse undeclared parameters before a run exists: ``additionalProperties: false``.

    Prefect's server checks run parameters against the deployment's schema, but
    the schema ``prefect deploy`` stores lets any extra name through (an
    ``api_key`` would be accepted, stored in plain text, and crash the run).
    """
    async with get_client() as client:
        for deployment in await client.read_deployments():
            schema = dict(deployment.parameter_openapi_schema or {})
            if (
                "sora2" not in (deployment.tags or [])
                or schema.get("additionalProperties") is False
            ):
                continue
            schema["additionalProperties"] = False
            await client.update_deployment(
                deployment.id, DeploymentUpdate(parameter_openapi_schema=schema)
            )
            say(f"{deployment.name}: undeclared parameters are refused")


def deploy_all(prefect_file: Path | None = None) -> None:
    """``prefect deploy --all`` without prompts, from the project folder."""
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "--no-prompt", "deploy", "--all"]
    if prefect_file is not None:
        command += ["--prefect-file", str(prefect_file.resolve())]
    say("deploying everything in prefect.yaml")
    subprocess.run(command, cwd=PROJECT_DIR, check=True)


async def prepare(args: argparse.Namespace) -> None:
    """Everything but the deploy, in order."""
    await ensure_work_pool()
    await ensure_project_variable()
    await ensure_credentials(args.store_key, args.block_name)
    say(await create_rate_limit(args.rate_limit, reset=args.reset_rate_limit))
    await ensure_automations(args.heartbeat_timeout)
    shared = {REDIS_URL_VARIABLE: args.lock_redis_url} if args.lock_redis_url else {}
    if args.results_s3_bucket:
        shared |= await ensure_shared_results(args.results_s3_bucket, args.s3_endpoint)
    await set_flow_run_env(shared)


def main(argv: list[str] | None = None) -> int:
    """Prepare the configured Prefect server and deploy."""
    parser = argparse.ArgumentParser(
        prog="python -m deployments.setup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--store-key",
        action="store_true",
        help="save NANOPHOTO_API_KEY (and NANOPHOTO_BASE_URL, if set) in a block",
    )
    parser.add_argument("--block-name", default=DEFAULT_BLOCK_NAME)
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=NanoPhotoSettings().rate_limit,
        help="requests per hour the key allows, shared by every run (default: %(default)s)",
    )
    parser.add_argument(
        "--reset-rate-limit",
        action="store_true",
        help="free every slot of the limit (after restarting a server that keeps leases "
        "in memory; only when no run is using the key)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=HEARTBEAT_TIMEOUT_S,
        metavar="SECONDS",
        help="a run whose heartbeats stop this long is marked Crashed, then retried "
        f"(default: %(default)g; its heartbeats come every {HEARTBEAT_S} s)",
    )
    parser.add_argument(
        "--results-s3-bucket",
        metavar="BUCKET",
        help="keep submission records in this S3 bucket, shared by workers on every host "
        "(credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; needs the `aws` extra)",
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="an S3-compatible server (MinIO, ...) instead of AWS"
    )
    parser.add_argument(
        "--lock-redis-url",
        metavar="URL",
        help="one idempotency-key lock for workers on every host (redis://host:6379/3, no "
        "password in it: the pool's environment is readable by whoever reads the pool; "
        "`make cluster-up` prints it)",
    )
    parser.add_argument("--no-deploy", action="store_true", help="prepare only")
    parser.add_argument(
        "--prefect-file",
        type=Path,
        default=None,
        help="deploy this file instead of the project's prefect.yaml",
    )
    args = parser.parse_args(argv)
    say(f"Prefect server: {require_api_url()}")
    asyncio.run(prepare(args))
    if not args.no_deploy:
        before = asyncio.run(schedule_states())
        edits = asyncio.run(parameter_edits())
        deploy_all(args.prefect_file)
        asyncio.run(restore_schedule_states(before))
        asyncio.run(restore_parameter_edits(edits))
        asyncio.run(seal_parameter_schemas())
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
