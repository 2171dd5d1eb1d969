"""The `lightning` and `zoo` commands: help, dispatch, one-line errors, packaged recipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo import cli, hub

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("argv", [
    ["lightning", "--help"],
    ["lightning", "fit", "--help"],
    ["zoo", "--help"],
    ["zoo", "hub", "--help"],
    ["zoo", "upscale", "--help"],
    ["zoo", "bench", "--help"],
    ["zoo", "hub", "list"],
])
def test_commands_exit_zero(argv):
    result = run(str(BIN / argv[0]), *argv[1:])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_python_m_zoo_is_zoo_and_trains_like_lightning():
    assert run(sys.executable, "-m", "zoo", "--help").returncode == 0
    fit_help = run(sys.executable, "-m", "zoo", "fit", "--help")
    assert fit_help.returncode == 0, fit_help.stderr
    assert "--trainer" in fit_help.stdout and "--model" in fit_help.stdout


def test_hub_list_names_every_model(capsys):
    cli.zoo_main(["hub", "list"])
    out = capsys.readouterr().out
    for name in (*hub.list_models(), "Jamichsu/Stream-DiffVSR"):
        assert name in out


def test_hub_card_prints_rendered_card(capsys):
    cli.zoo_main(["hub", "card", "stream_diffvsr"])
    out = capsys.readouterr().out
    assert out.startswith("---\n") and "library_name: vsr-zoo" in out and "{{" not in out


def test_user_errors_are_one_line_and_exit_two(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["hub", "download", "osdiffvsr"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: no pretrained OS-DiffVSR weights") and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["hub", "export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    assert info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["transmogrify"])
    assert info.value.code == 2


def test_bench_lists_and_rejects_unknown(capsys):
    cli.zoo_main(["bench"])
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["bench", "no-such-benchmark"])
    assert info.value.code == 2
    assert "unknown benchmark 'no-such-benchmark'" in capsys.readouterr().err


def test_recipe_paths_fall_back_to_the_packaged_copy(tmp_path, monkeypatch):
    recipes = tmp_path / "pkg_recipes"
    (recipes / "tiny").mkdir(parents=True)
    (recipes / "tiny" / "x.yaml").write_text("trainer: {}\n")
    monkeypatch.setattr(cli, "asset_dir", lambda kind: recipes)
    monkeypatch.chdir(tmp_path)
    assert cli.packaged_recipe("recipes/tiny/x.yaml") == str(recipes / "tiny" / "x.yaml")
    assert cli.packaged_recipe("recipes/none.yaml") == "recipes/none.yaml"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "own.yaml").write_text("trainer: {}\n")
    assert cli.packaged_recipe("recipes/own.yaml") == "recipes/own.yaml"
    args = cli._with_packaged_recipes(["fit", "-c", "recipes/tiny/x.yaml", "--config=recipes/tiny/x.yaml"])
    assert args == ["fit", "-c", str(recipes / "tiny" / "x.yaml"), f"--config={recipes / 'tiny' / 'x.yaml'}"]


# zoo upscale, on the "toy" entry (a 2x conv upscaler registered by the `toy` fixture) -----------

def _clip(tmp_path: Path, name: str = "in.mp4", frames: int = 4):
    import torch

    from zoo.components.video_io import write_video

    ramp = torch.linspace(0, 1, 24)
    video = torch.stack([torch.stack([ramp.roll(t)[None].expand(16, 24)] * 3) for t in range(frames)])
    return write_video(tmp_path / name, video, fps=12)


def test_upscale_file_to_file(toy, tmp_path):
    from fractions import Fraction

    from zoo.components.video_io import probe_video

    src = _clip(tmp_path)
    out = tmp_path / "out.mkv"
    cli.zoo_main(["upscale", str(src), str(out), "--model", "toy", "--random-weights", "--variant", "tiny"])
    info = probe_video(out)
    assert (info.width, info.height, info.num_frames, info.fps) == (48, 32, 4, Fraction(12))


def test_upscale_y4m_pipe_to_pipe(toy, tmp_path, monkeypatch):
    import io
    import types

    import torch

    from zoo.components.video_io import iter_y4m, write_y4m

    source = io.BytesIO()
    write_y4m(source, torch.rand(3, 3, 8, 10).unbind(0), 25)
    sink = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(source.getvalue())))
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=sink))
    cli.zoo_main(["upscale", "-", "-", "--model", "toy", "--random-weights", "--variant", "tiny"])
    frames = iter_y4m(io.BytesIO(sink.getvalue()))
    assert (frames.width, frames.height, frames.fps) == (20, 16, 25)
    assert len(list(frames)) == 3


@pytest.mark.parametrize(("make_input", "output", "message"), [
    (lambda p: p / "missing.mp4", "out.mp4", "missing.mp4"),
    (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "out.mp4", "notes.txt"),
    (_clip, "out.flv", "unknown extension .flv"),
])
def test_upscale_bad_input_is_one_line_and_leaves_nothing(toy, tmp_path, capsys, make_input, output, message):
    src = make_input(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["upscale", str(src), str(tmp_path / output), "--model", "toy", "--random-weights"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: ") and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []


def test_upscale_failing_midway_leaves_no_partial_file(toy, tmp_path, capsys, monkeypatch):
    src = _clip(tmp_path, frames=6)

    def fail_after_two(self, frames):
        for index, frame in enumerate(frames):
            if index == 2:
                raise ValueError("frame 2 is unusable")
            yield torch.nn.functional.interpolate(frame[None], scale_factor=2)[0]

    import torch

    monkeypatch.setattr(toy.ToyUpscaler, "stream", fail_after_two)
    with pytest.raises(SystemExit):
        cli.zoo_main(["upscale", str(src), str(tmp_path / "out.mp4"), "--model", "toy", "--random-weights"])
    assert "frame 2 is unusable" in capsys.readouterr().err
    assert list(tmp_path.glob("out*")) == [] and [p.name for p in tmp_path.iterdir()] == ["in.mp4"]
