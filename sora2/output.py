"""What a ``sora2`` command prints: JSON documents on stdout, notes and a live line on stderr.

Piped, stdout has only JSON documents and stderr only plain lines (control
characters escaped); on a terminal, stderr also shows a live progress line.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


class Output:
    """Documents on stdout; on a terminal, a live progress line on stderr."""

    def __init__(self, json_only: bool, stdout: IO[str], stderr: IO[str]) -> None:
        self.json_only = json_only
        self.stdout = stdout
        self.stderr = stderr
        self.live = stderr.isatty()
        self._line = False

    def document(self, stage: str, response: dict[str, Any]) -> None:
        """One JSON document: the raw response, or ``{"stage", "response"}``.

        ASCII-escaped, as Python's json does by default, so no control
        character can reach a terminal or a parser through it.
        """
        self._clear()
        body = response if self.json_only else {"stage": stage, "response": response}
        try:
            print(json.dumps(body), file=self.stdout, flush=True)
        except (BrokenPipeError, ValueError):  # the reader left, or stdout is closed
            self.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the command)
            self.note("stdout is closed; carrying on (the task id is on this line)")

    def note(self, message: str) -> None:
        """A line for the person watching, on stderr, with control characters escaped."""
        self._clear()
        print(f"sora2: {printable(message)}", file=self.stderr, flush=True)

    def progress(self, status: str, elapsed: float, next_check: float) -> None:
        """Redraw the live line (terminal only)."""
        if not self.live:
            return
        line = f"{status} · {clock(elapsed)} elapsed · next check in {clock(next_check)}"
        self.stderr.write(f"\r\x1b[K{line}")
        self.stderr.flush()
        self._line = True

    def _clear(self) -> None:
        if self._line:
            self.stderr.write("\r\x1b[K")
            self.stderr.flush()
            self._line = False


class Session:
    """One command's run: where it writes, and what a person must hear if it is cut short.

    Once a task id is known, every note names it, so a paid job is never lost
    from view; while a submit is on its way, an interrupt says it may have
    reached NanoPhoto.
    """

    def __init__(self, out: Output, task_id: str | None = None) -> None:
        self.out = out
        self.task_id = task_id
        self.submitting = False

    def note(self, message: str) -> None:
        """A note on stderr, naming the task if it is known."""
        if self.task_id and self.task_id not in message:
            message = f"{message} [task {self.task_id}]"
        self.out.note(message)

    def interrupted(self) -> int:
        """Say what a Ctrl-C left behind (a submit that may have gone, a task still
        running); the exit code for it."""
        if self.submitting:
            self.note(
                "interrupted during the submit: it may have reached NanoPhoto. Check your "
                "account before submitting again, to avoid paying twice."
            )
        elif self.task_id:
            self.note(
                f"interrupted; {self.task_id} keeps running at NanoPhoto. Pick it up with: "
                f"sora2 resume --task-id {self.task_id}"
            )
        return EXIT_INTERRUPTED


def printable(text: str) -> str:
    """``text`` with every non-printable character shown as an escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def clock(seconds: float) -> str:
    """``2m05s`` or ``45s``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
