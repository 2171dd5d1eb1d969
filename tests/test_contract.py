"""The contract every hub entry keeps (DESIGN rule 7): a new paper joins by registering, nothing else.

For each registered name: the tiny network builds; inference imports no training code; a whole clip
equals its stream; an exported folder loads back to the same outputs (and, with its LoRA merged as
`zoo.load` does by default, to within float rounding, with no LoRA layer left); odd sizes come back at exactly
`scale` times; malformed frames raise `ValueError`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
import zoo.hub as hub
from zoo.components.lora import lora_layer_count

REPO = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("lightning", "pytorch_lightning", "torchmetrics", "pyiqa", "timm", "kornia", "zoo.components.train")

_IMPORTS_PROBE = """
import json, sys
import torch
import zoo
from zoo.cli import zoo_main
from zoo.components.video_io import write_video

name, folder = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
frames = torch.rand(2, 3, 16, 16)
zoo.load(name, pretrained=False, variant="tiny")(frames)
torch.hub.load(sys.argv[3], name, source="local", pretrained=False, variant="tiny")
write_video(folder + "/in.mp4", frames, fps=8)
zoo_main(["upscale", folder + "/in.mp4", folder + "/out.mp4", "--model", name, "--random-weights",
          "--variant", "tiny", "--device", "cpu"])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.fixture(scope="module", params=hub.list_models())
def entry(request: pytest.FixtureRequest) -> tuple[str, zoo.VideoUpscaler]:
    torch.manual_seed(0)
    return request.param, zoo.load(request.param, pretrained=False, variant="tiny")


def _frames(count: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _out_frames(upscaler: zoo.VideoUpscaler, count: int) -> int:
    return (count - 1) * upscaler.temporal_scale + 1


@pytest.mark.parametrize("name", hub.list_models())
def test_inference_never_imports_the_training_stack(name: str, tmp_path: Path) -> None:
    # A fresh interpreter: zoo.load, torch.hub.load and `zoo upscale` on a real file.
    result = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE, name, str(tmp_path), str(REPO)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    loaded = sorted(m for m in modules if m.split(".")[0] in TRAINING_STACK or m.startswith(TRAINING_STACK[-1]))
    assert loaded == [], f"inference of {name} imported {loaded[:5]}"
    assert (tmp_path / "out.mp4").is_file()


def test_a_clip_equals_its_stream(entry) -> None:
    _, upscaler = entry
    frames = _frames(3, 16, 16)
    whole = upscaler(frames)
    streamed = torch.stack(list(upscaler.stream(frames.unbind(0))))
    assert whole.shape == (_out_frames(upscaler, 3), 3, 16 * upscaler.scale, 16 * upscaler.scale)
    assert torch.equal(whole, streamed)


# Pipelines built on diffusers' SD-family attention (`AttnProcessor2_0`), whose projections zoo.load fuses; the
# CogVideoX and Wan transformers run their own processors.
FUSED_ATTENTION = ("osdiffvsr", "stream_diffvsr")


@pytest.mark.parametrize("name", hub.list_models())

def test_export_then_load_reproduces_outputs_exactly_and_merges_lora(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    upscaler = zoo.load(name, pretrained=False, variant="tiny", merge_lora=False)
    with torch.no_grad():  # LoRA B starts at zero; random factors make the adapters change the outputs
        for key, parameter in upscaler.named_parameters():
            if "lora_B" in key:
                parameter.normal_(std=0.05)
    adapted = lora_layer_count(upscaler)
    folder = hub.export(upscaler, tmp_path / "export")
    frames = _frames(2, 16, 16)
    expected = upscaler(frames)
    assert torch.equal(zoo.load(name, weights=folder, merge_lora=False)(frames), expected)

    merged = zoo.load(name, weights=folder)  # zoo.load merges by default
    assert lora_layer_count(merged) == 0
    # Merged vs unmerged float32 outputs in [0, 1]: measured max 6.1e-6 (osdenhancer), 3.0e-6 (osdiffvsr),
    # 2.8e-6 (pssr), exactly 0 without LoRA (stream_diffvsr); the rounding of W + (alpha / r) B A.
    torch.testing.assert_close(merged(frames), expected, rtol=0, atol=5e-5)
    assert merged.projections_fused == (name in FUSED_ATTENTION)
    if adapted or merged.projections_fused:
        with pytest.raises(ValueError, match="prepared for inference"):
            hub.export(merged, tmp_path / "again")


def test_odd_sizes_come_back_at_exactly_the_scale(entry) -> None:
    _, upscaler = entry
    out = upscaler(_frames(2, 37, 53))
    assert out.shape == (_out_frames(upscaler, 2), 3, 37 * upscaler.scale, 53 * upscaler.scale)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(("frames", "message"), [
    (torch.rand(3, 16, 16), r"\(T, 3, H, W\)"),
    (torch.rand(2, 4, 16, 16), r"\(T, 3, H, W\)"),
    (torch.full((2, 3, 16, 16), 2.0), r"in \[0, 1\]"),
    (torch.full((2, 3, 16, 16), float("nan")), r"in \[0, 1\]"),
])
def test_malformed_frames_raise_value_error(entry, frames: torch.Tensor, message: str) -> None:
    _, upscaler = entry
    with pytest.raises(ValueError, match=message):
        upscaler(frames)
    if frames.ndim == 4:
        with pytest.raises(ValueError, match=message):
            list(upscaler.stream(frames.unbind(0)))


def test_unknown_options_are_refused_by_name(entry) -> None:
    name, upscaler = entry
    with pytest.raises(ValueError, match=rf"{name} takes no option\(s\) colour"):
        upscaler.configure(colour="red")
    with pytest.raises(ValueError, match="takes no option"):
        zoo.load(name, pretrained=False, variant="tiny", colour="red")


# Each model's networks one by one (the default scope); Stream-DiffVSR's whole step, whose graph takes the
# previous output back as an input; OS-DiffVSR's window step, which takes its frames' RAFT encodings (a mirrored
# neighbour's as well as distinct ones, with no graph for each).
@pytest.mark.slow  # dynamo traces each tiny pipeline: 7-30 s per model and scope on one busy core
@pytest.mark.parametrize(("name", "scope"), [*((name, "networks") for name in hub.list_models()),
                                             ("stream_diffvsr", "step"), ("osdiffvsr", "step")])
def test_compile_matches_eager_without_recompiling_per_frame(name: str, scope: str) -> None:
    torch.manual_seed(0)
    upscaler = zoo.load(name, pretrained=False, variant="tiny")
    frames = _frames(3, 16, 16)
    eager = upscaler(frames)
    graphs = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)  # one call per graph dynamo compiles (each graph break or recompile adds one)
        return graph.forward

    upscaler.configure(compile={"backend": backend, "scope": scope})
    upscaler(frames[:2])
    compiled_once = len(graphs)
    compiled = upscaler(frames)  # more frames (and windows, chunks) of the same size: no new graph
    assert compiled_once > 0 and len(graphs) == compiled_once
    assert set(upscaler.compile_seconds) == set(upscaler._compiled) and all(
        s > 0 for s in upscaler.compile_seconds.values())
    # Measured max differences: 0 (osdenhancer, pssr), 1.5e-7 (stream_diffvsr) and 3.8e-6 (osdiffvsr): the
    # channels-last networks' convolutions (VAE, UNet, ControlNet) sum in another order.
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        upscaler.configure(compile="yes")
