"""Write `official_tiny.safetensors`: a tiny official-layout Stream-DiffVSR and what the OFFICIAL code computes with it.

The fixture lets CI check, without the official code, that the zoo reproduces the official pipeline
(github.com/jamichss/Stream-DiffVSR, `pipeline/stream_diffvsr_pipeline.py`) frame for frame. It holds

- weights: a tiny model in the official folder layout (`unet/` and `controlnet/`: diffusers
  `UNet2DConditionModel` / `ControlNetModel` with the SD x4 upscaler's block structure, 8 channels;
  `vae/`: `TemporalAutoencoderTiny` with the Hub's block counts (1, 3, 3) / (3, 3, 1), 4 channels;
  `scheduler/`: the Hub's `scheduler_config.json` values), every weight random and non-zero (ControlNet
  zero convolutions included, each TPM `alpha` its own value in (0.2, 0.8)), plus a random prompt
  embedding `(1, 77, 8)`. Weights, prompt embedding, noise and flows are rounded to float16 values
  and stored as float16 (exact: both sides run on their float32 values), LR frames as uint8 (the
  official script reads PNGs); the configs are JSON strings in the file's metadata.
- inputs per case (`<h>x<w>.` prefix): `lr` `(T, 3, h, w)` uint8, `noise` `(T, 4, h, w)`, `flows`
  `(T - 1, 2, 4h, 4w)` (pixels, x then y, `flows[t - 1]` from frame t to frame t - 1).
- what the official pipeline computed (float32), per case: `hr_raw` `(T, 3, 4h, 4w)` (the decoder
  output, unclamped: what the next frame warps; the official `[0, 1]` output is
  `(hr_raw / 2 + 0.5).clamp(0, 1)`, diffusers' postprocess), and for frames t >= 1 (index t - 1):
  `warped_prev`, the ControlNet residuals of the last DDIM step `cn_down0` (first down residual) and
  `cn_mid`, and the TPM features `tpm_feat0` (deepest encoder block, decoder order)
  and `tpm_feat3` (last block of the middle stage).

Cases: `4x12` (3 frames; neither side a multiple of 8, so the 4-level UNet sees odd sizes) and
`8x16` (2 frames; multiples of 8).

How it was produced (the official code stays outside this project):

    python tests/stream_diffvsr/official_parity/make_fixture.py --harness HARNESS

with the zoo's environment. HARNESS is a folder holding `official/` (a checkout of
jamichss/Stream-DiffVSR, commit 9d148ee97dfad0c26c4e5fa3368ab39b4feb9bc2), `venv/` (Python with
diffusers 0.31.0 and transformers 4.46.3, in which that code imports) and `run_official.py`, a
driver that loads a folder exactly as the official `inference.py` does and runs the official
`StreamDiffVSRPipeline.__call__` unmodified: `--noise` replaces the pipeline module's
`randn_tensor` by the given per-frame noise, `--flows` replaces RAFT by the given flows,
`--prompt-embeds` goes through the pipeline's own `prompt_embeds=` argument; hooks record
`warped_prev`, the ControlNet outputs, the TPM features and the decoder output per frame, and
the file is written with keys `f{t:03d}.<name>`. This script writes the folder and the inputs,
runs the driver once per case (fp32 on CPU, TF32 off, LR frames fed as uint8 PIL images like
`inference.py`), and packs its dump with the weights into the fixture.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "official_tiny.safetensors"
CASES = {"4x12": 3, "8x16": 2}

# SD x4 upscaler UNet structure (4 levels, attention in the three deeper ones, cross-attention-only
# transformers with linear projections), one layer per block and 8 channels to keep the file small.
UNET = {
    "sample_size": 16, "in_channels": 7, "out_channels": 4, "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": [True, True, True, False], "block_out_channels": [8, 8, 8, 8],
    "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4, "use_linear_projection": True,
    "num_class_embeds": None,
}
CONDITIONING_CHANNELS = (4, 4, 8)  # three entries: two stride-2 convolutions take the HR condition to LR size
VAE = {
    "_class_name": "TemporalAutoencoderTiny", "act_fn": "relu", "block_out_channels": [4, 4, 4],
    "decoder_block_out_channels": [4, 4, 4], "encoder_block_out_channels": [4, 4, 4], "force_upcast": False,
    "in_channels": 3, "latent_channels": 4, "latent_magnitude": 3, "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 1], "num_encoder_blocks": [1, 3, 3], "out_channels": 3, "scaling_factor": 1.0,
    "shift_factor": 0.0, "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
}
# The Hub's scheduler/scheduler_config.json (Jamichsu/Stream-DiffVSR).
SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear", "beta_start": 0.0001,
    "clip_sample": False, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "trailing", "trained_betas": None,
}
COMPONENTS = ("unet", "controlnet", "vae")


def half_exact(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to float16 values (kept float32), so storing it as float16 loses nothing."""
    return x.half().float()


def configs() -> dict[str, dict]:
    from zoo.stream_diffvsr.network import controlnet_config_from_unet

    controlnet = controlnet_config_from_unet(UNET, CONDITIONING_CHANNELS)
    return {"unet": {"_class_name": "UNet2DConditionModel", **UNET},
            "controlnet": {"_class_name": "ControlNetModel", **controlnet}, "vae": VAE, "scheduler": SCHEDULER}


def random_weights(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Random non-zero weights for every component, with the official parameter names."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from zoo.stream_diffvsr.network import TemporalAutoencoderTiny

    def public(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    cfg = configs()
    models = {"unet": UNet2DConditionModel(**public(cfg["unet"])),
              "controlnet": ControlNetModel(**public(cfg["controlnet"])),
              "vae": TemporalAutoencoderTiny(**public(cfg["vae"]))}
    states = {}
    for name, model in models.items():
        state = {}
        for key, value in model.state_dict().items():
            if key.endswith("alpha"):
                new = torch.rand((), generator=generator) * 0.6 + 0.2
            elif value.ndim >= 2:  # N(0, 1 / fan_in): activations stay O(1) through the random nets
                new = torch.randn(value.shape, generator=generator) / value[0].numel() ** 0.5
            elif "norm" in key and key.endswith("weight"):
                new = 1 + 0.1 * torch.randn(value.shape, generator=generator)
            else:
                new = 0.05 * torch.randn(value.shape, generator=generator)
            state[key] = half_exact(new)
        states[name] = state
    # Scale the decoder's last convolution so decoded frames span about [-1, 1] (the clamp and the
    # unclamped previous output both matter) instead of saturating.
    vae = models["vae"]
    vae.load_state_dict(states["vae"])
    with torch.no_grad():
        probe = vae.decode(torch.randn(4, 4, 8, 8, generator=generator))
    last = f"decoder.layers.{len(vae.decoder.layers) - 1}"
    factor = 0.6 / probe.std()
    states["vae"][f"{last}.weight"] = half_exact(states["vae"][f"{last}.weight"] * factor)
    states["vae"][f"{last}.bias"] = half_exact(states["vae"][f"{last}.bias"] * factor)
    return states


def case_inputs(size: str, frames: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """LR frames (a moving smooth pattern plus noise, uint8), noise, and smooth sub-pixel flows."""
    h, w = map(int, size.split("x"))
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    clip = []
    for t in range(frames):
        base = torch.stack([torch.sin((xs + 1.3 * t) / 3), torch.cos((ys - 0.7 * t) / 2.5),
                            torch.sin((xs + ys + t) / 4)]) * 0.4 + 0.5
        clip.append(base + 0.05 * torch.randn(base.shape, generator=generator))
    lr = (torch.stack(clip).clamp(0, 1) * 255).round().to(torch.uint8)
    noise = half_exact(torch.randn(frames, 4, h, w, generator=generator))
    # A few pixels of motion, varying smoothly, some vectors pointing outside the frame.
    coarse = torch.randn(frames - 1, 2, 3, 3, generator=generator) * 3
    flows = half_exact(F.interpolate(coarse, size=(4 * h, 4 * w), mode="bicubic", align_corners=True) + 0.37)
    return {"lr": lr, "noise": noise, "flows": flows}


def write_official_folder(fixture: dict[str, torch.Tensor], metadata: dict[str, str], folder: Path) -> Path:
    """The fixture's weights as an official-layout folder (float32 safetensors + config.json per component).

    `prompt_embeds.safetensors` (the zoo's precomputed empty-prompt embedding) stands in for the
    official `text_encoder/` + `tokenizer/`; the official code is given the same tensor directly.
    """
    for name in COMPONENTS:
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(metadata[f"{name}_config"])
        prefix = f"weights.{name}."
        state = {k[len(prefix):]: v.float().contiguous() for k, v in fixture.items() if k.startswith(prefix)}
        save_file(state, folder / name / "diffusion_pytorch_model.safetensors")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(metadata["scheduler_config"])
    save_file({"prompt_embeds": fixture["prompt_embeds"].float()}, folder / "prompt_embeds.safetensors")
    return folder


def read_fixture(path: Path = FIXTURE) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    # Copies in PyTorch's 64-byte aligned memory: safetensors' mapped tensors are aligned to their element size
    # only, and where they lie changes the CPU kernels' rounding (`zoo.components.upscaler.own_storage`).
    return {key: value.clone() for key, value in load_file(path).items()}, metadata


def run_official(harness: Path, folder: Path, inputs: dict[str, torch.Tensor], work: Path) -> dict[str, torch.Tensor]:
    """Run the official pipeline through the harness driver on one case; its dump, keyed `f{t:03d}.<name>`."""
    files = {}
    for key, value in (("lr", inputs["lr"].float() / 255), ("noise", inputs["noise"].float()),
                       ("flows", inputs["flows"].float())):
        files[key] = work / f"{key}.safetensors"
        save_file({key: value.contiguous()}, files[key])
    out = work / "official.safetensors"
    subprocess.run([str(harness / "venv" / "bin" / "python"), str(harness / "run_official.py"),
                    "--weights", str(folder), "--lr", str(files["lr"]), "--noise", str(files["noise"]),
                    "--flows", str(files["flows"]), "--prompt-embeds", str(folder / "prompt_embeds.safetensors"),
                    "--device", "cpu", "--input-mode", "pil", "--out", str(out)], check=True, cwd=harness)
    return load_file(out)


def expected_tensors(dump: dict[str, torch.Tensor], frames: int) -> dict[str, torch.Tensor]:
    """The official intermediates kept in the fixture, stacked over frames."""
    last = 3  # the last of the 4 DDIM steps: its ControlNet input went through every earlier step

    def stack(name: str, start: int) -> torch.Tensor:
        return torch.cat([dump[f"f{t:03d}.{name}"] for t in range(start, frames)]).float()

    if not torch.equal(stack("hr_01", 0), (stack("hr_raw", 0) / 2 + 0.5).clamp(0, 1)):
        raise RuntimeError("the official output is not the postprocessed decoder output")
    return {"hr_raw": stack("hr_raw", 0), "warped_prev": stack("warped_prev", 1),
            "cn_down0": stack(f"step{last}.cn_down.0", 1), "cn_mid": stack(f"step{last}.cn_mid", 1),
            "tpm_feat0": stack("tpm_feat.0", 1), "tpm_feat3": stack("tpm_feat.3", 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", type=Path, required=True, help="folder with official/, venv/, run_official.py")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)

    fixture: dict[str, torch.Tensor] = {}
    for name, state in random_weights(generator).items():
        fixture.update({f"weights.{name}.{k}": v.half() for k, v in state.items()})
    fixture["prompt_embeds"] = half_exact(torch.randn(1, 77, UNET["cross_attention_dim"], generator=generator)).half()
    metadata = {f"{name}_config": json.dumps(config, sort_keys=True) for name, config in configs().items()}
    metadata["cases"] = json.dumps(CASES)
    metadata["produced_by"] = ("tests/stream_diffvsr/official_parity/make_fixture.py: official StreamDiffVSRPipeline "
                               "(jamichss/Stream-DiffVSR 9d148ee, diffusers 0.31.0), fp32 on CPU")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_official_folder(fixture, metadata, Path(tmp) / "official")
        for size, frames in CASES.items():
            inputs = case_inputs(size, frames, generator)
            work = Path(tmp) / size
            work.mkdir()
            dump = run_official(args.harness, folder, inputs, work)
            for key, value in {**inputs, **expected_tensors(dump, frames)}.items():
                stored = value.half() if key in ("noise", "flows") else value
                fixture[f"{size}.{key}"] = stored.contiguous()
    save_file(fixture, args.out, metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
