"""Stream-DiffVSR streaming memory benchmark: peak memory must not grow with the video's length.

`python -m zoo.bench.stream_diffvsr` streams 16 and 256 random frames through the upscaler and
compares their peak memory: resident set size of a fresh subprocess per run on CPU (so one run's
allocations cannot hide another's), `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

_CHILD = """
import resource, sys, torch
from zoo.bench.stream_diffvsr import stream_random_frames
stream_random_frames(int(sys.argv[1]), sys.argv[2], (int(sys.argv[3]), int(sys.argv[4])), "cpu")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def stream_random_frames(num_frames: int, variant: str, size: tuple[int, int], device: str) -> None:
    """Stream `num_frames` random LR frames of `size` through a random-init `variant` upscaler.

    Frames are made one at a time and outputs dropped, so only the pipeline's own state persists.
    """
    from zoo.stream_diffvsr.pipeline import StreamDiffVSRUpscaler

    torch.manual_seed(0)
    config = getattr(StreamDiffVSRUpscaler.config_class, variant)()
    config.flow_pretrained = False
    upscaler = StreamDiffVSRUpscaler(config).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    frames = (torch.rand(3, *size, generator=generator) for _ in range(num_frames))
    for _ in upscaler.stream(frames):
        pass


def _peak_cpu_bytes(num_frames: int, variant: str, size: tuple[int, int]) -> int:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(num_frames), variant, str(size[0]), str(size[1])],
                            capture_output=True, text=True, check=True, env=env)
    # Linux reports ru_maxrss in KiB.
    return int(result.stdout.strip().splitlines()[-1]) * 1024


def _peak_cuda_bytes(num_frames: int, variant: str, size: tuple[int, int], device: str) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    stream_random_frames(num_frames, variant, size, device)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def bench_stream_memory(*, frames: tuple[int, int] = (16, 256), variant: str = "tiny", size: tuple[int, int] = (32, 48),
                        device: str = "cpu") -> dict:
    """Peak memory of streaming `frames[0]` vs `frames[1]` frames; they must be within 10%.

    Args:
        frames: the short and the long stream's lengths.
        variant: network size ("tiny" or "full"), random weights.
        size: LR frame size (H, W).
        device: "cpu" (peak RSS of a fresh subprocess) or a CUDA device (peak allocated memory).

    Returns:
        {"device", "variant", "size", "frames", "peak_bytes": [short, long], "ratio": long / short,
        "within_10_percent": bool}.
    """
    if device == "cpu":
        peaks = [_peak_cpu_bytes(n, variant, size) for n in frames]
    else:
        peaks = [_peak_cuda_bytes(n, variant, size, device) for n in frames]
    ratio = peaks[1] / peaks[0]
    return {"device": device, "variant": variant, "size": list(size), "frames": list(frames), "peak_bytes": peaks,
            "ratio": ratio, "within_10_percent": abs(ratio - 1) <= 0.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs=2, default=(16, 256))
    parser.add_argument("--variant", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--size", type=int, nargs=2, default=(32, 48))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    result = bench_stream_memory(frames=tuple(args.frames), variant=args.variant, size=tuple(args.size),
                                 device=args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
