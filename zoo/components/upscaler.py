"""`VideoUpscaler`: the one inference interface every hub entry returns.

A `VideoUpscaler` maps low-resolution frames `(T, 3, H, W)` in `[0, 1]` to
`(T * temporal_scale', 3, scale * H, scale * W)` (`T'` is `T` except for space-time models,
which also interpolate frames). `stream()` does the same over an iterator with bounded memory.

Weights travel as Hub folders: `config.json` (`{"hub_name": ..., "config": {...}}`, written and
read only by `write_config` / `read_config_data`) next to `model.safetensors`. Papers whose official
checkpoints use another layout (diffusers subfolders) override `save_pretrained` /
`from_pretrained` and keep using those two for their own settings.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VARIANTS = ("tiny", "full")


def check_variant(variant: str) -> str:
    """`variant` if it names a network size (`"tiny"` or `"full"`), else a `ValueError`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'tiny' or 'full', got {variant!r}")
    return variant


def check_frames(frames: Tensor, *, values: bool = True) -> Tensor:
    """Validate a clip `(T, 3, H, W)` of floats in `[0, 1]` and return it unchanged.

    Args:
        frames: the clip.
        values: also check the values (finite, in [0, 1]). Reading them makes the host wait for the
            device, so a stream checks the values of its first frame only, once per clip, and the shape
            of every frame.
    """
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        got = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"frames must be (T, 3, H, W) in [0, 1], got {got}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be floats in [0, 1], got dtype {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames must hold at least one frame, got T = 0")
    if not values:
        return frames
    if not bool(torch.isfinite(frames).all()):
        raise ValueError("frames must be in [0, 1], got NaN or infinite values")
    lo, hi = frames.aminmax()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"frames must be in [0, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")
    return frames


def check_frame(frame: Tensor, *, values: bool = True) -> Tensor:
    """Validate one frame `(3, H, W)` of floats in `[0, 1]` (the values only if `values`); return it unchanged."""
    if not isinstance(frame, Tensor) or frame.ndim != 3:
        got = tuple(frame.shape) if isinstance(frame, Tensor) else type(frame).__name__
        raise ValueError(f"a frame must be (3, H, W) in [0, 1], got {got}")
    check_frames(frame[None], values=values)
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

    Subclasses set `hub_name` and `config_class`, build their networks from `config` in
    `__init__` and set `scale` (and `temporal_scale` for space-time models) from it, and implement
    `stream`.

    Runtime settings that change how a pipeline runs but not its weights (spatial tiles, temporal
    chunks, colour fix, seed) are `options`: a subclass lists each with its default, they become
    attributes, and `configure(**options)` (which `zoo.load(..., **options)` calls) sets them with one
    clear error for a name the pipeline does not take. Sizes are in input (LR) pixels and input frames.

    Args:
        config: the network config dataclass (`config_class.tiny()` / `.full()` or loaded).
    """

    hub_name: ClassVar[str]
    config_class: ClassVar[type]
    options: ClassVar[dict[str, Any]] = {}
    scale: int
    temporal_scale: int = 1

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        for name, default in self.options.items():
            setattr(self, name, default)

    def configure(self, **options: Any) -> VideoUpscaler:
        """Set runtime options (see `options`); returns self."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "none"
            raise ValueError(f"{self.hub_name} takes no option(s) {', '.join(unknown)}; its options are {takes}")
        for name, value in options.items():
            setattr(self, name, value)
        self.check_options()
        return self

    def check_options(self) -> None:
        """Raise `ValueError` for option values this pipeline cannot run with."""

    @classmethod
    def from_variant(cls, variant: str) -> VideoUpscaler:
        """Randomly initialised network of size `variant` (`"tiny"` or `"full"`); no download."""
        return cls(getattr(cls.config_class, check_variant(variant))())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def stream(self, frames: Iterable[Tensor]) -> Iterator[Tensor]:
        """Upscale frames `(3, H, W)` one at a time with memory bounded in the video's length."""
        raise NotImplementedError(f"{type(self).__name__} must implement stream()")

    @torch.no_grad()
    def forward(self, frames: Tensor) -> Tensor:
        """Upscale a whole clip `(T, 3, H, W)` in `[0, 1]`; returns `(T', 3, s*H, s*W)` in `[0, 1]`."""
        check_frames(frames)
        return torch.stack(list(self.stream(frames.unbind(0))))

    # Hub folders -------------------------------------------------------------------------

    def write_config(self, folder: str | Path, data: dict[str, Any] | None = None) -> None:
        """Write `folder/config.json`: this entry's hub name and `data` (the whole config when None)."""
        meta = {"hub_name": self.hub_name, "config": config_to_dict(self.config) if data is None else data}
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def read_config_data(cls, folder: str | Path, *, required: bool = True) -> dict[str, Any] | None:
        """The `config` entry of `folder/config.json`, checked to belong to this model.

        Args:
            folder: a weights folder.
            required: raise when the file is missing; else return None (official layouts that
                carry no zoo config).
        """
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            if not required:
                return None
            raise FileNotFoundError(f"{folder} is not a {cls.hub_name} weights folder: {CONFIG_NAME} is missing")
        try:
            meta = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("hub_name") != cls.hub_name:
            found = meta.get("hub_name") if isinstance(meta, dict) else None
            raise ValueError(f"{folder} holds weights for {found!r}, not {cls.hub_name!r}")
        if not isinstance(meta.get("config"), dict):
            raise ValueError(f"{path} has no 'config' object")
        return meta["config"]

    @classmethod
    def read_config(cls, folder: str | Path) -> Any:
        """The network config dataclass stored in `folder/config.json`."""
        return config_from_dict(cls.config_class, cls.read_config_data(folder))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into `folder` (created if missing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.write_config(folder)
        save_file(cpu_state(self.state_dict()), folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VideoUpscaler:
        """Build from a folder written by `save_pretrained`; weights must match exactly."""
        folder = Path(folder)
        model = cls(cls.read_config(folder))
        load_strict(model, folder / WEIGHTS_NAME)
        return model


def cpu_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict as detached, contiguous CPU tensors, as safetensors writes them."""
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file `path`; a missing or unreadable file is one clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a complete weights folder: {path.name} is missing")
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


def load_strict(module: nn.Module, state: dict[str, Tensor] | Path, *, source: str | None = None,
                assign: bool = False) -> None:
    """Load `state` (or the safetensors file it names) into `module`, every key and shape matching.

    Args:
        module: the module to fill.
        state: a state dict, or the path of a safetensors file.
        source: what to call the weights in errors (the file's path when `state` is one).
        assign: take the tensors themselves instead of copying into the module's (`load_state_dict`'s
            `assign`): a module built on the `meta` device gets its weights without a first allocation.

    Raises:
        ValueError: one sentence naming the source and the first missing, unexpected or
            mis-shaped weight.
    """
    if isinstance(state, Path):
        source = source or str(state)
        state = read_safetensors(state)
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        if mismatched:
            key = mismatched[0]
            example = f"{key} is {tuple(state[key].shape)}, expected {tuple(own[key].shape)}"
        else:
            example = (missing or unexpected)[0]
        raise ValueError(f"{source or 'the weights'} do not fit {type(module).__name__}: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected and {len(mismatched)} mis-shaped weights, e.g. {example}")
    module.load_state_dict(state, strict=True, assign=assign)


def from_pretrained_strict(cls: type, folder: str | Path, subfolder: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder, subfolder=subfolder)` for a diffusers model, refusing partial loads.

    diffusers fills missing weights with random values and drops unexpected ones, with a logged
    warning; a zoo checkpoint must instead match its class exactly.

    Args:
        cls: a diffusers `ModelMixin` subclass.
        folder: a local folder holding `subfolder/config.json` and its weights.
        subfolder: the component's folder (`"unet"`, `"vae"`, ...).
        **kwargs: passed to `from_pretrained` (e.g. `torch_dtype`).

    Raises:
        FileNotFoundError: the component's config is missing.
        ValueError: one sentence naming the folder and the first missing, unexpected or mis-shaped weight.
    """
    from diffusers.utils import logging as diffusers_logging

    path = Path(folder) / subfolder
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a complete weights folder: {subfolder}/{CONFIG_NAME} is missing")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the partial-load warnings become our error below
    try:
        model, info = cls.from_pretrained(folder, subfolder=subfolder, output_loading_info=True, **kwargs)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    problems = {name: info.get(name) or [] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        counts = ", ".join(f"{len(v)} {k.split('_')[0]}" for k, v in problems.items())
        example = next(v for v in problems.values() if v)[0]
        raise ValueError(f"{path} does not fit {cls.__name__}: {counts} weights, e.g. {example}")
    return model
