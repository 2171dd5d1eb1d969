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
`config.json` / `scheduler_config.json` with `diffusion_pytorch_model.safetensors`, read and written
by diffusers), which is also what `save_pretrained` writes, plus the empty-prompt embedding and the
zoo's streaming settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from torch import Tensor

from zoo.components.flow import FlowEstimator, resize_flow, warp
from zoo.components.prompts import encode_prompt
from zoo.components.tiling import pad_to_multiple
from zoo.components.upscaler import (
    MemoryModel,
    VideoUpscaler,
    check_frame,
    cpu_state,
    from_pretrained_strict,
    load_strict,
    read_safetensors,
)
from zoo.stream_diffvsr.network import StreamDiffVSRConfig, StreamDiffVSRNet, TemporalAutoencoderTiny

PROMPT_EMBEDS = "prompt_embeds.safetensors"
FLOW_WEIGHTS = "flow/model.safetensors"
# Streaming settings that the official folders do not carry; they default to `full()`'s values.
# Peak RSS of the full networks streamed on CPU at LR 32x32, 64x64 and 96x96 (2 frames, fp32, one
# thread): 4.01, 4.18, 4.29 GB (`zoo bench upscalers.memory_model --arg name=stream_diffvsr`);
# least-squares slope 32.7 kB per LR pixel.
MEMORY = MemoryModel(frame=32.7e3, measured="CPU peak RSS, full networks, LR 32-96 px, fp32")
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
        lr, padding = pad_to_multiple(lr_frame[None].to(up.device, torch.float32), up.size_multiple)
        if self.prev_lr is not None and self.prev_lr.shape != lr.shape:
            raise ValueError(f"every frame of a stream must have one size; got {tuple(lr_frame.shape[-2:])} after "
                             f"frames of another size")
        net = up.net
        noise = torch.randn((1, net.vae.config.latent_channels, *lr.shape[-2:]), generator=self.generator,
                            device=up.device, dtype=torch.float32).to(up.dtype)
        warped_prev = None
        if self.prev_hr is not None:
            warped_prev = up.warp_previous(self.prev_hr, self.prev_lr, lr)
        hr = net.upscale_frame((lr * 2 - 1).to(up.dtype), noise, warped_prev)
        # The next frame is guided by the raw decoder output, as in the official pipeline.
        self.prev_lr, self.prev_hr = lr, hr
        out = (hr.float() / 2 + 0.5).clamp(0, 1)
        return up.fix_colors(padding.crop(out, up.scale), lr_frame[None].to(up.device))[0]


class StreamDiffVSRUpscaler(VideoUpscaler):
    """Stream-DiffVSR (x4): causal, one previous frame of state, 4-step DDIM with ARTG and TPM.

    Args:
        config: the network config (`StreamDiffVSRConfig.tiny()` / `.full()` or loaded).
        net: existing networks to run (shared, not copied); built from `config` when None.
        flow: an existing flow estimator (shared); built from `config` when None.
    """

    hub_name = "stream_diffvsr"
    config_class = StreamDiffVSRConfig
    # The official pipeline applies no colour fix (its output is the decoder's, clamped).
    options: ClassVar[dict[str, Any]] = {"color_fix": "none"}
    scales = (4,)
    memory = MEMORY

    def __init__(self, config: StreamDiffVSRConfig, net: StreamDiffVSRNet | None = None,
                 flow: FlowEstimator | None = None) -> None:
        super().__init__(config)
        self.net = StreamDiffVSRNet(config) if net is None else net
        self.scale = self.net.scale
        self.flow = flow if flow is not None else FlowEstimator(
            config.flow_variant, pretrained=config.flow_pretrained, num_flow_updates=config.flow_updates)

    @property
    def size_multiple(self) -> int:
        """LR frames are padded (edge replication) to multiples of this: the UNet's downsampling factor."""
        return 2 ** (len(self.config.unet["block_out_channels"]) - 1)

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
        for name in ("unet", "controlnet", "vae"):
            getattr(self.net, name).save_pretrained(folder / name)
        self.net.scheduler.save_pretrained(folder / "scheduler")
        save_file({"prompt_embeds": self.net.prompt_embeds.detach().float().cpu().contiguous()},
                  folder / PROMPT_EMBEDS)
        self.write_config(folder, {key: getattr(self.config, key) for key in ZOO_SETTINGS})
        if not self.config.flow_pretrained:
            (folder / "flow").mkdir(exist_ok=True)
            save_file(cpu_state(self.flow.state_dict()), folder / FLOW_WEIGHTS)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> StreamDiffVSRUpscaler:
        """Build from an official or exported folder; every component must match its weights exactly.

        The empty-prompt embedding comes from `prompt_embeds.safetensors`, or is computed with
        the folder's `text_encoder/` and `tokenizer/` (the official repository's) when absent.
        """
        folder = Path(folder)
        settings: dict[str, Any] = cls.read_config_data(folder, required=False) or {}
        unknown = sorted(set(settings) - set(ZOO_SETTINGS))
        if unknown:
            raise ValueError(f"{folder}/config.json has unknown setting(s) {', '.join(unknown)}")
        unet = from_pretrained_strict(UNet2DConditionModel, folder, "unet")
        controlnet = from_pretrained_strict(ControlNetModel, folder, "controlnet")
        vae = from_pretrained_strict(TemporalAutoencoderTiny, folder, "vae")
        if not (folder / "scheduler" / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a complete weights folder: scheduler/scheduler_config.json "
                                    f"is missing")
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        prompt = cls._read_prompt_embeds(folder)
        config = StreamDiffVSRConfig(
            unet=_public(unet.config), controlnet=_public(controlnet.config), vae=_public(vae.config),
            scheduler=_public(scheduler.config), prompt_length=prompt.shape[1], **settings,
        )
        net = StreamDiffVSRNet.from_components(config, unet, controlnet, vae, prompt)
        model = cls(config, net=net)
        if not config.flow_pretrained:
            load_strict(model.flow, folder / FLOW_WEIGHTS)
        return model

    @staticmethod
    def _read_prompt_embeds(folder: Path) -> Tensor:
        if (folder / PROMPT_EMBEDS).is_file():
            return read_safetensors(folder / PROMPT_EMBEDS)["prompt_embeds"]
        if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
            return encode_prompt(folder, [""])
        raise FileNotFoundError(
            f"{folder} has neither {PROMPT_EMBEDS} nor text_encoder/ + tokenizer/ to compute the empty-prompt "
            f"embedding; download those folders of the official repository too"
        )


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON-able data without its private (`_`) keys."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}
