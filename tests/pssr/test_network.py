"""PS-SR networks: Eqs. (2), (4)-(7), (13)-(14) by hand, pruning, the draft's fusion, the sampler, sizes."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from zoo.components.color import high_pass, rgb_to_yuv
from zoo.components.lora import merge_lora
from zoo.pssr.network import (
    FLOW_SCHEDULER,
    WAN_T2V_1_3B_TRANSFORMER,
    WAN_VAE,
    DiscriminatorConfig,
    DraftTransformer,
    LatentDiscriminator,
    LeanWanCausalConv3d,
    LeanWanResidualBlock,
    LeanWanRMSNorm,
    LeanWanUpsample,
    PSSRConfig,
    PSSRNet,
    flow_interpolate,
    flow_noise,
    flow_step,
    frequency_domain_update,
    merged_lora_state,
    speculative_scheduler,
    uniform_kept_blocks,
    updated_high_band,
    use_lean_wan_modules,
    velocity_l2,
)

BASE_CONFIGS = Path(__file__).parents[2] / ".." / "shared" / "base_configs.json"


@pytest.fixture(scope="module")
def net() -> PSSRNet:
    """A tiny net whose LoRA and draft are not at their initial values (so merging and fusing matter)."""
    torch.manual_seed(0)
    net = PSSRNet(PSSRConfig.tiny()).eval()
    with torch.no_grad():
        for name, p in net.base.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        net.prompt_embeds.normal_()
    net.draft.init_from(net.base)
    with torch.no_grad():
        for fusion in net.draft.fusion:
            fusion.weight.add_(torch.randn_like(fusion.weight) * 0.02)
    return net


def _lr(frames: int = 5, height: int = 8, width: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


# Configs ------------------------------------------------------------------------------------


@pytest.mark.skipif(not BASE_CONFIGS.is_file(), reason="shared/base_configs.json is absent")
@pytest.mark.parametrize(("key", "ours"), [("wan13_transformer", WAN_T2V_1_3B_TRANSFORMER), ("wan_vae", WAN_VAE)])
def test_full_config_matches_published_wan21(key: str, ours: dict) -> None:
    published = json.loads(BASE_CONFIGS.read_text())[key]["config"]
    assert ours == published
    config = PSSRConfig.full()
    assert (config.transformer if "transformer" in key else config.vae) == published


def test_full_architecture_on_meta_has_the_measured_sizes() -> None:
    with torch.device("meta"):
        net = PSSRNet(PSSRConfig.full())
        discriminator = LatentDiscriminator(DiscriminatorConfig.full())

    def count(module, keep=lambda name: True) -> int:
        return sum(p.numel() for name, p in module.named_parameters() if keep(name))

    assert count(net.base, lambda n: "lora_" not in n) == 1_418_996_800  # Wan2.1-T2V-1.3B DiT
    assert count(net.base, lambda n: "lora_" in n) == 43_745_280  # rank 32 on every block's attention and FFN
    assert net.draft.kept == (2, 5, 8, 11, 14, 17, 20, 23, 26, 29)
    assert count(net.draft.transformer) == 490_182_720 and len(net.draft.transformer.blocks) == 10
    assert count(net.draft.fusion) == 10 * (2 * 1536 * 1536 + 1536)
    assert count(net.vae) == 126_892_531
    assert count(net) == 2_127_018_611
    assert net.prompt_embeds.shape == (1, 512, 4096)
    assert count(discriminator) == 14_722_689


@pytest.mark.slow
@pytest.mark.bigmem
def test_full_architecture_builds_with_random_weights() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        net = PSSRNet(PSSRConfig.full())
    assert sum(p.numel() for p in net.parameters()) == 2_127_018_611
    assert all(torch.isfinite(p).all() for p in net.draft.fusion.parameters())
    net.draft.init_from(net.base)  # the draft starts as the pruned base
    last_base, last_draft = net.base.blocks[29], net.draft.transformer.blocks[9]
    assert torch.equal(last_draft.ffn.net[2].weight, last_base.ffn.net[2].base_layer.weight)


# Pruning and the draft --------------------------------------------------------------------------


def test_pruning_keeps_10_of_30_blocks_uniformly_ending_with_the_last() -> None:
    kept = uniform_kept_blocks(30, 10)
    assert len(kept) == 10 and kept[-1] == 29
    assert {b - a for a, b in itertools.pairwise(kept)} == {3}  # uniform spacing
    assert kept == PSSRConfig.full().draft_layers
    # Table 6's other settings under the same rule.
    assert uniform_kept_blocks(30, 5) == (5, 11, 17, 23, 29)
    assert len(uniform_kept_blocks(30, 20)) == 20 and uniform_kept_blocks(30, 30) == tuple(range(30))
    with pytest.raises(ValueError, match="num_kept"):
        uniform_kept_blocks(30, 31)


def test_merged_lora_state_equals_peft_merge(net: PSSRNet) -> None:
    merged = merge_lora(copy.deepcopy(net.base)).state_dict()
    ours = merged_lora_state(net.base)
    assert ours.keys() == merged.keys()
    assert all(torch.allclose(ours[k], merged[k], atol=1e-7) for k in merged)
    assert any("lora_" in k for k in net.base.state_dict())  # the net itself keeps its adapters


def test_draft_with_fusion_at_initialisation_equals_the_pruned_model(net: PSSRNet) -> None:
    config = net.config
    draft = DraftTransformer(config.transformer, config.draft_layers).eval()
    draft.init_from(net.base)
    # The pruned model: the base with its LoRA merged and the removed blocks deleted.
    pruned = WanTransformer3DModel(**config.transformer).eval()
    pruned.load_state_dict(merged_lora_state(net.base))
    pruned.blocks = torch.nn.ModuleList(pruned.blocks[k] for k in config.draft_layers)
    torch.manual_seed(2)
    z, context = torch.randn(1, 16, 2, 4, 6), torch.randn(1, 8, 32)
    features = [torch.randn(1, 12, 24) for _ in config.draft_layers]  # anything: [I | 0] ignores them
    timestep = torch.tensor([750.0])
    with torch.no_grad():
        assert torch.equal(draft(z, timestep, context, features), pruned(z, timestep, context, return_dict=False)[0])
        fusion = draft.fusion[0]
        assert torch.equal(fusion.weight[:, :24], torch.eye(24)) and not fusion.weight[:, 24:].any()
        assert not fusion.bias.any()


def test_base_features_are_the_outputs_of_the_kept_blocks(net: PSSRNet) -> None:
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    seen = {}

    def record(name):
        def hook(module, args) -> None:
            seen[name] = args[0]
        return hook

    hooks = [net.base.blocks[3].register_forward_pre_hook(record("block3_in")),
             net.base.norm_out.register_forward_pre_hook(record("head_in"))]
    try:
        with torch.no_grad():
            velocity, features = net.base_velocity(z, capture=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert net.draft.kept == (2, 5)
    assert torch.equal(features[0], seen["block3_in"])  # output of block 2 = input of block 3
    assert torch.equal(features[1], seen["head_in"])  # output of block 5, the last = what the head reads
    with torch.no_grad():
        assert torch.equal(velocity, net.base_velocity(z)[0])  # capturing changes nothing
        # sigma_T = 1: the base always runs at timestep 1000.
        assert torch.equal(velocity, net.base(z, torch.tensor([1000.0]), net.prompt_embeds, return_dict=False)[0])


def test_draft_reads_the_base_features_of_the_same_block(net: PSSRNet) -> None:
    """With its last fusion set to pass the base's feature only, the draft's output is the base's output.

    The draft's head is the base's (LoRA touches blocks only), so this holds exactly iff the last
    fusion receives the output of the base's last block from the base's own pass at z_L.
    """
    torch.manual_seed(4)
    z_L, z_t = torch.randn(1, 16, 2, 4, 6), torch.randn(1, 16, 2, 4, 6)
    draft = copy.deepcopy(net.draft)
    with torch.no_grad():
        last = draft.fusion[-1]
        last.weight.zero_()
        last.weight[:, 24:].copy_(torch.eye(24))
        last.bias.zero_()
        base_velocity, features = net.base_velocity(z_L, capture=True)
        context = net.prompt_embeds
        assert torch.equal(draft(z_t, torch.tensor([1000.0]), context, features), base_velocity)
        assert not torch.equal(draft(z_t, torch.tensor([1000.0]), context, features[::-1]), base_velocity)


def test_draft_gradient_checkpointing_gives_the_same_gradients(net: PSSRNet) -> None:
    torch.manual_seed(5)
    z, features = torch.randn(1, 16, 2, 4, 6), [torch.randn(1, 12, 24) for _ in net.draft.kept]
    gradients = []
    for checkpointing in (False, True):
        draft = copy.deepcopy(net.draft).train()
        draft.gradient_checkpointing = checkpointing
        draft(z, torch.tensor([250.0]), net.prompt_embeds, features).square().mean().backward()
        gradients.append([p.grad for p in draft.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*gradients))


# The flow: Eqs. (2)-(7) -------------------------------------------------------------------------


def test_eq4_pair_interpolant_by_hand() -> None:
    z_H, z_L = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])
    # (1 - 0.25) * z_H + 0.25 * z_L = (0.75 + 0.75, -1.5 + 0.5)
    assert torch.equal(flow_interpolate(z_H, z_L, 0.25), torch.tensor([1.5, -1.0]))
    assert torch.equal(flow_interpolate(z_H, z_L, 1.0), z_L) and torch.equal(flow_interpolate(z_H, z_L, 0.0), z_H)


def test_eq2_noising_follows_wan_not_the_reversed_form_of_l112() -> None:
    z0, eps = torch.tensor([1.0]), torch.tensor([-1.0])
    # (1 - 0.25) * 1 + 0.25 * (-1) = 0.5; L112's sigma z + (1 - sigma) eps would give -0.5.
    assert flow_noise(z0, eps, 0.25).item() == 0.5
    assert flow_noise(z0, eps, 0.0).item() == 1.0  # sigma = 0 is the clean end, as for Eq. (4)


def test_eq7_velocity_l2_by_hand_and_target_direction() -> None:
    velocity = torch.tensor([1.0, 2.0])
    z_L, z_H = torch.tensor([3.0, 3.0]), torch.tensor([1.0, 2.0])
    # target z_L - z_H = (2, 1); errors (-1, 1); mean square 1.
    assert velocity_l2(velocity, z_L, z_H).item() == 1.0
    # Swapped latents: target (-2, -1), errors (3, 3), mean square 9.
    assert velocity_l2(velocity, z_H, z_L).item() == 9.0


@pytest.mark.parametrize(("shift", "expected"), [(1.0, [1.0, 0.75, 0.5, 0.25, 0.0]), (3.0, [1.0, 0.9, 0.75, 0.5, 0.0])])
def test_sampler_sigmas_from_the_diffusers_scheduler(shift: float, expected: list[float]) -> None:
    scheduler = speculative_scheduler(4, {**FLOW_SCHEDULER, "shift": shift})
    assert torch.allclose(scheduler.sigmas, torch.tensor(expected))
    assert torch.allclose(scheduler.timesteps, 1000 * torch.tensor(expected[:-1]))
    assert FLOW_SCHEDULER["shift"] == 1.0
    assert speculative_scheduler(1, FLOW_SCHEDULER).sigmas.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="num_steps"):
        speculative_scheduler(0, FLOW_SCHEDULER)


def test_eq5_and_eq6_steps_by_hand() -> None:
    scheduler = speculative_scheduler(4, FLOW_SCHEDULER)  # sigmas 1, .75, .5, .25, 0
    z_L, phi_base = torch.tensor([2.0]), torch.tensor([0.4])
    z, clean = flow_step(scheduler, phi_base, z_L, scheduler.timesteps[0])
    # Eq. (5): z_{T-1} = 2 - (1 - 0.75) * 0.4 = 1.9; z_{T-1} - 0.75 * 0.4 = 1.6 = z_L - phi_base.
    assert z.item() == pytest.approx(1.9) and clean.item() == pytest.approx(1.6)
    phi_draft = torch.tensor([-0.2])
    z, clean = flow_step(scheduler, phi_draft, z, scheduler.timesteps[1])
    # Eq. (6): z = 1.9 - (0.75 - 0.5) * (-0.2) = 1.95; clean = 1.95 - 0.5 * (-0.2) = 2.05.
    assert z.item() == pytest.approx(1.95) and clean.item() == pytest.approx(2.05)
    assert z.dtype == clean.dtype == torch.float32


# Frequency-domain update: Eqs. (13)-(14) ------------------------------------------------------------


def test_eq13_eq14_high_band_by_hand() -> None:
    y_high, y_high_pred = torch.tensor([0.2, 0.0, 0.3]), torch.tensor([-0.6, 0.0, 0.3])
    # Entry 0: w = 0.6 / 0.8 = 0.75, blend = 0.75 * -0.6 + 0.25 * 0.2 = -0.4.
    #   literal (alpha 0.5): 0.5 * -0.4 = -0.2;  additive: 0.2 + 0.5 * (-0.4 - 0.2) = -0.1.
    # Entry 1: both 0 -> 0 (w = 1/2, no 0/0).  Entry 2: equal bands -> blend 0.3;
    #   literal 0.15, additive 0.3.
    literal = updated_high_band(y_high, y_high_pred, 0.5, "literal")
    additive = updated_high_band(y_high, y_high_pred, 0.5, "additive")
    assert torch.allclose(literal, torch.tensor([-0.2, 0.0, 0.15]))
    assert torch.allclose(additive, torch.tensor([-0.1, 0.0, 0.3]))
    with pytest.raises(ValueError, match="form must be"):
        updated_high_band(y_high, y_high_pred, 0.5, "multiplicative")


def _clips(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 3, 24, 20, generator=generator), torch.rand(2, 3, 3, 24, 20, generator=generator)


def _luma_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    yuv = rgb_to_yuv(x.double(), "bt601")
    return yuv[..., :1, :, :], yuv[..., 1:, :, :]


@pytest.mark.parametrize("form", ["additive", "literal"])
@pytest.mark.parametrize("alpha", [0.2, 0.6, 1.0])
def test_fdu_keeps_low_band_and_chroma_for_any_input(form: str, alpha: float) -> None:
    for seed in range(3):
        x_t, x_pred = _clips(seed)
        out = frequency_domain_update(x_t, x_pred, alpha, form)
        y_t, uv_t = _luma_chroma(x_t)
        y_out, uv_out = _luma_chroma(out)
        y_high = high_pass(y_t, "gaussian", sigma=1.5)
        new_high = updated_high_band(y_high.float(), high_pass(_luma_chroma(x_pred)[0], "gaussian", sigma=1.5).float(),
                                     alpha, form).double()
        assert torch.allclose(uv_out, uv_t, atol=1e-6)  # chroma of x_t
        assert torch.allclose(y_out - new_high, y_t - y_high, atol=1e-6)  # low band of x_t, new high band
        assert not torch.allclose(out, x_t, atol=1e-3)  # the update did something


@pytest.mark.parametrize("form", ["additive", "literal"])
def test_fdu_flat_inputs_give_no_nan(form: str) -> None:
    x_t, x_pred = torch.full((1, 3, 8, 8), 0.3, requires_grad=True), torch.full((1, 3, 8, 8), 0.7, requires_grad=True)
    out = frequency_domain_update(x_t, x_pred, 0.6, form)
    assert torch.isfinite(out).all() and torch.allclose(out, x_t)  # both high bands are 0: nothing to add
    out.sum().backward()
    assert torch.isfinite(x_t.grad).all() and torch.isfinite(x_pred.grad).all()


def test_fdu_identical_high_bands_give_each_forms_value() -> None:
    x_t, _ = _clips(5)
    alpha = 0.6
    y_t, _ = _luma_chroma(x_t)
    y_high = high_pass(y_t, "gaussian", sigma=1.5)
    for x_pred in (x_t, (x_t + 0.1)):  # the same frames, and frames with only a brighter low band
        # additive: Y_H + alpha * (Y_H - Y_H) = Y_H, so x_t comes back
        assert torch.allclose(frequency_domain_update(x_t, x_pred, alpha, "additive"), x_t, atol=1e-6)
        # literal: alpha * Y_H on x_t's low band
        y_out, _ = _luma_chroma(frequency_domain_update(x_t, x_pred, alpha, "literal"))
        assert torch.allclose(y_out, y_t - y_high + alpha * y_high, atol=1e-6)


def test_fdu_equals_the_yuv_round_trip_of_l156() -> None:
    from zoo.components.color import yuv_to_rgb

    x_t, x_pred = _clips(6)
    yuv = rgb_to_yuv(x_t, "bt601")
    y_high = high_pass(yuv[..., :1, :, :], "gaussian", sigma=1.5)
    y_high_pred = high_pass(rgb_to_yuv(x_pred, "bt601")[..., :1, :, :], "gaussian", sigma=1.5)
    new_y = yuv[..., :1, :, :] - y_high + updated_high_band(y_high, y_high_pred, 0.6, "additive")
    expected = yuv_to_rgb(torch.cat([new_y, yuv[..., 1:, :, :]], dim=-3), "bt601")
    assert torch.allclose(frequency_domain_update(x_t, x_pred, 0.6, "additive"), expected, atol=1e-6)


def test_fdu_high_pass_width_reaches_the_filter() -> None:
    x_t, x_pred = _clips(7)
    assert not torch.allclose(frequency_domain_update(x_t, x_pred, 0.6, sigma=1.5),
                              frequency_domain_update(x_t, x_pred, 0.6, sigma=3.0), atol=1e-4)


# The sampler ------------------------------------------------------------------------------------


def test_sampler_with_one_step_is_the_base_models_one_step_output(net: PSSRNet) -> None:
    lr = _lr()
    with torch.no_grad():
        z_L = net.encode(lr)
        one_step = net.decode(z_L - net.base_velocity(z_L)[0]).clamp(0, 1)  # E^{-1}(z_L - phi_base(z_L; T))
        assert torch.equal(net(lr, num_steps=1), one_step)


def test_sampler_steps_add_only_through_the_update(net: PSSRNet) -> None:
    lr = _lr()
    with torch.no_grad():
        base_only = net(lr, num_steps=1)
        # alpha = 0 (additive) keeps x_{T-1} = E^{-1}(z_L - phi_base): the drafts change nothing else.
        assert torch.equal(net(lr, num_steps=4, alpha=0.0), base_only)
        four = net(lr, num_steps=4)
        assert not torch.allclose(four, base_only, atol=1e-4)
        # At alpha = 1 the two forms of Eq. (14) coincide.
        assert torch.allclose(net(lr, num_steps=3, alpha=1.0, fdu_form="literal"),
                              net(lr, num_steps=3, alpha=1.0, fdu_form="additive"), atol=1e-6)
        assert not torch.allclose(net(lr, num_steps=3, fdu_form="literal"), net(lr, num_steps=3), atol=1e-4)
    assert four.shape == (1, 5, 3, 32, 48) and four.dtype == torch.float32 and four.min() >= 0 and four.max() <= 1


def test_sampler_rejects_lengths_and_sizes_the_vae_cannot_take(net: PSSRNet) -> None:
    with pytest.raises(ValueError, match="4n \\+ 1 frames"):
        net(_lr(frames=4))
    with pytest.raises(ValueError, match="multiples of 4"):
        net(_lr(height=10))
    with pytest.raises(ValueError, match="\\(B, T, 3, h, w\\)"):
        net(torch.rand(5, 3, 8, 8))


def test_bfloat16_keeps_float32_islands_and_stays_close(net: PSSRNet) -> None:
    lr = _lr()
    half = copy.deepcopy(net).to(torch.bfloat16)
    assert half.base.patch_embedding.weight.dtype == torch.bfloat16
    assert half.draft.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    for model in (half.base, half.draft.transformer):
        assert model.scale_shift_table.dtype == torch.float32
        assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
        assert all(b.dtype == torch.float32 for b in model.rope.buffers())
    # The default VAE parts: the encoder (and its quant conv) in float32, the decoder in bfloat16.
    encoder = [*half.vae.encoder.parameters(), *half.vae.quant_conv.parameters()]
    decoder = [*half.vae.decoder.parameters(), *half.vae.post_quant_conv.parameters()]
    assert len(encoder) + len(decoder) == len(list(half.vae.parameters()))
    assert all(p.dtype == torch.float32 for p in encoder) and all(p.dtype == torch.bfloat16 for p in decoder)
    assert (half.vae_encoder_dtype, half.vae_decoder_dtype) == (torch.float32, torch.bfloat16)
    assert half.latents_std.dtype == torch.float32
    with torch.no_grad():
        reference, output = net(lr), half(lr)
    # bf16 DiTs and VAE decoder (8-bit mantissa) against float32, same tiny weights: the outputs in [0, 1] differ
    # by at most 0.06 anywhere and 0.005 on average (measured on five seeds: at most 0.047 and 0.0035).
    difference = (output - reference).abs()
    assert difference.max() < 0.06 and difference.mean() < 0.005


@pytest.mark.parametrize(("parts", "max_diff", "mean_diff"), [("all", 0.03, 0.002), ("none", 0.08, 0.005)])
def test_float32_vae_parts_cast_with_the_net_and_stay_close(net: PSSRNet, parts: str, max_diff: float,
                                                            mean_diff: float) -> None:
    lr = _lr()
    half = copy.deepcopy(net)
    half.set_float32_vae(parts)
    assert all(p.dtype == torch.float32 for p in half.vae.parameters())  # the DiTs are float32 still
    half = half.to(torch.bfloat16)
    kept = torch.float32 if parts == "all" else torch.bfloat16
    assert all(p.dtype == kept for p in half.vae.parameters())
    assert half.latents_std.dtype == torch.float32 and half.base.scale_shift_table.dtype == torch.float32
    with torch.no_grad():
        reference, output = net(lr), half(lr)
    # Against float32, measured on five seeds: with the whole VAE in float32 at most 0.027 anywhere and 0.0015 on
    # average; with the whole VAE in bf16, 0.063 and 0.0035.
    difference = (output - reference).abs()
    assert difference.max() < max_diff and difference.mean() < mean_diff
    half.set_float32_vae("all" if parts == "none" else "none")  # cast now, and kept by later half casts
    assert all(p.dtype == (torch.bfloat16 if parts == "all" else torch.float32)
               for p in half.to(torch.bfloat16).vae.parameters())
    with pytest.raises(ValueError, match="float32_vae must be one of encoder, all, none, got True"):
        half.set_float32_vae(True)


# The Wan VAE's lean modules ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_lean_rms_norm_is_diffusers_rms_norm_on_a_hand_computed_pixel(bias: bool) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norm = WanRMS_norm(2, images=False, bias=bias)
    with torch.no_grad():
        norm.gamma.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        if bias:
            norm.bias.copy_(torch.tensor([0.5, -0.5]).view(2, 1, 1, 1))
    x = torch.tensor([[3.0, 0.0], [4.0, 0.0]]).view(1, 2, 2, 1, 1)  # channels (3, 4) at frame 0, (0, 0) at frame 1
    # Frame 0: (3, 4) / 5 * sqrt(2) * gamma; frame 1: a zero vector stays zero (the norm is clamped to 1e-12).
    expected = torch.tensor([[0.6 * 2**0.5, 0.0], [1.6 * 2**0.5, 0.0]]).view(1, 2, 2, 1, 1)
    if bias:
        expected = expected + torch.tensor([0.5, -0.5]).view(1, 2, 1, 1, 1)
    theirs = norm(x)
    norm.__class__ = LeanWanRMSNorm
    ours = norm(x)
    assert torch.allclose(theirs, expected, atol=1e-6) and torch.allclose(ours, expected, atol=1e-6)
    y = torch.randn(2, 8, 3, 5, 6, dtype=torch.bfloat16)
    lean = LeanWanRMSNorm(8, images=False, bias=bias)
    with torch.no_grad():
        lean.gamma.normal_()
    plain = copy.deepcopy(lean)
    plain.__class__ = WanRMS_norm
    lean, plain = lean.to(torch.bfloat16), plain.to(torch.bfloat16)
    # Both round to bfloat16 three times, in other places: within two of its steps at these magnitudes.
    assert (lean(y).float() - plain(y).float()).abs().max() <= 2 * 2**-7 * plain(y).float().abs().max()


def test_lean_rms_norm_moves_fewer_bytes_than_diffusers() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoo.bench.pipeline import DispatchCounter

    moved = {}
    for cls in (LeanWanRMSNorm, LeanWanRMSNorm.__mro__[1]):
        norm = cls(96, images=False).to(torch.bfloat16)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            x = mode.from_tensor(torch.zeros(1, 96, 2, 32, 32, dtype=torch.bfloat16))
            with torch.no_grad(), DispatchCounter() as counter:
                norm(x)
        moved[cls.__name__] = counter.bytes_moved
    size = 96 * 2 * 32 * 32 * 2  # the activation's bytes in bfloat16
    # diffusers: cast up (1 + 2), norm (2), divide (2 + 2), cast down (2 + 1), scale, gamma and a bias of 0 (2 each).
    assert moved["WanRMS_norm"] >= 18 * size
    # Here: norm (1), multiply (2), multiply in place (counted once), and the per-pixel factor's small passes.
    assert moved["LeanWanRMSNorm"] < 4.25 * size


@pytest.mark.parametrize(("kernel", "padding"), [((3, 3, 3), (1, 1, 1)), ((3, 1, 1), (1, 0, 0)), ((1, 1, 1), 0)])
@pytest.mark.parametrize("cached", [None, 1, 2])
def test_lean_causal_conv_is_diffusers_causal_conv(kernel, padding, cached, monkeypatch) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    torch.manual_seed(0)
    conv = WanCausalConv3d(4, 5, kernel, padding=padding)
    x = torch.randn(1, 4, 3, 6, 7)
    cache = None if cached is None else torch.randn(1, 4, cached, 6, 7)
    theirs = conv(x, cache)
    conv.__class__ = LeanWanCausalConv3d
    # On the CPU, oneDNN's kernel: the same sums in another order (measured at most 1.1e-6 over these cases).
    assert torch.allclose(conv(x, cache), theirs, atol=3e-6, rtol=0)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # PyTorch's own kernel, which diffusers' ran here
    assert torch.allclose(conv(x, cache), theirs, atol=1e-6, rtol=0)
    assert conv.padding == (0, 0, 0)  # the module's own padding stays diffusers' (the causal one is `_padding`)


def test_lean_wan_vae_runs_the_cpus_fast_kernels_and_counts_the_devices() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    vae = PSSRNet(PSSRConfig.tiny()).vae
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    with torch.no_grad(), Ops() as real:
        vae.decode(vae.encode(video).latent_dist.mode())
    # A real CPU tensor: oneDNN's convolution (PyTorch would run its unblocked `slow_conv3d` at these sizes) and a
    # batched dot product for the RMS norms' channel norms (the CPU's `vector_norm` over channels is far slower).
    assert "aten.mkldnn_convolution" in real.seen and "aten.linalg_vector_norm" not in real.seen
    assert "aten.bmm" in real.seen
    # `zoo bench`'s fake tensors count what a CUDA device runs: the convolution and `vector_norm`.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad(), Ops() as fake:
        vae.decode(vae.encode(mode.from_tensor(video)).latent_dist.mode())
    assert "aten.mkldnn_convolution" not in fake.seen and "aten.bmm" not in fake.seen
    assert {"aten.convolution", "aten.linalg_vector_norm"} <= fake.seen
    # And where a count's first frame, a real tensor, enters the fake weights alone (a one-frame chunk).
    from zoo.bench.pipeline import count_stream, fake_upscaler, random_frames

    counted_up, count_mode = fake_upscaler("pssr", "tiny", options={"chunk": 1, "chunk_overlap": 0})
    assert count_stream(counted_up, count_mode, list(random_frames(1, 16, 16))).frames_out == 1
    # In bfloat16 the CPU runs PyTorch's own convolution, as diffusers does.
    with torch.no_grad(), Ops() as half:
        half_vae = torch.nn.Module.to(vae, torch.bfloat16)
        half_vae.decode(half_vae.encode(video.bfloat16()).latent_dist.mode())
    assert "aten.mkldnn_convolution" not in half.seen and "aten.convolution" in half.seen


def _residual_blocks_as_diffusers(vae: torch.nn.Module) -> torch.nn.Module:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    vae = copy.deepcopy(vae)
    for module in vae.modules():
        if isinstance(module, LeanWanResidualBlock):
            module.__class__ = WanResidualBlock
    return vae


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_residual_blocks_encode_and_decode_as_diffusers(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lean = torch.nn.Module.to(PSSRNet(PSSRConfig.tiny()).vae, dtype)
    plain = _residual_blocks_as_diffusers(lean)
    # 9 frames: the encoder takes 1 + 4 + 4 (caches of 1, then 2 frames), the decoder 3 latent frames (1 + 2 + 2
    # frames at its finest blocks), so every cache case runs.
    video = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)).to(dtype) * 2 - 1
    with torch.no_grad():
        latents, theirs = lean.encode(video).latent_dist.mode(), plain.encode(video).latent_dist.mode()
        decoded, their_decoded = lean.decode(latents).sample, plain.decode(latents).sample
    assert decoded.shape == (1, 3, 9, 16, 24)
    if dtype == torch.bfloat16:  # to the bit (three seeds measured)
        assert torch.equal(latents, theirs) and torch.equal(decoded, their_decoded)
    else:  # the CPU's SiLU rounds float32's last bit by the row (the class docstring): measured at most 4.2e-6
        assert torch.allclose(latents, theirs, atol=1e-6, rtol=0)
        assert torch.allclose(decoded, their_decoded, atol=2e-5, rtol=0)


def test_lean_residual_block_caches_what_diffusers_caches() -> None:
    torch.manual_seed(0)
    block = PSSRNet(PSSRConfig.tiny()).vae.decoder.up_blocks[0].resnets[0]
    assert isinstance(block, LeanWanResidualBlock)
    plain = _residual_blocks_as_diffusers(block)
    first, second = torch.randn(1, block.in_dim, 1, 4, 6), torch.randn(1, block.in_dim, 3, 4, 6)
    caches = {"lean": [None, None], "plain": [None, None]}
    with torch.no_grad():
        for x in (first, second, first):  # no cache, a 1-frame cache, then a 2-frame cache
            out = {name: module(x, caches[name], [0]) for name, module in (("lean", block), ("plain", plain))}
            assert torch.allclose(out["lean"], out["plain"], atol=1e-6, rtol=0)  # measured: 2.4e-7
            assert all(a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)
                       for a, b in zip(caches["lean"], caches["plain"]))
    assert [c.shape[2] for c in caches["lean"]] == [2, 2]
    # And without copying the activations: fewer bytes moved over the same three calls.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoo.bench.pipeline import DispatchCounter

    moved = {}
    for name, module in (("lean", block), ("plain", plain)):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad(), DispatchCounter() as counter:
            cache = [None, None]
            for x in (first, second, first):
                module(mode.from_tensor(x), cache, [0])
        moved[name] = counter.bytes_moved
    activations = 2 * (1 + 3 + 1) * block.in_dim * 4 * 6 * 4  # each conv's activations, float32, over the 3 calls
    assert moved["lean"] <= moved["plain"] - 2 * activations  # not read and written again by a concatenation
    # Where autograd records, diffusers' forward runs (the `out=` writes record no gradients).
    x = first.clone().requires_grad_()
    block(x, [None, None], [0]).sum().backward()
    assert x.grad is not None


def test_lean_residual_blocks_compile_to_diffusers_graphs() -> None:
    # Under torch.compile the lean blocks trace diffusers' forward: the same graphs, no break at their `out=`
    # writes, and no recompilation per block (each would guard on the frame cache's index).
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 6)
    lean = PSSRNet(PSSRConfig.tiny()).vae
    counts = {}
    for name, vae in (("lean", lean), ("plain", _residual_blocks_as_diffusers(lean))):
        graphs = []

        def backend(graph: torch.fx.GraphModule, example_inputs: list, graphs: list = graphs) -> object:
            graphs.append(graph)
            return graph.forward

        torch._dynamo.reset()
        with torch.no_grad():
            eager = vae.decode(latents).sample
            decoder = vae.decoder
            vae.decoder = torch.compile(decoder, backend=backend)
            compiled = vae.decode(latents).sample
            vae.decoder = decoder
        # Compiled, the lean blocks run diffusers' forward: its SiLU rounds as the class docstring says (6.7e-6).
        torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-5)
        counts[name] = len(graphs)
    # Measured: 3 and 3 under torch 2.14, 16 and 16 under 2.11 (whose dynamo breaks diffusers' decoder more often);
    # without the lean blocks' compile check, 46 and 3 under 2.14.
    assert counts["lean"] == counts["plain"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lean_upsample_is_diffusers_upsample_to_the_bit_without_float32(dtype: torch.dtype) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoo.bench.pipeline import DispatchCounter

    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    plain, lean = WanUpsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), LeanWanUpsample(
        scale_factor=(2.0, 2.0), mode="nearest-exact")
    out = lean(x)
    assert out.dtype == dtype and out.shape == (2, 3, 10, 14) and torch.equal(out, plain(x))
    assert torch.equal(out[..., ::2, ::2], x) and torch.equal(out[..., 1::2, 1::2], x)  # each pixel made 2 x 2
    # Another mode computes new values: diffusers' float32 way.
    assert torch.equal(LeanWanUpsample(scale_factor=2.0, mode="bilinear")(x),
                       WanUpsample(scale_factor=2.0, mode="bilinear")(x))
    if dtype == torch.bfloat16:  # and moves fewer bytes: no casts
        moved = {}
        for name, module in (("lean", lean), ("plain", plain)):
            with FakeTensorMode(allow_non_fake_inputs=True) as mode, DispatchCounter() as counter:
                module(mode.from_tensor(torch.zeros(1, 8, 16, 16, dtype=dtype)))
            moved[name] = counter.bytes_moved
        size = 8 * 16 * 16 * 2  # the input's bytes; measured: 6 and 26 times it
        assert moved["lean"] <= 6 * size and moved["plain"] >= 4 * moved["lean"]


def test_the_pssr_vae_runs_the_lean_modules_and_loads_the_same_names() -> None:
    from diffusers import AutoencoderKLWan

    config = PSSRConfig.tiny()
    net = PSSRNet(config)
    plain = AutoencoderKLWan(**config.vae)
    kinds = {type(m).__name__ for m in net.vae.modules()}
    assert {"LeanWanRMSNorm", "LeanWanCausalConv3d", "LeanWanResidualBlock", "LeanWanUpsample"} <= kinds
    assert not {"WanRMS_norm", "WanCausalConv3d", "WanResidualBlock", "WanUpsample"} & kinds
    assert list(net.vae.state_dict()) == list(plain.state_dict())
    assert use_lean_wan_modules(plain) == sum(type(m).__name__.startswith("Lean") for m in net.vae.modules())


# Discriminator -----------------------------------------------------------------------------------


def test_latent_discriminator_judges_each_frame() -> None:
    torch.manual_seed(0)  # any seed: 200 checked (the constructor's initialisation)
    discriminator = LatentDiscriminator(DiscriminatorConfig.tiny())
    latents = torch.randn(2, 16, 3, 4, 6)
    logits = discriminator(latents)
    assert logits.shape == (6, 1, 1, 2)  # two ceil-mode pools: 4 x 6 -> 1 x 2
    # Each frame is judged on its own: changing frame 1 of clip 0 changes only its logits.
    changed = latents.clone()
    changed[0, :, 1] += 1
    diff = (discriminator(changed) - logits).abs().flatten(1).amax(1)
    assert diff[1] > 0 and diff[[0, 2, 3, 4, 5]].max() == 0
