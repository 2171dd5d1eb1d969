"""OS-DiffVSR networks: Eq. (2), the fusion (Eqs. 8, 10-14), the discriminator, configs, OSEDiff start."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.osdiffvsr.network import (
    SD21_BASE_UNET,
    SD21_BASE_VAE,
    DINOv2Discriminator,
    DiscriminatorConfig,
    MultiFrameFusion,
    OSDiffVSRConfig,
    OSDiffVSRNet,
    downsample_mask,
    fusion_mask,
    load_osediff_lora,
    one_step_coefficients,
    one_step_denoise,
)

BASE_CONFIGS = Path(__file__).parents[2] / ".." / "shared" / "base_configs.json"


@pytest.mark.skipif(not BASE_CONFIGS.is_file(), reason="shared/base_configs.json is absent")
@pytest.mark.parametrize(("key", "ours"), [("sd21_base_unet", SD21_BASE_UNET), ("sd21_base_vae", SD21_BASE_VAE)])
def test_full_config_matches_published_sd21_base(key: str, ours: dict) -> None:
    published = json.loads(BASE_CONFIGS.read_text())[key]["config"]
    assert ours == published
    config = OSDiffVSRConfig.full()
    assert config.unet == published if key.endswith("unet") else config.vae == published


def test_one_step_coefficients_match_scaled_linear_schedule_by_hand() -> None:
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)[999]
    alpha_t, beta_t = one_step_coefficients(OSDiffVSRConfig().scheduler, 999)
    # diffusers computes the schedule in float32.
    assert alpha_t == pytest.approx(math.sqrt(abar), rel=1e-4)
    assert beta_t == pytest.approx(math.sqrt(1 - abar), rel=1e-6)
    assert alpha_t**2 + beta_t**2 == pytest.approx(1.0)


def test_eq2_inverts_forward_noising_for_known_eps() -> None:
    alpha_t, beta_t = 0.6, 0.8
    clean = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    eps = torch.tensor([[0.3, 1.0], [-1.0, 2.0]])
    noisy = alpha_t * clean + beta_t * eps  # forward noising at T
    assert torch.allclose(one_step_denoise(noisy, eps, alpha_t, beta_t), clean)
    # (Z - beta eps) / alpha at one entry: (0.6 * 1 + 0.8 * 0.3 - 0.8 * 0.3) / 0.6 = 1.
    assert one_step_denoise(torch.tensor(0.84), torch.tensor(0.3), alpha_t, beta_t).item() == pytest.approx(1.0)


def _identity_fusion() -> MultiFrameFusion:
    fusion = MultiFrameFusion(channels=2, dim=2, heads=1)
    with torch.no_grad():
        for conv in (fusion.to_q, fusion.to_k):
            conv.weight.copy_(torch.eye(2)[:, :, None, None])
    return fusion


def _latents(*vectors: tuple[float, float]) -> torch.Tensor:
    """`[Z^w_{i-1}, Z^L_i, Z^w_{i+1}]` at one position: `(1, 3, 2, 1, 1)`."""
    return torch.tensor(vectors).view(1, 3, 2, 1, 1)


def test_eq10_13_attention_is_3x3_over_all_three_latents_by_hand() -> None:
    # One head, W^Q = W^K = I, d_k = 2; latents (1, 0), (1, 0), (0, 1); a = 1/sqrt(2), e^a = 2.0281150.
    # Queries (1, 0): logits (a, a, 0) -> (2.0281150, 2.0281150, 1) / 5.0562300 = (0.4011121, 0.4011121, 0.1977758).
    # Query (0, 1): logits (0, 0, a) -> (1, 1, 2.0281150) / 4.0281150 = (0.2482551, 0.2482551, 0.5034898).
    latents = _latents((1.0, 0.0), (1.0, 0.0), (0.0, 1.0))
    attention = _identity_fusion().attention(latents)[0, :, :, 0, 0]
    expected = torch.tensor([[0.4011121, 0.4011121, 0.1977758],
                             [0.4011121, 0.4011121, 0.1977758],
                             [0.2482551, 0.2482551, 0.5034898]])
    assert torch.allclose(attention, expected, atol=1e-6)
    # Eq. (13) then (12) with the mask at 1: (Z~_{i-1} + Z~_i + Z~_{i+1}) / 3 weights latent s by the column
    # mean of A: (0.3501598, 0.3501598, 0.2996805), so Z^f = (0.7003195, 0.2996805). (A query from Z^L_i
    # alone, the middle row, would give (0.8022242, 0.1977758).)
    fused = _identity_fusion()(latents, torch.ones(1, 1, 1, 1))
    assert torch.allclose(fused[0, :, 0, 0], torch.tensor([0.7003195, 0.2996805]), atol=1e-6)


def test_eq13_averages_the_heads_weights_by_hand() -> None:
    fusion = MultiFrameFusion(channels=2, dim=2, heads=2)
    with torch.no_grad():
        for conv in (fusion.to_q, fusion.to_k):  # head 0 reads channel 0, head 1 channel 1; d_k = 1
            conv.weight.copy_(torch.eye(2)[:, :, None, None])
    latents = _latents((1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
    # Head 0 sees (1, 1, 0): rows with q = 1 give (e, e, 1) / (2e + 1) = (0.4223188, 0.4223188, 0.1553624),
    # the row with q = 0 gives 1/3 each. Head 1 sees (0, 1, 1) likewise. Their mean, row by row:
    expected = torch.tensor([[0.3778261, 0.3778261, 0.2443479],
                             [0.2888406, 0.4223188, 0.2888406],
                             [0.2443479, 0.3778261, 0.3778261]])
    assert torch.allclose(fusion.attention(latents)[0, :, :, 0, 0], expected, atol=1e-6)
    # Column means (0.3036715, 0.3926570, 0.3036715): Z^f = (0.6963285, 0.6963285).
    fused = fusion(latents, torch.ones(1, 1, 1, 1))
    assert torch.allclose(fused[0, :, 0, 0], torch.tensor([0.6963285, 0.6963285]), atol=1e-6)
    random = MultiFrameFusion(channels=4, dim=8, heads=2)
    rows = random.attention(torch.randn(2, 3, 4, 3, 5)).sum(dim=2)
    assert torch.allclose(rows, torch.ones(2, 3, 3, 5))


def test_eq12_blend_keeps_z_l_where_the_mask_is_0() -> None:
    latents = _latents((1.0, 0.0), (1.0, 0.0), (0.0, 1.0)).expand(1, 3, 2, 1, 2).contiguous()
    fused = _identity_fusion()(latents, torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))
    assert torch.equal(fused[0, :, 0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(fused[0, :, 0, 1], torch.tensor([0.7003195, 0.2996805]), atol=1e-6)


def test_eq14_mask_thresholds_the_sum_of_both_warping_errors() -> None:
    frame = torch.zeros(1, 3, 1, 3)
    # Per pixel, both warped neighbours differ from the frame by (R, G, B):
    # pixel 0: (0.3, 0, 0)       -> e_prev + e_next = 0.6 -> exp(-0.6) = 0.5488 > 0.4 -> 1
    # pixel 1: (0.5, 0, 0)       -> 1.0 -> exp(-1.0) = 0.3679 <= 0.4 -> 0 (the larger one alone: exp(-0.5) -> 1)
    # pixel 2: (0.2, 0.2, 0.2)   -> 1.2 -> exp(-1.2) = 0.3012 -> 0 (a channel mean instead of the L1 sum: 1)
    warped = torch.tensor([[0.3, 0.0, 0.0], [0.5, 0.0, 0.0], [0.2, 0.2, 0.2]]).T.reshape(1, 3, 1, 3)
    mask = fusion_mask(frame, warped, warped, alpha=1.0, threshold=0.4)
    assert mask.shape == (1, 1, 1, 3)
    assert mask.flatten().tolist() == [1.0, 0.0, 0.0]
    # Errors from one neighbour add to the other's: a 0.5 error on the previous frame alone fuses.
    assert fusion_mask(frame, warped, frame, alpha=1.0, threshold=0.4).flatten().tolist() == [1.0, 1.0, 1.0]


def test_eq12_mask_downsample_is_a_min_pool() -> None:
    mask = torch.ones(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 0
    assert downsample_mask(mask, (2, 2)).flatten().tolist() == [0.0, 1.0, 1.0, 1.0]


def test_eq8_neighbours_are_warped_onto_the_current_frame() -> None:
    net = OSDiffVSRNet(OSDiffVSRConfig.tiny())
    texture = torch.rand(1, 3, 4, 8)
    current = texture[..., 1:7]
    prev, next_ = texture[..., 0:6], texture[..., 2:8]  # prev[x] = current[x - 1], next[x] = current[x + 1]
    frames = {"current": current, "prev": prev, "next": next_}
    # The true flows (pixel p of src shows what dst shows at p + flow): current -> prev is +1 in x.
    shifts = {("current", "prev"): 1.0, ("current", "next"): -1.0, ("prev", "current"): -1.0, ("next", "current"): 1.0}

    class Oracle(torch.nn.Module):
        def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            flow = torch.zeros(src.shape[0], 2, *src.shape[-2:])
            for j in range(src.shape[0]):
                names = tuple(next(k for k, v in frames.items() if torch.equal(v[0], x[j])) for x in (src, dst))
                flow[j, 0] = shifts[names]
            return flow

    net.flow = Oracle()
    warped_prev, warped_next = net.align(prev, current, next_)
    # Away from the border column that the warp has to fill, each neighbour lands exactly on the current frame.
    assert torch.allclose(warped_prev[..., :-1], current[..., :-1])
    assert torch.allclose(warped_next[..., 1:], current[..., 1:])


def test_discriminator_patch_grid_resizes_to_multiple_of_14() -> None:
    disc = DINOv2Discriminator(DiscriminatorConfig.tiny())
    assert disc(torch.rand(2, 3, 28, 42)).shape == (2, 16, 2, 3)
    assert disc(torch.rand(1, 3, 30, 40)).shape == (1, 16, 2, 3)  # resized to 28 x 42


def test_pretrained_discriminator_offline_raises_one_clear_error() -> None:
    with pytest.raises(OSError, match=r"pretrained DINOv2 weights .*discriminator_pretrained=False"):
        DINOv2Discriminator(DiscriminatorConfig.tiny(), pretrained=True)


def test_tiny_net_shapes_and_frozen_decoder() -> None:
    torch.manual_seed(0)
    net = OSDiffVSRNet(OSDiffVSRConfig.tiny())
    frames = torch.rand(3, 1, 3, 16, 24)
    out = net(*frames)
    assert out.shape == (1, 3, 64, 96) and out.min() >= 0 and out.max() <= 1
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("fusion.") for name in trainable)
    assert any(name.startswith("vae.encoder.") for name in trainable)
    assert any(name.startswith("vae.quant_conv.") for name in trainable)
    assert not any(name.startswith(("vae.decoder.", "vae.post_quant_conv.", "flow.")) for name in trainable)


def _as_osediff_checkpoint(net: OSDiffVSRNet) -> dict:
    """`net`'s `osediff` adapter and UNet conv_in in OSEDiff's save format (three UNet adapters)."""
    def rename(name: str, part: str) -> str:
        if part == "vae" or "down_blocks" in name or "conv_in" in name:
            adapter = "default_encoder"
        elif "up_blocks" in name:
            adapter = "default_decoder"
        else:
            adapter = "default_others"
        return re.sub(r"\.(lora_[AB])\.osediff\.", rf".\1.{adapter}.", name)

    ckpt = {"rank_unet": 4, "rank_vae": 4}
    for part in ("unet", "vae"):
        ckpt[f"state_dict_{part}"] = {
            rename(name, part): tensor for name, tensor in getattr(net, part).state_dict().items()
            if ".osediff." in name or (part == "unet" and name.startswith("conv_in.base_layer."))
        }
    return ckpt


def test_osediff_lora_fills_a_frozen_adapter_next_to_fresh_trained_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = OSDiffVSRConfig.tiny().replace(lora_rank=8, osediff_rank=4)
    source = OSDiffVSRNet(config)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if ".lora_B.osediff." in name or name.startswith("unet.conv_in.base_layer"):
                p.normal_()
    path = tmp_path / "osediff.pkl"
    torch.save(_as_osediff_checkpoint(source), path)
    target = OSDiffVSRNet(config)
    load_osediff_lora(target, path)
    for name, tensor in source.state_dict().items():
        if ".osediff." in name or name.startswith("unet.conv_in.base_layer."):
            assert torch.equal(target.state_dict()[name], tensor), name
    trainable = {name for name, p in target.named_parameters() if p.requires_grad}
    assert trainable and not any(".osediff." in name for name in trainable)
    assert all(".lora_B.default." not in n or not p.any() for n, p in target.named_parameters())  # B = 0: fresh
    # OSEDiff's update is (8 / 4) B A, its alpha over its rank; the trained adapter's is (8 / 8) B A.
    layer = target.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling == {"default": 1.0, "osediff": 2.0}
    x = torch.randn(5, layer.in_features)
    a, b = layer.lora_A["osediff"].weight, layer.lora_B["osediff"].weight
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base_layer(x) + 2.0 * x @ a.T @ b.T, atol=1e-5)


def test_load_osediff_lora_rejects_other_rank(tmp_path: Path) -> None:
    path = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {}, "state_dict_vae": {}}, path)
    net = OSDiffVSRNet(OSDiffVSRConfig.tiny().replace(osediff_rank=8))
    with pytest.raises(ValueError, match="osediff_rank=4"):
        load_osediff_lora(net, path)
