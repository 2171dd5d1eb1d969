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
    "upscalers.stream_memory": "zoo.bench.upscalers:bench_stream_memory",
    "upscalers.speed": "zoo.bench.upscalers:bench_speed",
    "upscalers.memory_model": "zoo.bench.upscalers:bench_memory_model",
    "upscalers.kernels": "zoo.bench.upscalers:bench_kernels",
    "upscale.memory": "zoo.bench.upscale:bench_upscale_memory",
}


def describe(benchmark: str) -> str:
    """The first line of a benchmark's docstring."""
    doc = import_object(BENCHMARKS[benchmark]).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def run_benchmark(benchmark: str, /, **kwargs: Any) -> dict[str, Any]:
    """Run `benchmark` with keyword arguments; unknown benchmarks or arguments raise ValueError."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS) or '(none)'}")
    fn = import_object(BENCHMARKS[benchmark])
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"benchmark {benchmark!r} takes no argument(s) {', '.join(unknown)}; "
                         f"it takes {', '.join(params)}")
    return {"benchmark": benchmark, **fn(**kwargs)}
