"""Memory benchmark for `iter_frames`: peak RSS must not grow with the clip length.

Run with `python -m zoo.bench.io` (prints a JSON line). Each measurement runs in a fresh
subprocess, so one run's allocator state and imports do not hide the next run's peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from zoo.components.video_io import write_video

# Executed in the child: baseline RSS after imports and opening the clip, then the highest RSS
# seen after each decoded frame.
_MEASURE = """
import json, sys
import psutil
from zoo.components.video_io import iter_frames
process = psutil.Process()
frames = iter_frames(sys.argv[1], max_frames=int(sys.argv[2]))
baseline = peak = process.memory_info().rss
count = 0
for frame in frames:
    count += 1
    peak = max(peak, process.memory_info().rss)
print(json.dumps({"frames": count, "growth_bytes": peak - baseline, "peak_bytes": peak}))
"""


def _moving_gradient(frames: int, size: int):
    """A gradient that scrolls one pixel per frame, generated lazily (streaming write)."""
    ramp = torch.linspace(0, 1, 2 * size)
    for index in range(frames):
        shift = index % size
        row = ramp[shift : shift + size]
        yield torch.stack([row.expand(size, size), row.expand(size, size).T, torch.full((size, size), 0.5)])


def _measure(clip: Path, frames: int) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(clip), str(frames)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def bench_iter_frames_memory(*, frames: int = 2000, size: int = 64, workdir: str | None = None) -> dict:
    """Peak RSS growth while iterating over the first 100 frames versus all `frames` frames.

    Args:
        frames: length of the clip written for the benchmark.
        size: frame width and height.
        workdir: folder for the temporary clip; the system temp folder when None.

    Returns:
        `frames`, `peak_rss_mb_100` and `peak_rss_mb_all` (RSS growth over the baseline in MiB),
        `peak_rss_mb_total_all` (the process's whole peak RSS) and `ratio` (all / 100; flat
        memory keeps it near 1).
    """
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        clip = write_video(Path(tmp) / "bench.mp4", _moving_gradient(frames, size), 25)
        short = _measure(clip, 100)
        full = _measure(clip, frames)
    mib = 2**20
    return {
        "frames": full["frames"],
        "size": size,
        "peak_rss_mb_100": round(short["growth_bytes"] / mib, 2),
        "peak_rss_mb_all": round(full["growth_bytes"] / mib, 2),
        "peak_rss_mb_total_all": round(full["peak_bytes"] / mib, 1),
        "ratio": round(max(full["growth_bytes"], 1) / max(short["growth_bytes"], 1), 2),
    }


if __name__ == "__main__":
    print(json.dumps(bench_iter_frames_memory()))
