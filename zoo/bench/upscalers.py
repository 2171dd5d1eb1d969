"""Benchmarks of any hub entry through the `VideoUpscaler` interface: speed and streaming memory.

Networks are randomly initialised (`tiny` or `full`), so nothing is downloaded; RAFT gets random
weights too, which costs the same as the published ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zoo.bench.pipeline import random_frames, set_threads
from zoo.components.upscaler import COMPILE_SCOPES, VideoUpscaler
from zoo.hub import upscaler_class

_CHILD = """
import json, resource, sys
import torch
torch.set_num_threads(1)  # per-thread buffers would make the peak depend on the machine's cores
from zoo.bench.upscalers import stream_random_frames
stream_random_frames(sys.argv[1], int(sys.argv[2]), sys.argv[3], (int(sys.argv[4]), int(sys.argv[5])), "cpu",
                     json.loads(sys.argv[6]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def random_upscaler(name: str, variant: str, device: str, dtype: torch.dtype = torch.float32) -> VideoUpscaler:
    """The hub entry `name` at size `variant` with random weights (RAFT included), in eval mode."""
    cls = upscaler_class(name)
    config = getattr(cls.config_class, variant)()
    if hasattr(config, "flow_pretrained"):
        config = dataclasses.replace(config, flow_pretrained=False)
    torch.manual_seed(0)
    return cls(config).to(device=device, dtype=dtype).eval()


def stream_random_frames(name: str, num_frames: int, variant: str, size: tuple[int, int], device: str,
                         options: dict | None = None) -> None:
    """Stream `num_frames` random LR frames of `size` through `name`, dropping the outputs.

    Frames are made one at a time, so only the pipeline's own state persists between frames.
    """
    upscaler = random_upscaler(name, variant, device).configure(**(options or {}))
    for _ in upscaler.stream(frame.to(device) for frame in random_frames(num_frames, *size)):
        pass


def _peak_cpu_bytes(name: str, num_frames: int, variant: str, size: tuple[int, int],
                    options: dict | None = None) -> int:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    args = [name, str(num_frames), variant, str(size[0]), str(size[1]), json.dumps(options or {})]
    result = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True,
                            env=env)
    return int(result.stdout.strip().splitlines()[-1]) * 1024  # Linux reports ru_maxrss in KiB


def _peak_cuda_bytes(name: str, num_frames: int, variant: str, size: tuple[int, int], device: str) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    stream_random_frames(name, num_frames, variant, size, device)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def bench_stream_memory(*, name: str = "stream_diffvsr", frames: tuple[int, int] = (16, 256), variant: str = "tiny",
                        size: tuple[int, int] = (32, 48), device: str = "cpu") -> dict:
    """Peak memory of streaming `frames[0]` vs `frames[1]` frames: `stream()` must not grow with length.

    Args:
        name: hub name.
        frames: the short and the long stream's lengths.
        variant: network size ("tiny" or "full"), random weights.
        size: LR frame size (H, W).
        device: "cpu" (peak RSS of a fresh subprocess per run, so one run cannot hide another's
            peak) or a CUDA device (peak allocated memory).

    Returns:
        {"name", "device", "variant", "size", "frames", "peak_bytes": [short, long], "ratio"}.
    """
    if device == "cpu":
        peaks = [_peak_cpu_bytes(name, n, variant, size) for n in frames]
    else:
        peaks = [_peak_cuda_bytes(name, n, variant, size, device) for n in frames]
    return {"name": name, "device": device, "variant": variant, "size": list(size), "frames": list(frames),
            "peak_bytes": peaks, "ratio": peaks[1] / peaks[0]}


_MODEL_CHILD = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # per-thread buffers would make the peak depend on the machine's cores
from zoo.bench.pipeline import random_frames
from zoo.bench.upscalers import random_upscaler
name, variant, frames, height, width, options = sys.argv[1:7]
upscaler = random_upscaler(name, variant, "cpu").configure(**json.loads(options))
Path("/proc/self/clear_refs").write_text("5")  # the peak so far (building the model) is not the stream's
for _ in upscaler.stream(random_frames(int(frames), int(height), int(width))):
    pass
status = Path("/proc/self/status").read_text()
print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)
"""


def bench_memory_model(*, name: str = "osdiffvsr", variant: str = "full",
                       sizes: tuple[tuple[int, int], ...] = ((32, 32), (64, 64), (96, 96)), frames: int = 2,
                       options: dict | None = None) -> dict:
    """Bytes of peak RSS per LR pixel: the slope behind a pipeline's `MemoryModel`, measured on CPU (Linux).

    For each size, a fresh process (one thread, random weights of size `variant`) builds the model,
    resets its peak RSS (`/proc/self/clear_refs`), streams `frames` random frames and reports the
    peak; the least-squares slope of peak against pixel count removes the weights and the
    interpreter. With tiles small enough to be the same at every size (`options={"tile": 16}`),
    the slope is the untiled part, `frame`; without, it is `frame + tile`.

    Args:
        name: hub name.
        variant: network size, "full" for the coefficients a `MemoryModel` holds.
        sizes: two or more LR frame sizes (H, W).
        frames: frames streamed at each size.
        options: the pipeline's runtime options.

    Returns:
        {"name", "variant", "sizes", "options", "peak_bytes" (per size), "bytes_per_pixel"}.
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes must hold at least two frame sizes, got {sizes}")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    peaks = []
    for height, width in sizes:
        args = [name, variant, str(frames), str(height), str(width), json.dumps(options or {})]
        result = subprocess.run([sys.executable, "-c", _MODEL_CHILD, *args], capture_output=True, text=True,
                                check=True, env=env)
        peaks.append(int(result.stdout.strip().splitlines()[-1]))
    pixels = torch.tensor([float(h * w) for h, w in sizes], dtype=torch.float64)
    centred = pixels - pixels.mean()
    peak = torch.tensor(peaks, dtype=torch.float64)
    slope = float((centred * (peak - peak.mean())).sum() / centred.square().sum())
    return {"name": name, "variant": variant, "sizes": [list(size) for size in sizes], "options": options or {},
            "peak_bytes": peaks, "bytes_per_pixel": slope}


def bench_speed(*, name: str = "stream_diffvsr", variant: str = "tiny", frames: int = 8,
                size: tuple[int, int] = (64, 96), device: str = "cpu", dtype: str = "float32",
                threads: int = 1) -> dict:
    """Latency of the first output frame and throughput of `stream()` over `frames` LR frames.

    `seconds_per_frame` is the mean gap between output frames after the first: a per-frame pipeline's steady
    rate. A chunked one (PS-SR, OSDEnhancer) yields a whole chunk at once, so its gaps after the first are ~0:
    `seconds_per_output_frame`, the whole stream over its output frames, is its rate.

    Args:
        name: hub name.
        variant: network size ("tiny" or "full"), random weights.
        frames: frames streamed; the first output's latency is reported apart, the rest give the rate.
        size: LR frame size (H, W).
        device: "cpu" or a CUDA device.
        dtype: parameter dtype ("float32", "bfloat16", "float16").
        threads: CPU threads (`torch.set_num_threads`): two threads on two busy cores can be far slower than one.

    Returns:
        {"name", "variant", "device", "dtype", "threads", "size", "frames", "frames_out", "first_frame_s",
        "seconds_per_frame", "seconds_per_output_frame", "peak_cuda_bytes" (CUDA only)}.
    """
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (one for latency, the rest for the rate), got {frames}")
    set_threads(threads)
    upscaler = random_upscaler(name, variant, device, getattr(torch, dtype))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    stamps = []
    start = time.perf_counter()
    for frame in upscaler.stream(f.to(device) for f in random_frames(frames, *size)):
        if cuda:
            torch.cuda.synchronize(device)
        del frame
        stamps.append(time.perf_counter())
    result = {"name": name, "variant": variant, "device": device, "dtype": dtype, "threads": threads,
              "size": list(size), "frames": frames, "frames_out": len(stamps), "first_frame_s": stamps[0] - start,
              "seconds_per_frame": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
              "seconds_per_output_frame": (stamps[-1] - start) / len(stamps)}
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def _tensor_overloads(name: str) -> list[Any]:
    """The overloads of the aten op `name` ("aten::view") that return tensors and write no `out`."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return []
    overloads = [getattr(packet, overload) for overload in packet.overloads() if not overload.endswith("out")]
    return [op for op in overloads if op._schema.returns and "Tensor" in str(op._schema.returns[0].type)]


def _launches_nothing(name: str) -> bool:
    """Whether the profiled aten op `name` launches no kernel in any of its overloads (views, allocations)."""
    from zoo.bench.pipeline import launches_no_kernel

    overloads = _tensor_overloads(name)
    return bool(overloads) and all(launches_no_kernel(op) for op in overloads)


def _composite(name: str) -> bool:
    """Whether the aten op `name` decomposes into other ops in every overload (`aten::linear`, `aten::dropout`)."""
    found = []
    for op in _tensor_overloads(name):
        qualified = op._schema.name + ("" if op._overloadname == "default" else f".{op._overloadname}")
        try:
            found.append(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CompositeImplicitAutograd"))
        except RuntimeError:  # an overload outside the dispatcher's registry (TorchScript's `prim` ones)
            continue
    return bool(found) and all(found)


def profiled_kernels(events: list) -> dict[str, int]:
    """Kernel calls among profiler `events` (top-level events of `torch.profiler`), by name.

    A call is an inductor kernel (its generated code records one event per kernel with
    `torch._inductor.config.cpp.enable_kernel_profile`), or an outermost aten op that launches a kernel: a
    composite op (`aten::linear`) counts the ops it decomposes into, and views and allocations count
    nothing, as for `DispatchCounter`, which sees operators after decomposition.
    """
    counts: dict[str, int] = {}
    composite = {}

    def visit(event: Any) -> None:
        name = event.name
        if "cpp_fused" in name or "triton_" in name:
            counts["inductor kernel"] = counts.get("inductor kernel", 0) + 1
            return
        if name.startswith("aten::"):
            if name not in composite:
                composite[name] = _composite(name)
            if not composite[name]:
                if not _launches_nothing(name):
                    counts[name] = counts.get(name, 0) + 1
                return
        for child in event.cpu_children:
            visit(child)

    for event in events:
        visit(event)
    return counts


def bench_kernels(*, name: str = "stream_diffvsr", variant: str = "tiny", frames: int = 4,
                  size: tuple[int, int] = (16, 16), compile: str = "eager", threads: int = 1) -> dict:
    """Kernel calls per output frame of `stream()` on the CPU, eager or compiled (inductor's fused kernels count).

    The clip is streamed twice: the first pass compiles every case (a stream's first frame, later frames, a
    last chunk), the second runs under `torch.profiler`, whose events are counted by `profiled_kernels`. On
    the CPU inductor keeps matmuls and convolutions as library calls and fuses the rest, as it does on a GPU,
    so the count approximates a GPU's kernel launches per frame; an eager count equals `DispatchCounter`'s.

    Args:
        name: hub name.
        variant: network size ("tiny" or "full"), random weights.
        frames: LR frames per pass.
        size: LR frame size (H, W).
        compile: "eager", or a compile scope ("networks", "step"; `COMPILE_SCOPES`).
        threads: CPU threads.

    Returns:
        {"name", "variant", "compile", "size", "frames", "frames_out", "warmup_s", "kernels_per_frame",
        "by_name" (per frame, largest first)}.
    """
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if compile not in ("eager", *COMPILE_SCOPES):
        raise ValueError(f"compile must be eager, {', '.join(COMPILE_SCOPES)}; got {compile!r}")
    from zoo.bench.pipeline import random_upscaler as inference_upscaler

    set_threads(threads)
    upscaler = inference_upscaler(name, variant)  # `zoo.load`'s model: LoRA merged, attention projections fused
    if compile != "eager":
        upscaler.configure(compile={"scope": compile})
    with inductor_config.patch({"cpp.enable_kernel_profile": True}), torch.no_grad():
        start = time.perf_counter()
        for _ in upscaler.stream(random_frames(frames, *size)):
            pass
        warmup_s = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            frames_out = sum(1 for _ in upscaler.stream(random_frames(frames, *size)))
    counts = profiled_kernels([event for event in prof.events() if event.cpu_parent is None])
    return {"name": name, "variant": variant, "compile": compile, "size": list(size), "frames": frames,
            "frames_out": frames_out, "warmup_s": warmup_s,
            "kernels_per_frame": sum(counts.values()) / frames_out,
            "by_name": {k: v / frames_out for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}
