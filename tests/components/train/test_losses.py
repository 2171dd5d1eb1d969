"""Losses: every formula on small hand-computed tensors, perceptual losses with random init."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.components.train import losses
from zoo.components.train.losses import (
    DISTS,
    LPIPS,
    PerceptualLoss,
    charbonnier_loss,
    hinge_d_loss,
    hinge_g_loss,
    masked_warp_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    temporal_residual_loss,
    vsd_loss,
)


def test_charbonnier_hand_computed() -> None:
    x = torch.tensor([0.0, 0.3])
    y = torch.zeros(2)
    # sqrt(0 + 1e-6) = 1e-3 and sqrt(0.09 + 1e-6) = 0.30000166666...
    expected = (1e-3 + math.sqrt(0.09 + 1e-6)) / 2
    assert charbonnier_loss(x, y, eps=1e-3).item() == pytest.approx(expected, rel=1e-6)


def _warp_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # One row of three pixels, two channels (the second is twice the first).
    current = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 1, 3)
    previous = torch.tensor([5.0, 1.0, 2.0]).view(1, 1, 1, 3)
    current, previous = torch.cat([current, 2 * current], 1), torch.cat([previous, 2 * previous], 1)
    # flow x = +1: warp samples previous at x + 1 (border repeated) -> [1, 2, 2] in channel 0.
    flow = torch.zeros(1, 2, 1, 3)
    flow[:, 0] = 1.0
    return current, previous, flow


def test_masked_warp_loss_hand_computed() -> None:
    current, previous, flow = _warp_case()
    # |current - warped| = [0, 0, 2] and [0, 0, 4].
    assert masked_warp_loss(current, previous, flow).item() == pytest.approx(6 / 6)
    visible = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 1, 3)
    assert masked_warp_loss(current, previous, flow, visible).item() == pytest.approx((2 + 4) / (2 * 2))
    hidden = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    assert masked_warp_loss(current, previous, flow, hidden).item() == 0.0


def test_masked_warp_loss_high_pass_compares_high_frequencies() -> None:
    current, previous, flow = _warp_case()
    current, previous = current[:, :1], previous[:, :1]

    def remove_mean(image: torch.Tensor) -> torch.Tensor:
        return image - image.mean((2, 3), keepdim=True)

    # current [1, 2, 4] - 7/3 = [-4/3, -1/3, 5/3]; warped [1, 2, 2] - 5/3 = [-2/3, 1/3, 1/3];
    # |difference| = [2/3, 2/3, 4/3], mean 8/9.
    assert masked_warp_loss(current, previous, flow, high_pass=remove_mean).item() == pytest.approx(8 / 9)
    # A brightness offset is low-frequency: the high-pass loss ignores it.
    assert masked_warp_loss(current + 1, current, torch.zeros_like(flow), high_pass=remove_mean).item() == 0.0


def test_temporal_residual_loss_hand_computed() -> None:
    x = torch.tensor([0.0, 1.0, 3.0]).view(1, 3, 1, 1, 1)
    y = torch.tensor([0.0, 2.0, 2.0]).view(1, 3, 1, 1, 1)
    # dx = [1, 2], dy = [2, 0], |dx - dy| = [1, 2].
    assert temporal_residual_loss(x, y).item() == pytest.approx(1.5)
    assert temporal_residual_loss(x, x + 0.7).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_residual_loss(x[:, :1], y[:, :1])


def test_gan_losses_hand_computed() -> None:
    real = torch.tensor([1.0, -2.0])
    fake = torch.tensor([0.5])
    d_ns = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2 + math.log1p(math.exp(0.5))
    assert nonsaturating_d_loss(real, fake).item() == pytest.approx(d_ns, rel=1e-6)
    assert nonsaturating_g_loss(fake).item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    # relu(1 - 1) = 0, relu(1 + 2) = 3 -> 1.5; relu(1 + 0.5) = 1.5.
    assert hinge_d_loss(real, fake).item() == pytest.approx(3.0)
    assert hinge_g_loss(fake).item() == pytest.approx(-0.5)


def test_vsd_loss_gradient_is_weighted_score_difference() -> None:
    latents = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]], requires_grad=True)
    phi_reg = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 2.0]]]], requires_grad=True)
    phi_lora = torch.tensor([[[[0.0, 3.0]]], [[[2.0, 2.0]]]], requires_grad=True)
    weight = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)
    loss = vsd_loss(latents, phi_reg, phi_lora, weight)
    # w (phi_reg - phi_lora) = [[2, -4]], [[-1, 0]]; loss = 0.5 (4 + 16 + 1 + 0) / B, B = 2.
    assert loss.item() == pytest.approx(5.25)
    loss.backward()
    expected = torch.tensor([[[[2.0, -4.0]]], [[[-1.0, 0.0]]]]) / 2
    torch.testing.assert_close(latents.grad, expected)
    assert phi_reg.grad is None and phi_lora.grad is None


def test_weighted_spatial_mean_hand_computed() -> None:
    value = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    assert losses._weighted_spatial_mean(value, weight).item() == pytest.approx(2.5)
    assert losses._weighted_spatial_mean(value, None).item() == pytest.approx(2.5)
    assert losses._weighted_spatial_mean(value, torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 1, 2, 2)).item() == (
        pytest.approx(3.0)
    )


def test_dists_l2_pool_filter_and_constant_input() -> None:
    kernel = losses._l2_pool_filter(1)[0, 0]
    torch.testing.assert_close(kernel, torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16)
    pooled = losses._L2Pool(2)(torch.full((1, 2, 6, 6), 3.0))
    assert pooled.shape == (1, 2, 3, 3)
    # Away from the zero padding the pool of a constant c is sqrt(c^2) = c.
    torch.testing.assert_close(pooled[..., 1:, 1:], torch.full((1, 2, 2, 2), 3.0))


@pytest.mark.parametrize(("kind", "net"), [("lpips", "alex"), ("lpips", "vgg"), ("dists", "vgg")])
def test_perceptual_loss_random_init(kind: str, net: str) -> None:
    torch.manual_seed(0)
    loss_fn = PerceptualLoss(kind, net=net, pretrained=False)
    x = torch.rand(2, 3, 32, 32)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)
    value = loss_fn(x, y)
    assert value.item() > 1e-4
    value.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss_fn.parameters())
    loss_fn.train()
    assert not loss_fn.distance.training


def test_lpips_uniform_weight_equals_plain_mean() -> None:
    torch.manual_seed(0)
    lpips = LPIPS("alex", pretrained=False)
    x, y = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(lpips(x, y, weight=torch.full((2, 1, 48, 48), 0.3)), lpips(x, y))


def test_missing_weights_raise_one_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        PerceptualLoss("lpips", net="vgg")
    message = str(info.value)
    for part in (
        "LPIPS (vgg)",
        "LPIPS_v0.1_vgg-a78928a0.pth",
        str(tmp_path / "hub" / "pyiqa"),
        "HF_HUB_OFFLINE",
        "weights_path",
        "vgg16-397923af.pth",
        "pretrained=False",
    ):
        assert part in message
    with pytest.raises(FileNotFoundError, match=r"DISTS weights are missing: DISTS_weights-f5e65c96\.pth"):
        DISTS()


def test_lpips_loads_published_key_names(tmp_path, monkeypatch) -> None:
    """A torchvision trunk in TORCH_HOME and a head file with the published keys load into LPIPS."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    trunk = losses._build_features("alex")
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, checkpoints / "alexnet-owt-7be5be79.pth")
    head = {
        f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 0.01 * (k + 1))
        for k, c in enumerate((64, 192, 384, 256, 256))
    }
    torch.save(head, tmp_path / "head.pth")

    lpips = LPIPS("alex", weights_path=tmp_path / "head.pth")
    torch.testing.assert_close(lpips.slices[0][0].weight, trunk[0].weight)
    torch.testing.assert_close(lpips.lins[3].weight, head["lin3.model.1.weight"])
    # The same head found in pyiqa's cache dir instead of weights_path.
    (tmp_path / "hub" / "pyiqa").mkdir()
    (tmp_path / "head.pth").rename(tmp_path / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth")
    torch.testing.assert_close(LPIPS("alex").lins[4].weight, head["lin4.model.1.weight"])
