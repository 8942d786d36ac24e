"""Prefect's production topology, as ``make cluster-up`` starts it, with workers on two
other network hosts.

The cluster (PostgreSQL, Redis, two API replicas, a services process) binds
the host end of two veth pairs; each worker runs in a network namespace of its
own behind one of them, a separate host as far as the network goes. The
simulator serves https with a test certificate the workers trust (the key
only ever travels over https to a host that is not this one), and an
S3-compatible server (moto) keeps the submission records. ``make deploy``
configures both for the pool: the ``S3Bucket`` result storage and the Redis
idempotency-key lock (prefect-redis's ``RedisLockManager``).

* 40 single-video runs created at once, half through each replica (the
  deployment's concurrency limit runs ten at a time, as shipped): all
  complete, each video paid once, 0 server errors.
* A 40-item batch in four parts with the key's request limit binding and a
  credit budget one video short: the host running the batch's own run is lost
  (every process in its namespace SIGKILLed) while an API replica restarts;
  the lost runs are Crashed within the documented bound and retried on the
  other host; one video fails (refunded) and its credits let the last item in
  for a second round; every other item delivered, each paid once, the
  summary's credits equal to the ledger's, 0 x 429, and the lost host's
  request slots come back.

Needs root, iproute2 and apt-get (or PostgreSQL and Redis installed): it
skips, saying why, where that is not possible.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from moto.server import ThreadedMotoServer
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import LogSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.cluster import postgres_bin
from flows.pipeline import MAX_RUN_COUNT
from nanophoto_simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.e2e.conftest import BIN, PROJECT_DIR, PrefectServer, base_env, stop
from tests.helpers import free_port

KEY = "np-topology-test-key"
TIME_SCALE = 0.01  # NanoPhoto's hour is 36 s here
WORKER = [str(BIN / "prefect"), "worker", "start", "--pool", "sora2-process", "--type", "process"]
SCHEDULE = {"initial_delay": 120, "interval": 20, "max_wait": 3000, "expected_generation": 300}
ZOMBIE_S = 60  # no heartbeat for this long: Crashed (`make deploy --heartbeat-timeout`)
BUCKET = "sora2-topology"
RUNS = 40
BATCH, PARTS = 40, 4
PRICE = 4  # credits of one 10 s sora2 video
# A server error answered to a client (as the servers log it, or as a client gave up on it).
SERVER_ERROR = re.compile(
    r"Encountered exception in request|\b50[0-9] (?:Internal Server Error|Service Unavailable)"
)
BATCH_RATE_LIMIT = 50  # requests per window: the batch needs about twice that, so it binds


@dataclass
class Network:
    """Where the servers listen, and the namespaces (hosts) the workers run in."""

    host: str
    namespaces: list[str] = field(default_factory=list)
    reason: str = ""  # why there are none


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _why_no_namespaces() -> str:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the `ip` command)"
    probe = f"sora2-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"this machine refuses network namespaces: {error.stderr.strip()}"
    _ip("netns", "del", probe)
    return ""


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    """Two network namespaces, each joined to this host by a veth pair, in 198.18.0.0/15
    (reserved for network tests, so no clash with a real network); the servers bind the
    host end of the first. Removed afterwards, veths with them."""
    reason = _why_no_namespaces()
    if reason:
        yield Network("127.0.0.1", reason=reason)
        return
    tag, octet = os.getpid() % 10_000, os.getpid() % 250
    made: list[str] = []
    outsides: list[str] = []
    try:
        for index in (1, 2):
            namespace, outside, inside = (
                f"sora2-{tag}-{index}",
                f"s2o{tag}{index}",
                f"s2i{tag}{index}",
            )
            _ip("netns", "add", namespace)
            made.append(namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            outsides.append(outside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("addr", "add", f"198.{17 + index}.{octet}.1/24", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("-n", namespace, "addr", "add", f"198.{17 + index}.{octet}.2/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "route", "add", "default", "via", f"198.{17 + index}.{octet}.1")
        yield Network(f"198.18.{octet}.1", made)
    finally:
        for namespace in made:
            kill_host(namespace)
            with suppress(subprocess.CalledProcessError):
                _ip("netns", "del", namespace)
        for outside in outsides:  # gone with its namespace, unless the move failed
            with suppress(subprocess.CalledProcessError):
                _ip("link", "del", outside)


def kill_host(namespace: str) -> int:
    """SIGKILL every process in ``namespace``: the host is lost. How many there were."""
    found = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    pids = [int(pid) for pid in found.stdout.split()]
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _can_bring_up() -> str | None:
    """Why the cluster cannot come up here, or None."""
    if postgres_bin() is not None and shutil.which("redis-server"):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "PostgreSQL and Redis are not installed, and this is not root with apt-get"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, network: Network) -> Iterator[dict[str, Any]]:
    """``make cluster-up`` on free ports; ``make cluster-down`` afterwards, whatever happens."""
    reason = network.reason or _can_bring_up()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(4)]
    home = tmp_path_factory.mktemp("prefect-home-cluster")
    env = {**base_env(home, ""), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL")
    command = [str(BIN / "python"), "-m", "deployments.cluster"]
    where = ["--dir", str(folder)]
    options = ["--host", network.host, "--postgres-port", str(ports[0])]
    options += ["--redis-port", str(ports[1]), "--api-ports", f"{ports[2]},{ports[3]}"]
    up = subprocess.run(
        [*command, "up", *where, *options],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.MULTILINE))
        yield {
            "folder": folder,
            "home": home,
            "env": env,
            "apis": [f"http://{network.host}:{port}/api" for port in ports[2:]],
            "lock_url": exports["SORA2_LOCK_REDIS_URL"],
        }
    finally:
        down = subprocess.run(
            [*command, "down", *where], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert not folder.exists()
        for port in ports:  # nothing listens on the cluster's ports any more
            for address in {"127.0.0.1", network.host}:
                with socket.socket() as probe:
                    assert probe.connect_ex((address, port)) != 0, f"{address}:{port} still open"


def restart_api(cluster: dict[str, Any], replica: int) -> float:
    """``python -m deployments.cluster restart-api N``; how long it took."""
    started = time.monotonic()
    done = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "deployments.cluster",
            "restart-api",
            str(replica),
            "--dir",
            str(cluster["folder"]),
        ],
        cwd=PROJECT_DIR,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return time.monotonic() - started


@dataclass
class Certificate:
    """A test CA, and a server certificate it signed for one IP address."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory, network: Network) -> Certificate:
    """A CA the workers trust (``SSL_CERT_FILE``) and the simulator's certificate."""
    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sora2 test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    address = ipaddress.ip_address(network.host)
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(address))]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(address)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = Certificate(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca.public_bytes(pem))
    paths.cert.write_bytes(server.public_bytes(pem))
    paths.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
def s3(network: Network) -> Iterator[str]:
    """An S3-compatible server (moto) where the servers listen; its endpoint URL."""
    port = free_port()
    server = ThreadedMotoServer(ip_address=network.host, port=port, verbose=False)
    server.start()
    try:
        yield f"http://{network.host}:{port}"
    finally:
        server.stop()


@contextmanager
def https_simulator(
    network: Network, certificate: Certificate, rate_limit: int
) -> Iterator[Simulator]:
    """The simulator over TLS on the servers' address, the key's limit ``rate_limit``."""
    config = SimulatorConfig(
        keys={KEY: 10_000},
        time_scale=TIME_SCALE,
        rate_limit=rate_limit,
        generation_seconds=(130, 200),
        seed=11,
        edge=True,
    )
    with SimulatorThread(config, host=network.host, tls=certificate.server_context()) as sim:
        assert sim.base_url.startswith("https://")
        yield sim


@dataclass
class Pool:
    """Two process workers, one per namespace and replica, and where their logs are."""

    home: Path
    apis: list[str]
    namespaces: list[str]
    server: PrefectServer

    def log(self, index: int) -> str:
        return (self.home / f"worker-{index}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "".join(self.log(index)[-3000:] for index in (1, 2))

    def stop(self) -> None:
        for process in self.server.processes:
            stop(process)
        for namespace in self.namespaces:  # their flow-run processes too
            kill_host(namespace)


def deploy_and_start_workers(
    cluster: dict[str, Any],
    network: Network,
    simulator: Simulator,
    certificate: Certificate,
    s3: str,
    rate_limit: int,
    limit: int,
) -> Pool:
    """``make deploy`` against the cluster with shared S3 records and the Redis lock, then
    a worker in each namespace, each on its own replica (``--limit``)."""
    if not network.namespaces:
        pytest.skip(network.reason)
    home: Path = cluster["home"]
    first, _ = cluster["apis"]
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never look for a cloud
    }
    setup = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "deployments.setup",
            "--store-key",
            "--rate-limit",
            str(rate_limit),
            "--heartbeat-timeout",
            str(ZOMBIE_S),
            "--results-s3-bucket",
            BUCKET,
            "--s3-endpoint",
            s3,
            "--lock-redis-url",
            cluster["lock_url"],
            # prefect.yaml is deployed once per cluster; later tests only update the
            # key's block (a new simulator), the limit and the pool.
            *(["--no-deploy"] if cluster.get("deployed") else []),
        ],
        cwd=PROJECT_DIR,
        env={
            **base_env(home, first),
            **aws,
            "NANOPHOTO_API_KEY": KEY,
            "NANOPHOTO_BASE_URL": simulator.base_url,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    cluster["deployed"] = True
    # Nothing shared in the workers' own environment: the pool gives their runs the S3
    # records and the Redis lock; no local result folder, no AWS secret.
    pool = Pool(home, cluster["apis"], network.namespaces, PrefectServer(home, first, home / "x"))
    for index, (api, namespace) in enumerate(
        zip(pool.apis, network.namespaces, strict=True), start=1
    ):
        env = {
            **base_env(home, api),
            "AWS_EC2_METADATA_DISABLED": "true",
            "SSL_CERT_FILE": str(certificate.ca),  # the test CA, as a company CA would be
            "NANOPHOTO_TIME_SCALE": str(TIME_SCALE),  # the rate window: 36 s here
            # Patient through a replica's restart (Prefect's default gives up after ~30 s).
            "PREFECT_CLIENT_MAX_RETRIES": "12",
        }
        pool.server.start(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                *WORKER,
                "--limit",
                str(limit),
                "--name",
                f"worker-{index}",
            ],
            home / f"worker-{index}.log",
            env,
        )
    return pool


def assert_no_server_errors(cluster: dict[str, Any], pool: Pool) -> None:
    """No API answered a server error to a worker or to the test."""
    logs = (
        "".join(path.read_text(errors="replace") for path in cluster["folder"].glob("api-*.log"))
        + pool.logs()
    )
    assert not SERVER_ERROR.search(logs), SERVER_ERROR.findall(logs)[:5]


@pytest.mark.timeout(900)
def test_forty_runs_at_once_over_two_hosts_complete_with_no_server_error(
    cluster: dict[str, Any], network: Network, certificate: Certificate, s3: str, tmp_path: Path
) -> None:
    with https_simulator(network, certificate, rate_limit=10_000) as simulator:
        pool = deploy_and_start_workers(
            cluster, network, simulator, certificate, s3, rate_limit=10_000, limit=RUNS // 2
        )
        first, second = pool.apis
        started = time.monotonic()
        try:
            runs = asyncio.run(create_runs(first, second, tmp_path / "videos"))
            finished = asyncio.run(wait_for_all(first, runs, within=700))
        finally:
            pool.stop()
        wall = time.monotonic() - started
        ledger = simulator.snapshot()
    not_completed = [run for run in finished if run.state is None or not run.state.is_completed()]
    assert not not_completed, asyncio.run(what_happened(first, not_completed))
    assert ledger["submits"] == RUNS  # each video paid once
    assert len({task["prompt_head"] for task in ledger["tasks"]}) == RUNS
    ran_by = [run.labels.get("prefect.worker.name") for run in finished]
    took = [ran_by.count(f"worker-{index}") for index in (1, 2)]
    assert all(took), ran_by  # both hosts ran runs
    assert_no_server_errors(cluster, pool)
    print(
        f"\ntopology: {RUNS} runs at once over two hosts and two replicas: all completed in "
        f"{wall:.0f} s, taken {took[0]}/{took[1]}; {ledger['submits']} submits; 0 server errors"
    )


@pytest.mark.timeout(1200)
def test_a_batch_over_two_hosts_survives_a_lost_host_and_a_restarted_replica(
    cluster: dict[str, Any], network: Network, certificate: Certificate, s3: str, tmp_path: Path
) -> None:
    """Each worker takes three runs at most, so the batch's run and its four parts need
    both hosts. Once ten videos are submitted and no submit is on the wire (a kill then
    would be an honest unknown outcome, not what this test is about), the host running
    the batch's own run is lost and the other host's replica restarts; the lost runs
    are Crashed, retried on the surviving host, and find their parts and records:
    nothing is paid twice."""
    items = [{"prompt": f"item {i}: lanterns on a canal"} for i in range(BATCH)]
    with https_simulator(network, certificate, rate_limit=BATCH_RATE_LIMIT) as simulator:
        # The first video fails (refunded): those credits let the last item, kept out of
        # the budget at first, into a second round.
        simulator.queue_fault("generate", "generation_failed")
        pool = deploy_and_start_workers(
            cluster, network, simulator, certificate, s3, BATCH_RATE_LIMIT, limit=3
        )
        first, _ = pool.apis
        try:
            batch = asyncio.run(
                create_run(
                    first,
                    "batch-of-videos/on-demand",
                    {
                        "items": items,
                        "parts": PARTS,
                        "max_in_flight": 6,
                        "credit_budget": (BATCH - 1) * PRICE,
                        "schedule": SCHEDULE,
                        "output_dir": str(tmp_path / "videos"),
                    },
                )
            )
            wait_until(lambda: simulator.snapshot()["submits"] >= 10, "ten submits", 400)
            running = asyncio.run(wait_for_all(first, [batch], within=0))[0]
            victim = running.labels.get("prefect.worker.name")
            assert victim in ("worker-1", "worker-2"), running.labels
            lost, survivor = (0, 2) if victim == "worker-1" else (1, 1)
            # The paced budget starts a submit every few seconds: hold every free slot so
            # that none starts between the look at the wire and the kill.
            held = asyncio.run(hold_the_budget(first))
            time.sleep(2)  # a request granted just before the hold has started by now
            wait_until(lambda: not sending(s3), "a moment with no submit on the wire", 120)
            killed = kill_host(network.namespaces[lost])
            killed_at = datetime.datetime.now(datetime.UTC)
            submits_at_kill = simulator.snapshot()["submits"]
            asyncio.run(release(pool.apis[survivor - 1], held))
            restart_s = restart_api(cluster, survivor)
            done = asyncio.run(wait_for_all(pool.apis[survivor - 1], [batch], within=900))[0]
            parts = asyncio.run(runs_named(first, "batch part"))
            crashes = asyncio.run(crash_times(first, [batch, *parts]))
            slots = asyncio.run(slots_in_use_once_idle(first, within=180))
            shared = asyncio.run(variables_named(first, "sora2_times_"))
        finally:
            pool.stop()
        ledger = simulator.snapshot()
    assert done.state is not None
    assert done.state.is_completed(), pool.logs()
    summary = asyncio.run(result_of(first, done))
    assert [item["index"] for item in summary["items"]] == list(range(BATCH))
    failed = [item for item in summary["items"] if item["status"] == "failed"]
    outcome = {
        "summary": {key: value for key, value in summary.items() if key != "items"},
        "not delivered": [item for item in summary["items"] if item["status"] != "delivered"],
        "ledger": [(t["task_id"], t["status"], t["prompt_head"]) for t in ledger["tasks"]],
        "faults": ledger["faults"],
    }
    if [item["error_code"] for item in failed] != ["GENERATION_FAILED"]:  # all of it, untruncated
        pytest.fail(f"{json.dumps(outcome, default=str, indent=1)}\nlogs:\n{pool.logs()}")
    counts = (summary["delivered"], summary["over_budget"], summary["unknown"])
    assert counts == (BATCH - 1, 0, 0), summary  # the refund let the last item in
    # One budget and one summary for the batch, matching NanoPhoto's ledger.
    assert summary["credits_used"] == (BATCH - 1) * PRICE
    credits = ledger["credits"][KEY]
    assert credits["charged"] - credits["refunded"] == summary["credits_used"]
    assert ledger["submits"] == BATCH  # each video paid once, across the crash
    assert len({task["prompt_head"] for task in ledger["tasks"]}) == BATCH
    assert ledger["rate_limited"] == {}, ledger["rate_limited"]  # 0 x 429 across both hosts
    assert ledger["total_requests"] > BATCH_RATE_LIMIT  # the limit did bind
    assert len(parts) == PARTS + 1  # and one more for the item the refund let in
    assert all(p.state and p.state.is_completed() for p in parts)
    # The lost host's runs were Crashed within the bound: no heartbeat for ZOMBIE_S, a
    # heartbeat every 30 s, the services' loops; then retried on the surviving host.
    assert crashes, "no run of the lost host was ever marked Crashed"
    late = max((when - killed_at).total_seconds() for when in crashes)
    assert late <= ZOMBIE_S + 30 + 90, late
    assert "batch" in pool.log(lost + 1)  # the lost host did run the batch's runs
    assert slots == 0  # the lost host's request slots came back
    assert shared == []  # the parts' shared generation times went with the batch
    assert_no_server_errors(cluster, pool)
    print(
        f"\ntopology batch: {BATCH} items in {PARTS} parts over two hosts; host of {victim} "
        f"lost ({killed} processes) after {submits_at_kill} submits, {len(held)} free request "
        f"slots held for the kill; replica {survivor} "
        f"restarted in {restart_s:.0f} s; Crashed within {late:.0f} s; {ledger['submits']} "
        f"submits, {ledger['total_requests']} requests under {BATCH_RATE_LIMIT} per window, "
        f"429s: {sum(ledger['rate_limited'].values())}"
    )


async def hold_the_budget(api: str) -> list[UUID]:
    """Lease every free slot of the shared request budget: no process can start a request
    until they are released."""
    leases: list[UUID] = []
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            for _ in range(BATCH_RATE_LIMIT + 1):
                try:
                    response = await client.increment_concurrency_slots_with_lease(
                        names=["nanophoto-api"], slots=1, mode="concurrency", lease_duration=300
                    )
                except httpx.HTTPStatusError as error:
                    if error.response.status_code == 423:  # full: held
                        return leases
                    raise
                leases.append(UUID(response.json()["lease_id"]))
    raise AssertionError("the request budget never filled")


async def release(api: str, leases: list[UUID]) -> None:
    """Give back the slots ``hold_the_budget`` took."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            for lease in leases:
                await client.release_concurrency_slots_with_lease(lease)


def sending(s3: str) -> list[str]:
    """The keys whose submit is on the wire right now, from the records on S3."""
    bucket = boto3.client(
        "s3",
        endpoint_url=s3,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    listed = bucket.list_objects_v2(Bucket=BUCKET, Prefix="sora2/sora2-submissions/")
    keys = []
    for entry in listed.get("Contents", []):
        body = bucket.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read()
        record = json.loads(body)
        if record.get("state") == "sending":
            keys.append(str(record.get("key")))
    return keys


def wait_until(predicate: Any, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


async def create_run(api: str, name: str, parameters: dict[str, Any]) -> FlowRun:
    """A new run of deployment ``name``."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            return await client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters
            )


async def runs_named(api: str, prefix: str) -> list[FlowRun]:
    """The flow runs whose name starts with ``prefix``."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            return [run for run in await client.read_flow_runs() if run.name.startswith(prefix)]


async def crash_times(api: str, runs: list[FlowRun]) -> list[datetime.datetime]:
    """When each of ``runs`` entered a Crashed state, if it ever did."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            return [
                state.timestamp
                for run in runs
                for state in await client.read_flow_run_states(run.id)
                if state.type.value == "CRASHED"
            ]


async def variables_named(api: str, prefix: str) -> list[str]:
    """The Prefect Variables whose name starts with ``prefix``."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            return [v.name for v in await client.read_variables() if v.name.startswith(prefix)]


async def slots_in_use_once_idle(api: str, within: float) -> int:
    """The request budget's slots in use, once they drain (each is held one window after
    its request, and a dead holder's lease expires on its own)."""
    deadline = time.monotonic() + within
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            while True:
                limit = await client.read_global_concurrency_limit_by_name("nanophoto-api")
                if limit.active_slots == 0 or time.monotonic() > deadline:
                    return int(limit.active_slots)
                await asyncio.sleep(2)


async def result_of(api: str, run: FlowRun) -> dict[str, Any]:
    """A finished batch's summary, from its batch-summary-json artifact."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
    text = next(str(a.data) for a in artifacts if a.key == "batch-summary-json")
    document: dict[str, Any] = json.loads(text.split("```json\n", 1)[1].rsplit("```", 1)[0])
    return document


async def create_runs(first: str, second: str, videos: Path) -> list[FlowRun]:
    """RUNS prompt-to-video runs at once, half through each replica."""
    parameters = {"schedule": SCHEDULE, "output_dir": str(videos)}

    async def create(api: str, index: int) -> FlowRun:
        prompt = f"topology {index}: a heron over a misty lake"
        return await create_run(api, "prompt-to-video/on-demand", {**parameters, "prompt": prompt})

    return list(await asyncio.gather(*(create((first, second)[i % 2], i) for i in range(RUNS))))


# deployments/automations.yaml: a run crashed with this message is scheduled again.
RETRIED_CRASH = "Flow run marked as crashed due to missing heartbeats."


def settled(run: FlowRun) -> bool:
    """Final, and not a crash the retry automation is about to schedule again."""
    state = run.state
    if state is None or not state.is_final():
        return False
    return not (
        state.is_crashed() and state.message == RETRIED_CRASH and run.run_count <= MAX_RUN_COUNT
    )


async def what_happened(api: str, runs: list[FlowRun]) -> str:
    """Each run's state and its last log lines, as the server has them."""
    told = []
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            for run in runs:
                logs = await client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                    sort=LogSort.TIMESTAMP_DESC,
                    limit=15,
                )
                lines = "\n    ".join(log.message[:300] for log in reversed(logs))
                state = f"{run.state.name}: {run.state.message}" if run.state else "no state"
                told.append(f"{run.name} ({run.id}): {state}\n    {lines}")
    return "\n".join(told)


async def wait_for_all(api: str, runs: list[FlowRun], within: float) -> list[FlowRun]:
    """Each run once it is settled (or as it is when the time is up)."""
    deadline = time.monotonic() + within
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            while True:
                current = [await client.read_flow_run(run.id) for run in runs]
                if all(settled(run) for run in current):
                    return current
                if time.monotonic() > deadline:
                    return current
                await asyncio.sleep(2)
