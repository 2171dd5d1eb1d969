"""zoo.bench.upscalers through `zoo bench`: runs, reports, rejects bad arguments; timings are not checked, kernel
counts are (against the dispatch count)."""

from __future__ import annotations

import pytest
import torch

from zoo.bench import BENCHMARKS, run_benchmark
from zoo.hub import list_models


def test_every_registered_benchmark_imports():
    from zoo.hub import import_object

    for target in BENCHMARKS.values():
        assert callable(import_object(target))


@pytest.mark.parametrize("name", list_models())
def test_speed_streams_every_frame(name, monkeypatch):
    threads = []  # what the benchmark sets, kept from this test's worker
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    result = run_benchmark("upscalers.speed", name=name, frames=3, size=(16, 24))
    assert result["benchmark"] == "upscalers.speed" and result["frames"] == 3
    assert result["threads"] == 1 and threads == [1]  # set, as timing wants it
    assert result["first_frame_s"] > 0 and result["seconds_per_frame"] > 0
    # The whole stream over its output frames (3, or 5 at OSDEnhancer's doubled frame rate), first included.
    whole = result["first_frame_s"] + result["seconds_per_frame"] * (result["frames_out"] - 1)
    assert result["frames_out"] == (5 if name == "osdenhancer" else 3)
    assert result["seconds_per_output_frame"] == pytest.approx(whole / result["frames_out"])


def test_bad_arguments_are_one_sentence():
    with pytest.raises(ValueError, match="takes no argument\\(s\\) colour"):
        run_benchmark("upscalers.speed", colour="red")
    with pytest.raises(ValueError, match="frames must be at least 2"):
        run_benchmark("upscalers.speed", frames=1)
    with pytest.raises(ValueError, match=r"threads must be in \[1, \d+\] \(this machine's cores\), got 0"):
        run_benchmark("upscalers.speed", threads=0)
    with pytest.raises(ValueError, match="frames must be at least 1, got 0"):
        run_benchmark("upscalers.kernels", frames=0)
    with pytest.raises(ValueError, match="compile must be eager, networks, step; got 'bogus'"):
        run_benchmark("upscalers.kernels", compile="bogus")


class _Event:
    """A profiler event: a name and the events it called."""

    def __init__(self, name: str, *children: _Event) -> None:
        self.name, self.cpu_children = name, list(children)


def test_profiled_kernels_count_kernels_not_views_or_composites() -> None:
    from zoo.bench.upscalers import profiled_kernels

    events = [
        _Event("graph_0_cpp_fused_add_silu_0"),  # an inductor kernel
        _Event("aten::linear", _Event("aten::t"), _Event("aten::addmm")),  # composite: its addmm, not its view
        _Event("aten::dropout"),  # composite with nothing under it (inference): no kernel
        _Event("aten::view"), _Event("aten::empty"),  # a view and an allocation
        _Event("## forward ##", _Event("aten::convolution", _Event("aten::mkldnn_convolution"))),  # one call
        _Event("graph_0_cpp_fused_mul_1"),
    ]
    assert profiled_kernels(events) == {"inductor kernel": 2, "aten::addmm": 1, "aten::convolution": 1}


def test_an_eager_kernel_count_agrees_with_the_dispatch_count() -> None:
    from zoo.bench.pipeline import count_stream, fake_upscaler, random_frames

    result = run_benchmark("upscalers.kernels", name="stream_diffvsr", frames=3, size=(16, 16))
    up, mode = fake_upscaler("stream_diffvsr", "tiny")
    count = count_stream(up, mode, list(random_frames(3, 16, 16)))
    # Measured 1691.3 and 1689.7: the profiled run also draws its random frames and reads the first frame's
    # values on the host, which the fake count leaves out.
    assert result["kernels_per_frame"] == pytest.approx(count.launches / count.frames_out, rel=0.02)
