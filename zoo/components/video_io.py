"""Video reading and writing with PyAV: video files, frame folders and YUV4MPEG2 pipes.

Frames are float32 tensors in `[0, 1]`: a clip is `(T, 3, H, W)`, one frame is `(3, H, W)`.

- Reading: `.mp4 .mkv .mov .webm .avi .gif` files and folders of `.png/.jpg/.jpeg` frames
  (natural order: `2.png` before `10.png`). Grayscale, palette and RGBA sources become RGB
  (alpha is dropped), odd sizes are kept, variable frame rate is read as decoded: every decoded
  frame is returned once and `fps` is the stream's average rate. A frame folder carries no rate
  and reads as `FRAME_FOLDER_FPS`.
- Writing: a video file (written to a temporary file beside it and renamed on success, with
  the audio of another file copied in, or cut to a span and re-encoded), or a folder of PNG/JPEG
  frames (written to a temporary folder and renamed on success). `check_destination` finds what
  a write would refuse (path, codec, container, audio) before any frame is made.
- Colour: a file's colour description (`ColorTags`: primaries, transfer, matrix, range) is read
  with it and, passed to `write_video`, tagged on the output and used for its RGB -> YUV
  conversion, so players show the colours of the source.
- Pipes: `iter_y4m` / `write_y4m` read and write raw YUV4MPEG2 (`ffmpeg -f yuv4mpegpipe`).

Everything that goes wrong while reading raises `VideoReadError`, and bad input to the writers
raises `VideoWriteError`; both are `ValueError`s with one sentence naming the path and reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import torch
from PIL import Image
from torch import Tensor

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".gif")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
FRAME_FOLDER_FPS = Fraction(25)
FRAME_PATTERN = "%08d.png"

# Encoder per extension when `codec` is not given: webm only holds VP8/VP9/AV1, gif only gif.
_DEFAULT_CODECS = {".webm": "libvpx-vp9", ".gif": "gif"}
# Encoders that take `crf`, with the options it needs; libvpx needs a zero bitrate for pure CRF mode.
_CRF_ENCODERS = {
    "libx264": {},
    "libx264rgb": {},
    "libx265": {"x265-params": "log-level=error"},  # x265 prints its settings to stderr otherwise
    "libvpx": {"b": "0"},
    "libvpx-vp9": {"b": "0"},
}
# Moves the mp4/mov index to the front so players can start before the whole file arrived.
_CONTAINER_OPTIONS = {".mp4": {"movflags": "+faststart"}, ".mov": {"movflags": "+faststart"}}
_AUDIO_ENCODERS = {".webm": "libopus"}
# FFmpeg muxer per extension (named, so that a header can also be written into memory).
_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".avi": "avi", ".gif": "gif"}


class VideoReadError(ValueError):
    """A video, frame folder or y4m stream that cannot be read."""


class VideoWriteError(ValueError):
    """Frames, settings or a destination that cannot be written."""


# swscale's YUV matrices by FFmpeg `AVColorSpace` value; SMPTE 170M (6) has the BT.601 coefficients.
_SWSCALE_MATRIX = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9}


@dataclass(frozen=True)
class ColorTags:
    """The colour description of a video stream, as FFmpeg's enum values.

    Attributes:
        primaries: `AVColorPrimaries` (1 BT.709, 5 BT.601 PAL, 6 BT.601 NTSC, 9 BT.2020, 2 unspecified).
        transfer: `AVColorTransferCharacteristic` (1 BT.709, 13 sRGB, 16 PQ, 18 HLG, 2 unspecified).
        matrix: `AVColorSpace`, the YUV matrix (1 BT.709, 5/6 BT.601, 9 BT.2020, 2 unspecified).
        range: `AVColorRange` (1 limited "tv", 2 full "pc", 0 unspecified).
    """

    primaries: int = 2
    transfer: int = 2
    matrix: int = 2
    range: int = 0

    @property
    def specified(self) -> bool:
        """Whether any of the four is set."""
        return self != ColorTags()


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds.

    Attributes:
        fps: average frame rate, exact (`Fraction(24000, 1001)` for 23.976 fps).
        num_frames: number of frames.
        width: frame width in pixels.
        height: frame height in pixels.
        codec: video codec name (`"h264"`, `"vp9"`, ...), or `"png"` / `"jpeg"` for frame folders.
        has_audio: whether the file holds an audio stream.
        duration: length in seconds.
        color: the video stream's colour description (all unspecified for frame folders).
    """

    fps: Fraction
    num_frames: int
    width: int
    height: int
    codec: str
    has_audio: bool
    duration: float
    color: ColorTags = ColorTags()


@dataclass
class Video:
    """Decoded frames `(T, 3, H, W)` in `[0, 1]` with the `VideoInfo` of their source."""

    frames: Tensor
    info: VideoInfo


# ---------------------------------------------------------------------------------------------
# Reading


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Describe a video file or frame folder without decoding its frames.

    The frame count comes from the container index; containers without one (mkv, webm) have
    their packets counted, which reads the file but decodes nothing.

    Args:
        path: video file or folder of frames.

    Raises:
        VideoReadError: when the path cannot be read as a video.
    """
    path = Path(path)
    if path.is_dir():
        return _probe_folder(path, _frame_files(path))
    with _open_container(path) as container:
        return _probe_container(container, _video_stream(container, path), path)


def read_video(path: str | os.PathLike, *, start: int = 0, max_frames: int | None = None) -> Video:
    """Decode a video file or frame folder into memory.

    Args:
        path: video file or folder of frames.
        start: index of the first frame to return.
        max_frames: most frames to return; all the rest when None.

    Returns:
        The frames `(T, 3, H, W)` float32 in `[0, 1]` and the `VideoInfo` of the whole source,
        whose `num_frames` is the number of frames actually decoded when reading to the end.

    Raises:
        VideoReadError: when the path cannot be read, or holds no frame at or after `start`.
    """
    info = probe_video(path)
    # Frames stay uint8 until all are read: a quarter of the float memory while collecting.
    arrays = list(_iter_arrays(Path(path), start, max_frames))
    if not arrays:
        raise VideoReadError(f"cannot read video {path}: start={start} is past its last frame")
    if max_frames is None or len(arrays) < max_frames:
        info = dataclasses.replace(info, num_frames=start + len(arrays))
    frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
    return Video(frames=frames.contiguous(), info=info)


def iter_frames(path: str | os.PathLike, *, start: int = 0, max_frames: int | None = None) -> Iterator[Tensor]:
    """Decode a video file or frame folder one frame at a time, in bounded memory.

    The source is opened (and missing or unreadable files reported) at the call; frames are
    decoded as the iterator is consumed, and the file is closed when it ends or is dropped.

    Args:
        path: video file or folder of frames.
        start: index of the first frame to yield.
        max_frames: most frames to yield; all the rest when None.

    Yields:
        Frames `(3, H, W)` float32 in `[0, 1]`.

    Raises:
        VideoReadError: when the path cannot be read (at the call or during iteration).
    """
    return (_array_to_tensor(array) for array in _iter_arrays(Path(path), start, max_frames))


def _iter_arrays(path: Path, start: int, max_frames: int | None) -> Iterator[np.ndarray]:
    """RGB uint8 `(H, W, 3)` frames of a file or folder; opens the source before returning."""
    if start < 0 or (max_frames is not None and max_frames < 1):
        raise ValueError(f"start must be >= 0 and max_frames >= 1 or None, got {start} and {max_frames}")
    stop = None if max_frames is None else start + max_frames
    if path.is_dir():
        return _iter_folder(path, _frame_files(path)[start:stop])
    container = _open_container(path)
    return _iter_container(container, _video_stream(container, path), path, start, stop)


def _array_to_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255).contiguous()


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders digit runs by value and ignores case: `2.png` before `10.PNG`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images (png/jpg/jpeg, any case) directly in `folder`, in natural order; may be empty."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def list_video_files(folder: str | os.PathLike) -> list[Path]:
    """The video files (by extension, any case) directly in `folder`, in natural order; may be empty."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def _frame_files(folder: Path) -> list[Path]:
    files = list_frame_files(folder)
    if not files:
        raise VideoReadError(f"cannot read frame folder {folder}: it holds no .png/.jpg/.jpeg frames")
    return files


def _image_header(file: Path, folder: Path) -> tuple[str, tuple[int, int]]:
    """Format name and (width, height) of an image, reading its header only."""
    try:
        with Image.open(file) as image:
            return image.format.lower(), image.size
    except (OSError, Image.DecompressionBombError) as err:
        raise VideoReadError(f"cannot read frame folder {folder}: {file.name} is not an image ({err})") from None


def _probe_folder(folder: Path, files: list[Path]) -> VideoInfo:
    codec, size = _image_header(files[0], folder)
    for file in files[1:]:
        other = _image_header(file, folder)[1]
        if other != size:
            raise VideoReadError(
                f"cannot read frame folder {folder}: frames differ in size "
                f"({files[0].name} is {size[0]}x{size[1]}, {file.name} is {other[0]}x{other[1]})"
            )
    return VideoInfo(
        fps=FRAME_FOLDER_FPS,
        num_frames=len(files),
        width=size[0],
        height=size[1],
        codec=codec,
        has_audio=False,
        duration=len(files) / FRAME_FOLDER_FPS,
    )


def _iter_folder(folder: Path, files: list[Path]) -> Iterator[np.ndarray]:
    size = None
    for file in files:
        try:
            with Image.open(file) as image:
                array = np.array(image.convert("RGB"))  # writable, as torch wants
        except (OSError, Image.DecompressionBombError) as err:
            raise VideoReadError(f"cannot read frame folder {folder}: {file.name} is unreadable ({err})") from None
        size = size or (array.shape[1], array.shape[0], file.name)
        if (array.shape[1], array.shape[0]) != size[:2]:
            raise VideoReadError(
                f"cannot read frame folder {folder}: frames differ in size "
                f"({size[2]} is {size[0]}x{size[1]}, {file.name} is {array.shape[1]}x{array.shape[0]})"
            )
        yield array


def _open_container(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise VideoReadError(f"cannot read video {path}: no such file or folder")
    if path.stat().st_size == 0:
        raise VideoReadError(f"cannot read video {path}: the file is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise VideoReadError(f"cannot read video {path}: {err.strerror} (truncated, corrupt or not a video)") from None
    _check_complete(container, path)
    return container


def _check_complete(container: av.container.InputContainer, path: Path) -> None:
    """Reject files cut short whose index (mp4, mov, avi) points past the end of the file.

    Without this, a cut mp4 with its index at the front decodes to fewer frames silently.
    Matroska and webm keep their index at the end, so a cut one reads up to the cut.
    """
    size = path.stat().st_size
    # Samples are stored in time order, so each stream's last index entry ends furthest.
    needed = max(
        (
            stream.index_entries[-1].pos + stream.index_entries[-1].size
            for stream in container.streams
            if len(stream.index_entries)
        ),
        default=0,
    )
    if needed > size:
        container.close()
        raise VideoReadError(
            f"cannot read video {path}: the file is truncated ({size} bytes, its index needs {needed})"
        )


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    """The first real video stream (cover art in audio files does not count)."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    for stream in streams:
        # A stream whose codec FFmpeg does not know (a damaged header) has no codec context.
        if stream.codec_context is not None and stream.codec_context.width and stream.codec_context.height:
            return stream
    container.close()
    what = "no video stream" if not streams else "no video stream FFmpeg can decode (unknown codec or no frame size)"
    raise VideoReadError(f"cannot read video {path}: it has {what}")


def _probe_container(container: av.container.InputContainer, stream: av.VideoStream, path: Path) -> VideoInfo:
    fps = stream.average_rate or stream.guessed_rate
    if not fps:
        raise VideoReadError(f"cannot read video {path}: its frame rate is unknown")
    if stream.time_base is not None and stream.time_base.denominator <= 1000:
        fps = _snap_rate(Fraction(fps))
    num_frames = stream.frames or _count_packets(container, stream, path)
    # Matroska stores no per-stream duration, and the container's includes the audio.
    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = float(num_frames / fps)
    context = stream.codec_context
    return VideoInfo(
        fps=Fraction(fps),
        num_frames=num_frames,
        width=stream.width,
        height=stream.height,
        codec=context.name,
        has_audio=bool(container.streams.audio),
        duration=duration,
        color=ColorTags(int(context.color_primaries), int(context.color_trc), int(context.colorspace),
                        int(context.color_range)),
    )


def _snap_rate(fps: Fraction) -> Fraction:
    """The integer or NTSC (`n/1001`) rate within 5e-7 of `fps` (relative), else `fps`.

    Matroska and WebM store millisecond timestamps, so a 48000/1001 fps stream reads back as
    7001/146 (1.4e-7 away); rates of these two families are what cameras and encoders write.
    """
    for candidate in (Fraction(round(fps)), Fraction(round(fps * 1001), 1001)):
        if candidate > 0 and abs(candidate - fps) <= fps * Fraction(1, 2_000_000):
            return candidate
    return fps


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream, path: Path) -> int:
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as err:
        raise VideoReadError(f"cannot read video {path}: reading packets failed ({err.strerror})") from None


def _iter_container(
    container: av.container.InputContainer, stream: av.VideoStream, path: Path, start: int, stop: int | None
) -> Iterator[np.ndarray]:
    stream.thread_type = "AUTO"
    decoded, size = 0, None
    try:
        frames = container.decode(stream)
        while stop is None or decoded < stop:
            try:
                frame = next(frames, None)
                if frame is None:
                    break
                array = frame.to_ndarray(format="rgb24") if decoded >= start else None
            except av.FFmpegError as err:
                raise VideoReadError(
                    f"cannot read video {path}: decoding failed after frame {decoded} ({err.strerror})"
                ) from None
            if array is not None and size is not None and array.shape[:2] != size:
                raise VideoReadError(
                    f"cannot read video {path}: frame {decoded} is {array.shape[1]}x{array.shape[0]}, "
                    f"earlier frames are {size[1]}x{size[0]}"
                )
            decoded += 1
            if array is not None:
                size = array.shape[:2]
                yield array
    finally:
        container.close()
    if decoded == 0:
        raise VideoReadError(f"cannot read video {path}: no video frame could be decoded")


# ---------------------------------------------------------------------------------------------
# Writing


def write_video(
    path: str | os.PathLike,
    frames: Tensor | Iterable[Tensor],
    fps: Fraction | float | int,
    *,
    audio_from: str | os.PathLike | None = None,
    audio_span: tuple[float, float] | None = None,
    codec: str | None = None,
    crf: int = 18,
    pix_fmt: str | None = None,
    color: ColorTags | None = None,
) -> Path:
    """Encode frames to a video file or a folder of frames, never leaving a partial output.

    The destination is chosen by `path`:

    - `*.mp4 .mkv .mov .webm .avi .gif`: a video file, encoded into a temporary file in the same
      folder and renamed over `path` once complete.
    - a pattern such as `out/%08d.png` (or `.jpg`): one image per frame, numbered from 0.
    - a path without extension, or an existing folder: PNG frames named `FRAME_PATTERN`.

    Frame folders are written into a temporary folder beside the target and renamed into
    place; the target folder must be new or empty. PNG frames round-trip exactly.

    Odd sizes: 4:2:0 pixel formats (`yuv420p`) need even width and height, and padding would
    change the size read back. So the default `pix_fmt` is `yuv420p` for even sizes and
    `yuv444p` for odd ones (exact size kept; note that browsers and some players cannot play
    4:4:4 H.264). An explicit 4:2:0 `pix_fmt` with an odd size raises `VideoWriteError`.

    Args:
        path: destination file, folder or frame pattern.
        frames: a clip `(T, 3, H, W)` or an iterable of frames `(3, H, W)` (consumed one at a
            time, so any length streams in bounded memory), floats in `[0, 1]`, on any device.
        fps: frame rate; a `Fraction` or int is kept exactly, a float is read as the nearest
            fraction with denominator <= 1001 (`23.976023976` -> `24000/1001`).
        audio_from: a file whose first audio stream is copied into the video, packet for packet
            when the container accepts its codec, else re-encoded (AAC, or Opus for webm). A
            file without audio adds none; the whole stream is copied, whatever the video's
            length. Not allowed for gif and frame folders.
        audio_span: `(start, stop)` in seconds of `audio_from`'s timeline: only that span is
            kept, cut to the sample and re-encoded (packets cannot be cut), starting with the
            first frame. The whole stream when None.
        codec: video encoder; by default `libx264`, or `libvpx-vp9` for webm and `gif` for gif.
        crf: constant-quality level for libx264/libx265/libvpx (lower is better, 18 is near
            transparent for x264); other encoders use their defaults.
        pix_fmt: encoder pixel format; by default `yuv420p` (even sizes), `yuv444p` (odd sizes),
            or the encoder's first format when it has neither (`rgb8` for gif).
        color: the colour description to tag (e.g. the source's `VideoInfo.color`); its matrix
            and range also convert the RGB frames to YUV. None (or all unspecified) converts with
            FFmpeg's defaults (BT.601, limited range) and tags nothing. Ignored by frame folders
            and RGB encoders.

    Returns:
        `path` as a `Path` (the folder for a frame pattern).

    Raises:
        VideoWriteError: for frames that are not `(3, H, W)` floats in `[0, 1]` or change size,
            no frames, an unknown codec or pixel format, or a destination that cannot be written.
        VideoReadError: when `audio_from` cannot be read.
    """
    path = Path(path)
    fps = _as_fraction(fps, path)
    arrays = _frames_to_arrays(frames, path)
    _check_kind(path, audio_from)
    if is_frame_folder_target(path):
        folder, pattern = (path.parent, path.name) if "%" in path.name else (path, FRAME_PATTERN)
        _write_frame_folder(folder, pattern, arrays)
        return folder
    codec = codec or _DEFAULT_CODECS.get(path.suffix.lower(), "libx264")
    settings = _VideoSettings(path, codec, fps, 0, 0, pix_fmt or "", crf, color or ColorTags())
    _write_container(settings, arrays, audio_from, audio_span)
    return path


def is_frame_folder_target(path: str | os.PathLike) -> bool:
    """Whether `write_video(path, ...)` writes a frame folder: a `%d` pattern, no extension, or a folder."""
    path = Path(path)
    return "%" in path.name or not path.suffix or path.is_dir()


def _check_kind(path: Path, audio_from: str | os.PathLike | None) -> None:
    """Refuse unknown extensions, and audio where the destination cannot hold it."""
    if is_frame_folder_target(path):
        if audio_from is not None:
            raise VideoWriteError(f"cannot write {path}: a frame folder cannot hold the audio of {audio_from}")
        return
    suffix = path.suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        raise VideoWriteError(
            f"cannot write {path}: unknown extension {suffix} (expected one of "
            f"{', '.join(VIDEO_EXTENSIONS)}, a folder, or a frame pattern like out/%08d.png)"
        )
    if audio_from is not None and suffix == ".gif":
        raise VideoWriteError(f"cannot write {path}: gif cannot hold the audio of {audio_from}")


def check_destination(
    path: str | os.PathLike,
    *,
    width: int,
    height: int,
    audio_from: str | os.PathLike | None = None,
    codec: str | None = None,
    crf: int = 18,
    pix_fmt: str | None = None,
) -> None:
    """Raise now what `write_video(path, ...)` of `width x height` frames would raise only at its end.

    Checks the extension, that audio fits the destination, that a frame folder is new or empty,
    that the folder the output goes to can be written (a file is created there and removed),
    and, for video files, that the container takes the codec, pixel format and audio (its
    header is written into memory).

    Raises:
        VideoWriteError: one sentence naming `path`.
        VideoReadError: when `audio_from` cannot be read.
    """
    path = Path(path)
    _check_kind(path, audio_from)
    if is_frame_folder_target(path):
        folder = path.parent if "%" in path.name else path
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise VideoWriteError(f"cannot write frames to {folder}: it exists and is not an empty folder")
        _check_writable(path, folder.parent)
        return
    _check_writable(path, path.parent)
    codec = codec or _DEFAULT_CODECS.get(path.suffix.lower(), "libx264")
    encoder = _check_codec(codec, path)
    settings = _VideoSettings(path, encoder.name, Fraction(25), width, height,
                              _choose_pix_fmt(encoder, pix_fmt, width, height, path), crf, ColorTags())
    audio_source = None if audio_from is None else _open_container(Path(audio_from))
    try:
        # The container format only decides on codecs and audio when its header is written.
        output, _, _ = _open_output(io.BytesIO(), settings, audio_source, None)
        with contextlib.suppress(av.FFmpegError):
            output.close()  # some muxers (gif) refuse to end a file without frames; the header is what counts
    finally:
        if audio_source is not None:
            audio_source.close()


def _check_writable(path: Path, folder: Path) -> None:
    """Create and remove a file in `folder` (or its nearest existing parent, which writing creates from)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise VideoWriteError(f"cannot write {path}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise VideoWriteError(f"cannot write {path}: {existing} is not writable ({err.strerror})") from None


def _as_fraction(fps: Fraction | float | int, path: Path) -> Fraction:
    if isinstance(fps, (Fraction, int)):
        rate = Fraction(fps)
    else:
        # NTSC rates (24000/1001, 30000/1001) are the longest denominators in common use.
        rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise VideoWriteError(f"cannot write {path}: fps must be positive, got {fps}")
    return rate


def _frames_to_arrays(frames: Tensor | Iterable[Tensor], path: Path) -> Iterator[np.ndarray]:
    """Check a clip's shape now, and each frame as it is quantized to RGB uint8 `(H, W, 3)`."""
    if isinstance(frames, Tensor) and (frames.ndim != 4 or frames.shape[1] != 3):
        raise VideoWriteError(f"cannot write {path}: frames must be (T, 3, H, W), got {tuple(frames.shape)}")
    return _quantize(frames, path)


def _quantize(frames: Iterable[Tensor], path: Path) -> Iterator[np.ndarray]:
    size = None
    for index, frame in enumerate(frames):
        if not isinstance(frame, Tensor) or frame.ndim != 3 or frame.shape[0] != 3:
            got = tuple(frame.shape) if isinstance(frame, Tensor) else type(frame).__name__
            raise VideoWriteError(f"cannot write {path}: frame {index} must be (3, H, W), got {got}")
        if not frame.is_floating_point():
            raise VideoWriteError(f"cannot write {path}: frame {index} must hold floats, got {frame.dtype}")
        lo, hi = frame.aminmax()
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise VideoWriteError(
                f"cannot write {path}: frame {index} must be in [0, 1], got [{lo.item():.3g}, {hi.item():.3g}]"
            )
        size = size or tuple(frame.shape[1:])
        if tuple(frame.shape[1:]) != size:
            raise VideoWriteError(
                f"cannot write {path}: frame {index} is {frame.shape[2]}x{frame.shape[1]}, "
                f"earlier frames are {size[1]}x{size[0]}"
            )
        quantized = frame.detach().clamp(0, 1).mul(255).round_().to(torch.uint8)
        yield quantized.permute(1, 2, 0).contiguous().cpu().numpy()


def _first_frame(arrays: Iterator[np.ndarray], path: Path) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    first = next(arrays, None)
    if first is None:
        raise VideoWriteError(f"cannot write {path}: there are no frames")
    return first, itertools.chain([first], arrays)


def _write_frame_folder(folder: Path, pattern: str, arrays: Iterator[np.ndarray]) -> None:
    suffix = Path(pattern).suffix.lower()
    if suffix not in FRAME_EXTENSIONS or pattern.count("%") != 1 or not _formats_an_index(pattern):
        raise VideoWriteError(
            f"cannot write frames to {folder / pattern}: the pattern needs one %d field "
            f"and one of {', '.join(FRAME_EXTENSIONS)}, like %08d.png"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise VideoWriteError(f"cannot write frames to {folder}: it exists and is not an empty folder")
    _, arrays = _first_frame(arrays, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        for index, array in enumerate(arrays):
            image = Image.fromarray(array)
            if suffix == ".png":
                # Fast compression: frame folders are working copies, speed matters more than size.
                image.save(partial / (pattern % index), compress_level=1)
            else:
                image.save(partial / (pattern % index), quality=95)
        # rename(2) replaces an empty folder atomically, so readers never see half the frames.
        partial.chmod(_default_mode(0o777))
        os.replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _formats_an_index(pattern: str) -> bool:
    try:
        return pattern % 0 != pattern % 1
    except (TypeError, ValueError):
        return False


def _check_codec(codec: str, path: Path) -> av.Codec:
    try:
        encoder = av.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        raise VideoWriteError(f"cannot write {path}: unknown video encoder {codec!r}") from None
    if encoder.type != "video":
        raise VideoWriteError(f"cannot write {path}: {codec!r} encodes {encoder.type}, not video")
    return encoder


def _choose_pix_fmt(encoder: av.Codec, pix_fmt: str | None, width: int, height: int, path: Path) -> str:
    supported = [fmt.name for fmt in encoder.video_formats or ()]
    even = width % 2 == 0 and height % 2 == 0
    if pix_fmt is None:
        preferred = [name for name in ("yuv420p", "yuv444p") if name in supported and (even or name == "yuv444p")]
        pix_fmt = (preferred or supported)[0]
    elif supported and pix_fmt not in supported:
        raise VideoWriteError(
            f"cannot write {path}: {encoder.name} does not encode pix_fmt {pix_fmt!r} (it takes {', '.join(supported)})"
        )
    try:
        layout = av.VideoFormat(pix_fmt)
    except ValueError:
        raise VideoWriteError(f"cannot write {path}: unknown pix_fmt {pix_fmt!r}") from None
    if (width % 2 and layout.chroma_width(2) < 2) or (height % 2 and layout.chroma_height(2) < 2):
        raise VideoWriteError(
            f"cannot write {path}: {encoder.name} with pix_fmt {pix_fmt} needs even sizes, "
            f"got {width}x{height} (use pix_fmt='yuv444p' or pad the frames)"
        )
    return pix_fmt


def _write_container(
    settings: _VideoSettings,
    arrays: Iterator[np.ndarray],
    audio_from: str | os.PathLike | None,
    audio_span: tuple[float, float] | None,
) -> None:
    path = settings.target
    encoder = _check_codec(settings.codec, path)
    audio_source = None
    if audio_from is not None:
        audio_source = _open_container(Path(audio_from))
    try:
        first, arrays = _first_frame(arrays, path)
        height, width = first.shape[:2]
        pix_fmt = _choose_pix_fmt(encoder, settings.pix_fmt or None, width, height, path)
        settings = dataclasses.replace(settings, codec=encoder.name, width=width, height=height, pix_fmt=pix_fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
        os.close(handle)
        try:
            _encode(Path(partial), arrays, settings, audio_source, audio_span)
            Path(partial).chmod(_default_mode(0o666))
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    finally:
        if audio_source is not None:
            audio_source.close()


def _default_mode(mode: int) -> int:
    """`mode` less the process umask: what `open()` would have given; temporary files are private."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@dataclass(frozen=True)
class _VideoSettings:
    target: Path
    codec: str
    fps: Fraction
    width: int
    height: int
    pix_fmt: str
    crf: int
    color: ColorTags

    @property
    def converts_color(self) -> bool:
        """Whether frames are converted to YUV with the tagged matrix and range (else FFmpeg's defaults)."""
        return self.color.specified and not av.VideoFormat(self.pix_fmt).is_rgb


def _encode(
    partial: Path,
    arrays: Iterator[np.ndarray],
    settings: _VideoSettings,
    audio_source: av.container.InputContainer | None,
    audio_span: tuple[float, float] | None,
) -> None:
    output, video, audio = _open_output(str(partial), settings, audio_source, audio_span)
    color = settings.color
    try:
        for array in arrays:
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if settings.converts_color:
                # The encoder's own conversion would use BT.601 limited range whatever the tags say.
                frame = frame.reformat(format=settings.pix_fmt, dst_colorspace=_SWSCALE_MATRIX.get(color.matrix),
                                       dst_color_range=color.range or None)
            for packet in video.encode(frame):
                if audio is not None:
                    audio.mux_until(float(packet.pts * packet.time_base))
                output.mux(packet)
        output.mux(video.encode(None))
        if audio is not None:
            audio.mux_until(math.inf)
    except av.FFmpegError as err:
        raise VideoWriteError(f"cannot write {settings.target}: encoding failed ({err.strerror})") from None
    finally:
        output.close()


def _open_output(
    target: str | io.BytesIO,
    settings: _VideoSettings,
    audio_source: av.container.InputContainer | None,
    audio_span: tuple[float, float] | None,
    copy_audio: bool = True,
) -> tuple[av.container.OutputContainer, av.VideoStream, _AudioTrack | None]:
    """Open the output with its streams and header written, copying audio where possible.

    Whether a container takes an audio codec as it is shows only when the header is written
    (mp4 takes Opus, mov does not), so a refused copy is retried with re-encoded audio. A span
    of the audio is always re-encoded.
    """
    suffix = settings.target.suffix.lower()
    has_audio = audio_source is not None and bool(audio_source.streams.audio)
    copy_audio = copy_audio and audio_span is None
    output = av.open(target, "w", format=_FORMATS[suffix], container_options=_CONTAINER_OPTIONS.get(suffix))
    try:
        video = output.add_stream(settings.codec, rate=settings.fps)
        video.width, video.height, video.pix_fmt = settings.width, settings.height, settings.pix_fmt
        if settings.codec in _CRF_ENCODERS:
            video.options = {"crf": str(settings.crf), **_CRF_ENCODERS[settings.codec]}
        if settings.converts_color:
            context, color = video.codec_context, settings.color
            context.color_primaries, context.color_trc = color.primaries, color.transfer
            context.colorspace, context.color_range = color.matrix, color.range
        audio = None
        if has_audio:
            audio = _AudioTrack(audio_source, output, copy=copy_audio, encoder=_AUDIO_ENCODERS.get(suffix, "aac"),
                                span=audio_span)
        output.start_encoding()
        return output, video, audio
    except (ValueError, av.FFmpegError) as err:
        output.close()
        if has_audio and copy_audio:
            if isinstance(target, io.BytesIO):
                target = io.BytesIO()
            return _open_output(target, settings, audio_source, audio_span, copy_audio=False)
        raise VideoWriteError(f"cannot write {settings.target}: {err}") from None


class _AudioTrack:
    """The first audio stream of a source, muxed into an output in time order with the video.

    Args:
        source: the opened source file.
        output: the output container, before its header is written.
        copy: copy the packets as they are (no quality loss) instead of re-encoding.
        encoder: audio encoder used when not copying.
        span: `(start, stop)` seconds of the source to keep (re-encoded, `copy` must be False);
            the whole stream when None.
    """

    def __init__(
        self,
        source: av.container.InputContainer,
        output: av.container.OutputContainer,
        *,
        copy: bool,
        encoder: str,
        span: tuple[float, float] | None = None,
    ) -> None:
        self._source = source
        self._source_stream = source.streams.audio[0]
        self._output = output
        if copy:
            # Raises ValueError when the container format cannot hold this codec.
            self._stream = output.add_stream_from_template(self._source_stream)
            self._packets = self._copied_packets()
        else:
            rate = self._source_stream.rate
            if encoder == "libopus":
                rate = 48000  # Opus encodes at 48 kHz (or a few lower rates); the encoder resamples.
            self._stream = output.add_stream(encoder, rate=rate, layout=self._source_stream.layout.name)
            frames = self._source.decode(self._source_stream)
            self._packets = self._encoded_packets(frames if span is None else self._cut(frames, *span))
        self._pending: av.Packet | None = None
        self._started = False

    def _copied_packets(self) -> Iterator[av.Packet]:
        for packet in self._source.demux(self._source_stream):
            if packet.dts is not None:  # the demuxer ends with an empty flush packet
                yield packet

    def _encoded_packets(self, frames: Iterable[av.AudioFrame]) -> Iterator[av.Packet]:
        for frame in frames:
            yield from self._stream.encode(frame)
        yield from self._stream.encode(None)

    def _cut(self, frames: Iterable[av.AudioFrame], start: float, stop: float) -> Iterator[av.AudioFrame]:
        """The samples in `[start, stop)` seconds, as planar float frames timed from 0."""
        rate = self._source_stream.rate
        first, last = round(start * rate), round(stop * rate)  # sample indices on the source timeline
        planar = av.AudioResampler(format="fltp", layout=self._source_stream.layout.name, rate=rate)
        position = written = 0  # source sample index of the next decoded sample; samples yielded
        for decoded in frames:
            if decoded.pts is not None:
                position = round(decoded.pts * decoded.time_base * rate)
            for frame in planar.resample(decoded):
                if position >= last:
                    return
                lo, hi = max(first - position, 0), min(last - position, frame.samples)
                position += frame.samples
                if hi <= lo:
                    continue
                samples = np.ascontiguousarray(frame.to_ndarray()[:, lo:hi])
                piece = av.AudioFrame.from_ndarray(samples, format="fltp", layout=frame.layout.name)
                piece.sample_rate, piece.pts = rate, written
                written += hi - lo
                yield piece

    def mux_until(self, seconds: float) -> None:
        """Mux the audio packets that start at or before `seconds`."""
        if not self._started:
            self._pending, self._started = next(self._packets, None), True
        while self._pending is not None and float(self._pending.dts * self._pending.time_base) <= seconds:
            self._pending.stream = self._stream
            self._output.mux(self._pending)
            self._pending = next(self._packets, None)


# ---------------------------------------------------------------------------------------------
# YUV4MPEG2 pipes

# BT.601 luma weights; chroma is scaled so Cb, Cr span [-0.5, 0.5] (JPEG / JFIF convention).
_KR, _KB = 0.299, 0.114
# Chroma subsampling factor per YUV4MPEG2 colour space (0: no chroma planes).
_Y4M_CHROMA = {"444": 1, "420jpeg": 2, "420": 2, "420mpeg2": 2, "420paldv": 2, "mono": 0}


class Y4MFrames:
    """Frames of a YUV4MPEG2 stream, as an iterator of `(3, H, W)` tensors in `[0, 1]`.

    The header is read on construction, so `fps`, `width` and `height` are known before the
    first frame. 4:2:0 chroma is upsampled by pixel repetition whatever its siting. Samples are
    full range when the header says `XCOLORRANGE=FULL`, else limited range (16-235 luma,
    16-240 chroma, the YUV4MPEG2 convention); both use the BT.601 matrix.

    Args:
        stream: binary stream positioned at the header (`sys.stdin.buffer`, a file, `BytesIO`).

    Raises:
        VideoReadError: for a missing or unsupported header, or a frame cut short.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        header = stream.readline()
        if not header.startswith(b"YUV4MPEG2 ") or not header.endswith(b"\n"):
            raise VideoReadError(f"cannot read y4m stream: expected a YUV4MPEG2 header, got {header[:40]!r}")
        tokens = header.decode("ascii", errors="replace").split()[1:]
        fields = {token[:1]: token[1:] for token in tokens}
        try:
            self.width, self.height = int(fields["W"]), int(fields["H"])
            numerator, denominator = fields["F"].split(":")
            self.fps = Fraction(int(numerator), int(denominator))
        except (KeyError, ValueError, ZeroDivisionError):
            raise VideoReadError(f"cannot read y4m stream: header {header.strip()!r} lacks a valid W, H or F") from None
        self.chroma = fields.get("C", "420jpeg")
        if self.chroma not in _Y4M_CHROMA:
            raise VideoReadError(
                f"cannot read y4m stream: colour space C{self.chroma} is not supported "
                f"(expected one of {', '.join('C' + name for name in _Y4M_CHROMA)})"
            )
        self.full_range = "XCOLORRANGE=FULL" in tokens
        self._index = 0

    def __iter__(self) -> Y4MFrames:
        return self

    def __next__(self) -> Tensor:
        marker = self._stream.readline()
        if not marker:
            raise StopIteration
        if not marker.startswith(b"FRAME"):
            raise VideoReadError(
                f"cannot read y4m stream: expected FRAME before frame {self._index}, got {marker[:20]!r}"
            )
        luma = self._read_plane(self.width, self.height)
        if self.chroma == "mono":
            rgb = _gray_to_rgb(luma, full_range=self.full_range)
        else:
            cb, cr = self._read_chroma(), self._read_chroma()
            rgb = _yuv_to_rgb(luma, cb, cr, full_range=self.full_range)
        self._index += 1
        return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255).contiguous()

    def _read_chroma(self) -> np.ndarray:
        """One chroma plane, upsampled to the luma size by pixel repetition."""
        factor = _Y4M_CHROMA[self.chroma]
        plane = self._read_plane(-(-self.width // factor), -(-self.height // factor))
        return plane.repeat(factor, axis=0).repeat(factor, axis=1)[: self.height, : self.width]

    def _read_plane(self, width: int, height: int) -> np.ndarray:
        data = self._stream.read(width * height)
        if len(data) != width * height:
            raise VideoReadError(f"cannot read y4m stream: frame {self._index} is cut short")
        return np.frombuffer(data, np.uint8).reshape(height, width)


def iter_y4m(stream: BinaryIO) -> Y4MFrames:
    """Read a YUV4MPEG2 stream frame by frame; see `Y4MFrames` (it also holds `fps` and size).

    Args:
        stream: binary stream positioned at the header.
    """
    return Y4MFrames(stream)


def write_y4m(
    stream: BinaryIO, frames: Tensor | Iterable[Tensor], fps: Fraction | float | int, *, chroma: str = "444"
) -> int:
    """Write frames as YUV4MPEG2, full-range BT.601 (the header says `XCOLORRANGE=FULL`).

    With `chroma="444"` a write/read round trip is exact within 1/255. `"420jpeg"` averages
    each 2x2 block of chroma (edge pixels repeated for odd sizes).

    Args:
        stream: binary stream to write to (`sys.stdout.buffer`, a file, `BytesIO`).
        frames: a clip `(T, 3, H, W)` or an iterable of frames `(3, H, W)`, floats in `[0, 1]`.
        fps: frame rate, as for `write_video`.
        chroma: `"444"` or `"420jpeg"`.

    Returns:
        The number of frames written.

    Raises:
        VideoWriteError: for bad frames, no frames or an unknown `chroma`.
    """
    target = Path("<y4m stream>")
    if chroma not in ("444", "420jpeg"):
        raise VideoWriteError(f"cannot write y4m: chroma must be '444' or '420jpeg', got {chroma!r}")
    rate = _as_fraction(fps, target)
    first, arrays = _first_frame(_frames_to_arrays(frames, target), target)
    height, width = first.shape[:2]
    header = f"YUV4MPEG2 W{width} H{height} F{rate.numerator}:{rate.denominator} Ip A1:1 C{chroma}"
    stream.write(f"{header} XCOLORRANGE=FULL\n".encode())
    count = 0
    for array in arrays:
        y, cb, cr = _rgb_to_yuv(array)
        if chroma == "420jpeg":
            cb, cr = _subsample_2x2(cb), _subsample_2x2(cr)
        stream.write(b"FRAME\n")
        for plane in (y, cb, cr):
            stream.write(np.ascontiguousarray(plane).tobytes())
        count += 1
    stream.flush()
    return count


def _rgb_to_yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-range BT.601: uint8 RGB `(H, W, 3)` -> uint8 Y, Cb, Cr planes `(H, W)`."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = _KR * r + (1 - _KR - _KB) * g + _KB * b
    cb = 128 + (b - y) / (2 * (1 - _KB))
    cr = 128 + (r - y) / (2 * (1 - _KR))
    return tuple(np.clip(np.rint(plane), 0, 255).astype(np.uint8) for plane in (y, cb, cr))


def _yuv_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, *, full_range: bool) -> np.ndarray:
    """BT.601 Y, Cb, Cr uint8 planes -> uint8 RGB `(H, W, 3)`."""
    y, cb, cr = (plane.astype(np.float32) for plane in (y, cb, cr))
    if not full_range:
        y, cb, cr = (y - 16) * (255 / 219), 128 + (cb - 128) * (255 / 224), 128 + (cr - 128) * (255 / 224)
    r = y + 2 * (1 - _KR) * (cr - 128)
    b = y + 2 * (1 - _KB) * (cb - 128)
    g = (y - _KR * r - _KB * b) / (1 - _KR - _KB)
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def _gray_to_rgb(y: np.ndarray, *, full_range: bool) -> np.ndarray:
    """Y plane -> uint8 gray RGB `(H, W, 3)`."""
    y = y.astype(np.float32)
    if not full_range:
        y = (y - 16) * (255 / 219)
    return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _subsample_2x2(plane: np.ndarray) -> np.ndarray:
    """Average 2x2 blocks, repeating the last row/column of odd-sized planes."""
    height, width = plane.shape
    padded = np.pad(plane.astype(np.float32), ((0, height % 2), (0, width % 2)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).mean(axis=(1, 3))
    return np.rint(blocks).astype(np.uint8)
