"""zoo.components.upscaler: input validation and dataclass config round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import zoo
import zoo.components.upscaler as upscaler_module
from zoo.components.upscaler import (
    check_frame,
    check_frames,
    compile_settings,
    config_from_dict,
    config_to_dict,
    use_tf32,
)


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


def test_tf32_is_set_for_cuda_devices_only() -> None:
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:  # process-wide flags (not monkeypatch-able: torch resolves them through __getattr__)
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
        use_tf32(torch.device("cpu"))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        use_tf32(torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_moving_a_pipeline_checks_its_device_for_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(upscaler_module, "use_tf32", seen.append)
    zoo.load("stream_diffvsr", pretrained=False, variant="tiny").to("cpu")
    assert seen and all(device == torch.device("cpu") for device in seen)


@pytest.mark.parametrize(("value", "settings"), [
    (False, None),
    (True, {"mode": "default", "dynamic": False}),
    ({"backend": "eager"}, {"backend": "eager", "mode": "default", "dynamic": False}),
    ({"mode": "max-autotune-no-cudagraphs"}, {"mode": "max-autotune-no-cudagraphs", "dynamic": False}),
    ({"options": {"max_autotune": True}}, {"options": {"max_autotune": True}, "dynamic": False}),
])
def test_compile_option_values(value, settings) -> None:
    assert compile_settings(value) == settings


@pytest.mark.parametrize("value", ["yes", None, {"modes": "default"}])
def test_bad_compile_option_values_are_refused(value) -> None:
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        compile_settings(value)
