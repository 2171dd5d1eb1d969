"""`zoo upscale` and `zoo.upscale_video` on the test model "bicubic" (tests/bicubic_upscaler.py).

Run in this process through `zoo_main` (exit codes as `SystemExit`), except where a real process
is the point: signals, a terminal for the progress bar.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo import cli
from zoo.components.video_io import probe_video, read_video, write_video

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NTSC = Fraction(24000, 1001)
CLIPS = Path(os.environ.get("ZOO_SHARED_CLIPS", REPO / ".." / "shared" / "clips"))

spec = importlib.util.spec_from_file_location("bicubic_upscaler", HERE / "bicubic_upscaler.py")
bicubic_upscaler = importlib.util.module_from_spec(spec)
sys.modules.setdefault("bicubic_upscaler", bicubic_upscaler)
spec.loader.exec_module(sys.modules["bicubic_upscaler"])
BicubicUpscaler = sys.modules["bicubic_upscaler"].BicubicUpscaler


@pytest.fixture
def bicubic(monkeypatch: pytest.MonkeyPatch):
    """The hub entry "bicubic" (x2 bicubic upsampling) in this process."""
    import zoo.hub as hub

    monkeypatch.setitem(hub.REGISTRY, "bicubic", hub.PretrainedCfg(
        paper="Bicubic", paradigm="bicubic upsampling", upscaler="bicubic_upscaler:BicubicUpscaler",
        module="bicubic_upscaler:BicubicUpscaler", recipe="recipes/none.yaml", repo_id=None))
    return BicubicUpscaler


def clip(frames: int = 4, height: int = 9, width: int = 17, seed: int = 0) -> torch.Tensor:
    """Smooth random frames (codec-friendly), odd-sized by default."""
    small = torch.rand(frames, 3, 3, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear").clamp(0, 1)


def write_sine(path: Path, seconds: float, rate: int = 48000) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        t = np.arange(int(rate * seconds)) / rate
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                           format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def audio_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return float(stream.duration * stream.time_base)


def zoo_exit(*args: str) -> int:
    """`zoo ARGS` in this process; its exit code."""
    try:
        cli.zoo_main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code
    return 0


def upscale(*args: str) -> int:
    return zoo_exit("upscale", *args, "--model", "bicubic", "--random-weights", "-q")


# One video ---------------------------------------------------------------------------------------


def test_ntsc_rate_odd_size_count_audio_and_colour_are_kept(bicubic, tmp_path: Path) -> None:
    from zoo.components.video_io import ColorTags

    sine = write_sine(tmp_path / "sine.m4a", seconds=1.0)
    tags = ColorTags(1, 1, 1, 1)
    src = write_video(tmp_path / "in.mp4", clip(6), NTSC, audio_from=sine, color=tags)
    assert upscale(src, tmp_path / "out.mp4") == 0
    info = probe_video(tmp_path / "out.mp4")
    assert (info.width, info.height, info.num_frames, info.fps, info.has_audio) == (34, 18, 6, NTSC, True)
    assert info.color == tags
    assert audio_seconds(tmp_path / "out.mp4") == pytest.approx(audio_seconds(src), abs=1e-3)


def test_start_and_duration_cut_video_and_audio_together(bicubic, tmp_path: Path) -> None:
    sine = write_sine(tmp_path / "sine.m4a", seconds=2.0)
    src = write_video(tmp_path / "in.mp4", clip(40), NTSC, audio_from=sine)
    assert upscale(src, tmp_path / "out.mp4", "--start", "00:00:00.5", "--duration", "0.5") == 0
    # Frames from the first at or after 0.5 s to the last starting before 1.0 s:
    # ceil(0.5 * 24000/1001) = 12 to ceil(1.0 * 24000/1001) = 24, so 12 frames, 12 * 1001/24000 s.
    video = read_video(tmp_path / "out.mp4")
    assert video.info.num_frames == 12 and video.info.fps == NTSC
    assert audio_seconds(tmp_path / "out.mp4") == pytest.approx(12 * 1001 / 24000, abs=1e-3)
    # The right frames: through a lossy codec, nearer to them than to their neighbours.
    source = torch.nn.functional.interpolate(read_video(src).frames, scale_factor=2, mode="bicubic").clamp(0, 1)
    errors = {shift: (video.frames - source[12 + shift : 24 + shift]).abs().mean() for shift in (-1, 0, 1)}
    assert errors[0] < 0.5 * min(errors[-1], errors[1])


def test_start_past_the_end_is_refused(bicubic, tmp_path: Path, capsys) -> None:
    src = write_video(tmp_path / "in.mp4", clip(4), 8)
    assert upscale(src, tmp_path / "out.mp4", "--start", "1:00") == 2
    assert "--start 60 s is past the end of" in capsys.readouterr().err
    assert upscale(src, tmp_path / "out.mp4", "--start", "ten") == 2
    assert "--start takes seconds or [HH:]MM:SS[.fff], got 'ten'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "RGB"])
def test_frame_folders_in_both_directions(bicubic, tmp_path: Path, mode: str) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for index, frame in enumerate(clip(3)):
        array = (frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).convert(mode).save(frames / f"{index}.png")
    assert upscale(frames, tmp_path / "out.mp4") == 0
    assert probe_video(tmp_path / "out.mp4").num_frames == 3
    assert upscale(frames, tmp_path / "out_frames") == 0  # no audio: a folder can take it
    assert sorted(p.name for p in (tmp_path / "out_frames").iterdir()) == [f"{i:08d}.png" for i in range(3)]
    assert read_video(tmp_path / "out_frames").frames.shape == (3, 3, 18, 34)


def test_a_folder_cannot_take_the_audio(bicubic, tmp_path: Path, capsys) -> None:
    src = write_video(tmp_path / "in.mp4", clip(3), 8, audio_from=write_sine(tmp_path / "sine.m4a", 1.0))
    assert upscale(src, tmp_path / "frames") == 2
    err = capsys.readouterr().err
    assert "a frame folder cannot hold the audio of" in err and "--no-audio" in err
    assert upscale(src, tmp_path / "frames", "--no-audio") == 0
    assert len(list((tmp_path / "frames").iterdir())) == 3


def test_an_output_that_is_the_input_is_refused_before_anything_runs(bicubic, tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    src = write_video(tmp_path / "in.mp4", clip(3), 8)
    before = src.read_bytes()
    (tmp_path / "link.mp4").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for output in (src, "./in.mp4", tmp_path / "sub" / ".." / "in.mp4", "link.mp4"):
        assert upscale(src, output, "--overwrite") == 2
        assert "is the input" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_an_unwritable_place_is_named_before_the_model_loads(bicubic, tmp_path: Path, capsys, monkeypatch) -> None:
    import zoo.upscale as upscale_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the output was checked")

    monkeypatch.setattr(upscale_module, "load_model", no_loading)
    src = write_video(tmp_path / "in.mp4", clip(3), 8)
    assert upscale(src, "/proc/out.mp4") == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: cannot write /proc/out.mp4: /proc is not writable") and ".partial" not in err


@pytest.mark.parametrize(("make_input", "output", "message"), [
    (lambda p: p / "missing.mp4", "out.mp4", "missing.mp4: no such file or folder"),
    (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "out.mp4", "notes.txt"),
    (lambda p: write_video(p / "in.mp4", clip(2), 8), "out.flv", r"unknown extension .flv"),
    (lambda p: write_video(p / "in.mp4", clip(2), 8), "out.webm --codec libx264", "does not support 'libx264'"),
    (lambda p: p, "out.mp4", "holds no video files or frame images"),
    # A y4m header that claims 20000x20000 frames and holds 1000 bytes.
    (lambda p: (p / "huge.y4m").write_bytes(b"YUV4MPEG2 W20000 H20000 F25:1 Ip A1:1 C444\nFRAME\n" + bytes(1000))
     and p / "huge.y4m", "out.mp4", "huge.y4m"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(bicubic, tmp_path: Path, capsys, make_input, output,
                                                         message: str) -> None:
    src = make_input(tmp_path)
    output, *extra = output.split()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert upscale(src, tmp_path / "out" / output if src == tmp_path else tmp_path / output, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: ") and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def write_ffv1(path: Path, frames: np.ndarray, pix_fmt: str) -> Path:
    """`frames (T, H, W, 3)` uint8 as lossless FFV1 in `pix_fmt`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(("height", "width", "pix_fmt"), [(16, 16, "yuv444p12le"), (1, 1, "yuv444p")])
def test_12_bit_and_1x1_sources_are_upscaled(bicubic, tmp_path: Path, height: int, width: int, pix_fmt: str) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    src = write_ffv1(tmp_path / "in.mkv", frames, pix_fmt)
    assert upscale(src, tmp_path / "out.mkv") == 0
    info = probe_video(tmp_path / "out.mkv")
    assert (info.width, info.height, info.num_frames) == (2 * width, 2 * height, 3)


def test_existing_outputs_are_kept_unless_asked(bicubic, tmp_path: Path, capsys) -> None:
    src = write_video(tmp_path / "in.mp4", clip(3), 8)
    out = write_video(tmp_path / "out.mp4", clip(1), 8)
    assert upscale(src, out) == 2
    assert "out.mp4 exists; pass --overwrite to replace, or --skip-existing to keep" in capsys.readouterr().err
    assert upscale(src, out, "--skip-existing") == 0 and probe_video(out).num_frames == 1
    assert upscale(src, out, "--overwrite") == 0 and probe_video(out).num_frames == 3


# Options ----------------------------------------------------------------------------------------


def test_scales_and_options_a_model_does_not_take_are_named(tmp_path: Path, capsys) -> None:
    src = write_video(tmp_path / "in.mp4", clip(2), 8)
    cases = [
        (["--model", "osdiffvsr", "--scale", "3"], "--scale 3: osdiffvsr upscales x4 only"),
        (["--model", "osdiffvsr", "--temporal-scale", "2"],
         "--temporal-scale 2: osdiffvsr interpolates frames x1 only"),
        (["--model", "stream_diffvsr", "--chunk", "33"],
         "--chunk 33: stream_diffvsr takes no temporal chunks (it takes --color-fix, --compile, channels_last, "
         "flow_resolution)"),
        (["--model", "osdiffvsr", "--seed", "3"], "--seed 3: osdiffvsr takes no seed"),
        (["--model", "stream_diffvsr", "--float32-vae", "none"],
         "--float32-vae none: stream_diffvsr takes no float32 VAE"),
        # on/off flags as typed
        (["--model", "pssr", "--vae-tiling"], "--vae-tiling: pssr takes no VAE tiles"),
        (["--model", "pssr", "--no-vae-tiling"], "--no-vae-tiling: pssr takes no VAE tiles"),
        (["--model", "osdiffvsr", "--compile-scope", "step"], "--compile-scope needs --compile"),
        (["--model", "osdiffvsr", "--compile", "--compile-scope", "model"],
         "argument --compile-scope: must be one of networks, step, got 'model'"),
    ]
    for args, message in cases:
        assert zoo_exit("upscale", src, tmp_path / "out.mp4", "--random-weights", *args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_seams_tiled_and_chunked_output_equals_untiled(bicubic) -> None:
    up = bicubic(bicubic.config_class())
    frames = clip(7, 29, 37)
    whole = up(frames)
    reference = torch.nn.functional.interpolate(frames, scale_factor=2, mode="bicubic").clamp(0, 1)
    assert (whole - reference).abs().max() == 0
    for options in ({"tile": 12, "tile_overlap": 4}, {"chunk": 3, "chunk_overlap": 1},
                    {"tile": 10, "tile_overlap": 3, "chunk": 4, "chunk_overlap": 2}):
        up.configure(**{"tile": None, "chunk": None, **options})
        assert (up(frames) - whole).abs().max() < 1e-6, options
    # In space and time: chunks cross-fade interpolated frames too.
    up.configure(tile=None, chunk=None, temporal_scale=2)
    whole = up(frames)
    assert whole.shape == (13, 3, 58, 74)
    up.configure(tile=9, tile_overlap=2, chunk=3, chunk_overlap=1)
    assert (up(frames) - whole).abs().max() < 1e-6


def test_options_reach_the_model_and_defaults_fit_the_free_memory(bicubic, tmp_path: Path, monkeypatch,
                                                                  caplog) -> None:
    import zoo.upscale as upscale_module

    src = write_video(tmp_path / "in.mp4", clip(3, 100, 100), 8)
    report = zoo.upscale_video(src, tmp_path / "a.mp4", model="bicubic", pretrained=False, tile=16, tile_overlap=2,
                               chunk=2, color_fix="adain")
    assert report.options == {"scale": 2, "temporal_scale": 1, "tile": 16, "tile_overlap": 2, "chunk": 2,
                              "chunk_overlap": 1, "color_fix": "adain"}
    # The test model's memory model is 1 KiB per tiled LR pixel; with 8 MiB free the budget is
    # 0.8 * 8 MiB = 6.7 MB: the whole 100 x 100 frame needs 10.2 MB, a 96-pixel tile 9.4 MB, a
    # 64-pixel tile 4.2 MB, the first that fits.
    monkeypatch.setattr(upscale_module, "free_memory", lambda device: 8 * 2**20)
    with caplog.at_level("INFO", logger="zoo.upscale"):
        report = zoo.upscale_video(src, tmp_path / "b.mp4", model="bicubic", pretrained=False)
    assert report.options["tile"] == 64
    assert "tile=64 (fits the free memory)" in caplog.text
    with caplog.at_level("INFO", logger="zoo.upscale"):
        report = zoo.upscale_video(src, tmp_path / "c.mp4", model="bicubic", pretrained=False, tile=96)
    assert report.options["tile"] == 96 and "tile=96 (set)" in caplog.text
    assert "may run out of memory" in caplog.text  # 9.4 MB > 8 MiB free: said, and run as asked


def test_cli_flags_reach_the_model_and_space_time_rates_are_exact(bicubic, tmp_path: Path) -> None:
    src = write_video(tmp_path / "in.mp4", clip(5), NTSC)
    flags = ["--scale", "3", "--temporal-scale", "2", "--tile", "8", "--tile-overlap", "2", "--chunk", "3",
             "--chunk-overlap", "1", "--color-fix", "wavelet"]
    assert upscale(src, tmp_path / "out.mp4", *flags) == 0
    info = probe_video(tmp_path / "out.mp4")
    # 5 frames at 24000/1001 fps, x2 in time: (5 - 1) * 2 + 1 = 9 frames at exactly 48000/1001 fps.
    assert (info.width, info.height, info.num_frames, info.fps) == (51, 27, 9, Fraction(48000, 1001))


@pytest.mark.parametrize("model", zoo.list_models())
def test_one_frame_of_16x16_with_every_model(tmp_path: Path, model: str) -> None:
    src = write_video(tmp_path / "in.mp4", clip(1, 16, 16), 8)
    report = zoo.upscale_video(src, tmp_path / "out.mp4", model=model, pretrained=False, variant="tiny")
    info = probe_video(tmp_path / "out.mp4")
    assert report.frames_out == info.num_frames == 1 and (info.width, info.height) == (64, 64)


def test_the_documented_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    import re

    import zoo.upscale as upscale_module

    example = re.search(r"```python\n(.*?)```", upscale_module.__doc__, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "zoo.upscale example", "exec"), {})
    assert probe_video(tmp_path / "x4.mp4").width == 128 and capsys.readouterr().out.startswith("4 ")


def test_python_api_report(bicubic, tmp_path: Path) -> None:
    src = write_video(tmp_path / "in.mp4", clip(5), NTSC)
    report = zoo.upscale_video(src, tmp_path / "out.mp4", model="bicubic", pretrained=False)
    assert (report.frames_in, report.frames_out, report.fps) == (5, 5, NTSC)
    assert report.seconds > 0 and report.peak_host_bytes > 0 and report.peak_device_bytes is None
    again = zoo.upscale_video(src, tmp_path / "out.mp4", model="bicubic", pretrained=False, if_exists="skip")
    assert again.skipped and again.frames_out == 0
    with pytest.raises(ValueError, match="scale=4: bicubic upscales x2 or x3"):
        zoo.upscale_video(src, tmp_path / "x.mp4", model="bicubic", pretrained=False, scale=4)


# Batches ----------------------------------------------------------------------------------------


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_batch_mirrors_the_input_tree(bicubic, tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", clip(2), 8)
    write_video(videos / "deep" / "b.mkv", clip(2), 8)
    write_video(videos / "deep" / "frames", clip(2), 8)  # a frame folder inside the tree
    write_video(videos / ".hidden.mp4", clip(2), 8)
    assert upscale(videos, tmp_path / "out") == 0
    assert _tree(tmp_path / "out") == ["a.mp4", "deep/b.mkv", "deep/frames/00000000.png", "deep/frames/00000001.png"]
    assert probe_video(tmp_path / "out" / "deep" / "b.mkv").width == 34
    # Several inputs keep their names; a glob keeps the path below its fixed part.
    assert upscale(videos / "a.mp4", videos / "deep", tmp_path / "several") == 0
    assert _tree(tmp_path / "several") == ["a.mp4", "deep/b.mkv", "deep/frames/00000000.png",
                                           "deep/frames/00000001.png"]
    assert upscale(str(videos / "**" / "*.mkv"), tmp_path / "globbed") == 0
    assert _tree(tmp_path / "globbed") == ["deep/b.mkv"]


def test_batch_refuses_an_output_inside_its_input(bicubic, tmp_path: Path, capsys) -> None:
    write_video(tmp_path / "videos" / "a.mp4", clip(2), 8)
    assert upscale(tmp_path / "videos", tmp_path / "videos" / "up") == 2
    assert "is inside the input folder" in capsys.readouterr().err


def test_batch_skip_existing_does_the_rest(bicubic, tmp_path: Path) -> None:
    for name in "abc":
        write_video(tmp_path / "videos" / f"{name}.mp4", clip(2), 8)
    write_video(tmp_path / "out" / "b.mp4", clip(1), 8)
    assert upscale(tmp_path / "videos", tmp_path / "out", "--skip-existing") == 0
    assert [probe_video(tmp_path / "out" / f"{n}.mp4").num_frames for n in "abc"] == [2, 1, 2]


def test_a_batch_of_50_clips_gives_50_valid_outputs(bicubic, tmp_path: Path) -> None:
    for index in range(50):
        write_video(tmp_path / "videos" / f"{index // 10}" / f"clip{index}.mp4", clip(8, 16, 16, seed=index), 8)
    assert upscale(tmp_path / "videos", tmp_path / "out") == 0
    outputs = sorted((tmp_path / "out").rglob("*"))
    outputs = [p for p in outputs if p.is_file()]
    assert len(outputs) == 50 and not any(p.name.startswith(".") for p in outputs)
    for path in outputs:
        info = probe_video(path)
        assert (info.width, info.height, info.num_frames, info.fps) == (32, 32, 8, 8), path


# Weights ----------------------------------------------------------------------------------------


def test_checkpoint_weights(toy, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    module = toy.ToyModule(channels=3)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader([(torch.rand(3, 8, 8), torch.rand(3, 16, 16))], batch_size=1))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    src = write_video(tmp_path / "in.mp4", clip(2, 8, 8), 8)
    assert zoo_exit("upscale", src, tmp_path / "frames", "--checkpoint", tmp_path / "last.ckpt", "-q") == 0
    expected = module.eval().to_upscaler()(read_video(src).frames)
    out = read_video(tmp_path / "frames").frames  # PNG frames: exact but for 8-bit rounding
    assert out.shape == expected.shape and (out - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_devices_and_checkpoints_need_the_train_extra(bicubic, tmp_path: Path, capsys, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightning" else
                        real_find_spec(name, *a))
    src = write_video(tmp_path / "in.mp4", clip(2), 8)
    assert upscale(src, tmp_path / "out.mp4", "--devices", "2") == 2
    assert capsys.readouterr().err == ("zoo: error: --devices needs the train extra (lightning is not installed): "
                                       "pip install 'vsr-zoo[train]'\n")


# Real processes: signals and a terminal ---------------------------------------------------------


def _launch(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZOO_TEST_SECONDS_PER_FRAME": "0.5", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, str(HERE / "launch.py"), "upscale", *map(str, args), "--model",
                             "bicubic", "--random-weights"], env=env, **kwargs)


@pytest.mark.parametrize(("signum", "code", "message"), [(signal.SIGINT, 130, "zoo: interrupted"),
                                                         (signal.SIGTERM, 143, "zoo: terminated")])
def test_signals_exit_130_143_without_traceback_or_partial_file(tmp_path: Path, signum: int, code: int,
                                                               message: str) -> None:
    src = write_video(tmp_path / "in.mp4", clip(20), 8)
    process = _launch(src, tmp_path / "out.mp4", stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*partial*")):  # the write has begun
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err and err.rstrip().endswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_an_interrupted_batch_resumes_where_it_stopped(tmp_path: Path) -> None:
    for name in "abcd":
        write_video(tmp_path / "videos" / f"{name}.mp4", clip(6), 8)
    out, log = tmp_path / "out", tmp_path / "streams.log"
    # 3 s per video: the signal lands seconds before the batch could end, even on a busy machine.
    process = _launch(tmp_path / "videos", out, "-q", stderr=subprocess.PIPE, text=True,
                      env={"ZOO_TEST_STREAM_LOG": str(log), "ZOO_TEST_SECONDS_PER_FRAME": "0.5"})
    deadline = time.monotonic() + 120
    while not (out / "b.mp4").exists():  # two videos done, the third begun
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    done = {p.name: p.stat().st_ino for p in out.iterdir()}
    assert sorted(done) in (["a.mp4", "b.mp4"], ["a.mp4", "b.mp4", "c.mp4"])  # no partial file
    started = len(log.read_text().splitlines())
    resumed = _launch(tmp_path / "videos", out, "-q", "--skip-existing", stderr=subprocess.PIPE, text=True,
                      env={"ZOO_TEST_STREAM_LOG": str(log)})
    assert resumed.wait(timeout=120) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    assert all((out / name).stat().st_ino == inode for name, inode in done.items())  # kept, not redone
    assert len(log.read_text().splitlines()) - started == 4 - len(done)


def test_progress_bar_on_a_terminal_and_nothing_on_stdout(tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    src = write_video(tmp_path / "in.mp4", clip(4), 8)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    process = _launch(src, tmp_path / "out.mp4", stdout=subprocess.PIPE, stderr=follower,
                      env={"ZOO_TEST_SECONDS_PER_FRAME": "0.2"})
    os.close(follower)
    out, _ = process.communicate(timeout=120)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    text = seen.decode(errors="replace")
    assert process.returncode == 0 and out == b""
    assert "in.mp4: 100%" in text and "4/4" in text and "frame/s" in text


# Real clips (../shared/clips) ---------------------------------------------------------------------

SHARED_CLIPS = [("dove_001.mp4", 256, 256, 16), ("dove_002.mp4", 318, 180, 16), ("dove_003.mp4", 256, 128, 16),
                ("dove_004.mp4", 256, 128, 16), ("dove_005.mp4", 320, 240, 16), ("dove_006.mp4", 320, 240, 16),
                ("dove_007.mp4", 316, 178, 16), ("osdenhancer_demo.mp4", 640, 480, 8)]


@pytest.mark.skipif(not CLIPS.is_dir(), reason="../shared/clips is not present")
def test_every_shared_clip_comes_back_at_exactly_the_scale(bicubic, tmp_path: Path) -> None:
    for name, width, height, fps in SHARED_CLIPS:
        # Two frames: from the first frame at or after 0.1 s, as many as start within 2 / fps.
        out = tmp_path / name
        assert upscale(CLIPS / name, out, "--start", "0.1", "--duration", str(2 / fps)) == 0
        info = probe_video(out)
        assert (info.width, info.height, info.num_frames, info.fps) == (2 * width, 2 * height, 2, fps), name


# Every clip with every model is CPU-hours of x4 output (640x480 alone: 146 s for OS-DiffVSR's two frames),
# so the default run takes the smallest clip with each model and `pytest -m clips` the other 28 cases; the
# sizes of all clips go through the CLI above, and odd sizes through each model in tests/test_contract.py.
CLIP_CASES = [pytest.param(*clip, marks=() if clip[0] == "dove_003.mp4" else pytest.mark.clips)
              for clip in SHARED_CLIPS]


@pytest.mark.slow
@pytest.mark.skipif(not CLIPS.is_dir(), reason="../shared/clips is not present")
@pytest.mark.parametrize("model", zoo.list_models())
@pytest.mark.parametrize(("name", "width", "height", "fps"), CLIP_CASES)
def test_every_shared_clip_with_every_tiny_model(tmp_path: Path, model: str, name: str, width: int, height: int,
                                                 fps: int) -> None:
    up = zoo.load(model, pretrained=False, variant="tiny")
    # The video DiTs attend over every latent token of a chunk: 640 x 480 at x4 is ~58k tokens, out of
    # reach of a CPU. PS-SR runs in 128-pixel tiles; OSDEnhancer (no spatial tiles) at x2 there.
    options = {"pssr": {"tile": 128, "tile_overlap": 16},
               "osdenhancer": {"scale": 2} if width * height > 320 * 240 else {}}.get(model, {})
    report = zoo.upscale_video(CLIPS / name, tmp_path / "out.mp4", model=up, duration=2 / fps, **options)
    info = probe_video(tmp_path / "out.mp4")
    frames = (2 - 1) * up.temporal_scale + 1
    assert (report.frames_in, report.frames_out) == (2, frames)
    assert (info.width, info.height, info.num_frames, info.fps) == (
        up.scale * width, up.scale * height, frames, fps * up.temporal_scale)
