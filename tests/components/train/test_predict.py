"""zoo.components.train.predict: many videos through `lightning predict` (DDP on CPU) and `zoo upscale --devices`.

Each run is a real process tree started by tests/launch.py with the test model "bicubic", 6 videos of
2 frames at 16x16; the model logs every stream it starts (`ZOO_TEST_STREAM_LOG`), which counts how
often each video was upscaled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.components.video_io import probe_video, write_video

TESTS = Path(__file__).resolve().parents[2]
REPO = TESTS.parent
NAMES = [f"v{i}.mp4" for i in range(4)] + ["sub/w0.mp4", "sub/w1.mp4"]


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    for index, name in enumerate(NAMES):
        write_video(folder / name, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(index)), 8)
    return folder


def launch(*args: object, log: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "ZOO_TEST_STREAM_LOG": str(log), **env}
    return subprocess.run([sys.executable, str(TESTS / "launch.py"), *map(str, args)], env=environment, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def predict(videos: Path, out: Path, log: Path, devices: int = 2, **env: str) -> subprocess.CompletedProcess:
    return launch("predict", "-c", REPO / "recipes" / "predict.yaml", "--data.inputs", videos, "--data.output", out,
                  "--model.model", "bicubic", "--model.pretrained", "false", "--trainer.accelerator", "cpu",
                  "--trainer.devices", devices, "--trainer.enable_progress_bar", "false", log=log, cwd=out.parent,
                  **env)


def outputs(out: Path) -> dict[str, int]:
    """Complete outputs (hidden temporary files excluded) and their inode, which a rewrite changes."""
    return {str(p.relative_to(out)): p.stat().st_ino for p in out.rglob("*.mp4") if not p.name.startswith(".")}


def streams(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_ddp_writes_each_output_once_and_a_second_run_nothing(videos: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "streams.log"
    result = predict(videos, out, log)
    assert result.returncode == 0, result.stderr[-3000:]
    first = outputs(out)
    assert sorted(first) == sorted(NAMES)
    assert len(streams(log)) == 6  # six videos upscaled, so none twice
    assert len({line.split()[0] for line in streams(log)}) == 2  # by two ranks
    for name in NAMES:
        assert probe_video(out / name).width == 32
    result = predict(videos, out, log)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(streams(log)) == 6 and outputs(out) == first  # nothing upscaled, nothing rewritten


def test_a_killed_run_restarted_completes_the_rest(videos: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "streams.log"
    # One process, killed (SIGKILL, no cleanup) in the middle of its 4th video.
    killed = predict(videos, out, log, devices=1, ZOO_TEST_KILL_AT_STREAM="4")
    assert killed.returncode == -9
    done = outputs(out)
    assert len(done) == 3 and len(streams(log)) == 4
    assert list(out.rglob(".*partial*"))  # the 4th video's temporary file, not an output
    # Restarted through `zoo upscale --devices 2`, the same pieces: the other three, once each.
    restart = launch("upscale", videos, out, "--model", "bicubic", "--random-weights", "--devices", 2,
                     "--device", "cpu", "--skip-existing", "-q", log=log, cwd=tmp_path)
    assert restart.returncode == 0, restart.stderr[-3000:]
    final = outputs(out)
    assert sorted(final) == sorted(NAMES) and all(final[name] == inode for name, inode in done.items())
    assert len(streams(log)) == 4 + 3


def test_one_rank_killed_and_the_job_restarted_writes_each_output_once(videos: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "streams.log"
    # Rank 1 is killed in its 2nd video. Rank 0 goes on with its own videos; whether it finishes them
    # or Lightning's launcher kills it first (it polls its ranks every 5 s) depends on timing, so only
    # the outputs are checked: rank 1's 2nd and 3rd videos are missing.
    predict(videos, out, log, ZOO_TEST_KILL_AT_STREAM="2", ZOO_TEST_KILL_RANK="1")
    done = outputs(out)
    assert 1 <= len(done) <= len(NAMES) - 2  # rank 1's first video at least; not its 2nd and 3rd
    started = len(streams(log))
    restart = predict(videos, out, log)
    assert restart.returncode == 0, restart.stderr[-3000:]
    final = outputs(out)
    # Every output exists once; none written in the first run was written again; the restart
    # upscaled exactly the missing ones.
    assert sorted(final) == sorted(NAMES) and all(final[name] == inode for name, inode in done.items())
    assert len(streams(log)) - started == len(NAMES) - len(done)
    for name in NAMES:
        assert probe_video(out / name).num_frames == 2
