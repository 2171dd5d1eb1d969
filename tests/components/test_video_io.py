"""Tests for zoo.components.video_io: files, frame folders, errors, audio, y4m pipes."""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.components.video_io import (
    ColorTags,
    VideoReadError,
    VideoWriteError,
    check_destination,
    iter_frames,
    iter_y4m,
    probe_video,
    read_video,
    write_video,
    write_y4m,
)

# ZOO_SHARED_CLIPS points a checkout that does not sit beside ../shared at the clips.
CLIPS = Path(os.environ.get("ZOO_SHARED_CLIPS", Path(__file__).resolve().parents[2] / ".." / "shared" / "clips"))
NTSC_FILM = Fraction(24000, 1001)
# Mean absolute error allowed after lossy encoding of `smooth_clip` (x264 crf 18 measures ~0.01, gif ~0.06).
LOSSY_MAE = 0.03


def smooth_clip(frames: int = 12, height: int = 48, width: int = 64) -> torch.Tensor:
    """Gradients that drift over time: easy for codecs, so errors measure the pipeline."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    blue = [0.25 + 0.5 * (((x + y) / 2 + t / frames) % 1) for t in range(frames)]
    return torch.stack([torch.stack([x, y, b]) for b in blue])


def quantized_noise(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random frames holding exact multiples of 1/255 (what 8-bit storage can hold)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 3, height, width), generator=generator).float() / 255


def write_sine(path: Path, codec: str = "aac", seconds: float = 0.6, rate: int = 48000) -> Path:
    """A mono 440 Hz sine wave encoded with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        t = np.arange(int(rate * seconds)) / rate
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


# ---------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_ntsc_rate_with_copied_audio(tmp_path: Path) -> None:
    sine = write_sine(tmp_path / "sine.m4a")
    frames = smooth_clip(12)
    out = write_video(tmp_path / "out.mp4", frames, NTSC_FILM, audio_from=sine)

    video = read_video(out)
    assert video.frames.shape == (12, 3, 48, 64) and video.frames.dtype == torch.float32
    assert video.info.num_frames == 12
    assert video.info.fps == NTSC_FILM
    assert video.info.has_audio and video.info.codec == "h264"
    assert video.info.duration == pytest.approx(12 * 1001 / 24000)
    assert (video.frames - frames).abs().mean() < LOSSY_MAE
    # Remuxed, not re-encoded: the AAC packets are byte for byte those of the source.
    assert audio_packets(out) == audio_packets(sine)


def test_audio_is_reencoded_when_the_container_refuses_its_codec(tmp_path: Path) -> None:
    sine = write_sine(tmp_path / "sine.m4a")
    out = write_video(tmp_path / "out.webm", smooth_clip(6), 12, audio_from=sine)
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name == "opus"
        audio_seconds = sum(float(p.duration * p.time_base) for p in container.demux(audio=0) if p.size)
    assert audio_seconds == pytest.approx(0.6, abs=0.05)
    assert read_video(out).info.has_audio


def test_audio_from_a_file_without_audio_adds_none(tmp_path: Path) -> None:
    silent = write_video(tmp_path / "silent.mp4", smooth_clip(4), 8)
    out = write_video(tmp_path / "out.mp4", smooth_clip(4), 8, audio_from=silent)
    assert not probe_video(out).has_audio


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".mov", ".webm", ".avi", ".gif"])
def test_every_container_round_trips_size_count_and_rate(tmp_path: Path, suffix: str) -> None:
    frames = smooth_clip(6)
    # 10 fps: gif stores delays in 1/100 s, so its rate must divide 100.
    out = write_video(tmp_path / f"clip{suffix}", frames, 10)
    info = probe_video(out)
    video = read_video(out)
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 48, 6, 10)
    assert video.frames.shape == (6, 3, 48, 64) and video.info == info
    # gif keeps 8 bits per pixel (rgb8 palette), so it is far coarser than the video codecs.
    assert (video.frames - frames).abs().mean() < (0.1 if suffix == ".gif" else LOSSY_MAE)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ""])
def test_odd_size_is_kept(tmp_path: Path, suffix: str) -> None:
    frames = smooth_clip(3, height=179, width=317)
    out = write_video(tmp_path / f"odd{suffix}", frames, 10)
    video = read_video(out)
    assert video.frames.shape == (3, 3, 179, 317)
    assert (video.info.width, video.info.height) == (317, 179)
    assert (video.frames - frames).abs().mean() < LOSSY_MAE


def test_odd_size_with_a_420_pix_fmt_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VideoWriteError, match="needs even sizes, got 317x179"):
        write_video(tmp_path / "odd.mp4", smooth_clip(2, 179, 317), 10, pix_fmt="yuv420p")
    assert not list(tmp_path.iterdir())


def test_frame_folder_round_trip_is_lossless(tmp_path: Path) -> None:
    frames = quantized_noise(5, 20, 30)
    folder = write_video(tmp_path / "frames", frames, 24)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:08d}.png" for i in range(5)]
    video = read_video(folder)
    assert torch.equal(video.frames, frames)
    assert (video.info.codec, video.info.num_frames, video.info.has_audio) == ("png", 5, False)


def test_frame_pattern_names_the_files(tmp_path: Path) -> None:
    frames = quantized_noise(3, 8, 8)
    folder = write_video(tmp_path / "out" / "frame_%03d.png", iter(frames), 24)
    assert folder == tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == ["frame_000.png", "frame_001.png", "frame_002.png"]
    assert torch.equal(read_video(folder).frames, frames)


def test_streaming_write_from_an_iterator(tmp_path: Path) -> None:
    frames = smooth_clip(8)
    out = write_video(tmp_path / "out.mkv", (frame for frame in frames), 25)
    assert probe_video(out).num_frames == 8


def test_iter_frames_start_and_max_frames(tmp_path: Path) -> None:
    frames = quantized_noise(6, 8, 12)
    folder = write_video(tmp_path / "frames", frames, 24)
    assert torch.equal(torch.stack(list(iter_frames(folder, start=2, max_frames=3))), frames[2:5])

    clip = write_video(tmp_path / "clip.mp4", smooth_clip(6), 24)
    decoded = read_video(clip).frames
    subset = read_video(clip, start=4)
    assert torch.equal(subset.frames, decoded[4:]) and subset.info.num_frames == 6
    assert torch.equal(torch.stack(list(iter_frames(clip, start=1, max_frames=2))), decoded[1:3])
    with pytest.raises(VideoReadError, match="past its last frame"):
        read_video(clip, start=6)


def test_variable_frame_rate_reads_every_frame_at_the_average_rate(tmp_path: Path) -> None:
    times_ms = [0, 40, 80, 200, 240, 400, 440, 480, 600, 700]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t in times_ms:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), t // 4, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    video = read_video(path)
    assert video.frames.shape[0] == video.info.num_frames == 10
    # The average over 0.6-0.74 s, not the nominal 25 fps the stream was opened with.
    assert 10 / 0.74 <= video.info.fps <= 10 / 0.6
    # Frames come out once each and in order (no duplicates to fill the gaps).
    means = video.frames.mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(means, torch.tensor([t // 4 for t in times_ms], dtype=torch.float32), atol=2)


# ---------------------------------------------------------------------------------------------
# Frame folders


def test_grayscale_palette_and_rgba_frames_read_as_rgb(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    Image.fromarray(gray, "L").save(folder / "0.png")
    Image.fromarray(rgba, "RGBA").save(folder / "1.png")
    Image.fromarray(rgba[..., :3], "RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "2.png")

    frames = (read_video(folder).frames * 255).round().to(torch.uint8)
    assert frames.shape == (3, 3, 3, 4)
    assert torch.equal(frames[0], torch.from_numpy(gray).expand(3, 3, 4))
    assert torch.equal(frames[1], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))  # alpha dropped
    palette_rgb = np.array(Image.open(folder / "2.png").convert("RGB"))
    assert torch.equal(frames[2], torch.from_numpy(palette_rgb).permute(2, 0, 1))


def test_frame_folder_sorts_naturally_and_ignores_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in (10, 2, 1, 33):
        Image.fromarray(np.full((2, 2, 3), index, np.uint8)).save(folder / f"im{index}.png")
    (folder / "notes.txt").write_text("not a frame")
    values = read_video(folder).frames[:, 0, 0, 0] * 255
    assert values.round().tolist() == [1, 2, 10, 33]


# ---------------------------------------------------------------------------------------------
# Read errors


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "missing.mp4"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.mp4").touch()
    return tmp_path / "empty.mp4"


def _truncated(tmp_path: Path) -> Path:
    # write_video puts the mp4 index first, so the cut file still opens; its index gives it away.
    source = write_video(tmp_path / "full.mp4", quantized_noise(12, 32, 32), 24)
    data = source.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.mp4"


def _index_at_end_truncated(tmp_path: Path) -> Path:
    path = tmp_path / "plain.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for array in (quantized_noise(12, 32, 32) * 255).byte().permute(0, 2, 3, 1).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.mp4"


def _corrupt(tmp_path: Path) -> Path:
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp_path / "noise.mp4"


def _text(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("hello\nthis is text, not a video\n")
    return tmp_path / "notes.txt"


def _audio_only(tmp_path: Path) -> Path:
    return write_sine(tmp_path / "sine.m4a")


def _empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "readme.txt").write_text("no frames here")
    return tmp_path / "frames"


def _mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    write_video(folder, quantized_noise(2, 8, 8), 24)
    Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(folder / "00000002.png")
    return folder


def _broken_frame(tmp_path: Path) -> Path:
    folder = write_video(tmp_path / "frames", quantized_noise(2, 8, 8), 24)
    (folder / "00000002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_missing, "no such file"),
        (_empty, "empty"),
        (_truncated, "truncated"),
        (_index_at_end_truncated, "truncated, corrupt or not a video"),
        (_corrupt, "truncated, corrupt or not a video"),
        (_text, "truncated, corrupt or not a video"),
        (_audio_only, "no video stream"),
        (_empty_folder, "holds no .png"),
        (_mixed_folder, "differ in size"),
        (_broken_frame, "00000002.png"),
    ],
)
@pytest.mark.parametrize("reader", [probe_video, read_video, lambda path: list(iter_frames(path))])
def test_unreadable_sources_raise_one_clear_error(tmp_path: Path, make, reason: str, reader) -> None:
    path = make(tmp_path)
    with pytest.raises(VideoReadError, match=reason) as caught:
        reader(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_mixed_sizes_in_a_folder_are_found_while_iterating(tmp_path: Path) -> None:
    frames = iter_frames(_mixed_folder(tmp_path))
    assert next(frames).shape == (3, 8, 8)
    next(frames)
    with pytest.raises(VideoReadError, match=r"00000002\.png is 8x4"):
        next(frames)


# ---------------------------------------------------------------------------------------------
# Write errors


@pytest.mark.parametrize(
    ("frames", "options", "message"),
    [
        (torch.rand(3, 8, 8), {}, r"must be \(T, 3, H, W\), got \(3, 8, 8\)"),
        (torch.rand(2, 4, 8, 8), {}, r"must be \(T, 3, H, W\), got \(2, 4, 8, 8\)"),
        (torch.rand(2, 3, 8, 8) * 2, {}, r"frame 0 must be in \[0, 1\]"),
        (torch.full((2, 3, 8, 8), float("nan")), {}, r"frame 0 must be in \[0, 1\]"),
        (torch.randint(0, 255, (2, 3, 8, 8)), {}, "must hold floats"),
        ([torch.rand(8, 8)], {}, r"frame 0 must be \(3, H, W\), got \(8, 8\)"),
        ([torch.rand(3, 8, 8), torch.rand(3, 8, 6)], {}, "frame 1 is 6x8, earlier frames are 8x8"),
        (iter([]), {}, "there are no frames"),
        (torch.rand(0, 3, 8, 8), {}, "there are no frames"),
        (torch.rand(2, 3, 8, 8), {"codec": "no-such-codec"}, "unknown video encoder 'no-such-codec'"),
        (torch.rand(2, 3, 8, 8), {"codec": "aac"}, "'aac' encodes audio, not video"),
        (torch.rand(2, 3, 8, 8), {"pix_fmt": "rgb48le"}, "does not encode pix_fmt 'rgb48le'"),
    ],
)
def test_bad_frames_and_settings_raise_write_errors(tmp_path: Path, frames, options, message) -> None:
    with pytest.raises(VideoWriteError, match=message):
        write_video(tmp_path / "out.mp4", frames, 24, **options)
    assert not list(tmp_path.iterdir())


def test_bad_destinations_raise_write_errors(tmp_path: Path) -> None:
    frames = quantized_noise(2, 8, 8)
    with pytest.raises(VideoWriteError, match=r"unknown extension \.flv"):
        write_video(tmp_path / "out.flv", frames, 24)
    with pytest.raises(VideoWriteError, match="fps must be positive"):
        write_video(tmp_path / "out.mp4", frames, 0)
    with pytest.raises(VideoWriteError, match="frame folder cannot hold the audio"):
        write_video(tmp_path / "frames", frames, 24, audio_from=tmp_path / "in.mp4")
    with pytest.raises(VideoWriteError, match="pattern needs one %d field"):
        write_video(tmp_path / "frames" / "%d_%d.png", frames, 24)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(VideoWriteError, match="exists and is not an empty folder"):
        write_video(occupied, frames, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


@pytest.mark.parametrize("name", ["out.mp4", "out.webm", "frames"])
def test_a_failure_midway_leaves_no_output(tmp_path: Path, name: str) -> None:
    def frames_then_crash():
        yield from smooth_clip(4)
        raise RuntimeError("upscaler crashed")

    (tmp_path / "keep.txt").write_text("unrelated")
    with pytest.raises(RuntimeError, match="upscaler crashed"):
        write_video(tmp_path / name, frames_then_crash(), 24)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_a_failed_rewrite_keeps_the_previous_file(tmp_path: Path) -> None:
    out = write_video(tmp_path / "out.mp4", smooth_clip(4), 24)
    before = out.read_bytes()
    with pytest.raises(VideoWriteError):
        write_video(out, [smooth_clip(1)[0], torch.rand(3, 4, 4)], 24)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out.mp4"]


@pytest.mark.parametrize("fps", [Fraction(48000, 1001), Fraction(60000, 1001), Fraction(2997, 100), 50])
def test_fractional_rates_are_kept_exactly(tmp_path: Path, fps) -> None:
    out = write_video(tmp_path / "out.mkv", quantized_noise(3, 8, 8), fps)
    assert probe_video(out).fps == fps


def _y_of(path: Path) -> float:
    with av.open(str(path)) as container:
        frame = next(container.decode(container.streams.video[0]))
        return float(frame.to_ndarray(format="yuv444p")[0].mean())


@pytest.mark.parametrize(("tags", "luma"), [
    # Luma of pure red is Kr * 255 in full range, 16 + Kr * 219 in limited range:
    (ColorTags(1, 1, 1, 1), 16 + 0.2126 * 219),   # BT.709 limited: 62.6
    (ColorTags(1, 1, 1, 2), 0.2126 * 255),        # BT.709 full: 54.2
    (ColorTags(6, 6, 6, 1), 16 + 0.299 * 219),    # BT.601 (SMPTE 170M) limited: 81.5
])
def test_color_tags_are_kept_and_convert_with_their_matrix(tmp_path: Path, tags: ColorTags, luma: float) -> None:
    red = torch.zeros(2, 3, 16, 16)
    red[:, 0] = 1
    out = write_video(tmp_path / "red.mp4", red, 24, color=tags)
    assert probe_video(out).color == tags
    assert _y_of(out) == pytest.approx(luma, abs=1)
    back = read_video(out).frames
    assert (back - red).abs().max() < 3 / 255  # decoding follows the same tags


def test_untagged_output_converts_with_ffmpeg_defaults(tmp_path: Path) -> None:
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1
    out = write_video(tmp_path / "red.mp4", red, 24)
    assert probe_video(out).color == ColorTags()
    assert _y_of(out) == pytest.approx(16 + 0.299 * 219, abs=1)


def write_tone_after_silence(path: Path, silence: float, tone: float, rate: int = 48000) -> Path:
    """Mono AAC: `silence` seconds of zeros, then a 440 Hz tone for `tone` seconds."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        t = np.arange(int(rate * tone)) / rate
        samples = np.concatenate([np.zeros(int(rate * silence)), 0.5 * np.sin(2 * np.pi * 440 * t)])
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def decoded_audio(path: Path) -> tuple[np.ndarray, float]:
    """Mono samples of the first audio stream and the stream's duration in seconds."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
        return samples, float(stream.duration * stream.time_base)


def test_audio_span_is_cut_with_the_video(tmp_path: Path) -> None:
    # 0.5 s silence then tone; keeping [0.4, 0.9) gives 0.1 s of silence, then 0.4 s of tone.
    source = write_tone_after_silence(tmp_path / "source.m4a", silence=0.5, tone=1.0)
    out = write_video(tmp_path / "out.mp4", quantized_noise(12, 8, 8), 24, audio_from=source, audio_span=(0.4, 0.9))
    samples, duration = decoded_audio(out)
    assert duration == pytest.approx(0.5, abs=1e-3)
    rate = 48000

    def rms(a: float, b: float) -> float:
        return float(np.sqrt(np.mean(samples[int(a * rate) : int(b * rate)] ** 2)))

    assert rms(0.0, 0.08) < 0.01 and rms(0.12, 0.45) > 0.3


@pytest.mark.parametrize(("name", "options", "message"), [
    ("out.webm", {"codec": "libx264"}, "'webm' format does not support 'libx264'"),
    ("out.mov", {"codec": "ffv1"}, "'mov' format does not support 'ffv1'"),
    ("out.flv", {}, r"unknown extension \.flv"),
    ("frames", {"audio_from": "sine"}, "a frame folder cannot hold the audio"),
    ("out.gif", {"audio_from": "sine"}, "gif cannot hold the audio"),
    ("out.mp4", {"pix_fmt": "yuv420p"}, "needs even sizes, got 17x9"),
])
def test_check_destination_refuses_what_writing_would(tmp_path: Path, name: str, options: dict, message: str) -> None:
    if options.get("audio_from") == "sine":
        options = {**options, "audio_from": write_sine(tmp_path / "sine.m4a")}
    with pytest.raises(VideoWriteError, match=message):
        check_destination(tmp_path / name, width=17, height=9, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["sine.m4a"])


def test_check_destination_accepts_what_writing_takes(tmp_path: Path) -> None:
    sine = write_sine(tmp_path / "sine.m4a")
    for name, options in [("a.mkv", {"codec": "ffv1", "audio_from": sine}), ("b.gif", {}), ("c.webm", {}),
                          ("new/sub/d.mp4", {"audio_from": sine}), ("frames", {})]:
        check_destination(tmp_path / name, width=17, height=9, **options)
    check_destination(tmp_path / "e.mp4", width=64, height=64, codec="libx265")  # x265 refuses tiny frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sine.m4a"]  # checking writes nothing


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, which no user can write")
def test_check_destination_names_an_unwritable_folder() -> None:
    with pytest.raises(VideoWriteError, match=r"cannot write /proc/out.mp4: /proc is not writable"):
        check_destination("/proc/out.mp4", width=8, height=8)


# ---------------------------------------------------------------------------------------------
# Shared real clips (../shared/clips/README.md)

SHARED_CLIPS = [
    ("dove_001.mp4", 256, 256, 100, 16),
    ("dove_002.mp4", 318, 180, 32, 16),
    ("dove_003.mp4", 256, 128, 50, 16),
    ("dove_004.mp4", 256, 128, 50, 16),
    ("dove_005.mp4", 320, 240, 100, 16),
    ("dove_006.mp4", 320, 240, 100, 16),
    ("dove_007.mp4", 316, 178, 33, 16),
    ("osdenhancer_demo.mp4", 640, 480, 17, 8),
]


@pytest.mark.skipif(not CLIPS.is_dir(), reason="../shared/clips is not present")
@pytest.mark.parametrize(("name", "width", "height", "num_frames", "fps"), SHARED_CLIPS)
def test_shared_clips_read_with_their_size_count_and_rate(name, width, height, num_frames, fps) -> None:
    info = probe_video(CLIPS / name)
    assert (info.width, info.height, info.num_frames, info.fps, info.has_audio) == (
        width,
        height,
        num_frames,
        fps,
        False,
    )
    video = read_video(CLIPS / name)
    assert video.frames.shape == (num_frames, 3, height, width)
    assert video.info == info
    assert 0 <= video.frames.min() < video.frames.max() <= 1


# ---------------------------------------------------------------------------------------------
# YUV4MPEG2


def test_y4m_bt601_full_range_bytes_hand_computed() -> None:
    # Pure red: Y = 0.299 * 255 = 76.2 -> 76; Cb = 128 - 0.1687 * 255 = 85.0 -> 85;
    # Cr = 128 + 0.5 * 255 = 255.5 -> 255 (clipped).
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    buffer = io.BytesIO()
    assert write_y4m(buffer, red, Fraction(30000, 1001)) == 1
    assert buffer.getvalue() == b"YUV4MPEG2 W1 H1 F30000:1001 Ip A1:1 C444 XCOLORRANGE=FULL\nFRAME\n" + bytes(
        [76, 85, 255]
    )


def test_y4m_444_round_trip_is_exact_within_one_level() -> None:
    frames = quantized_noise(3, 9, 7)
    buffer = io.BytesIO()
    write_y4m(buffer, iter(frames), NTSC_FILM)
    buffer.seek(0)
    reader = iter_y4m(buffer)
    assert (reader.width, reader.height, reader.fps, reader.chroma) == (7, 9, NTSC_FILM, "444")
    decoded = torch.stack(list(reader))
    assert decoded.shape == frames.shape
    assert (decoded - frames).abs().max() <= 1 / 255 + 1e-6


def test_y4m_420_round_trip_on_smooth_frames_with_odd_size() -> None:
    frames = smooth_clip(2, height=17, width=23)
    buffer = io.BytesIO()
    write_y4m(buffer, frames, 25, chroma="420jpeg")
    # 23x17 luma plus two 12x9 chroma planes per frame.
    assert len(buffer.getvalue().split(b"\n", 1)[1]) == 2 * (len(b"FRAME\n") + 23 * 17 + 2 * 12 * 9)
    buffer.seek(0)
    decoded = torch.stack(list(iter_y4m(buffer)))
    assert decoded.shape == (2, 3, 17, 23)
    assert (decoded - frames).abs().mean() < 0.02


def test_y4m_agrees_with_ffmpeg_both_ways() -> None:
    frames = smooth_clip(2, height=16, width=24)
    ours = io.BytesIO()
    write_y4m(ours, frames, 25)
    ours.seek(0)
    with av.open(ours, format="yuv4mpegpipe") as container:
        ffmpeg_read = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    ffmpeg_read = torch.from_numpy(np.stack(ffmpeg_read)).permute(0, 3, 1, 2) / 255
    assert (ffmpeg_read - frames).abs().mean() < 0.01

    # ffmpeg writes limited range without a range tag, which the reader assumes.
    theirs = io.BytesIO()
    with av.open(theirs, "w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 24, 16, "yuv444p"
        for frame in (frames * 255).round().byte().permute(0, 2, 3, 1).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    theirs.seek(0)
    reader = iter_y4m(theirs)
    assert not reader.full_range
    assert (torch.stack(list(reader)) - frames).abs().mean() < 0.01


def test_y4m_mono_reads_as_gray_rgb() -> None:
    data = b"YUV4MPEG2 W2 H1 F25:1 Cmono XCOLORRANGE=FULL\nFRAME\n" + bytes([0, 255])
    (frame,) = list(iter_y4m(io.BytesIO(data)))
    assert torch.equal(frame, torch.tensor([[[0.0, 1.0]]] * 3))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"RIFF....", "expected a YUV4MPEG2 header"),
        (b"YUV4MPEG2 W4 F25:1\n", "lacks a valid W, H or F"),
        (b"YUV4MPEG2 W4 H4 F25:1 C420p10\n", "C420p10 is not supported"),
        (b"YUV4MPEG2 W2 H2 F25:1 C444\nFRAME\n" + bytes(8), "frame 0 is cut short"),
        (b"YUV4MPEG2 W1 H1 F25:1 C444\nFRAME\n" + bytes(3) + b"JUNK\n", "expected FRAME before frame 1"),
    ],
)
def test_bad_y4m_streams_raise_read_errors(data: bytes, message: str) -> None:
    with pytest.raises(VideoReadError, match=message):
        list(iter_y4m(io.BytesIO(data)))


def test_y4m_write_errors() -> None:
    with pytest.raises(VideoWriteError, match="chroma must be '444' or '420jpeg'"):
        write_y4m(io.BytesIO(), torch.rand(1, 3, 2, 2), 25, chroma="422")
    with pytest.raises(VideoWriteError, match="there are no frames"):
        write_y4m(io.BytesIO(), iter([]), 25)


def test_outputs_get_the_usual_permissions_not_the_temporary_ones(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        video = write_video(tmp_path / "out.mp4", torch.rand(2, 3, 16, 16), fps=10)
        folder = write_video(tmp_path / "frames", torch.rand(2, 3, 16, 16), fps=10)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(video.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
