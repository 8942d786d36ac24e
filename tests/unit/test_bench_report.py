"""``make bench`` writes its figures into BENCHMARKS.md's generated section, and only there."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import report


def test_the_generated_section_is_replaced_and_the_written_text_kept() -> None:
    document = f"# Benchmarks\n\nby hand\n\n{report.BEGIN}\nold figures\n{report.END}\n\nafter\n"
    new = f"{report.BEGIN}\nnew figures\n{report.END}\n"
    spliced = report.splice(document, new)
    assert spliced == f"# Benchmarks\n\nby hand\n\n{new}after\n"
    assert report.splice(spliced, new) == spliced  # a second run changes nothing else
    assert report.splice("# Benchmarks\n", new) == f"# Benchmarks\n\n{new}"


def test_each_steps_output_lands_under_its_command_and_a_failure_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = [
        ["-c", "print('| figure | 1.08 |'); print('logs: ' + '/tmp/gone')"],
        ["-c", "import sys; print('half'); sys.exit(3)"],
    ]
    monkeypatch.setattr(report, "steps", lambda batch_args: fake)
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# B\n\n{report.BEGIN}\nstale figures\n{report.END}\n")
    assert report.main(["--output", str(target)]) == 1
    written = target.read_text()
    assert "| figure | 1.08 |" in written
    assert "half" in written
    assert "logs: /tmp/gone" not in written  # a temporary folder: not kept
    assert "stale figures" not in written
    assert "(failed: exit 3)" in written
    assert written.startswith("# B\n\n")
