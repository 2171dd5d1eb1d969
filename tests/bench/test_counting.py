"""Counting over the real `stream()` of fake-tensor pipelines: FLOPs, operator launches and host syncs.

Every registered model streams at full size (the paper's architecture) with fake weights: any read of a
device value on the host in `stream()` (`.item()`, `bool()`, `.tolist()`, a data-dependent shape) fails.
"""

from __future__ import annotations

import pytest
import torch

import zoo.bench.pipeline as bench
from zoo.bench.bounds import BOUNDS
from zoo.hub import list_models

# Small sizes every full network accepts, and options that keep each run to one chunk of the fewest frames.
SMALL = {"osdenhancer": {"chunk": 9, "chunk_overlap": 1}, "pssr": {"chunk": 5, "chunk_overlap": 1}}


@pytest.mark.parametrize("name", list_models())
def test_full_size_stream_runs_without_a_host_sync(name: str) -> None:
    upscaler, mode = bench.fake_upscaler(name, "full")
    upscaler.configure(**SMALL.get(name, {}))
    frames = [torch.rand(3, 16, 16) for _ in range(2)]
    count = bench.count_stream(upscaler, mode, frames)
    assert count.frames_out == (len(frames) - 1) * upscaler.temporal_scale + 1
    assert count.flops["total"] > 0 and count.launches > 0


def test_a_host_sync_in_stream_fails_the_count(toy, monkeypatch) -> None:
    upscaler, mode = bench.fake_upscaler("toy", "tiny")
    plain = upscaler.stream

    def syncing(frames):
        for frame in plain(frames):
            if bool(frame.isnan().any()):  # one device -> host read per frame
                raise AssertionError("never reached")
            yield frame

    assert bench.count_stream(upscaler, mode, [torch.rand(3, 4, 4)] * 2).frames_out == 2
    monkeypatch.setattr(upscaler, "stream", syncing)
    with pytest.raises(bench.HostSyncError, match="_local_scalar_dense"):
        bench.count_stream(upscaler, mode, [torch.rand(3, 4, 4)] * 2)


def test_launches_and_views_are_counted_per_operator(toy) -> None:
    upscaler, mode = bench.fake_upscaler("toy", "tiny")
    count = bench.count_stream(upscaler, mode, [torch.rand(3, 4, 4) for _ in range(3)])
    # Per frame: upsample, conv, relu, conv, add, clamp launch kernels; frame[None] and [0] are views.
    assert (count.launches, count.views) == (3 * 6, 3 * 2)


def test_the_first_frame_is_host_data_and_later_ones_device_data(toy, monkeypatch) -> None:
    upscaler, mode = bench.fake_upscaler("toy", "tiny")
    plain = upscaler.stream

    def checking_every_frame(frames):
        for frame in frames:
            if not bool(frame.isfinite().all()):
                raise ValueError("frames must be finite")
            yield from plain([frame])

    monkeypatch.setattr(upscaler, "stream", checking_every_frame)
    assert bench.count_stream(upscaler, mode, [torch.rand(3, 4, 4)]).frames_out == 1  # the first: on the host
    with pytest.raises(bench.HostSyncError):
        bench.count_stream(upscaler, mode, [torch.rand(3, 4, 4)] * 2)  # the second: a device read


def test_every_registered_model_states_a_bound() -> None:
    assert set(BOUNDS) == set(list_models())
