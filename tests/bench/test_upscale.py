"""zoo.bench.upscale through `zoo bench`: `zoo upscale` in fresh processes, reported (numbers are not checked)."""

from __future__ import annotations

from zoo.bench import run_benchmark


def test_upscale_memory_runs_the_command_on_both_clips():
    result = run_benchmark("upscale.memory", frames=(1, 2), size=16)
    assert result["frames"] == [1, 2] and len(result["peak_bytes"]) == 2 and result["ratio"] > 0
