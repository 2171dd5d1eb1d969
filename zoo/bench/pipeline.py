"""`zoo bench --model NAME`: speed, memory and FLOPs of a hub entry's pipeline at a chosen size.

The network is built at `tiny` or `full` size with random weights (no download: every `*_pretrained`
config field is switched off) and streams random frames. One run:

1. counts, over the real `stream()` of a copy of the network made of fake tensors (`fake_upscaler`:
   shapes without storage, so a 5B-parameter model at 720p counts in seconds on a CPU), the FLOPs per
   output frame with `torch.utils.flop_counter`, split by module group (VAE encoder, denoiser,
   ControlNet, decoder, flow, ...; `FLOP_GROUPS`), and the operators dispatched per output frame
   (`DispatchCounter`: kernel launches on a GPU), the stream's peak device memory beyond its weights (an
   estimate: the storages its operators make, while they live), the bytes its operators move and its roofline
   time on an H200 (`Roofline`: a lower bound on eager time there); a host sync in steady state fails the count;
2. warms up, then times the stream frame by frame with device synchronisation: first-frame latency,
   ms per output frame (median, p10, p90), achieved TFLOP/s;
3. reads peak device memory (CUDA) and peak host memory (RSS);
4. relates the FLOPs to the model's stated lower bound (`zoo.bench.bounds`), when it has one.

Timing is only honest on an idle machine: the thread count is set (and reported), and a machine whose
load average exceeds its cores is refused unless `busy_ok`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torch.utils.weak import WeakIdKeyDictionary

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
    "net.base": "denoiser",
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


class GroupTimer:
    """Device time of each `FLOP_GROUPS` group while it is active: where a frame's milliseconds go.

    Global module hooks open an interval when the outermost module of a group starts and close it when that
    module returns; on CUDA each end is an event recorded in the stream (no host sync until `totals_ms`), on
    the CPU a clock read. Time outside every group is the run's total minus the groups'. For eager runs only:
    the hooks would enter a compiled graph.

    Args:
        groups: module -> group name (`module_groups`).
        device: where the model runs.
    """

    def __init__(self, groups: dict[torch.nn.Module, str], device: torch.device) -> None:
        self.groups = groups
        self.cuda = device.type == "cuda"
        self.intervals: list[tuple[str, Any, Any]] = []
        self._open: tuple[torch.nn.Module, str, Any] | None = None
        self._handles: list[Any] = []

    def _stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if self._open is None and module in self.groups:
            self._open = (module, self.groups[module], self._stamp())

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._open is not None and self._open[0] is module:
            self.intervals.append((self._open[1], self._open[2], self._stamp()))
            self._open = None

    def __enter__(self) -> GroupTimer:
        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                         torch.nn.modules.module.register_module_forward_hook(self._exit, always_call=True)]
        return self

    def __exit__(self, *args: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds per group over every interval so far (synchronises the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for group, start, end in self.intervals:
            ms = start.elapsed_time(end) if self.cuda else 1000 * (end - start)
            totals[group] = totals.get(group, 0.0) + ms
        return totals


def random_upscaler(name: str, size: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> VideoUpscaler:
    """The hub entry `name` at `size` with random weights everywhere (no published sub-weights), eval mode.

    Its LoRA adapters are merged into the base weights and its attention projections fused before the cast to
    `dtype`, as `zoo.load` does: the benchmark measures the inference path users get.
    """
    cls = upscaler_class(name)
    config = getattr(cls.config_class, check_variant(size))()
    switched = {f.name: False for f in dataclasses.fields(config) if f.name.endswith("_pretrained")}
    config = dataclasses.replace(config, **switched)
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs: a 5B-parameter network inits in seconds on a GPU
        upscaler = cls(config)
    upscaler.merge_lora()
    upscaler.fuse_projections()
    return upscaler.to(dtype=dtype).eval()


def fake_upscaler(name: str, size: str, dtype: torch.dtype = torch.float32,
                  options: dict[str, Any] | None = None) -> tuple[VideoUpscaler, FakeTensorMode]:
    """The hub entry `name` at `size` with fake (storage-free) CPU weights, and the mode to run it under.

    The network is built on the `meta` device and configured with `options` there (an option may cast weights,
    which fake parameters cannot be swapped for on every PyTorch version), then every parameter and buffer
    becomes a `FakeTensor` on the CPU: ops compute shapes only, so the real `stream()` runs at any size in
    seconds, and any read of a computed value (`.item()`, `bool()`, a data-dependent shape) raises. Unlike the
    `meta` device, the CPU accepts the pipelines' `torch.Generator`s, so nothing in a pipeline is replaced.
    """
    with torch.device("meta"):
        upscaler = random_upscaler(name, size, "meta", dtype).configure(**(options or {}))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    cpu = torch.device("cpu")

    def fake(tensor: Tensor) -> Tensor:
        return mode.fake_tensor_converter.from_meta_and_device(mode, tensor, cpu)

    for module in upscaler.modules():
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = torch.nn.Parameter(fake(param), requires_grad=False)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = fake(buffer)
    return upscaler, mode


class HostSyncError(RuntimeError):
    """A pipeline read a device tensor's value on the host in steady state."""


# Ops that make the host wait for the device: reading a value (`.item()`, `bool()`, `.tolist()`, `int()`)
# or an output whose shape depends on values.
HOST_SYNC_OPS = frozenset({
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
})


# Operators without a view annotation that still launch no kernel, in every overload (torch 2.11 has an
# `empty.names` too): `_unsafe_view` is the reshape of a fresh tensor (metadata only, left untracked as an alias on
# purpose), and the `empty` family only takes memory from the caching allocator.
NO_KERNEL_OPS = frozenset({
    torch.ops.aten._unsafe_view,
    torch.ops.aten.empty,
    torch.ops.aten.empty_strided,
    torch.ops.aten.empty_like,
    torch.ops.aten.new_empty,
    torch.ops.aten.new_empty_strided,
})


def launches_no_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether `func` launches no kernel: a view (returns an alias of an input without writing it), an
    untracked reshape or an allocation (an overload of `NO_KERNEL_OPS`)."""
    if func.overloadpacket in NO_KERNEL_OPS:
        return True
    return any(ret.alias_info is not None and not ret.alias_info.is_write for ret in func._schema.returns)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A GPU's peaks, for the roofline time of a counted run (`DispatchCounter.roofline_s`).

    Each launched operator takes at least its FLOPs over the peak rate of its dtype and its bytes (read and
    written) over the memory bandwidth, whichever is longer: perfect kernels, no launch overhead, no overlap
    between operators. The sum is a lower bound on an eager run's time on that GPU; fusing operators (compiling)
    is what moves fewer bytes. A tensor an operator both reads and writes (in place) counts once, which keeps the
    bound a lower one.

    Attributes:
        name: the GPU and where its peaks come from.
        flops_16bit: dense bf16/fp16 tensor-core FLOP/s.
        flops_32bit: dense TF32 tensor-core FLOP/s (float32 matmuls and convolutions run TF32 on CUDA here).
        bandwidth: memory bytes per second.
    """

    name: str
    flops_16bit: float
    flops_32bit: float
    bandwidth: float


H200 = Roofline("NVIDIA H200 SXM (datasheet: 989 TFLOP/s dense bf16, 495 TF32, 4.8 TB/s HBM3e)",
                989.4e12, 494.7e12, 4.8e12)


# Operators that sample their input at given points read at most this many input values per output value (bilinear
# and trilinear taps), however large the input: RAFT's correlation lookup samples 9x9 windows of a volume of 0.8 GB
# at 720p.
SAMPLING_TAPS = {torch.ops.aten.grid_sampler_2d.default: 4, torch.ops.aten.grid_sampler_3d.default: 8}


def _tensor_bytes(tensor: Tensor) -> int:
    """Bytes an operator touches in `tensor`: its elements, or its storage where that is smaller (broadcasts)."""
    return min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())


class DispatchCounter(TorchDispatchMode):
    """Counts the aten operators a run dispatches and fails on a host sync of a device tensor.

    A dispatched operator is a kernel launch on a GPU, except views, untracked reshapes and allocations
    (`views`, `launches_no_kernel`). Under
    `fake_upscaler`'s mode, fake tensors stand for device tensors and real ones for host data: an op on
    real tensors only (a stream's first frame, checked once per clip) runs for real outside the fake mode,
    while reading a fake tensor's value raises `HostSyncError`. `.cpu()` of a fake CPU tensor dispatches
    nothing and goes unseen.

    It also follows the device memory the run allocates: each new storage that a fake operator's output holds
    counts its bytes from its making until its last tensor is freed (a finaliser on the storage). Views and
    in-place operators make none; weights and inputs made before the run are not counted. The peak is a lower
    estimate of a GPU's: the caching allocator's rounding and fragmentation, cuDNN's workspaces and the CUDA
    context come on top.

    And it adds up each launched operator's traffic on device tensors (the bytes of its inputs and outputs)
    and its roofline time on `roofline` (`Roofline`).

    Attributes:
        launches: operators dispatched that launch a kernel.
        views: operators dispatched that launch none (views, untracked reshapes, allocations).
        allocated_bytes: bytes of the device storages made in the run that are still alive.
        peak_bytes: the most `allocated_bytes` has been.
        bytes_moved: bytes the launched operators on device tensors read and wrote.
        roofline_s: their roofline time on `roofline`.
    """

    def __init__(self, roofline: Roofline = H200) -> None:
        super().__init__()
        self.launches = 0
        self.views = 0
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.bytes_moved = 0
        self.roofline_s = 0.0
        self.roofline = roofline
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        launches = func.namespace == "aten" and not launches_no_kernel(func)
        if launches:
            self.launches += 1
        elif func.namespace == "aten":
            self.views += 1
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
        if tensors and not any(isinstance(x, FakeTensor) for x in tensors):
            with _disable_current_modes():  # host data: computed for real, never a device sync
                return func(*args, **kwargs)
        if func in HOST_SYNC_OPS:
            raise HostSyncError(f"{func} reads a device tensor's values on the host (a host sync)")
        out = func(*args, **kwargs)
        if not any(ret.alias_info is not None for ret in func._schema.returns):  # views and in-place ops make none
            for tensor in tree_leaves(out):
                if isinstance(tensor, FakeTensor):
                    self._track(tensor.untyped_storage())
        if launches:
            self._add_roofline(func, args, kwargs, out, tensors)
        return out

    def _add_roofline(self, func: Any, args: Any, kwargs: Any, out: Any, inputs: list[Tensor]) -> None:
        touched = {id(t): t for t in (*inputs, *tree_leaves(out)) if isinstance(t, FakeTensor)}
        moved = sum(_tensor_bytes(t) for t in touched.values())
        taps = SAMPLING_TAPS.get(func)
        if taps is not None and isinstance(args[0], FakeTensor):  # it reads at most `taps` values per output value
            moved -= max(_tensor_bytes(args[0]) - taps * _tensor_bytes(out), 0)
        flops = 0
        if func._overloadpacket in flop_registry:
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        wide = any(t.dtype == torch.float32 for t in inputs)  # float32 matmuls: TF32
        rate = self.roofline.flops_32bit if wide else self.roofline.flops_16bit
        self.bytes_moved += moved
        self.roofline_s += max(flops / rate, moved / self.roofline.bandwidth)

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._storages:  # an output that shares an earlier output's storage (`_unsafe_view`)
            return
        size = storage.nbytes()
        self._storages[storage] = size
        self.allocated_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.allocated_bytes -= size


@dataclasses.dataclass
class StreamCount:
    """What streaming a clip through a fake pipeline cost.

    Attributes:
        flops: FLOPs by group (`FLOP_GROUPS`, "other" outside every group) and "total".
        launches: operators dispatched that launch a kernel (on a GPU).
        views: operators dispatched that launch none (views, untracked reshapes, allocations).
        frames_out: output frames.
        seconds: wall time of the count itself.
        peak_bytes: the most device memory the stream held beyond its weights and inputs (`DispatchCounter`),
            with each output frame freed as it is yielded.
        bytes_moved: bytes its launched operators read and wrote on the device.
        roofline_s: its roofline time on an H200 (`Roofline`): a lower bound on an eager run's time there.
    """

    flops: dict[str, int]
    launches: int
    views: int
    frames_out: int
    seconds: float
    peak_bytes: int = 0
    bytes_moved: int = 0
    roofline_s: float = 0.0


def count_stream(upscaler: VideoUpscaler, mode: FakeTensorMode, frames: list[Tensor]) -> StreamCount:
    """Stream `frames` through a `fake_upscaler`, counting FLOPs and launches; a host sync raises `HostSyncError`.

    The first frame arrives as real host data (its values are checked once per clip); every later one as a
    fake device tensor, as frames uploaded before `stream()` are, so reading any of their values is a sync.
    """
    counter = DispatchCounter()
    flops = GroupedFlopCounter(module_groups(upscaler))
    device_frames = [frames[0], *(mode.from_tensor(frame) for frame in frames[1:])]
    start = time.perf_counter()
    with torch.no_grad(), mode, flops, counter:
        frames_out = sum(1 for _ in upscaler.stream(iter(device_frames)))
    return StreamCount({**flops.by_group, "total": flops.get_total_flops()}, counter.launches, counter.views,
                       frames_out, time.perf_counter() - start, counter.peak_bytes, counter.bytes_moved,
                       counter.roofline_s)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers, each storage once."""
    storages = {}
    for tensor in (*module.parameters(), *module.buffers()):
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage  # held, so that no id is reused while counting
    return sum(storage.nbytes() for storage in storages.values())


def random_frames(count: int, height: int, width: int, seed: int = 1) -> Iterator[Tensor]:
    """`count` random LR frames `(3, height, width)`, made one at a time."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(3, height, width, generator=generator) for _ in range(count))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """`torch.set_num_threads(threads)`, refused beyond this machine's cores; returns `threads`."""
    cores = machine_cores()
    if not 1 <= threads <= cores:
        raise ValueError(f"threads must be in [1, {cores}] (this machine's cores), got {threads}")
    torch.set_num_threads(threads)
    return threads


def _check_idle(busy_ok: bool) -> float:
    load = os.getloadavg()[0]
    cores = machine_cores()
    if load > cores and not busy_ok:
        raise ValueError(f"the load average is {load:.1f} on {cores} cores: timings would measure the other "
                         f"processes; wait for an idle machine or pass busy_ok=True (--busy-ok)")
    return load


def bench_pipeline(*, model: str = "stream_diffvsr", size: str = "tiny", height: int = 128, width: int = 128,
                   frames: int = 9, dtype: str = "float32", device: str = "auto", compile: bool = False,
                   threads: int | None = None, warmup: int = 3, options: dict[str, Any] | None = None,
                   busy_ok: bool = False, timed: bool | None = None,
                   counts: dict[str, Any] | None = None, breakdown: bool = False) -> dict[str, Any]:
    """Speed, memory, FLOPs and operator launches of `model`'s `stream()` at `height` x `width` OUTPUT pixels.

    Args:
        model: hub name.
        size: "tiny" or "full" (the paper's architecture), random weights.
        height: output frame height (the LR frames are `height / scale`).
        width: output frame width.
        frames: LR frames streamed, in the count and in the timed run.
        dtype: "float32", "bfloat16" or "float16".
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        compile: wrap the pipeline's per-frame step in `torch.compile` (its `compile` option).
        threads: CPU threads (`torch.set_num_threads`); 1 when None on CPU, at most the machine's cores.
        warmup: output frames streamed (and discarded) before timing, from the start of the clip: with 3, a
            per-frame pipeline runs its first frame and two steady ones (Stream-DiffVSR's first frame runs
            without ARTG: another graph), a chunked one its first chunk (which yields a chunk at once), so
            each shape the timed run meets is compiled and tuned first.
        options: the pipeline's runtime options (`VideoUpscaler.configure`).
        busy_ok: time even when the machine is busier than its cores.
        timed: build the real network and time it; None times unless a full-size network would run on the
            CPU (hours per clip, and more memory than the machine has: the count alone runs then).
        counts: the record of an earlier run of the same model, size, output size, LR frames and options
            (`zoo bench ... --count-only --json FILE`), whose count is used instead of counting again: the count
            depends on neither device nor compile (its bytes and memory do depend on the dtype), and at 33 frames of
            720p takes minutes of CPU.
        breakdown: time the timed run's module groups too (`GroupTimer`, eager runs only) and report
            `ms_by_group`: device milliseconds per output frame in each group, "other" the rest.

    Returns:
        A flat record: configuration, the count (`flops_per_frame` by group, `launches_per_frame`,
        `views_per_frame`, `count_s`, `bound_flops_per_frame` / `ratio_to_bound`, `weight_bytes` and the
        estimated `peak_activation_bytes` beyond them, `bytes_moved_per_frame` and `roofline_ms_per_frame`: the
        eager stream's lower bound on an H200, `Roofline`) and, when timed,
        `first_frame_ms`, `ms_per_frame` {median, p10, p90, mean} of the gaps between output frames after the
        first (a per-frame pipeline's steady state), `ms_per_output_frame` (the whole timed stream over its output
        frames: a chunked pipeline's rate, and what `tflops` and `--vs`'s speedup use), peak memory and `tflops`.
    """
    if breakdown and compile:
        raise ValueError("breakdown times eager runs only: module hooks would enter the compiled graphs")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (one for latency, the rest for the rate), got {frames}")
    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    cores = machine_cores()
    threads = set_threads(threads or (torch.get_num_threads() if torch_device.type == "cuda" else 1))
    timed = (size == "tiny" or torch_device.type == "cuda") if timed is None else timed
    load = _check_idle(busy_ok) if timed else os.getloadavg()[0]

    if counts is None:
        count = _count(model, size, height, width, frames, dtype, options)
    else:
        count = _reuse_count(counts, model, size, height, width, frames, dtype, options)
    result = {
        "model": model, "size": size, "device": str(torch_device), "dtype": dtype, "threads": threads,
        "cores": cores, "load_average": round(load, 2), "compile": compile, "options": options or {},
        "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None,
        "torch": torch.__version__, **count, "timed": timed,
    }
    if timed:
        lr = list(random_frames(frames, *result["input"]))
        result.update(_time_stream(model, size, torch_device, DTYPES[dtype], options, compile, lr, warmup,
                                   result["flops_per_frame"]["total"], breakdown))
    return result


COUNT_KEYS = ("input", "output", "frames_in", "frames_out", "flops_per_frame", "launches_per_frame",
              "views_per_frame", "count_s", "bound_flops_per_frame", "ratio_to_bound", "weight_bytes",
              "peak_activation_bytes", "bytes_moved_per_frame", "roofline_ms_per_frame", "roofline")
"""The fields of a `bench_pipeline` record that its count gives (the rest: the run's settings and timings)."""
UNCOUNTED_OPTIONS = frozenset({"channels_last", "compile"})
"""Options a count does not depend on, so that a stored count serves runs that differ in them: the memory format (the
count builds the network on the `meta` device, where none is set, and runs it on fake CPU tensors in PyTorch's
default layout) and compilation (the count is of the eager operators, as with `--compile`)."""


def _count(model: str, size: str, height: int, width: int, frames: int, dtype: str,
           options: dict[str, Any] | None) -> dict[str, Any]:
    """FLOPs, launches and the bound of streaming `frames` random LR frames, on fake tensors."""
    from zoo.bench.bounds import flop_bound

    # Compilation changes no count (the count runs eager).
    fake, mode = fake_upscaler(model, size, DTYPES[dtype],
                               {key: value for key, value in (options or {}).items() if key != "compile"})
    scale = fake.scale
    if height % scale or width % scale:
        raise ValueError(f"{model} upscales x{scale}: height and width must divide by {scale}, got {height}x{width}")
    lr_size = (height // scale, width // scale)
    lr = list(random_frames(frames, *lr_size))
    count = count_stream(fake, mode, lr)
    per_frame = {group: value / count.frames_out for group, value in count.flops.items()}
    with torch.no_grad(), mode, DispatchCounter():  # host-side constants (schedules) stay real, as in the count
        bound = flop_bound(fake, *lr_size, frames)
    return {
        "input": list(lr_size), "output": [height, width], "frames_in": len(lr), "frames_out": count.frames_out,
        "flops_per_frame": per_frame, "launches_per_frame": count.launches / count.frames_out,
        "views_per_frame": count.views / count.frames_out, "count_s": count.seconds,
        "bound_flops_per_frame": bound, "ratio_to_bound": per_frame["total"] / bound if bound else None,
        "weight_bytes": weight_bytes(fake), "peak_activation_bytes": count.peak_bytes,
        "bytes_moved_per_frame": count.bytes_moved / count.frames_out,
        "roofline_ms_per_frame": 1000 * count.roofline_s / count.frames_out, "roofline": H200.name,
    }


def _reuse_count(record: dict[str, Any], model: str, size: str, height: int, width: int, frames: int, dtype: str,
                 options: dict[str, Any] | None) -> dict[str, Any]:
    """The count fields of an earlier `bench_pipeline` record, after checking it counted this same stream."""
    record = record.get("baseline", record)  # a `--vs` record: its first run

    def counted(options: dict[str, Any] | None) -> dict[str, Any]:
        return {key: value for key, value in (options or {}).items() if key not in UNCOUNTED_OPTIONS}

    wanted = {"model": model, "size": size, "output": [height, width], "frames_in": frames, "dtype": DTYPES[dtype],
              "options": counted(options)}
    found = {key: record.get(key) for key in wanted}
    found["dtype"] = DTYPES.get(found["dtype"])  # "bf16" and "bfloat16" are one dtype
    found["options"] = counted(found["options"])
    if found != wanted:
        differ = ", ".join(f"{key} {found[key]!r} (not {wanted[key]!r})" for key in wanted if found[key] != wanted[key])
        raise ValueError(f"the stored count is of another run: {differ}")
    missing = [key for key in COUNT_KEYS if key not in record]
    if missing:
        raise ValueError(f"the stored count lacks {', '.join(missing)}: pass the JSON of a `zoo bench --model` run")
    return {key: record[key] for key in COUNT_KEYS}


def _progress(message: str) -> None:
    """One line of a timed run's progress on stderr (stdout carries the JSON record)."""
    print(f"zoo bench: {message}", file=sys.stderr, flush=True)


def _time_stream(model: str, size: str, device: torch.device, dtype: torch.dtype, options: dict[str, Any] | None,
                 compile: bool, frames: list[Tensor], warmup: int, flops_per_frame: float,
                 breakdown: bool = False) -> dict[str, Any]:
    """Warm up, then time the real network's stream frame by frame with device synchronisation.

    Each phase reports its time on stderr as it ends, so a run stopped by a time limit still shows where the
    time went.
    """
    start = time.perf_counter()
    upscaler = random_upscaler(model, size, device, dtype).configure(**(options or {}))
    if compile:
        upscaler.configure(compile=True)
    lr = [f.to(device, dtype) for f in frames]
    _synchronize(device)
    _progress(f"built {model} ({size}, {dtype}) on {device} in {time.perf_counter() - start:.1f} s")
    compile_start = time.perf_counter()
    with torch.no_grad():
        warmed = 0
        for _ in upscaler.stream(iter(lr)):
            warmed += 1
            if warmed >= max(warmup, 1):
                break
    _synchronize(device)
    warmup_s = time.perf_counter() - compile_start
    _progress(f"warm-up: {warmed} output frames in {warmup_s:.1f} s (compile: {upscaler.compile_seconds})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = []
    # The breakdown rides on the timed run: a pair of events per group call, recorded in the stream (a few
    # microseconds each), costs less than another pass over the clip.
    timer = GroupTimer(module_groups(upscaler), device) if breakdown else contextlib.nullcontext()
    start = time.perf_counter()
    with torch.no_grad(), timer:
        for _ in upscaler.stream(iter(lr)):
            _synchronize(device)
            stamps.append(time.perf_counter())
            if len(stamps) == 1 or len(stamps) % 8 == 0:
                _progress(f"timed: {len(stamps)} output frames in {stamps[-1] - start:.1f} s")
    gaps = [1000 * (b - a) for a, b in zip([start, *stamps[:-1]], stamps)]
    steady = gaps[1:] or gaps
    quantiles = statistics.quantiles(steady, n=10) if len(steady) > 1 else steady * 9
    mean_s = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    # The whole timed stream over its output frames, first included: a chunked model yields a whole chunk at once,
    # so its gaps after the first are ~0 and `mean_s` measures nothing there; `flops_per_frame` is over every frame.
    per_output_s = (stamps[-1] - start) / len(stamps)
    peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    by_group = None
    if breakdown:
        by_group = {group: ms / len(stamps) for group, ms in timer.totals_ms().items()}
        by_group["other"] = 1000 * (stamps[-1] - start) / len(stamps) - sum(by_group.values())
        _progress("ms per output frame by group: " + ", ".join(f"{k} {v:.1f}" for k, v in by_group.items()))
    return {
        # `compile_seconds`: each compiled step's calls that compiled a graph, run included (empty without compile).
        "warmup_s": warmup_s, "compile_seconds": upscaler.compile_seconds, "first_frame_ms": gaps[0],
        "ms_per_frame": {"median": statistics.median(steady), "p10": quantiles[0], "p90": quantiles[-1],
                         "mean": 1000 * mean_s},
        "ms_per_output_frame": 1000 * per_output_s,
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_bytes": peak_device,
        "tflops": flops_per_frame / per_output_s / 1e12,
        "ms_by_group": by_group,
    }
