"""Prefect's production topology on this machine: ``make cluster-up`` / ``make cluster-down``.

PostgreSQL and Redis from the system's packages, a fresh database migrated
once, two API replicas (``prefect server start --no-services``) started one
after the other, and one services process (``prefect server services
start``), each in a process group of its own, stopped by its pid. What teams
run self-hosted, where the embedded SQLite server answers 503 from about ten
concurrent runs.

Settings that are easy to miss (each was seen failing without it):

* the database: ``PREFECT_SERVER_DATABASE_CONNECTION_URL``;
* events and their ordering through Redis: ``PREFECT_MESSAGING_BROKER``,
  ``PREFECT_MESSAGING_CACHE``, ``PREFECT_SERVER_EVENTS_CAUSAL_ORDERING``;
* concurrency leases (the ``nanophoto-api`` request budget) in Redis, shared by
  the replicas: ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``;
* the worker cleanup queue, with its own Redis URL (without it, it loops on
  localhost:6379): ``PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE``,
  ``PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL``;
* the services' task queue: ``PREFECT_SERVER_DOCKET_URL`` (default in memory).

Start-order traps: API processes started at the same moment on a fresh
database race (a migration, then the block registrations), so the database is
migrated first and the replicas start one after the other; and an all-in-one
``prefect server start`` must never share the Redis docket with
``--no-services`` APIs. The services process has no health endpoint: it is
ready when it is alive and its log shows no error.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import ipaddress
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import httpx

from deployments.server import server_environment

PROJECT_DIR: Final = Path(__file__).resolve().parent.parent
DEFAULT_DIR: Final = PROJECT_DIR / ".cluster"
PACKAGES: Final = ("postgresql", "redis-server")
DATABASE: Final = "prefect"
# Redis databases: Prefect's messaging, the services' docket, the cleanup queue, our locks.
MESSAGING_DB, DOCKET_DB, CLEANUP_DB, LOCKS_DB = 0, 1, 2, 3


def say(message: str) -> None:
    """One line of progress, flushed."""
    print(f"cluster: {message}", flush=True)


@dataclass
class Cluster:
    """Where the pieces listen, and the process groups to stop."""

    folder: str
    host: str
    postgres_port: int
    redis_port: int
    api_ports: list[int]
    pids: dict[str, int] = field(default_factory=dict)
    postgres_data: str = ""  # a folder of its own: the postgres user must reach it

    @property
    def api_urls(self) -> list[str]:
        """Each API replica's URL."""
        return [f"http://{self.host}:{port}/api" for port in self.api_ports]

    def redis_url(self, db: int) -> str:
        """A Redis database's URL."""
        return f"redis://{self.host}:{self.redis_port}/{db}"

    @property
    def database_url(self) -> str:
        """Prefect's connection URL for the PostgreSQL database (on loopback: only the
        server processes, on this machine, use it)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.postgres_port}/{DATABASE}"

    def server_settings(self) -> dict[str, str]:
        """What every Prefect server process of the cluster needs."""
        return {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_REDIS_MESSAGING_URL": self.redis_url(MESSAGING_DB),
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
            "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL": self.redis_url(CLEANUP_DB),
            "PREFECT_SERVER_DOCKET_URL": self.redis_url(DOCKET_DB),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def client_settings(self) -> dict[str, str]:
        """What workers, ``make deploy`` and the flows use: the first replica, and one
        idempotency-key lock for every host (prefect-redis's ``RedisLockManager``)."""
        return {
            "PREFECT_API_URL": self.api_urls[0],
            "SORA2_LOCK_REDIS_URL": self.redis_url(LOCKS_DB),
        }

    def save(self) -> None:
        """Write the state file ``down`` reads."""
        state_file(Path(self.folder)).write_text(json.dumps(asdict(self), indent=2))


def state_file(folder: Path) -> Path:
    """The cluster's state, beside its data."""
    return folder / "cluster.json"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's programs (Debian keeps them off the PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> float:
    with contextlib.suppress(ValueError):
        return float(Path(path).parts[4])
    return 0.0


def ensure_packages() -> Path:
    """PostgreSQL and Redis from the system's packages: installed here when missing
    (as root, with apt-get), else a message saying what to install."""
    if postgres_bin() is None or shutil.which("redis-server") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(
                f"cluster: needs PostgreSQL and Redis: install the packages {' '.join(PACKAGES)} "
                "(as root: apt-get install postgresql redis-server), then run this again"
            )
        say(f"installing {' '.join(PACKAGES)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    found = postgres_bin()
    if found is None or shutil.which("redis-server") is None:
        raise SystemExit("cluster: PostgreSQL or Redis is still missing after the install")
    return found


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def start_postgres(cluster: Cluster, bin_dir: Path) -> None:
    """A fresh data folder, trust on loopback only, the ``prefect`` database."""
    # Under the system's temporary folder, not the cluster's: that one may sit where the
    # postgres user cannot go (pytest's folders are private to root).
    data = Path(tempfile.mkdtemp(prefix="sora2-cluster-postgres-"))
    cluster.postgres_data = str(data)
    cluster.save()
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(data, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # Loopback only, whatever --host says: its trust authentication is for this machine.
    options = f"-p {cluster.postgres_port} -c listen_addresses=127.0.0.1 -k {data}"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-o", options]
    subprocess.run(
        _as_postgres([*pg_ctl, "-w", "-t", "120", "start"]), check=True, stdout=subprocess.DEVNULL
    )
    where = ["-h", "127.0.0.1", "-p", str(cluster.postgres_port), "-U", "postgres"]
    subprocess.run([str(bin_dir / "createdb"), *where, DATABASE], check=True)
    say(f"PostgreSQL on 127.0.0.1:{cluster.postgres_port}, database {DATABASE}")


def spawn(cluster: Cluster, name: str, command: list[str], env: Mapping[str, str]) -> None:
    """Start ``command`` in a process group of its own, its output in ``<name>.log``."""
    log = (Path(cluster.folder) / f"{name}.log").open("ab")
    process = subprocess.Popen(
        command,
        cwd=PROJECT_DIR,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster.pids[name] = process.pid
    cluster.save()


def wait_until(ready: object, what: str, timeout: float, pid: int | None = None) -> None:
    """Poll ``ready()`` until it is true; stop early if the process ``pid`` died."""
    assert callable(ready)
    deadline = time.monotonic() + timeout
    while not ready():
        if pid is not None and not _alive(pid):
            raise SystemExit(f"cluster: {what} exited; see its log in the cluster folder")
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster: {what} was not ready within {timeout:g} s")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    return True


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` is left."""
    _alive(pgid)  # reaps the leader if it is our child
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _redis_answers(cluster: Cluster) -> bool:
    done = subprocess.run(
        ["redis-cli", "-h", cluster.host, "-p", str(cluster.redis_port), "ping"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() == "PONG"


def server_base_environment(cluster: Cluster) -> dict[str, str]:
    """This environment with the cluster's server settings (and no client's API URL)."""
    base = {**os.environ, **cluster.server_settings()}
    base.pop("PREFECT_API_URL", None)
    return base


def start_api(cluster: Cluster, index: int, base: Mapping[str, str]) -> None:
    """API replica ``index`` (from 1), ``--no-services``, once it answers its health check."""
    port = cluster.api_ports[index - 1]
    prefect = str(Path(sys.executable).with_name("prefect"))
    command = [prefect, "server", "start", "--no-services", "--host", cluster.host]
    spawn(
        cluster,
        f"api-{index}",
        [*command, "--port", str(port)],
        server_environment(cluster.host, port, base),
    )
    url = cluster.api_urls[index - 1]
    wait_until(lambda: _healthy(url), f"API {url}", 180, cluster.pids[f"api-{index}"])
    say(f"API replica {index} on {url}")


def stop_group(name: str, pid: int) -> None:
    """SIGTERM to the process group ``pid``, SIGKILL after 15 s if any of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pid):  # the leader or any process of its group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    say(f"stopped {name}")


def restart_api(folder: Path, index: int) -> None:
    """Stop API replica ``index`` and start it again: what a rolling restart does to one
    replica. Runs, leases and events live in PostgreSQL and Redis, so nothing is lost."""
    path = state_file(folder)
    if not path.exists():
        raise SystemExit(f"cluster: {folder} holds no cluster; `make cluster-up` first")
    cluster = Cluster(**json.loads(path.read_text()))
    name = f"api-{index}"
    if name not in cluster.pids:
        raise SystemExit(f"cluster: no API replica {index} (there are {len(cluster.api_ports)})")
    stop_group(name, cluster.pids[name])
    start_api(cluster, index, server_base_environment(cluster))


def up(cluster: Cluster) -> None:
    """Bring every piece up, in order, each checked before the next starts."""
    folder = Path(cluster.folder)
    if state_file(folder).exists():
        raise SystemExit(f"cluster: already up ({folder}); `make cluster-down` first")
    bin_dir = ensure_packages()
    folder.mkdir(parents=True, exist_ok=True)
    cluster.save()
    prefect = str(Path(sys.executable).with_name("prefect"))
    try:
        start_postgres(cluster, bin_dir)
        redis = ["redis-server", "--port", str(cluster.redis_port), "--bind", cluster.host]
        if not ipaddress.ip_address(cluster.host).is_loopback:
            # Redis refuses other hosts without a password: workers on other hosts take its
            # locks, so --host must be an address of a private network you trust.
            redis += ["--protected-mode", "no"]
            say(f"Redis and the APIs listen on {cluster.host}: keep it on a private network")
        spawn(cluster, "redis", [*redis, "--save", "", "--appendonly", "no"], os.environ)
        wait_until(lambda: _redis_answers(cluster), "Redis", 30, cluster.pids["redis"])
        say(f"Redis on {cluster.host}:{cluster.redis_port}")
        base = server_base_environment(cluster)
        # Migrate once, before any API process starts (they would race on a fresh database).
        subprocess.run(
            [prefect, "server", "database", "upgrade", "-y"],
            env=base,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        say("database migrated")
        for index in range(1, len(cluster.api_ports) + 1):
            start_api(cluster, index, base)
        services = {**base, "PREFECT_API_URL": cluster.api_urls[0]}
        spawn(cluster, "services", [prefect, "server", "services", "start"], services)
        time.sleep(5)  # no health endpoint: alive after its start-up, with no error
        if not _alive(cluster.pids["services"]):
            raise SystemExit("cluster: the services process exited; see services.log")
        say("services process running")
    except BaseException:
        down(folder, keep_logs=True)  # its logs say why
        raise
    say("up; point workers and `make deploy` at it with:")
    for name, value in cluster.client_settings().items():
        print(f"export {name}={value}", flush=True)


def down(folder: Path, *, keep_logs: bool = False) -> None:
    """Stop every process of the cluster by its group, PostgreSQL, and remove its data
    (its logs too, unless ``keep_logs``)."""
    path = state_file(folder)
    if not path.exists():
        say(f"nothing to stop ({folder} holds no cluster)")
        return
    cluster = Cluster(**json.loads(path.read_text()))
    for name, pid in reversed(list(cluster.pids.items())):
        stop_group(name, pid)
    data = Path(cluster.postgres_data)
    bin_dir = postgres_bin()
    if cluster.postgres_data and (data / "postmaster.pid").exists() and bin_dir is not None:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
        )
        say("stopped PostgreSQL")
    if cluster.postgres_data:
        shutil.rmtree(data, ignore_errors=True)
    if keep_logs:
        state_file(folder).unlink(missing_ok=True)
        say(f"down: nothing left running; the logs are in {folder}")
        return
    shutil.rmtree(folder, ignore_errors=True)
    say("down: nothing left running")


def _ip_address(text: str) -> str:
    """One IPv4 address of this machine's: never 0.0.0.0, which would open Redis (no
    password there) on every interface."""
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 address, got {text!r}") from None
    if address.is_unspecified:
        raise argparse.ArgumentTypeError("name one address (of a private network), not 0.0.0.0")
    return str(address)


def main(argv: list[str] | None = None) -> int:
    """``up``, ``down`` or ``restart-api N``."""
    parser = argparse.ArgumentParser(
        prog="python -m deployments.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down", "restart-api"])
    parser.add_argument("replica", nargs="?", type=int, default=1, help="restart-api: which one")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="data and logs")
    parser.add_argument(
        "--host",
        type=_ip_address,
        default="127.0.0.1",
        help="the IP address Redis and the APIs bind (PostgreSQL stays on loopback); another "
        "host's workers need one of a private network (default: %(default)s)",
    )
    parser.add_argument("--postgres-port", type=int, default=54320)
    parser.add_argument("--redis-port", type=int, default=63790)
    parser.add_argument(
        "--api-ports", type=lambda text: [int(p) for p in text.split(",")], default=[4201, 4202]
    )
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    if args.action == "down":
        down(folder)
        return 0
    if args.action == "restart-api":
        restart_api(folder, args.replica)
        return 0
    up(
        Cluster(
            folder=str(folder),
            host=args.host,
            postgres_port=args.postgres_port,
            redis_port=args.redis_port,
            api_ports=args.api_ports,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
