"""A local stand-in for the NanoPhoto Sora 2 API, for tests, demos and benchmarks."""

from nanophoto.simulator.config import DEFAULT_KEY, Faults, SimulatorConfig
from nanophoto.simulator.server import FAULT_KINDS, Simulator, SimulatorThread

__all__ = [
    "DEFAULT_KEY",
    "FAULT_KINDS",
    "Faults",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
]
