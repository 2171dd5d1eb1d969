"""`zoo bench --model NAME`: speed, memory and FLOPs of a hub entry's pipeline at a chosen size.

The network is built at `tiny` or `full` size with random weights (no download: every `*_pretrained`
config field is switched off) and streams random frames. One run:

1. counts FLOPs per output frame with `torch.utils.flop_counter` over a short stream, split by module
   group (VAE encoder, denoiser, ControlNet, decoder, flow, ...; `flop_groups`);
2. warms up, then times the stream frame by frame with device synchronisation: first-frame latency,
   ms per output frame (median, p10, p90), achieved TFLOP/s;
3. reads peak device memory (CUDA) and peak host memory (RSS);
4. relates the FLOPs to the model's stated lower bound (`zoo.bench.bounds`), when it has one.

Timing is only honest on an idle machine: the thread count is set (and reported), and a machine whose
load average exceeds its cores is refused unless `busy_ok`.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from zoo.components.upscaler import VideoUpscaler, check_variant
from zoo.hub import upscaler_class

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Names in a pipeline's module tree that start a group of the FLOP split; the outermost match of a
# module's qualified name decides (so `net.vae.encoder.layers.3` is "vae encoder").
FLOP_GROUPS: dict[str, str] = {
    "vae.encoder": "vae encoder",
    "vae.decoder": "decoder",
    "unet": "denoiser",
    "transformer": "denoiser",
    "draft": "draft denoiser",
    "controlnet": "controlnet",
    "flow": "flow",
    "fusion": "fusion",
}


def module_groups(root: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Each submodule of `root` that lies inside a `FLOP_GROUPS` group, mapped to that group."""
    groups = {}
    for name, module in root.named_modules():
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            key = next((k for k in FLOP_GROUPS if ".".join(parts[max(0, end - k.count(".") - 1):end]) == k), None)
            if key is not None:
                groups[module] = FLOP_GROUPS[key]
                break
    return groups


class GroupedFlopCounter(FlopCounterMode):
    """`FlopCounterMode` that also attributes every op to the group of the innermost module running it.

    Its own module stack (global forward hooks) sees every module call, also submodules a pipeline
    calls directly, where the module tracker of `FlopCounterMode` starts a new root.

    Args:
        groups: module -> group name (`module_groups`); ops outside every group count as "other".
    """

    def __init__(self, groups: dict[torch.nn.Module, str]) -> None:
        super().__init__(display=False)
        self.groups = groups
        self.by_group: dict[str, int] = {}
        self._stack: list[torch.nn.Module] = []
        self._handles: list[Any] = []

    def __enter__(self) -> GroupedFlopCounter:
        self.by_group = {}
        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._push),
                         torch.nn.modules.module.register_module_forward_hook(self._pop, always_call=True)]
        return super().__enter__()

    def _push(self, module: torch.nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _pop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._stack.pop()

    def __exit__(self, *args: Any) -> Any:
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*args)

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            group = next((self.groups[m] for m in reversed(self._stack) if m in self.groups), "other")
            self.by_group[group] = self.by_group.get(group, 0) + flops
        return super()._count_flops(func_packet, out, args, kwargs)


def random_upscaler(name: str, size: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> VideoUpscaler:
    """The hub entry `name` at `size` with random weights everywhere (no published sub-weights), eval mode."""
    cls = upscaler_class(name)
    config = getattr(cls.config_class, check_variant(size))()
    switched = {f.name: False for f in dataclasses.fields(config) if f.name.endswith("_pretrained")}
    config = dataclasses.replace(config, **switched)
    torch.manual_seed(0)
    return cls(config).to(device=device, dtype=dtype).eval()


def random_frames(count: int, height: int, width: int, seed: int = 1) -> Iterator[Tensor]:
    """`count` random LR frames `(3, height, width)`, made one at a time."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(3, height, width, generator=generator) for _ in range(count))


def count_flops(upscaler: VideoUpscaler, frames: list[Tensor]) -> tuple[dict[str, int], int]:
    """FLOPs of streaming `frames` through `upscaler` by group, with "total"; and the output frame count."""
    counter = GroupedFlopCounter(module_groups(upscaler))
    with torch.no_grad(), counter:
        outputs = sum(1 for _ in upscaler.stream(iter(frames)))
    return {**counter.by_group, "total": counter.get_total_flops()}, outputs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_idle(busy_ok: bool) -> float:
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > cores and not busy_ok:
        raise ValueError(f"the load average is {load:.1f} on {cores} cores: timings would measure the other "
                         f"processes; wait for an idle machine or pass busy_ok=True (--busy-ok)")
    return load


def bench_pipeline(*, model: str = "stream_diffvsr", size: str = "tiny", height: int = 128, width: int = 128,
                   frames: int = 9, dtype: str = "float32", device: str = "auto", compile: bool = False,
                   threads: int | None = None, warmup: int = 2, options: dict[str, Any] | None = None,
                   busy_ok: bool = False) -> dict[str, Any]:
    """Speed, memory and FLOPs of `model`'s `stream()` at `height` x `width` OUTPUT pixels.

    Args:
        model: hub name.
        size: "tiny" or "full" (the paper's architecture), random weights.
        height: output frame height (the LR frames are `height / scale`).
        width: output frame width.
        frames: LR frames streamed in the timed run.
        dtype: "float32", "bfloat16" or "float16".
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        compile: wrap the pipeline's per-frame step in `torch.compile` (its `compile` option).
        threads: CPU threads (`torch.set_num_threads`); 1 when None on CPU.
        warmup: frames streamed (and discarded) before timing.
        options: the pipeline's runtime options (`VideoUpscaler.configure`).
        busy_ok: time even when the machine is busier than its cores.

    Returns:
        A flat record: configuration, `first_frame_ms`, `ms_per_frame` {median, p10, p90}, peak
        memory, `flops_per_frame` by group, `tflops`, and `bound_flops_per_frame` / `ratio_to_bound`.
    """
    from zoo.bench.bounds import flop_bound

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (one for latency, the rest for the rate), got {frames}")
    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    threads = threads or (torch.get_num_threads() if torch_device.type == "cuda" else 1)
    torch.set_num_threads(threads)
    load = _check_idle(busy_ok)
    upscaler = random_upscaler(model, size, torch_device, DTYPES[dtype]).configure(**(options or {}))
    if compile:
        upscaler.configure(compile=True)
    scale = upscaler.scale
    if height % scale or width % scale:
        raise ValueError(f"{model} upscales x{scale}: height and width must divide by {scale}, got {height}x{width}")
    lr_size = (height // scale, width // scale)
    lr = [f.to(torch_device, DTYPES[dtype]) for f in random_frames(max(frames, 2), *lr_size)]

    flops, flop_outputs = count_flops(upscaler, lr)
    per_frame = {group: value / flop_outputs for group, value in flops.items()}

    compile_start = time.perf_counter()
    for _ in upscaler.stream(iter(lr[: max(warmup, 1)])):
        pass
    _synchronize(torch_device)
    warmup_s = time.perf_counter() - compile_start
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    stamps = []
    start = time.perf_counter()
    with torch.no_grad():
        for _ in upscaler.stream(iter(lr)):
            _synchronize(torch_device)
            stamps.append(time.perf_counter())
    gaps = [1000 * (b - a) for a, b in zip([start, *stamps[:-1]], stamps)]
    steady = gaps[1:] or gaps
    quantiles = statistics.quantiles(steady, n=10) if len(steady) > 1 else steady * 9
    mean_s = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    bound = flop_bound(upscaler, *lr_size)
    result = {
        "model": model, "size": size, "device": str(torch_device), "dtype": dtype, "threads": threads,
        "load_average": round(load, 2), "compile": compile, "options": options or {},
        "input": list(lr_size), "output": [height, width], "frames_in": len(lr), "frames_out": len(stamps),
        "warmup_s": warmup_s, "first_frame_ms": gaps[0],
        "ms_per_frame": {"median": statistics.median(steady), "p10": quantiles[0], "p90": quantiles[-1],
                         "mean": 1000 * mean_s},
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_bytes": torch.cuda.max_memory_allocated(torch_device) if torch_device.type == "cuda" else None,
        "flops_per_frame": per_frame,
        "tflops": per_frame["total"] / mean_s / 1e12 if mean_s > 0 else None,
        "bound_flops_per_frame": bound,
        "ratio_to_bound": per_frame["total"] / bound if bound else None,
    }
    return result
