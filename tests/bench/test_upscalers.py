"""zoo.bench.upscalers through `zoo bench`: runs, reports, rejects bad arguments (numbers are not checked)."""

from __future__ import annotations

import pytest

from zoo.bench import BENCHMARKS, run_benchmark
from zoo.hub import list_models


def test_every_registered_benchmark_imports():
    from zoo.hub import import_object

    for target in BENCHMARKS.values():
        assert callable(import_object(target))


@pytest.mark.parametrize("name", list_models())
def test_speed_streams_every_frame(name):
    result = run_benchmark("upscalers.speed", name=name, frames=3, size=(16, 24))
    assert result["benchmark"] == "upscalers.speed" and result["frames"] == 3
    assert result["first_frame_s"] > 0 and result["seconds_per_frame"] > 0


def test_bad_arguments_are_one_sentence():
    with pytest.raises(ValueError, match="takes no argument\\(s\\) colour"):
        run_benchmark("upscalers.speed", colour="red")
    with pytest.raises(ValueError, match="frames must be at least 2"):
        run_benchmark("upscalers.speed", frames=1)
