"""``make bench``: run every benchmark, show its output as it comes, and write it into
BENCHMARKS.md's generated section, so the file holds the figures of the last run.

The section lies between two markers (``BEGIN`` and ``END``); everything else in the
file (what the figures mean, earlier runs) is written by hand and kept. Each step's
standard output goes into the section under the command that printed it, with the
date, the commit and the machine; its standard error (the flows' logs) only to the
terminal. A step that fails is reported there and the others still run; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BEGIN = "<!-- make bench writes from here to its end marker: do not edit by hand -->"
END = "<!-- make bench: end of the generated section -->"
BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def steps(batch_args: Sequence[str]) -> list[list[str]]:
    """The benchmarks, in order, as ``python -m`` arguments."""
    return [
        ["-m", "benchmarks.cli_status"],
        ["-m", "benchmarks.batch", *batch_args],
        # Where the orchestration CPU of a video goes: events, logs, leases, records.
        ["-m", "benchmarks.profile"],
        # 10/20/40 runs at once: the embedded SQLite server against `make cluster-up`'s.
        ["-m", "benchmarks.topology"],
    ]


def run_step(arguments: list[str]) -> tuple[int, str]:
    """Run one benchmark with this Python; its output is shown as it comes and kept."""
    process = subprocess.Popen(
        [sys.executable, *arguments], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    kept: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if not line.startswith("logs: "):  # a temporary folder, gone by the time it is read
            kept.append(line)
    return process.wait(), "".join(kept)


def _git(*arguments: str) -> str:
    try:
        done = subprocess.run(["git", *arguments], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def machine() -> str:
    """``2 cores, Intel(R) Xeon(R) ...; load 0.12 0.30 0.40 at the start``."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores, {model}; load {load} at the start"


def section(results: list[tuple[list[str], int, str]], header: str) -> str:
    """The generated section: the run's header, then each command and what it printed."""
    parts = [BEGIN, "", "## The last `make bench`", "", header, ""]
    for arguments, status, output in results:
        command = shlex.join(["python", *arguments])
        parts.append(f"### `{command}`" + ("" if status == 0 else f" (failed: exit {status})"))
        parts += ["", "```text", output.rstrip("\n"), "```", ""]
    parts.append(END)
    return "\n".join(parts) + "\n"


def splice(document: str, generated: str) -> str:
    """``document`` with its generated section replaced (or appended, if it has none)."""
    start, end = document.find(BEGIN), document.find(END)
    if start == -1 or end == -1 or end < start:
        return document.rstrip("\n") + "\n\n" + generated
    return document[:start] + generated + document[end + len(END) :].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-args", default="", help="passed to benchmarks.batch")
    parser.add_argument("--output", type=Path, default=BENCHMARKS_MD)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    header = (
        f"Run on {started:%Y-%m-%d %H:%M} UTC, at commit {_git('rev-parse', '--short', 'HEAD')}"
        + (" with uncommitted changes" if _git("status", "--porcelain") else "")
        + f", on {machine()}."
    )
    results = []
    for arguments in steps(shlex.split(args.batch_args)):
        status, output = run_step(arguments)
        results.append((arguments, status, output))
    if not args.no_write:
        args.output.write_text(splice(args.output.read_text(), section(results, header)))
        print(f"wrote the figures into {args.output}")
    return 0 if all(status == 0 for _, status, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
