"""OS-DiffVSR training: Eqs. (3), (5), (6)-(7), (15)-(16), (17) by hand, their wiring in the module,
the trainable sets, and one backward pass that serves both optimizers."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.osdiffvsr.callbacks import PAPER_LOSS_WEIGHTS, OSDiffVSRStages
from zoo.osdiffvsr.module import (
    OSDiffVSRModule,
    afat_discriminator_loss,
    afat_generator_loss,
    focal_mse_loss,
    total_loss,
    warp_loss,
)


def _features(*vectors: tuple[float, float]) -> torch.Tensor:
    """Patch features (1, 2, 1, P) from P 2-D vectors."""
    return torch.tensor(vectors).T.reshape(1, 2, 1, len(vectors))


def test_eq3_discriminator_loss_by_hand() -> None:
    anchor = _features((1.0, 0.0), (1.0, 0.0))  # F(I_{i-1})
    real = _features((1.0, 0.0), (0.0, 1.0))  # F(I_i): s+ = 1, 0
    fake = _features((0.0, 1.0), (-1.0, 0.0))  # F(I_hat_i): s- = 0, -1
    # Per patch -log(e^{s+/tau} / (e^{s+/tau} + e^{s-/tau})) = log(1 + e^{(s- - s+)/tau}); with tau = 0.5 both
    # patches give log(1 + e^-2) = 0.1269280 (multiplying by tau instead: log(1 + e^-0.5) = 0.4740770).
    assert afat_discriminator_loss(real, anchor, fake, tau=0.5).item() == pytest.approx(0.1269280, abs=1e-7)
    # The positive and negative pairs are told apart by the anchor: swapping real and fake gives log(1 + e^2).
    assert afat_discriminator_loss(fake, anchor, real, tau=0.5).item() == pytest.approx(2.1269280, abs=1e-6)


def test_eq3_default_temperature_reads_100_as_the_logit_scale() -> None:
    module = _tiny_module()
    assert module.hparams.tau == 0.01
    anchor = _features((1.0, 0.0))
    real = _features((0.9, math.sqrt(1 - 0.9**2)))  # s+ = 0.90
    fake = _features((0.85, math.sqrt(1 - 0.85**2)))  # s- = 0.85
    # softplus((0.85 - 0.90) / 0.01) = log(1 + e^-5) = 0.0067153; the literal cos/100 would give 0.6928974.
    assert afat_discriminator_loss(real, anchor, fake, module.hparams.tau).item() == pytest.approx(0.0067153, abs=1e-6)


def test_eq5_generator_loss_by_hand() -> None:
    anchor = _features((1.0, 0.0), (1.0, 0.0), (3.0, 4.0))
    fake = _features((2.0, 0.0), (0.0, 1.0), (3.0, 4.0))  # cos 1, 0, 1
    assert afat_generator_loss(anchor, fake).item() == pytest.approx(-2 / 3)


def test_eq6_7_focal_mse_by_hand() -> None:
    anchor = _features((1.0, 0.0), (1.0, 0.0), (1.0, 0.0))
    fake = _features((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0))  # S = (1 - cos) / 2 = 0, 0.5, 1 on three 14-px patches
    target, output = torch.zeros(1, 3, 14, 42), torch.full((1, 3, 14, 42), 0.5)  # squared error 0.25 everywhere
    # mean(S^gamma * 0.25) = 0.25 * (0 + 0.5 + 1) / 3 = 0.125 at the module's gamma = 1 (the paper gives none);
    # 0.25 * (0 + 0.25 + 1) / 3 = 0.1041667 at gamma = 2.
    gamma = inspect.signature(OSDiffVSRModule).parameters["gamma"].default
    assert focal_mse_loss(output, target, anchor, fake, gamma, 14).item() == pytest.approx(0.125)
    assert focal_mse_loss(output, target, anchor, fake, 2.0, 14).item() == pytest.approx(0.1041667, abs=1e-7)
    # S is a weight: the gradient reaches the output only through the squared error.
    output.requires_grad_(True)
    fake.requires_grad_(True)
    focal_mse_loss(output, target, anchor, fake, 1.0, 14).backward()
    assert fake.grad is None and output.grad is not None


def test_eq15_16_warp_loss_by_hand() -> None:
    flow = torch.zeros(1, 2, 1, 2)  # Warp = identity
    current = torch.zeros(1, 3, 1, 2)  # I^H_i
    previous = torch.tensor([[0.0, 0.5], [0.0, 0.0], [0.0, 0.0]]).view(1, 3, 1, 2)  # I^H_{i-1}
    output = torch.tensor([[0.1, 0.2], [0.1, 0.0], [0.1, 0.0]]).view(1, 3, 1, 2)  # I_hat_i
    # Eq. (16), alpha = 2: M = exp(-2 * 0) = 1 and exp(-2 * 0.5) = 0.3678794.
    # Eq. (15): (I_hat_i - Warp(I_{i-1}))^2 over channels: 0.03 / 3 = 0.01 and 0.09 / 3 = 0.03;
    # mean over pixels of M * that: (0.01 + 0.3678794 * 0.03) / 2 = 0.0105182.
    assert warp_loss(output, current, previous, flow, alpha=2.0).item() == pytest.approx(0.0105182, abs=1e-7)
    # The target is the warped ground-truth previous frame: an output equal to it costs nothing.
    assert warp_loss(previous, current, previous, flow, alpha=2.0).item() == 0.0


def test_eq15_warps_the_previous_frame_with_the_flow_from_the_current_one() -> None:
    texture = torch.rand(1, 3, 2, 5)
    texture[..., 4] = texture[..., 3]  # so that the border the warp repeats is right too
    current, previous = texture[..., 1:5], texture[..., 0:4]  # previous[x] = current[x - 1]
    flow = torch.zeros(1, 2, 2, 4)
    flow[:, 0] = 1.0  # from I_i to I_{i-1}: pixel p of I_i is at p + 1 in I_{i-1}
    # Aligned, Warp(I_{i-1}) equals I_i, so M = 1 and an output equal to I_i costs 0.
    assert warp_loss(current, current, previous, flow, alpha=5.0).item() < 1e-12
    # The flow the other way round (I_{i-1} -> I_i) misaligns: the loss moves off zero.
    assert warp_loss(current, current, previous, -flow, alpha=5.0).item() > 1e-3


def test_eq17_total_with_the_module_weights_by_hand() -> None:
    module = _tiny_module()
    assert module.loss_weights == {"adversarial": 1.0, "fmse": 1.0, "lpips": 2.0, "warp": 2.0}
    losses = {"adversarial": torch.tensor(-0.5), "fmse": torch.tensor(0.01), "lpips": torch.tensor(0.2),
              "warp": torch.tensor(0.03)}
    # 1 * -0.5 + 1 * 0.01 + 2 * 0.2 + 2 * 0.03 = -0.03 (an adversarial weight of 2 and LPIPS 1: -0.73).
    assert total_loss(losses, module.loss_weights).item() == pytest.approx(-0.03)
    assert OSDiffVSRStages().stages[0].loss_weights == PAPER_LOSS_WEIGHTS


# The module's wiring, on a critic whose features are known ----------------------------------------


class _PatchColour(nn.Module):
    """A stand-in critic: per 14 x 14 patch, `2 * mean(R, G) - 1`, so colours pick the features."""

    config = SimpleNamespace(patch_size=14)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images[:, :2], 14) * 2 - 1


def _two_colour_frame(*colours: tuple[float, float]) -> torch.Tensor:
    """A (1, 3, 28, 28) frame whose left and right halves (2 patches each) have colours (R, G, 0)."""
    frame = torch.zeros(1, 3, 28, 28)
    for j, (red, green) in enumerate(colours):
        frame[0, 0, :, 14 * j : 14 * (j + 1)] = red
        frame[0, 1, :, 14 * j : 14 * (j + 1)] = green
    return frame


class _NoPerceptual(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())


def _tiny_module(**kwargs) -> OSDiffVSRModule:
    torch.manual_seed(0)
    defaults = dict(variant="tiny", lora_rank=4, flow_pretrained=False, discriminator_pretrained=False,
                    perceptual_pretrained=False, discriminator_warmup=2)
    return OSDiffVSRModule(**(defaults | kwargs))


class _ZeroFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        self.calls.append((src, dst))
        return torch.zeros(src.shape[0], 2, *src.shape[-2:])


def test_module_losses_use_the_previous_frame_as_anchor_and_the_default_gamma(monkeypatch) -> None:
    module = _tiny_module(tau=0.5)
    module.discriminator = _PatchColour()
    module.net.flow = flow = _ZeroFlow()
    previous = _two_colour_frame((1.0, 0.5), (1.0, 0.5))  # F = (1, 0), (1, 0)
    current = _two_colour_frame((1.0, 0.5), (0.5, 1.0))  # F = (1, 0), (0, 1): s+ = 1, 0
    output = _two_colour_frame((0.5, 1.0), (0.0, 0.5))  # F = (0, 1), (-1, 0): s- = 0, -1
    hr = torch.stack([previous, current, current], dim=1)
    lr = F.interpolate(hr.flatten(0, 1), scale_factor=0.25, mode="area").unflatten(0, (1, 3))
    monkeypatch.setattr(module.net, "forward", lambda *args, **kwargs: output)
    module.perceptual = _NoPerceptual()
    losses, d_loss = module.step_losses({"lr": lr, "hr": hr})
    # Eq. (5): -mean(s-) = -(0 - 1) / 2 = 0.5 (the current frame as anchor would give 0).
    assert losses["adversarial"].item() == pytest.approx(0.5)
    # Eqs. (6)-(7) at the default gamma = 1: S = (1 - s-) / 2 = 0.5, 1; the squared error is
    # (0.25 + 0.25 + 0) / 3 = 1/6 in both halves: (0.5 + 1) / 6 / 2 = 0.125 (gamma = 2: 0.1041667;
    # the current frame as anchor: S = 0.5, 0.5 and 0.0833333).
    assert losses["fmse"].item() == pytest.approx(0.125)
    # Eq. (3) with tau = 0.5: log(1 + e^{(0 - 1) / 0.5}) and log(1 + e^{(-1 - 0) / 0.5}): 0.1269280.
    assert d_loss.item() == pytest.approx(0.1269280, abs=1e-6)
    # Eqs. (15)-(16) with the tiny config's alpha = 5 and RAFT's flow from I_i to I_{i-1} (zero here):
    # M = 1 and e^-5 (|0.5| + |0.5| summed over RGB); (I_hat - I_{i-1})^2 over channels 1/6 and 1/3:
    # (1/6 + 0.0067379 / 3) / 2 = 0.0844563.
    assert losses["warp"].item() == pytest.approx(0.0844563, abs=1e-6)
    (src, dst), = flow.calls
    assert torch.equal(src, current) and torch.equal(dst, previous)


def test_the_paper_trains_lora_mff_and_the_critic_and_ablations_drop_mff() -> None:
    module = _tiny_module(osediff_lora="unused.pkl")  # the frozen OSEDiff adapter exists, read only by fit
    names = [name for name, _ in module.named_parameters()]
    lora = {n for n in names if ".lora_A.default." in n or ".lora_B.default." in n}
    assert lora and all(n.startswith(("net.vae.encoder.", "net.vae.quant_conv.", "net.unet.")) for n in lora)
    assert any(n.startswith("net.vae.encoder.") for n in lora) and any(n.startswith("net.unet.") for n in lora)
    fusion = {n for n in names if n.startswith("net.fusion.")}
    critic = {n for n in names if n.startswith("discriminator.")}
    assert any(".osediff." in n for n in names)
    expected = {"paper": lora | fusion | critic, "mff": lora | fusion | critic, "afat": lora | critic}
    trainable = lambda: {n for n, p in module.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable() == expected["paper"] and module.fuse  # no stage: the paper's joint run
    for setting, fuses, warped in (("paper", True, True), ("mff", True, False), ("afat", False, False)):
        schedule = OSDiffVSRStages(setting)
        schedule._trainer, schedule._pl_module = SimpleNamespace(optimizers=[]), module
        schedule._apply(0)
        assert trainable() == expected[setting], setting
        assert module.fuse is fuses and ("warp" in module.loss_weights) is warped
    # Never: the VAE decoder, RAFT, LPIPS, the base weights, OSEDiff's adapter.
    assert not any(n.startswith(("net.vae.decoder.", "net.vae.post_quant_conv.", "net.flow.", "perceptual."))
                   for n in expected["paper"])


def test_one_backward_gives_each_optimizer_its_own_loss_gradient() -> None:
    module = _tiny_module()
    torch.manual_seed(1)
    hr = torch.rand(1, 3, 3, 32, 32)
    lr = F.interpolate(hr.flatten(0, 1), scale_factor=0.25, mode="area").unflatten(0, (1, 3))
    losses, d_loss = module.step_losses({"lr": lr, "hr": hr})
    total = total_loss(losses, module.loss_weights)
    generator = [p for p in module.net.parameters() if p.requires_grad]
    critic = [p for p in module.discriminator.parameters() if p.requires_grad]
    # The backward of L_total + L_D sums these: L_total reaches every trained generator parameter and no
    # critic parameter, L_D every critic parameter and no generator parameter. So each optimizer steps on
    # its own loss's gradient, and every trained parameter takes part in the one pass (as DDP requires).
    assert all(g is not None for g in torch.autograd.grad(total, generator, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(total, critic, retain_graph=True, allow_unused=True))
    assert all(g is not None for g in torch.autograd.grad(d_loss, critic, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(d_loss, generator, allow_unused=True))


def test_batches_must_pair_lr_with_hr_at_the_generator_scale() -> None:
    module = _tiny_module()
    hr = torch.rand(1, 3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"x4 HR clips, got \(1, 3, 3, 16, 16\)"):
        module.step_losses({"lr": F.interpolate(hr.flatten(0, 1), scale_factor=0.5).unflatten(0, (1, 3)), "hr": hr})
