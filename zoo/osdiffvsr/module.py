"""`OSDiffVSRModule`: the paper's joint training of the one-step generator, the fusion and the critic.

Each training step generates frame i of a 3-frame clip `(I_{i-1}, I_i, I_{i+1})` and updates the
generator (AdamW) on Eq. (17) and the DINOv2 discriminator (SGD with warm-up) on Eq. (3), "trained
synchronously" (Sec. 4.1). Which parameters train, whether fusion runs and the Eq. (17) weights are
the paper's unless an `OSDiffVSRStage` (`zoo.osdiffvsr.callbacks.OSDiffVSRStages`) picks a Table 3
ablation.

Symbols of Eqs. (3)-(7): `F(I)` are the discriminator's patch features `(N, D, P, Q)` (Eq. 4);
`<a, b>_pq` the cosine similarity of two feature maps at patch (p, q). The real previous frame
`I_{i-1}` is the anchor: the discriminator learns that the real current frame `I_i` matches it
and the generated `I_hat_i` does not (Eq. 3); the generator learns to make `I_hat_i` match it
(Eq. 5); the focal MSE weights pixels by how far apart the discriminator still finds them (Eqs. 6-7).

Both updates come from ONE backward pass of `L_total + L_D`: the generator's terms see the
discriminator's parameters as constants and `L_D` sees the generated frame as a constant, so each
optimizer receives exactly its own loss's gradient (the same as two separate passes), and every
trained parameter takes part in the one pass, as DistributedDataParallel requires.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.components.flow import warp
from zoo.components.tiling import pad_to_multiple
from zoo.components.train.losses import PerceptualLoss
from zoo.components.train.module import ZooModule
from zoo.components.upscaler import VideoUpscaler, check_variant
from zoo.osdiffvsr.callbacks import PAPER_LOSS_WEIGHTS, PAPER_TRAINABLE, OSDiffVSRStage
from zoo.osdiffvsr.network import (
    DINOv2Discriminator,
    DiscriminatorConfig,
    OSDiffVSRConfig,
    OSDiffVSRNet,
    load_osediff_lora,
    warping_error,
)

LOSS_NAMES = ("adversarial", "fmse", "lpips", "warp")


def patch_cosine(a: Tensor, b: Tensor) -> Tensor:
    """`<a, b>_pq`: cosine similarity `(N, P, Q)` of patch features `(N, D, P, Q)` at each patch."""
    return F.cosine_similarity(a, b, dim=1)


def afat_discriminator_loss(real_current: Tensor, real_previous: Tensor, fake_current: Tensor,
                            tau: float) -> Tensor:
    """Eq. (3): the patch-level contrastive loss `L_D` of the discriminator.

    `L_D = -1/(PQ) sum_pq log( e^{s+/tau} / (e^{s+/tau} + e^{s-/tau}) ) = mean_pq softplus((s- - s+) / tau)`
    with `s+ = <F(I_{i-1}), F(I_i)>_pq` (real pair) and `s- = <F(I_{i-1}), F(I_hat_i)>_pq` (fake pair).

    Args:
        real_current: `F(I_i)` `(N, D, P, Q)`.
        real_previous: `F(I_{i-1})`, the anchor.
        fake_current: `F(I_hat_i)`.
        tau: the temperature.
    """
    positive = patch_cosine(real_previous, real_current)
    negative = patch_cosine(real_previous, fake_current)
    return F.softplus((negative - positive) / tau).mean()  # Eq. (3), OS-DiffVSR


def afat_generator_loss(real_previous: Tensor, fake_current: Tensor) -> Tensor:
    """Eq. (5): `L_G = -1/(PQ) sum_pq <F(I_{i-1}), F(I_hat_i)>_pq`, in [-1, 1] (optimum -1).

    Args:
        real_previous: `F(I_{i-1})` `(N, D, P, Q)`.
        fake_current: `F(I_hat_i)`.
    """
    return -patch_cosine(real_previous, fake_current).mean()  # Eq. (5), OS-DiffVSR


def focal_mse_loss(output: Tensor, target: Tensor, real_previous: Tensor, fake_current: Tensor, gamma: float,
                   patch_size: int) -> Tensor:
    """Eqs. (6)-(7): the focal MSE `L_fmse = mean( S_i^gamma * (I_hat_i - I_i)^2 )`.

    Eq. (7): `S_i = ((1 - <F(I_{i-1}), F(I_hat_i)>) / 2) ↑_{x n}`, in [0, 1], per patch, upsampled
    x`patch_size` (n = 14, nearest) to the discriminator's input and resized (bilinear) to the
    frame when that input was resized. Eq. (6) multiplies it, raised to gamma, with the squared
    error at each pixel ("focal mean square", P:119: `||.||_2` read as the squared error, averaged
    over pixels and channels).

    The anchor is `F(I_{i-1})` as Eq. (7) writes it (the prose of P:119 names `I_i` and `I_hat_i`;
    the formula uses the discriminator's own score of Eq. 5). `S_i` is a weight: no gradient flows
    through it (the paper is silent; through it, L_fmse would become a second adversarial term).

    Args:
        output: `I_hat_i` `(N, 3, H, W)`.
        target: `I_i`.
        real_previous: `F(I_{i-1})` `(N, D, P, Q)`.
        fake_current: `F(I_hat_i)`.
        gamma: the focusing parameter gamma >= 0.
        patch_size: the discriminator's patch size n (14).
    """
    factor = (1 - patch_cosine(real_previous, fake_current)[:, None]) / 2  # Eq. (7), OS-DiffVSR
    factor = F.interpolate(factor.detach(), scale_factor=patch_size, mode="nearest")
    if factor.shape[-2:] != output.shape[-2:]:
        factor = F.interpolate(factor, size=output.shape[-2:], mode="bilinear", align_corners=False)
    # clamp: identical features give 1 - cos = -1e-8 by rounding, and S^gamma of a negative is NaN.
    return (factor.clamp_min(0) ** gamma * (output - target).square()).mean()  # Eq. (6), OS-DiffVSR


def warp_loss(output: Tensor, current: Tensor, previous: Tensor, flow: Tensor, alpha: float) -> Tensor:
    """Eqs. (15)-(16): the warp loss against the warped ground-truth previous frame, soft-masked.

    `W = Warp(I^H_{i-1}, OF^H_{b,i-1})` aligns the real previous frame onto frame i;
    `M_i = exp(-alpha ||I^H_i - W||_1)` (Eq. 16, L1 summed over RGB, as in Eq. 14) is near 1 where
    that warp is accurate and fades where it is not (P:178); `L_warp = mean( M_i * (I_hat_i - W)^2 )`
    (Eq. 15, `||.||_2` read as the squared error as in Eq. 6, averaged over pixels and channels;
    the paper gives no normalisation, so the plain mean rather than one divided by `sum M`).

    Args:
        output: `I_hat_i` `(N, 3, H, W)`.
        current: the real `I^H_i`.
        previous: the real `I^H_{i-1}`.
        flow: `OF^H_{b,i-1}`, the flow from `I^H_i` to `I^H_{i-1}` (`flow_fn(current, previous)`).
        alpha: the scaling factor of Eq. (14).
    """
    target = warp(previous, flow)
    mask = torch.exp(-alpha * warping_error(current, target))  # Eq. (16), OS-DiffVSR
    return (mask * (output.float() - target.float()).square().mean(dim=1, keepdim=True)).mean()  # Eq. (15)


def total_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Eq. (17): `L_total = sum_k omega_k L_k` over the active losses (the paper's omega: 1, 1, 2, 2).

    Args:
        losses: loss name -> value, for the names in `weights`.
        weights: loss name -> omega.
    """
    return sum(weights[name] * value for name, value in losses.items())  # Eq. (17), OS-DiffVSR


def trainable_names(module: torch.nn.Module, patterns: list[str]) -> set[str]:
    """Names of `module`'s parameters matched by fnmatch `patterns` (as `Stage.trains` matches them)."""
    return {name for name, _ in module.named_parameters() if any(fnmatch.fnmatchcase(name, p) for p in patterns)}


class OSDiffVSRModule(ZooModule):
    """OS-DiffVSR training: one-step SD-2.1 generator with LoRA, MFF, and a DINOv2-S critic.

    Args:
        variant: network size, `"full"` (SD-2.1-base, DINOv2-S) or `"tiny"` (CPU tests).
        lora_rank: LoRA rank on the VAE encoder and UNet (32, Sec. 4.1).
        base_model: SD-2.1-base folder or Hub id whose weights (and empty-prompt embedding) fill the
            generator; None keeps the random initialisation.
        osediff_lora: OSEDiff's checkpoint (`osediff.pkl`) to start from (the paper fine-tunes
            OSEDiff, P:282); read when fitting starts, kept as a frozen adapter of rank
            `osediff_rank` next to the rank-`lora_rank` adapters that train.
        osediff_rank: rank of that checkpoint's LoRA (4 in OSEDiff's release).
        flow_pretrained: load torchvision's RAFT weights.
        discriminator_pretrained: load the published DINOv2-S weights through timm.
        perceptual_pretrained: load the published LPIPS weights.
        lr: generator AdamW learning rate when no stage sets one (1e-5, Sec. 4.1).
        weight_decay: generator AdamW weight decay when no stage sets one (1e-8, Sec. 4.1).
        discriminator_lr: discriminator SGD learning rate after warm-up (5e-4, Sec. 4.1).
        discriminator_warmup: discriminator iterations of linear warm-up (500, Sec. 4.1).
        gamma: the focusing parameter of Eq. (6).
        tau: the temperature of Eq. (3).
        loss_weights: Eq. (17)'s omega when no stage sets them; the paper's (1, 1, 2, 2) when None.
    """

    hub_name = "osdiffvsr"
    loss_names = LOSS_NAMES

    def __init__(
        self,
        variant: str = "full",
        lora_rank: int = 32,
        base_model: str | None = None,
        osediff_lora: str | None = None,
        osediff_rank: int = 4,
        flow_pretrained: bool = True,
        discriminator_pretrained: bool = True,
        perceptual_pretrained: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 1e-8,
        discriminator_lr: float = 5e-4,
        discriminator_warmup: int = 500,
        # The paper gives no gamma (P:127). S of Eq. (7) measured on the built-in sample clips
        # (224 x 224, Real-ESRGAN x4, previous-frame anchor) has mean 0.11-0.22 over feature proxies
        # (the random-init DINOv2-S the tiny recipe starts from; HOG) and a floor of ~0.1 from motion
        # alone, so E[S^gamma], the focal MSE's size relative to an MSE, is 0.11-0.22 at gamma = 1 but
        # 0.02-0.06 at gamma = 2, where the pixel term all but vanishes next to L_G and 2 L_lpips.
        # gamma = 1 keeps it while still weighting the worst 5% of patches 2-11x the median.
        gamma: float = 1.0,
        # Sec. 4.1 (P:221-223) sets tau = 100, but read literally `cos / 100` keeps L_D within
        # log 2 +- 0.00995 over all cosines, linear in s- - s+ with slope 1/200 everywhere: it controls
        # no margin (P:111), and at lr 5e-4 a discriminator trained on it did not move in 60 steps
        # (margin s+ - s- unchanged to 4 decimals), whereas with 1/tau = 100 it grew from 0.008 to
        # 0.019 in 400 steps. So 100 is read as the logit scale 1/tau (CLIP's convention): tau = 0.01,
        # with which L_D falls to 0.01 once the real pair is 0.046 more similar than the fake one.
        tau: float = 0.01,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        check_variant(variant)
        self.save_hyperparameters()
        self.automatic_optimization = False
        config = getattr(OSDiffVSRConfig, variant)().replace(
            lora_rank=lora_rank, base_model=base_model, flow_pretrained=flow_pretrained,
            osediff_rank=None if osediff_lora is None else osediff_rank)
        self.net = OSDiffVSRNet(config)
        if base_model is not None:
            self.net.load_base(base_model)
        self.discriminator = DINOv2Discriminator(getattr(DiscriminatorConfig, variant)(),
                                                 pretrained=discriminator_pretrained)
        self.perceptual = PerceptualLoss("lpips", pretrained=perceptual_pretrained)
        self.stage: OSDiffVSRStage | None = None
        self.loss_weights = dict(PAPER_LOSS_WEIGHTS if loss_weights is None else loss_weights)
        unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss(es) {', '.join(unknown)}; choose from {', '.join(LOSS_NAMES)}")
        # The paper's trainable set (P:74-76); an OSDiffVSRStage may replace it.
        trainable = trainable_names(self, PAPER_TRAINABLE)
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name in trainable)

    @property
    def fuse(self) -> bool:
        """Whether the generator applies MFF (the paper: always; a stage may turn it off)."""
        return True if self.stage is None else self.stage.fuse

    def setup(self, stage: str) -> None:
        # OSEDiff's weights are read only to start fitting: a checkpoint being restored or exported
        # already holds them, so it needs no osediff.pkl.
        if stage == "fit" and self.hparams.osediff_lora is not None:
            load_osediff_lora(self.net, self.hparams.osediff_lora)

    def to_upscaler(self) -> VideoUpscaler:
        from zoo.osdiffvsr.pipeline import OSDiffVSRUpscaler

        return OSDiffVSRUpscaler.from_net(self.net)

    def forward(self, lr: Tensor, prompt_embeds: Tensor | None = None) -> Tensor:
        """The generated middle frame `(B, 3, s*h, s*w)` of LR windows `(B, 3, 3, h, w)` of any size.

        Args:
            lr: the LR windows.
            prompt_embeds: the middle frames' conditions `(1 or B, L, D)`; the stored one when None.
        """
        window, padding = pad_to_multiple(lr[:, :3].flatten(0, 1), self.net.size_multiple)
        window = window.unflatten(0, (lr.shape[0], 3))
        output = self.net(window[:, 0], window[:, 1], window[:, 2], fuse=self.fuse, prompt_embeds=prompt_embeds)
        return padding.crop(output, self.net.config.scale)

    # Losses -------------------------------------------------------------------------------

    def critic(self, images: Tensor) -> Tensor:
        """`F(images)` with the discriminator's parameters as constants: gradients reach only `images`.

        The generator's losses use it, so they train the generator and leave the discriminator's
        gradients to `L_D` (and, unlike toggling `requires_grad`, it changes no module state).
        """
        constants = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, constants, (images,))

    def generator_losses(self, output: Tensor, hr: Tensor, real_previous: Tensor) -> dict[str, Tensor]:
        """The Eq. (17) terms weighted in `loss_weights`, for `I_hat_i` (`output`) of clips `hr`.

        Args:
            output: `I_hat_i` `(B, 3, H, W)`.
            hr: the real frames `(I_{i-1}, I_i, I_{i+1})`, `(B, 3, 3, H, W)`.
            real_previous: `F(I_{i-1})` `(B, D, P, Q)`, without gradient.
        """
        weights = self.loss_weights
        previous, current = hr[:, 0], hr[:, 1]
        losses = {}
        if "adversarial" in weights or "fmse" in weights:
            fake_current = self.critic(output)  # Eq. (4), OS-DiffVSR
            if "adversarial" in weights:
                losses["adversarial"] = afat_generator_loss(real_previous, fake_current)
            if "fmse" in weights:
                losses["fmse"] = focal_mse_loss(output, current, real_previous, fake_current, self.hparams.gamma,
                                                self.discriminator.config.patch_size)
        if "lpips" in weights:
            losses["lpips"] = self.perceptual(output, current)
        if "warp" in weights:
            losses["warp"] = self.warp_loss(output, current, previous)
        return losses

    def warp_loss(self, output: Tensor, current: Tensor, previous: Tensor) -> Tensor:
        """Eqs. (15)-(16) with RAFT's flow `OF^H_{b,i-1}` from the real `I^H_i` to the real `I^H_{i-1}`.

        Args:
            output: `I_hat_i`.
            current: the real `I^H_i`.
            previous: the real `I^H_{i-1}`.
        """
        flow = self.net.flow(current, previous)
        return warp_loss(output, current, previous, flow, self.net.config.fusion_alpha)

    # Training -----------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        lr = self.hparams.lr if self.stage is None else self.stage.lr
        kwargs = {"weight_decay": self.hparams.weight_decay}
        if self.stage is not None:
            kwargs.update(self.stage.optimizer_kwargs)
        generator = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=lr, **kwargs)
        # Sec. 4.1 names SGD without momentum settings: plain SGD (momentum 0).
        discriminator = torch.optim.SGD([p for p in self.discriminator.parameters() if p.requires_grad],
                                        lr=self.hparams.discriminator_lr)
        warmup = max(1, self.hparams.discriminator_warmup)
        # Linear warm-up over discriminator iterations: the global step counts both optimizers'
        # steps, 2 per batch, so a rebuilt scheduler does not restart it.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            discriminator, lambda _: min(1.0, (self.global_step // 2 + 1) / warmup))
        return [generator, discriminator], [schedule]

    def _check_batch(self, lr: Tensor, hr: Tensor) -> None:
        scale = self.net.config.scale
        if lr.ndim != 5 or lr.shape[1] < 3 or hr.shape[:3] != lr.shape[:3] or tuple(hr.shape[-2:]) != tuple(
                scale * s for s in lr.shape[-2:]):
            raise ValueError(f"batches must pair LR clips (B, T >= 3, 3, h, w) with x{scale} HR clips, got "
                             f"{tuple(lr.shape)} and {tuple(hr.shape)}")

    def step_losses(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """The generator's Eq. (17) terms and the discriminator's `L_D` (Eq. 3) for one batch.

        Args:
            batch: "lr" `(B, T, 3, h, w)` and "hr" `(B, T, 3, H, W)` clips whose first three frames
                are `(I_{i-1}, I_i, I_{i+1})`, and optionally "prompt_embeds" `(B, T, L, D)`.
        """
        lr, hr = batch["lr"], batch["hr"]
        self._check_batch(lr, hr)
        prompt_embeds = batch.get("prompt_embeds")
        c = None if prompt_embeds is None else prompt_embeds[:, 1]  # c_i, frame i's own text (P:90)
        output = self.net(lr[:, 0], lr[:, 1], lr[:, 2], fuse=self.fuse, prompt_embeds=c)
        real_previous, real_current = self.discriminator(torch.cat([hr[:, 0], hr[:, 1]])).chunk(2)  # Eq. (4)
        losses = self.generator_losses(output, hr, real_previous.detach())
        d_loss = afat_discriminator_loss(real_current, real_previous, self.discriminator(output.detach()),
                                         self.hparams.tau)
        return losses, d_loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        g_opt, d_opt = self.optimizers()
        schedule = self.lr_schedulers()
        losses, d_loss = self.step_losses(batch)
        total = total_loss(losses, self.loss_weights)
        g_opt.zero_grad()
        d_opt.zero_grad()
        self.manual_backward(total + d_loss)  # see the module docstring: one pass, two separate gradients
        g_opt.step()
        d_opt.step()
        schedule.step()

        self.log_dict({f"train/{name}": value.detach() for name, value in losses.items()}, on_step=True)
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True)
        self.log("train/d_loss", d_loss.detach(), on_step=True)
        return total.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        lr, hr = batch["lr"], batch["hr"]
        prompt_embeds = batch.get("prompt_embeds")
        output = self(lr, None if prompt_embeds is None else prompt_embeds[:, 1])
        mse = F.mse_loss(output, hr[:, 1]).clamp_min(1e-10)
        self.log("val/psnr", -10 * torch.log10(mse), batch_size=lr.shape[0], sync_dist=True)
