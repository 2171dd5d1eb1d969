"""OS-DiffVSR training: AFAT losses (Eqs. 3-5), focal MSE (Eqs. 6-7), stages, a fixed-batch fit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from zoo.osdiffvsr.callbacks import OSDiffVSRStages
from zoo.osdiffvsr.module import (
    OSDiffVSRModule,
    afat_discriminator_loss,
    afat_generator_loss,
    focal_mse_loss,
)


def _features(*vectors: tuple[float, float]) -> torch.Tensor:
    """Patch features (1, 2, 1, P) from P 2-D vectors."""
    return torch.tensor(vectors).T.reshape(1, 2, 1, len(vectors))


def test_eq3_discriminator_loss_by_hand() -> None:
    anchor = _features((1.0, 0.0), (1.0, 0.0))       # F(I_{i-1})
    real = _features((1.0, 0.0), (0.0, 1.0))         # F(I_i): cos 1, 0
    fake = _features((0.0, 1.0), (-1.0, 0.0))        # F(I_hat_i): cos 0, -1
    tau = 2.0
    # Per patch -log(e^{tau s+} / (e^{tau s+} + e^{tau s-})) = log(1 + e^{tau (s- - s+)}).
    expected = (math.log(1 + math.exp(2.0 * (0 - 1))) + math.log(1 + math.exp(2.0 * (-1 - 0)))) / 2
    assert afat_discriminator_loss(real, anchor, fake, tau).item() == pytest.approx(expected)


def test_eq4_5_generator_loss_by_hand() -> None:
    anchor = _features((1.0, 0.0), (1.0, 0.0), (3.0, 4.0))
    fake = _features((2.0, 0.0), (0.0, 1.0), (3.0, 4.0))  # cos 1, 0, 1
    assert afat_generator_loss(anchor, fake).item() == pytest.approx(1 - 2 / 3)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_eq6_7_focal_mse_zero_where_identical_and_half_power_gamma_where_orthogonal(gamma: float) -> None:
    anchor = _features((1.0, 0.0), (1.0, 0.0))
    fake = _features((1.0, 0.0), (0.0, 1.0))  # patch 0 identical, patch 1 orthogonal
    target = torch.zeros(1, 3, 14, 28)
    left = torch.zeros(1, 3, 14, 28)
    left[..., :14] = 0.5
    assert focal_mse_loss(left, target, anchor, fake, gamma, 14).item() == 0.0
    right = torch.zeros(1, 3, 14, 28)
    right[..., 14:] = 0.5
    # Half of the pixels err by 0.5 with weight 0.5^gamma.
    expected = 0.5 * 0.5**gamma * 0.25
    assert focal_mse_loss(right, target, anchor, fake, gamma, 14).item() == pytest.approx(expected)


def _tiny_module(**kwargs) -> OSDiffVSRModule:
    torch.manual_seed(0)
    defaults = dict(variant="tiny", lora_rank=4, flow_pretrained=False, discriminator_pretrained=False,
                    perceptual_pretrained=False, discriminator_warmup=2)
    return OSDiffVSRModule(**(defaults | kwargs))


def test_stage_freezing() -> None:
    module = _tiny_module()
    schedule = OSDiffVSRStages(afat_steps=2, mff_steps=2)
    schedule._trainer, schedule._pl_module = SimpleNamespace(optimizers=[]), module
    for index, fuses in ((0, False), (1, True)):
        schedule._apply(index)
        assert module.fuse is fuses
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        assert {n for n in trainable if n.startswith("net.")} == {
            n for n, _ in module.named_parameters()
            if "lora_" in n or (fuses and n.startswith("net.fusion."))
        }
        assert all(p.requires_grad for p in module.discriminator.parameters())
        assert not any(p.requires_grad for p in module.net.vae.decoder.parameters())
        assert not any(p.requires_grad for p in module.net.vae.post_quant_conv.parameters())
        assert not any(p.requires_grad for p in module.perceptual.parameters())
        assert not any(p.requires_grad for p in module.net.flow.parameters())
        assert any(p.requires_grad for n, p in module.net.vae.encoder.named_parameters() if "lora_" in n)
        assert any(p.requires_grad for n, p in module.net.unet.named_parameters() if "lora_" in n)
        assert "warp" in module.loss_weights if fuses else "warp" not in module.loss_weights


class _RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def test_loss_decreases_on_a_fixed_batch(tmp_path) -> None:
    module = _tiny_module(lr=2e-3)
    torch.manual_seed(1)
    hr = torch.rand(1, 3, 3, 32, 32)
    lr = torch.nn.functional.interpolate(hr.flatten(0, 1), scale_factor=0.25, mode="area").unflatten(0, (1, 3))
    batch = {"hr": hr[0], "lr": lr[0]}
    record = _RecordLosses()
    # The adversarial and focal terms follow the discriminator, which trains alongside; the
    # reconstruction losses alone must fall on a repeated batch.
    stages = OSDiffVSRStages(afat_steps=8, mff_steps=8, lr=2e-3, afat_loss_weights={"mse": 1.0, "lpips": 1.0},
                             mff_loss_weights={"mse": 1.0, "lpips": 1.0, "warp": 2.0})
    trainer = Trainer(max_steps=16, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[stages, record],
                      default_root_dir=tmp_path)
    trainer.fit(module, DataLoader([batch] * 8, batch_size=1))
    assert len(record.losses) == 8
    assert stages.current_stage.name == "mff"
    # Within each stage (fixed loss weights) the generator loss falls on the repeated batch.
    assert record.losses[3] < record.losses[0]
    assert record.losses[7] < record.losses[4]
