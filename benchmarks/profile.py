"""Where the orchestration CPU of one video goes: the batch flow under a profiler.

Runs our side of the rate run (``benchmarks.batch``: 100 requests an hour,
generations 120-480 s, time compressed 100x) for ``--hours`` simulated hours
with ``cProfile`` on in the flow's process, then prints, per video seen done:

* the flow process's CPU by where the code lives (Prefect, pydantic, httpx and
  anyio, asyncio, ours, ...), and the Prefect server's CPU beside it;
* how often the costly things happen: task runs by name, events by type, log
  lines shipped, artifacts, budget leases and their releases, record writes,
  planner decisions.

Run: ``python -m benchmarks.profile`` (``make bench`` runs it for 1 hour).
The profiler slows the flow's process down: read the shares and the counts,
not the wall time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from nanophoto.contract import RATE_LIMIT_PER_HOUR
from nanophoto_simulator import SimulatorConfig, SimulatorThread

# Where a function's file lives -> the group its CPU is counted in (first match wins).
GROUPS = (
    ("/prefect/server/", "prefect (in-process server code)"),
    ("/prefect/", "prefect"),
    ("/pydantic", "pydantic"),
    ("/httpx/", "httpx, httpcore, anyio"),
    ("/httpcore/", "httpx, httpcore, anyio"),
    ("/anyio/", "httpx, httpcore, anyio"),
    ("/h11/", "httpx, httpcore, anyio"),
    ("/asyncio/", "asyncio"),
    ("/sqlalchemy/", "sqlalchemy"),
    ("/fsspec/", "fsspec"),
    ("/flows/", "ours (flows, tasks, nanophoto)"),
    ("/tasks/", "ours (flows, tasks, nanophoto)"),
    ("/nanophoto/", "ours (flows, tasks, nanophoto)"),
    ("/site-packages/", "other packages"),
    ("/python3", "python standard library"),
)
# The costly things counted, as (module, class or None, function): wrapped while the flow
# runs (benchmark only), since a profiler counts each resumption of a coroutine as a call.
COUNTED = {
    "lease calls to the server": (
        "prefect.client.orchestration",
        "PrefectClient",
        "increment_concurrency_slots_with_lease",
    ),
    "lease releases": (
        "prefect.client.orchestration",
        "PrefectClient",
        "release_concurrency_slots_with_lease",
    ),
    "lease renewals (a spare lease reused, or a request still under way)": (
        "prefect.client.orchestration",
        "PrefectClient",
        "renew_concurrency_lease",
    ),
    "progress bar updates": ("tasks.observe", None, "aupdate_progress_artifact"),
    "record reads": ("tasks.submissions", "SubmissionStore", "read"),
    "record writes": ("tasks.submissions", "SubmissionStore", "write"),
    "planner check times": ("nanophoto.planner", "BudgetPlanner", "check_time"),
    "planner is_binding passes": ("nanophoto.planner", "BudgetPlanner", "is_binding"),
    "video events emitted": ("tasks.observe", None, "emit_video_event"),
    "log records to the API": ("prefect.logging.handlers", "APILogHandler", "emit"),
}


def count_calls() -> Counter[str]:
    """Wrap each COUNTED function so that its calls are counted here."""
    import functools
    import importlib
    import inspect

    counts: Counter[str] = Counter()
    for label, (module_name, class_name, name) in COUNTED.items():
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        original = getattr(owner, name)

        def wrap(original: Any, label: str) -> Any:
            if inspect.iscoroutinefunction(original):

                @functools.wraps(original)
                async def counted_async(*args: Any, **kwargs: Any) -> Any:
                    counts[label] += 1
                    return await original(*args, **kwargs)

                return counted_async

            @functools.wraps(original)
            def counted(*args: Any, **kwargs: Any) -> Any:
                counts[label] += 1
                return original(*args, **kwargs)

            return counted

        setattr(owner, name, wrap(original, label))
    return counts


TOP_FUNCTIONS = 12


def group_of(filename: str) -> str:
    """The group a function's CPU counts in."""
    for fragment, group in GROUPS:
        if fragment in filename:
            return group
    return "built-in functions" if filename == "~" else "other"


def summarize(profile: cProfile.Profile) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """The main thread's CPU seconds by group, and its costliest functions (own time)."""
    stats = pstats.Stats(profile)
    by_group: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    for (filename, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        by_group[group_of(filename)] += row[2]
        where = "/".join(Path(filename).parts[-2:]) if filename != "~" else ""
        by_function[f"{name} ({where}:{line})" if where else name] += row[2]
    return dict(by_group), [(f, float(t)) for f, t in by_function.most_common(TOP_FUNCTIONS)]


async def prefect_counts() -> dict[str, Any]:
    """What the flow left on its Prefect server: task runs by name, events by type,
    log lines, artifacts."""
    from prefect import get_client

    async with get_client() as client:
        http = client._client
        names: Counter[str] = Counter()
        offset = 0
        while True:
            page = await http.post("/task_runs/filter", json={"limit": 200, "offset": offset})
            runs = page.json()
            names.update(run["name"].rsplit("-", 1)[0] for run in runs)
            if len(runs) < 200:
                break
            offset += 200
        logs = offset = 0
        while True:
            page = await http.post("/logs/filter", json={"limit": 200, "offset": offset})
            logs += len(page.json())
            if len(page.json()) < 200:
                break
            offset += 200
        events = (
            await http.post(
                "/events/count-by/event",
                json={"filter": {}, "time_unit": "day", "time_interval": 1.0},
            )
        ).json()
        artifacts = (await http.post("/artifacts/count", json={})).json()
    return {
        "task_runs": dict(names),
        "events": {row["value"]: row["count"] for row in events},
        "log_lines": logs,
        "artifacts": artifacts,
    }


def report(figures: dict[str, Any]) -> str:
    """The per-video table."""
    videos = max(1, figures["videos"])
    lines = [
        f"Profile: {figures['hours']:g} simulated hours, {figures['videos']} videos seen done; "
        f"flow process {figures['cpu_flow']:.1f} CPU-s (under the profiler), Prefect server "
        f"{figures['cpu_server']:.1f} CPU-s",
        "",
        "| flow process, main thread, by code (own time) | CPU-s per video | share |",
        "|---|---:|---:|",
    ]
    total = sum(figures["cpu_by_group"].values()) or 1.0
    for group, seconds in sorted(figures["cpu_by_group"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {seconds / videos:.3f} | {seconds / total:.0%} |")
    others = max(0.0, figures["cpu_flow"] - figures["cpu_main_thread"]) / videos
    lines.append(f"| the flow process's other threads (Prefect's workers) | {others:.3f} | |")
    server = figures["cpu_server"] / videos
    lines.append(f"| Prefect server process (not profiled) | {server:.3f} | |")
    lines += ["", "| costliest functions, main thread (own time) | CPU-s per video |", "|---|---:|"]
    for function, seconds in figures["top_functions"]:
        lines.append(f"| `{function}` | {seconds / videos:.3f} |")
    lines += ["", "| what happened | per video |", "|---|---:|"]
    for label in COUNTED:
        lines.append(f"| {label} | {figures['calls'].get(label, 0) / videos:.1f} |")
    counts = figures["prefect"]
    for name, count in sorted(counts["task_runs"].items()):
        lines.append(f"| task runs: {name} | {count / videos:.1f} |")
    for name, count in sorted(counts["events"].items(), key=lambda kv: -kv[1])[:8]:
        lines.append(f"| events: {name} | {count / videos:.1f} |")
    lines.append(f"| log lines stored | {counts['log_lines'] / videos:.1f} |")
    lines.append(f"| artifacts | {counts['artifacts'] / videos:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run our side under the profiler and print where its CPU goes."""
    from benchmarks.batch import KEY, _arm, _result, _side

    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--hours", type=float, default=1.0, help="simulated hours")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="sora2-profile-"))
    out = logs / "profile.json"
    config = SimulatorConfig(keys={KEY: 10**7}, time_scale=0.01, seed=2)
    print(f"profile: {args.hours:g} simulated hours of the batch flow under cProfile ...")
    with SimulatorThread(config) as sim:
        process = _arm(
            "ours",
            sim.base_url,
            logs / "ours.log",
            hours=args.hours,
            time_scale=0.01,
            max_in_flight=12,
            profile=out,
        )
        result = _result(process, "ours", logs / "ours.log")
        side = _side(sim.snapshot(), result, args.hours)
    figures = json.loads(out.read_text())
    figures.update(
        hours=args.hours,
        videos=side["videos"],
        cpu_flow=result["cpu_seconds_flow_process"],
        cpu_server=result["cpu_seconds_prefect_server"],
        rate_limit=RATE_LIMIT_PER_HOUR,
    )
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
