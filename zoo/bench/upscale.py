"""Memory of `zoo upscale` end to end: decoding, the model's stream and encoding must not grow with length.

Each run is a fresh process (one thread, so the peak does not depend on the machine's cores) that
runs the `zoo upscale` command on a clip and reports its peak resident memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from zoo.components.video_io import write_video

_CHILD = """
import resource, sys
import torch
torch.set_num_threads(1)
from zoo.cli import zoo_main
zoo_main(["upscale", sys.argv[1], sys.argv[2], "--model", sys.argv[3], "--random-weights", "--variant", sys.argv[4],
          "--device", "cpu", "--quiet", "--overwrite"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _moving_clip(frames: int, size: int):
    """A gradient scrolling one pixel per frame, made one frame at a time."""
    ramp = torch.linspace(0, 1, 2 * size)
    for index in range(frames):
        row = ramp[index % size : index % size + size]
        yield torch.stack([row.expand(size, size), row.expand(size, size).T, torch.full((size, size), 0.5)])


def _peak_bytes(clip: Path, output: Path, name: str, variant: str) -> int:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(clip), str(output), name, variant], env=env,
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) * 1024  # Linux reports ru_maxrss in KiB


def bench_upscale_memory(*, name: str = "stream_diffvsr", variant: str = "tiny", frames: tuple[int, int] = (32, 512),
                         size: int = 64, workdir: str | None = None) -> dict:
    """Peak RSS of `zoo upscale` on a short vs a long clip: flat memory keeps `ratio` near 1.

    Args:
        name: hub name (random weights).
        variant: network size.
        frames: the short and the long clip's lengths.
        size: frame width and height (LR).
        workdir: folder for the clips and outputs; the system temp folder when None.

    Returns:
        {"name", "variant", "size", "frames", "peak_bytes": [short, long], "ratio"}.
    """
    peaks = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for count in frames:
            clip = write_video(Path(tmp) / f"in_{count}.mp4", _moving_clip(count, size), 25)
            peaks.append(_peak_bytes(clip, Path(tmp) / f"out_{count}.mp4", name, variant))
    return {"name": name, "variant": variant, "size": size, "frames": list(frames), "peak_bytes": peaks,
            "ratio": peaks[1] / peaks[0]}
