"""A `VideoUpscaler` whose network is bicubic upsampling: the upscale machinery, tested on its own.

Its output on a whole frame is known exactly, so tiled and chunked runs must reproduce it (the
"seams" check), and it is fast enough for the CLI, batch and distributed tests. `register()`
makes it the hub entry "bicubic" in this process; subprocesses call it through `launch.py`.

Test hooks, read from the environment of the process:
- `ZOO_TEST_STREAM_LOG`: a file that gets one line per `stream()` started (pid and frame size);
- `ZOO_TEST_KILL_AT_STREAM`: SIGKILL this process on the 2nd frame of its N-th stream (only the
  process of rank `ZOO_TEST_KILL_RANK` when that is set);
- `ZOO_TEST_SECONDS_PER_FRAME`: sleep that long per frame (a slow model to interrupt).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.components.tiling import ChunkPlan, TilePlan
from zoo.components.upscaler import MemoryModel, VideoUpscaler, check_frame


@dataclasses.dataclass
class BicubicConfig:
    """No settings: bicubic upsampling has no weights."""

    @classmethod
    def tiny(cls) -> BicubicConfig:
        return cls()

    @classmethod
    def full(cls) -> BicubicConfig:
        return cls()


def bicubic(frames: Tensor, scale: int) -> Tensor:
    """`(..., 3, H, W)` -> `(..., 3, sH, sW)`: bicubic upsampling (reads 2 pixels around each output)."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    up = F.interpolate(flat, scale_factor=scale, mode="bicubic", align_corners=False)
    return up.reshape(*frames.shape[:-2], *up.shape[-2:])


class BicubicUpscaler(VideoUpscaler):
    """Bicubic x`scale` per frame, and x`temporal_scale` in time by linear blends of neighbouring frames.

    Every shared option (`scale`, `temporal_scale`, `tile`, `tile_overlap`, `chunk`, `chunk_overlap`,
    `color_fix`) works through `TilePlan` and `ChunkPlan` like in a real pipeline. A chunked stream
    holds the whole clip (its length decides where the last chunk starts); a real chunked pipeline
    would look ahead one chunk instead.
    """

    hub_name = "bicubic"
    config_class = BicubicConfig
    options: ClassVar[dict[str, Any]] = {"scale": 2, "temporal_scale": 1, "tile": None, "tile_overlap": 4,
                                         "chunk": None, "chunk_overlap": 1, "color_fix": "none"}
    scales = (2, 3)
    temporal_scales = (1, 2)
    # Made up (this model has no measured one): 1 KiB per LR pixel, all of it tiled.
    memory = MemoryModel(frame=0.0, tile=1024.0, measured="test double")
    streams_started: ClassVar[int] = 0

    def __init__(self, config: BicubicConfig) -> None:
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device and dtype to follow

    def upscale_frames(self, frames: Tensor) -> Tensor:
        """`(T, 3, H, W)` -> `((T - 1) * temporal_scale + 1, 3, sH, sW)`, in tiles when `tile` is set, colour-fixed."""
        s = self.temporal_scale
        if s > 1:  # output frame o shows time o / s: a blend of the input frames around it
            k = (torch.arange(s, dtype=frames.dtype, device=frames.device) / s)[None, :, None, None, None]
            frames = torch.cat([torch.lerp(frames[:-1, None], frames[1:, None], k).flatten(0, 1), frames[-1:]])
        if self.tile is None:
            hr = bicubic(frames, self.scale)
        else:
            plan = TilePlan(*frames.shape[-2:], self.tile, self.tile_overlap, scale=self.scale, context=2)
            hr = plan.apply(lambda x: bicubic(x, self.scale), frames)
        return self.fix_colors(hr.clamp(0, 1), frames)

    @torch.no_grad()
    def stream(self, frames: Iterable[Tensor]) -> Iterator[Tensor]:
        frames = self._hooked(frames)
        if self.chunk is None and self.temporal_scale == 1:
            for frame in frames:
                yield self.upscale_frames(check_frame(frame)[None])[0]
            return
        clip = [check_frame(frame) for frame in frames]
        if self.chunk is None:
            yield from self.upscale_frames(torch.stack(clip)).unbind(0)
            return
        plan = ChunkPlan(len(clip), self.chunk, self.chunk_overlap, temporal_scale=self.temporal_scale)
        yield from plan.stream(self.upscale_frames, clip)

    def _hooked(self, frames: Iterable[Tensor]) -> Iterator[Tensor]:
        BicubicUpscaler.streams_started += 1
        kill_at = int(os.environ.get("ZOO_TEST_KILL_AT_STREAM", "0"))
        if os.environ.get("ZOO_TEST_KILL_RANK", os.environ.get("LOCAL_RANK", "0")) != os.environ.get("LOCAL_RANK", "0"):
            kill_at = 0
        delay = float(os.environ.get("ZOO_TEST_SECONDS_PER_FRAME", "0"))
        for index, frame in enumerate(frames):
            if index == 0 and os.environ.get("ZOO_TEST_STREAM_LOG"):
                with open(os.environ["ZOO_TEST_STREAM_LOG"], "a") as log:
                    log.write(f"{os.getpid()} {tuple(frame.shape)}\n")
            if index == 1 and BicubicUpscaler.streams_started == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(delay)
            yield frame


def register() -> None:
    """Make "bicubic" a hub entry of this process."""
    import sys

    import zoo.hub as hub

    sys.modules.setdefault("bicubic_upscaler", sys.modules[__name__])
    hub.REGISTRY["bicubic"] = hub.PretrainedCfg(
        paper="Bicubic", paradigm="bicubic upsampling", upscaler="bicubic_upscaler:BicubicUpscaler",
        module="bicubic_upscaler:BicubicUpscaler", recipe="recipes/none.yaml", repo_id=None)
