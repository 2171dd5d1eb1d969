"""`VideoUpscaler`: the one inference interface every hub entry returns.

A `VideoUpscaler` maps low-resolution frames `(T, 3, H, W)` in `[0, 1]` to
`(T * temporal_scale', 3, scale * H, scale * W)` (`T'` is `T` except for space-time models,
which also interpolate frames). `stream()` does the same over an iterator with bounded memory.

What a caller such as `zoo upscale` needs from a pipeline it finds on the class and instance
(see `VideoUpscaler`): the factors it runs at (`scales`, `temporal_scales`), its runtime
`options` with their defaults (the paper's colour fix among them), and a `memory` model from
which `default_options` picks tiles or chunks that fit the free memory.

Weights travel as Hub folders: `config.json` (`{"hub_name": ..., "config": {...}}`, written and
read only by `write_config` / `read_config_data`) next to `model.safetensors`. Papers whose official
checkpoints use another layout (diffusers subfolders) override `save_pretrained` /
`from_pretrained` and keep using those two for their own settings.

Speed (shared by every pipeline):

- `merge_lora()` folds peft LoRA adapters into their base weights and `fuse_projections()` computes each
  diffusers attention's query, key and value in one matmul (`zoo.load` does both); such a model refuses
  `save_pretrained`, whose folders keep adapters and projections separate.
- The `compile` option compiles a pipeline's networks one by one (`compile_modules`), or its whole fixed-shape
  per-frame or per-chunk step (`COMPILE_SCOPES`, `compiled`); `compile_seconds` reports the calls of each step
  that compiled, their run included.
- Moving a pipeline to a CUDA device turns TF32 on for float32 matmuls and convolutions, and cuDNN's
  autotuner (`use_fast_cuda`):
  the float32 islands of a bfloat16 model (RAFT, warps, VAEs kept in float32) then run on tensor cores;
  its 2-D convolutional networks go channels-last there (`channels_last_modules`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from zoo.components.color import adain_color_fix, wavelet_color_fix

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VARIANTS = ("tiny", "full")
COLOR_FIXES = ("none", "wavelet", "adain")
TILE_SIZES = (1024, 768, 512, 384, 256, 192, 128, 96, 64)
"""Tile sides (LR pixels) `default_options` tries, largest first."""
MEMORY_HEADROOM = 0.8
"""Share of the free memory `default_options` plans for: the estimates are measured on CPU and
extrapolated, and allocators fragment (CUDA's caching allocator, cuDNN workspaces)."""

# `torch.compile` settings of `compile=True`. Inductor's default mode: fused pointwise kernels, cuBLAS / cuDNN
# for the matmuls and convolutions. Not "reduce-overhead": its CUDA graphs replay into fixed output buffers,
# while `stream()` yields device tensors the caller still holds when the next frame runs and feeds outputs
# back as inputs (Stream-DiffVSR's previous frame), and the steps draw noise from a `torch.Generator`. Not
# "max-autotune-no-cudagraphs" by default: it benchmarks Triton templates for every matmul and convolution
# shape at the first call, a compile time growing with the networks' distinct shapes and not yet measured
# against its gain here; pass `compile={"mode": "max-autotune-no-cudagraphs"}` to choose it.
# `dynamic=False`: each frame size gets its own graph, which the fixed-shape steps want.
# `scope` (this zoo's key, not `torch.compile`'s) says what one graph covers; see `COMPILE_SCOPES`.
COMPILE_DEFAULTS: dict[str, Any] = {"mode": "default", "dynamic": False, "scope": "networks"}
COMPILE_KEYS = ("backend", "mode", "dynamic", "fullgraph", "options", "scope")
COMPILE_SCOPES = ("networks", "step")
"""What the `compile` option compiles:

- `"networks"` (default): each network of `compile_modules()` on its own, with the step's glue (sampler
  arithmetic, warps, padding, colour conversion) run eagerly between them. A network called several times
  per step with the same shapes (the UNet at each sampler step, RAFT's update block at each refinement) is
  traced and compiled once.
- `"step"`: the whole per-frame or per-chunk step as one graph: fusion across network boundaries, but every
  call unrolled into it (Stream-DiffVSR's frame: 4 UNet and 4 ControlNet calls, 12 RAFT updates), so its
  compilation grows with the calls, not with the distinct networks.
"""


def use_fast_cuda(device: torch.device) -> None:
    """On a CUDA `device`: TF32 tensor cores for float32 matmuls and convolutions, and cuDNN's autotuner;
    other devices: nothing.

    The autotuner (`cudnn.benchmark`) times cuDNN's algorithms for each convolution shape at its first
    call and keeps the fastest, instead of a heuristic pick; the pipelines run one frame size per clip
    (a few more with edge tiles), so the timing is paid once per shape in the first frames. Set when a
    pipeline moves to CUDA (`VideoUpscaler._apply`), not at import: a process that only imports the zoo
    keeps PyTorch's defaults.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = True


def compile_settings(value: Any) -> dict[str, Any] | None:
    """The settings of a `compile` option value: `torch.compile` keyword arguments and `scope`; None when off.

    Args:
        value: False (eager), True (`COMPILE_DEFAULTS`), or a dict of `torch.compile` arguments
            (`backend`, `mode`, `dynamic`, `fullgraph`, `options`) and `scope` (`COMPILE_SCOPES`) that
            override `COMPILE_DEFAULTS`.
    """
    if value is False:
        return None
    if value is True:
        return dict(COMPILE_DEFAULTS)
    if isinstance(value, dict) and set(value) <= set(COMPILE_KEYS):
        settings = {**COMPILE_DEFAULTS, **value}
        if "options" in value:  # torch.compile takes either a mode or inductor options
            settings.pop("mode")
        if settings["scope"] not in COMPILE_SCOPES:
            raise ValueError(f"compile's scope must be one of {', '.join(COMPILE_SCOPES)}, got {settings['scope']!r}")
        return settings
    raise ValueError(f"compile must be True, False or a dict of torch.compile arguments and scope "
                     f"({', '.join(COMPILE_KEYS)}), got {value!r}")


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters  # torch._dynamo loads with torch.compile; not at import

    return counters["stats"]["unique_graphs"]


class CompiledStep:
    """A step that times its compiling calls: `torch.compile(fn)`, or `fn` itself whose networks are compiled.

    Args:
        fn: the step.
        settings: `torch.compile` keyword arguments, or None to call `fn` as it is (the `"networks"` scope,
            where the compilation happens inside the step's calls).

    Attributes:
        compile_s: seconds of the calls during which dynamo compiled a graph, their run included (synchronised
            on CUDA): the first call, and later ones that meet a new case (Stream-DiffVSR's second frame, the
            first with a previous one; a last, shorter chunk).
    """

    def __init__(self, fn: Callable[..., Any], settings: dict[str, Any] | None) -> None:
        self.fn = fn if settings is None else torch.compile(fn, **settings)
        self.compile_s = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        graphs = _graphs_compiled()
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if _graphs_compiled() != graphs:
            if any(isinstance(a, Tensor) and a.is_cuda for a in (*args, *kwargs.values())):
                torch.cuda.synchronize()
            self.compile_s += time.perf_counter() - start
        return out


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


@dataclass(frozen=True)
class MemoryModel:
    """Peak memory of a pipeline beyond its weights, linear in the LR pixels each stage works on.

    `bytes = max(frame * H * W, tile * h * w)` for fp32 weights, where `H x W` is the LR frame and
    `h x w` the part of it one tiled stage sees (the whole frame without tiles): the stages that
    run on whole frames (VAE, flow, fusion) and the tiled one run one after the other, so the
    peak is the larger of the two. 16-bit dtypes halve it. Coefficients are slopes of peak RSS
    against pixel count of the `full` network streamed on CPU, measured with
    `zoo bench upscalers.memory_model` (smaller configs need less, so they bound `tiny` from above).

    Attributes:
        frame: bytes per LR pixel of the stages run on whole frames.
        tile: bytes per LR pixel of the stage that the `tile` option bounds (0: no tiles, or tiles
            that do not lower the peak).
        measured: how and where the numbers were measured.
    """

    frame: float
    tile: float = 0.0
    measured: str = ""


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
    The shared names, which `zoo upscale` maps its flags onto, are:

    - `tile`, `tile_overlap`: square spatial tiles (None: whole frames) and their overlap;
    - `chunk`, `chunk_overlap`: temporal chunks and their overlap, in input frames;
    - `color_fix`: one of `COLOR_FIXES`, defaulting to the paper's own; `stream()` applies it with
      `fix_colors` to each output frame;
    - `seed`: the noise seed; `scale`, `temporal_scale` for models that run at several factors;
    - `channels_last`: the memory format of `channels_last_modules()`: None (the default) for channels-last on
      CUDA or when compiling, True or False to choose (`zoo bench --option channels_last=False` times the
      alternative).

    What else a caller needs, each paper sets or overrides (the defaults suit a fixed-factor,
    untiled pipeline):

    - `scales`, `temporal_scales`: the factors the class runs at, known before weights load, so
      that `--scale 3` is refused at once (a factor that is no option is the one `scale` holds;
      an empty tuple: any factor `check_options` takes);
    - `memory`: a measured `MemoryModel`, which `estimate_memory` scales to a frame size;
    - `default_options(height, width, free_bytes)`: tiles (the base class) or chunks (override)
      that fit the free memory; `zoo upscale` applies and logs them where the user set none.

    A pipeline that lists the option `compile` (`compile_settings`) runs its per-frame or per-chunk step
    through `compiled(name, fn)` and lists its networks in `compile_modules()`; setting it also switches
    `channels_last_modules()` (a 2-D convolutional VAE) to the channels-last memory format, which cuDNN's
    and inductor's convolutions prefer.

    Args:
        config: the network config dataclass (`config_class.tiny()` / `.full()` or loaded).
    """

    hub_name: ClassVar[str]
    config_class: ClassVar[type]
    options: ClassVar[dict[str, Any]] = {}
    scales: ClassVar[tuple[int, ...]] = ()
    temporal_scales: ClassVar[tuple[int, ...]] = (1,)
    memory: ClassVar[MemoryModel | None] = None
    scale: int
    temporal_scale: int = 1

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        for name, default in self.options.items():
            setattr(self, name, default)
        self.lora_merged = False
        self.projections_fused = False
        self._compiled: dict[str, CompiledStep] = {}
        # (network, compiled method, its instance attribute before or None)
        self._compiled_networks: list[tuple[nn.Module, str, Any]] = []

    def configure(self, **options: Any) -> VideoUpscaler:
        """Set runtime options (see `options`); returns self."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "none"
            raise ValueError(f"{self.hub_name} takes no option(s) {', '.join(unknown)}; its options are {takes}")
        if "compile" in options:
            compile_settings(options["compile"])  # checks the value
            self._compiled = {}  # steps compiled with the previous settings
            self._uncompile_networks()
        for name, value in options.items():
            setattr(self, name, value)
        self._check_shared_options()
        self.check_options()
        if "compile" in options or "channels_last" in options:
            self._set_memory_format()
        return self

    def _check_shared_options(self) -> None:
        """The value checks of the shared option names (see the class docstring)."""
        values = {name: getattr(self, name) for name in self.options}
        if "color_fix" in values and values["color_fix"] not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, got {values['color_fix']!r}")
        for name in ("tile", "chunk"):
            value = values.get(name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if values.get("channels_last") not in (None, True, False):
            raise ValueError(f"channels_last must be None (channels-last on CUDA or when compiling), True or False, "
                             f"got {values['channels_last']!r}")
        for name in ("tile_overlap", "chunk_overlap", "seed"):
            value = values.get(name)
            if name in values and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def check_options(self) -> None:
        """Raise `ValueError` for option values this pipeline cannot run with."""

    def fix_colors(self, hr: Tensor, lr: Tensor) -> Tensor:
        """Outputs `hr (N, 3, sH, sW)` with the colours of their inputs `lr (N, 3, H, W)` by the `color_fix` option.

        The input is bicubic-upsampled to the output size and used as the colour source, as
        OSEDiff's colour fixes do; the fix runs in float32 whatever the model's dtype.
        """
        method = getattr(self, "color_fix", "none")
        if method == "none":
            return hr
        source = F.interpolate(lr.float(), size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        fix = wavelet_color_fix if method == "wavelet" else adain_color_fix
        return fix(hr.float(), source).clamp(0, 1).to(hr.dtype)

    def estimate_memory(self, height: int, width: int) -> int | None:
        """Peak bytes beyond the weights of one step on `height x width` LR frames with the current options.

        None when the class has no `memory` model.
        """
        if self.memory is None:
            return None
        tile = getattr(self, "tile", None)
        tiled = height * width if tile is None else min(tile, height) * min(tile, width)
        itemsize = torch.finfo(self.dtype).bits // 8
        return int(max(self.memory.frame * height * width, self.memory.tile * tiled) * itemsize / 4)

    def default_options(self, height: int, width: int, free_bytes: int) -> dict[str, Any]:
        """Options that fit one step on `height x width` LR frames into `free_bytes` of the model's device.

        The base class picks `tile` (when it is an option and `memory` has a tile term) by `fitting_tile`.
        Papers with their own memory model or with chunks override this (and call `fitting_tile` for tiles).
        """
        if "tile" not in self.options or self.memory is None or not self.memory.tile:
            return {}
        return self.fitting_tile(height, width, free_bytes)

    def fitting_tile(self, height: int, width: int, free_bytes: int) -> dict[str, Any]:
        """`{"tile": tile}`: None (whole frames) where `estimate_memory` fits `MEMORY_HEADROOM` of `free_bytes`, else
        the largest of `TILE_SIZES` smaller than the frame that fits, else the smallest of those."""
        budget = free_bytes * MEMORY_HEADROOM
        candidates = [None, *(tile for tile in TILE_SIZES if tile < max(height, width))]
        current = self.tile
        try:
            for tile in candidates:
                self.tile = tile
                if self.estimate_memory(height, width) <= budget:
                    return {"tile": tile}
            return {"tile": candidates[-1]}
        finally:
            self.tile = current

    # Speed -------------------------------------------------------------------------------

    def channels_last_modules(self) -> list[nn.Module]:
        """A pipeline's 2-D convolutional networks, held channels-last on CUDA and with the `compile` option.

        Channels-last (NHWC) is the layout of cuDNN's tensor-core convolutions and of inductor's generated
        kernels; on the CPU, eager runs keep PyTorch's default layout (and its numerics).
        """
        return []

    def _set_memory_format(self, device: torch.device | None = None) -> None:
        """The `channels_last` option's memory format for `channels_last_modules`; by default channels-last on a CUDA
        `device` (default: the model's) or when compiling, else PyTorch's default layout.

        The default is an untimed choice for eager CUDA runs: cuDNN's tensor-core convolutions take channels-last
        without transposing, but PyTorch's CUDA group norm (`native_group_norm`) makes its input contiguous and
        returns the default layout, so each group norm before a convolution costs two transposes there.
        """
        device = device or next((p.device for p in self.parameters()), None)
        if device is None or device.type == "meta":
            return
        channels_last = getattr(self, "channels_last", None)  # the option, where the pipeline has it
        if channels_last is None:
            compiling = "compile" in self.options and compile_settings(self.compile) is not None
            channels_last = compiling or device.type == "cuda"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for module in self.channels_last_modules():
            module.to(memory_format=memory_format)

    def compile_modules(self) -> list[nn.Module | tuple[nn.Module, str]]:
        """The networks the `compile` option's `"networks"` scope compiles one by one (`COMPILE_SCOPES`).

        A module is compiled in its `forward`, which the step must call as `module(...)` (a network reached
        through another method, such as a VAE's `encode`, is listed by the submodules that method calls); a
        `(module, name)` pair compiles that method, which the step must call as `module.name(...)`.
        """
        return []

    def _compile_networks(self, settings: dict[str, Any]) -> None:
        """`torch.compile` each of `compile_modules()`'s methods on its instance.

        The instance attribute shadows the class's method for calls through the instance, keeping the
        module's place, hooks and weight names (`nn.Module.compile` would instead share one dynamo cache, that
        of `Module._call_impl`, between all the networks, and the networks of this size would exceed its
        recompile limit). `_uncompile_networks` restores the previous attribute.
        """
        targets = [item if isinstance(item, tuple) else (item, "forward") for item in self.compile_modules()]
        if not targets:
            raise ValueError(f"{self.hub_name} names no networks to compile one by one; "
                             "use compile={'scope': 'step'}")
        for module, name in targets:
            self._compiled_networks.append((module, name, vars(module).get(name)))
            setattr(module, name, torch.compile(getattr(module, name), **settings))

    def _uncompile_networks(self) -> None:
        for module, name, previous in reversed(self._compiled_networks):
            if previous is None:
                delattr(module, name)
            else:
                setattr(module, name, previous)
        self._compiled_networks = []

    def compiled(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, or with the `compile` option its `CompiledStep` (built once per name and setting).

        With the `"networks"` scope, the first step built also compiles `compile_modules()`, and every step
        runs as it is around them.

        Args:
            name: the step's name in `compile_seconds`.
            fn: a fixed-shape step: given inputs of one size, it runs the same operations every call.
        """
        settings = compile_settings(self.compile)
        if settings is None:
            return fn
        if name not in self._compiled:
            scope = settings.pop("scope")
            if scope == "networks" and not self._compiled_networks:
                self._compile_networks(settings)
            self._compiled[name] = CompiledStep(fn, None if scope == "networks" else settings)
        return self._compiled[name]

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds of each compiled step's calls that compiled a graph (their run included), by step name."""
        return {name: step.compile_s for name, step in self._compiled.items() if step.compile_s}

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> VideoUpscaler:
        super()._apply(fn, recurse)
        device = next((p.device for p in self.parameters()), None)
        if device is not None:
            use_fast_cuda(device)
            self._set_memory_format(device)
        return self

    def merge_lora(self) -> int:
        """Fold every peft LoRA adapter into its base weights, for inference; returns the layers merged.

        `W <- W + (alpha / r) B A` per adapted layer (peft's own merge), so the LoRA branches' matmuls and
        kernel launches disappear. Adapters that are not a constant weight delta (a per-token gated or
        masked LoRA, e.g. OSDEnhancer's TR expert) are not peft layers and stay as they are. A merged model
        refuses `save_pretrained`: its folders store the adapters apart from the base weights, and the sum
        cannot be split back exactly.
        """
        from zoo.components.lora import lora_layer_count, merge_lora

        merged = 0
        for module in list(self.modules()):
            count = lora_layer_count(module) if getattr(module, "peft_config", None) else 0
            if count:
                merge_lora(module)
                merged += count
        self.lora_merged = self.lora_merged or merged > 0
        return merged

    def fuse_projections(self) -> int:
        """Compute the query, key and value of each plain diffusers attention in one matmul; returns how many.

        diffusers' own fusion (`Attention.fuse_projections`, `FusedAttnProcessor2_0`): self-attention gets one
        `to_qkv` linear (two matmuls fewer), cross-attention one `to_kv` on the prompt (one fewer); Stream-DiffVSR
        runs 46 attentions per step (UNet and ControlNet) and 4 steps per frame. Only attentions with the plain
        `AttnProcessor2_0` and plain `nn.Linear` projections are fused: custom processors (CogVideoX's, Wan's,
        gated LoRA) read `to_q` / `to_k` / `to_v` themselves, and a LoRA-wrapped projection must be merged
        first (`merge_lora`). The fused weights are concatenations of the originals, so outputs change only
        by the matmuls' summation order.
        """
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

        fused = 0
        for module in self.modules():
            if (isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0
                    and all(type(getattr(module, key)) is nn.Linear for key in ("to_q", "to_k", "to_v"))):
                module.fuse_projections(fuse=True)
                module.set_processor(FusedAttnProcessor2_0())
                fused += 1
        self.projections_fused = self.projections_fused or fused > 0
        return fused

    def check_exportable(self) -> None:
        """Raise `ValueError` when this model's weights cannot be written as a weights folder (merged or fused)."""
        done = [what for what, flag in (("its LoRA merged into the base weights", self.lora_merged),
                                        ("its attention projections fused", self.projections_fused)) if flag]
        if done:
            raise ValueError(f"this {self.hub_name} model is prepared for inference ({' and '.join(done)}), and a "
                             f"weights folder keeps them separate; export the model as loaded "
                             f"(zoo.load(..., merge_lora=False) or the training module's to_upscaler())")

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
        self.check_exportable()
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


CPU_ALIGNMENT = 64
"""Bytes PyTorch's CPU allocator aligns its storages to (`c10::gAlignment`), and so the weights it makes."""


def cpu_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict as detached, contiguous CPU tensors, as safetensors writes them."""
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def check_weight_names(expected: Iterable[str], found: Iterable[str], what: str) -> None:
    """Raise one `ValueError`, "{what}: N missing and M unexpected weights, e.g. K", unless the names agree."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing and {len(unexpected)} unexpected weights, "
                         f"e.g. {(missing or unexpected)[0]}")


def save_weight_files(folder: Path, state: dict[str, Tensor], files: dict[str, str],
                      group_of: Callable[[str], str]) -> None:
    """Write `state` split over safetensors files: `files` maps a group name to its file in `folder`, and
    `group_of` gives each key's group. Groups with no weights write no file."""
    groups: dict[str, dict[str, Tensor]] = {name: {} for name in files}
    for key, value in cpu_state(state).items():
        groups[group_of(key)][key] = value
    for name, part in groups.items():
        if part:
            save_file(part, folder / files[name], metadata={"format": "pt"})


def read_weight_files(folder: Path, names: Iterable[str]) -> dict[str, Tensor]:
    """The tensors of those files `names` in `folder` that exist, in one state dict (the inverse of
    `save_weight_files`; which keys must be there is the caller's check)."""
    state: dict[str, Tensor] = {}
    for name in names:
        if (folder / name).is_file():
            state.update(read_safetensors(folder / name))
    return state


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file `path`, each 64-byte aligned (`own_storage` says why); a missing or
    unreadable file is one clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a complete weights folder: {path.name} is missing")
    try:
        state = load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    return {key: aligned(value) for key, value in state.items()}


def own_storage(module: nn.Module) -> nn.Module:
    """Copy each CPU parameter and buffer of `module` that is not 64-byte aligned into memory that is; returns it.

    safetensors (0.8 on) reads a file's tensors straight from a mapping of the file, at offsets aligned to
    their element size only, and diffusers' `from_pretrained` (and `load_state_dict(assign=True)`) keeps them
    as the weights. On the CPU a weight that is not 64-byte aligned takes another GEMM path with other rounding
    (a 64x16 `nn.Linear` on one row: 1.2e-7 apart), so the same weights gave different outputs loaded than
    built or copied. PyTorch's CPU allocator aligns to 64 bytes, so a copy gives the outputs of the module as it
    was saved.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = aligned(tensor.data)
    return module


def aligned(tensor: Tensor) -> Tensor:
    """`tensor`, or a copy of it in 64-byte aligned memory when it is a CPU tensor that is not (`own_storage`)."""
    if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
        return tensor.clone()
    return tensor


def load_strict(module: nn.Module, state: dict[str, Tensor] | Path, *, source: str | None = None,
                assign: bool = False) -> None:
    """Load `state` (or the safetensors file it names) into `module`, every key and shape matching.

    Args:
        module: the module to fill.
        state: a state dict, or the path of a safetensors file.
        source: what to call the weights in errors (the file's path when `state` is one).
        assign: take the tensors themselves instead of copying into the module's (`load_state_dict`'s
            `assign`): a module built on the `meta` device gets its weights without a first allocation. Those
            that are not 64-byte aligned (mapped from a file) are then copied once (`own_storage`).

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
    if assign:
        own_storage(module)


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
    return own_storage(model)
