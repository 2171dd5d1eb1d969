"""`OSDiffVSRModule`: adjacent-frame adversarial training of the one-step generator, then fusion.

Each training step (manual optimization) generates frame i of a 3-frame clip, steps the generator
(AdamW) on Eq. (17) and then the DINOv2 discriminator (SGD with warm-up) on Eq. (3). Which
parameters train, whether fusion runs and the loss weights come from the active
`OSDiffVSRStage` (`zoo.osdiffvsr.callbacks.OSDiffVSRStages`).

AFAT, as implemented here (the symbols of Eqs. 3-7): `F(I)` are the discriminator's patch features
`(N, D, h, w)`; `cos_p(A, B)` the cosine similarity of the features of `A` and `B` at patch `p`.
The real adjacent frame `I_{i-1}` is the anchor. The discriminator learns that the real current
frame `I_i` matches it (positive) and the generated `I_hat_i` does not (negative); the generator
learns to make `I_hat_i` match it; the focal MSE weights pixels by how far apart the discriminator
still finds `I_hat_i` and `I_{i-1}`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.components.flow import warp
from zoo.components.tiling import pad_to_multiple
from zoo.components.train.losses import PerceptualLoss, masked_warp_loss
from zoo.components.train.module import ZooModule
from zoo.components.upscaler import VideoUpscaler, check_variant
from zoo.osdiffvsr.callbacks import OSDiffVSRStage
from zoo.osdiffvsr.network import (
    DINOv2Discriminator,
    DiscriminatorConfig,
    OSDiffVSRConfig,
    OSDiffVSRNet,
    fusion_mask,
    load_osediff_lora,
)

LOSS_NAMES = ("mse", "fmse", "lpips", "adversarial", "warp")


def patch_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity `(N, h, w)` of patch features `(N, D, h, w)` at each patch."""
    return F.cosine_similarity(a, b, dim=1)


def afat_discriminator_loss(real_current: Tensor, real_previous: Tensor, fake_current: Tensor,
                            tau: float) -> Tensor:
    """Eq. (3): patch-level contrastive loss `L_D`, averaged over patches.

    With anchor `F(I_{i-1})_p`, positive `F(I_i)_p` and negative `F(I_hat_i)_p` at each patch `p`:
    `L_D = mean_p -log( exp(tau s+_p) / (exp(tau s+_p) + exp(tau s-_p)) )`,
    `s+_p = cos_p(I_i, I_{i-1})`, `s-_p = cos_p(I_hat_i, I_{i-1})`. `tau` = 100 scales the
    similarities (the CLIP convention, logit scale 1/0.01).

    Args:
        real_current: `F(I_i)` `(N, D, h, w)`.
        real_previous: `F(I_{i-1})`.
        fake_current: `F(I_hat_i)`.
        tau: similarity scale.
    """
    positive = tau * patch_cosine(real_current, real_previous)
    negative = tau * patch_cosine(fake_current, real_previous)
    return F.softplus(negative - positive).mean()  # Eq. (3), OS-DiffVSR


def afat_generator_loss(real_previous: Tensor, fake_current: Tensor) -> Tensor:
    """Eqs. (4)-(5): `L_G = 1 - mean_p cos_p(I_{i-1}, I_hat_i)`, the mean patch cosine similarity as a loss.

    Args:
        real_previous: `F(I_{i-1})` `(N, D, h, w)`.
        fake_current: `F(I_hat_i)`.
    """
    similarity = patch_cosine(real_previous, fake_current).mean()  # Eq. (4), OS-DiffVSR
    return 1 - similarity  # Eq. (5), OS-DiffVSR


def focal_mse_loss(output: Tensor, target: Tensor, real_previous: Tensor, fake_current: Tensor, gamma: float,
                   patch_size: int) -> Tensor:
    """Eqs. (6)-(7): focal MSE `mean( S_i^gamma * (I_hat_i - I_i)^2 )`.

    `S_i = (1 - cos(F(I_{i-1}), F(I_hat_i))) / 2` per patch (Eq. 6), upsampled x`patch_size`
    (nearest) to the discriminator's input size and resized (bilinear) to the frame size; it is a
    weight, so no gradient flows through it. Identical features give weight 0, orthogonal
    features `0.5^gamma`.

    Args:
        output: `I_hat_i` `(N, 3, H, W)`.
        target: `I_i`.
        real_previous: `F(I_{i-1})` `(N, D, h, w)`.
        fake_current: `F(I_hat_i)`.
        gamma: focusing exponent.
        patch_size: the discriminator's patch size (14).
    """
    distance = (1 - patch_cosine(real_previous, fake_current)[:, None]) / 2  # Eq. (6), OS-DiffVSR
    distance = F.interpolate(distance.detach(), scale_factor=patch_size, mode="nearest")
    if distance.shape[-2:] != output.shape[-2:]:
        distance = F.interpolate(distance, size=output.shape[-2:], mode="bilinear", align_corners=False)
    return (distance.clamp_min(0) ** gamma * (output - target).square()).mean()  # Eq. (7), OS-DiffVSR


class OSDiffVSRModule(ZooModule):
    """OS-DiffVSR training: one-step SD-2.1 generator with LoRA, MFF, and a DINOv2 critic.

    Args:
        variant: network size, `"full"` (SD-2.1-base, DINOv2-S) or `"tiny"` (CPU tests).
        lora_rank: LoRA rank on the VAE encoder and UNet (4 to start from OSEDiff's release).
        base_model: SD-2.1-base folder or Hub id whose weights (and empty-prompt embedding) fill the
            generator; None keeps the random initialisation.
        osediff_lora: OSEDiff's checkpoint (`osediff.pkl`) to initialise the LoRA from.
        flow_pretrained: load torchvision's RAFT weights.
        discriminator_pretrained: load the published DINOv2-S weights through timm.
        perceptual_pretrained: load the published LPIPS weights.
        lr: generator learning rate when no stage sets one.
        weight_decay: generator AdamW weight decay when no stage sets one.
        discriminator_lr: discriminator SGD learning rate.
        discriminator_warmup: discriminator steps of linear learning-rate warm-up.
        gamma: focal MSE focusing exponent (Eq. 7).
        tau: similarity scale of the contrastive discriminator loss (Eq. 3).
        loss_weights: Eq. (17) weights used when no stage sets them.
    """

    hub_name = "osdiffvsr"
    loss_names = LOSS_NAMES

    def __init__(
        self,
        variant: str = "full",
        lora_rank: int = 32,
        base_model: str | None = None,
        osediff_lora: str | None = None,
        flow_pretrained: bool = True,
        discriminator_pretrained: bool = True,
        perceptual_pretrained: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 1e-8,
        discriminator_lr: float = 5e-4,
        discriminator_warmup: int = 500,
        gamma: float = 2.0,
        tau: float = 100.0,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        check_variant(variant)
        self.save_hyperparameters()
        self.automatic_optimization = False
        config = getattr(OSDiffVSRConfig, variant)().replace(
            lora_rank=lora_rank, base_model=base_model, flow_pretrained=flow_pretrained)
        self.net = OSDiffVSRNet(config)
        if base_model is not None:
            self.net.load_base(base_model)
        if osediff_lora is not None:
            load_osediff_lora(self.net, osediff_lora)
        self.discriminator = DINOv2Discriminator(getattr(DiscriminatorConfig, variant)(),
                                                 pretrained=discriminator_pretrained)
        self.perceptual = PerceptualLoss("lpips", pretrained=perceptual_pretrained)
        self.stage: OSDiffVSRStage | None = None
        self.loss_weights = dict(loss_weights or {"fmse": 1.0, "lpips": 1.0, "adversarial": 2.0, "warp": 2.0})
        unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss(es) {', '.join(unknown)}; choose from {', '.join(LOSS_NAMES)}")

    @property
    def fuse(self) -> bool:
        """Whether the generator applies MFF now (the stage decides; on outside staged training)."""
        return True if self.stage is None else self.stage.fuse

    def to_upscaler(self) -> VideoUpscaler:
        from zoo.osdiffvsr.pipeline import OSDiffVSRUpscaler

        return OSDiffVSRUpscaler.from_net(self.net)

    def forward(self, lr: Tensor) -> Tensor:
        """The generated middle frame `(B, 3, s*h, s*w)` of LR windows `(B, 3, 3, h, w)` of any size."""
        window, padding = pad_to_multiple(lr[:, :3].flatten(0, 1), self.net.size_multiple)
        window = window.unflatten(0, (lr.shape[0], 3))
        output = self.net(window[:, 0], window[:, 1], window[:, 2], fuse=self.fuse)
        return padding.crop(output, self.net.config.scale)

    # Losses -------------------------------------------------------------------------------

    def generator_losses(self, output: Tensor, hr: Tensor, previous_output: Tensor | None) -> dict[str, Tensor]:
        """The active losses of Eq. (17) for `I_hat_i` (`output`) of HR clips `hr` `(B, 3, 3, H, W)`.

        Args:
            output: `I_hat_i` `(B, 3, H, W)`.
            hr: the real frames `(I_{i-1}, I_i, I_{i+1})`.
            previous_output: `I_hat_{i-1}`, needed by the warp loss.
        """
        weights = self.loss_weights
        previous, current = hr[:, 0], hr[:, 1]
        losses = {}
        if "mse" in weights:
            losses["mse"] = F.mse_loss(output, current)
        if "lpips" in weights:
            losses["lpips"] = self.perceptual(output, current)
        if "fmse" in weights or "adversarial" in weights:
            with torch.no_grad():
                real_previous = self.discriminator(previous)
            fake_current = self.discriminator(output)
            if "fmse" in weights:
                losses["fmse"] = focal_mse_loss(output, current, real_previous, fake_current, self.hparams.gamma,
                                                self.discriminator.config.patch_size)
            if "adversarial" in weights:
                losses["adversarial"] = afat_generator_loss(real_previous, fake_current)
        if "warp" in weights:
            losses["warp"] = self.warp_loss(output, previous_output, current, previous)
        return losses

    def warp_loss(self, output: Tensor, previous_output: Tensor, current: Tensor, previous: Tensor) -> Tensor:
        """Eqs. (15)-(16): `mean_M |I_hat_i - W(I_hat_{i-1})|` with HR flow and the Eq. (14) mask of the HR frames.

        Args:
            output: `I_hat_i`.
            previous_output: `I_hat_{i-1}`.
            current: the real `I_i`, whose RAFT flow to `I_{i-1}` aligns the outputs.
            previous: the real `I_{i-1}`.
        """
        config = self.net.config
        flow = self.net.flow(current, previous)
        mask = fusion_mask(current, warp(previous, flow)[None], config.fusion_alpha,
                           config.fusion_threshold)  # Eq. (15), OS-DiffVSR
        return masked_warp_loss(output, previous_output, flow, mask)  # Eq. (16), OS-DiffVSR

    # Training -----------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        lr = self.hparams.lr if self.stage is None else self.stage.lr
        kwargs = {"weight_decay": self.hparams.weight_decay}
        if self.stage is not None:
            kwargs.update(self.stage.optimizer_kwargs)
        generator = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=lr, **kwargs)
        discriminator = torch.optim.SGD([p for p in self.discriminator.parameters() if p.requires_grad],
                                        lr=self.hparams.discriminator_lr)
        warmup = max(1, self.hparams.discriminator_warmup)
        # Warm-up follows the global step (2 optimizer steps per batch), so a stage switch, which
        # rebuilds the scheduler, does not restart it.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            discriminator, lambda _: min(1.0, (self.global_step // 2 + 1) / warmup))
        return [generator, discriminator], [schedule]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        g_opt, d_opt = self.optimizers()
        schedule = self.lr_schedulers()
        lr, hr = batch["lr"], batch["hr"]
        if lr.shape[1] < 3:
            raise ValueError(f"training clips must hold 3 frames, got {lr.shape[1]}")
        weights = self.loss_weights

        self.toggle_optimizer(g_opt)
        output = self.net(lr[:, 0], lr[:, 1], lr[:, 2], fuse=self.fuse)
        # I_hat_{i-1} is the clip's first frame: its missing neighbour is I_i, as at inference.
        previous_output = self.net(lr[:, 1], lr[:, 0], lr[:, 1], fuse=self.fuse) if "warp" in weights else None
        losses = self.generator_losses(output, hr, previous_output)
        total = sum(weights[name] * value for name, value in losses.items())  # Eq. (17), OS-DiffVSR
        g_opt.zero_grad()
        self.manual_backward(total)
        g_opt.step()
        self.untoggle_optimizer(g_opt)

        self.toggle_optimizer(d_opt)
        real_previous, real_current = self.discriminator(torch.cat([hr[:, 0], hr[:, 1]])).chunk(2)
        d_loss = afat_discriminator_loss(real_current, real_previous, self.discriminator(output.detach()),
                                         self.hparams.tau)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        schedule.step()
        self.untoggle_optimizer(d_opt)

        self.log_dict({f"train/{name}": value.detach() for name, value in losses.items()}, on_step=True)
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True)
        self.log("train/d_loss", d_loss.detach(), on_step=True)
        return total.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        lr, hr = batch["lr"], batch["hr"]
        output = self(lr)
        mse = F.mse_loss(output, hr[:, 1]).clamp_min(1e-10)
        self.log("val/psnr", -10 * torch.log10(mse), batch_size=lr.shape[0])
