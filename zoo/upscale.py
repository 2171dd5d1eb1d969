"""Upscale videos with any hub model: `zoo.upscale_video` and the `zoo upscale` command.

```python
import zoo
from zoo.components.samples import sample_clips

clip = sample_clips(num_frames=4, size=(24, 32))[0]     # a built-in clip, no download
zoo.write_video("lr.mp4", clip.frames, fps=8)
report = zoo.upscale_video("lr.mp4", "x4.mp4", model="stream_diffvsr", pretrained=False, variant="tiny")
print(report.frames_out, f"{report.seconds:.1f} s", f"{report.peak_host_bytes / 2**20:.0f} MiB")
```

With published weights, `zoo.upscale_video("in.mp4", "out.mp4", model="stream_diffvsr")`; the
command line is `zoo upscale in.mp4 out.mp4 --model stream_diffvsr`.

Frames stream from the source through `VideoUpscaler.stream()` into the writer, so memory depends
on the frame size and the model's tiles or chunks, never on the video's length. Everything a run
can refuse (paths, extensions, codecs, options, existing outputs) is checked before the model
loads; outputs appear only complete (`video_io` writes beside them and renames).

Inputs are video files, frame folders, y4m on stdin (`-`), folders of videos and globs; several
inputs, a folder of videos or a glob make a batch whose outputs mirror the input tree under the
output folder. `--devices N` runs a batch on N devices through Lightning
(`zoo.components.train.predict`, the same pieces as `lightning predict -c recipes/predict.yaml`).

This module never imports the training stack; only `--checkpoint` and `--devices` do, lazily.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

    from zoo.components.upscaler import VideoUpscaler
    from zoo.components.video_io import ColorTags

log = logging.getLogger("zoo.upscale")

STDIO = "-"
IF_EXISTS = ("error", "skip", "overwrite")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
          "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# CLI flag of each shared option name (`VideoUpscaler` docstring) and what it is called in messages.
OPTION_FLAGS = {
    "scale": ("--scale", "spatial scale"),
    "temporal_scale": ("--temporal-scale", "temporal scale"),
    "tile": ("--tile", "spatial tiles"),
    "tile_overlap": ("--tile-overlap", "spatial tiles"),
    "chunk": ("--chunk", "temporal chunks"),
    "chunk_overlap": ("--chunk-overlap", "temporal chunks"),
    "color_fix": ("--color-fix", "colour fix"),
    "seed": ("--seed", "seed (it draws no noise)"),
    "compile": ("--compile", "graph capture"),
    "vae_tiling": ("--vae-tiling", "VAE tiles"),
    "float32_vae": ("--float32-vae", "float32 VAE"),
}


def _compile_scope(value: str) -> str:
    """`--compile-scope`: one of `COMPILE_SCOPES`."""
    from zoo.components.upscaler import COMPILE_SCOPES  # here, not at import: the CLI starts without torch

    if value not in COMPILE_SCOPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(COMPILE_SCOPES)}, got {value!r}")
    return value


class UpscaleError(ValueError):
    """A run that cannot start: bad inputs, outputs or options (the CLI exits with 2)."""


# Jobs: which source becomes which output ------------------------------------------------------


@dataclass
class VideoJob:
    """One video to upscale: a source (file, frame folder or `-`) and its output (file, folder or `-`).

    Attributes:
        source: video file, frame folder, or `-` for y4m on stdin.
        target: video file, frame folder (a path without extension), or `-` for y4m on stdout.
        start: seconds of the source to skip (video and audio).
        duration: seconds to upscale from `start`; to the end when None.
    """

    source: str
    target: str
    start: Fraction = Fraction(0)
    duration: Fraction | None = None

    @property
    def name(self) -> str:
        return "stdin" if self.source == STDIO else Path(self.source).name

    def complete(self) -> bool:
        """Whether the output exists: a file, or a frame folder with frames (writes rename into place)."""
        if self.target == STDIO:
            return False
        target = Path(self.target)
        if target.is_dir():
            return any(target.iterdir())
        return target.exists()


def parse_time(text: str | float | Fraction | None, flag: str = "time") -> Fraction | None:
    """Seconds as a `Fraction` from `SS[.fff]`, `MM:SS[.fff]` or `HH:MM:SS[.fff]` (or a number).

    Raises:
        UpscaleError: for anything else or a negative time.
    """
    if text is None:
        return None
    if isinstance(text, (int, float, Fraction)):
        seconds = Fraction(text)
    else:
        parts = text.strip().split(":")
        try:
            if len(parts) > 3 or any(not part or part.startswith(("-", "+")) for part in parts):
                raise ValueError(text)
            seconds = Fraction(0)
            for part in parts:
                seconds = seconds * 60 + Fraction(part)
        except ValueError:
            raise UpscaleError(f"{flag} takes seconds or [HH:]MM:SS[.fff], got {text!r}") from None
    if seconds < 0:
        raise UpscaleError(f"{flag} must not be negative, got {text!r}")
    return seconds


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[") and not Path(text).exists()


def _videos_below(root: Path) -> list[Path]:
    """Video files and frame folders under `root`, in natural order.

    Hidden files and folders are skipped (the `.name.partial` files of writes in progress among
    them), and so is what lies below a frame folder.
    """
    from zoo.components.video_io import VIDEO_EXTENSIONS, list_frame_files, natural_key

    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        if here != root and list_frame_files(here):
            found.append(here)
            subfolders.clear()
            continue
        found += [here / name for name in files
                  if Path(name).suffix.lower() in VIDEO_EXTENSIONS and not name.startswith(".")]
    return sorted(found, key=lambda p: [natural_key(part) for part in p.relative_to(root).parts])


def _expand(input: str) -> tuple[list[tuple[Path, Path]], bool]:
    """`(source, its path in the batch output)` pairs of one INPUT, and whether it is a batch.

    The path is the source's name for a file, its path below the folder for a folder of videos,
    and its path below the fixed part (the folders before the first wildcard) for a glob.
    """
    from zoo.components.video_io import VIDEO_EXTENSIONS, list_frame_files

    if _is_glob(input):
        static = Path(*itertools.takewhile(lambda part: not _is_glob(part), Path(input).parts))
        matches = [Path(p) for p in glob.glob(input, recursive=True)]
        matches = [p for p in matches if (p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
                   or (p.is_dir() and list_frame_files(p))]
        if not matches:
            raise UpscaleError(f"{input} matches no video file or frame folder")
        return [(p, p.relative_to(static)) for p in matches], True
    path = Path(input)
    if not path.exists():
        raise UpscaleError(f"cannot read {input}: no such file or folder")
    if path.is_dir() and not list_frame_files(path):
        videos = _videos_below(path)
        if not videos:
            raise UpscaleError(f"{input} holds no video files or frame images")
        return [(p, p.relative_to(path)) for p in videos], True
    return [(path, Path(path.name))], False


def find_jobs(inputs: Sequence[str], output: str, *, start: Fraction = Fraction(0),
              duration: Fraction | None = None) -> tuple[list[VideoJob], bool]:
    """The jobs of `zoo upscale INPUT [INPUT ...] OUTPUT`, and whether they are a batch.

    One input that is a video (file, frame folder, `-`) goes to `output` itself. Several inputs, a
    folder of videos or a glob make a batch: each video goes to `output/<path>`, its path relative
    to its folder or to the glob's fixed part (a folder given as input keeps its own name when
    there are several), so the output mirrors the input tree. Hidden files and folders are skipped.

    Raises:
        UpscaleError: missing inputs, `-` in a batch, two sources for one output.
    """
    if not inputs:
        raise UpscaleError("give at least one INPUT")
    if STDIO in inputs:
        if len(inputs) > 1:
            raise UpscaleError("- (y4m on stdin) cannot be part of a batch")
        return [VideoJob(STDIO, output, start, duration)], False
    expanded = [_expand(input) for input in inputs]
    if len(inputs) == 1 and not expanded[0][1]:
        return [VideoJob(str(expanded[0][0][0][0]), output, start, duration)], False
    if output == STDIO:
        raise UpscaleError("a batch writes into a folder, not to - (stdout)")
    root = Path(output)
    jobs, sources_of = [], {}
    for input, (pairs, _) in zip(inputs, expanded):
        # Among several inputs, a folder keeps its name, so that two folders' files cannot collide.
        prefix = Path(Path(input).resolve().name) if len(inputs) > 1 and Path(input).is_dir() else Path()
        for source, relative in pairs:
            target = root / prefix / relative
            if target in sources_of:
                raise UpscaleError(f"{sources_of[target]} and {source} would both be written to {target}")
            sources_of[target] = source
            jobs.append(VideoJob(str(source), str(target), start, duration))
    return jobs, True


# Checks before the model loads ---------------------------------------------------------------


@dataclass
class SourceInfo:
    """What a job reads: size, rate, frames to read (after start/duration), audio, colour."""

    width: int
    height: int
    fps: Fraction
    first_frame: int
    num_frames: int | None  # None for a pipe
    has_audio: bool
    color: ColorTags | None
    y4m: Any = None  # the opened stdin reader for `-`

    @property
    def audio_span(self) -> tuple[float, float]:
        """Source seconds of the frames read, which the audio is cut to."""
        stop = self.first_frame + (self.num_frames or 0)
        return float(self.first_frame / self.fps), float(stop / self.fps)


def probe_source(job: VideoJob, stdin: BinaryIO | None = None) -> SourceInfo:
    """Open `job.source` enough to know its size, rate and the frames `start`/`duration` select."""
    from zoo.components.video_io import iter_y4m, probe_video

    if job.source == STDIO:
        reader = iter_y4m(stdin if stdin is not None else sys.stdin.buffer)
        first, count = _frame_span(job, reader.fps, None)
        return SourceInfo(reader.width, reader.height, reader.fps, first, count, False, None, reader)
    info = probe_video(job.source)
    first, count = _frame_span(job, info.fps, info.num_frames)
    return SourceInfo(info.width, info.height, info.fps, first, count, info.has_audio, info.color)


def _frame_span(job: VideoJob, fps: Fraction, total: int | None) -> tuple[int, int | None]:
    """First frame at or after `start`, and how many frames start before `start + duration`."""
    first = math.ceil(job.start * fps)
    stop = total if job.duration is None else math.ceil((job.start + job.duration) * fps)
    if total is not None:
        if first >= total:
            raise UpscaleError(f"--start {float(job.start):g} s is past the end of {job.source} "
                               f"({total} frames, {float(total / fps):g} s)")
        stop = min(stop, total)
    if stop is not None and stop <= first:
        raise UpscaleError(f"--duration {float(job.duration):g} s holds no frame of {job.source} at {fps} fps")
    return first, None if stop is None else stop - first


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_jobs(jobs: Sequence[VideoJob], inputs: Sequence[str], output: str, *, batch: bool) -> None:
    """Refuse an output that is (or resolves to) an input, and a batch's output folder inside an input folder.

    Raises:
        UpscaleError: naming the paths.
    """
    sources = [job.source for job in jobs if job.source != STDIO]
    for job in jobs:
        if job.target == STDIO:
            continue
        for source in sources:
            if _same_path(source, job.target):
                raise UpscaleError(f"the output {job.target} is the input {source}; choose another output")
    if batch:
        out = Path(output).resolve()
        for input in inputs:
            # A batch re-run would take what the first one wrote inside an input folder for inputs.
            if not _is_glob(input) and Path(input).is_dir() and out.is_relative_to(Path(input).resolve()):
                raise UpscaleError(f"the output folder {output} is inside the input folder {input}; "
                                   f"choose one outside it")


def existing_outputs(jobs: Sequence[VideoJob], if_exists: str) -> list[VideoJob]:
    """The jobs left to run under `if_exists` (`"error"`, `"skip"`, `"overwrite"`).

    Raises:
        UpscaleError: with `"error"`, for the first output that exists.
    """
    if if_exists not in IF_EXISTS:
        raise UpscaleError(f"if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
    done = [job for job in jobs if job.complete()]
    if done and if_exists == "error":
        more = f" (and {len(done) - 1} more)" if len(done) > 1 else ""
        raise UpscaleError(f"{done[0].target} exists{more}; pass --overwrite to replace, or --skip-existing to keep")
    if if_exists == "skip":
        return [job for job in jobs if not job.complete()]
    for job in done:
        if Path(job.target).is_dir():
            # A folder cannot be renamed over a full one, so replacing it could not be atomic.
            raise UpscaleError(f"--overwrite replaces files, not the frame folder {job.target}; remove it first")
    return list(jobs)


def check_target(job: VideoJob, source: SourceInfo, scale: int, *, audio: bool, codec: str | None,
                 crf: int) -> None:
    """`video_io.check_destination` for the job's output of `scale` times the source's size."""
    from zoo.components.video_io import check_destination, is_frame_folder_target

    if job.target == STDIO:
        return
    if source.has_audio and audio and is_frame_folder_target(job.target):
        raise UpscaleError(f"cannot write {job.target}: a frame folder cannot hold the audio of {job.source} "
                           f"(write a video file, or pass --no-audio)")
    check_destination(job.target, width=math.floor(source.width * scale), height=math.floor(source.height * scale),
                      codec=codec, crf=crf,
                      audio_from=job.source if source.has_audio and audio else None)


# Options: flags onto a pipeline's options -----------------------------------------------------


def _spell(name: str, value: Any, cli: bool) -> str:
    if cli:
        flag = OPTION_FLAGS[name][0] if name in OPTION_FLAGS else f"--{name}"
        if isinstance(value, bool):  # an on/off flag: as typed, `--vae-tiling` or `--no-vae-tiling`
            return flag if value else f"--no-{flag[2:]}"
        return f"{flag} {value}"
    return f"{name}={value!r}"


def _factors(values: Iterable[int]) -> str:
    values = [f"x{v}" for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def resolve_options(cls: type[VideoUpscaler], options: dict[str, Any], *,
                    cli: bool = False) -> tuple[dict[str, Any], dict[str, int]]:
    """Split what the user set (None: not set) into options to `configure` `cls` with, and fixed factors.

    A `scale`/`temporal_scale` the class does not take as an option is a fixed factor: it must be
    one of the class's `scales`/`temporal_scales` now, and the loaded model's (`check_factors`).
    Any other option the class does not take is refused by name. Checked on the class, before
    the weights load.

    Raises:
        UpscaleError: e.g. "--scale 3: osdiffvsr upscales x4 only".
    """
    resolved, fixed = {}, {}
    for name, value in options.items():
        if value is None:
            continue
        if name in ("scale", "temporal_scale"):
            allowed = cls.scales if name == "scale" else cls.temporal_scales
            if allowed and value not in allowed:
                what = "upscales" if name == "scale" else "interpolates frames"
                only = " only" if len(allowed) == 1 else ""
                raise UpscaleError(f"{_spell(name, value, cli)}: {cls.hub_name} {what} {_factors(allowed)}{only}")
            (resolved if name in cls.options else fixed)[name] = value
            continue
        if name not in cls.options:
            takes = sorted({OPTION_FLAGS[n][0] if cli and n in OPTION_FLAGS else n for n in cls.options})
            takes = takes or ["no options"]
            noun = OPTION_FLAGS.get(name, (None, name))[1]
            raise UpscaleError(f"{_spell(name, value, cli)}: {cls.hub_name} takes no {noun} "
                               f"(it takes {', '.join(takes)})")
        resolved[name] = value
    return resolved, fixed


def check_factors(model: VideoUpscaler, fixed: dict[str, int], *, cli: bool = False) -> None:
    """Refuse fixed factors (`resolve_options`) that the loaded model does not run at."""
    for name, value in fixed.items():
        actual = getattr(model, name)
        if value != actual:
            what = "upscale" if name == "scale" else "interpolate frames"
            raise UpscaleError(f"{_spell(name, value, cli)}: these {model.hub_name} weights {what} x{actual} only")


# The model -------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise UpscaleError(f"--device must be a torch device such as cuda, cuda:1 or cpu, got {device!r}") from None
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UpscaleError(f"--dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    return getattr(torch, DTYPES[dtype])


def load_model(name: str | None, *, weights: str | None = None, checkpoint: str | None = None,
               pretrained: bool = True, variant: str = "full", device: str = "cpu",
               dtype: torch.dtype | None = None) -> VideoUpscaler:
    """The hub entry `name` from the registry's weights, a weights folder/repo, or a `lightning fit` checkpoint."""
    from zoo.hub import load, upscaler_from_checkpoint

    if checkpoint is not None:
        model = upscaler_from_checkpoint(checkpoint)
        if name is not None and model.hub_name != name:
            raise UpscaleError(f"{checkpoint} holds a {model.hub_name} model, not {name}")
        return model.to(device=device, dtype=dtype).eval()
    return load(name, pretrained=pretrained, variant=variant, weights=weights, device=device, dtype=dtype)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device`: CUDA's free memory, or the host's available memory for the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    return None


def configure_for(model: VideoUpscaler, height: int, width: int, user: dict[str, Any]) -> dict[str, Any]:
    """Configure `model` for `height x width` frames: the user's options, and defaults that fit the free memory.

    Returns:
        The options the model runs with, as `{name: value}`.
    """
    free = free_memory(model.device)
    defaults = {} if free is None else model.default_options(height, width, free)
    model.configure(**{name: value for name, value in defaults.items() if name not in user}, **user)
    chosen = {name: getattr(model, name) for name in model.options}
    parts = []
    for name, value in chosen.items():
        origin = " (set)" if name in user else " (fits the free memory)" if name in defaults else ""
        parts.append(f"{name}={value}{origin}")
    estimate = model.estimate_memory(height, width)
    memory = ""
    if estimate is not None and free is not None:
        memory = f"; needs about {_gib(estimate)}, {_gib(free)} free on {model.device}"
        if estimate > free:
            log.warning("%s may run out of memory on %s at %dx%d: it needs about %s, %s are free%s",
                        model.hub_name, model.device, width, height, _gib(estimate), _gib(free),
                        "; pass a smaller --tile" if "tile" in model.options and model.memory.tile else "")
    log.info("%s at %dx%d: %s%s", model.hub_name, width, height, ", ".join(parts) or "no options", memory)
    return chosen


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


# Running one job -----------------------------------------------------------------------------


@dataclass
class UpscaleReport:
    """What `upscale_video` did.

    Attributes:
        input: the source.
        output: the output written.
        frames_in: frames read.
        frames_out: frames written.
        seconds: wall time of reading, upscaling and writing (model loading excluded).
        fps: the output's frame rate.
        peak_host_bytes: highest resident memory of the process while it ran.
        peak_device_bytes: highest memory allocated on the CUDA device (None on other devices).
        options: the options the model ran with.
        skipped: the output existed and was kept (`if_exists="skip"`).
    """

    input: str
    output: str
    frames_in: int = 0
    frames_out: int = 0
    seconds: float = 0.0
    fps: Fraction = Fraction(0)
    peak_host_bytes: int = 0
    peak_device_bytes: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


class _Counter:
    """Counts the frames of an iterator as they pass and tracks the peak resident memory."""

    def __init__(self, frames: Iterable[Any], on_frame: Callable[[], None] | None = None) -> None:
        import psutil

        self._frames = iter(frames)
        self._process = psutil.Process()
        self._on_frame = on_frame
        self.count = 0
        self.peak_rss = self._process.memory_info().rss

    def __iter__(self) -> _Counter:
        return self

    def __next__(self) -> Any:
        frame = next(self._frames)
        self.count += 1
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        if self._on_frame is not None:
            self._on_frame()
        return frame


class UpscaledVideo:
    """A job being upscaled: its output frames as a lazy stream, and what writing them needs.

    Iterating `frames` reads, upscales and yields one HR frame `(3, sH, sW)` on the CPU at a
    time; `write` drains it into the job's output. (A plain class, not a dataclass: Lightning
    walks dataclass predictions field by field to move them between devices.)
    """

    def __init__(self, job: VideoJob, source: SourceInfo, model: VideoUpscaler, options: dict[str, Any],
                 inputs: _Counter, frames: _Counter, fps: Fraction) -> None:
        self.job, self.source, self.model, self.options = job, source, model, options
        self.inputs, self.frames, self.fps = inputs, frames, fps

    @property
    def frames_out(self) -> int | None:
        """Output frames expected, None for a pipe."""
        if self.source.num_frames is None:
            return None
        return (self.source.num_frames - 1) * self.model.temporal_scale + 1

    def write(self, *, codec: str | None = None, crf: int = 18, audio: bool = True,
              stdout: BinaryIO | None = None) -> UpscaleReport:
        """Write the output (atomically for files and folders) and report on the run."""
        import torch

        from zoo.components.video_io import write_video, write_y4m

        device = self.model.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        if self.job.target == STDIO:
            write_y4m(stdout if stdout is not None else sys.stdout.buffer, self.frames, self.fps)
        else:
            with_audio = audio and self.source.has_audio
            trimmed = self.job.start > 0 or self.job.duration is not None
            write_video(self.job.target, self.frames, self.fps, codec=codec, crf=crf,
                        audio_from=self.job.source if with_audio else None,
                        audio_span=self.source.audio_span if with_audio and trimmed else None,
                        color=self.source.color)
        return UpscaleReport(
            input=self.job.source, output=self.job.target, frames_in=self.inputs.count, frames_out=self.frames.count,
            seconds=time.perf_counter() - began, fps=self.fps,
            peak_host_bytes=max(self.inputs.peak_rss, self.frames.peak_rss),
            peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            options=self.options)


def start_job(model: VideoUpscaler, job: VideoJob, user_options: dict[str, Any], *,
              source: SourceInfo | None = None, on_frame: Callable[[], None] | None = None) -> UpscaledVideo:
    """Configure `model` for `job`'s frames and set up the lazy stream of its output frames."""
    from zoo.components.video_io import iter_frames

    source = source or probe_source(job)
    options = configure_for(model, source.height, source.width, user_options)
    if source.y4m is not None:
        end = None if source.num_frames is None else source.first_frame + source.num_frames
        lr = itertools.islice(source.y4m, source.first_frame, end)
    else:
        lr = iter_frames(job.source, start=source.first_frame, max_frames=source.num_frames)
    inputs = _Counter(lr)
    device, dtype = model.device, model.dtype
    hr = (frame.float().clamp(0, 1).cpu() for frame in model.stream(frame.to(device, dtype) for frame in inputs))
    return UpscaledVideo(job, source, model, options, inputs, _Counter(hr, on_frame),
                         source.fps * model.temporal_scale)


# The Python API --------------------------------------------------------------------------------


def upscale_video(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | VideoUpscaler,
    weights: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    variant: str = "full",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    start: str | float | None = None,
    duration: str | float | None = None,
    codec: str | None = None,
    crf: int = 18,
    audio: bool = True,
    if_exists: str = "error",
    **options: Any,
) -> UpscaleReport:
    """Upscale one video (file or frame folder) into `output` (file, or a frame folder without extension).

    The output keeps the source's rate times the model's temporal scale (exactly: 24000/1001 fps
    stays 24000/1001), its audio (cut with `start`/`duration`) and colour description. Frames
    stream, so any length fits in memory.

    Args:
        input: a video file or frame folder.
        output: a video file (`.mp4 .mkv .mov .webm .avi .gif`) or frame folder.
        model: a hub name (`zoo.list_models()`), or a loaded `VideoUpscaler`.
        weights: a weights folder or Hub repo id (for a hub name).
        checkpoint: a `lightning fit` checkpoint (needs the train extra).
        pretrained: load the registry's weights (else random weights of size `variant`).
        variant: `"full"` or `"tiny"` when not pretrained.
        device: `"cuda"`, `"cuda:1"`, `"cpu"`; CUDA when available by default.
        dtype: `"fp32"`, `"bf16"`, `"fp16"` or a `torch.dtype`.
        start: seconds (or `[HH:]MM:SS[.fff]`) of the source to skip.
        duration: seconds to upscale from `start`; to the end when None.
        codec: video encoder (`libx264`, `libx265`, `ffv1`, ...); by the extension when None.
        crf: quality for x264/x265/vpx (lower is better).
        audio: copy the source's audio track.
        if_exists: `"error"` (default), `"skip"` or `"overwrite"` when `output` exists.
        **options: the model's runtime options (`tile`, `tile_overlap`, `chunk`, `color_fix`, `seed`,
            `scale`, `temporal_scale`, ... as the model takes them); tiles and chunks that fit the
            free memory are chosen where not given.

    Returns:
        An `UpscaleReport` (frames, seconds, peak memory, options used).

    Raises:
        ValueError: bad input, output or options, before the model loads where they can be known.
    """
    job = VideoJob(str(input), str(output), parse_time(start, "start") or Fraction(0), parse_time(duration, "duration"))
    if job.source == STDIO or job.target == STDIO:
        raise UpscaleError("upscale_video reads and writes files and folders; the zoo upscale command takes -")
    check_jobs([job], [job.source], job.target, batch=False)
    if not existing_outputs([job], if_exists):
        return UpscaleReport(input=job.source, output=job.target, skipped=True)
    name = model if isinstance(model, str) else model.hub_name
    cls = _upscaler_class(name) if isinstance(model, str) else type(model)
    if not isinstance(model, str):
        # Options the caller configured the model with count as set (not replaced by memory defaults).
        configured = {n: getattr(model, n) for n in cls.options if getattr(model, n) != cls.options[n]}
        options = {**configured, **options}
    user, fixed = resolve_options(cls, options)
    source = probe_source(job)
    check_target(job, source, _planned_scale(cls, user), audio=audio, codec=codec, crf=crf)
    if isinstance(model, str):
        model = load_model(name, weights=_str(weights), checkpoint=_str(checkpoint), pretrained=pretrained,
                           variant=variant, device=resolve_device(device), dtype=resolve_dtype(dtype))
    check_factors(model, fixed)
    return start_job(model, job, user, source=source).write(codec=codec, crf=crf, audio=audio)


def _str(value: str | os.PathLike | None) -> str | None:
    return None if value is None else str(value)


def _upscaler_class(name: str) -> type[VideoUpscaler]:
    from zoo.hub import upscaler_class

    return upscaler_class(name)


def _planned_scale(cls: type[VideoUpscaler], user: dict[str, Any]) -> int | float:
    """The spatial factor the run will have, as far as the class tells before its weights load."""
    if "scale" in user:
        return user["scale"]
    if "scale" in cls.options:
        return cls.options["scale"]
    return cls.scales[0] if len(cls.scales) == 1 else 1


# The command -------------------------------------------------------------------------------------


def _factor(text: str) -> int | float:
    """A factor as given: an int where it is whole (most models take only ints), else a float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `zoo upscale` on the `zoo` command's subparsers."""
    from zoo.hub import REGISTRY

    p = commands.add_parser(
        "upscale", help="upscale videos, frame folders, folders of videos or a y4m pipe",
        description="Upscale videos with a zoo model. Outputs appear only when complete; batches mirror the "
                    "input tree under OUTPUT.",
        epilog="examples:\n"
               "  zoo upscale in.mp4 out.mp4 --model stream_diffvsr\n"
               "  zoo upscale clips/ upscaled/ --model osdiffvsr --weights exported/ --skip-existing\n"
               "  zoo upscale 'clips/**/*.mp4' upscaled/ --model stream_diffvsr --devices 4\n"
               "  zoo upscale - - --model stream_diffvsr < in.y4m > out.y4m",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a video file, frame folder, folder of videos, glob (quoted), or - for y4m on stdin")
    p.add_argument("output", metavar="OUTPUT",
                   help="a video file, a frame folder (no extension), the folder of a batch, or - for y4m on stdout")
    model = p.add_argument_group("model")
    model.add_argument("--model", choices=list(REGISTRY), help="hub name (optional with --checkpoint)")
    model.add_argument("--weights", help="exported weights folder or Hub repo id (default: the registry's)")
    model.add_argument("--checkpoint", help="a `lightning fit` checkpoint (needs the train extra)")
    model.add_argument("--random-weights", action="store_true", help="random weights instead of pretrained ones")
    model.add_argument("--variant", default="full", choices=("full", "tiny"), help="network size with --random-weights")
    model.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda when available)")
    model.add_argument("--devices", type=int, help="run on N devices through Lightning (needs the train extra)")
    model.add_argument("--dtype", default="fp32", choices=list(DTYPES), metavar="{fp32,bf16,fp16}")
    options = p.add_argument_group("model options (where the model takes them; defaults fit the free memory)")
    options.add_argument("--scale", type=_factor, help="spatial factor")
    options.add_argument("--temporal-scale", type=int, help="frames out per frame in (space-time models)")
    options.add_argument("--tile", type=int, help="spatial tile side in input pixels (0: whole frames)")
    options.add_argument("--tile-overlap", type=int, help="tile overlap in input pixels")
    options.add_argument("--chunk", type=int, help="temporal chunk length in input frames")
    options.add_argument("--chunk-overlap", type=int, help="chunk overlap in input frames")
    options.add_argument("--color-fix", choices=("wavelet", "adain", "none"), help="default: the paper's")
    options.add_argument("--seed", type=int, help="noise seed")
    options.add_argument("--compile", action="store_const", const=True,
                         help="torch.compile the networks one by one (the first frames compile)")
    options.add_argument("--compile-scope", type=_compile_scope, dest="compile_scope",
                         help="with --compile: networks (default) or step (each whole per-frame or per-chunk "
                              "step in one graph)")
    options.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction,
                         help="run the VAE on its official overlapping tiles, or (--no-vae-tiling) on whole frames "
                              "(default: whole frames where they fit the free memory)")
    options.add_argument("--float32-vae", choices=("encoder", "all", "none"),
                         help="the VAE parts kept in float32 under --dtype bf16/fp16, where the model takes it "
                              "(default: encoder; none: faster, less memory)")
    out = p.add_argument_group("input and output")
    out.add_argument("--start", help="skip this much of each input: seconds or [HH:]MM:SS[.fff]")
    out.add_argument("--duration", help="upscale this much from --start: seconds or [HH:]MM:SS[.fff]")
    out.add_argument("--codec", help="video encoder: libx264 (default), libx265, ffv1, libvpx-vp9, ...")
    out.add_argument("--crf", type=int, default=18, help="quality for x264/x265/vpx, lower is better (default 18)")
    out.add_argument("--no-audio", action="store_true", help="leave the audio track out")
    exists = out.add_mutually_exclusive_group()
    exists.add_argument("--skip-existing", action="store_true", help="keep outputs that exist, do the rest")
    exists.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes, only errors")
    p.set_defaults(run=run)
    return p


def run(ns: argparse.Namespace) -> None:
    """`zoo upscale`: check everything, load the model once, upscale each job."""
    import torch

    inputs, output = ns.inputs, ns.output
    if ns.model is None and ns.checkpoint is None:
        raise UpscaleError("--model is required (or --checkpoint, which names its model)")
    if ns.devices is not None and (ns.devices < 1 or STDIO in (*inputs, output)):
        raise UpscaleError(f"--devices takes a number >= 1 and files or folders, not -; got {ns.devices}")
    _configure_logging(ns.quiet or _is_secondary_rank())

    # Everything that can be refused is refused before the model loads.
    start, duration = parse_time(ns.start, "--start") or Fraction(0), parse_time(ns.duration, "--duration")
    jobs, batch = find_jobs(inputs, output, start=start, duration=duration)
    check_jobs(jobs, inputs, output, batch=batch)
    if_exists = "skip" if ns.skip_existing else "overwrite" if ns.overwrite else "error"
    todo = existing_outputs(jobs, if_exists)
    if len(todo) < len(jobs):
        log.info("skipping %d of %d outputs that exist", len(jobs) - len(todo), len(jobs))
    flags = {name: getattr(ns, name) for name in OPTION_FLAGS if getattr(ns, name) is not None}
    if ns.compile_scope is not None:
        if not ns.compile:
            raise UpscaleError("--compile-scope needs --compile")
        flags["compile"] = {"scope": ns.compile_scope}
    if flags.get("tile") == 0:
        flags["tile"] = None
    user, fixed = ({}, {}) if ns.model is None else resolve_options(_upscaler_class(ns.model), flags, cli=True)
    sources = [probe_source(job) for job in todo]
    if ns.model is not None:
        scale = _planned_scale(_upscaler_class(ns.model), user)
        for job, source in zip(todo, sources):
            check_target(job, source, scale, audio=not ns.no_audio, codec=ns.codec, crf=ns.crf)
    if ns.devices is not None:
        _run_distributed(ns, inputs, output, if_exists, {**user, **fixed})
        return
    if not todo:
        log.info("nothing to do")
        return

    device, dtype = resolve_device(ns.device), resolve_dtype(ns.dtype)
    what = ns.checkpoint or ns.weights or ("random weights" if ns.random_weights else "its published weights")
    log.info("loading %s (%s) on %s as %s", ns.model or "the checkpoint's model", what, device,
             str(dtype).removeprefix("torch."))
    began = time.perf_counter()
    model = load_model(ns.model, weights=ns.weights, checkpoint=ns.checkpoint, pretrained=not ns.random_weights,
                       variant=ns.variant, device=device, dtype=dtype)
    log.info("loaded in %.1f s", time.perf_counter() - began)
    if ns.model is None:  # a checkpoint: its model is known now
        user, fixed = resolve_options(type(model), flags, cli=True)
        for job, source in zip(todo, sources):
            check_target(job, source, model.scale, audio=not ns.no_audio, codec=ns.codec, crf=ns.crf)
    check_factors(model, fixed, cli=True)
    try:
        _run_jobs(model, todo, sources, user, ns, progress=not ns.quiet and sys.stderr.isatty())
    except torch.OutOfMemoryError:
        hint = " (try a smaller --tile)" if "tile" in model.options and model.memory and model.memory.tile else ""
        raise SystemExit(f"zoo: error: out of memory on {model.device} at {sources[0].width}x{sources[0].height}"
                         f"{hint}") from None


def _run_jobs(model: VideoUpscaler, todo: list[VideoJob], sources: list[SourceInfo], user: dict[str, Any],
              ns: argparse.Namespace, progress: bool) -> None:
    with _Progress(len(todo), enabled=progress) as bars:
        for job, source in zip(todo, sources):
            video = start_job(model, job, user, source=source, on_frame=bars.frame_done)
            bars.start_video(job.name, video.frames_out)
            report = video.write(codec=ns.codec, crf=ns.crf, audio=not ns.no_audio)
            bars.video_done()
            per_second = report.frames_out / max(report.seconds, 1e-9)
            rate = f"{per_second:.2f} frames/s" if per_second >= 1 else f"{1 / per_second:.1f} s/frame"
            log.info("%s -> %s: %d frames in %.1f s (%s)", job.name, "stdout" if job.target == STDIO else job.target,
                     report.frames_out, report.seconds, rate)


def _is_secondary_rank() -> bool:
    """Whether this process is a non-zero rank that Lightning's launcher started (`--devices`)."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0


class _TqdmHandler(logging.Handler):
    """Log lines on stderr, written through tqdm so they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _configure_logging(quiet: bool) -> None:
    logger = logging.getLogger("zoo")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("zoo: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


class _Progress:
    """A frame bar (frames, frames/s, ETA) on stderr, and a video bar above it in a batch."""

    def __init__(self, videos: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.videos = videos
        self._video_bar = self._frame_bar = None

    def __enter__(self) -> _Progress:
        if self.enabled and self.videos > 1:
            from tqdm import tqdm

            self._video_bar = tqdm(total=self.videos, unit="video", desc="videos", file=sys.stderr, position=0,
                                   dynamic_ncols=True)
        return self

    def start_video(self, name: str, total: int | None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self._frame_bar = tqdm(total=total, unit="frame", desc=name, file=sys.stderr, dynamic_ncols=True,
                               position=1 if self._video_bar is not None else 0, leave=self._video_bar is None)

    def frame_done(self) -> None:
        if self._frame_bar is not None:
            self._frame_bar.update()

    def video_done(self) -> None:
        if self._frame_bar is not None:
            self._frame_bar.close()
            self._frame_bar = None
        if self._video_bar is not None:
            self._video_bar.update()

    def __exit__(self, *exc: object) -> None:
        for bar in (self._frame_bar, self._video_bar):
            if bar is not None:
                bar.close()


def _run_distributed(ns: argparse.Namespace, inputs: list[str], output: str, if_exists: str,
                     options: dict[str, Any]) -> None:
    """`--devices N`: the batch through Lightning's `Trainer.predict`, one video per item."""
    from zoo.hub import require_train_extra

    require_train_extra("--devices")
    from zoo.components.train.predict import run_predict

    run_predict(inputs, output, model=ns.model, weights=ns.weights, checkpoint=ns.checkpoint,
                pretrained=not ns.random_weights, variant=ns.variant, dtype=DTYPES[ns.dtype], options=options,
                devices=ns.devices, accelerator=_accelerator(ns.device), start=ns.start,
                duration=ns.duration, skip_existing=if_exists == "skip", codec=ns.codec, crf=ns.crf,
                audio=not ns.no_audio, progress=not ns.quiet and sys.stderr.isatty())


def _accelerator(device: str) -> str:
    if device in (None, "auto"):
        return "auto"
    return "gpu" if device.startswith("cuda") else device.split(":")[0]
