"""OS-DiffVSR networks: the one-step SD-2.1 generator with multi-frame fusion, and the DINOv2 critic.

The generator follows OSEDiff: the bicubic-upsampled LR frame is encoded by the VAE encoder
(with LoRA), denoised in ONE step of the SD UNet (with LoRA) at the fixed timestep T = 999 under a
precomputed prompt embedding, and decoded by the frozen VAE decoder. OS-DiffVSR adds multi-frame
fusion (MFF) of the flow-warped neighbours' latents before the UNet. The discriminator is a
DINOv2-S ViT whose patch tokens drive the adjacent-frame adversarial losses and the focal MSE.

Pure `nn.Module`s; no Lightning import.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.components.flow import FlowEstimator, FlowFeatures, warp
from zoo.components.lora import inject_lora, lora_config
from zoo.components.prompts import encode_prompt

# The SD-2.1 noise schedule (scheduler/scheduler_config.json of stabilityai/stable-diffusion-2-1-base).
SD21_BASE_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                       "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
# OSEDiff builds its LoraConfig without lora_alpha, so peft's default applies.
OSEDIFF_LORA_ALPHA = 8.0
# Name of the frozen adapter that holds OSEDiff's released LoRA (`load_osediff_lora`).
OSEDIFF_ADAPTER = "osediff"

# Published diffusers configs of stabilityai/stable-diffusion-2-1-base (unet/, vae/ config.json).
SD21_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
SD21_BASE_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@dataclass
class DiscriminatorConfig:
    """The DINOv2 ViT critic of AFAT.

    Args:
        embed_dim: token width (384 for DINOv2-S).
        depth: transformer blocks (12 for DINOv2-S).
        num_heads: attention heads (6 for DINOv2-S).
        patch_size: ViT patch size; inputs are resized to a multiple of it.
        timm_name: timm model whose published weights `pretrained=True` loads.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 14
    timm_name: str = "vit_small_patch14_dinov2.lvd142m"

    @classmethod
    def tiny(cls) -> DiscriminatorConfig:
        return cls(embed_dim=16, depth=1, num_heads=2)

    @classmethod
    def full(cls) -> DiscriminatorConfig:
        return cls()


@dataclass
class OSDiffVSRConfig:
    """Sizes and constants of the OS-DiffVSR generator.

    Args:
        unet: `UNet2DConditionModel` keyword arguments (SD-2.1-base for `full`).
        vae: `AutoencoderKL` keyword arguments (SD-2.1-base for `full`).
        scheduler: `DDPMScheduler` keyword arguments: the noise schedule whose `alphas_cumprod`
            give Eq. (2)'s coefficients.
        scale: the upscaling factor; LR frames are bicubic-upsampled by it before the VAE.
        scaling_factor: VAE latent scale (0.18215 for SD-2.x).
        timestep: the fixed timestep T of the one denoising step.
        lora_rank: LoRA rank on the VAE encoder and the UNet (32, Sec. 4.1).
        lora_alpha: LoRA alpha of those adapters; their update is scaled by `lora_alpha / lora_rank`.
        osediff_rank: rank of OSEDiff's released LoRA when the generator starts from it (4); it is
            then kept as a second, frozen adapter (`load_osediff_lora`). None: no such adapter.
        prompt_length: tokens in the prompt embedding (77 for CLIP).
        fusion_dim: width of the MFF query/key projections W^Q, W^K (all heads together).
        fusion_heads: N_h, the MFF attention heads.
        fusion_alpha: alpha of Eqs. (14) and (16), on images in [0, 1] with the L1 norm summed
            over RGB.
        fusion_threshold: mu of Eq. (14).
        flow_model: torchvision RAFT variant, `"large"` or `"small"`.
        flow_pretrained: load torchvision's published RAFT weights (not stored in exported folders).
        flow_updates: RAFT's recurrent refinement iterations.
        base_model: Hub id or folder of SD-2.1-base whose weights fill the UNet and VAE; when set,
            exported folders hold only what training changed (adapters, MFF, prompt embedding).
    """

    unet: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_VAE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_SCHEDULER))
    scale: int = 4
    scaling_factor: float = 0.18215
    timestep: int = 999
    lora_rank: int = 32
    # The paper gives no LoRA alpha. It builds on OSEDiff (P:70), whose LoraConfig leaves lora_alpha
    # at peft's default 8, so the rank-32 update is scaled by 8 / 32.
    lora_alpha: float = OSEDIFF_LORA_ALPHA
    osediff_rank: int | None = None
    prompt_length: int = 77
    # N_h and d_k are not given (P:146-154): 4 heads of d_k = 16.
    fusion_dim: int = 64
    fusion_heads: int = 4
    # alpha is not given either (P:166, "a scaling factor"). Measured on the built-in sample clips
    # (224 x 224 HR, Real-ESRGAN x4 LR, exact camera flow, aligned pixels only): Eq. (14) with mu = 0.4
    # fuses 95% of the aligned LR pixels at alpha = 2, 54% at 5, 14% at 10 and 0.4% at 50 (Lai et
    # al.'s value, which belongs to a squared error). Table 4's DOVER keeps rising from mu = 0.8 to
    # 0.4 and levels off below, as the fused share does at alpha = 5 (2%, 19%, 54%, 85% at mu = 0.8,
    # 0.6, 0.4, 0.2); 5 is the stricter end of the range that behaves so, since real RAFT flow adds
    # errors that exact flow lacks. Eq. (16) takes the same alpha (P:178): the HR warp-loss mask
    # then has median 0.988 where the ground-truth warp is exact.
    fusion_alpha: float = 5.0
    fusion_threshold: float = 0.4  # mu, Sec. 4.1 (P:223)
    flow_model: str = "large"
    flow_pretrained: bool = False
    flow_updates: int = 12
    base_model: str | None = None

    @classmethod
    def full(cls) -> OSDiffVSRConfig:
        """SD-2.1-base sizes (random init; set `base_model` to load the published weights)."""
        return cls()

    @classmethod
    def tiny(cls) -> OSDiffVSRConfig:
        """A few channels per block, for CPU tests (the VAE keeps its factor 8)."""
        unet = {
            "block_out_channels": [16, 32],
            # Attention only at half the latent size, so real clip sizes stay cheap on a CPU.
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4],
            "cross_attention_dim": 16,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 8,
            "use_linear_projection": True,
        }
        vae = {
            "block_out_channels": [8, 8, 16, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "latent_channels": 4,
            "sample_size": 64,
            "mid_block_add_attention": False,
        }
        return cls(unet=unet, vae=vae, lora_rank=4, prompt_length=4, fusion_dim=8, fusion_heads=2,
                   flow_model="small", flow_updates=4)

    def replace(self, **changes: Any) -> OSDiffVSRConfig:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


# Eq. (2) ----------------------------------------------------------------------------------

def one_step_coefficients(scheduler: dict[str, Any], timestep: int) -> tuple[float, float]:
    """`(alpha_T, beta_T) = (sqrt(abar_T), sqrt(1 - abar_T))` of the DDPM schedule `scheduler` at `timestep`."""
    from diffusers import DDPMScheduler

    with torch.device("cpu"):  # plain numbers, also when the network is built on the meta device
        abar = DDPMScheduler(**scheduler).alphas_cumprod[timestep].double().item()
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def one_step_denoise(z: Tensor, eps: Tensor, alpha_t: float, beta_t: float) -> Tensor:
    """Eq. (2): the clean latent `Z_hat = (Z - beta_T * eps_theta) / alpha_T` predicted in one step.

    Args:
        z: the LR latent `Z`, read as the noisy latent at timestep T.
        eps: the UNet's noise prediction `eps_theta(Z; T, c)`.
        alpha_t: `sqrt(abar_T)`.
        beta_t: `sqrt(1 - abar_T)`.

    Returns:
        `Z_hat` in float32, whatever the dtype of `z` and `eps`.
    """
    # Eq. (2), OS-DiffVSR. Written out rather than `DDPMScheduler.step`: with one step that returns the
    # same x0 plus a 1e-10-scaled noise draw, which costs a random-number call for nothing. A float32 island:
    # at T = 999 the difference nearly cancels and 1 / alpha_T is about 15, so bfloat16 latents are promoted
    # and the constants (Python floats from float64) enter in float32; the result is float32.
    return (z.float() - beta_t * eps.float()) / alpha_t


# Multi-frame fusion, Eqs. (8)-(14) -----------------------------------------------------------

def warping_error(frame: Tensor, warped: Tensor) -> Tensor:
    """`||I - W||_1` at each pixel: the L1 norm over the RGB channels, `(N, 1, H, W)` in float32.

    The norm of Eqs. (14) and (16) is a sum over channels (a channel mean would scale alpha by 3).

    Args:
        frame: `I` `(N, 3, H, W)` in [0, 1].
        warped: a frame warped onto it, `(N, 3, H, W)`.
    """
    return (frame.float() - warped.float()).abs().sum(dim=1, keepdim=True)


def fusion_mask(frame: Tensor, warped_prev: Tensor, warped_next: Tensor, alpha: float, threshold: float) -> Tensor:
    """Eq. (14): `M^f = 1[exp(-alpha (||I^w_{i-1} - I^L_i||_1 + ||I^w_{i+1} - I^L_i||_1)) > mu]`.

    The SUM of the two warping errors is thresholded: a pixel is fused where the two neighbours
    together match the current frame, not where each does on its own.

    Args:
        frame: the current LR frame `I^L_i` `(N, 3, H, W)` in [0, 1].
        warped_prev: `I^w_{i-1}`, the previous frame warped onto it (Eq. 8).
        warped_next: `I^w_{i+1}`.
        alpha: the scaling factor alpha > 0.
        threshold: the fusion threshold mu.

    Returns:
        `(N, 1, H, W)` of 0 and 1, in the dtype of `frame`.
    """
    error = warping_error(frame, warped_prev) + warping_error(frame, warped_next)
    return (torch.exp(-alpha * error) > threshold).to(frame.dtype)  # Eq. (14), OS-DiffVSR


def downsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """`M^f ↓_{xn}` of Eq. (12): the mask at latent size, where a latent position fuses only if all
    the pixels it covers do (min-pool).

    The paper names only "n times downsampling" (P:158). With x4 upsampling and a VAE factor of 8,
    one latent position covers n x n = 2 x 2 LR pixels; the min-pool keeps fusion to aligned
    regions (P:166) rather than averaging an unaligned pixel into a partial weight.
    """
    return -F.adaptive_max_pool2d(-mask, size)


class MultiFrameFusion(nn.Module):
    """Eqs. (10)-(13): attention among the warped-previous, current and warped-next latents.

    At each latent position the three latents `Z = [Z^w_{i-1}, Z^L_i, Z^w_{i+1}]` are three tokens.
    Head `m` projects every token to a query and a key (Eq. 11, `Q_m = W^Q_m Z`, `K_m = W^K_m Z`)
    and forms the 3 x 3 weights `A_m = softmax(Q_m K_m^T / sqrt(d_k))` (Eq. 10, softmax over the
    keys). The heads' weights are averaged, `Abar = sum_m A_m / N_h`, and multiply the latents
    themselves (Eq. 13, `Z~ = Abar Z`, no value projection: the fused latent stays in the VAE
    latent space, P:166). Eq. (12) averages the three attended latents,
    `(Z~_{i-1} + Z~_i + Z~_{i+1}) / 3`, and blends it with `Z^L_i` by the mask.

    Args:
        channels: latent channels (4 for SD).
        dim: width of the query/key projections (all heads); `d_k = dim / heads`.
        heads: `N_h`; `dim` must divide by it.
    """

    def __init__(self, channels: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion dim {dim} must divide by fusion heads {heads}")
        self.heads = heads
        # W^Q_m, W^K_m: linear maps of each latent vector (1x1 convolutions), without bias as Eq. (11) writes them.
        self.to_q = nn.Conv2d(channels, dim, 1, bias=False)
        self.to_k = nn.Conv2d(channels, dim, 1, bias=False)

    def attention(self, latents: Tensor) -> Tensor:
        """`Abar` `(N, 3, 3, h, w)` of latents `(N, 3, C, h, w)`: row r (query) sums to 1 over s (key)."""
        n, k = latents.shape[:2]
        flat = latents.flatten(0, 1)
        q = self.to_q(flat).unflatten(0, (n, k)).unflatten(2, (self.heads, -1))  # Eq. (11), OS-DiffVSR
        keys = self.to_k(flat).unflatten(0, (n, k)).unflatten(2, (self.heads, -1))  # Eq. (11), OS-DiffVSR
        logits = torch.einsum("nrmdyx,nsmdyx->nmrsyx", q, keys) / math.sqrt(q.shape[3])
        # Eq. (10), OS-DiffVSR; the 3-way softmax in float32 also under bf16.
        weights = logits.float().softmax(dim=3)
        return weights.mean(dim=1).to(latents.dtype)  # Eq. (13), OS-DiffVSR: sum_m A_m / N_h

    def forward(self, latents: Tensor, mask: Tensor) -> Tensor:
        """Eq. (12): `Z^f = mean_r(Z~_r) * M + (1 - M) * Z^L_i`.

        Args:
            latents: `[Z^w_{i-1}, Z^L_i, Z^w_{i+1}]` stacked, `(N, 3, C, h, w)`.
            mask: `M^f ↓_{xn}` `(N, 1, h, w)` in [0, 1].
        """
        attended = torch.einsum("nrsyx,nscyx->nrcyx", self.attention(latents), latents)  # Eq. (13), OS-DiffVSR
        current = latents[:, 1]
        return attended.mean(dim=1) * mask + (1 - mask) * current  # Eq. (12), OS-DiffVSR


# Generator ----------------------------------------------------------------------------------

class OSDiffVSRNet(nn.Module):
    """The OS-DiffVSR generator: one frame `I_hat_i` from the LR window `(I_{i-1}, I_i, I_{i+1})`.

    Attributes `vae` and `unet` are the diffusers SD-2.1 models with LoRA adapters (VAE encoder and
    UNet, adapter `default`; plus the frozen adapter `osediff` when `config.osediff_rank` is set);
    the VAE decoder stays frozen. `fusion` is the MFF attention, `flow` the frozen RAFT,
    `prompt_embeds` the default prompt condition `c` (the empty prompt's CLIP embedding once
    `load_base` ran; zeros in a randomly initialised net).

    Args:
        config: sizes and constants.
    """

    def __init__(self, config: OSDiffVSRConfig) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel

        self.config = config
        self.vae = AutoencoderKL(**config.vae)
        self.unet = UNet2DConditionModel(**config.unet)
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(False)
        for model, backbone in ((self.vae, "sd_vae_encoder"), (self.unet, "sd_unet")):
            inject_lora(model, lora_config(backbone, config.lora_rank, config.lora_alpha), "default")
            if config.osediff_rank is not None:
                inject_lora(model, lora_config(backbone, config.osediff_rank, OSEDIFF_LORA_ALPHA), OSEDIFF_ADAPTER)
        for name, parameter in self.named_parameters():
            if f".{OSEDIFF_ADAPTER}." in name:
                parameter.requires_grad_(False)
        latent_channels = config.vae.get("latent_channels", 4)
        self.fusion = MultiFrameFusion(latent_channels, config.fusion_dim, config.fusion_heads)
        self.flow = FlowEstimator(config.flow_model, pretrained=config.flow_pretrained,
                                  num_flow_updates=config.flow_updates)
        self.register_buffer(
            "prompt_embeds", torch.zeros(1, config.prompt_length, config.unet["cross_attention_dim"]))
        self.alpha_t, self.beta_t = one_step_coefficients(config.scheduler, config.timestep)

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel: the VAE encoder halves the size between its blocks."""
        return 2 ** (len(self.config.vae["block_out_channels"]) - 1)

    @property
    def size_multiple(self) -> int:
        """LR sizes must divide by this, so the upsampled frame divides by the VAE factor."""
        return self.vae_factor // math.gcd(self.vae_factor, self.config.scale)

    # Stages of the forward pass ---------------------------------------------------------

    def encode(self, frames: Tensor) -> Tensor:
        """VAE latents `Z` of LR frames `(N, 3, h, w)` in [0, 1], bicubic-upsampled by `config.scale` first."""
        # Bicubic (the paper is silent; OSEDiff upsamples bicubically at test time, with a random mode in training).
        up = F.interpolate(frames, scale_factor=self.config.scale, mode="bicubic", align_corners=False).clamp(0, 1)
        # The posterior mean keeps inference deterministic (the paper is silent; OSEDiff samples the posterior).
        return self.vae.encode(up * 2 - 1).latent_dist.mode() * self.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """HR frames `(N, 3, f*h, f*w)` in [0, 1], float32, from latents (`f` the VAE factor), by the frozen decoder."""
        sample = self.vae.decode((latents / self.config.scaling_factor).to(self.vae.dtype)).sample
        return (sample.float().clamp(-1, 1) + 1) / 2  # to [0, 1] in float32 (bfloat16 steps by 1/256 below 1)

    def align(self, prev: Tensor, current: Tensor, next_: Tensor,
              flow_features: tuple[FlowFeatures, FlowFeatures] | None = None) -> tuple[Tensor, Tensor]:
        """Eq. (8): the neighbours warped onto the current frame, `(I^w_{i-1}, I^w_{i+1})`.

        RAFT gives the flow from `I_i` to each neighbour, and backward warping samples the
        neighbour at `p + flow(p)`, so each warped neighbour lines up with `I_i` (P:138).

        Args:
            prev, current, next_: the frames `(N, 3, h, w)` in [0, 1].
            flow_features: RAFT's encodings (`self.flow.features`) of the flows' sources `(current, current)` and
                destinations `(prev, next_)`, from encodings a stream makes once per frame; None encodes the
                frames here.
        """
        neighbours = torch.cat([prev, next_])
        if flow_features is None:
            flow = self.flow(torch.cat([current, current]), neighbours)
        else:
            flow = self.flow(*flow_features)
        return warp(neighbours, flow).chunk(2)  # Eq. (8), OS-DiffVSR

    def fuse(self, prev: Tensor, current: Tensor, next_: Tensor, current_latent: Tensor,
             flow_features: tuple[FlowFeatures, FlowFeatures] | None = None) -> Tensor:
        """Eqs. (8)-(14): the fused latent `Z^f_i` of frame i from its LR neighbours.

        Args:
            prev: `I^L_{i-1}` `(N, 3, h, w)` in [0, 1].
            current: `I^L_i`.
            next_: `I^L_{i+1}`.
            current_latent: `Z^L_i = E_vae(I^L_i)`.
            flow_features: see `align`.
        """
        warped_prev, warped_next = self.align(prev, current, next_, flow_features)
        z_prev, z_next = self.encode(torch.cat([warped_prev, warped_next])).chunk(2)  # Eq. (9), OS-DiffVSR
        latents = torch.stack([z_prev, current_latent, z_next], dim=1)
        mask = fusion_mask(current, warped_prev, warped_next, self.config.fusion_alpha, self.config.fusion_threshold)
        # To latent size: nearest x`scale` to the upsampled frame, then the min-pool of `downsample_mask`.
        mask = downsample_mask(F.interpolate(mask, scale_factor=self.config.scale, mode="nearest"),
                               current_latent.shape[-2:])
        return self.fusion(latents, mask)

    def denoise(self, latents: Tensor, prompt_embeds: Tensor | None = None) -> Tensor:
        """Eq. (2): the clean latent `Z_hat` from ONE UNet step at timestep T.

        Args:
            latents: `Z` (or the fused `Z_f`) `(N, C, h, w)`.
            prompt_embeds: `c`, `(1 or N, L, D)`; the stored `prompt_embeds` when None.
        """
        c = self.prompt_embeds if prompt_embeds is None else prompt_embeds
        c = c.expand(latents.shape[0], -1, -1) if c.shape[0] == 1 else c
        timestep = torch.full((latents.shape[0],), self.config.timestep, device=latents.device, dtype=torch.long)
        eps = self.unet(latents, timestep, encoder_hidden_states=c.to(latents.dtype)).sample
        # Computed in float32 (the cancellation), returned in the latents' dtype like the UNet's output.
        return one_step_denoise(latents, eps, self.alpha_t, self.beta_t).to(latents.dtype)

    def forward(self, prev: Tensor, current: Tensor, next_: Tensor, *, fuse: bool = True,
                prompt_embeds: Tensor | None = None) -> Tensor:
        """HR frame `I_hat_i` `(N, 3, s*h, s*w)` in [0, 1]; `h`, `w` must divide by `size_multiple`.

        Padding to that multiple, and tiling, are the pipeline's (`OSDiffVSRUpscaler`).

        Args:
            prev: `I_{i-1}` `(N, 3, h, w)` in [0, 1] (the current frame's other neighbour at the ends).
            current: `I_i`.
            next_: `I_{i+1}`.
            fuse: apply multi-frame fusion (off only in the Table 3 "Baseline" ablation).
            prompt_embeds: `c`, `(1 or N, L, D)`, the text condition of each frame (P:90); the
                stored `prompt_embeds` when None.
        """
        height, width = current.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"LR frames must be multiples of {self.size_multiple} in size, got {height}x{width}; "
                             f"pad them (OSDiffVSRUpscaler does)")
        z = self.encode(current)
        if fuse:
            z = self.fuse(prev, current, next_, z)
        return self.decode(self.denoise(z, prompt_embeds))

    # Weights ------------------------------------------------------------------------------

    def load_base(self, base_model: str | Path, *, prompt: str | None = "") -> None:
        """Fill the UNet and VAE with SD-2.1-base weights (diffusers folder or Hub id).

        Args:
            base_model: folder with `unet/` and `vae/` (and `text_encoder/`, `tokenizer/` for the
                prompt), or its Hub id.
            prompt: text whose CLIP embedding becomes `prompt_embeds`; None keeps the current one.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel

        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            published = cls.from_pretrained(base_model, subfolder=name).state_dict()
            target = getattr(self, name)
            own = {key.replace(".base_layer", ""): key for key in target.state_dict() if "lora_" not in key}
            missing = sorted(set(own) - set(published))
            if missing:
                raise ValueError(f"{base_model} {name} lacks {len(missing)} weights, e.g. {missing[0]}")
            target.load_state_dict({own[k]: v for k, v in published.items() if k in own}, strict=False)
        if prompt is not None:
            self.prompt_embeds.copy_(encode_prompt(base_model, [prompt], self.config.prompt_length))


def load_osediff_lora(net: OSDiffVSRNet, path: str | Path) -> None:
    """Start the generator from OSEDiff's published checkpoint (`osediff.pkl`), as the paper does.

    The paper fine-tunes OSEDiff (P:282, P:284-286) with rank-32 adapters (Sec. 4.1), while OSEDiff
    released rank 4. Its LoRA fills the frozen `osediff` adapter (rank `net.config.osediff_rank`,
    OSEDiff's alpha 8, so its update is exactly OSEDiff's) and its fully trained UNet `conv_in`
    replaces the base one; the rank-32 `default` adapters stay fresh (B = 0) and are what trains.
    A frozen adapter computes what merging it into the base weights would, but keeps those weights
    SD-2.1's own, so an exported folder still loads them from SD-2.1 and carries only the adapters.

    OSEDiff saves `torch.save({"rank_unet", "rank_vae", "unet_lora_{encoder,decoder,others}_modules",
    "vae_lora_encoder_modules", "state_dict_unet", "state_dict_vae"})` with parameter names of peft
    adapters `default_encoder` / `default_decoder` / `default_others` (UNet) and `default_encoder`
    (VAE); it is read with `weights_only=True`.

    Args:
        net: a generator built with `config.osediff_rank` equal to OSEDiff's rank.
        path: the checkpoint file.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for part in ("unet", "vae"):
        rank = int(ckpt[f"rank_{part}"])
        if rank != net.config.osediff_rank:
            raise ValueError(f"{path} has {part} LoRA rank {rank}; build the model with osediff_rank={rank}")
        own = getattr(net, part).state_dict()
        mapped = {}
        for name, tensor in ckpt[f"state_dict_{part}"].items():
            key = re.sub(r"\.(lora_[AB])\.default_(?:encoder|decoder|others)\.", rf".\1.{OSEDIFF_ADAPTER}.", name)
            if key not in own:
                raise ValueError(f"{path}: {part} weight {name} has no counterpart in this model")
            mapped[key] = tensor
        lora_keys = {key for key in own if f".{OSEDIFF_ADAPTER}." in key}
        missing = sorted(lora_keys - set(mapped))
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} {part} LoRA weights of this model, e.g. {missing[0]}")
        getattr(net, part).load_state_dict(mapped, strict=False)


# Discriminator --------------------------------------------------------------------------------

class DINOv2Discriminator(nn.Module):
    """DINOv2 ViT whose patch tokens `F(I)` `(N, D, H/14, W/14)` serve the AFAT losses.

    Inputs in [0, 1] are normalised with ImageNet statistics and resized (bilinear) to the nearest
    multiple of the patch size.

    Args:
        config: ViT sizes.
        pretrained: load the published DINOv2-S weights through timm (`config.timm_name`).
    """

    def __init__(self, config: DiscriminatorConfig, pretrained: bool = False) -> None:
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        self.config = config
        if pretrained:
            try:
                self.vit = timm.create_model(config.timm_name, pretrained=True, num_classes=0,
                                             dynamic_img_size=True)
            except Exception as err:  # timm surfaces offline/missing weights as many error types.
                raise OSError(
                    f"could not load the pretrained DINOv2 weights {config.timm_name!r} through timm "
                    f"({type(err).__name__}); with HF_HUB_OFFLINE=1 or no network they must already be in "
                    f"the Hugging Face cache, else use discriminator_pretrained=False"
                ) from None
        else:
            self.vit = VisionTransformer(
                img_size=config.patch_size * 4, patch_size=config.patch_size, embed_dim=config.embed_dim,
                depth=config.depth, num_heads=config.num_heads, num_classes=0, init_values=1e-5,
                dynamic_img_size=True)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Patch features `(N, D, H', W')` of images `(N, 3, H, W)` in [0, 1]."""
        p = self.config.patch_size
        size = tuple(max(p, round(s / p) * p) for s in images.shape[-2:])
        x = (images - self.mean) / self.std
        if size != tuple(images.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        return tokens.transpose(1, 2).unflatten(2, (size[0] // p, size[1] // p))
