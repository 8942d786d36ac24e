"""A local stand-in for the NanoPhoto Sora 2 API, for tests, demos and benchmarks.

It lives beside the client (``nanophoto``), not inside it: the client never
needs it, and it is faithful to ``shared/nanophoto-api.md``, not to what the
client wishes. The server is imported on first use, so a command that only
reads the sandbox's defaults stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nanophoto_simulator.config import (
    DEFAULT_CREDITS,
    DEFAULT_KEY,
    Fault,
    Faults,
    SimulatorConfig,
)

if TYPE_CHECKING:
    from nanophoto_simulator.server import FAULTS_BY_ENDPOINT, Simulator, SimulatorThread

__all__ = [
    "DEFAULT_CREDITS",
    "DEFAULT_KEY",
    "FAULTS_BY_ENDPOINT",
    "Fault",
    "Faults",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
]


def __getattr__(name: str) -> Any:
    if name in ("FAULTS_BY_ENDPOINT", "Simulator", "SimulatorThread"):
        from nanophoto_simulator import server

        return getattr(server, name)
    raise AttributeError(f"module 'nanophoto_simulator' has no attribute {name!r}")
