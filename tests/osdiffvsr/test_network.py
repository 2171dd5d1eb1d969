"""OS-DiffVSR networks: Eq. (2), the fusion (Eqs. 10-14), the discriminator, configs, OSEDiff LoRA import."""

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
            conv.bias.zero_()
    return fusion


def _latents() -> tuple[torch.Tensor, torch.Tensor]:
    current = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    prev = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    next_ = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    return current, torch.stack([prev, current, next_], dim=1)


def test_fusion_weights_by_hand_and_sum_to_one() -> None:
    current, latents = _latents()
    weights = _identity_fusion().weights(current, latents)[0, :, 0, 0]
    # q = (1, 0); q.k_j / sqrt(2) = (1/sqrt2, 1/sqrt2, 0), softmax over the three latents.
    logits = torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])
    expected = logits.exp() / logits.exp().sum()
    assert torch.allclose(weights, expected)
    random = MultiFrameFusion(channels=4, dim=8, heads=2)
    w = random.weights(torch.randn(2, 4, 3, 5), torch.randn(2, 3, 4, 3, 5))
    assert torch.allclose(w.sum(dim=1), torch.ones(2, 3, 5))


def test_fusion_head_average() -> None:
    fusion = MultiFrameFusion(channels=2, dim=4, heads=2)
    with torch.no_grad():
        # Head 0 reads channel 0, head 1 reads channel 1 (queries and keys alike).
        weight = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[:, :, None, None]
        for conv in (fusion.to_q, fusion.to_k):
            conv.weight.copy_(weight)
            conv.bias.zero_()
    current = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    latents = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])])
    weights = fusion.weights(current, latents.view(1, 3, 2, 1, 1))[0, :, 0, 0]
    # head_dim = 2: logits / sqrt(2); head 0 sees (1, 1, 0), head 1 sees (0, 1, 1).
    head0 = torch.softmax(torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), 0)
    head1 = torch.softmax(torch.tensor([0.0, 1.0, 1.0]) / math.sqrt(2), 0)
    assert torch.allclose(weights, (head0 + head1) / 2)


def test_fusion_blend_is_z_l_where_mask_is_0_and_attention_mean_where_1() -> None:
    fusion = _identity_fusion()
    current, latents = _latents()
    current = current.expand(1, 2, 1, 2).contiguous()
    latents = latents.expand(1, 3, 2, 1, 2).contiguous()
    mask = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    fused = fusion(current, latents, mask)
    weights = fusion.weights(current, latents)
    attended = (weights[:, :, None] * latents).sum(dim=1)
    assert torch.equal(fused[..., 0], current[..., 0])
    assert torch.allclose(fused[..., 1], attended[..., 1])
    # By hand: w = softmax(1/sqrt2, 1/sqrt2, 0); attended = (w0 + w1) * (1, 0) + w2 * (0, 1).
    w = torch.softmax(torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]), 0)
    assert torch.allclose(fused[0, :, 0, 1], torch.stack([w[0] + w[1], w[2]]))


def test_eq14_mask_thresholds_every_neighbour() -> None:
    frame = torch.zeros(1, 3, 1, 3)
    # exp(-alpha * mean|d|) with alpha = 1: d = 0.5 -> 0.61 > 0.4, d = 1 -> 0.37 < 0.4.
    prev = torch.tensor([0.5, 1.0, 0.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    next_ = torch.tensor([0.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    mask = fusion_mask(frame, torch.stack([prev, next_]), alpha=1.0, threshold=0.4)
    assert mask.shape == (1, 1, 1, 3)
    assert mask.flatten().tolist() == [1.0, 0.0, 0.0]


def test_mask_downsample_is_a_min_pool() -> None:
    mask = torch.ones(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 0
    assert downsample_mask(mask, (2, 2)).flatten().tolist() == [0.0, 1.0, 1.0, 1.0]


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
    """`net`'s LoRA in OSEDiff's save format (three UNet adapters, peft's default alpha 8)."""
    def rename(name: str, part: str) -> str:
        if part == "vae" or "down_blocks" in name or "conv_in" in name:
            adapter = "default_encoder"
        elif "up_blocks" in name:
            adapter = "default_decoder"
        else:
            adapter = "default_others"
        return re.sub(r"\.(lora_[AB])\.default\.", rf".\1.{adapter}.", name)

    ckpt = {"rank_unet": 4, "rank_vae": 4}
    for part in ("unet", "vae"):
        state = {}
        for name, tensor in getattr(net, part).state_dict().items():
            if "lora_" in name or (part == "unet" and name.startswith("conv_in.")):
                # OSEDiff's update is (8 / r) B A: store B so that it equals ours.
                state[rename(name, part)] = tensor / 2 if ".lora_B." in name else tensor
        ckpt[f"state_dict_{part}"] = state
    return ckpt


def test_load_osediff_lora_maps_names_and_alpha(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = OSDiffVSRNet(OSDiffVSRConfig.tiny())
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_B" in name or name.startswith("unet.conv_in.base_layer"):
                p.normal_()
    path = tmp_path / "osediff.pkl"
    torch.save(_as_osediff_checkpoint(source), path)
    target = OSDiffVSRNet(OSDiffVSRConfig.tiny())
    load_osediff_lora(target, path)
    for name, tensor in source.state_dict().items():
        if "lora_" in name or name.startswith("unet.conv_in."):
            assert torch.equal(target.state_dict()[name], tensor), name


def test_load_osediff_lora_rejects_other_rank(tmp_path: Path) -> None:
    path = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {}, "state_dict_vae": {}}, path)
    net = OSDiffVSRNet(OSDiffVSRConfig.tiny().replace(lora_rank=8))
    with pytest.raises(ValueError, match="lora_rank=4"):
        load_osediff_lora(net, path)

