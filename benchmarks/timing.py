"""Timing, memory and compile counting shared by the benchmarks (shared machine: interleave, keep min-max)."""
import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np
from jax import monitoring


@dataclasses.dataclass(frozen=True)
class Stat:
    """Seconds of repeated runs after warm-up."""
    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.runs))

    @property
    def lo(self) -> float:
        return min(self.runs)

    @property
    def hi(self) -> float:
        return max(self.runs)

    def json(self) -> dict:
        return dict(median=self.median, min=self.lo, max=self.hi, runs=list(self.runs))


def interleaved(fns: dict[str, Callable[[int], object]], reps: int, warmup: int = 1) -> dict[str, Stat]:
    """Wall seconds of `fn(rep)` for each callable (which must block until its result is ready), `warmup`
    calls each first. The callables take turns every round, so load from other processes on a shared
    machine falls on all of them alike; `rep` lets a callable vary its inputs from run to run."""
    for fn in fns.values():
        for w in range(warmup):
            fn(-1 - w)
    ts = {name: [] for name in fns}
    for r in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(r)
            ts[name].append(time.perf_counter() - t)
    return {name: Stat(tuple(t)) for name, t in ts.items()}


def load() -> str:
    """1-minute load average / cores, e.g. '2.31/2'."""
    return f"{os.getloadavg()[0]:.2f}/{os.cpu_count()}"


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory of this process inside a `with` block (Linux: the high-water mark is reset on
    entry through /proc/self/clear_refs), absolute and above the RSS at entry."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM")
        self.above = self.peak - self.base


class Compiles:
    """Counts XLA backend compilations while registered (a `with` block), and sums the seconds spent
    tracing, lowering and compiling; only of jitted functions whose name contains `fun_name` when given."""
    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self, fun_name: str | None = None):
        self.fun_name, self.count, self.seconds = fun_name, 0, 0.0

    def __call__(self, event: str, duration: float, **kw):
        if event in self.EVENTS and (self.fun_name is None or self.fun_name in kw.get("fun_name", "")):
            self.seconds += duration
            self.count += event == self.EVENTS[-1]

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self)
