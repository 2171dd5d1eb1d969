"""Seeded fuzzing of the two readers that take files from outside: videos and safetensors weights.

200 byte-level mutations of a small valid file each (flipped bytes, truncation, zeroed, repeated and
inserted spans). Every case must end in the reader's own error or a valid result, never another
exception, a crash or a hang: the cases run in a child process whose faulthandler ends it after 10 s
on one case, so a hang or a segfault fails the test with the case that caused it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zoo.components.video_io import write_video

CASES = 200
CASE_SECONDS = 10

_CHILD = r"""
import faulthandler, json, random, sys
from pathlib import Path

kind, source, workdir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
cases, limit = int(sys.argv[4]), int(sys.argv[5])
import torch
from zoo.components.upscaler import load_strict, read_safetensors
from zoo.components.video_io import VideoReadError, read_video

original = source.read_bytes()
rng = random.Random(0)
module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 3, 1))


def mutate(data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.choice(["flip", "truncate", "zero", "repeat", "insert"])
    at = rng.randrange(len(data))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[at:]
    elif kind == "zero":
        data[at:at + rng.randint(1, 256)] = bytes(len(data[at:at + rng.randint(1, 256)]))
    elif kind == "repeat":
        data[at:at] = data[at:at + rng.randint(1, 256)]
    else:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(data)


outcomes = {"error": 0, "valid": 0}
unexpected = []
for case in range(cases):
    path = workdir / f"case{source.suffix}"
    path.write_bytes(mutate(original))
    faulthandler.dump_traceback_later(limit, exit=True)
    try:
        if kind == "video":
            video = read_video(path)
            assert video.frames.ndim == 4 and video.frames.shape[1] == 3
        else:
            load_strict(module, read_safetensors(path))
        outcomes["valid"] += 1
    except (VideoReadError, ValueError, FileNotFoundError):
        outcomes["error"] += 1
    except Exception as err:  # the fuzz target: anything else is a finding
        unexpected.append(f"case {case}: {type(err).__name__}: {str(err)[:200]}")
    faulthandler.cancel_dump_traceback_later()
print(json.dumps({"outcomes": outcomes, "unexpected": unexpected}))
"""


def _fuzz(kind: str, source: Path, workdir: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, kind, str(source), str(workdir), str(CASES),
                             str(CASE_SECONDS)], capture_output=True, text=True, timeout=CASES * CASE_SECONDS)
    assert result.returncode == 0, f"the {kind} fuzz child died (crash or a case over {CASE_SECONDS} s):\n" \
                                   f"{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fuzzed_videos_end_in_a_clean_error_or_frames(tmp_path: Path) -> None:
    frames = torch.rand(4, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    source = write_video(tmp_path / "clip.mp4", frames, fps=8)
    report = _fuzz("video", source, tmp_path)
    assert report["unexpected"] == []
    assert sum(report["outcomes"].values()) == CASES and report["outcomes"]["error"] > 0


def test_fuzzed_safetensors_end_in_a_clean_error_or_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 3, 1))
    source = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, source)
    report = _fuzz("weights", source, tmp_path)
    assert report["unexpected"] == []
    assert sum(report["outcomes"].values()) == CASES and min(report["outcomes"].values()) > 0


@pytest.mark.parametrize("data", [b"", b"\x00" * 8, b"\xff" * 16])
def test_degenerate_weight_files_are_one_sentence(tmp_path: Path, data: bytes) -> None:
    from zoo.components.upscaler import read_safetensors

    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"w\.safetensors is not a readable safetensors file"):
        read_safetensors(path)
