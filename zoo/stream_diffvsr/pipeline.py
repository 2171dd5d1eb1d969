"""Stream-DiffVSR inference: a strictly causal x4 upscaler that streams frame by frame.

`StreamSession.push(lr)` upscales one frame from the current LR frame, the previous LR frame (as
RAFT encoded it) and the previous HR output only; nothing else about the past is kept, so memory is
constant in the video's length and each output is available after its own input frame.

Per frame t, as the official pipeline (jamichss/Stream-DiffVSR) computes it:
1. LR_t is padded (edge replication) to a multiple of the autoencoder's factor 4 only when it is not
   one already, and mapped to [-1, 1];
2. the flow from frame t to frame t-1: RAFT on LR_t and LR_{t-1} upsampled x4 bicubically (in
   [-1, 1], unclamped), at HR (`flow_resolution="hr"`, the default); or RAFT on the LR frames with
   the flow resized x4 (`flow_resolution="lr"`, 16x fewer flow pixels). RAFT encodes each frame once
   (`flow_input`), as the source of its own flow and, kept by the session, the destination of the next;
3. the previous raw (unclamped) HR output is warped onto frame t with the checkpoints' sampling
   grid (`stream_warp`); frame 0 has no previous output and runs without ARTG and TPM;
4. 4-step DDIM from fresh noise (drawn from the stream's generator, seeded with `config.seed`) with
   the UNet on [z_t, LR_t] and ControlNet residuals from the warped previous output (ARTG);
5. temporal-aware decoding with TPM features of the warped previous output; the output is
   clamped to [0, 1] and cropped back to exactly 4x the input.

Weights load from the official Hub layout (`unet/`, `controlnet/`, `vae/`, `scheduler/`, each a
`config.json` / `scheduler_config.json` with `diffusion_pytorch_model.safetensors`, read and written
by diffusers), which is also what `save_pretrained` writes, plus the empty-prompt embedding and the
zoo's streaming settings. A folder without the zoo's `config.json` (the untouched official one)
takes the official settings: the scheduler from `scheduler/`, RAFT-large with torchvision's published
weights and 12 updates, and the empty-prompt embedding from `text_encoder/` + `tokenizer/`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from torch import Tensor

from zoo.components.flow import FlowEstimator, FlowFeatures, FlowFn, published_raft_weights, resize_flow
from zoo.components.memo import StepMemo, memoise_denoiser
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
from zoo.stream_diffvsr.network import StreamDiffVSRConfig, StreamDiffVSRNet, TemporalAutoencoderTiny, stream_warp

PROMPT_EMBEDS = "prompt_embeds.safetensors"
FLOW_WEIGHTS = "flow/model.safetensors"
# Streaming settings that the official folders do not carry; they default to `full()`'s values.
# Peak RSS of the full networks streamed on CPU at LR 32x32, 64x64 and 96x96 (2 frames, fp32, one
# thread): 4.01, 4.18, 4.29 GB (`zoo bench upscalers.memory_model --arg name=stream_diffvsr`);
# least-squares slope 32.7 kB per LR pixel.
MEMORY = MemoryModel(frame=32.7e3, measured="CPU peak RSS, full networks, LR 32-96 px, fp32")
ZOO_SETTINGS = ("num_inference_steps", "noise_level", "flow_variant", "flow_pretrained", "flow_updates", "seed")
FLOW_RESOLUTIONS = ("hr", "lr")


def flow_image(lr: Tensor, scale: int, resolution: str = "hr") -> Tensor:
    """LR frames `(N, 3, h, w)` in `[-1, 1]` as RAFT sees them for the flow at `resolution` (`flow_to_previous`).

    `"hr"`: upsampled `scale`x bicubically (`align_corners=False`, unclamped), as the official pipeline computes
    the flow the checkpoints were trained with; `"lr"`: the LR frames as they are.
    """
    if resolution == "hr":
        # Official pipeline: bicubic x4 of the [-1, 1] LR frame, then of_model(current, previous). Its
        # frames are channels-last (views of diffusers' HWC numpy arrays), and RAFT's convolutions round as
        # the official ones only in that memory format (1e-5 px apart in the other). The zoo's RAFT update
        # (`FlowEstimator.update`) rounds its GRU differently again: measured 1.0e-5 px from the official flow.
        return F.interpolate(lr.contiguous(memory_format=torch.channels_last), scale_factor=scale, mode="bicubic")
    if resolution == "lr":
        return lr
    raise ValueError(f"flow_resolution must be one of {', '.join(FLOW_RESOLUTIONS)}, got {resolution!r}")


def flow_in_hr_pixels(flow: Tensor, size: tuple[int, int], resolution: str = "hr") -> Tensor:
    """A flow computed at `resolution` (`flow_image`) as a flow of HR pixels of `size`: resized with its vectors
    (`resize_flow`) from `"lr"`, as it is from `"hr"`."""
    return resize_flow(flow, size) if resolution == "lr" else flow


def flow_to_previous(flow: FlowFn, lr: Tensor, prev_lr: Tensor, scale: int, resolution: str = "hr") -> Tensor:
    """Flow `(N, 2, scale * h, scale * w)` in HR pixels from the current frame to the previous one.

    Args:
        flow: a flow estimator taking images in `[-1, 1]` (`FlowEstimator(..., signed_inputs=True)`).
        lr: the current LR frames `(N, 3, h, w)` in `[-1, 1]`.
        prev_lr: the previous LR frames, same shape.
        scale: the HR / LR size ratio.
        resolution: where RAFT runs (`flow_image`): `"hr"`, on both frames upsampled `scale`x, or `"lr"`, on
            the LR frames with the flow resized `scale`x.
    """
    current, previous = flow_image(torch.cat([lr, prev_lr]), scale, resolution).chunk(2)
    return flow_in_hr_pixels(flow(current, previous), (lr.shape[-2] * scale, lr.shape[-1] * scale), resolution)


class StreamSession:
    """One causal stream: `push(lr_frame) -> hr_frame`, holding only the previous frame, RAFT-encoded, and its output.

    The initial noise of every frame is one `(1, 4, h, w)` float32 draw from `generator`, a generator
    of its own seeded with `config.seed`, in frame order. The official `inference.py` draws the same
    shapes in the same order from the global RNG after `set_seed(42)`, so with seed 42 a CPU session
    reproduces its noise. On CUDA, its `enable_xformers_memory_efficient_attention()` first draws
    552 `randn((1, 2, 40))` (the attention sanity check, 3 draws per visit of each of the 46
    attention modules of the SD x4 UNet + ControlNet, each visited 4 times); make the same draws from
    `session.generator` before the first `push` to reproduce the noise of its first clip.

    Args:
        upscaler: the upscaler whose networks run.

    Attributes:
        prev_flow: the previous frame as the flow sees it (`StreamDiffVSRUpscaler.flow_input`): RAFT's
            feature map of it (`FlowFeatures.destination`), made when it was the current frame, or its image.
        prev_hr: the previous raw decoder output `(1, 3, 4h, 4w)`, unclamped (it guides the next frame).
        generator: the source of the initial noise.
        memo: the UNet's and ControlNet's per-step constants of this stream (`StepMemo`), used by eager runs.
    """

    def __init__(self, upscaler: StreamDiffVSRUpscaler) -> None:
        self.upscaler = upscaler
        self.prev_flow: Tensor | FlowFeatures | None = None
        self.prev_hr: Tensor | None = None
        self.generator = torch.Generator(upscaler.device).manual_seed(upscaler.config.seed)
        self.memo = StepMemo()
        memoise_denoiser(self.memo, upscaler.net.unet)
        memoise_denoiser(self.memo, upscaler.net.controlnet)

    @torch.no_grad()
    def push(self, lr_frame: Tensor) -> Tensor:
        """Upscale the next frame `(3, H, W)` in `[0, 1]`; returns `(3, 4H, 4W)` in `[0, 1]`."""
        check_frame(lr_frame, values=self.prev_hr is None)  # values once per stream: reading them is a host sync
        up = self.upscaler
        frame, padding = pad_to_multiple(lr_frame[None].to(up.device, torch.float32), up.size_multiple)
        lr = frame * 2 - 1
        if self.prev_hr is not None and self.prev_hr.shape[-2:] != (lr.shape[-2] * up.scale, lr.shape[-1] * up.scale):
            raise ValueError(f"every frame of a stream must have one size; got {tuple(lr_frame.shape[-2:])} after "
                             f"frames of another size")
        noise = torch.randn((1, up.net.vae.config.latent_channels, *lr.shape[-2:]), generator=self.generator,
                            device=up.device, dtype=torch.float32)  # the sampler keeps z_t in float32
        step = up.compiled("frame", up.frame_step)
        if step == up.frame_step:  # eager: the sampler's per-step constants come from this stream's memo
            with self.memo.installed():
                hr, flow_input = step(lr, noise, self.prev_flow, self.prev_hr, self.memo)
        else:
            hr, flow_input = step(lr, noise, self.prev_flow, self.prev_hr)
        # The next frame is guided by the raw decoder output, as in the official pipeline, and its flow ends at
        # this frame's encodings.
        self.prev_flow, self.prev_hr = flow_input, hr
        out = (hr.float() / 2 + 0.5).clamp(0, 1)
        return up.fix_colors(padding.crop(out, up.scale), lr_frame[None].to(up.device))[0]


class StreamDiffVSRUpscaler(VideoUpscaler):
    """Stream-DiffVSR (x4): causal, one previous frame of state, 4-step DDIM with ARTG and TPM.

    Options (`configure`): `flow_resolution`, where RAFT runs: `"hr"` (default) on the LR frames
    upsampled x4 bicubically, as the official pipeline does and the checkpoints were trained with;
    `"lr"` on the LR frames themselves with the flow resized x4 (16x fewer flow pixels, faster, a
    coarser flow). It is an option, not a config field, because it changes how frames are processed,
    not the weights: every checkpoint runs with either. `compile` compiles the UNet, ControlNet, decoder and
    RAFT's modules one by one (`compile_modules`), or with `scope="step"` each frame's whole fixed-shape
    step (`frame_step`: flow, warp, DDIM, decoding), with the autoencoder, UNet and ControlNet in
    channels-last, as on CUDA (see `VideoUpscaler.compiled`, `channels_last_modules`); the first frame,
    without a previous one, has graphs of its own. `channels_last` chooses that memory format (`VideoUpscaler`).
    Eager runs take the UNet's and ControlNet's per-step constants (time embeddings, the prompt's keys and
    values) from a memo per stream (`StepMemo`).

    Args:
        config: the network config (`StreamDiffVSRConfig.tiny()` / `.full()` or loaded).
        net: existing networks to run (shared, not copied); built from `config` when None.
        flow: an existing flow estimator on images in `[-1, 1]` (shared); built from `config` when None.
    """

    hub_name = "stream_diffvsr"
    config_class = StreamDiffVSRConfig
    # The official pipeline applies no colour fix (its output is the decoder's, clamped).
    options: ClassVar[dict[str, Any]] = {"flow_resolution": "hr", "color_fix": "none", "compile": False,
                                         "channels_last": None}
    scales = (4,)
    memory = MEMORY

    def __init__(self, config: StreamDiffVSRConfig, net: StreamDiffVSRNet | None = None,
                 flow: FlowEstimator | None = None) -> None:
        super().__init__(config)
        self.net = StreamDiffVSRNet(config) if net is None else net
        self.scale = self.net.scale
        self.flow = flow if flow is not None else flow_estimator(config, pretrained=config.flow_pretrained)

    def check_options(self) -> None:
        if self.flow_resolution not in FLOW_RESOLUTIONS:
            raise ValueError(f"flow_resolution must be one of {', '.join(FLOW_RESOLUTIONS)}, "
                             f"got {self.flow_resolution!r}")

    @property
    def size_multiple(self) -> int:
        """LR frames are padded (edge replication) to multiples of this: the autoencoder's factor (4).

        The official pipeline brings every LR frame to a multiple of its `vae_scale_factor` (4) and
        runs it at that size (the UNet handles sizes that are not multiples of its own factor, 8), so
        multiples of 4 run as they are; other sizes are padded and the output cropped back to 4x.
        """
        return self.net.vae.downscale

    def flow_input(self, lr: Tensor, *, source: bool = True) -> Tensor | FlowFeatures:
        """A frame as `warp_previous` takes it, made once per frame: it is the source of the frame's own flow and
        the destination of the next frame's.

        With a `FlowEstimator`, RAFT's encodings of the frame's `flow_image` (`FlowEstimator.features`), so each
        frame is encoded once, not once per flow; with another `FlowFn` (e.g. given flows), the image itself.

        Args:
            lr: the LR frame `(N, 3, h, w)` in `[-1, 1]`.
            source: whether a flow will start from the frame (every frame but the first of a stream); without,
                RAFT's context encoder, which only a source needs, does not run.
        """
        image = flow_image(lr, self.scale, self.flow_resolution)
        return self.flow.features(image, source=source) if isinstance(self.flow, FlowEstimator) else image

    def warp_previous(self, prev_hr: Tensor, current: Tensor | FlowFeatures,
                      previous: Tensor | FlowFeatures) -> Tensor:
        """The previous raw HR output warped onto the current frame (`stream_warp`) by the flow from the current
        frame to the previous one.

        Args:
            prev_hr: the previous decoder output `(N, 3, 4h, 4w)`, unclamped.
            current, previous: the current and the previous LR frame as `flow_input` gives them.
        """
        flow = flow_in_hr_pixels(self.flow(current, previous), prev_hr.shape[-2:], self.flow_resolution)
        return stream_warp(prev_hr, flow)

    def channels_last_modules(self) -> list[torch.nn.Module]:
        return [self.net.vae, self.net.unet, self.net.controlnet]

    def compile_modules(self) -> list[torch.nn.Module | tuple[torch.nn.Module, str]]:
        # The TPM encoder runs block by block (`TinyEncoder.block_features`, no `forward`) and stays eager.
        net = self.net
        return [net.unet, net.controlnet, net.controlnet.controlnet_cond_embedding, net.vae.decoder,
                *self.flow.compile_modules()]

    def frame_step(self, lr: Tensor, noise: Tensor, prev_flow: Tensor | FlowFeatures | None, prev_hr: Tensor | None,
                   memo: StepMemo | None = None) -> tuple[Tensor, Tensor | FlowFeatures]:
        """One frame's networks: the raw HR output `(1, 3, 4h, 4w)` of `lr` (padded, in `[-1, 1]`), and the frame
        as the next frame's flow takes it (`flow_input`, as a destination: RAFT's feature map without the context,
        so every later frame's step gets inputs of one structure and a compiled step one graph).

        Args:
            lr: the current LR frame `(1, 3, h, w)` in `[-1, 1]`, float32.
            noise: z_T `(1, 4, h, w)`, float32.
            prev_flow: the previous frame's `flow_input`, or None for the first frame.
            prev_hr: the previous raw HR output, or None for the first frame (then no ARTG and TPM).
            memo: the stream's installed `StepMemo` (eager runs), or None.
        """
        flow_input = self.flow_input(lr, source=prev_hr is not None)
        warped_prev = None if prev_hr is None else self.warp_previous(prev_hr, flow_input, prev_flow)
        if isinstance(flow_input, FlowFeatures):
            flow_input = flow_input.destination()
        return self.net.upscale_frame(lr.to(self.dtype), noise, warped_prev, memo), flow_input

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
        settings) and `flow/model.safetensors` (the RAFT weights, so the folder needs no other download).
        """
        self.check_exportable()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("unet", "controlnet", "vae"):
            getattr(self.net, name).save_pretrained(folder / name)
        self.net.scheduler.save_pretrained(folder / "scheduler")
        save_file({"prompt_embeds": self.net.prompt_embeds.detach().float().cpu().contiguous()},
                  folder / PROMPT_EMBEDS)
        self.write_config(folder, {key: getattr(self.config, key) for key in ZOO_SETTINGS})
        (folder / FLOW_WEIGHTS).parent.mkdir(exist_ok=True)
        save_file(cpu_state(self.flow.state_dict()), folder / FLOW_WEIGHTS)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> StreamDiffVSRUpscaler:
        """Build from an official or exported folder; every component must match its weights exactly.

        The empty-prompt embedding comes from `prompt_embeds.safetensors`, or is computed with
        the folder's `text_encoder/` and `tokenizer/` (the official repository's) when absent. RAFT
        comes from `flow/model.safetensors`, or, when absent and `flow_pretrained` (the official
        folder), from torchvision's published weights (downloaded once into torch's hub cache).
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
        if (folder / FLOW_WEIGHTS).is_file():
            flow = flow_estimator(config, pretrained=False)
            load_strict(flow, folder / FLOW_WEIGHTS)
        elif config.flow_pretrained:
            flow = _published_raft(config, folder)
        else:
            raise FileNotFoundError(f"{folder} is not a complete weights folder: {FLOW_WEIGHTS} is missing")
        return cls(config, net=net, flow=flow)

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


def flow_estimator(config: StreamDiffVSRConfig, *, pretrained: bool) -> FlowEstimator:
    """The RAFT of `config` (variant, updates), on images in `[-1, 1]`; torchvision's weights if `pretrained`."""
    return FlowEstimator(config.flow_variant, pretrained=pretrained, num_flow_updates=config.flow_updates,
                         signed_inputs=True)


def _published_raft(config: StreamDiffVSRConfig, folder: Path) -> FlowEstimator:
    """torchvision's RAFT weights for a folder that carries none; offline, only from torch's hub cache."""
    from huggingface_hub import constants

    url, path = published_raft_weights(config.flow_variant)
    if constants.HF_HUB_OFFLINE and not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {FLOW_WEIGHTS} and torchvision's RAFT weights {path} are missing (nothing is "
            f"downloaded with HF_HUB_OFFLINE=1); download {url} to that path, or put the RAFT weights in "
            f"{folder / FLOW_WEIGHTS} (`zoo hub export` writes them there)"
        )
    return flow_estimator(config, pretrained=True)


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON-able data without its private (`_`) keys."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}
