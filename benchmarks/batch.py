"""Our batch flow against the published tool's way, under the key's real limits.

Two runs, each against its own simulator:

1. **Rate run**: 100 requests per (simulated) hour, generations of 120-480 s,
   time compressed (default 1/100: an hour lasts 36 s). Side by side, at the
   same time, for the same simulated hours:
   * *baseline*: ``benchmarks/baseline.py``, one video at a time, 120 s then
     every 20 s, no retries (the published tool, run again after it fails);
   * *ours*: the ``batch-of-videos`` flow on Prefect's embedded server, with
     its global rate limit, topics in, MP4s out.
2. **Scale run**: 500 ready prompts in flight in one batch, the limit raised,
   at time scale 1/10 (generations of 12-48 s, checks every 2 s), against the
   ideal wall time: the longest generation plus one check interval. Once on
   the embedded server, then (unless ``--skip-cluster``, or where PostgreSQL
   and Redis cannot be had) on ``make cluster-up``'s production topology.

Each side runs in its own process, so CPU seconds and peak memory are its
own (with the Prefect server process it started); the simulators run in this
process. Figures come from the simulators' ledgers (requests, 429s, when each
video was done and when it was seen) and from ``/proc``.

Run: ``make bench`` (or ``python -m benchmarks.batch --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nanophoto.contract import GENERATION_RANGE_S, RATE_LIMIT_PER_HOUR, RATE_WINDOW_S
from nanophoto_simulator import SimulatorConfig, SimulatorThread

KEY = "bench-key"
TOPICS = [
    "A paper boat in a rain gutter",
    "Dawn over a misty pine forest",
    "A street food stall at midnight",
    "Jellyfish drifting in blue light",
    "An old lighthouse in a winter storm",
]
RESULT = "RESULT "


# --- measuring a process tree ---------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_usage(pid: int | None = None) -> dict[str, float]:
    """CPU seconds and peak resident memory (MiB) of a process and its descendants.

    The descendants of a flow process are the embedded Prefect server.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    cpu, peak, own, own_peak = 0.0, 0.0, 0.0, 0.0
    root = pid or os.getpid()
    for member in _tree(root):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        used = (int(fields[11]) + int(fields[12])) / ticks
        cpu += used
        own += used if member == root else 0.0
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak += int(line.split()[1]) / 1024
                own_peak += int(line.split()[1]) / 1024 if member == root else 0.0
    return {
        "cpu_seconds": round(cpu, 2),
        "cpu_seconds_flow_process": round(own, 2),
        "cpu_seconds_prefect_server": round(cpu - own, 2),
        "peak_mib": round(peak, 1),
        "peak_mib_flow_process": round(own_peak, 1),
    }


IDLE_S = 5.0


async def _at_start(idle_s: float = IDLE_S) -> dict[str, float]:
    """The CPU spent before the work starts (imports, the server's start), and the CPU
    seconds per real second the process tree spends doing nothing for ``idle_s``.

    Both are fixed costs, not per video: a worker's server starts once and idles for
    days. At a compressed time scale an hour lasts seconds, so an idle server's cost
    would otherwise be charged to a handful of videos.
    """
    before = tree_usage()["cpu_seconds"]
    if idle_s > 0:
        await asyncio.sleep(idle_s)
    after = tree_usage()
    return {
        "cpu_at_start": after["cpu_seconds"],
        "cpu_at_start_flow_process": after["cpu_seconds_flow_process"],
        "idle_cpu_per_s": round((after["cpu_seconds"] - before) / idle_s, 4) if idle_s else 0.0,
        # What the processes hold before any work: imports, the server's start.
        "mib_at_start_flow_process": after["peak_mib_flow_process"],
        "mib_at_start_server": round(after["peak_mib"] - after["peak_mib_flow_process"], 1),
    }


# --- the two sides, each in its own process -------------------------------------------


def machine_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # not idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _prefect_env(
    base_url: str, time_scale: float, rate_limit: int, api_url: str | None = None
) -> None:
    """A private embedded Prefect server (or the one at ``api_url``), and our client
    pointed at the simulator."""
    home = tempfile.mkdtemp(prefix="sora2-bench-")
    os.environ.update(
        {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "NANOPHOTO_BASE_URL": base_url,
            "NANOPHOTO_API_KEY": KEY,
            "NANOPHOTO_RATE_LIMIT": str(rate_limit),
            # The schedule and the rate window are in NanoPhoto's seconds: this scales both.
            "NANOPHOTO_TIME_SCALE": str(time_scale),
            # The videos go to temporary folders: the worker's output folder holds them.
            "SORA2_OUTPUT_ROOT": tempfile.gettempdir(),
        }
    )
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    else:
        os.environ.pop("PREFECT_API_URL", None)


async def _run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """The batch flow, topics in, cut off at the horizon."""
    _prefect_env(args.base_url, args.time_scale, RATE_LIMIT_PER_HOUR)
    from flows.batch import BatchItem, batch_of_videos
    from nanophoto.watch import WatchSchedule
    from tasks.ratelimit import create_rate_limit

    imported_mib = tree_usage()["peak_mib_flow_process"]  # the flows, Prefect's client, httpx
    await create_rate_limit(RATE_LIMIT_PER_HOUR, reset=True)  # also starts the embedded server
    start = await _at_start()
    planned = _record_planned_checks(args.time_scale)
    count = int(args.hours * 45)  # more than the budget can make
    items = [BatchItem(topic=f"{TOPICS[i % len(TOPICS)]} (take {i})") for i in range(count)]
    output = tempfile.mkdtemp(prefix="sora2-bench-videos-")
    started_wall, started = time.time(), time.monotonic()
    run = asyncio.create_task(
        batch_of_videos(
            items=items,
            max_in_flight=args.max_in_flight,
            schedule=WatchSchedule(),
            output_dir=output,
        )
    )
    done, _ = await asyncio.wait({run}, timeout=args.hours * RATE_WINDOW_S * args.time_scale)
    if not done:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    from prefect import get_client

    async with get_client() as client:
        held = (await client.read_global_concurrency_limit_by_name("nanophoto-api")).active_slots
    return {
        "started_wall": started_wall,
        "elapsed": time.monotonic() - started,
        "held": held,
        "planned_checks": planned,
        "mib_flow_imports": imported_mib,
        **start,
    }


def _record_planned_checks(time_scale: float) -> dict[str, float]:
    """Each video's last planned check, in the API's seconds after its submit (benchmark
    only: the planner is wrapped), so that detection delay splits into the wait the planner
    chose and the lag of the check behind its plan."""
    from nanophoto.planner import BudgetPlanner

    planned: dict[str, float] = {}
    check_time = BudgetPlanner.check_time

    def recorded(planner: BudgetPlanner, task_id: str, index: int, elapsed: float) -> float:
        seconds = check_time(planner, task_id, index, elapsed)
        planned[task_id] = round(seconds / time_scale, 1)
        return seconds

    BudgetPlanner.check_time = recorded  # type: ignore[method-assign,assignment]
    return planned


async def _run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.baseline import run_baseline

    start = await _at_start(0.0)  # no server: nothing runs while it waits
    started_wall = time.time()
    result = await run_baseline(
        args.base_url,
        KEY,
        TOPICS,
        time_scale=args.time_scale,
        horizon_s=args.hours * RATE_WINDOW_S * args.time_scale,
        pause_after_failure_s=20.0,
    )
    return {
        "started_wall": started_wall,
        "elapsed": result["elapsed_s"],
        "tool": result,
        **start,
    }


async def _run_scale(args: argparse.Namespace) -> dict[str, Any]:
    """``videos`` ready prompts in one batch, all in flight, to the end."""
    limit = 1_000_000
    _prefect_env(args.base_url, args.time_scale, limit, args.api_url)
    from flows.batch import BatchItem, batch_of_videos
    from nanophoto.watch import WatchSchedule
    from tasks.ratelimit import create_rate_limit

    await create_rate_limit(limit, reset=True)
    items = [BatchItem(prompt=f"Shot {i}: a paper boat in the rain") for i in range(args.videos)]
    output = tempfile.mkdtemp(prefix="sora2-bench-scale-")
    started_wall, started = time.time(), time.monotonic()
    summary = await batch_of_videos(
        items=items,
        max_in_flight=args.videos,
        schedule=WatchSchedule(),
        output_dir=output,
    )
    return {
        "started_wall": started_wall,
        "elapsed": time.monotonic() - started,
        "delivered": summary.delivered,
        "failed": summary.failed,
    }


def arm_main(args: argparse.Namespace) -> int:
    """Run one side and print its result as one JSON line."""
    runner = {"ours": _run_ours, "baseline": _run_baseline, "scale": _run_scale}[args.arm]

    async def run_and_exit() -> None:
        if args.profile:
            import cProfile

            from benchmarks.profile import count_calls, prefect_counts, summarize

            calls = count_calls()
            profiler = cProfile.Profile(time.thread_time)  # CPU, not waiting
            main_thread = time.thread_time()
            profiler.enable()
            result = await runner(args)
            profiler.disable()
            profiler.dump_stats(args.profile.with_suffix(".pstats"))  # for pstats or snakeviz
            by_group, top = summarize(profiler)
            figures = {
                "cpu_by_group": by_group,
                "top_functions": top,
                "cpu_main_thread": time.thread_time() - main_thread,
                "calls": dict(calls),
                "prefect": await prefect_counts(),  # what the flow left on its server
            }
            args.profile.write_text(json.dumps(figures))
        else:
            result = await runner(args)
        result.update(tree_usage())
        print(RESULT + json.dumps(result), flush=True)
        # Out at once, measured: not after Prefect's shutdown (its server, its threads).
        os._exit(0)

    asyncio.run(run_and_exit())
    return 1


# --- the runs, and the table ----------------------------------------------------------


def _arm(arm: str, base_url: str, log: Path, **options: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "benchmarks.batch", "--arm", arm, "--base-url", base_url]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, start_new_session=True
    )


def _result(process: subprocess.Popen[str], name: str, log: Path) -> dict[str, Any]:
    """The side's result line; then its whole process group goes (its Prefect server too)."""
    assert process.stdout is not None
    try:
        for line in process.stdout:  # not to EOF: the server it started holds the pipe open
            if line.startswith(RESULT):
                parsed: dict[str, Any] = json.loads(line.removeprefix(RESULT))
                return parsed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    raise SystemExit(f"the {name} side printed no result (exit {process.returncode}); see {log}")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _side(ledger: dict[str, Any], result: dict[str, Any], hours: float) -> dict[str, Any]:
    """The figures of one side, from its simulator's ledger and its process."""
    tasks = ledger["tasks"]
    seen = [t for t in tasks if t["status"] == "completed" and t["reported_at"] is not None]
    delays = [t["detection_delay"] for t in seen]
    requests = ledger["total_requests"]
    videos = len(seen)
    return {
        "videos": videos,
        "videos_per_hour": round(videos / hours, 1),
        "requests": requests,
        "requests_per_video": round(requests / videos, 2) if videos else None,
        "http_429": sum(ledger["rate_limited"].values()),
        "submits": ledger["submits"],
        "paid_not_seen": ledger["submits"] - videos,
        "checks_per_video": round(sum(t["status_checks"] for t in seen) / videos, 2)
        if videos
        else None,
        "checked_more_than_once": sum(t["status_checks"] > 1 for t in seen),
        "detection_p50": _percentile(delays, 0.5),
        "detection_p95": _percentile(delays, 0.95),
        **_check_lag(seen, result.get("planned_checks")),
        **_cpu_per_video(result, videos),
        "peak_mib": result["peak_mib"],
        "peak_mib_flow_process": result["peak_mib_flow_process"],
        "peak_mib_server": round(result["peak_mib"] - result["peak_mib_flow_process"], 1),
        "mib_at_start_flow_process": result.get("mib_at_start_flow_process"),
        "mib_at_start_server": result.get("mib_at_start_server"),
        "mib_flow_imports": result.get("mib_flow_imports"),
    }


def _check_lag(seen: list[dict[str, Any]], planned: dict[str, float] | None) -> dict[str, Any]:
    """How long after its planned time the check that saw each video reached the API
    (simulated s): our own latency (task run, budget lease, request), which a compressed
    clock multiplies (at 1/100, one real second is 100 simulated ones)."""
    if planned is None:
        return {}
    lags = [
        t["reported_at"] - t["submitted_at"] - planned[t["task_id"]]
        for t in seen
        if t["task_id"] in planned
    ]
    p50, p95 = _percentile(lags, 0.5), _percentile(lags, 0.95)
    return {
        "check_lag_p50": None if p50 is None else round(p50),
        "check_lag_p95": None if p95 is None else round(p95),
    }


def _cpu_per_video(result: dict[str, Any], videos: int) -> dict[str, float | None]:
    """CPU seconds per video: with the start, during the work, and above an idle tree."""
    if not videos:
        return dict.fromkeys(("cpu_s_per_video_all", "cpu_s_per_video", "cpu_s_per_video_work"))
    during = result["cpu_seconds"] - result["cpu_at_start"]
    idle = result["idle_cpu_per_s"] * result["elapsed"]
    flow = result["cpu_seconds_flow_process"] - result.get(
        "cpu_at_start_flow_process", result["cpu_at_start"]
    )
    return {
        "cpu_s_per_video_all": round(result["cpu_seconds"] / videos, 3),
        "cpu_s_per_video": round(during / videos, 3),
        "cpu_s_per_video_flow_process": round(flow / videos, 3),
        "cpu_s_per_video_server": round((during - flow) / videos, 3),
        "cpu_s_per_video_work": round(max(0.0, during - idle) / videos, 3),
        "idle_cpu_per_s": result["idle_cpu_per_s"],
    }


def rate_run(hours: float, time_scale: float, max_in_flight: int, logs: Path) -> dict[str, Any]:
    """Baseline and ours, side by side, each on its own simulator with the 100/h limit."""

    def config(seed: int) -> SimulatorConfig:
        return SimulatorConfig(keys={KEY: 10**7}, time_scale=time_scale, seed=seed)

    with SimulatorThread(config(1)) as base_sim, SimulatorThread(config(2)) as our_sim:
        options = {"hours": hours, "time_scale": time_scale}
        baseline = _arm("baseline", base_sim.base_url, logs / "baseline.log", **options)
        ours = _arm(
            "ours", our_sim.base_url, logs / "ours.log", max_in_flight=max_in_flight, **options
        )
        base_result = _result(baseline, "baseline", logs / "baseline.log")
        our_result = _result(ours, "ours", logs / "ours.log")
        return {
            "time_scale": time_scale,
            "baseline": _side(base_sim.snapshot(), base_result, hours),
            "ours": _side(our_sim.snapshot(), our_result, hours),
        }


def scale_run(
    videos: int, time_scale: float, logs: Path, api_url: str | None = None
) -> dict[str, Any]:
    """``videos`` in flight at once; wall time against the ideal, and where it went.

    With ``api_url``, the flow's process uses that Prefect server (the cluster)
    instead of starting an embedded one; the machine's CPU is then what tells
    the server's share, with the simulator's (which runs here) and the rest.
    """
    config = SimulatorConfig(keys={KEY: 10**7}, time_scale=time_scale, seed=3, rate_limit=1_000_000)
    log = logs / ("scale-cluster.log" if api_url else "scale.log")
    options: dict[str, Any] = {"videos": videos, "time_scale": time_scale}
    if api_url:
        options["api_url"] = api_url
    with SimulatorThread(config) as sim:
        origin = time.time()
        machine_before = machine_cpu_seconds()
        process = _arm("scale", sim.base_url, log, **options)
        result = _result(process, "scale", log)
        machine = machine_cpu_seconds() - machine_before
        ledger = sim.snapshot()
    tasks = ledger["tasks"]
    start = (result["started_wall"] - origin) / time_scale  # simulated s, ledger's clock
    end = start + result["elapsed"] / time_scale
    longest = max(t["generation_seconds"] for t in tasks)
    ideal = (longest + 20.0) * time_scale
    delays = [t["detection_delay"] for t in tasks if t["detection_delay"] is not None]
    last_submit = max(t["submitted_at"] for t in tasks)
    last_seen = max(t["reported_at"] for t in tasks if t["reported_at"] is not None)

    def real(simulated: float | None) -> float | None:
        return None if simulated is None else round(simulated * time_scale, 2)

    return {
        "server": "cluster (PostgreSQL, Redis, 2 API replicas)" if api_url else "embedded",
        "videos": videos,
        "delivered": result["delivered"],
        "wall_s": round(result["elapsed"], 1),
        "ideal_s": round(ideal, 1),
        "over_ideal": round(result["elapsed"] / ideal - 1, 3),
        "submits_done_after_s": real(last_submit - start),
        "detection_p50_s": real(_percentile(delays, 0.5)),
        "detection_p95_s": real(_percentile(delays, 0.95)),
        "detection_max_s": real(max(delays) if delays else None),
        "after_last_seen_s": real(end - last_seen),
        "requests": ledger["total_requests"],
        "http_429": sum(ledger["rate_limited"].values()),
        "cpu_seconds": result["cpu_seconds"],
        "cpu_seconds_flow_process": result["cpu_seconds_flow_process"],
        "cpu_seconds_prefect_server": result["cpu_seconds_prefect_server"],
        "cpu_cores_busy": round(result["cpu_seconds"] / result["elapsed"], 2),
        # From the flow's start to its end, everything: its process, the server (embedded
        # or cluster), the simulator, and whatever else this machine ran meanwhile.
        "cpu_seconds_machine": round(machine, 1),
        "peak_mib": result["peak_mib"],
    }


# Each row: label, figure, and the goal issue 15 set for ours (None: no goal).
ROWS: tuple[tuple[str, str, str | None], ...] = (
    ("videos completed per simulated hour", "videos_per_hour", ">= 31"),
    ("videos seen done", "videos", None),
    ("requests per video", "requests_per_video", None),
    ("429 answers", "http_429", "0"),
    ("paid, not seen done", "paid_not_seen", None),
    ("detection delay p50 (simulated s)", "detection_p50", "<= 200"),
    ("detection delay p95 (simulated s)", "detection_p95", "<= 400"),
    ("  the check's lag behind its plan, p50", "check_lag_p50", None),
    ("  the check's lag behind its plan, p95", "check_lag_p95", None),
    ("CPU s per video, with the start", "cpu_s_per_video_all", None),
    ("orchestration CPU s per video", "cpu_s_per_video", "<= 0.15"),
    ("  of it the flow's own process", "cpu_s_per_video_flow_process", None),
    ("  of it the embedded Prefect server", "cpu_s_per_video_server", None),
    ("  of it above an idle server", "cpu_s_per_video_work", None),
    ("peak memory, MiB", "peak_mib", "<= 200"),
    ("  of it the flow's own process", "peak_mib_flow_process", None),
    ("    of it before the batch (imports)", "mib_at_start_flow_process", None),
    ("      of which the flows, Prefect's client", "mib_flow_imports", None),
    ("  of it the embedded Prefect server", "peak_mib_server", None),
    ("    of it before the batch (its start)", "mib_at_start_server", None),
)


def _ratio(ours: Any, baseline: Any) -> str:
    """ours / baseline, as the benchmark reports every figure."""
    if not isinstance(ours, int | float) or not isinstance(baseline, int | float):
        return "-"
    if baseline == 0:
        return "=" if ours == 0 else "-"
    return f"{ours / baseline:.2f}x"


def _table(rate: dict[str, Any], hours: float) -> str:
    lines = [
        f"Rate run: {hours:g} simulated hours, {RATE_LIMIT_PER_HOUR} requests/hour, "
        f"generations {GENERATION_RANGE_S[0]:g}-{GENERATION_RANGE_S[1]:g} s",
        f"| {'':42} | {'baseline (published tool)':>26} | {'ours (batch flow)':>18} "
        f"| {'ours / baseline':>15} | {'goal':>8} |",
        f"|{'-' * 44}|{'-' * 28}|{'-' * 20}|{'-' * 17}|{'-' * 10}|",
    ]
    for label, key, goal in ROWS:
        base, ours = rate["baseline"].get(key), rate["ours"].get(key)
        cells = ["-" if value is None else str(value) for value in (base, ours)]
        lines.append(
            f"| {label:42} | {cells[0]:>26} | {cells[1]:>18} | {_ratio(ours, base):>15} "
            f"| {goal or '':>8} |"
        )
    idle = rate["ours"].get("idle_cpu_per_s")
    if idle is not None:
        lines.append(
            f"(ours: an idle Prefect server and flow process spend {idle:g} CPU s per real "
            "second; at this time scale an hour lasts "
            f"{RATE_WINDOW_S * rate['time_scale']:g} s)"
        )
    ours = rate["ours"]
    if ours.get("mib_flow_imports") and ours.get("mib_at_start_flow_process"):
        server_code = ours["mib_at_start_flow_process"] - ours["mib_flow_imports"]
        added = ours["peak_mib"] - ours["mib_at_start_flow_process"] - ours["mib_at_start_server"]
        lines.append(
            f"(ours: {server_code:.0f} MiB of the flow process's start is Prefect's server code, "
            "which its embedded mode imports into the flow's process to start the server; "
            f"the batch itself added {added:.0f} MiB "
            "to the two processes)"
        )
    return "\n".join(lines)


def _scale_on_cluster(videos: int, logs: Path) -> dict[str, Any]:
    """The scale run against ``make cluster-up``'s topology (one flow process, one API
    replica): the goal issue 15 sets where the embedded server cannot meet it."""
    from benchmarks.topology import cluster

    print(f"scale run on the cluster: {videos} videos ...", flush=True)
    try:
        with cluster(logs) as (apis, _):
            return scale_run(videos, 0.1, logs, api_url=apis[0])
    except SystemExit as error:  # no PostgreSQL or Redis to be had here: say so
        return {"server": "cluster", "skipped": str(error)[:500]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__)
    parser.add_argument("--hours", type=float, default=3.0, help="simulated hours (rate run)")
    parser.add_argument("--time-scale", type=float, default=None)
    parser.add_argument("--max-in-flight", type=int, default=12)
    parser.add_argument("--videos", type=int, default=500, help="videos in the scale run")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-rate", action="store_true")
    parser.add_argument(
        "--skip-cluster", action="store_true", help="the scale run on the embedded server only"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--arm", choices=["ours", "baseline", "scale"], help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        args.time_scale = args.time_scale or 0.01
        return arm_main(args)
    logs = Path(tempfile.mkdtemp(prefix="sora2-bench-logs-"))
    figures: dict[str, Any] = {}
    if not args.skip_rate:
        scale = args.time_scale or 0.01
        print(f"rate run: {args.hours:g} simulated hours at time scale {scale:g} ...", flush=True)
        figures["rate"] = rate_run(args.hours, scale, args.max_in_flight, logs)
        print(_table(figures["rate"], args.hours), flush=True)
    if not args.skip_scale:
        print(f"scale run: {args.videos} videos in flight at time scale 0.1 ...", flush=True)
        figures["scale"] = scale = scale_run(args.videos, 0.1, logs)
        print(json.dumps(scale, indent=2), flush=True)
        if not args.skip_cluster:
            figures["scale_cluster"] = _scale_on_cluster(args.videos, logs)
            print(json.dumps(figures["scale_cluster"], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
