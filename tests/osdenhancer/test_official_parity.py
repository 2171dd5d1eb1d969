"""Official parity: a tiny checkpoint written with the OFFICIAL classes, its output from the OFFICIAL pipeline.

`fixtures/official_parity.safetensors` was made by `fixtures/make_official_parity.py` (its docstring says
how): int8-coded random non-zero weights of every official parameter (TR and SE `lora_B`, `project_out`, the
deformable offsets included), a 6-frame 8x10 clip, the posterior noise the official encoder drew after
`torch.manual_seed(0)`, and the official output at x2.5 / x2 in chunks of 9 overlapping by 2. The test
rebuilds the official folder (sharded transformer in peft's layout, configs verbatim) and loads it with the
zoo's strict loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zoo
from zoo.osdenhancer.pipeline import OSDEnhancerUpscaler

FIXTURE = Path(__file__).parent / "fixtures" / "official_parity.safetensors"
TOLERANCE = 1e-4  # float32; the measured difference is 0 (bit-exact), see the closing notes


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(FIXTURE, "pt") as file:
        metadata = file.metadata()
    return load_file(FIXTURE), metadata


def write_official_folder(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """The official checkpoint layout, float32 weights decoded from the fixture's int8 codes."""
    exponents = json.loads(metadata["exponents"])
    weights = {key: tensors[key].float() * 2.0 ** -exponent for key, exponent in exponents.items()}
    for name, text in json.loads(metadata["configs"]).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    transformer = {k.removeprefix("transformer/"): v for k, v in weights.items() if k.startswith("transformer/")}
    keys = sorted(transformer)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, shard in shards.items():
        save_file({k: transformer[k] for k in shard}, folder / "transformer" / file)
    index = {"metadata": {}, "weight_map": {k: file for file, shard in shards.items() for k in shard}}
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k.removeprefix("vae/"): v for k, v in weights.items() if k.startswith("vae/")},
              folder / "vae" / "diffusion_pytorch_model.safetensors")
    (folder / "prompt_embeddings").mkdir()
    save_file({"prompt_embedding": weights["prompt_embedding"]}, folder / "prompt_embeddings" / "empty.safetensors")
    return folder


def test_the_generator_reproduces_the_official_global_rng_draws(fixture) -> None:
    tensors, metadata = fixture
    run = json.loads(metadata["run"])
    # Per chunk the official encoder samples the video latents, then the residual latents.
    generator = torch.Generator().manual_seed(run["seed"])
    for chunk in range(2):
        for kind in ("video", "residual"):
            recorded = tensors[f"noise/{chunk}/{kind}"]
            assert torch.equal(torch.randn(recorded.shape, generator=generator), recorded)


def test_official_checkpoint_loads_strictly_and_matches_the_official_pipeline(fixture, tmp_path: Path) -> None:
    tensors, metadata = fixture
    run = json.loads(metadata["run"])
    folder = write_official_folder(tmp_path, tensors, metadata)
    upscaler = zoo.load("osdenhancer", weights=folder, scale=run["scale"], temporal_scale=run["temporal_scale"],
                        chunk=run["chunk"], chunk_overlap=run["chunk_overlap"], overlap="drop")
    assert upscaler.config.se_rank == 0  # official TE_lora: loaded by the official code, never used
    output = upscaler(tensors["input"], generator=torch.Generator().manual_seed(run["seed"]))
    expected = tensors["output"]
    assert output.shape == expected.shape == (11, 3, 20, 25)
    assert (output - expected).abs().max().item() <= TOLERANCE


def test_applying_the_official_se_adapter_would_break_parity(fixture, tmp_path: Path) -> None:
    # The same files read as a zoo export (root config.json): TE_lora is applied once, which is NOT the
    # official function. The fixture's TE_lora weights are non-zero, so the parity test above would catch a
    # loader that applied them.
    tensors, metadata = fixture
    run = json.loads(metadata["run"])
    folder = write_official_folder(tmp_path, tensors, metadata)
    (folder / "config.json").write_text(json.dumps({"hub_name": "osdenhancer", "config": {}}))
    upscaler = OSDEnhancerUpscaler.from_pretrained(folder).configure(
        scale=run["scale"], temporal_scale=run["temporal_scale"], chunk=run["chunk"],
        chunk_overlap=run["chunk_overlap"], overlap="drop")
    assert upscaler.config.se_rank == 128
    output = upscaler(tensors["input"], generator=torch.Generator().manual_seed(run["seed"]))
    assert (output - tensors["output"]).abs().max().item() > 1e-2
