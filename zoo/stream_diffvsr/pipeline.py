"""Stream-DiffVSR inference: a strictly causal x4 upscaler that streams frame by frame.

`StreamSession.push(lr)` upscales one frame from the current LR frame, the previous LR frame and
the previous HR output only; nothing else about the past is kept, so memory is constant in the
video's length and each output is available after its own input frame.

Per frame t (the official pipeline's order):
1. flow from LR_t to LR_{t-1} by RAFT, upsampled to HR (`resize_flow`), computed online;
2. warp the previous HR output onto frame t (frame 0 has no previous output and runs without ARTG);
3. 4-step DDIM from fresh noise with the UNet on [z_t, LR_t] and ControlNet residuals from the
   warped previous output (ARTG);
4. temporal-aware decoding with TPM features of the warped previous output.

Weights load from the official Hub layout (`unet/`, `controlnet/`, `vae/`, `scheduler/`, each a
`config.json` / `scheduler_config.json` with `diffusion_pytorch_model.safetensors`), which is also
what `save_pretrained` writes, plus the empty-prompt embedding and the zoo's streaming settings.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from zoo.components.flow import FlowEstimator, resize_flow, warp
from zoo.components.upscaler import VideoUpscaler, check_frame
from zoo.stream_diffvsr.network import DDIMConfig, StreamDiffVSRConfig, StreamDiffVSRNet, TinyAutoencoderConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PROMPT_EMBEDS = "prompt_embeds.safetensors"
FLOW_WEIGHTS = "flow/model.safetensors"
# Streaming settings that the official folders do not carry; they default to `full()`'s values.
ZOO_SETTINGS = ("num_inference_steps", "noise_level", "flow_variant", "flow_pretrained", "flow_updates", "seed")


class StreamSession:
    """One causal stream: `push(lr_frame) -> hr_frame`, holding only the previous LR/HR pair.

    Args:
        upscaler: the upscaler whose networks run.
    """

    def __init__(self, upscaler: StreamDiffVSRUpscaler) -> None:
        self.upscaler = upscaler
        self.prev_lr: Tensor | None = None
        self.prev_hr: Tensor | None = None
        self.generator = torch.Generator(upscaler.device).manual_seed(upscaler.config.seed)

    @torch.no_grad()
    def push(self, lr_frame: Tensor) -> Tensor:
        """Upscale the next frame `(3, H, W)` in `[0, 1]`; returns `(3, 4H, 4W)` in `[0, 1]`."""
        check_frame(lr_frame)
        up = self.upscaler
        height, width = lr_frame.shape[-2:]
        if self.prev_lr is not None and self.prev_lr.shape[-2:] != up.padded_size(height, width):
            raise ValueError(f"every frame of a stream must have one size; got {height}x{width} after "
                             f"frames of another size")
        lr = up.pad(lr_frame[None].to(up.device, torch.float32))
        net = up.net
        noise = torch.randn((1, net.config.vae.latent_channels, *lr.shape[-2:]), generator=self.generator,
                            device=up.device, dtype=torch.float32).to(up.dtype)
        warped_prev = None
        if self.prev_hr is not None:
            warped_prev = up.warp_previous(self.prev_hr, self.prev_lr, lr)
        hr = net.upscale_frame((lr * 2 - 1).to(up.dtype), noise, warped_prev)
        # The next frame is guided by the raw decoder output, as in the official pipeline.
        self.prev_lr, self.prev_hr = lr, hr
        out = (hr.float() / 2 + 0.5).clamp(0, 1)
        return out[0, :, : up.scale * height, : up.scale * width]


class StreamDiffVSRUpscaler(VideoUpscaler):
    """Stream-DiffVSR (x4): causal, one previous frame of state, 4-step DDIM with ARTG and TPM.

    Args:
        config: the network config (`StreamDiffVSRConfig.tiny()` / `.full()` or loaded).
    """

    hub_name = "stream_diffvsr"
    config_class = StreamDiffVSRConfig
    scale = 4

    def __init__(self, config: StreamDiffVSRConfig) -> None:
        super().__init__(config)
        self.net = StreamDiffVSRNet(config)
        self.flow = FlowEstimator(config.flow_variant, pretrained=config.flow_pretrained,
                                  num_flow_updates=config.flow_updates)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.net.size_multiple
        return -(-height // m) * m, -(-width // m) * m

    def pad(self, lr: Tensor) -> Tensor:
        """Pad LR `(N, 3, H, W)` by edge replication to the UNet's size multiple (cropped after)."""
        height, width = lr.shape[-2:]
        ph, pw = self.padded_size(height, width)
        return F.pad(lr, (0, pw - width, 0, ph - height), mode="replicate")

    def warp_previous(self, prev_hr: Tensor, prev_lr: Tensor, lr: Tensor) -> Tensor:
        """The previous HR output warped onto the current frame.

        The flow from the current LR frame to the previous one (RAFT on LR, upsampled with its
        vectors rescaled) samples the previous output at p + flow(p), with zeros outside the frame
        as in the official warp.
        """
        flow = self.flow(lr, prev_lr)
        flow = resize_flow(flow, prev_hr.shape[-2:])
        return warp(prev_hr, flow.to(prev_hr.dtype), padding_mode="zeros")

    def session(self) -> StreamSession:
        """A new causal stream."""
        return StreamSession(self)

    def stream(self, frames: Iterable[Tensor]) -> Iterator[Tensor]:
        """Upscale frames `(3, H, W)` in `[0, 1]` one at a time; yields `(3, 4H, 4W)` in `[0, 1]`."""
        session = self.session()
        for frame in frames:
            yield session.push(frame)

    # Hub folders (official layout) --------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the official layout (`unet/`, `controlnet/`, `vae/`, `scheduler/`) plus the zoo's extras.

        Extras: `prompt_embeds.safetensors` (the empty-prompt embedding), `config.json` (streaming
        settings) and, for a random RAFT, `flow/model.safetensors`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("unet", "controlnet"):
            module = getattr(self.net, name)
            _write_component(folder / name, {"_class_name": type(module).__name__, **_plain(module.config)},
                             module.state_dict())
        vae = {"_class_name": "TemporalAutoencoderTiny", **dataclasses.asdict(self.config.vae),
               "block_out_channels": list(self.config.vae.decoder_block_out_channels)}
        _write_component(folder / "vae", vae, self.net.vae.state_dict())
        (folder / "scheduler").mkdir(exist_ok=True)
        scheduler = {"_class_name": "DDIMScheduler", **dataclasses.asdict(self.config.scheduler)}
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        save_file({"prompt_embeds": self.net.prompt_embeds.detach().float().cpu().contiguous()},
                  folder / PROMPT_EMBEDS)
        settings = {key: getattr(self.config, key) for key in ZOO_SETTINGS}
        (folder / "config.json").write_text(json.dumps({"hub_name": self.hub_name, **settings}, indent=2) + "\n")
        if not self.config.flow_pretrained:
            (folder / "flow").mkdir(exist_ok=True)
            save_file(_contiguous(self.flow.state_dict()), folder / FLOW_WEIGHTS)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> StreamDiffVSRUpscaler:
        """Build from an official or exported folder; every component loads with `strict=True`.

        The empty-prompt embedding comes from `prompt_embeds.safetensors`, or is computed with
        the folder's `text_encoder/` and `tokenizer/` (the official repository's) when absent.
        """
        folder = Path(folder)
        for rel in ("unet/config.json", "controlnet/config.json", "vae/config.json",
                    "scheduler/scheduler_config.json"):
            if not (folder / rel).is_file():
                raise FileNotFoundError(f"{folder} is not a {cls.hub_name} weights folder: {rel} is missing")
        settings: dict[str, Any] = {}
        if (folder / "config.json").is_file():
            meta = json.loads((folder / "config.json").read_text())
            if meta.get("hub_name") != cls.hub_name:
                raise ValueError(f"{folder} holds weights for {meta.get('hub_name')!r}, not {cls.hub_name!r}")
            settings = {key: meta[key] for key in ZOO_SETTINGS if key in meta}
        unet = _read_json(folder / "unet" / "config.json")
        controlnet = _read_json(folder / "controlnet" / "config.json")
        vae = _read_json(folder / "vae" / "config.json")
        vae_fields = {f.name for f in dataclasses.fields(TinyAutoencoderConfig)}
        vae_config = TinyAutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in vae.items() if k in vae_fields})
        # Keys absent from the file take diffusers' DDIMScheduler defaults, as the official loader does.
        scheduler = dict(DDIMScheduler.from_config(_read_json(folder / "scheduler" / "scheduler_config.json")).config)
        if scheduler["thresholding"] or scheduler["rescale_betas_zero_snr"] or scheduler["trained_betas"] is not None:
            raise ValueError(f"{folder}/scheduler uses DDIM options this sampler does not implement "
                             f"(thresholding, rescale_betas_zero_snr, trained_betas)")
        scheduler_fields = {f.name for f in dataclasses.fields(DDIMConfig)}
        scheduler_config = DDIMConfig(**{k: v for k, v in scheduler.items() if k in scheduler_fields})
        prompt = cls._read_prompt_embeds(folder)
        config = StreamDiffVSRConfig(
            unet=_known_keys(UNet2DConditionModel, unet), controlnet=_known_keys(ControlNetModel, controlnet),
            vae=vae_config, scheduler=scheduler_config, prompt_length=prompt.shape[1], **settings,
        )
        model = cls(config)
        model.net.unet.load_state_dict(load_file(folder / "unet" / DIFFUSERS_WEIGHTS), strict=True)
        model.net.controlnet.load_state_dict(load_file(folder / "controlnet" / DIFFUSERS_WEIGHTS), strict=True)
        model.net.vae.load_state_dict(load_file(folder / "vae" / DIFFUSERS_WEIGHTS), strict=True)
        model.net.prompt_embeds.copy_(prompt)
        if not config.flow_pretrained:
            model.flow.load_state_dict(load_file(folder / FLOW_WEIGHTS), strict=True)
        return model

    @staticmethod
    def _read_prompt_embeds(folder: Path) -> Tensor:
        if (folder / PROMPT_EMBEDS).is_file():
            return load_file(folder / PROMPT_EMBEDS)["prompt_embeds"]
        if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
            return empty_prompt_embeds(folder / "text_encoder", folder / "tokenizer")
        raise FileNotFoundError(
            f"{folder} has neither {PROMPT_EMBEDS} nor text_encoder/ + tokenizer/ to compute the empty-prompt "
            f"embedding; download those folders of the official repository too"
        )


@torch.no_grad()
def empty_prompt_embeds(text_encoder: Path, tokenizer: Path) -> Tensor:
    """The CLIP text embedding `(1, 77, D)` of the empty prompt, as the official pipeline computes it.

    Args:
        text_encoder: folder of a `transformers.CLIPTextModel`.
        tokenizer: folder of a `transformers.CLIPTokenizer`.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer)
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    model = CLIPTextModel.from_pretrained(text_encoder).eval()
    return model(ids)[0].float()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _plain(config: Any) -> dict[str, Any]:
    """A diffusers config as JSON-able data without its private (`_`) keys."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def _known_keys(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """`config` without private keys and keys that `cls` (this diffusers version) does not take."""
    accepted = set(cls.extract_init_dict(config)[0]) if config else set()
    return {k: v for k, v in config.items() if not k.startswith("_") and k in accepted}


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _write_component(folder: Path, config: dict[str, Any], state: dict[str, Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(_contiguous(state), folder / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
