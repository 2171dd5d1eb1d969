"""PS-SR networks: the LoRA-tuned Wan2.1 base, the pruned draft fed by the base's features, the
speculative sampler with the frequency-domain update, and the latent discriminator.

Notation of the paper (`../shared/papers/ps-sr.txt`, cited below as `Lnnn`): `x_L`, `x_H` the LR and
HR videos, `z_L`, `z_H` their VAE latents, `phi` a DiT velocity predictor, `sigma_t` the noise level
at step `t` (`sigma_T = 1`, `sigma_0 = 0`), `E^{-1}` the VAE decoder (L91), `H` a high-pass filter.
Velocities are `dz/dsigma`, so along the pair flow of Eq. (4) the target is `z_L - z_H`, and the
clean prediction from `(z_t, t)` is `z_t - sigma_t * phi`. The DiT timestep is `1000 * sigma_t`, the
Wan convention (`FlowMatchEulerDiscreteScheduler.timesteps = sigmas * num_train_timesteps`).

Videos are `(B, T, 3, H, W)` in [0, 1]; latents `(B, 16, F, H/8, W/8)` with `F = (T - 1) / 4 + 1`.
Pure `nn.Module`s and functions; no Lightning import.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanCausalConv3d,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
)
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo.components.color import high_pass, rgb_to_yuv
from zoo.components.lean import runs_on_the_cpu, swap_classes
from zoo.components.lora import inject_lora, load_base_weights, lora_config

WAN_T2V_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
"""The base model the paper initialises the VAE and both DiTs from (L164)."""

# Published diffusers configs of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (transformer/, vae/ config.json; the
# VAE's latents_mean / latents_std are the class defaults, which are Wan2.1's statistics).
WAN_T2V_1_3B_TRANSFORMER: dict[str, Any] = {
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
WAN_VAE: dict[str, Any] = {
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}
# The flow-matching schedule of the sampler. shift = 1 keeps Wan's evenly spaced sigmas unshifted:
# T = 4 gives sigma = [1, 0.75, 0.5, 0.25, 0], so the base step covers a quarter of the flow. The
# paper states no schedule (L81 only calls the base step "a major stride"); timestep shifting
# compensates for Gaussian noise at high resolution, and here the source is z_L, not noise. Wan's
# text-to-video default (shift 3) would give [1, 0.9, 0.75, 0.5, 0]: a base stride of 0.1.
FLOW_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}

SIGMA_T = 1.0
"""sigma_T, where the flow starts at z_L (Eq. 4 with sigma = 1, L73-75); the base runs only there."""
NUM_STEPS = 4
"""T, the speculative steps: one base step and T - 1 draft steps (L164)."""
ALPHA = 0.6
"""alpha, the refinement strength of the frequency-domain update (L164, chosen from Table 7)."""
FDU_FORMS = ("additive", "literal")
FDU_SIGMA = 1.5
"""Standard deviation (HR pixels) of the Gaussian whose complement is the FDU's high-pass `H`.

The paper names no filter (L148). A Gaussian is local (no wrap-around at frame or tile borders,
unlike an FFT mask) and does not ring; its response exp(-2 pi^2 sigma^2 f^2) is 1/2 at
f = 1/8 cycles per pixel, the Nyquist frequency of a x4 LR input, with sigma = 1.5. So the low band
kept from the base step is what the LR input determines, and the draft may change only what lies
beyond it. For another scale `s`, `0.375 * s` keeps that property.
"""


def uniform_kept_blocks(num_layers: int, num_kept: int) -> tuple[int, ...]:
    """The DiT blocks a pruned draft keeps: `num_kept` of `num_layers`, uniformly spaced, ending with the last.

    "Uniformly removing DiT blocks" (L136), 20 of 30 (L164): with 10 kept the spacing is exactly 3,
    but the paper leaves its phase open. Block `floor((j + 1) * N / K) - 1` is kept, so each kept
    block stands for the group of removed blocks before it and the last one is the base's last
    block, whose output (the base's final hidden state, fused into the draft's last block) is what
    the base's head reads. 10 of 30 gives (2, 5, ..., 29).

    Args:
        num_layers: N, blocks of the base.
        num_kept: K, blocks of the draft, `1 <= K <= N`.
    """
    if not 1 <= num_kept <= num_layers:
        raise ValueError(f"num_kept must be in [1, num_layers={num_layers}], got {num_kept}")
    return tuple((j + 1) * num_layers // num_kept - 1 for j in range(num_kept))


@dataclass
class DiscriminatorConfig:
    """The VGG-16-style latent discriminator (L114).

    Args:
        widths: channels of the five VGG-16 stages.
        depths: 3x3 convolutions per stage (VGG-16: 2, 2, 3, 3, 3).
        pools: stages followed by a 2x max-pool; latents are already 8x smaller than the frames, so
            only the first two pool (a 60 x 60 latent ends at 15 x 15 patch logits).
    """

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    depths: tuple[int, ...] = (2, 2, 3, 3, 3)
    pools: int = 2

    @classmethod
    def full(cls) -> DiscriminatorConfig:
        return cls()

    @classmethod
    def tiny(cls) -> DiscriminatorConfig:
        return cls(widths=(8, 8, 16, 16, 16))


@dataclass
class PSSRConfig:
    """Sizes and constants of the PS-SR networks.

    Args:
        transformer: `WanTransformer3DModel` keyword arguments of the base (Wan2.1-T2V-1.3B for `full`).
        vae: `AutoencoderKLWan` keyword arguments.
        scheduler: `FlowMatchEulerDiscreteScheduler` keyword arguments of the sampler (see
            `FLOW_SCHEDULER` for the shift).
        scale: the upscaling factor; LR frames are bicubic-upsampled by it before the VAE, so z_L
            and z_H have one shape.
        lora_rank: LoRA rank on every base block (32, L164).
        lora_alpha: LoRA alpha; None means alpha = rank (delta scale 1; the paper gives none).
        draft_layers: indices of the base blocks the draft keeps, in order (`uniform_kept_blocks`);
            stored so that a checkpoint never depends on the rule.
        prompt_length: tokens of the text condition (Wan's 512).
        base_model: Hub id or folder of Wan2.1-T2V-1.3B (diffusers layout) whose weights fill the
            base DiT and the VAE; when set, exported folders hold only what training made.
    """

    transformer: dict[str, Any] = field(default_factory=lambda: dict(WAN_T2V_1_3B_TRANSFORMER))
    vae: dict[str, Any] = field(default_factory=lambda: dict(WAN_VAE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLOW_SCHEDULER))
    scale: int = 4
    lora_rank: int = 32
    lora_alpha: float | None = None
    draft_layers: tuple[int, ...] = uniform_kept_blocks(30, 10)
    prompt_length: int = 512
    base_model: str | None = None

    @classmethod
    def full(cls) -> PSSRConfig:
        """Wan2.1-T2V-1.3B sizes, 10 of 30 blocks in the draft (random init; `base_model` loads weights)."""
        return cls()

    @classmethod
    def tiny(cls) -> PSSRConfig:
        """A few channels and 6 blocks (2 kept, the same 1/3), for CPU tests; the VAE keeps its factors."""
        transformer = {
            "patch_size": [1, 2, 2],
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 32,
            "freq_dim": 32,
            "ffn_dim": 48,
            "num_layers": 6,
        }
        vae = {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [],
               "temperal_downsample": [False, True, True]}
        return cls(transformer=transformer, vae=vae, lora_rank=4, draft_layers=uniform_kept_blocks(6, 2),
                   prompt_length=8)

    def replace(self, **changes: Any) -> PSSRConfig:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


# The flow (Eqs. 3-7) ----------------------------------------------------------------------------


def flow_interpolate(z_H: Tensor, z_L: Tensor, sigma: Tensor | float) -> Tensor:
    """Eq. (4): `z_t = (1 - sigma_t) z_H + sigma_t z_L`, the straight line from z_L (sigma 1) to z_H (sigma 0).

    The draft's training input `z_t = sigma_t z_L + (1 - sigma_t) z_H` (L138) is the same line.

    Args:
        z_H: HR latents.
        z_L: LR latents, same shape.
        sigma: sigma_t, a float or a tensor broadcastable to the latents (e.g. `(B, 1, 1, 1, 1)`).
    """
    return (1 - sigma) * z_H + sigma * z_L  # Eq. (4), PS-SR


def flow_noise(z0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Eq. (2): `z_t = (1 - sigma_t) z_0 + sigma_t eps`, the Gaussian flow the pretrained Wan DiT models.

    VSD noises the base's prediction this way. Eq. (8)'s definition (L112) writes
    `sigma_t z_H + (1 - sigma_t) eps`, which would make sigma = 1 the clean end; that contradicts
    Eq. (2) (L63) and the meaning of the pretrained DiT's timestep, so Eq. (2) is used.

    Args:
        z0: clean latents.
        noise: eps, same shape.
        sigma: sigma_t, a float or a tensor broadcastable to the latents.
    """
    return (1 - sigma) * z0 + sigma * noise  # Eq. (2), PS-SR


def velocity_l2(velocity: Tensor, z_L: Tensor, z_H: Tensor) -> Tensor:
    """Eq. (7): `L_L2 = E || phi(z) - (z_L - z_H) ||^2`, the mean squared error to the pair flow's velocity.

    The base predicts at z_L (L106); the draft at the interpolant z_t of L138 (Eq. 12 reuses Eq. 7,
    L142): along the straight line of Eq. (4) the velocity is `z_L - z_H` everywhere.

    Args:
        velocity: the predicted velocity `phi(z; t)`.
        z_L: LR latents.
        z_H: HR latents.
    """
    return F.mse_loss(velocity.float(), (z_L - z_H).float())  # Eq. (7), PS-SR


def speculative_scheduler(num_steps: int, config: dict[str, Any], device: torch.device | str | None = None
                          ) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler of the speculative sampler, set to `num_steps` steps.

    Wan's spacing, `sigmas = linspace(1, 0, T + 1)[:T]` (then shifted by `config["shift"]`, with the
    final 0 appended by diffusers), rather than `set_timesteps(T)`, whose last sigma is about 1e-3:
    that would spend one of the three draft steps, and a VAE decode, on an almost clean latent.
    `sigmas[i]` is the paper's `sigma_{T - i}` and `timesteps[i] = 1000 * sigmas[i]`; `sigmas[0] = 1`.

    Args:
        num_steps: T >= 1 (1: the base step alone).
        config: `FlowMatchEulerDiscreteScheduler` keyword arguments.
        device: where sigmas and timesteps live.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps, endpoint=False), device=device)
    # Step from index 0 without looking the timestep up (a device-to-host sync per step).
    scheduler.set_begin_index(0)
    return scheduler


def flow_step(scheduler: FlowMatchEulerDiscreteScheduler, velocity: Tensor, z: Tensor, timestep: Tensor
              ) -> tuple[Tensor, Tensor]:
    """Eqs. (5) and (6): one Euler step along the flow and the clean latent it predicts.

    `z_{t-1} = z_t - (sigma_t - sigma_{t-1}) phi(z_t; t)` (the diffusers scheduler's step, Eq. 3) and
    the latent the paper decodes into `x_{T-1}` (Eq. 5, from the base at `z_T = z_L`, `sigma_T = 1`)
    or into the draft's prediction `x~_{t-1}` (Eq. 6, L148): `z_{t-1} - sigma_{t-1} phi(z_t; t)`,
    which is `z_t - sigma_t phi(z_t; t)`, computed in that form (one rounding, and exactly
    `z_L - phi_base` for the base step, whatever T). Both in float32 whatever the DiT's dtype.

    Args:
        scheduler: from `speculative_scheduler`, at the step of `timestep`.
        velocity: `phi(z_t; t)`.
        z: z_t.
        timestep: `scheduler.timesteps[i]` of this step.

    Returns:
        `(z_{t-1}, z_t - sigma_t phi)`, float32.
    """
    velocity, z = velocity.float(), z.float()
    z_next = scheduler.step(velocity, timestep, z, return_dict=False)[0]  # Eqs. (5)/(6), z-part
    sigma = scheduler.sigmas[scheduler.step_index - 1]  # the step has moved the index on
    return z_next, z - sigma * velocity  # Eqs. (5)/(6), PS-SR: the latent E^{-1} decodes


# Frequency-domain update (Eqs. 13-14) -----------------------------------------------------------


def updated_high_band(y_high: Tensor, y_high_pred: Tensor, alpha: float, form: str = "additive") -> Tensor:
    """Eqs. (13)-(14): the new high band of the luminance from the current one and the draft's.

    `w = |Y~_H| / (|Y_H| + |Y~_H|)` element-wise (Eq. 13; 1/2 where both are 0, where the result is
    0 for any w), and `blend = w Y~_H + (1 - w) Y_H`. Then:

    - `"literal"`: Eq. (14) as printed (L154), `alpha * blend`. It rescales the whole high band by
      alpha at every step: even a draft that agrees with the current estimate shrinks it to alpha
      times, alpha^3 after T = 4's three draft steps.
    - `"additive"` (the zoo's default): `Y_H + alpha (blend - Y_H) = Y_H + alpha w (Y~_H - Y_H)`, the
      current estimate plus a filtered increment, the form of Eqs. (1) and (6) (L31, L89: `I + H o
      phi_draft`, "the identity operator preserves the foundational low-frequency content", L37).
      alpha = 0 returns the base output, alpha = 1 equals the literal form. Table 7 (L280-289)
      fits it: alpha = 0.2 scores LPIPS 0.2759, better than the base alone (T = 1, Table 5:
      0.2798), with PSNR just below T = 1's, and every metric moves away from T = 1 as alpha grows;
      the literal form would blur the base output most at the smallest alpha.

    Args:
        y_high: Y_H^t, the high band of the current estimate's luminance.
        y_high_pred: Y~_H^{t-1}, the high band of the draft prediction's luminance.
        alpha: the refinement strength.
        form: `"additive"` or `"literal"`.
    """
    if form not in FDU_FORMS:
        raise ValueError(f"form must be one of {', '.join(FDU_FORMS)}, got {form!r}")
    magnitude, magnitude_pred = y_high.abs(), y_high_pred.abs()
    total = magnitude + magnitude_pred
    # `where` on a clamped denominator: no 0/0, and no NaN gradient through the branch not taken.
    weight = torch.where(total > 0, magnitude_pred / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)  # Eq. (13)
    blend = weight * y_high_pred + (1 - weight) * y_high
    if form == "literal":
        return alpha * blend  # Eq. (14), PS-SR, as printed
    return y_high + alpha * (blend - y_high)  # Eq. (14), PS-SR, additive reading (Eqs. 1, 6)


def frequency_domain_update(x_t: Tensor, x_pred: Tensor, alpha: float, form: str = "additive",
                            sigma: float = FDU_SIGMA) -> Tensor:
    """Sec. 3.5: `x_{t-1}` from the current estimate `x_t` and the draft's decoded prediction `x~_{t-1}`.

    Both go to YUV (BT.601, `zoo.components.color`); their luminances `Y` are split into a low band
    `Y - H(Y)` and a high band `H(Y)`, with `H` the Gaussian high-pass of `FDU_SIGMA`. The new high
    band (`updated_high_band`, Eqs. 13-14) joins x_t's low band and chroma and goes back to RGB
    (L156). The inverse YUV matrix maps a luminance change `d` to `(d, d, d)` in RGB and leaves `U`,
    `V` alone, so that is `x_t + (Y_H' - Y_H)` on every channel, computed that way (no round trip
    error). Runs in float32.

    Args:
        x_t: the current estimate `(..., 3, H, W)` in [0, 1].
        x_pred: the draft's decoded prediction, same shape.
        alpha: the refinement strength.
        form: `"additive"` or `"literal"` (see `updated_high_band`).
        sigma: the high-pass Gaussian's standard deviation in pixels.

    Returns:
        `x_{t-1}`, float32, not clamped (the sampler clamps its output once).
    """
    if x_t.shape != x_pred.shape:
        raise ValueError(f"x_t and x_pred must have one shape, got {tuple(x_t.shape)} and {tuple(x_pred.shape)}")
    x_t, x_pred = x_t.float(), x_pred.float()
    y_high = high_pass(rgb_to_yuv(x_t, "bt601")[..., :1, :, :], "gaussian", sigma=sigma)
    y_high_pred = high_pass(rgb_to_yuv(x_pred, "bt601")[..., :1, :, :], "gaussian", sigma=sigma)
    return x_t + (updated_high_band(y_high, y_high_pred, alpha, form) - y_high)  # L156, PS-SR


# The draft (Sec. 3.4) ----------------------------------------------------------------------------


class FeatureFusion(nn.Linear):
    """`h <- W [h ; g] + b`: a draft block's output `h` and the base block's `g` back to the hidden size (L136).

    Initialised to `W = [I | 0]`, `b = 0`, so that it first returns `h` exactly and the draft starts
    as the pruned model.

    Args:
        dim: the hidden size D (the Linear maps 2D -> D).
    """

    def __init__(self, dim: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(2 * dim, dim, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        dim = self.out_features
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :dim].copy_(torch.eye(dim, device=self.weight.device, dtype=self.weight.dtype))
            self.bias.zero_()

    def forward(self, hidden: Tensor, base_hidden: Tensor) -> Tensor:
        return super().forward(torch.cat([hidden, base_hidden.to(hidden.dtype)], dim=-1))


def merged_lora_state(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """`model`'s state with every active peft LoRA folded into its base weight, under the plain model's keys.

    `W + (alpha / r) B A` through peft's own `get_delta_weight`; `model` is not changed.

    Args:
        model: a model with peft LoRA layers.
        skip: prefixes of state keys (and module names) to leave out, so that only the merged weights
            needed are made.
    """
    state = {key.replace(".base_layer", ""): value for key, value in model.state_dict().items()
             if "lora_" not in key and not key.startswith(skip)}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not f"{name}.".startswith(skip):
            for adapter in module.active_adapters:
                state[f"{name}.weight"] = state[f"{name}.weight"] + module.get_delta_weight(adapter)
    return state


class DraftTransformer(nn.Module):
    """phi_draft: the base DiT pruned to `kept` blocks, each followed by a fusion with the base's features.

    "Features from corresponding blocks in phi_base are concatenated channel-wise with those in
    phi_draft, followed by a fully-connected layer" (L136). Draft block `j` keeps the base's block
    `k = kept[j]`, and its output is fused with the output of base block `k` from the base's single
    pass at `(z_L, T)` (Eq. 5), the same features at every draft step. The paper leaves open whether
    block inputs or outputs are fused and which base block corresponds; outputs of the same block
    make the last fusion hand the base's final hidden state to the draft's head.

    Args:
        transformer: `WanTransformer3DModel` keyword arguments of the base (`num_layers` is replaced).
        kept: the kept base blocks, in order.
    """

    def __init__(self, transformer: dict[str, Any], kept: tuple[int, ...]) -> None:
        super().__init__()
        self.kept = tuple(kept)
        self.transformer = WanTransformer3DModel(**{**transformer, "num_layers": len(self.kept)})
        dim = transformer["num_attention_heads"] * transformer["attention_head_dim"]
        self.fusion = nn.ModuleList(FeatureFusion(dim) for _ in self.kept)
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_from(self, base: WanTransformer3DModel) -> None:
        """Start from the fine-tuned base with its LoRA merged (L136, L164), pruned to `kept`; fusions `[I | 0]`.

        Copies in place, so optimizers holding these parameters stay valid.
        """
        state = merged_lora_state(base, skip=("blocks.",))
        for j, k in enumerate(self.kept):  # merge only the kept blocks
            state.update({f"blocks.{j}.{key}": value for key, value in merged_lora_state(base.blocks[k]).items()})
        self.transformer.load_state_dict(state, strict=True)
        for fusion in self.fusion:
            fusion.reset_parameters()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block (with its fusion) in the backward pass instead of keeping its activations."""
        self.gradient_checkpointing = True

    @staticmethod
    def _fused_block(block: nn.Module, fusion: FeatureFusion, hidden: Tensor, base_hidden: Tensor,
                     context: Tensor, timestep_proj: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
        return fusion(block(hidden, context, timestep_proj, rotary), base_hidden)

    def forward(self, z: Tensor, timestep: Tensor, prompt_embeds: Tensor, base_hidden: list[Tensor]) -> Tensor:
        """phi_draft(z_t; t): the velocity `(B, C, F, H, W)`.

        `WanTransformer3DModel.forward` runs its blocks in one loop with no place for a second input,
        so this is that forward (embeddings, blocks, head; the diffusers modules themselves) with a
        fusion after every block.

        Args:
            z: z_t `(B, C, F, H, W)`.
            timestep: `1000 * sigma_t`, `(B,)`.
            prompt_embeds: the text condition `(B, L, text_dim)`.
            base_hidden: the outputs of the base's blocks `kept`, each `(B, F*H*W/4, D)`.
        """
        if len(base_hidden) != len(self.kept):
            raise ValueError(f"base_hidden must hold {len(self.kept)} block outputs, got {len(base_hidden)}")
        dit = self.transformer
        batch, _, frames, height, width = z.shape
        p_t, p_h, p_w = dit.config.patch_size
        rotary = dit.rope(z)
        hidden = dit.patch_embedding(z).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, context, _ = dit.condition_embedder(timestep, prompt_embeds, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        for block, fusion, features in zip(dit.blocks, self.fusion, base_hidden):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = checkpoint(self._fused_block, block, fusion, hidden, features, context, timestep_proj,
                                    rotary, use_reentrant=False)
            else:
                hidden = self._fused_block(block, fusion, hidden, features, context, timestep_proj, rotary)
        shift, scale = (dit.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (dit.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        out = dit.proj_out(hidden)
        out = out.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class LeanWanRMSNorm(WanRMS_norm):
    """diffusers' `WanRMS_norm` in fewer passes over the activation: the same parameters, values within rounding.

    diffusers casts a bf16 input to float32, normalises it (`F.normalize`: a norm, then a division of the whole
    float32 tensor), casts it back, then multiplies by the scale, by gamma and adds a bias of 0: seven kernels over
    the full tensor, about 18 times its bf16 size in memory traffic. The Wan VAE runs 71 of them per 720p output
    frame of PS-SR. Here the norm is taken in float32 straight from the input (`dtype=`), the per-pixel factor
    `scale / max(norm, 1e-12)` (F.normalize's eps) is a tensor without the channels, and the input is multiplied by
    it, then by gamma in place: three kernels over the full tensor, about 5 times its size. Written here because
    the module is diffusers' and only its forward changes (`use_lean_wan_modules`).
    """

    def _factor(self, x: Tensor) -> Tensor:
        if self.channel_first and runs_on_the_cpu(x, self.gamma):
            # The CPU's `vector_norm` reduces over a dimension that is not the innermost 1.4 to 28 times slower than
            # a batched dot product (2 threads: 75 → 2.7 ms at 4 channels x 6 x 256 x 256, 35 → 11 ms at 96 x 3 x
            # 180 x 320); both sum the squares in float32.
            wide = x.float()
            norm = torch.einsum("bc...,bc...->b...", wide, wide).unsqueeze(1).sqrt_()
        else:
            norm = torch.linalg.vector_norm(x, dim=1 if self.channel_first else -1, keepdim=True, dtype=torch.float32)
        return (self.scale / norm.clamp_min(1e-12)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = (x * self._factor(x)).mul_(self.gamma)
        return out + self.bias if isinstance(self.bias, nn.Parameter) else out  # diffusers adds a float 0.0

    def write(self, x: Tensor, out: Tensor) -> Tensor:
        """`forward(x)` written into `out` (a view of a larger buffer), to the bit; returns `out`. No autograd."""
        torch.mul(x, self._factor(x), out=out).mul_(self.gamma)
        return out.add_(self.bias) if isinstance(self.bias, nn.Parameter) else out


class LeanWanCausalConv3d(WanCausalConv3d):
    """diffusers' `WanCausalConv3d` with its spatial zero padding done by the convolution instead of a padded copy.

    diffusers pads every input in time and space with `F.pad` (a full copy, even of zero padding) and convolves it
    unpadded. Here the spatial padding is the convolution's own zero padding, the same sums; a copy is made only
    where the cached frames leave time padding to add.
    """

    def forward(self, x: Tensor, cache_x: Tensor | None = None) -> Tensor:
        pad_t = self._padding[4]
        if cache_x is not None and pad_t > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad_t -= cache_x.shape[2]
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        return self.convolve_padded(x)

    def convolve_padded(self, x: Tensor) -> Tensor:
        """The convolution of an input already padded in time (its `_padding[4]` frames in front)."""
        pad_w, _, pad_h = self._padding[:3]
        if x.dtype == self.weight.dtype == torch.float32 and runs_on_the_cpu(x, self.weight) \
                and torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available():
            # PyTorch sends a batch of one 3-D input whose channels x frames x rows are under 20,480 to its
            # unblocked `slow_conv3d`, as the tiny Wan VAE's are below about 850 output rows: oneDNN's kernel, which
            # it picks for the full-size VAE, is 3 to 11 times faster there (2 threads: 75 → 6.6 ms at 4 channels x
            # 6 x 256 x 256), within float32 rounding.
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, [0, pad_h, pad_w], list(self.stride),
                                                     list(self.dilation), self.groups)
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, pad_h, pad_w), self.dilation, self.groups)


class LeanWanResidualBlock(WanResidualBlock):
    """diffusers' `WanResidualBlock` with each activation written straight into its convolution's padded input.

    Decoding and encoding frame by frame, diffusers builds each causal convolution's input by concatenating the
    cached frames and the activation `silu(norm(x))` (a copy of the whole input; where the cache is short, `F.pad`
    copies it again to add zero frames). Here the input is one buffer: the zero frames and the cached frames are
    written at its front, and the norm and the activation write theirs behind them, so the activation is never
    copied. Per 720p output frame of PS-SR in bfloat16 (`benchmarks/counts/`): 36.1 → 4.1 concatenations, and
    210.4 → 179.5 GB moved.

    The convolutions see the same values in the same layout, up to the SiLU's last bit: the CPU's vectorised and
    scalar SiLU loops round float32 differently, and a row of the buffer's strided view ends them elsewhere (a tiny
    Wan VAE encodes and decodes to the bit in bfloat16, within 4.2e-6 in float32). Written here because the block
    is diffusers' and only its forward changes (`use_lean_wan_modules`).

    Where autograd records (PS-SR's training decodes with gradients; `out=` writes record none), under
    `torch.compile` (whose dynamo stops its graph at an `out=` write into a view, and whose inductor fuses the
    concatenation with the operators that make it), without a frame cache, or with an activation, dropout or cached
    frames this does not cover, diffusers' forward runs.
    """

    def forward(self, x: Tensor, feat_cache: list | None = None, feat_idx: list[int] = [0]) -> Tensor:  # noqa: B006
        if not self._runs_lean(feat_cache, feat_idx):
            return super().forward(x, feat_cache, feat_idx)
        shortcut = self.conv_shortcut(x)
        x = self._activate_and_convolve(x, self.norm1, self.conv1, feat_cache, feat_idx)
        x = self._activate_and_convolve(x, self.norm2, self.conv2, feat_cache, feat_idx)
        return x + shortcut

    def _runs_lean(self, feat_cache: list | None, feat_idx: list[int]) -> bool:
        if feat_cache is None or torch.is_grad_enabled() or not isinstance(self.nonlinearity, nn.SiLU):
            return False
        if torch.compiler.is_compiling():  # dynamo breaks the graph at `out=` into a view; inductor fuses the copies
            return False
        if self.training and self.dropout.p > 0:
            return False
        if not all(isinstance(norm, LeanWanRMSNorm) for norm in (self.norm1, self.norm2)):
            return False
        if not all(isinstance(conv, LeanWanCausalConv3d) for conv in (self.conv1, self.conv2)):
            return False
        # Each convolution's cached frames (None on the first call) must fit in front of its time padding.
        caches = feat_cache[feat_idx[0]:feat_idx[0] + 2]
        return all(cached is None or (isinstance(cached, Tensor) and cached.shape[2] <= conv._padding[4])
                   for cached, conv in zip(caches, (self.conv1, self.conv2)))

    @staticmethod
    def _activate_and_convolve(x: Tensor, norm: LeanWanRMSNorm, conv: LeanWanCausalConv3d, feat_cache: list,
                               feat_idx: list[int]) -> Tensor:
        """`conv(silu(norm(x)), cache)`, updating the frame cache as diffusers does."""
        index = feat_idx[0]
        cached = feat_cache[index]
        held = 0 if cached is None else cached.shape[2]
        pad, frames = conv._padding[4], x.shape[2]
        buffer = x.new_empty(x.shape[0], x.shape[1], pad + frames, *x.shape[3:])
        if held < pad:
            buffer[:, :, :pad - held].zero_()
        if held:
            buffer[:, :, pad - held:pad].copy_(cached)
        F.silu(norm.write(x, buffer[:, :, pad:]), inplace=True)
        # diffusers caches the activation's last 2 frames, or its only frame behind the last cached one.
        keep = min(2, frames + (1 if held else 0))
        feat_cache[index] = buffer[:, :, pad + frames - keep:].clone()
        feat_idx[0] += 1
        return conv.convolve_padded(buffer)


class LeanWanUpsample(WanUpsample):
    """diffusers' `WanUpsample` without its round trip through float32 where the mode only copies values.

    diffusers upsamples every input in float32 and casts the result back. A nearest-neighbour mode (the Wan VAE's
    is "nearest-exact") copies input values, and a half dtype's values pass through float32 unchanged, so the
    output is the same to the bit in the input's dtype, without the two casts (one of them over the upsampled
    frame). Per 720p output frame of PS-SR in bfloat16 (`benchmarks/counts/`): 179.5 → 168.4 GB moved.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.mode in ("nearest", "nearest-exact"):
            return nn.Upsample.forward(self, x)
        return super().forward(x)


LEAN_WAN_MODULES = {
    WanRMS_norm: LeanWanRMSNorm,
    WanCausalConv3d: LeanWanCausalConv3d,
    WanResidualBlock: LeanWanResidualBlock,
    WanUpsample: LeanWanUpsample,
}


def use_lean_wan_modules(vae: AutoencoderKLWan) -> int:
    """Run `vae`'s RMS norms, causal convolutions, residual blocks and upsamplers as their lean classes; returns how
    many (`zoo.components.lean.swap_classes`: parameters and names stay, only the forward changes)."""
    return swap_classes(vae, LEAN_WAN_MODULES)


def _keep_output(store: dict[int, Tensor], index: int, module: nn.Module, args: Any, output: Tensor) -> None:
    store[index] = output


# The generator -----------------------------------------------------------------------------------


# The parts of the Wan VAE (`AutoencoderKLWan`'s four children) a half cast of `PSSRNet` keeps in float32, by
# `float32_vae` setting. The default, "encoder", encodes in float32 and decodes in the DiTs' dtype:
# - The encoder makes z_L, which seeds the base step and every draft step after it, so its rounding reaches the
#   whole trajectory. FastVideo (hao-ai-lab/FastVideo#1472) and SGLang (sgl-project/sglang#32697) keep Wan's
#   encode in float32 for that reason; a bfloat16 encode took Matrix-Game-2.0's causal Wan rollout from SSIM 0.98
#   to 0.76 there.
# - The decoder's rounding reaches only the output. Both projects decode Wan2.1 in bfloat16 by default (MS-SSIM
#   0.9999 against float32 on the same latents, in FastVideo's PR). And the decoder is 31.4 of PS-SR's 41.2 TFLOP per
#   720p output frame: an eager frame's floor on an H200 (the roofline of `zoo bench --count-only`,
#   `benchmarks/counts/`) is 121.3 ms with it in float32, 74.2 ms decoding in bfloat16.
# "all" is the Wan pipelines' float32 VAE; "none" casts the encoder too.
FLOAT32_VAE_PARTS = {
    "encoder": ("encoder", "quant_conv"),
    "all": ("encoder", "quant_conv", "post_quant_conv", "decoder"),
    "none": (),
}


def check_float32_vae(parts: Any) -> None:
    """Raise `ValueError` unless `parts` names a `FLOAT32_VAE_PARTS` setting."""
    if parts not in FLOAT32_VAE_PARTS:
        raise ValueError(f"float32_vae must be one of {', '.join(FLOAT32_VAE_PARTS)}, got {parts!r}")


class PSSRNet(nn.Module):
    """PS-SR: the base `phi_base` (Wan DiT + LoRA), the draft `phi_draft`, the Wan VAE and the text condition.

    `prompt_embeds` is the empty prompt's UMT5 embedding (`encode_wan_prompt`, once `load_base` ran;
    zeros in a randomly initialised net), so no text encoder runs at inference. Casting the net to a
    half dtype (`.to(torch.bfloat16)`) keeps float32 islands: the DiTs' `_keep_in_fp32_modules` (as
    diffusers' `from_pretrained(torch_dtype=...)` does), the VAE's encoder (`FLOAT32_VAE_PARTS`; the
    decoder runs in the DiTs' dtype, and `set_float32_vae` changes which parts) and the latent
    statistics; the flow steps and the frequency-domain update run in float32.

    Args:
        config: sizes and constants.
    """

    def __init__(self, config: PSSRConfig) -> None:
        super().__init__()
        layers = config.transformer["num_layers"]
        kept = tuple(config.draft_layers)
        if not kept or list(kept) != sorted(set(kept)) or not 0 <= kept[0] <= kept[-1] < layers:
            raise ValueError(f"draft_layers must be increasing block indices in [0, {layers}), got {kept}")
        self.config = config
        self.base = WanTransformer3DModel(**config.transformer)
        self.base.requires_grad_(False)
        inject_lora(self.base, lora_config("wan_transformer", config.lora_rank, config.lora_alpha))
        self.draft = DraftTransformer(config.transformer, kept)
        self.vae = AutoencoderKLWan(**config.vae)
        use_lean_wan_modules(self.vae)
        self.vae.requires_grad_(False)
        self.float32_vae = "encoder"  # the VAE parts a half cast keeps in float32 (`set_float32_vae`)
        z_dim = self.vae.config.z_dim
        self.register_buffer("prompt_embeds", torch.zeros(1, config.prompt_length, config.transformer["text_dim"]))
        self.register_buffer("latents_mean", torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1),
                             persistent=False)

    @property
    def size_multiple(self) -> int:
        """LR sizes must divide by this: the upsampled frame must divide by the VAE factor times the DiT patch."""
        patch = self.config.transformer["patch_size"][1]
        hr_multiple = self.vae.spatial_compression_ratio * patch
        return hr_multiple // math.gcd(hr_multiple, self.config.scale)

    @property
    def dit_dtype(self) -> torch.dtype:
        """The DiTs' compute dtype (their float32 islands aside)."""
        return self.base.patch_embedding.weight.dtype

    # Float32 islands -----------------------------------------------------------------------------

    def set_float32_vae(self, parts: str) -> None:
        """Which parts of the VAE stay float32 under a half dtype: `"encoder"` (the default), `"all"` or `"none"`.

        Casts the VAE now, and sets what later casts of the net do with it (`FLOAT32_VAE_PARTS`). Casting back
        to float32 does not restore rounded weights.
        """
        check_float32_vae(parts)
        self.float32_vae = parts
        for name, child in self.vae.named_children():
            # diffusers' `ModelMixin.to` warns on any cast, so the plain module's.
            nn.Module.to(child, torch.float32 if name in FLOAT32_VAE_PARTS[parts] else self.dit_dtype)

    @property
    def vae_encoder_dtype(self) -> torch.dtype:
        """The dtype the VAE encodes in."""
        return self.vae.quant_conv.weight.dtype

    @property
    def vae_decoder_dtype(self) -> torch.dtype:
        """The dtype the VAE decodes in."""
        return self.vae.post_quant_conv.weight.dtype

    def _float32_islands(self) -> list[tuple[nn.Module, str, Tensor]]:
        islands: list[tuple[nn.Module, str, Tensor]] = []
        for model in (self.base, self.draft.transformer):
            keep = model._keep_in_fp32_modules or []
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if any(part in keep for part in name.split(".")):
                    owner, _, attr = name.rpartition(".")
                    islands.append((model.get_submodule(owner), attr, tensor))
        for part in FLOAT32_VAE_PARTS[self.float32_vae]:
            child = self.vae.get_submodule(part)
            for name, tensor in [*child.named_parameters(), *child.named_buffers()]:
                owner, _, attr = name.rpartition(".")
                islands.append((child.get_submodule(owner), attr, tensor))
        islands += [(self, "latents_mean", self.latents_mean), (self, "latents_std", self.latents_std)]
        return islands

    def _apply(self, fn: Any, recurse: bool = True) -> PSSRNet:
        # What the conversion does to a float32 tensor where the net is tells whether it casts to a half dtype, and
        # where the float32 islands go (a probe made elsewhere would send a `meta` net's islands off it).
        where = next((p.device for p in self.parameters()), None)
        probe = fn(torch.zeros((), dtype=torch.float32, device=where))
        if probe.dtype not in (torch.float16, torch.bfloat16):
            return super()._apply(fn, recurse)
        islands = [(owner, attr, tensor.detach()) for owner, attr, tensor in self._float32_islands()]
        super()._apply(fn, recurse)
        for owner, attr, tensor in islands:
            moved = tensor.to(probe.device)
            if attr in owner._parameters:
                owner._parameters[attr].data = moved
            else:
                owner._buffers[attr] = moved
        return self

    # Stages of the sampler -----------------------------------------------------------------------

    def check_frames(self, lr: Tensor) -> None:
        """Raise `ValueError` unless `lr` is `(B, T, 3, h, w)`, `T = 4n + 1`, `h`, `w` multiples of `size_multiple`."""
        if lr.ndim != 5 or lr.shape[2] != 3:
            raise ValueError(f"lr must be (B, T, 3, h, w), got {tuple(lr.shape)}")
        frames, height, width = lr.shape[1], *lr.shape[-2:]
        if (frames - 1) % 4:
            raise ValueError(f"lr must hold 4n + 1 frames (the Wan VAE's chunks), got {frames}; pad them "
                             f"(PSSRUpscaler does)")
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"lr frames must be multiples of {self.size_multiple} in size, got {height}x{width}; "
                             f"pad them (PSSRUpscaler does)")

    def upsample(self, lr: Tensor) -> Tensor:
        """LR frames bicubic-upsampled by `config.scale` to the HR size, clamped to [0, 1], float32."""
        batch, frames = lr.shape[:2]
        up = F.interpolate(lr.flatten(0, 1).float(), scale_factor=self.config.scale, mode="bicubic",
                           align_corners=False)
        return up.clamp(0, 1).unflatten(0, (batch, frames))

    def encode_frames(self, frames: Tensor) -> Tensor:
        """Normalised VAE latents `(B, 16, F, H/8, W/8)`, float32, of frames `(B, T, 3, H, W)` in [0, 1].

        The posterior mode (deterministic), normalised with the VAE's `latents_mean` / `latents_std`
        as the Wan pipelines do.
        """
        vae = self.vae
        video = (frames.transpose(1, 2) * 2 - 1).to(self.vae_encoder_dtype)
        latents = vae.encode(video).latent_dist.mode().float()
        return (latents - self.latents_mean) / self.latents_std

    def encode(self, lr: Tensor) -> Tensor:
        """z_L: the latents of LR frames `(B, T, 3, h, w)`, upsampled to the HR size first."""
        self.check_frames(lr)
        return self.encode_frames(self.upsample(lr))

    def decode(self, latents: Tensor) -> Tensor:
        """E^{-1}: frames `(B, T, 3, H, W)` in [0, 1], float32, of normalised latents (gradients flow)."""
        vae = self.vae
        video = vae.decode((latents.float() * self.latents_std + self.latents_mean).to(self.vae_decoder_dtype)).sample
        return ((video.float() + 1) / 2).transpose(1, 2)

    def dit_velocity(self, model: nn.Module, z: Tensor, timestep: Tensor | float) -> Tensor:
        """`model(z; t)` under the stored text condition, in the DiT's dtype.

        Args:
            model: a `WanTransformer3DModel` sharing this net's text conditioning (the base, or a VSD copy).
            z: latents `(B, C, F, H, W)`.
            timestep: `1000 * sigma`, a float or `(B,)`.
        """
        dtype = model.patch_embedding.weight.dtype
        timestep = torch.as_tensor(timestep, device=z.device, dtype=torch.float32).expand(z.shape[0])
        context = self.prompt_embeds.expand(z.shape[0], -1, -1).to(dtype)
        return model(z.to(dtype), timestep, context, return_dict=False)[0]

    def base_velocity(self, z_L: Tensor, *, capture: bool = False) -> tuple[Tensor, list[Tensor]]:
        """phi_base(z_L; T) at sigma_T = 1 (timestep 1000), and the outputs of the base blocks the draft keeps.

        Args:
            z_L: LR latents.
            capture: also return the kept blocks' outputs (the draft's features); else an empty list.
        """
        store: dict[int, Tensor] = {}
        handles = [self.base.blocks[k].register_forward_hook(functools.partial(_keep_output, store, k))
                   for k in (self.draft.kept if capture else ())]
        try:
            velocity = self.dit_velocity(self.base, z_L, SIGMA_T * self.config.scheduler["num_train_timesteps"])
        finally:
            for handle in handles:
                handle.remove()
        return velocity, [store[k] for k in self.draft.kept] if capture else []

    def draft_velocity(self, z: Tensor, timestep: Tensor | float, base_hidden: list[Tensor]) -> Tensor:
        """phi_draft(z_t; t) guided by the base's block outputs (from `base_velocity(..., capture=True)`)."""
        dtype = self.draft.transformer.patch_embedding.weight.dtype
        timestep = torch.as_tensor(timestep, device=z.device, dtype=torch.float32).expand(z.shape[0])
        context = self.prompt_embeds.expand(z.shape[0], -1, -1).to(dtype)
        return self.draft(z.to(dtype), timestep, context, base_hidden)

    def forward(self, lr: Tensor, *, num_steps: int = NUM_STEPS, alpha: float = ALPHA, fdu_form: str = "additive",
                fdu_sigma: float = FDU_SIGMA) -> Tensor:
        """The speculative sampler (Eqs. 5, 6, 13, 14): HR frames `(B, T, 3, s*h, s*w)` in [0, 1], float32.

        One base step from z_L to sigma_{T-1} gives `x_{T-1}` (Eq. 5); each of the T - 1 draft steps
        takes z one Euler step further (Eq. 6) and adds the high band of its decoded prediction to x
        through the frequency-domain update (Eqs. 13-14). The z-chain never reads x. T = 1 is the base
        model's one-step output `E^{-1}(z_L - phi_base(z_L; T))`. Padding and tiling are the
        pipeline's (`PSSRUpscaler`).

        Args:
            lr: LR frames `(B, T, 3, h, w)` in [0, 1], `T = 4n + 1`, `h`, `w` multiples of `size_multiple`.
            num_steps: T.
            alpha: the FDU's refinement strength.
            fdu_form: `"additive"` or `"literal"` (see `updated_high_band`).
            fdu_sigma: the FDU high-pass's Gaussian standard deviation in HR pixels.
        """
        z = self.encode(lr)
        scheduler = speculative_scheduler(num_steps, self.config.scheduler, z.device)
        timesteps = scheduler.timesteps
        velocity, base_hidden = self.base_velocity(z, capture=num_steps > 1)
        z, clean = flow_step(scheduler, velocity, z, timesteps[0])  # Eq. (5), PS-SR
        x = self.decode(clean)  # x_{T-1}
        for i in range(1, num_steps):
            velocity = self.draft_velocity(z, timesteps[i], base_hidden)
            z, clean = flow_step(scheduler, velocity, z, timesteps[i])  # Eq. (6), PS-SR
            x = frequency_domain_update(x, self.decode(clean), alpha, fdu_form, fdu_sigma)  # Eqs. (6), (13), (14)
        return x.clamp(0, 1)

    # Weights -------------------------------------------------------------------------------------

    def load_base(self, base_model: str | Path, *, prompt: str | None = "") -> None:
        """Fill the base DiT (under its LoRA) and the VAE with Wan2.1 weights (diffusers folder or Hub id).

        Args:
            base_model: folder with `transformer/` and `vae/` (and `text_encoder/`, `tokenizer/` for the
                prompt), or its Hub id.
            prompt: text whose UMT5 embedding becomes `prompt_embeds` (the paper conditions on none: "");
                None keeps the current one.
        """
        for target, cls, subfolder in ((self.base, WanTransformer3DModel, "transformer"),
                                       (self.vae, AutoencoderKLWan, "vae")):
            load_base_weights(target, cls.from_pretrained(base_model, subfolder=subfolder).state_dict(),
                              skip=lambda key: "lora_" in key,
                              what=f"{base_model} {subfolder} does not fit this config")
        if prompt is not None:
            self.prompt_embeds.copy_(encode_wan_prompt(base_model, [prompt], self.config.prompt_length))


@torch.no_grad()
def encode_wan_prompt(model: str | Path, prompts: list[str], max_length: int = 512,
                      dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Wan's UMT5 text condition `(len(prompts), max_length, D)`, float32, as the Wan pipelines compute it.

    The prompt's tokens (with their end token) are encoded under their attention mask, and the
    embedding is cut to them and zero-padded to `max_length`: the Wan DiT's cross-attention is not
    masked, so the zero rows count too (through the text projection's bias) and the length matters.

    Args:
        model: a folder (or Hub id, resolved by transformers) with `text_encoder/` and `tokenizer/`.
        prompts: the texts; `""` is the empty prompt.
        max_length: tokens of the result (Wan's 512).
        dtype: the encoder's dtype (UMT5-XXL has 5.7B parameters; Wan runs it in bfloat16).
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    hidden = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state.float()
    keep = tokens.attention_mask.bool()[..., None]
    return torch.where(keep, hidden, 0.0)


# The latent discriminator ----------------------------------------------------------------------


class LatentDiscriminator(nn.Module):
    """D of Eq. (9): a VGG-16-style network (L114) on each frame of 16-channel latents, patch logits out.

    VGG-16's 3x3 convolution stages, randomly initialised (ImageNet weights expect RGB, not latents),
    LeakyReLU(0.2) instead of ReLU (the usual GAN discriminator activation), max-pools after the first
    `config.pools` stages and a 1x1 convolution to one logit per patch. torchvision's VGG builder fixes
    3 input channels and ReLU, hence this small module.

    Args:
        config: widths, depths and pools.
        in_channels: latent channels.
    """

    def __init__(self, config: DiscriminatorConfig, in_channels: int = 16) -> None:
        super().__init__()
        if len(config.widths) != len(config.depths) or not 0 <= config.pools <= len(config.widths):
            raise ValueError(f"discriminator widths and depths must pair up and pools be at most their number, "
                             f"got {config}")
        self.config = config
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, (width, depth) in enumerate(zip(config.widths, config.depths)):
            for _ in range(depth):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
                channels = width
            if stage < config.pools:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 1, 1)
        # torchvision's VGG initialisation (He-normal over the fan-out, zero biases), for LeakyReLU(0.2). With
        # PyTorch's default (which scales each layer's output down about 3x in variance) the tiny config's 13
        # convolutions shrank an input's change to 1e-8 at the logits, below their rounding: for 70 of 200 seeds
        # the initial logits did not depend on the input at all, and gave the generator no adversarial gradient.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.2, mode="fan_out", nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)

    def forward(self, latents: Tensor) -> Tensor:
        """Logits `(B * F, 1, h', w')` of latents `(B, C, F, h, w)` (each frame judged on its own)."""
        frames = latents.transpose(1, 2).flatten(0, 1)
        return self.head(self.features(frames.to(self.head.weight.dtype)))
