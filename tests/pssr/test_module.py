"""PS-SR training: Eqs. (8)-(12) by hand, loss isolation, the VSD copies, stages, draft initialisation, optimizer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from zoo.pssr.callbacks import PSSRStage, PSSRStages
from zoo.pssr.module import PSSRModule, frozen_view, vsd_weight, weighted_total
from zoo.pssr.network import merged_lora_state


@pytest.fixture
def module() -> PSSRModule:
    torch.manual_seed(0)
    return PSSRModule(variant="tiny", lora_rank=4, perceptual_pretrained=False, pixel_crop=16)


class ConstantDistance(nn.Module):
    """Stands in for LPIPS: a fixed distance, recording what it was given."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.seen = value, []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.detach(), y.detach()))
        return torch.tensor(self.value)


def _schedule(module: PSSRModule) -> PSSRStages:
    schedule = PSSRStages(latent_steps=2, pixel_steps=2, draft_steps=2, weight_decay=0.01)
    schedule._trainer, schedule._pl_module = SimpleNamespace(optimizers=[]), module
    return schedule


# The VSD models ----------------------------------------------------------------------------------


def test_vsd_models_share_the_pretrained_weights_without_copies(module: PSSRModule) -> None:
    base, real, fake = module.net.base, module.vsd_real, module.vsd_fake
    assert real.proj_out.weight is base.proj_out.weight
    assert real.blocks[0].attn1.to_q.weight is base.blocks[0].attn1.to_q.base_layer.weight
    assert fake.blocks[0].attn1.to_q.base_layer.weight is base.blocks[0].attn1.to_q.base_layer.weight
    assert not any(t.is_meta for t in [*real.parameters(), *real.buffers(), *fake.parameters(), *fake.buffers()])
    assert not any("lora_" in name for name, _ in real.named_parameters())
    # phi_reg is the pretrained DiT: the base with its adapters folded out.
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        pretrained = frozen_view(base)
        z, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0])
        context = module.net.prompt_embeds
        assert torch.equal(real(z, t, context, return_dict=False)[0], pretrained(z, t, context, return_dict=False)[0])
        assert not torch.equal(real(z, t, context, return_dict=False)[0], base(z, t, context, return_dict=False)[0])


def test_vsd_weight_by_hand() -> None:
    z_hat = torch.tensor([1.0, -3.0, 2.0, 2.0]).view(2, 1, 1, 1, 2)
    x0_real = torch.zeros(2, 1, 1, 1, 2)
    sigma = torch.tensor([0.5, 0.2]).view(2, 1, 1, 1, 1)
    # mean |z_hat - x0_real| per sample: 2 and 2; omega = 0.5 / 2, 0.2 / 2.
    assert torch.allclose(vsd_weight(z_hat, x0_real, sigma).flatten(), torch.tensor([0.25, 0.1]))


def test_eq8_vsd_gradient_is_omega_times_real_minus_fake(module: PSSRModule, monkeypatch: pytest.MonkeyPatch) -> None:
    real_velocity, fake_velocity = torch.full((1, 16, 1, 2, 2), 0.5), torch.full((1, 16, 1, 2, 2), -0.25)
    calls = []

    def dit_velocity(model, z, timestep):
        calls.append((model, z.detach().clone(), timestep.clone()))
        return real_velocity if model is module.vsd_real else fake_velocity

    monkeypatch.setattr(module.net, "dit_velocity", dit_velocity)
    z_hat = torch.randn(1, 16, 1, 2, 2, requires_grad=True)
    torch.manual_seed(3)
    generator_loss, fake_loss = module.vsd_losses(z_hat)
    generator_loss.backward()
    # Replay the draws: sigma ~ U(0.02, 0.98), eps, then the fake score's sigma' and eps'.
    torch.manual_seed(3)
    sigma = torch.empty(1, 1, 1, 1, 1).uniform_(0.02, 0.98)
    eps = torch.randn(1, 16, 1, 2, 2)
    sigma_fake = torch.empty(1, 1, 1, 1, 1).uniform_(0.02, 0.98)
    eps_fake = torch.randn(1, 16, 1, 2, 2)
    z_t = (1 - sigma) * z_hat.detach() + sigma * eps  # Eq. (2), the Wan convention
    assert [c[0] for c in calls] == [module.vsd_real, module.vsd_fake, module.vsd_fake]
    assert torch.allclose(calls[0][1], z_t) and torch.allclose(calls[0][2], 1000 * sigma.flatten())
    omega = sigma / (z_hat.detach() - (z_t - sigma * real_velocity)).abs().mean()
    assert torch.allclose(z_hat.grad, omega * (real_velocity - fake_velocity))  # Eq. (8), batch of 1
    # The fake score regresses the generator's flow at fresh noise: eps' - z_hat.
    assert torch.allclose(calls[2][1], (1 - sigma_fake) * z_hat.detach() + sigma_fake * eps_fake)
    assert fake_loss.item() == pytest.approx(((fake_velocity - (eps_fake - z_hat.detach())) ** 2).mean().item())


# The adversarial loss ---------------------------------------------------------------------------


def test_eq9_adversarial_losses_by_hand_and_kept_apart(module: PSSRModule) -> None:
    head = module.discriminator.head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(0.5)  # every logit 0.5
    z_hat = torch.randn(1, 16, 2, 4, 4, requires_grad=True)
    generator, discriminator = module.adversarial_losses(z_hat, torch.randn(1, 16, 2, 4, 4))
    # generator: softplus(-0.5) = log(1 + e^-0.5); discriminator: softplus(-0.5) + softplus(0.5).
    assert generator.item() == pytest.approx(math.log1p(math.exp(-0.5)))
    assert discriminator.item() == pytest.approx(math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5)))
    generator.backward(retain_graph=True)
    assert all(p.grad is None for p in module.discriminator.parameters())  # D is not trained by G's term
    assert z_hat.grad is not None
    grad = z_hat.grad.clone()
    discriminator.backward()
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0
    assert torch.equal(z_hat.grad, grad)  # nor G by D's


# Eqs. (10)-(12) ----------------------------------------------------------------------------------


def test_weighted_total_by_hand() -> None:
    losses = {"l2": torch.tensor(0.5), "vsd": torch.tensor(2.0), "adversarial": torch.tensor(3.0)}
    # Eq. (10) with L164's weights: 1 * 0.5 + 1 * 2 + 0.1 * 3 = 2.8.
    assert weighted_total(losses, {"l2": 1.0, "vsd": 1.0, "adversarial": 0.1}).item() == pytest.approx(2.8)
    assert weighted_total(losses, {"l2": 1.0, "vsd": 0.1, "adversarial": 1.0}).item() == pytest.approx(3.7)


def _stub_decoder(latents: torch.Tensor) -> torch.Tensor:
    """Latents `(B, C, 1, h, w)` -> one frame `(B, 1, 3, 8h, 8w)` showing the first three channels."""
    return latents[:, :3].transpose(1, 2).repeat_interleave(8, -1).repeat_interleave(8, -2)


def test_eq12_draft_objective_by_hand(module: PSSRModule, monkeypatch: pytest.MonkeyPatch) -> None:
    z_L, z_H = torch.full((1, 16, 1, 2, 2), 3.0), torch.full((1, 16, 1, 2, 2), 1.0)
    hr = torch.full((1, 1, 3, 16, 16), 1.0)
    seen = {}

    def draft_velocity(z, timestep, base_hidden):
        seen.update(z=z, timestep=timestep, base_hidden=base_hidden)
        return torch.full_like(z, 1.5)

    monkeypatch.setattr(module.net, "base_velocity", lambda z, capture=False: (z, ["features"] if capture else []))
    monkeypatch.setattr(module.net, "draft_velocity", draft_velocity)
    monkeypatch.setattr(module.net, "decode", _stub_decoder)
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.full(shape[0], 0.5))
    module.perceptual = ConstantDistance(0.25)
    module.loss_weights = {"l2": 1.0, "pixel_l2": 1.0, "lpips": 2.0}
    losses = module.draft_losses(z_L, z_H, hr)
    # z_t = 0.5 * z_L + 0.5 * z_H = 2 at sigma 0.5 (timestep 500), guided by the base's features.
    assert torch.equal(seen["z"], torch.full_like(z_L, 2.0)) and seen["timestep"].tolist() == [500.0]
    assert seen["base_hidden"] == ["features"]
    # L2: (1.5 - (3 - 1))^2 = 0.25. Clean prediction 2 - 0.5 * 1.5 = 1.25, so pixel L2 (1.25 - 1)^2 = 0.0625.
    assert losses["l2"].item() == pytest.approx(0.25) and losses["pixel_l2"].item() == pytest.approx(0.0625)
    # Eq. (12) = 1 * 0.25 + 1 * (1 * 0.0625 + 2 * 0.25) = 0.8125.
    assert weighted_total(losses, module.loss_weights).item() == pytest.approx(0.8125)
    decoded, target = module.perceptual.seen[0]
    assert decoded.shape == target.shape == (1, 3, 16, 16)


def test_pixel_crops_decode_the_latents_over_the_hr_pixels_they_cover(module: PSSRModule,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module.net, "decode", _stub_decoder)
    module.perceptual = ConstantDistance(0.0)
    module.loss_weights = {"pixel_l2": 1.0}
    z_hat = torch.randn(1, 16, 1, 5, 6)
    hr = _stub_decoder(z_hat)  # HR pixels [8i, 8i + 8) x [8j, 8j + 8) show latent pixel (i, j)
    for seed in range(6):  # random 2 x 2 latent crops (16 HR pixels) anywhere in the 5 x 6 latent
        torch.manual_seed(seed)
        assert module.pixel_losses(z_hat, hr)["pixel_l2"].item() == 0.0
    shifted = torch.roll(hr, 8, dims=-1)
    assert any(module.pixel_losses(z_hat, shifted)["pixel_l2"].item() > 0 for _ in range(3))


def test_eq10_base_objective_routes_each_loss_to_its_weight(module: PSSRModule,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    z_L, z_H = torch.full((1, 16, 1, 2, 2), 3.0), torch.full((1, 16, 1, 2, 2), 1.0)
    monkeypatch.setattr(module.net, "base_velocity", lambda z, capture=False: (torch.full_like(z, 2.5), []))
    received = {}

    def vsd_losses(z_hat):
        received["vsd"] = z_hat
        return torch.tensor(0.3), torch.tensor(0.7)

    def adversarial_losses(z_hat, target):
        received["adversarial"] = (z_hat, target)
        return torch.tensor(0.2), torch.tensor(1.1)

    monkeypatch.setattr(module, "vsd_losses", vsd_losses)
    monkeypatch.setattr(module, "adversarial_losses", adversarial_losses)
    module.loss_weights = {"l2": 1.0, "vsd": 1.0, "adversarial": 0.1}
    losses, auxiliary = module.base_losses(z_L, z_H, torch.zeros(1, 1, 3, 16, 16))
    # z_hat = z_L - phi_base = 0.5; L2 = (2.5 - 2)^2 = 0.25; Eq. (10) = 0.25 + 0.3 + 0.1 * 0.2 = 0.57.
    assert torch.equal(received["vsd"], torch.full_like(z_L, 0.5))
    assert torch.equal(received["adversarial"][1], z_H)
    assert weighted_total(losses, module.loss_weights).item() == pytest.approx(0.57)
    assert auxiliary == {"vsd_fake": torch.tensor(0.7), "discriminator": torch.tensor(1.1)}


# Stages, the draft's initialisation, the optimizer ------------------------------------------------------


def test_each_phase_trains_exactly_its_parameters(module: PSSRModule) -> None:
    schedule = _schedule(module)
    names = [name for name, _ in module.named_parameters()]
    expected = {
        "latent": {n for n in names if (n.startswith(("net.base.", "vsd_fake.")) and "lora_" in n)
                   or n.startswith("discriminator.")},
        "pixel": {n for n in names if n.startswith("net.base.") and "lora_" in n},
        "draft": {n for n in names if n.startswith("net.draft.")},
    }
    for index, (name, generator) in enumerate([("latent", "base"), ("pixel", "base"), ("draft", "draft")]):
        schedule._apply(index)
        assert module.stage.name == name and module.generator == generator
        assert {n for n, p in module.named_parameters() if p.requires_grad} == expected[name]
    assert not any(p.requires_grad for p in module.net.vae.parameters())
    assert not any(p.requires_grad for p in module.perceptual.parameters())
    assert module.loss_weights == {"l2": 1.0, "pixel_l2": 1.0, "lpips": 2.0}
    with pytest.raises(ValueError, match="generator must be one of base, draft"):
        PSSRStage("x", 1, ["*"], generator="teacher")


def test_entering_the_draft_phase_initialises_the_draft_once(module: PSSRModule) -> None:
    with torch.no_grad():
        for name, p in module.net.base.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    schedule = _schedule(module)
    schedule._apply(1)
    module.on_train_batch_start(None, 0)
    assert not module.draft_initialised
    schedule._apply(2)
    module.on_train_batch_start(None, 0)
    assert module.draft_initialised
    merged = merged_lora_state(module.net.base)
    draft = module.net.draft.transformer
    assert torch.equal(draft.blocks[1].attn1.to_q.weight, merged["blocks.5.attn1.to_q.weight"])
    with torch.no_grad():
        draft.blocks[1].attn1.to_q.weight.add_(1.0)  # training moves it
    module.on_train_batch_start(None, 1)
    assert not torch.equal(draft.blocks[1].attn1.to_q.weight, merged["blocks.5.attn1.to_q.weight"])
    assert "draft_initialised" in module.state_dict()  # a resumed run keeps the trained draft


def test_optimizer_groups_per_phase(module: PSSRModule) -> None:
    module.hparams.fake_lr, module.hparams.discriminator_lr = 2e-5, 3e-5
    schedule = _schedule(module)
    schedule._apply(0)
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [5e-5, 2e-5, 3e-5]  # base LoRA, VSD fake score, discriminator
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in module.parameters())
    schedule._apply(2)
    groups = module.configure_optimizers().param_groups
    fusion = {id(p) for p in module.net.draft.fusion.parameters()}
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]  # the fusion layers never decay
    assert {id(p) for p in groups[1]["params"]} == fusion


def test_module_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="vsd_sigma_range"):
        PSSRModule(variant="tiny", perceptual_pretrained=False, vsd_sigma_range=(0.0, 0.98))
    with pytest.raises(ValueError, match="unknown loss"):
        PSSRModule(variant="tiny", perceptual_pretrained=False, loss_weights={"gan": 1.0})
