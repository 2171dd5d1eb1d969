"""Benchmarks behind `zoo bench`: speed and memory are measured here, never in tests.

Each benchmark is a function taking keyword arguments and returning a flat dict of measured
numbers; `BENCHMARKS` maps its name to `module:function`.
"""

from __future__ import annotations

import inspect
from typing import Any

from zoo.hub import import_object

BENCHMARKS: dict[str, str] = {
    "io.iter_frames_memory": "zoo.bench.io:bench_iter_frames_memory",
    "stream_diffvsr.memory": "zoo.bench.stream_diffvsr:bench_stream_memory",
}


def run_benchmark(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run the benchmark `name` with keyword arguments; unknown names or arguments raise ValueError."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS) or '(none)'}")
    fn = import_object(BENCHMARKS[name])
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"benchmark {name!r} takes no argument(s) {', '.join(unknown)}; it takes {', '.join(params)}")
    return {"benchmark": name, **fn(**kwargs)}
