"""`VideoUpscaler`: the one inference interface every hub entry returns.

A `VideoUpscaler` maps low-resolution frames `(T, 3, H, W)` in `[0, 1]` to
`(T * temporal_scale', 3, scale * H, scale * W)` (`T'` is `T` except for space-time models,
which also interpolate frames). `stream()` does the same over an iterator with bounded memory.

Weights travel as Hub folders: `config.json` (the network's dataclass config) next to
`model.safetensors`. Papers whose official checkpoints use another layout (diffusers
subfolders) override `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def check_frames(frames: Tensor) -> Tensor:
    """Validate a clip `(T, 3, H, W)` of floats in `[0, 1]` and return it unchanged."""
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        got = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"frames must be (T, 3, H, W) in [0, 1], got {got}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be floats in [0, 1], got dtype {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames must hold at least one frame, got T = 0")
    lo, hi = frames.aminmax()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"frames must be in [0, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")
    return frames


def check_frame(frame: Tensor) -> Tensor:
    """Validate one frame `(3, H, W)` of floats in `[0, 1]` and return it unchanged."""
    if not isinstance(frame, Tensor) or frame.ndim != 3:
        got = tuple(frame.shape) if isinstance(frame, Tensor) else type(frame).__name__
        raise ValueError(f"a frame must be (3, H, W) in [0, 1], got {got}")
    check_frames(frame[None])
    return frame


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able data (nested dataclasses become dicts)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild the dataclass `cls` from `config_to_dict` output, nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                return _coerce(arg, value)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value, strict=True))
    return value


class VideoUpscaler(nn.Module):
    """Base class of every hub entry.

    Subclasses set `hub_name`, `config_class`, `scale` (and `temporal_scale` for space-time
    models), build their networks from `config` in `__init__`, and implement `stream`.

    Args:
        config: the network config dataclass (`config_class.tiny()` / `.full()` or loaded).
    """

    hub_name: ClassVar[str]
    config_class: ClassVar[type]
    scale: int = 4
    temporal_scale: int = 1

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def from_variant(cls, variant: str) -> VideoUpscaler:
        """Randomly initialised network of size `variant` (`"tiny"` or `"full"`); no download."""
        if variant not in ("tiny", "full"):
            raise ValueError(f"variant must be 'tiny' or 'full', got {variant!r}")
        return cls(getattr(cls.config_class, variant)())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def stream(self, frames: Iterable[Tensor]) -> Iterator[Tensor]:
        """Upscale frames `(3, H, W)` one at a time with memory bounded in the video's length."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, frames: Tensor) -> Tensor:
        """Upscale a whole clip `(T, 3, H, W)` in `[0, 1]`; returns `(T', 3, s*H, s*W)` in `[0, 1]`."""
        check_frames(frames)
        return torch.stack(list(self.stream(frames.unbind(0))))

    # Hub folders -------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into `folder` (created if missing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"hub_name": self.hub_name, "config": config_to_dict(self.config)}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return folder

    @classmethod
    def read_config(cls, folder: str | Path) -> Any:
        """The network config stored in `folder/config.json`, checked to belong to this model."""
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not a {cls.hub_name} weights folder: {CONFIG_NAME} is missing")
        meta = json.loads((folder / CONFIG_NAME).read_text())
        if meta.get("hub_name") != cls.hub_name:
            raise ValueError(f"{folder} holds weights for {meta.get('hub_name')!r}, not {cls.hub_name!r}")
        return config_from_dict(cls.config_class, meta["config"])

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VideoUpscaler:
        """Build from a folder written by `save_pretrained`; weights must match exactly."""
        folder = Path(folder)
        config = cls.read_config(folder)
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not a {cls.hub_name} weights folder: {WEIGHTS_NAME} is missing")
        model = cls(config)
        model.load_state_dict(load_file(folder / WEIGHTS_NAME), strict=True)
        return model
