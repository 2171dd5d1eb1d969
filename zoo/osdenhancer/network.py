"""OSDEnhancer networks: CogVideoX1.5-5B with the TR-SE mixture of LoRA experts and a bidirectional
deformable VAE decoder.

Paper: "OSDEnhancer: Taming Real-World Space-Time Video Super-Resolution with One-Step Diffusion"
(`../shared/papers/osdenhancer.txt`; `L<n>` below is a line of that file).

- `OSDEnhancerTransformer`: diffusers' `CogVideoXTransformer3DModel` whose blocks carry the temporal
  refinement (TR) expert of Eq. (5) (`OSDEnhancerBlock`: gated low-rank deltas on the video tokens of
  q/k/v/out and both feed-forward projections, gates from `ResidualPatchEmbed`) and, through peft, the
  spatial enhancement (SE) expert of Eq. (7) (adapter `TE_lora`, also on the final `proj_out`).
- `OSDEnhancerVAE`: diffusers' `AutoencoderKLCogVideoX` whose decoder (`BidirectionalDeformableDecoder`)
  runs a deformable recurrent block (`DeformableRecurrentBlock`, Eq. 9) before each up block.
- `OSDEnhancerNet`: both, the v-prediction schedule (`CogVideoXDPMScheduler`) and the precomputed empty
  prompt embedding; one step at t = 399 (Eq. 1).
- `pre_interpolate` / `temporal_residuals` / `upsample`: the inputs of Eqs. (2)-(3).

Parameter names follow the official checkpoint `W-Shuoyan/OSDEnhancer` (README L22 calls the TR expert
"TC", temporal coherence, and the SE expert "TE", texture enrichment), so its files load with
`strict=True` (see `zoo.osdenhancer.pipeline` for the loader). Pure `nn.Module`s; no Lightning import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import (
    CogVideoXCausalConv3d,
    CogVideoXDecoder3D,
    CogVideoXResnetBlock3D,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from torchvision.ops import DeformConv2d, deform_conv2d

from zoo.components.lean import runs_on_the_cpu, swap_classes
from zoo.components.lora import inject_lora, lora_config

SE_ADAPTER = "TE_lora"
"""peft adapter name of the SE expert in the official checkpoint ("texture enrichment")."""

# zai-org/CogVideoX1.5-5B transformer/config.json (../shared/base_configs.json "cogvx15_transformer").
COGVIDEOX15_TRANSFORMER: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 64,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 16,
    "max_text_seq_length": 226,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-05,
    "num_attention_heads": 48,
    "num_layers": 42,
    "ofs_embed_dim": None,
    "out_channels": 16,
    "patch_bias": False,
    "patch_size": 2,
    "patch_size_t": 2,
    "sample_frames": 81,
    "sample_height": 300,
    "sample_width": 300,
    "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "timestep_activation_fn": "silu",
    "use_learned_positional_embeddings": False,
    "use_rotary_positional_embeddings": True,
}

# zai-org/CogVideoX1.5-5B vae/config.json (../shared/base_configs.json "cogvx15_vae").
COGVIDEOX15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 3,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 0.7,
    "shift_factor": None,
    "temporal_compression_ratio": 4,
    "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
    "invert_scale_latents": True,
}

# The CogVideoX-5B v-prediction schedule (scheduler/scheduler_config.json of the 5B checkpoints, which
# the official `scheduler/` folder copies). Only randomly initialised networks use this dict: weights
# folders carry their own `scheduler/` and it is loaded from there.
COGVIDEOX_5B_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

# Deformable recurrent blocks: 8 deformable groups (torchvision ties them to the convolution groups) and
# 8 channel-attention heads, as in the official checkpoint; LeakyReLU slope of the alignment convolutions.
DEFORMABLE_GROUPS = 8
ATTENTION_HEADS = 8
LEAKY_SLOPE = 0.1


@dataclass
class OSDEnhancerConfig:
    """Sizes and constants of OSDEnhancer.

    Args:
        transformer: `CogVideoXTransformer3DModel` config (CogVideoX1.5-5B for `full`); the 1.5 layout
            (`patch_size_t` set, rotary embeddings, `gelu-approximate`) is required.
        vae: `AutoencoderKLCogVideoX` config (CogVideoX1.5-5B for `full`); four levels.
        scheduler: `CogVideoXDPMScheduler` config whose `alphas_cumprod` give Eq. (1).
        prompt_length: tokens of the precomputed empty-prompt embedding (226 for T5 in CogVideoX).
        timestep: t of the one step (399, L437).
        tr_rank: rank r of the TR expert (128, L437).
        tr_alpha: its alpha; the delta is scaled by alpha / r.
        se_rank: rank of the SE expert (128, L437); 0 builds the transformer without it (how official
            checkpoints load, see `zoo.osdenhancer.pipeline.OSDEnhancerUpscaler.from_pretrained`).
        se_alpha: its alpha.
    """

    transformer: dict[str, Any] = field(default_factory=lambda: dict(COGVIDEOX15_TRANSFORMER))
    vae: dict[str, Any] = field(default_factory=lambda: dict(COGVIDEOX15_VAE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(COGVIDEOX_5B_SCHEDULER))
    prompt_length: int = 226
    timestep: int = 399
    tr_rank: int = 128
    tr_alpha: float = 128.0
    se_rank: int = 128
    se_alpha: float = 128.0

    @classmethod
    def full(cls) -> OSDEnhancerConfig:
        """CogVideoX1.5-5B sizes, rank 128 experts (random init; weights come from a folder)."""
        return cls()

    @classmethod
    def tiny(cls) -> OSDEnhancerConfig:
        """Two 32-wide blocks and an 8-channel four-level VAE, for CPU tests.

        The VAE keeps four levels (8x space, 4x time): the deformable blocks' offset upsampling follows the
        decoder's up blocks. Block widths divide by the 8 deformable groups and attention heads, and the
        attention head size is a multiple of 16, which the 3-D rotary embedding splits 1/4 : 3/8 : 3/8.
        """
        transformer = {
            **COGVIDEOX15_TRANSFORMER,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "num_layers": 2,
            "in_channels": 4,
            "out_channels": 4,
            "max_text_seq_length": 8,
            "text_embed_dim": 32,
            "time_embed_dim": 32,
        }
        vae = {**COGVIDEOX15_VAE, "block_out_channels": [8, 8, 8, 8], "latent_channels": 4, "layers_per_block": 1,
               "norm_num_groups": 4}
        return cls(transformer=transformer, vae=vae, prompt_length=8, tr_rank=8, tr_alpha=8.0, se_rank=8,
                   se_alpha=8.0)

    def replace(self, **changes: Any) -> OSDEnhancerConfig:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


# Inputs, Eqs. (2)-(3) ---------------------------------------------------------------------

def interpolation_weights(k: int, num_interpolated: int) -> tuple[float, float]:
    """Eq. (2) weights `((K + 1 - k) / (K + 1), k / (K + 1))` of `I_{2n-1}` and `I_{2n+1}` for frame k of K.

    The first weight is computed as `1 - k / (K + 1)`, equal in exact arithmetic, because that is the
    float the official pre-interpolation multiplies by.
    """
    if not 1 <= k <= num_interpolated:
        raise ValueError(f"k must be in [1, K={num_interpolated}], got {k}")
    right = k / (num_interpolated + 1)
    return 1.0 - right, right


def pre_interpolate(frames: Tensor, temporal_scale: int) -> Tensor:
    """Eq. (2), L90: linear pre-interpolation of `K = temporal_scale - 1` frames between key frames.

    Args:
        frames: `I^in`, `(B, N, C, H, W)`.
        temporal_scale: output frames per input frame interval (`K + 1`).

    Returns:
        `((N - 1) * temporal_scale + 1)` frames: every input frame, with `K` blends
        `w0 I_{2n-1} + w1 I_{2n+1}` (`interpolation_weights`) after each but the last.
    """
    _check_temporal_scale(temporal_scale)
    if temporal_scale == 1:
        return frames
    num_interpolated = temporal_scale - 1
    out = [frames[:, :1]]
    for left, right in zip(frames.unbind(1)[:-1], frames.unbind(1)[1:]):
        for k in range(1, num_interpolated + 1):
            w_left, w_right = interpolation_weights(k, num_interpolated)
            out.append((w_left * left + w_right * right)[:, None])  # Eq. (2), OSDEnhancer
        out.append(right[:, None])
    return torch.cat(out, dim=1)


def temporal_residuals(frames: Tensor, temporal_scale: int) -> Tensor:
    """Eq. (3), L96-98: `I^Δ_{2n(k)} = Up(I_{2n+1}) - Up(I_{2n-1})` on interpolated frames, 0 on key frames.

    Args:
        frames: the upsampled key frames `Up(I^in)`, `(B, N, C, H, W)`.
        temporal_scale: `K + 1`.

    Returns:
        `((N - 1) * temporal_scale + 1)` residual frames aligned with `pre_interpolate`'s output, raw
        (in [-1, 1] for frames in [0, 1], not rescaled).
    """
    _check_temporal_scale(temporal_scale)
    zero = torch.zeros_like(frames[:, :1])
    out = [zero]
    for left, right in zip(frames.unbind(1)[:-1], frames.unbind(1)[1:]):
        difference = (right - left)[:, None]  # Eq. (3), OSDEnhancer
        out += [difference] * (temporal_scale - 1) + [zero]  # I^Δ_{2n-1} = 0 on key frames (L98)
    return torch.cat(out, dim=1)


def upsample(frames: Tensor, scale: float) -> Tensor:
    """Bilinear spatial upsampling `Up` (L92) of `(..., C, H, W)` by `scale >= 1`, then clamped to [0, 1].

    The size is `floor(H * scale) x floor(W * scale)`, sampled with `scale_factor` (source coordinates
    `(x + 0.5) / scale - 0.5`), as the official pipeline does: for a non-integer scale this differs from
    resampling to the output size. `scale == 1` only clamps.
    """
    if scale == 1:
        return frames.clamp(0, 1)
    flat = frames.reshape(-1, *frames.shape[-3:])
    up = F.interpolate(flat, scale_factor=scale, mode="bilinear", align_corners=False)
    return up.reshape(*frames.shape[:-2], *up.shape[-2:]).clamp(0, 1)


def _check_temporal_scale(temporal_scale: int) -> None:
    if not isinstance(temporal_scale, int) or isinstance(temporal_scale, bool) or temporal_scale < 1:
        raise ValueError(f"temporal_scale must be an int >= 1, got {temporal_scale!r}")


# TR expert, Eq. (5) -----------------------------------------------------------------------

class ResidualPatchEmbed(nn.Module):
    """The soft mask m of Eq. (5) (L118-120): a 3-D patch embedding of the residual latents z^Δ.

    `x = |clamp(z^Δ, -1, 1)|` is cut into the transformer's `(p_t, p, p)` patches in its patch-embedding
    order (tokens `(F/p_t, h/p, w/p)`, features `(C, p_t, p, p)`) and projected linearly, with bias, to
    one gate per token and output channel: `res_proj` for q/k/v/out and the second feed-forward
    projection, `res_ff0_proj` for the first (4x wider). The paper calls m "normalized" (L116) without
    saying how; the official model applies no normalisation or activation, so gates are unbounded and may
    be negative, and the zoo follows the checkpoint.

    Args:
        in_channels: latent channels C.
        patch_size: p.
        patch_size_t: p_t.
        dim: transformer width.
        ff_dim: width of the feed-forward hidden layer.
    """

    def __init__(self, in_channels: int, patch_size: int, patch_size_t: int, dim: int, ff_dim: int) -> None:
        super().__init__()
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        features = in_channels * patch_size * patch_size * patch_size_t
        self.res_proj = nn.Linear(features, dim)
        self.res_ff0_proj = nn.Linear(features, ff_dim)

    def forward(self, residual_latents: Tensor) -> tuple[Tensor, Tensor]:
        """Gates `(B, N_video, dim)` and `(B, N_video, ff_dim)` of residual latents `(B, F, C, h, w)`."""
        b, f, c, h, w = residual_latents.shape
        p, p_t = self.patch_size, self.patch_size_t
        x = residual_latents.clamp(-1, 1).abs().permute(0, 1, 3, 4, 2)
        x = x.reshape(b, f // p_t, p_t, h // p, p, w // p, p, c).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.flatten(4, 7).flatten(1, 3)
        return self.res_proj(x), self.res_ff0_proj(x)


class GatedLoRA(nn.Module):
    """The TR delta of one linear layer, Eq. (5): `m ⊙ (alpha / r) B_TR A_TR z` (no bias).

    A starts Kaiming-uniform and B at zero, so a new expert adds nothing. It lives next to the layer it
    adapts (`attn1.to_q_TC_lora` beside `attn1.to_q`), as in the official checkpoint.

    Unlike the SE expert (a peft adapter, folded into its base weight by `VideoUpscaler.merge_lora`), it
    cannot be merged for inference: its gate m differs per token and output channel and is computed from
    each chunk's residual latents, so `W z + m ⊙ B A z` is no fixed matrix times z; and it reaches the video
    tokens only, not the text tokens that share the layer. Both experts are always active (Eq. 7 sums
    them), so the SE merge is exact whatever the gate.

    Args:
        in_features: the adapted layer's input width.
        out_features: its output width.
        rank: r.
        alpha: alpha.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        """`gate ⊙ scaling · B A x` for video tokens `x (B, N, in)` and gates `(B, N, out)`."""
        delta = self.lora_B(self.lora_A(x))
        if self.scaling != 1:  # the published experts have alpha = r: times 1 is a pass over the delta for nothing
            delta = delta * self.scaling
        return delta * gate  # Eq. (5), OSDEnhancer: m ⊙ B_TR A_TR z


def add_to_video_tokens(x: Tensor, delta: Tensor, text_length: int) -> Tensor:
    """`x + [0_text; delta]`: a delta of the video tokens added after the text tokens of `x (B, L, C)`, in place.

    `x` is a projection's fresh output, which no backward needs (a linear layer's keeps its input), so it
    is updated in place rather than rebuilt by concatenation: the same values, without copying all of `x`.
    """
    x[:, text_length:] += delta
    return x


class TemporalRefinementAttnProcessor:
    """CogVideoX joint text-video attention with the TR expert's gated deltas on q, k, v and out.

    diffusers' `CogVideoXAttnProcessor2_0` with one change: the video tokens of q, k, v (before the q/k
    LayerNorms and the rotary embedding) and of the output projection receive
    `m ⊙ B_TR A_TR z` (Eq. 5); the text tokens are unchanged. Written here because diffusers has no hook
    inside its processor; the TR modules are `attn.to_q_TC_lora`, `to_k_TC_lora`, `to_v_TC_lora` and
    `to_out_TC_lora`.
    """

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Tensor | None = None, image_rotary_emb: tuple[Tensor, Tensor] | None = None,
                 tr_gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if tr_gate is None:
            raise ValueError("TemporalRefinementAttnProcessor needs tr_gate, the TR expert's mask m")
        text_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        video = hidden_states[:, text_length:]
        query = add_to_video_tokens(attn.to_q(hidden_states), attn.to_q_TC_lora(video, tr_gate), text_length)
        key = add_to_video_tokens(attn.to_k(hidden_states), attn.to_k_TC_lora(video, tr_gate), text_length)
        value = add_to_video_tokens(attn.to_v(hidden_states), attn.to_v_TC_lora(video, tr_gate), text_length)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_length:] = apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)
            key[:, :, text_length:] = apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = add_to_video_tokens(attn.to_out[0](hidden_states),
                                  attn.to_out_TC_lora(hidden_states[:, text_length:], tr_gate), text_length)
        out = attn.to_out[1](out)
        encoder_hidden_states, hidden_states = out.split([text_length, out.size(1) - text_length], dim=1)
        return hidden_states, encoder_hidden_states


class OSDEnhancerBlock(nn.Module):
    """A CogVideoX block with the TR expert (Eq. 5) on its six linear layers.

    It takes over the `norm1`, `attn1`, `norm2` and `ff` modules of a diffusers `CogVideoXBlock` (so the
    parameter names, and the SE adapter peft puts on them, stay diffusers') and adds beside them
    `attn1.to_{q,k,v,out}_TC_lora`, `ff.net.0.proj_TC_lora` (added before the GELU) and
    `ff.proj_out_TC_lora` (added after `ff.net.2`). Deltas reach the video tokens only. The gates ride in
    `attention_kwargs` (`tr_gate`, `tr_gate_ff0`), the one argument the stock transformer forward passes to
    its blocks.

    Args:
        block: the diffusers block whose modules this one adopts.
        rank: TR rank r.
        alpha: TR alpha.
    """

    def __init__(self, block: CogVideoXBlock, rank: int, alpha: float) -> None:
        super().__init__()
        self.norm1, self.attn1, self.norm2, self.ff = block.norm1, block.attn1, block.norm2, block.ff
        attn, ff = self.attn1, self.ff
        for name in ("to_q", "to_k", "to_v"):
            layer = getattr(attn, name)
            setattr(attn, f"{name}_TC_lora", GatedLoRA(layer.in_features, layer.out_features, rank, alpha))
        attn.to_out_TC_lora = GatedLoRA(attn.to_out[0].in_features, attn.to_out[0].out_features, rank, alpha)
        ff.net[0].proj_TC_lora = GatedLoRA(ff.net[0].proj.in_features, ff.net[0].proj.out_features, rank, alpha)
        ff.proj_out_TC_lora = GatedLoRA(ff.net[2].in_features, ff.net[2].out_features, rank, alpha)
        attn.set_processor(TemporalRefinementAttnProcessor())

    def feed_forward(self, x: Tensor, gate: Tensor, gate_ff0: Tensor, text_length: int) -> Tensor:
        """diffusers' `FeedForward` on text + video tokens `x` with the TR deltas of its two projections."""
        act, dropout, proj_out, *final = self.ff.net
        hidden = add_to_video_tokens(act.proj(x), act.proj_TC_lora(x[:, text_length:], gate_ff0), text_length)
        hidden = dropout(act.gelu(hidden))
        out = add_to_video_tokens(proj_out(hidden), self.ff.proj_out_TC_lora(hidden[:, text_length:], gate),
                                  text_length)
        for layer in final:
            out = layer(out)
        return out

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                image_rotary_emb: tuple[Tensor, Tensor] | None = None,
                attention_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        kwargs = dict(attention_kwargs or {})
        gate, gate_ff0 = kwargs.pop("tr_gate"), kwargs.pop("tr_gate_ff0")
        text_length = encoder_hidden_states.size(1)
        norm_hidden, norm_encoder, gate_msa, enc_gate_msa = self.norm1(hidden_states, encoder_hidden_states, temb)
        attn_hidden, attn_encoder = self.attn1(hidden_states=norm_hidden, encoder_hidden_states=norm_encoder,
                                               image_rotary_emb=image_rotary_emb, tr_gate=gate, **kwargs)
        hidden_states = hidden_states + gate_msa * attn_hidden
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder
        norm_hidden, norm_encoder, gate_ff, enc_gate_ff = self.norm2(hidden_states, encoder_hidden_states, temb)
        ff_out = self.feed_forward(torch.cat([norm_encoder, norm_hidden], dim=1), gate, gate_ff0, text_length)
        hidden_states = hidden_states + gate_ff * ff_out[:, text_length:]
        encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_out[:, :text_length]
        return hidden_states, encoder_hidden_states


class OSDEnhancerTransformer(CogVideoXTransformer3DModel):
    """CogVideoX1.5 transformer with the TR-SE mixture of LoRA experts (Eq. 7).

    Every block is an `OSDEnhancerBlock` (TR expert, Eq. 5) and `res_patch` computes its gates from the
    residual latents. With `se_rank > 0` the SE expert is a peft LoRA adapter `TE_lora` on `to_q`,
    `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2` and the final `proj_out` (L437), so each such
    layer computes `W0 z + m ⊙ B_TR A_TR z + B_SE A_SE z` (Eq. 7, L128).

    Arguments are `CogVideoXTransformer3DModel`'s plus the experts' ranks and alphas.
    """

    _no_split_modules: ClassVar[list[str]] = ["OSDEnhancerBlock", "CogVideoXPatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: int | None = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: int | None = None,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: int | None = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
        tr_rank: int = 128,
        tr_alpha: float = 128.0,
        se_rank: int = 128,
        se_alpha: float = 128.0,
    ) -> None:
        if patch_size_t is None or not use_rotary_positional_embeddings or activation_fn != "gelu-approximate":
            raise ValueError("OSDEnhancer needs the CogVideoX1.5 transformer layout: patch_size_t set, rotary "
                             "positional embeddings and activation_fn 'gelu-approximate'")
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=out_channels, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
            time_embed_dim=time_embed_dim, ofs_embed_dim=ofs_embed_dim, text_embed_dim=text_embed_dim,
            num_layers=num_layers, dropout=dropout, attention_bias=attention_bias, sample_width=sample_width,
            sample_height=sample_height, sample_frames=sample_frames, patch_size=patch_size,
            patch_size_t=patch_size_t, temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length, activation_fn=activation_fn,
            timestep_activation_fn=timestep_activation_fn, norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps, spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=use_rotary_positional_embeddings,
            use_learned_positional_embeddings=use_learned_positional_embeddings, patch_bias=patch_bias,
        )
        # The stock blocks are adopted rather than rebuilt: their modules (and initialisation) stay.
        self.transformer_blocks = nn.ModuleList(
            OSDEnhancerBlock(block, tr_rank, tr_alpha) for block in self.transformer_blocks)
        dim = num_attention_heads * attention_head_dim
        self.res_patch = ResidualPatchEmbed(in_channels, patch_size, patch_size_t, dim, 4 * dim)
        if se_rank:
            # Eq. (7), OSDEnhancer: the SE expert B_SE A_SE z beside W0 z and the TR delta, on the final proj_out too.
            inject_lora(self, lora_config("cogvideox_transformer", se_rank, se_alpha, extra_targets=("proj_out",)),
                        SE_ADAPTER)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, res_hidden_states: Tensor,
                timestep: Tensor, image_rotary_emb: tuple[Tensor, Tensor] | None = None,
                return_dict: bool = True) -> Any:
        """The velocity `v` `(B, F, C, h, w)` of latents `z` (`hidden_states`) given residual latents z^Δ.

        Args:
            hidden_states: z `(B, F, C, h, w)`, F a multiple of `patch_size_t`.
            encoder_hidden_states: the prompt embedding `(B, L, D)`.
            res_hidden_states: z^Δ, the shape of `hidden_states`.
            timestep: `(B,)`.
            image_rotary_emb: the 3-D rotary embedding (`rotary_embedding`).
            return_dict: as diffusers.
        """
        gate, gate_ff0 = self.res_patch(res_hidden_states)
        return super().forward(hidden_states, encoder_hidden_states, timestep, image_rotary_emb=image_rotary_emb,
                               attention_kwargs={"tr_gate": gate, "tr_gate_ff0": gate_ff0}, return_dict=return_dict)


# Bidirectional deformable VAE decoder, Eq. (9) ------------------------------------------------

class ModulatedDeformConv(nn.Module):
    """DCN(·) of Eq. (9): a modulated deformable 3x3 convolution (DCNv2) driven by an offset feature.

    From the offset feature δ, `conv_offset` predicts `(Δy, Δx)` per deformable group and kernel tap
    (torchvision's channel order: `2 (9 g + k)` is Δy, `+1` is Δx) and `conv_mask` the modulation
    `sigmoid` per tap; torchvision's `DeformConv2d` (8 groups: weight `(C, C / 8, 3, 3)`) samples the
    neighbour feature. Both start at zero (offsets 0, masks 0.5), as a plain convolution.

    It always computes in float32 (autocast off): its parameters stay float32 when the model is cast to
    half precision (`_apply`), and inputs are cast up and the output back, because bilinear sampling at
    fractional offsets loses whole pixels of accuracy in bfloat16.

    Args:
        channels: feature channels C (a multiple of 8).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = 9 * DEFORMABLE_GROUPS
        self.conv_offset = nn.Conv2d(channels, 2 * taps, 3, padding=1)
        self.conv_mask = nn.Conv2d(channels, taps, 3, padding=1)
        self.deform = DeformConv2d(channels, channels, 3, padding=1, groups=DEFORMABLE_GROUPS)
        for conv in (self.conv_offset, self.conv_mask):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.kaiming_normal_(self.deform.weight, nonlinearity="leaky_relu")
        nn.init.zeros_(self.deform.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> ModulatedDeformConv:
        def keep_float32(tensor: Tensor) -> Tensor:
            out = fn(tensor)
            return out.float() if out.is_floating_point() else out

        return super()._apply(keep_float32, recurse)

    def forward(self, neighbour: Tensor, offset_feature: Tensor) -> Tensor:
        # Weights are cast too: sharded training hands modules low-precision copies of their parameters.
        with torch.autocast(neighbour.device.type, enabled=False):
            feature = offset_feature.float()
            offset = F.conv2d(feature, self.conv_offset.weight.float(), self.conv_offset.bias.float(), padding=1)
            mask = torch.sigmoid(F.conv2d(feature, self.conv_mask.weight.float(), self.conv_mask.bias.float(),
                                          padding=1))
            out = deform_conv2d(neighbour.float(), offset, self.deform.weight.float(), self.deform.bias.float(),
                                padding=(1, 1), mask=mask)
        return out.to(neighbour.dtype)


class DeformableAlignment(nn.Module):
    """The alignment of Eq. (9): offset δ_i^l from `(x_i, y_{i-1})` and the lower level, then DCN.

    `δ = lrelu(offset_conv2(lrelu(offset_conv12([lrelu(offset_conv1([x, y])), 2 Up(δ^{l-1})]))))`
    (`offset_conv12` only with a lower level; PCD-style, ref. [47]); `ỹ = lrelu(DCN(y, δ))`. The lower
    offset arrives already upsampled and projected (`OffsetUpsample`); doubling it follows the doubled
    resolution, as in the official model.

    Args:
        channels: C.
        has_lower: whether a lower level passes its offsets.
    """

    def __init__(self, channels: int, has_lower: bool) -> None:
        super().__init__()
        self.offset_conv1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.offset_conv12 = nn.Conv2d(2 * channels, channels, 3, padding=1) if has_lower else None
        self.offset_conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.dcn_pack = ModulatedDeformConv(channels)

    def forward(self, current: Tensor, neighbour: Tensor, lower: Tensor | None) -> tuple[Tensor, Tensor]:
        """`(ỹ_{i-1}, δ_i)` for the current feature x_i and the propagated neighbour y_{i-1}, `(B, C, H, W)`."""
        offset = F.leaky_relu(self.offset_conv1(torch.cat([current, neighbour], dim=1)), LEAKY_SLOPE)
        if self.offset_conv12 is not None and lower is not None:
            offset = F.leaky_relu(self.offset_conv12(torch.cat([offset, lower * 2], dim=1)), LEAKY_SLOPE)
        offset = F.leaky_relu(self.offset_conv2(offset), LEAKY_SLOPE)  # δ_i^l, Eq. (9)
        aligned = F.leaky_relu(self.dcn_pack(neighbour, offset), LEAKY_SLOPE)  # ỹ_{i-1}^l = DCN(y_{i-1}^l, δ_i^l)
        return aligned, offset


class ChannelCrossAttention(nn.Module):
    """attn(x_i, ỹ_{i-1}) of Eq. (9): Restormer-style channel attention, queries from x, keys/values from ỹ.

    Per head h (8 heads of C/8 channels): `q = dw(W_q x)`, `[k, v] = dw(W_kv ỹ)`, L2-normalised over
    positions, `A = softmax(q kᵀ · τ_h)` (a C/8 x C/8 matrix), `out = x + project_out(A v)`.
    `project_out` starts at zero, so a new block is the identity.

    Args:
        channels: C (a multiple of the 8 heads).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.heads = ATTENTION_HEADS
        self.temperature = nn.Parameter(torch.ones(self.heads, 1, 1))
        self.q_proj = nn.Conv2d(channels, channels, 1, bias=False)
        self.kv_proj = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.q_dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.kv_dwconv = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)
        nn.init.zeros_(self.project_out.weight)

    def forward(self, x: Tensor, neighbour: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.q_dwconv(self.q_proj(x)).view(b, self.heads, c // self.heads, h * w)
        k, v = self.kv_dwconv(self.kv_proj(neighbour)).chunk(2, dim=1)
        k = k.reshape(b, self.heads, c // self.heads, h * w)
        v = v.reshape(b, self.heads, c // self.heads, h * w)
        attention = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        out = (attention.softmax(dim=-1) @ v).view(b, c, h, w)
        return self.project_out(out) + x  # y_i^l = attn(x_i^l, ỹ_{i-1}^l), Eq. (9)


class OffsetUpsample(nn.Module):
    """Up(δ^{l-1}) of Eq. (9): the lower level's offsets brought to this level's frames and size.

    Nearest upsampling over (T, H, W) by the factors of the up block between the two levels, then a
    per-frame 3x3 convolution from the lower width to this level's (`conv`).

    Args:
        lower_channels: width of the lower level.
        channels: width of this level.
        temporal_scale: frames per lower frame (2 where the up block compresses time, else 1).
        spatial_scale: pixels per lower pixel.
    """

    def __init__(self, lower_channels: int, channels: int, temporal_scale: int, spatial_scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(lower_channels, channels, 3, padding=1)
        self.temporal_scale, self.spatial_scale = temporal_scale, spatial_scale

    def forward(self, offsets: Tensor) -> Tensor:
        """`(B, C', P, H', W')` -> `(B, C, temporal_scale P, spatial_scale H', spatial_scale W')`."""
        scale = (float(self.temporal_scale), float(self.spatial_scale), float(self.spatial_scale))
        up = F.interpolate(offsets, scale_factor=scale, mode="nearest")
        b, t = up.shape[0], up.shape[2]
        out = self.conv(up.transpose(1, 2).flatten(0, 1))
        return out.unflatten(0, (b, t)).transpose(1, 2)


class DeformableRecurrentBlock(nn.Module):
    """A DRB (Eq. 9, L151-153): recurrent deformable propagation over the frames of one decoder level.

    Frames are visited in one temporal direction; frame i is compensated from the propagated previous one:
    `(ỹ_{i-1}, δ_i) = align(x_i, y_{i-1}, Up(δ^{l-1})_i)`, `y_i = attn(x_i, ỹ_{i-1})`; the first frame
    visited passes unchanged. Offsets are indexed by frame pair (j, j+1) in both directions.

    Across the VAE's frame batches, the last output frame is kept (`cache`) and prepended to the next
    batch: forward levels continue through it, backward levels restart in each batch (it is visited last
    and dropped), so forward information flows through the whole chunk and backward information within
    decode batches (L153).

    Args:
        channels: width of this level.
        lower: `(lower_channels, temporal_scale, spatial_scale)` of the level below, None for the first.
    """

    def __init__(self, channels: int, lower: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.ver_align = OffsetUpsample(lower[0], channels, lower[1], lower[2]) if lower is not None else None
        self.align = DeformableAlignment(channels, has_lower=lower is not None)
        self.attn = ChannelCrossAttention(channels)

    def forward(self, hidden_states: Tensor, cache: Tensor | None, lower_offsets: Tensor | None,
                reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Propagate over `(B, C, T, H, W)`.

        Args:
            hidden_states: this batch's frames x.
            cache: the previous batch's last output frame `(B, C, 1, H, W)`, or None.
            lower_offsets: offsets of the level below `(B, C', P', H', W')` (sign already matching this
                level's direction), or None.
            reverse: visit frames last to first.

        Returns:
            The output frames y (the cache frame removed), the new cache, and this level's offsets
            `(B, C, P, H, W)` for the P frame pairs including the cache frame (None for a lone frame).
        """
        frames = hidden_states if cache is None else torch.cat([cache, hidden_states], dim=2)
        frames = list(frames.unbind(2))
        num_pairs = len(frames) - 1
        lower: list[Tensor | None] = [None] * num_pairs
        if self.ver_align is not None and lower_offsets is not None:
            lower = list(self.ver_align(lower_offsets).unbind(2))
            if len(lower) != num_pairs:
                raise ValueError(f"the lower level passes offsets for {len(lower)} frame pairs, this level has "
                                 f"{num_pairs}")
        offsets: list[Tensor | None] = [None] * num_pairs
        order = range(num_pairs - 1, -1, -1) if reverse else range(1, num_pairs + 1)
        for i in order:
            neighbour = i + 1 if reverse else i - 1
            pair = min(i, neighbour)
            # Eq. (9), OSDEnhancer: (ỹ_{i-1}, δ_i) = align(x_i, y_{i-1}, Up(δ^{l-1})), y_i = attn(x_i, ỹ_{i-1}).
            aligned, offsets[pair] = self.align(frames[i], frames[neighbour], lower[pair])
            frames[i] = self.attn(frames[i], aligned)
        if cache is not None:
            frames = frames[1:]
        out = torch.stack(frames, dim=2)
        return out, out[:, :, -1:].clone(), torch.stack(offsets, dim=2) if num_pairs else None


class BidirectionalDeformableDecoder(CogVideoXDecoder3D):
    """CogVideoX's causal 3-D decoder with a DRB before each up block (`up_deformable_blocks`, Fig. 3).

    Levels alternate direction, backward first (backward, forward, backward, forward), and each passes
    its offsets to the next, negated because the direction flips (L153). Arguments are
    `CogVideoXDecoder3D`'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        widths = [block.resnets[0].in_channels for block in self.up_blocks]
        temporal_levels = int(math.log2(kwargs.get("temporal_compression_ratio", 4)))
        blocks = []
        for i, width in enumerate(widths):
            lower = None
            if i > 0:
                # The up block between level i-1 and i doubles space, and time while time is still compressed.
                lower = (widths[i - 1], 2 if i - 1 < temporal_levels else 1, 2)
            blocks.append(DeformableRecurrentBlock(width, lower))
        self.up_deformable_blocks = nn.ModuleList(blocks)

    def _run(self, module: nn.Module, *args: Any) -> Any:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def forward(self, sample: Tensor, temb: Tensor | None = None,
                conv_cache: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        conv_cache = conv_cache or {}
        cache: dict[str, Any] = {}
        hidden, cache["conv_in"] = self.conv_in(sample, conv_cache=conv_cache.get("conv_in"))
        hidden, cache["mid_block"] = self._run(self.mid_block, hidden, temb, sample, conv_cache.get("mid_block"))
        offsets = None
        for i, (drb, up_block) in enumerate(zip(self.up_deformable_blocks, self.up_blocks)):
            reverse = i % 2 == 0  # backward, forward, backward, forward (L153)
            if offsets is not None:
                offsets = -offsets  # δ of pair (j, j+1) seen from the other direction
            hidden, cache[f"drb_{i}"], offsets = self._run(drb, hidden, conv_cache.get(f"drb_{i}"), offsets, reverse)
            hidden, cache[f"up_block_{i}"] = self._run(up_block, hidden, temb, sample,
                                                       conv_cache.get(f"up_block_{i}"))
        hidden, cache["norm_out"] = self.norm_out(hidden, sample, conv_cache=conv_cache.get("norm_out"))
        hidden = self.conv_act(hidden)
        hidden, cache["conv_out"] = self.conv_out(hidden, conv_cache=conv_cache.get("conv_out"))
        return hidden, cache


class LeanCogVideoXResnetBlock3D(CogVideoXResnetBlock3D):
    """diffusers' `CogVideoXResnetBlock3D` with each activation written straight into its causal convolution's input.

    diffusers' `CogVideoXCausalConv3d` concatenates the cached frames (or the first frame, twice) in front of the
    activation `silu(norm(x))`: a copy of the whole activation before each of the block's two convolutions. Here the
    activation is written by the SiLU into one buffer behind the cached frames, so it is never copied. The values
    and the cache are diffusers'.

    On real CPU tensors diffusers' forward runs: the CPU's vectorised and scalar SiLU loops round float32
    differently, and the buffer's strided view ends them elsewhere wherever a channel's frames x rows x columns
    are not a multiple of 16 (a tiny VAE decoded 1.5e-6 apart), while the official weights' CPU outputs are
    matched to the bit (`tests/osdenhancer/test_official_parity.py`). A GPU's elementwise kernels compute each
    value alone, so they write the same values into either layout.

    Where autograd records (the decoder trains with gradients; `out=` writes record none), under `torch.compile`
    (dynamo stops its graph at an `out=` write into a view; inductor fuses the concatenation anyway), with a time
    embedding, a replicate-padded or one-frame kernel, an unexpected cache, or dropout in training, diffusers'
    forward runs too. Written here because the block is diffusers' and only its forward changes (`OSDEnhancerVAE`
    swaps the class: parameters and names stay).
    """

    def forward(self, inputs: Tensor, temb: Tensor | None = None, zq: Tensor | None = None,
                conv_cache: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        conv_cache = conv_cache or {}
        if not self._runs_lean(inputs, temb, conv_cache):
            return super().forward(inputs, temb, zq, conv_cache)
        cache: dict[str, Tensor] = {}
        hidden = inputs
        for norm, conv in (("norm1", "conv1"), ("norm2", "conv2")):
            if zq is not None:
                hidden, cache[norm] = getattr(self, norm)(hidden, zq, conv_cache=conv_cache.get(norm))
            else:
                hidden = getattr(self, norm)(hidden)
            hidden, cache[conv] = _activate_and_convolve(hidden, getattr(self, conv), conv_cache.get(conv))
        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                inputs, cache["conv_shortcut"] = self.conv_shortcut(inputs, conv_cache=conv_cache.get("conv_shortcut"))
            else:
                inputs = self.conv_shortcut(inputs)
        return hidden + inputs, cache

    def _runs_lean(self, inputs: Tensor, temb: Tensor | None, conv_cache: dict[str, Tensor]) -> bool:
        if temb is not None or torch.is_grad_enabled() or torch.compiler.is_compiling() or runs_on_the_cpu(inputs):
            return False
        if not isinstance(self.nonlinearity, nn.SiLU) or (self.training and self.dropout.p > 0):
            return False
        for name in ("conv1", "conv2"):
            conv, cached = getattr(self, name), conv_cache.get(name)
            if conv.pad_mode == "replicate" or conv.time_kernel_size < 2:
                return False
            if cached is not None and cached.shape[2] != conv.time_kernel_size - 1:
                return False
        return True


def _activate_and_convolve(x: Tensor, conv: CogVideoXCausalConv3d, cached: Tensor | None) -> tuple[Tensor, Tensor]:
    """`conv(silu(x), cached)` and its new cache, as diffusers computes them, without concatenating."""
    pad = conv.time_kernel_size - 1
    buffer = x.new_empty(x.shape[0], x.shape[1], pad + x.shape[2], *x.shape[3:])
    torch.ops.aten.silu.out(x, out=buffer[:, :, pad:])
    if cached is None:  # diffusers repeats the activation's first frame in front of it
        buffer[:, :, :pad].copy_(buffer[:, :, pad:pad + 1].expand(-1, -1, pad, -1, -1))
    else:
        buffer[:, :, :pad].copy_(cached)
    return conv.conv(buffer), buffer[:, :, -pad:].clone()


def use_lean_resnet_blocks(vae: nn.Module) -> int:
    """Run `vae`'s CogVideoX residual blocks as `LeanCogVideoXResnetBlock3D`; returns how many."""
    return swap_classes(vae, {CogVideoXResnetBlock3D: LeanCogVideoXResnetBlock3D})


class OSDEnhancerVAE(AutoencoderKLCogVideoX):
    """CogVideoX's 3-D causal VAE with the bidirectional deformable decoder (Sec. 3.4).

    Arguments are `AutoencoderKLCogVideoX`'s. The stock decoder it builds is replaced by a
    `BidirectionalDeformableDecoder` of the same arguments (its weights are those of the stock decoder
    plus `decoder.up_deformable_blocks`), so every encode/decode path of diffusers (frame batches, tiling,
    slicing) runs the deformable blocks.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4,
        up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        latent_channels: int = 16,
        layers_per_block: int = 3,
        act_fn: str = "silu",
        norm_eps: float = 1e-6,
        norm_num_groups: int = 32,
        temporal_compression_ratio: float = 4,
        sample_height: int = 480,
        sample_width: int = 720,
        scaling_factor: float = 1.15258426,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        invert_scale_latents: bool = False,
    ) -> None:
        if len(block_out_channels) != 4:
            raise ValueError(f"OSDEnhancer's decoder needs a four-level VAE, got block_out_channels "
                             f"{list(block_out_channels)}")
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, down_block_types=down_block_types,
            up_block_types=up_block_types, block_out_channels=block_out_channels, latent_channels=latent_channels,
            layers_per_block=layers_per_block, act_fn=act_fn, norm_eps=norm_eps, norm_num_groups=norm_num_groups,
            temporal_compression_ratio=temporal_compression_ratio, sample_height=sample_height,
            sample_width=sample_width, scaling_factor=scaling_factor, shift_factor=shift_factor,
            latents_mean=latents_mean, latents_std=latents_std, force_upcast=force_upcast,
            use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            invert_scale_latents=invert_scale_latents,
        )
        self.decoder = BidirectionalDeformableDecoder(
            in_channels=latent_channels, out_channels=out_channels, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
            norm_eps=norm_eps, norm_num_groups=norm_num_groups, temporal_compression_ratio=temporal_compression_ratio,
        )
        use_lean_resnet_blocks(self)

    def untiled_pixel_limit(self, frames: int) -> int:
        """The most pixels per frame that this VAE decodes untiled in a clip of `frames` frames (`4n + 1`).

        diffusers' `CogVideoXSafeConv3d` splits a convolution's input along time into `int(G / 2) + 1` parts once
        it holds G > 2 GiB at 2 bytes per value (whatever the dtype), and a part shorter than the kernel fails
        inside torch ("Kernel size can't be greater than actual input size"): at 1088x1920 the decoder fails so.
        The widest convolutions at full resolution are the last up block's first ones (256 channels in
        CogVideoX1.5); each runs on one frame batch (`num_latent_frames_batch_size` latents, the first batch with
        the remainder) upsampled in time, plus the causal kernel's padding. The encoder's full-resolution
        convolutions (128 channels, at most 11 frames with padding) allow more pixels.
        """
        conv = self.decoder.up_blocks[-1].resnets[0].conv1.conv
        channels, kernel = conv.in_channels, conv.kernel_size[0]
        latent_frames = (frames - 1) // int(self.config.temporal_compression_ratio) + 1
        batch = self.num_latent_frames_batch_size
        batches = {batch + latent_frames % batch, batch} if latent_frames >= 2 * batch else {max(latent_frames, 1)}
        limit = None
        for batch_frames in batches:
            for block in self.decoder.up_blocks:  # time doubles at each compressing upsampler, the first frame kept
                upsampler = block.upsamplers[0] if block.upsamplers else None
                if upsampler is not None and upsampler.compress_time and batch_frames > 1:
                    batch_frames = 2 * batch_frames - 1 if batch_frames % 2 else 2 * batch_frames
            padded = batch_frames + kernel - 1
            parts = max(p for p in range(1, padded + 1) if -(-padded // p) >= kernel)  # ceil(T / p) >= kernel
            # int(G / 2) + 1 <= parts  <=>  G < 2 * parts, with G = channels * padded * pixels * 2 / 2**30.
            pixels = (parts * 2**30 - 1) // (channels * padded)
            limit = pixels if limit is None else min(limit, pixels)
        return limit


# Everything together ------------------------------------------------------------------------

def rotary_embedding(config: Any, latents: Tensor) -> tuple[Tensor, Tensor]:
    """The CogVideoX1.5 3-D rotary embedding of latents `(B, F, C, h, w)` for a transformer `config`.

    diffusers' "slice" grid over the token grid `(F / p_t, h / p, w / p)`, with the grid itself as its
    maximum size (the official pipeline's choice; diffusers' CogVideoX pipeline passes the training size,
    which gives the same prefix of frequencies and fails beyond it).
    """
    p, p_t = config.patch_size, config.patch_size_t
    f, _, h, w = latents.shape[1:]
    grid = (h // p, w // p)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                   temporal_size=(f + p_t - 1) // p_t, grid_type="slice", max_size=grid,
                                   device=latents.device)


class OSDEnhancerNet(nn.Module):
    """Transformer + VAE + v-prediction schedule + the empty-prompt embedding (L163).

    Videos are `(B, 3, T, H, W)` (the VAE's layout) in [-1, 1], `T = 8n + 1`, `H` and `W` multiples of 16;
    latents are `(B, F, C, h, w)` (the transformer's layout), already multiplied by the VAE's
    `scaling_factor`.

    Args:
        config: sizes and constants.
    """

    def __init__(self, config: OSDEnhancerConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = OSDEnhancerTransformer(**config.transformer, tr_rank=config.tr_rank,
                                                  tr_alpha=config.tr_alpha, se_rank=config.se_rank,
                                                  se_alpha=config.se_alpha)
        self.vae = OSDEnhancerVAE(**config.vae)
        if self.vae.config.latent_channels != self.transformer.config.in_channels:
            raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels, the transformer "
                             f"takes {self.transformer.config.in_channels}")
        with torch.device("cpu"):  # the schedule's tables stay real when the net is built on `meta`
            self.scheduler = CogVideoXDPMScheduler.from_config(config.scheduler)
        # The transformer is conditioned on the empty prompt only (L163); its T5 embedding is stored.
        self.register_buffer("prompt_embedding",
                             torch.zeros(1, config.prompt_length, self.transformer.config.text_embed_dim))

    @classmethod
    def from_components(cls, config: OSDEnhancerConfig, transformer: OSDEnhancerTransformer, vae: OSDEnhancerVAE,
                        scheduler: CogVideoXDPMScheduler, prompt_embedding: Tensor) -> OSDEnhancerNet:
        """A net around loaded components (`config` must describe them); nothing is initialised twice."""
        with torch.device("meta"):
            net = cls(config)
        net.transformer, net.vae, net.scheduler = transformer, vae, scheduler
        net.prompt_embedding = prompt_embedding
        return net

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def vae_spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, video: Tensor, generator: torch.Generator | None = None, *, sample: bool = True) -> Tensor:
        """Latents `(B, F, C, h, w)` of `video` `(B, 3, T, H, W)` in [-1, 1], times `scaling_factor`.

        Args:
            video: frames in the VAE's layout.
            generator: noise of the posterior sample (the global RNG when None, as the official code).
            sample: draw `mean + std · ε` from the posterior (inference); False takes its mean (targets).
        """
        posterior = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        if sample:
            # diffusers' `posterior.sample` draws ε in the VAE's dtype, and a bfloat16 draw takes other values from
            # the generator than a float32 one (other again on other PyTorch versions): ε is drawn in float32, so a
            # bfloat16 run samples the float32 run's noise, and mean + std · ε is formed in float32 (a float32 run's
            # values are diffusers' to the bit).
            noise = randn_tensor(posterior.mean.shape, generator=generator, device=posterior.mean.device,
                                 dtype=torch.float32)
            latents = (posterior.mean.float() + posterior.std.float() * noise).to(posterior.mean.dtype)
        else:
            latents = posterior.mode()
        return (latents * self.scaling_factor).transpose(1, 2)

    def velocity(self, latents: Tensor, residual_latents: Tensor) -> Tensor:
        """`v_θ(z, c, t)`: the transformer's prediction at the configured timestep.

        Latents must already have a multiple of `patch_size_t` frames (see `denoise`).
        """
        batch = latents.shape[0]
        timestep = torch.full((batch,), self.config.timestep, dtype=torch.long, device=latents.device)
        dtype = self.transformer.dtype
        prompt = self.prompt_embedding.to(dtype).expand(batch, -1, -1)
        return self.transformer(latents.to(dtype), prompt, residual_latents.to(dtype), timestep,
                                image_rotary_emb=rotary_embedding(self.transformer.config, latents),
                                return_dict=False)[0]

    def one_step(self, latents: Tensor, velocity: Tensor) -> Tensor:
        """Eq. (1), L73: `z_out = sqrt(ᾱ_t) z_in - sqrt(1 - ᾱ_t) v` with the schedule's `ᾱ_t`.

        Computed by the scheduler's `get_velocity(sample=v, noise=z_in, t)` (`sqrt(ᾱ) noise - sqrt(1-ᾱ)
        sample`), as the official pipeline does, but always in float32: in bfloat16 the scheduler rounds
        `ᾱ_399` before its square root (0.625 for 0.627), a 0.4% scale error on every latent.
        """
        timestep = torch.full((latents.shape[0],), self.config.timestep, dtype=torch.long)
        z_out = self.scheduler.get_velocity(velocity.float(), latents.float(), timestep)  # Eq. (1), OSDEnhancer
        return z_out.to(latents.dtype)

    def denoise(self, latents: Tensor, residual_latents: Tensor) -> Tensor:
        """`z_out` of `z_in` and z^Δ `(B, F, C, h, w)`: the one step (Eq. 1) with the TR-SE transformer.

        The transformer takes `patch_size_t` frames per token: as in the official pipeline, the first
        latent frame is repeated in front until F divides by it (once for the `2n + 1` latent frames of an
        `8n + 1`-frame clip), and removed again after the step.
        """
        p_t = self.transformer.config.patch_size_t
        extra = -latents.shape[1] % p_t
        if extra:
            latents = torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)
            residual_latents = torch.cat([residual_latents[:, :1].expand(-1, extra, -1, -1, -1), residual_latents],
                                         dim=1)
        z_out = self.one_step(latents, self.velocity(latents, residual_latents))
        return z_out[:, extra:]

    def decode(self, latents: Tensor) -> Tensor:
        """Frames `(B, 3, T, H, W)` in about [-1, 1] (unclamped, float32) of latents `(B, F, C, h, w)`."""
        z = latents.transpose(1, 2).to(self.vae.dtype) / self.scaling_factor
        return self.vae.decode(z).sample.float()

    def upscale_clip(self, video: Tensor, residual: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One chunk: encode `video` then `residual` (in that order, drawing their posterior noise from
        `generator`), denoise in one step, decode.

        Args:
            video: `I†_in` `(B, 3, T, H, W)` in [-1, 1], `T = 8n + 1`, `H`, `W` multiples of 16.
            residual: `I^Δ`, the same shape, raw.
            generator: posterior noise.

        Returns:
            Decoded frames `(B, 3, T, H, W)`, float32, unclamped.
        """
        latents = self.encode(video, generator)
        residual_latents = self.encode(residual, generator)
        return self.decode(self.denoise(latents, residual_latents))
