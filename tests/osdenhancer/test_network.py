"""OSDEnhancer networks: Eqs. (1), (2), (3), (5), (9) on hand-computed tensors, the wiring of the experts
and the deformable decoder, the float32 islands, and the full-size architecture."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXResnetBlock3D

from zoo.components.lean import swap_classes
from zoo.osdenhancer.network import (
    COGVIDEOX15_TRANSFORMER,
    COGVIDEOX15_VAE,
    DeformableRecurrentBlock,
    GatedLoRA,
    LeanCogVideoXResnetBlock3D,
    ModulatedDeformConv,
    OSDEnhancerConfig,
    OSDEnhancerNet,
    OSDEnhancerTransformer,
    OSDEnhancerVAE,
    ResidualPatchEmbed,
    add_to_video_tokens,
    interpolation_weights,
    pre_interpolate,
    rotary_embedding,
    temporal_residuals,
    upsample,
)

from .conftest import randomise_

BASE_CONFIGS = Path(__file__).parents[2] / ".." / "shared" / "base_configs.json"


# Eqs. (2)-(3) -----------------------------------------------------------------------------

def test_eq2_weights_at_every_k() -> None:
    # K = 3: ((K + 1 - k) / (K + 1), k / (K + 1)) = (3/4, 1/4), (2/4, 2/4), (1/4, 3/4).
    assert [interpolation_weights(k, 3) for k in (1, 2, 3)] == [(0.75, 0.25), (0.5, 0.5), (0.25, 0.75)]
    # K = 1: the midpoint.
    assert interpolation_weights(1, 1) == (0.5, 0.5)
    with pytest.raises(ValueError, match=r"k must be in \[1, K=3\]"):
        interpolation_weights(4, 3)


def test_eq2_pre_interpolation_on_known_frames() -> None:
    # Key frames 0, 4, 8 (constant images) at temporal scale 4 (K = 3): 0, 1, 2, 3, 4, 5, 6, 7, 8.
    frames = torch.tensor([0.0, 4.0, 8.0]).view(1, 3, 1, 1, 1).expand(1, 3, 3, 2, 2)
    out = pre_interpolate(frames, 4)
    assert out.shape == (1, 9, 3, 2, 2)
    assert torch.equal(out[0, :, 0, 0, 0], torch.arange(9.0))
    assert pre_interpolate(frames, 1) is frames


def test_eq3_residual_is_zero_on_key_frames_and_the_key_difference_between() -> None:
    # Up(I) of key frames 1, 3, 0 at temporal scale 3 (K = 2): residuals 0 | 2, 2 | 0 | -3, -3 | 0.
    frames = torch.tensor([1.0, 3.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, 3, 2, 2)
    out = temporal_residuals(frames, 3)
    assert out.shape == (1, 7, 3, 2, 2)
    assert torch.equal(out[0, :, 0, 0, 0], torch.tensor([0.0, 2.0, 2.0, 0.0, -3.0, -3.0, 0.0]))
    # Raw, not rescaled: a 0 -> 1 step gives residual 1.
    assert temporal_residuals(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1), 2)[0, 1].item() == 1.0


def test_upsampling_uses_the_scale_factor_convention_for_non_integer_scales() -> None:
    # Row [0, 1, 2] at x2.5 -> floor(7.5) = 7 columns. With scale_factor the source of column x is
    # (x + 0.5) / 2.5 - 0.5: x = 1 -> 0.1, x = 3 -> 0.9, x = 6 -> 2.1 (clamped to the last pixel, 2).
    # Resampling to the size 7 would use 3/7 per column instead (x = 1 -> 0.1429).
    row = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3).expand(1, 3, 3, 3)
    out = upsample(row, 2.5)
    assert out.shape == (1, 3, 7, 7)
    assert torch.allclose(out[0, 0, 0, [1, 3, 6]], torch.tensor([0.05, 0.45, 1.0]))
    # Clamped to [0, 1], also at scale 1.
    assert torch.equal(upsample(torch.full((1, 3, 2, 2), 1.5), 1), torch.ones(1, 3, 2, 2))


# Eq. (5): the TR expert --------------------------------------------------------------------

def test_eq5_gated_lora_on_known_tensors() -> None:
    lora = GatedLoRA(2, 2, rank=1, alpha=2.0)  # scaling alpha / r = 2
    with torch.no_grad():
        lora.lora_A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lora.lora_B.weight.copy_(torch.tensor([[3.0], [-1.0]]))
    # A x = 1 + 2 = 3; B A x = (9, -3); x 2 = (18, -6); gate (0.5, -2) -> (9, 12).
    out = lora(torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[0.5, -2.0]]]))
    assert torch.equal(out, torch.tensor([[[9.0, 12.0]]]))
    # A new expert adds nothing: B starts at zero.
    assert torch.equal(GatedLoRA(2, 2, 4, 4.0)(torch.ones(1, 1, 2), torch.ones(1, 1, 2)), torch.zeros(1, 1, 2))
    # alpha = r (the published experts): scaling 1, the delta times the gate alone.
    unit = GatedLoRA(2, 2, rank=1, alpha=1.0)
    with torch.no_grad():
        unit.lora_A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        unit.lora_B.weight.copy_(torch.tensor([[3.0], [-1.0]]))
    assert torch.equal(unit(torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[0.5, -2.0]]])), torch.tensor([[[4.5, 6.0]]]))


def test_tr_deltas_reach_video_tokens_only() -> None:
    # One text token, two video tokens: [1 | 2, 3] + [0 | 10, 20] = [1 | 12, 23].
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1)
    assert torch.equal(add_to_video_tokens(x, torch.tensor([10.0, 20.0]).view(1, 2, 1), 1),
                       torch.tensor([1.0, 12.0, 23.0]).view(1, 3, 1))
    # In place on a projection's output, and gradients still reach the projection and the delta.
    layer, delta = torch.nn.Linear(1, 1), torch.tensor([[[10.0], [20.0]]], requires_grad=True)
    with torch.no_grad():
        layer.weight.fill_(2.0), layer.bias.fill_(0.0)
    add_to_video_tokens(layer(torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1)), delta, 1).sum().backward()
    assert layer.weight.grad.item() == 6.0 and torch.equal(delta.grad, torch.ones(1, 2, 1))


def test_residual_patch_embedding_gates_are_a_linear_map_of_abs_clamped_residuals_in_patch_order() -> None:
    embed = ResidualPatchEmbed(in_channels=1, patch_size=2, patch_size_t=2, dim=8, ff_dim=4)
    with torch.no_grad():
        embed.res_proj.weight.copy_(torch.eye(8))
        embed.res_proj.bias.fill_(0.5)
    # One patch (p_t = 2 frames of 2x2): features in (c, t, y, x) order of |clamp(z, -1, 1)|, plus the bias.
    z = torch.tensor([[[-2.0, 0.5], [-0.25, 3.0]], [[0.1, -0.2], [0.3, -0.4]]]).view(1, 2, 1, 2, 2)
    gate, gate_ff0 = embed(z)
    expected = torch.tensor([1.0, 0.5, 0.25, 1.0, 0.1, 0.2, 0.3, 0.4]) + 0.5
    assert torch.allclose(gate[0, 0], expected)
    assert gate.shape == (1, 1, 8) and gate_ff0.shape == (1, 1, 4)
    # The gate has a bias and no normalisation: it can be negative.
    with torch.no_grad():
        embed.res_proj.bias.fill_(-2.0)
    assert (embed(z)[0] < 0).all()


def _tiny_transformer(se_rank: int = 0) -> OSDEnhancerTransformer:
    config = OSDEnhancerConfig.tiny()
    torch.manual_seed(0)
    return randomise_(OSDEnhancerTransformer(**config.transformer, tr_rank=4, tr_alpha=4.0, se_rank=se_rank,
                                             se_alpha=4.0), 3).eval()


def _transformer_inputs(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(1, 2, config.in_channels, 4, 6, generator=generator)
    return {"hidden_states": z, "encoder_hidden_states": torch.randn(1, 3, config.text_embed_dim, generator=generator),
            "timestep": torch.tensor([399]), "image_rotary_emb": rotary_embedding(config, z)}


def test_tr_expert_with_zero_b_is_the_stock_cogvideox_transformer_for_any_residual() -> None:
    ours = _tiny_transformer()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "_TC_lora.lora_B" in name:
                param.zero_()
    stock = CogVideoXTransformer3DModel.from_config({k: v for k, v in ours.config.items() if not k.startswith("tr_")
                                                     and not k.startswith("se_")}).eval()
    stock.load_state_dict({k: v for k, v in ours.state_dict().items() if "_TC_lora" not in k
                           and not k.startswith("res_patch")}, strict=True)
    inputs = _transformer_inputs(ours.config)
    residual = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(6)) * 3
    with torch.no_grad():
        expected = stock(**inputs, return_dict=False)[0]
        assert torch.equal(ours(res_hidden_states=residual, **inputs, return_dict=False)[0], expected)
        # Any non-zero B changes the result: the identity is not vacuous.
        ours.transformer_blocks[0].ff.proj_out_TC_lora.lora_B.weight.fill_(0.1)
        assert not torch.allclose(ours(res_hidden_states=residual, **inputs, return_dict=False)[0], expected)


def test_tr_delta_scales_with_the_gate_of_the_residual_latents() -> None:
    ours = _tiny_transformer()
    inputs = _transformer_inputs(ours.config)
    with torch.no_grad():
        # Gates are res_proj(|clamp(z^Δ)|) = bias only when z^Δ = 0; zero bias -> no TR delta at all.
        ours.res_patch.res_proj.bias.zero_()
        ours.res_patch.res_ff0_proj.bias.zero_()
        gated_off = ours(res_hidden_states=torch.zeros_like(inputs["hidden_states"]), **inputs, return_dict=False)[0]
        for name, param in ours.named_parameters():
            if "_TC_lora.lora_B" in name:
                param.zero_()
        no_expert = ours(res_hidden_states=torch.ones_like(inputs["hidden_states"]), **inputs, return_dict=False)[0]
    assert torch.equal(gated_off, no_expert)


def test_se_expert_is_a_peft_adapter_on_the_official_targets() -> None:
    ours = _tiny_transformer(se_rank=4)
    adapted = sorted({name.rsplit(".lora_A", 1)[0] for name, _ in ours.named_parameters() if ".lora_A.TE_lora" in name})
    per_block = ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v", "ff.net.0.proj", "ff.net.2"]
    assert adapted == sorted(["proj_out", *(f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block)])
    # Eq. (7): W0 z + m ⊙ B_TR A_TR z + B_SE A_SE z; with B_SE = 0 the SE expert adds nothing.
    inputs = _transformer_inputs(ours.config)
    residual = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with_se = ours(res_hidden_states=residual, **inputs, return_dict=False)[0]
        for name, param in ours.named_parameters():
            if ".lora_B.TE_lora" in name:
                param.zero_()
        without_se = ours(res_hidden_states=residual, **inputs, return_dict=False)[0]
    assert not torch.allclose(with_se, without_se)


# Eq. (1) ---------------------------------------------------------------------------------------

def test_eq1_one_step_on_known_tensors() -> None:
    net = OSDEnhancerNet(OSDEnhancerConfig.tiny())
    # The CogVideoX-5B schedule (scaled-linear 0.00085..0.012, zero-SNR rescaled): ᾱ_399 = 0.39354405750427773,
    # sqrt(ᾱ) = 0.6273309, sqrt(1 - ᾱ) = sqrt(0.6064559424957223) = 0.7787528.
    assert net.scheduler.alphas_cumprod[399].item() == pytest.approx(0.39354405750427773, rel=1e-7)
    z = torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1, 1)
    v = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1, 1)
    # z_out = sqrt(ᾱ) z - sqrt(1 - ᾱ) v: 0.6273309, -0.7787528, 2 (0.6273309) - 0.7787528 = 0.4759090.
    out = net.one_step(z, v).flatten()
    assert torch.allclose(out, torch.tensor([0.6273309, -0.7787528, 0.4759090]), atol=1e-6)
    # The arguments are not symmetric: swapping latents and velocity gives another result.
    assert not torch.allclose(net.one_step(v, z).flatten(), out)
    # bfloat16 latents still use float32 constants (the official code rounds ᾱ to 0.6250 / 0.7812 first).
    assert net.one_step(z.bfloat16(), v.bfloat16()).dtype == torch.bfloat16
    assert net.one_step(z.bfloat16(), v.bfloat16())[0, 0].item() == torch.tensor(0.6273309).bfloat16().item()


def test_denoise_pads_odd_latent_frames_with_the_first_and_removes_it() -> None:
    net = OSDEnhancerNet(OSDEnhancerConfig.tiny())
    seen = []
    net.velocity = lambda z, zd: seen.append((z.clone(), zd.clone())) or torch.zeros_like(z)
    z = torch.arange(3.0).view(1, 3, 1, 1, 1).expand(1, 3, 4, 2, 2)
    out = net.denoise(z, z + 10)
    assert torch.equal(seen[0][0][0, :, 0, 0, 0], torch.tensor([0.0, 0.0, 1.0, 2.0]))
    assert torch.equal(seen[0][1][0, :, 0, 0, 0], torch.tensor([10.0, 10.0, 11.0, 12.0]))
    assert out.shape == z.shape


# Eq. (9): the deformable recurrent blocks ---------------------------------------------------

def test_decoder_block_with_zero_project_out_is_exactly_the_identity() -> None:
    torch.manual_seed(0)
    block = randomise_(DeformableRecurrentBlock(8, lower=(8, 2, 2)), 1)
    with torch.no_grad():
        block.attn.project_out.weight.zero_()
    x = torch.randn(1, 8, 3, 4, 4)
    lower = torch.randn(1, 8, 1, 2, 2)
    for reverse in (True, False):
        out, cache, offsets = block(x, None, lower, reverse)
        assert torch.equal(out, x)
        assert torch.equal(cache, x[:, :, -1:])
        assert offsets.shape == (1, 8, 2, 4, 4) and offsets.abs().sum() > 0  # offsets still flow on
    # With the previous batch's frame in front (2 new frames, 2 pairs), it is dropped again.
    out, _, offsets = block(x[:, :, :2], torch.randn(1, 8, 1, 4, 4), torch.randn(1, 8, 1, 2, 2), False)
    assert torch.equal(out, x[:, :, :2]) and offsets.shape == (1, 8, 2, 4, 4)


def test_decoder_with_zero_project_out_is_the_stock_cogvideox_decoder() -> None:
    config = OSDEnhancerConfig.tiny().vae
    torch.manual_seed(0)
    ours = randomise_(OSDEnhancerVAE(**config), 2).eval()
    with torch.no_grad():
        for block in ours.decoder.up_deformable_blocks:
            block.attn.project_out.weight.zero_()
    stock = AutoencoderKLCogVideoX(**config).eval()
    stock.load_state_dict({k: v for k, v in ours.state_dict().items() if "up_deformable_blocks" not in k})
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = stock.decode(z).sample
        assert torch.equal(ours.decode(z).sample, expected)
        ours.decoder.up_deformable_blocks[2].attn.project_out.weight.fill_(0.01)
        assert not torch.equal(ours.decode(z).sample, expected)


class _LeanCalls:
    """Counts the lean blocks' activations written into their convolutions' inputs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import zoo.osdenhancer.network as network

        self.calls, plain = 0, network._activate_and_convolve

        def counted(*args):
            self.calls += 1
            return plain(*args)

        monkeypatch.setattr(network, "_activate_and_convolve", counted)


def _use_lean_blocks(vae: torch.nn.Module, lean: bool) -> None:
    plain, faster = CogVideoXResnetBlock3D, LeanCogVideoXResnetBlock3D
    swap_classes(vae, {plain: faster} if lean else {faster: plain})


def _vae_outputs(vae: OSDEnhancerVAE, video: torch.Tensor, lean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _use_lean_blocks(vae, lean)
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mean
        return latents, vae.decode(latents).sample


def test_lean_residual_blocks_compute_diffusers_values_and_caches(monkeypatch) -> None:
    import zoo.osdenhancer.network as network

    torch.manual_seed(0)
    vae = randomise_(OSDEnhancerVAE(**OSDEnhancerConfig.tiny().vae), 2).eval()
    assert all(type(m) is LeanCogVideoXResnetBlock3D for m in vae.modules() if isinstance(m, CogVideoXResnetBlock3D))
    spy = _LeanCalls(monkeypatch)
    monkeypatch.setattr(network, "runs_on_the_cpu", lambda *tensors: False)  # the path a GPU and the count take
    generator = torch.Generator().manual_seed(4)
    # 17 frames: the encoder's first frame, then batches of 8, and the decoder's latents in batches of 2 with their
    # caches carried across. At 32 x 32 every level's frames x pixels are multiples of 16, where the CPU's
    # vectorised SiLU writes a strided view as it does a contiguous tensor: the same values to the bit.
    video = torch.rand(1, 3, 17, 32, 32, generator=generator) * 2 - 1
    expected = _vae_outputs(vae, video, lean=False)
    assert spy.calls == 0
    lean = _vae_outputs(vae, video, lean=True)
    assert spy.calls > 0 and all(torch.equal(a, b) for a, b in zip(lean, expected))
    # Elsewhere (3 x 5 latent pixels) the SiLU's scalar tails round otherwise: float32 rounding apart, not more.
    video = torch.rand(1, 3, 9, 24, 40, generator=generator) * 2 - 1
    expected = _vae_outputs(vae, video, lean=False)
    lean = _vae_outputs(vae, video, lean=True)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(lean, expected))
    assert (expected[1] - _vae_outputs(vae, video[:, :, [1, 0, *range(2, 9)]], lean=True)[1]).abs().max() > 1e-3


def test_lean_residual_blocks_keep_diffusers_forward_on_the_cpu_and_with_gradients(monkeypatch) -> None:
    import zoo.osdenhancer.network as network

    torch.manual_seed(0)
    vae = randomise_(OSDEnhancerVAE(**OSDEnhancerConfig.tiny().vae), 2).eval()
    spy = _LeanCalls(monkeypatch)
    video = torch.rand(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    expected = _vae_outputs(vae, video, lean=False)
    # Real CPU tensors: diffusers' forward, to the bit where the lean SiLU rounds otherwise (see above).
    assert all(torch.equal(a, b) for a, b in zip(_vae_outputs(vae, video, lean=True), expected))
    assert spy.calls == 0
    monkeypatch.setattr(network, "runs_on_the_cpu", lambda *tensors: False)
    block = next(m for m in vae.encoder.modules() if isinstance(m, LeanCogVideoXResnetBlock3D))
    x = torch.randn(1, block.in_channels, 3, 4, 4, requires_grad=True)
    out, cache = block(x)
    out.sum().backward()  # autograd records: diffusers' forward, whose concatenation has a gradient
    assert spy.calls == 0 and x.grad is not None and cache["conv1"].shape[2] == 2
    with torch.no_grad():
        block(x)
    assert spy.calls == 2


def test_the_count_sees_the_lean_residual_blocks_moving_fewer_bytes() -> None:
    import zoo.bench.pipeline as bench

    moved = {}
    for lean in (True, False):
        upscaler, mode = bench.fake_upscaler("osdenhancer", "tiny", torch.bfloat16, {"vae_tiling": False})
        _use_lean_blocks(upscaler.net.vae, lean)
        count = bench.count_stream(upscaler, mode, list(bench.random_frames(3, 16, 16)))
        moved[lean] = count.bytes_moved
    assert moved[True] < 0.97 * moved[False]


def test_decoder_levels_alternate_direction_and_pass_negated_offsets() -> None:
    torch.manual_seed(0)
    vae = randomise_(OSDEnhancerVAE(**OSDEnhancerConfig.tiny().vae), 2).eval()
    calls = []

    def record(module, args, output):
        calls.append({"lower": args[2], "reverse": args[3], "offsets": output[2]})

    for block in vae.decoder.up_deformable_blocks:
        block.register_forward_hook(record)
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 3, 4, 4))  # one decode batch of 3 latent frames
    assert [call["reverse"] for call in calls] == [True, False, True, False]  # backward first (L153)
    assert calls[0]["lower"] is None
    for below, above in itertools.pairwise(calls):
        assert torch.equal(above["lower"], -below["offsets"])
    # Frame pairs: 3 latent frames (2 pairs) -> 5 frames (4) -> 9 (8) -> 9 (8).
    assert [call["offsets"].shape[2] for call in calls] == [2, 4, 8, 8]


def test_deformable_offsets_are_dy_then_dx_per_group_and_tap() -> None:
    dcn = ModulatedDeformConv(8)
    with torch.no_grad():
        dcn.conv_offset.bias.view(-1, 2)[:, 1] = 1.0  # (Δy, Δx) = (0, 1) for every group and tap
        dcn.conv_mask.bias.fill_(30.0)  # sigmoid(30) = 1 in float32: plain (unmodulated) sampling
    x = torch.randn(1, 8, 5, 6)
    out = dcn(x, torch.zeros(1, 8, 5, 6))
    # Tap (ky, kx) of output (i, j) then reads x(i + ky - 1, j + kx) (zero outside the image): a plain grouped
    # convolution of x padded by one row above and below and two columns on the right only.
    def shifted_conv(padding: tuple[int, int, int, int]) -> torch.Tensor:
        return F.conv2d(F.pad(x, padding), dcn.deform.weight, dcn.deform.bias, groups=8)

    assert dcn.deform.weight.shape == (8, 1, 3, 3)
    assert torch.allclose(out, shifted_conv((0, 2, 1, 1)), atol=1e-6)
    assert not torch.allclose(out, shifted_conv((1, 1, 0, 2)), atol=1e-3)  # (Δx, Δy) order would shift rows


def test_deformable_convolutions_stay_float32_inside_a_bfloat16_model() -> None:
    net = OSDEnhancerNet(OSDEnhancerConfig.tiny()).to(torch.bfloat16)
    dtypes = {name.split(".dcn_pack.")[0] != name: param.dtype for name, param in net.vae.named_parameters()
              if ".dcn_pack." in name or name.endswith("offset_conv1.weight")}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    with torch.no_grad():
        out = net.decode(torch.randn(1, 3, 4, 2, 2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# Configs and the full-size architecture ------------------------------------------------------

@pytest.mark.skipif(not BASE_CONFIGS.is_file(), reason="shared/base_configs.json is absent")
def test_full_configs_are_the_published_cogvideox15_5b() -> None:
    published = json.loads(BASE_CONFIGS.read_text())
    assert published["cogvx15_transformer"]["config"] == COGVIDEOX15_TRANSFORMER
    assert published["cogvx15_vae"]["config"] == COGVIDEOX15_VAE


def _count(module: torch.nn.Module, keep=lambda name: True) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if keep(name))


def test_full_architecture_on_meta_has_the_published_base_and_the_papers_experts() -> None:
    with torch.device("meta"):
        net = OSDEnhancerNet(OSDEnhancerConfig.full())
        stock_transformer = CogVideoXTransformer3DModel(**COGVIDEOX15_TRANSFORMER)
        stock_vae = AutoencoderKLCogVideoX(**COGVIDEOX15_VAE)
    transformer, vae = net.transformer, net.vae
    assert _count(stock_transformer) == 5_570_676_352 and _count(stock_vae) == 215_583_907
    base = _count(transformer, lambda n: "_TC_lora" not in n and "TE_lora" not in n and not n.startswith("res_patch"))
    assert base == _count(stock_transformer)
    assert _count(transformer, lambda n: "_TC_lora" in n) == 297_271_296  # 42 blocks x 6 rank-128 TR deltas
    assert _count(transformer, lambda n: n.startswith("res_patch")) == 1_981_440
    assert _count(transformer, lambda n: "TE_lora" in n) == 297_680_896  # 253 rank-128 SE adapters
    assert _count(vae) - _count(stock_vae) == _count(vae, lambda n: "up_deformable_blocks" in n) == 35_299_712
    assert len(transformer.state_dict()) == 2038  # the official checkpoint's tensor count
    widths = [block.attn.q_proj.in_channels for block in vae.decoder.up_deformable_blocks]
    assert widths == [512, 512, 256, 256]
    assert vae.decoder.up_deformable_blocks[2].align.dcn_pack.deform.weight.shape == (256, 32, 3, 3)
    assert net.prompt_embedding.shape == (1, 226, 4096)


@pytest.mark.parametrize(("frames", "fits", "too_big"), [
    (17, (1008, 1664), (1024, 1648)),  # 1,677,312 and 1,687,552 pixels about the limit of 1,677,721
    (9, (1088, 1744), (1088, 1760)),  # 1,897,472 and 1,914,880 about 1,906,501 (one frame batch of 3 latents)
])
def test_the_untiled_pixel_limit_is_where_diffusers_full_size_decoder_starts_to_fail(frames, fits, too_big) -> None:
    from zoo.bench.pipeline import fake_upscaler

    upscaler, mode = fake_upscaler("osdenhancer", "full", torch.bfloat16)  # shapes only: seconds on a CPU
    vae = upscaler.net.vae
    limit = vae.untiled_pixel_limit(frames)
    latent_frames = (frames - 1) // 4 + 1
    assert fits[0] * fits[1] <= limit < too_big[0] * too_big[1]

    def decode(height: int, width: int) -> None:
        with torch.no_grad(), mode:
            vae.decode(torch.empty(1, 16, latent_frames, height // 8, width // 8, dtype=torch.bfloat16))

    decode(*fits)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        decode(*too_big)


@pytest.mark.slow
@pytest.mark.bigmem
def test_full_architecture_builds_with_random_weights_and_runs() -> None:
    # bfloat16 parameters: the 6.4B of the full model need 12.8 GB instead of 25.7 GB.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        net = OSDEnhancerNet(OSDEnhancerConfig.full()).eval()
    finally:
        torch.set_default_dtype(default)
    assert _count(net) == 6_167_609_984 + 250_883_619
    assert all(not p.is_meta and torch.isfinite(p).all() for p in net.transformer.transformer_blocks[41].parameters())
    # Two of the stored prompt's 226 tokens: the text length changes no layer's weights. On a CPU without
    # bfloat16 instructions (AVX2), the denoising step with 226 text tokens took 258 s of this test's 351 s;
    # with 2, the whole test takes 89 s. The stored prompt's shape is tested above, and the full-size stream
    # with it on fake tensors (tests/bench/test_counting.py).
    net.prompt_embedding = net.prompt_embedding[:, :2]
    with torch.no_grad():
        z = torch.randn(1, 2, 16, 4, 4, dtype=torch.bfloat16)
        out = net.denoise(z, z)
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert math.isfinite(net.decode(torch.randn(1, 1, 16, 2, 2, dtype=torch.bfloat16)).abs().max().item())
