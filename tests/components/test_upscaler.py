"""zoo.components.upscaler: input validation and dataclass config round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zoo.components.upscaler import check_frame, check_frames, config_from_dict, config_to_dict


@pytest.mark.parametrize(("frames", "message"), [
    (torch.rand(3, 64, 64), r"frames must be \(T, 3, H, W\) in \[0, 1\], got \(3, 64, 64\)"),
    (torch.rand(2, 4, 8, 8), r"got \(2, 4, 8, 8\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "frames must be floats in"),
    (torch.rand(0, 3, 8, 8), "at least one frame"),
    (torch.full((1, 3, 4, 4), 255.0), r"got values in \[255, 255\]"),
    ([1, 2, 3], r"got list"),
])
def test_check_frames_rejects(frames, message):
    with pytest.raises(ValueError, match=message):
        check_frames(frames)


def test_check_frame_accepts_and_rejects():
    frame = torch.rand(3, 5, 7)
    assert check_frame(frame) is frame
    with pytest.raises(ValueError, match=r"a frame must be \(3, H, W\)"):
        check_frame(torch.rand(1, 3, 5, 7))


@dataclasses.dataclass
class Inner:
    channels: tuple[int, ...] = (1, 2)
    name: str = "x"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    pair: tuple[int, float] = (1, 2.0)
    optional: Inner | None = None
    scale: float = 1.0


def test_config_round_trip_restores_nested_dataclasses_and_tuples():
    config = Outer(inner=Inner(channels=(8, 16, 32)), optional=Inner(name="y"))
    data = config_to_dict(config)
    assert data["inner"] == {"channels": (8, 16, 32), "name": "x"}
    rebuilt = config_from_dict(Outer, {**data, "inner": {"channels": [8, 16, 32], "name": "x"}})
    assert rebuilt == config and isinstance(rebuilt.inner.channels, tuple)
    with pytest.raises(ValueError, match="Outer has no field"):
        config_from_dict(Outer, {"bogus": 1})
