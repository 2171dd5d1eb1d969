"""Stream-DiffVSR networks: x4-upscaler UNet, ARTG ControlNet, temporal tiny autoencoder with TPMs.

Module layout and parameter names follow the official checkpoint (`Jamichsu/Stream-DiffVSR`)
so its `unet/`, `controlnet/` and `vae/` folders load with `strict=True`:

- `unet`: diffusers `UNet2DConditionModel` (the SD x4 upscaler UNet, 7 input channels: the 4-channel
  noisy latent concatenated with the LR frame in `[-1, 1]`), distilled to 4 DDIM steps.
- `controlnet`: diffusers `ControlNetModel` (ARTG): same 7-channel input as the UNet plus the
  flow-warped previous HR output as `controlnet_cond`; its residuals are added to the UNet.
- `vae`: `TemporalAutoencoderTiny`: a TAESD-style encoder/decoder at x4 (two stride-2 stages) whose
  blocks carry a Temporal Processor Module (`alpha`, `temporal_processor`). The decoder fuses the
  encoder's block features of the warped previous HR output into the current frame's decoding.

The sampler is diffusers' `DDIMScheduler` (eta = 0) with the checkpoint's `scheduler/` settings; inference
applies its step from scalars computed once (`ddim_constants`, `ddim_step`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ControlNetModel, DDIMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from zoo.components.memo import UNIT, StepMemo

# TPM constants of the official decoder block: 4x4 average pooling before the 1-D temporal
# convolution, and a fixed 0.1 weight on the fused temporal residual.
TPM_POOL = 4
TPM_RESIDUAL_WEIGHT = 0.1


# Configs ----------------------------------------------------------------------------------

def _sdx4_unet_config(*, class_embeds: bool = False) -> dict[str, Any]:
    """`stabilityai/stable-diffusion-x4-upscaler` unet/config.json (without the noise-level classes)."""
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [256, 512, 512, 1024],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 7,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        # The official pipeline calls the UNet and ControlNet without `class_labels` (the x4
        # upscaler's noise-level input is commented out), which diffusers only allows when the
        # class embedding is absent: the distilled checkpoint has none.
        "num_class_embeds": 1000 if class_embeds else None,
        "only_cross_attention": [True, True, True, False],
        "out_channels": 4,
        "sample_size": 128,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }


def controlnet_config_from_unet(unet: dict[str, Any], conditioning_channels: tuple[int, ...]) -> dict[str, Any]:
    """A `ControlNetModel` config mirroring the encoder half of `unet` (as `ControlNetModel.from_unet`).

    Args:
        unet: a `UNet2DConditionModel` config.
        conditioning_channels: `conditioning_embedding_out_channels`; `len - 1` stride-2 convolutions
            bring the HR condition to latent size, so x4 needs three entries.
    """
    keys = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
            "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
            "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
            "num_class_embeds")
    config = {key: unet[key] for key in keys if key in unet}
    config["conditioning_embedding_out_channels"] = list(conditioning_channels)
    config["conditioning_channels"] = 3
    return config


# `vae/config.json` of the official checkpoint: a TAESD-style autoencoder at x4 (two stride-2 stages).
TINY_AUTOENCODER_X4: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3],
    "num_decoder_blocks": [3, 3, 1],
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "force_upcast": False,
}

# `scheduler/scheduler_config.json`: the x4 upscaler's v-prediction schedule; the paper rolls the
# distilled student out at t = 999, 749, 499, 249, diffusers' "trailing" spacing for 4 steps.
SDX4_DDIM: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "clip_sample": False,
}


@dataclass
class StreamDiffVSRConfig:
    """All Stream-DiffVSR network settings.

    Args:
        unet: diffusers `UNet2DConditionModel` config (as in `unet/config.json`).
        controlnet: diffusers `ControlNetModel` config (as in `controlnet/config.json`).
        vae: `TemporalAutoencoderTiny` config (as in `vae/config.json`).
        scheduler: diffusers `DDIMScheduler` config (as in `scheduler/scheduler_config.json`).
        num_inference_steps: denoising steps per frame (4 for the distilled UNet).
        noise_level: x4-upscaler noise level passed as `class_labels`, used only when the UNet has a
            class embedding.
        prompt_length: tokens of the precomputed empty-prompt embedding (77 for CLIP).
        flow_variant: RAFT `"large"` (the official script's) or `"small"`.
        flow_pretrained: RAFT with torchvision's published weights (the official pipeline's); False
            keeps a random RAFT (tests, tiny recipe). A weights folder's `flow/model.safetensors`
            replaces either.
        flow_updates: RAFT refinement iterations.
        seed: seed of the generator of every stream's initial noise; 42 is the official
            `inference.py`'s (`set_seed(42)`).
    """

    unet: dict[str, Any]
    controlnet: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=lambda: dict(TINY_AUTOENCODER_X4))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SDX4_DDIM))
    num_inference_steps: int = 4
    noise_level: int = 20
    prompt_length: int = 77
    flow_variant: str = "large"
    flow_pretrained: bool = True
    flow_updates: int = 12
    seed: int = 42

    @classmethod
    def full(cls) -> StreamDiffVSRConfig:
        """The paper's sizes: SD x4-upscaler UNet, ControlNet copy of its encoder, 64-channel TAESD x4."""
        unet = _sdx4_unet_config()
        return cls(unet=unet, controlnet=controlnet_config_from_unet(unet, (16, 32, 96)))

    @classmethod
    def tiny(cls) -> StreamDiffVSRConfig:
        """A few channels of each part; runs on CPU in well under a second per 32x48 frame."""
        unet = {
            "act_fn": "silu",
            "attention_head_dim": 4,
            "block_out_channels": [16, 16, 32],
            "cross_attention_dim": 16,
            # Attention only at 1/4 of the LR size, so real clip sizes stay cheap on a CPU.
            "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 7,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "num_class_embeds": None,
            "only_cross_attention": [False, False, True],
            "out_channels": 4,
            "sample_size": 32,
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            "use_linear_projection": True,
        }
        return cls(
            unet=unet,
            controlnet=controlnet_config_from_unet(unet, (8, 8, 16)),
            vae={**TINY_AUTOENCODER_X4, "encoder_block_out_channels": [8, 8, 8],
                 "decoder_block_out_channels": [8, 8, 8], "num_encoder_blocks": [1, 1, 1],
                 "num_decoder_blocks": [1, 1, 1]},
            prompt_length=4,
            flow_variant="small",
            flow_pretrained=False,
            flow_updates=2,
        )


# Temporal tiny autoencoder ------------------------------------------------------------------

def _activation(name: str) -> nn.Module:
    activations = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}
    if name not in activations:
        raise ValueError(f"act_fn must be one of {', '.join(activations)}, got {name!r}")
    return activations[name]()


class TemporalTinyBlock(nn.Module):
    """TAESD residual block with a Temporal Processor Module (TPM).

    Without a temporal condition it is TAESD's block: relu(conv(x) + skip(x)). With `prev_features`
    (the encoder's block output for the flow-warped previous HR frame, same shape as conv(x)), the
    TPM adds a temporal residual before the skip:

        c = conv(x);  P = pool₄(c), Q = pool₄(prev)                        (4x4 average pooling)
        o = TP([flatten(P), flatten(Q)])                                   (1-D convs over the joined sequence)
        f = α · o[:hw] + (1 - α) · o[hw:]                                  (learned blend, α init 0.5)
        out = relu(c + 0.1 · up(f) + skip(x))                              (bilinear upsampling to c's size)

    This is the TPM of Stream-DiffVSR's temporal-aware decoder, as in the official block.
    """

    def __init__(self, channels: int, act_fn: str) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), _activation(act_fn),
            nn.Conv2d(channels, channels, 3, padding=1), _activation(act_fn),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.temporal_processor = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=1), _activation(act_fn),
            nn.Conv1d(channels, channels, 3, padding=1),
        )

    def temporal_residual(self, current: Tensor, prev_features: Tensor) -> Tensor:
        """The TPM's fused temporal feature f, upsampled to `current`'s size (see the class docstring)."""
        b, c, h, w = current.shape
        pooled = F.avg_pool2d(current, TPM_POOL, TPM_POOL)
        pooled_prev = F.avg_pool2d(prev_features, TPM_POOL, TPM_POOL)
        ph, pw = pooled.shape[-2:]
        sequence = torch.cat([pooled.flatten(2), pooled_prev.flatten(2)], dim=2)
        out = self.temporal_processor(sequence)
        fused = self.alpha * out[:, :, : ph * pw] + (1 - self.alpha) * out[:, :, -ph * pw:]
        return F.interpolate(fused.view(b, c, ph, pw), size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, x: Tensor, prev_features: Tensor | None = None) -> Tensor:
        current = self.conv(x)
        if prev_features is not None:
            # TPM fusion, Stream-DiffVSR temporal-aware decoder (Sec. "Auto-regressive Temporal-aware Decoder").
            current = current + TPM_RESIDUAL_WEIGHT * self.temporal_residual(current, prev_features)
        return self.fuse(current + self.skip(x))


class TinyEncoder(nn.Module):
    """TAESD encoder at x4: conv, blocks, then per stage a stride-2 conv and blocks; conv to latents."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = config.encoder_block_out_channels
        for i, num_blocks in enumerate(config.num_encoder_blocks):
            if i == 0:
                layers.append(nn.Conv2d(config.in_channels, channels[0], 3, padding=1))
            else:
                layers.append(nn.Conv2d(channels[i - 1], channels[i], 3, padding=1, stride=2, bias=False))
            layers += [TemporalTinyBlock(channels[i], config.act_fn) for _ in range(num_blocks)]
        layers.append(nn.Conv2d(channels[-1], config.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, image: Tensor) -> Tensor:
        """Latents of `image` in `[-1, 1]` (TAESD works on `[0, 1]`)."""
        return self.layers(image.add(1).div(2))

    def block_features(self, image: Tensor) -> list[Tensor]:
        """Outputs of every block, shallowest first, as the official pipeline computes them.

        The official code runs the encoder layers on the warped `[-1, 1]` image without the
        `[0, 1]` rescaling of `forward`; the checkpoint's TPMs were trained on those features.
        """
        features = []
        x = image
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, TemporalTinyBlock):
                features.append(x)
        return features


class TemporalTinyDecoder(nn.Module):
    """TAESD decoder at x4 whose blocks take the TPM temporal features."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        channels = config.decoder_block_out_channels
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, channels[0], 3, padding=1),
                                   _activation(config.act_fn)]
        last = len(config.num_decoder_blocks) - 1
        for i, num_blocks in enumerate(config.num_decoder_blocks):
            layers += [TemporalTinyBlock(channels[i], config.act_fn) for _ in range(num_blocks)]
            if i != last:
                layers.append(nn.Upsample(scale_factor=config.upsampling_scaling_factor, mode=config.upsample_fn))
            out = config.out_channels if i == last else channels[i]
            layers.append(nn.Conv2d(channels[i], out, 3, padding=1, bias=i == last))
        self.layers = nn.Sequential(*layers)

    @property
    def num_blocks(self) -> int:
        return sum(isinstance(layer, TemporalTinyBlock) for layer in self.layers)

    def forward(self, latents: Tensor, temporal_features: list[Tensor] | None = None) -> Tensor:
        """Image in `[-1, 1]` from `latents`; `temporal_features` pair with the blocks in order."""
        if temporal_features is not None and len(temporal_features) != self.num_blocks:
            raise ValueError(f"the decoder has {self.num_blocks} TPM blocks, got {len(temporal_features)} features")
        # TAESD soft-clamps latents to [-3, 3].
        x = torch.tanh(latents / 3) * 3
        block = 0
        for layer in self.layers:
            if isinstance(layer, TemporalTinyBlock):
                x = layer(x, None if temporal_features is None else temporal_features[block])
                block += 1
            else:
                x = layer(x)
        return x.mul(2).sub(1)


class TemporalAutoencoderTiny(ModelMixin, ConfigMixin):
    """The temporal-aware tiny autoencoder (`vae/` of the official checkpoint).

    A diffusers model: `save_pretrained` / `from_pretrained(folder, subfolder="vae")` read and write
    the official `config.json` + `diffusion_pytorch_model.safetensors`. Arguments are the official
    config's keys (`TINY_AUTOENCODER_X4`); `block_out_channels`, `latent_magnitude`, `latent_shift`,
    `shift_factor` and `force_upcast` are carried for the official file and not used.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 4,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 1),
        latent_magnitude: float = 3,
        latent_shift: float = 0.5,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        force_upcast: bool = False,
        block_out_channels: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if len(encoder_block_out_channels) != len(num_encoder_blocks):
            raise ValueError("encoder_block_out_channels and num_encoder_blocks must have the same length")
        if len(decoder_block_out_channels) != len(num_decoder_blocks):
            raise ValueError("decoder_block_out_channels and num_decoder_blocks must have the same length")
        self.encoder = TinyEncoder(self.config)
        self.decoder = TemporalTinyDecoder(self.config)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.num_encoder_blocks) - 1)

    def encode(self, image: Tensor) -> Tensor:
        """Latents of an image in `[-1, 1]` (scaled by `scaling_factor`)."""
        return self.encoder(image) * self.config.scaling_factor

    def temporal_features(self, warped_prev: Tensor) -> list[Tensor]:
        """TPM inputs for the decoder from the warped previous HR output, deepest block first."""
        return self.encoder.block_features(warped_prev)[::-1]

    def decode(self, latents: Tensor, temporal_features: list[Tensor] | None = None) -> Tensor:
        """Image in `[-1, 1]` (unclamped) from diffusion latents."""
        return self.decoder(latents / self.config.scaling_factor, temporal_features)


# The warp of the previous output ------------------------------------------------------------

def stream_warp(image: Tensor, flow: Tensor) -> Tensor:
    """Backward warp of the previous HR output onto the current frame, as the checkpoints were trained.

    Each output pixel p = (x, y) reads `image` at p + flow(p) through

        g = 2 (p + flow(p)) / max(S - 1, 1) - 1,   grid_sample(image, g, bilinear, zeros, align_corners=False)

    with S the width for x and the height for y. The normalisation by S - 1 is `align_corners=True`'s
    and the sampling `align_corners=False`'s, so the pixel actually read (pixel centres at integer
    coordinates) is u = (x + f_x) W / (W - 1) - 1/2, v = (y + f_y) H / (H - 1) - 1/2: zero flow is not
    the identity but a stretch by S / (S - 1) about the image centre with a half-pixel shift; border
    pixels read half outside the image (zeros), so a zero-flow warp scales corner pixels by 1/4.
    The shared `zoo.components.flow.warp` reads at p + flow(p) exactly; this one is kept apart because
    the ARTG ControlNet and the TPMs of the Stream-DiffVSR checkpoints were trained on its output.

    Args:
        image: the previous output `(N, C, H, W)` (the raw decoder output, not clamped).
        flow: `(N, 2, H, W)` in pixels, x then y, from the current frame to the previous one.

    Returns:
        `(N, C, H, W)` in the dtype of `image`; sampled in float32 at least.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (N, 2, H, W), got {tuple(flow.shape)}")
    if image.ndim != 4 or image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"image must be (N, C, H, W) matching flow {tuple(flow.shape)}, got {tuple(image.shape)}")
    dtype = torch.promote_types(image.dtype, torch.float32)
    height, width = flow.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height, device=flow.device, dtype=dtype),
                            torch.arange(width, device=flow.device, dtype=dtype), indexing="ij")
    flow = flow.to(dtype)
    # Official util/flow_utils.py flow_warp; the paper does not state the convention. These float32
    # operations in this order (p + f, then 2 * v / (S - 1) - 1) give its grid bit for bit; an
    # algebraically equal rewrite is 1e-5 off after sampling.
    grid_x = 2.0 * (xs + flow[:, 0]) / max(width - 1, 1) - 1.0
    grid_y = 2.0 * (ys + flow[:, 1]) / max(height - 1, 1) - 1.0
    warped = F.grid_sample(image.to(dtype), torch.stack([grid_x, grid_y], dim=3), mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    return warped.to(image.dtype)


def ddim_constants(scheduler: DDIMScheduler) -> dict[int, tuple[float, float, float, float]] | None:
    """The scalars of the scheduler's DDIM step (eta = 0, `v_prediction`) at each of its timesteps, made once.

    `DDIMScheduler.step` computes them from its float32 `alphas_cumprod` at every call, 18 operators on 0-dim
    tensors (square roots, differences, the zero variance) besides the 9 on the latents (counted). Here they are
    computed once, by the same float32 operations, and `ddim_step` applies the 9 in the step's order: the
    same bits. Per timestep t with alpha_bar_t and the previous step's alpha_bar_p (`final_alpha_cumprod` past
    the first timestep): `(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), sqrt(alpha_bar_p), sqrt(1 - alpha_bar_p))`.
    None where the step is another computation (another prediction type, clipped or thresholded samples):
    the sampler then calls `scheduler.step`.
    """
    config = scheduler.config
    if config.prediction_type != "v_prediction" or config.clip_sample or config.thresholding:
        return None
    stride = config.num_train_timesteps // scheduler.num_inference_steps  # as `DDIMScheduler.step`
    constants = {}
    for t in (int(t) for t in scheduler.timesteps):
        alpha_bar = scheduler.alphas_cumprod[t]
        alpha_bar_prev = scheduler.alphas_cumprod[t - stride] if t - stride >= 0 else scheduler.final_alpha_cumprod
        std_dev = torch.zeros((), dtype=alpha_bar.dtype)  # eta = 0
        constants[t] = (float(alpha_bar**0.5), float((1 - alpha_bar) ** 0.5), float(alpha_bar_prev**0.5),
                        float((1 - alpha_bar_prev - std_dev**2) ** 0.5))
    return constants


def ddim_step(constants: tuple[float, float, float, float], latents: Tensor, output: Tensor) -> Tensor:
    """`DDIMScheduler.step(output, t, latents).prev_sample` (eta = 0, `v_prediction`) from `ddim_constants()[t]`.

    DDIM's update (Song et al., 2021, Eq. (12) with sigma = 0) with the v-parametrisation, in the scheduler's
    order of operations: x0 = s_t z - c_t v, eps = s_t v + c_t z, z_prev = s_p x0 + c_p eps.
    """
    s_t, c_t, s_p, c_p = constants
    x0 = s_t * latents - c_t * output
    eps = s_t * output + c_t * latents
    return s_p * x0 + c_p * eps


# Everything together ----------------------------------------------------------------------

class StreamDiffVSRNet(nn.Module):
    """UNet + ARTG ControlNet + temporal tiny autoencoder + DDIM sampler + the empty-prompt embedding.

    Args:
        config: the network config.
    """

    def __init__(self, config: StreamDiffVSRConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet2DConditionModel(**config.unet)
        self.controlnet = ControlNetModel(**config.controlnet)
        self.vae = TemporalAutoencoderTiny(**config.vae)
        # The UNet is conditioned on the text embedding of the empty prompt only; it is stored
        # precomputed, so inference needs no text encoder.
        self.register_buffer(
            "prompt_embeds", torch.zeros(1, config.prompt_length, config.unet["cross_attention_dim"]))
        with torch.device("cpu"):  # the schedule's tables stay real when the net is built on `meta`
            self.scheduler = DDIMScheduler.from_config(config.scheduler)
            self.scheduler.set_timesteps(config.num_inference_steps)
            self.ddim_constants = ddim_constants(self.scheduler)
        # Python ints: the sampler loop never reads a tensor back from the device.
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        if self.controlnet_downscale != self.vae.downscale:
            raise ValueError(f"the ControlNet condition embedding downsamples by {self.controlnet_downscale} but "
                             f"the autoencoder by {self.vae.downscale}; they must match")

    @classmethod
    def from_components(cls, config: StreamDiffVSRConfig, unet: UNet2DConditionModel, controlnet: ControlNetModel,
                        vae: TemporalAutoencoderTiny, prompt_embeds: Tensor) -> StreamDiffVSRNet:
        """A net around already loaded components (`config` must describe them); nothing is initialised twice."""
        with torch.device("meta"):
            net = cls(config)
        net.unet, net.controlnet, net.vae = unet, controlnet, vae
        net.prompt_embeds = prompt_embeds
        return net

    @property
    def controlnet_downscale(self) -> int:
        return 2 ** (len(self.config.controlnet["conditioning_embedding_out_channels"]) - 1)

    @property
    def scale(self) -> int:
        """HR pixels per LR pixel: the latents have the LR size and the autoencoder upsamples them."""
        return self.vae.downscale

    def class_labels(self, batch: int, device: torch.device) -> Tensor | None:
        if self.config.unet.get("num_class_embeds") is None:
            return None
        return torch.full((batch,), self.config.noise_level, dtype=torch.long, device=device)

    def denoise(self, latents: Tensor, lr: Tensor, t: int, warped_prev: Tensor | None,
                conditioning_scale: Any = 1.0) -> Tensor:
        """The UNet's prediction for `latents` at timestep `t`.

        Args:
            latents: noisy latents z_t `(B, 4, h, w)`.
            lr: LR frames in `[-1, 1]`, `(B, 3, h, w)`, concatenated to the latents (x4 upscaler).
            t: the timestep.
            warped_prev: flow-warped previous HR output in `[-1, 1]`, `(B, 3, 4h, 4w)` (inside
                `embedded_condition`, its embedding); None for the first frame, which runs without ARTG.
            conditioning_scale: the ControlNet's residual scale (1; eager inference passes `UNIT`, the same 1
                without diffusers' multiplication by it).
        """
        b = latents.shape[0]
        model_input = torch.cat([latents, lr.to(latents.dtype)], dim=1)
        timestep = torch.full((b,), t, dtype=torch.long, device=latents.device)
        prompt = self.prompt_embeds.to(latents.dtype).expand(b, -1, -1)
        labels = self.class_labels(b, latents.device)
        down = mid = None
        if warped_prev is not None:
            # ARTG (Stream-DiffVSR, "Auto-regressive Temporal Guidance"): ControlNet residuals from
            # the warped previous output, added to every UNet skip.
            down, mid = self.controlnet(model_input, timestep, encoder_hidden_states=prompt,
                                        controlnet_cond=warped_prev.to(latents.dtype), class_labels=labels,
                                        conditioning_scale=conditioning_scale, return_dict=False)
        return self.unet(model_input, timestep, encoder_hidden_states=prompt, class_labels=labels,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]

    def step(self, output: Tensor, t: int, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The scheduler's DDIM step (eta = 0) from timestep `t`; returns (z_prev, x̂₀)."""
        result = self.scheduler.step(output, t, latents)
        return result.prev_sample, result.pred_original_sample

    @contextlib.contextmanager
    def embedded_condition(self, warped_prev: Tensor | None, dtype: torch.dtype) -> Iterator[Tensor | None]:
        """The ControlNet's conditioning embedding of `warped_prev`, taken by the ControlNet in place of its
        condition while the context lasts (its embedding module is an identity meanwhile).

        The embedding depends on the frame, not on the step: the sampler's steps share one instead of
        recomputing it at each (diffusers' `ControlNetModel` always embeds the condition it is given).
        """
        if warped_prev is None:
            yield None
            return
        controlnet = self.controlnet
        embedding = controlnet.controlnet_cond_embedding
        condition = embedding(warped_prev.to(dtype))
        controlnet.controlnet_cond_embedding = nn.Identity()
        try:
            yield condition
        finally:
            controlnet.controlnet_cond_embedding = embedding

    def sample(self, noise: Tensor, lr: Tensor, warped_prev: Tensor | None, memo: StepMemo | None = None) -> Tensor:
        """Run the DDIM sampler from `noise` (z_T) and return the clean latents, float32.

        A float32 island under a half dtype: the latents z_t and the DDIM update (the scheduler's float32
        `alphas_cumprod`; in bfloat16 the last step's alpha_bar_0 = 0.9999 would round to 1.0) stay float32,
        and only the networks' inputs are cast to their dtype. The ControlNet's condition is embedded once per
        frame (`embedded_condition`), not at each step. The DDIM step's scalars are computed once
        (`ddim_constants`): the scheduler's step, to the bit, in 9 operators on the latents instead of 27.

        Args:
            noise, lr, warped_prev: see `upscale_frame`.
            memo: an installed `StepMemo` of the UNet and ControlNet (`memoise_denoiser`), told each step's
                timestep; None computes everything.
        """
        dtype = self.unet.dtype
        latents = noise.float()
        scale = 1.0 if memo is None else UNIT
        with self.embedded_condition(warped_prev, dtype) as condition:
            for t in self.timesteps:
                with contextlib.nullcontext() if memo is None else memo.step(t):
                    output = self.denoise(latents.to(dtype), lr, t, condition, scale)
                if self.ddim_constants is None:
                    latents, _ = self.step(output.float(), t, latents)
                else:
                    latents = ddim_step(self.ddim_constants[t], latents, output.float())
        return latents

    def upscale_frame(self, lr: Tensor, noise: Tensor, warped_prev: Tensor | None,
                      memo: StepMemo | None = None) -> Tensor:
        """One frame: LR `(B, 3, h, w)` in `[-1, 1]` -> HR `(B, 3, 4h, 4w)` in `[-1, 1]` (unclamped).

        Args:
            lr: the LR frame, sizes multiples of the networks' size multiple.
            noise: initial latents `(B, 4, h, w)`.
            warped_prev: the previous HR output warped to this frame, or None for the first frame.
            memo: see `sample`.
        """
        latents = self.sample(noise, lr, warped_prev, memo).to(self.vae.dtype)
        features = None if warped_prev is None else self.vae.temporal_features(warped_prev.to(latents.dtype))
        return self.vae.decode(latents, features)
