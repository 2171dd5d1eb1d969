"""`PSSRModule`: the base's latent and pixel phases, then the draft (Secs. 3.3-3.4).

One AdamW step per batch over every trainable group of the active `PSSRStage`
(`zoo.pssr.callbacks.PSSRStages`): the generator (the base's LoRA, or the draft), and in the latent
phase also the VSD fake score's LoRA and the latent discriminator, each in its own parameter group with
its own learning rate. Their losses are built so that each reaches only its own parameters (the
generator's adversarial term sees the discriminator through detached weights; the fake score and the
discriminator see the generator's output detached), so one backward pass serves all three, as three
alternating steps would, and every trainable parameter gets a gradient in every step under DDP.

Symbols: `z_L`, `z_H` the latents of the bicubic-upsampled LR clip and of the HR clip;
`z_hat = z_L - phi_base(z_L; T)` the base's prediction of z_H (Eq. 5 with sigma_T = 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import Tensor
from torch.func import functional_call

from zoo.components.lora import inject_lora, lora_config
from zoo.components.tiling import pad_to_multiple
from zoo.components.train.losses import PerceptualLoss, nonsaturating_d_loss, nonsaturating_g_loss, vsd_loss
from zoo.components.train.module import ZooModule
from zoo.components.upscaler import VideoUpscaler, check_variant
from zoo.pssr.callbacks import PSSRStage
from zoo.pssr.network import (
    NUM_STEPS,
    DiscriminatorConfig,
    LatentDiscriminator,
    PSSRConfig,
    PSSRNet,
    flow_interpolate,
    flow_noise,
    velocity_l2,
)

LOSS_NAMES = ("l2", "vsd", "adversarial", "pixel_l2", "lpips")


def frozen_view(model: WanTransformer3DModel) -> WanTransformer3DModel:
    """A `WanTransformer3DModel` whose weights are `model`'s frozen ones (LoRA layers unwrapped), not copies.

    VSD's regulariser phi_reg and the base of its fake score phi'_reg are both the pretrained DiT
    (L108), as is the base under its LoRA: sharing the tensors keeps one copy of 1.4B frozen weights
    instead of three. Separate modules (rather than toggling peft adapters on one model, which also
    rewrites `requires_grad`) keep each model's trainable set fixed.
    """
    with torch.device("meta"):
        view = WanTransformer3DModel.from_config(model.config)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name:
            continue
        owner, _, attr = name.replace(".base_layer", "").rpartition(".")
        module = view.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor
    return view


def vsd_weight(z_hat: Tensor, x0_real: Tensor, sigma: Tensor) -> Tensor:
    """omega(t) of Eq. (8): `sigma / mean_{C,F,H,W} |z_hat - x0_real|` per sample, `(B, 1, 1, 1, 1)`.

    The paper leaves omega open (L112). This is DMD's / OSEDiff's normalisation written for
    velocities: with `x0 = z_t - sigma * phi`, `omega (phi_reg - phi'_reg) = (x0_fake - x0_real) /
    mean |z_hat - x0_real|`, a gradient whose size does not depend on t or on the latents' scale.

    Args:
        z_hat: the generator's latents (detached).
        x0_real: the regulariser's clean prediction `z_t - sigma phi_reg(z_t; t)`.
        sigma: the VSD noise levels, `(B, 1, 1, 1, 1)`.
    """
    return sigma / (z_hat - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)


def weighted_total(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Eqs. (10), (11), (12): `sum_i lambda_i L_i` over the computed losses."""
    return sum(weights[name] * value for name, value in losses.items())


class PSSRModule(ZooModule):
    """PS-SR training: the Wan2.1 base with LoRA, the pruned draft, VSD and a latent discriminator.

    Args:
        variant: network size, `"full"` (Wan2.1-T2V-1.3B) or `"tiny"` (CPU tests).
        lora_rank: LoRA rank of the base and of the VSD fake score (32, L164).
        base_model: Wan2.1-T2V-1.3B folder or Hub id (diffusers layout) whose weights (and empty-prompt
            embedding) fill the base, the VSD models and the VAE; None keeps the random initialisation.
        perceptual_pretrained: load the published LPIPS (VGG) weights.
        lr: learning rate of the generator when no stage sets one (5e-5, L164).
        weight_decay: AdamW weight decay when no stage sets one.
        fake_lr: learning rate of the VSD fake score's LoRA.
        discriminator_lr: learning rate of the latent discriminator.
        vsd_sigma_range: (T_min, T_max) of Eq. (8)'s `t ~ U(T_min, T_max)`, as noise levels sigma.
        pixel_crop: side in HR pixels of the decoded crops of the pixel losses (160, L164).
        gradient_checkpointing: recompute DiT blocks in the backward pass (for full-size clips).
        val_num_steps: T of the speculative sampler in validation (after the draft is initialised).
        loss_weights: loss weights used when no stage sets them.
    """

    hub_name = "pssr"
    loss_names = LOSS_NAMES

    def __init__(
        self,
        variant: str = "full",
        lora_rank: int = 32,
        base_model: str | None = None,
        perceptual_pretrained: bool = True,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        fake_lr: float = 5e-5,
        discriminator_lr: float = 5e-5,
        vsd_sigma_range: tuple[float, float] = (0.02, 0.98),
        pixel_crop: int = 160,
        gradient_checkpointing: bool = False,
        val_num_steps: int = NUM_STEPS,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        check_variant(variant)
        low, high = vsd_sigma_range
        if not 0 < low <= high < 1:
            raise ValueError(f"vsd_sigma_range must satisfy 0 < T_min <= T_max < 1, got {vsd_sigma_range}")
        if pixel_crop < 8 or pixel_crop % 8:
            raise ValueError(f"pixel_crop must be a positive multiple of 8 (one latent pixel), got {pixel_crop}")
        self.save_hyperparameters()
        config = getattr(PSSRConfig, variant)().replace(lora_rank=lora_rank, base_model=base_model)
        self.net = PSSRNet(config)
        if base_model is not None:
            self.net.load_base(base_model)
        self.vsd_real = frozen_view(self.net.base)
        self.vsd_fake = frozen_view(self.net.base)
        inject_lora(self.vsd_fake, lora_config("wan_transformer", lora_rank))
        self.discriminator = LatentDiscriminator(getattr(DiscriminatorConfig, variant)(),
                                                 in_channels=self.net.vae.config.z_dim)
        self.perceptual = PerceptualLoss("lpips", net="vgg", pretrained=perceptual_pretrained)
        if gradient_checkpointing:
            for model in (self.net.base, self.vsd_fake, self.vsd_real):
                model.enable_gradient_checkpointing()
            self.net.draft.enable_gradient_checkpointing()
        # Persistent, so that resuming inside the draft phase does not initialise the draft again.
        self.register_buffer("draft_initialised", torch.tensor(False))
        self.stage: PSSRStage | None = None
        self.loss_weights = dict(loss_weights or {"l2": 1.0, "vsd": 1.0, "adversarial": 0.1})
        unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss(es) {', '.join(unknown)}; choose from {', '.join(LOSS_NAMES)}")

    @property
    def generator(self) -> str:
        """Which model generates now: the stage's, else the base."""
        return "base" if self.stage is None else self.stage.generator

    def to_upscaler(self) -> VideoUpscaler:
        from zoo.pssr.pipeline import PSSRUpscaler

        return PSSRUpscaler.from_net(self.net)

    def initialise_draft(self) -> None:
        """phi_draft <- the fine-tuned base with its LoRA merged, pruned to the kept blocks (L136, L164)."""
        self.net.draft.init_from(self.net.base)
        self.draft_initialised.fill_(True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The stage callback has switched stages already (Lightning runs callbacks' hooks first).
        if self.generator == "draft" and not self.draft_initialised:
            self.initialise_draft()

    # Losses -------------------------------------------------------------------------------

    def pixel_losses(self, z_hat: Tensor, hr: Tensor) -> dict[str, Tensor]:
        """Eq. (11)'s terms on one random crop: `pixel_l2` = MSE and `lpips` = LPIPS of `E^{-1}(z_hat^crop)`.

        The crop is `pixel_crop / 8` latent pixels square (all latent frames), decoded with gradients
        through the frozen decoder, against the HR pixels it covers (latent pixel `(i, j)` covers HR
        `[8i, 8i + 8) x [8j, 8j + 8)`): the patch-wise training of L126. LPIPS is the VGG variant, the
        usual training loss (the paper cites LPIPS [55] only), averaged over frames.

        Args:
            z_hat: predicted HR latents `(B, C, F, h, w)`.
            hr: the HR clip `(B, T, 3, 8h, 8w)` in [0, 1].
        """
        size = self.hparams.pixel_crop // 8
        height, width = z_hat.shape[-2:]
        crop_h, crop_w = min(size, height), min(size, width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        decoded = self.net.decode(z_hat[..., top:top + crop_h, left:left + crop_w])
        target = hr[..., 8 * top:8 * (top + crop_h), 8 * left:8 * (left + crop_w)].float()
        losses = {}
        if "pixel_l2" in self.loss_weights:
            losses["pixel_l2"] = F.mse_loss(decoded, target)  # Eq. (11), PS-SR: L2 term
        if "lpips" in self.loss_weights:
            losses["lpips"] = self.perceptual(decoded.flatten(0, 1), target.flatten(0, 1))  # Eq. (11): LPIPS term
        return losses

    def vsd_losses(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. (8) for the generator, and the fake score's own flow-matching loss.

        `z_t = (1 - sigma) z_hat + sigma eps` (Eq. 2; see `flow_noise` on L112's reversed form) with
        `sigma ~ U(T_min, T_max)` per sample and timestep `1000 sigma`; `phi_reg` (frozen) and
        `phi'_reg` (LoRA) predict without gradients and `vsd_loss` gives the generator the gradient
        `omega (phi_reg - phi'_reg) / B`. The fake score learns the generator's output distribution:
        `|| phi'_reg(z_t'; t') - (eps' - sg(z_hat)) ||^2` at fresh noise and levels from the same
        range, where it is queried. No text prompt (the empty one), no guidance: the paper conditions
        on none.

        Returns:
            `(L_vsd, L_fake)`.
        """
        low, high = self.hparams.vsd_sigma_range
        target = z_hat.detach()
        shape = (z_hat.shape[0], 1, 1, 1, 1)
        sigma = torch.empty(shape, device=z_hat.device).uniform_(low, high)
        with torch.no_grad():
            z_t = flow_noise(target, torch.randn_like(target), sigma)
            timestep = 1000 * sigma.flatten()
            real = self.net.dit_velocity(self.vsd_real, z_t, timestep).float()
            fake = self.net.dit_velocity(self.vsd_fake, z_t, timestep).float()
            omega = vsd_weight(target, z_t - sigma * real, sigma)
        generator = vsd_loss(z_hat, real, fake, omega)  # Eq. (8), PS-SR
        sigma = torch.empty(shape, device=z_hat.device).uniform_(low, high)
        noise = torch.randn_like(target)
        velocity = self.net.dit_velocity(self.vsd_fake, flow_noise(target, noise, sigma), 1000 * sigma.flatten())
        return generator, F.mse_loss(velocity.float(), noise - target)

    def adversarial_losses(self, z_hat: Tensor, z_H: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. (9): the generator's term and the discriminator's, on per-frame latent patch logits.

        Eq. (9) is the minimax objective `E log D(z_H) + E log(1 - D(z_hat))` (L116); it is optimised in
        its standard form: the discriminator minimises `softplus(-D(z_H)) + softplus(D(z_hat))` (the
        negated objective on logits) and the generator "fools" it (L118) with the non-saturating
        `softplus(-D(z_hat))`. The generator's term runs D on detached weights, so only the generator
        receives its gradient.

        Returns:
            `(L_adv for the generator, L_D)`.
        """
        discriminator = self.discriminator
        frozen = {name: value.detach() for name, value in discriminator.named_parameters()}
        generator = nonsaturating_g_loss(functional_call(discriminator, frozen, (z_hat,)))  # Eq. (9), generator
        real, fake = discriminator(z_H).float(), discriminator(z_hat.detach()).float()
        return generator, nonsaturating_d_loss(real, fake)  # Eq. (9), PS-SR: discriminator

    def base_losses(self, z_L: Tensor, z_H: Tensor, hr: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The base's active losses (Eqs. 7-11) at `(z_L; T)`, and the auxiliary models' losses."""
        weights = self.loss_weights
        velocity, _ = self.net.base_velocity(z_L)
        z_hat = z_L - velocity.float()  # Eq. (5) with sigma_T = 1: the base's clean prediction
        losses, auxiliary = {}, {}
        if "l2" in weights:
            losses["l2"] = velocity_l2(velocity, z_L, z_H)  # Eq. (7), PS-SR
        if "vsd" in weights:
            losses["vsd"], auxiliary["vsd_fake"] = self.vsd_losses(z_hat)
        if "adversarial" in weights:
            losses["adversarial"], auxiliary["discriminator"] = self.adversarial_losses(z_hat, z_H)
        if "pixel_l2" in weights or "lpips" in weights:
            losses.update(self.pixel_losses(z_hat, hr))
        return losses, auxiliary

    def draft_losses(self, z_L: Tensor, z_H: Tensor, hr: Tensor) -> dict[str, Tensor]:
        """Eq. (12)'s terms for the draft at the interpolant `z_t = sigma z_L + (1 - sigma) z_H` (L138).

        `sigma ~ U(0, 1)` per sample ("random t", L138), timestep `1000 sigma`; the draft is guided by
        the frozen base's features from its single pass at `(z_L; T)`, as at inference. L2 is Eq. (7)
        on the draft's velocity; the pixel terms are Eq. (11) on its clean prediction `z_t - sigma phi`.
        """
        with torch.no_grad():
            _, base_hidden = self.net.base_velocity(z_L, capture=True)
        sigma = torch.rand((z_L.shape[0], 1, 1, 1, 1), device=z_L.device)
        z_t = flow_interpolate(z_H, z_L, sigma)  # Eq. (4) / L138, PS-SR
        velocity = self.net.draft_velocity(z_t, 1000 * sigma.flatten(), base_hidden)
        losses = {}
        if "l2" in self.loss_weights:
            losses["l2"] = velocity_l2(velocity, z_L, z_H)  # Eq. (12): its Eq. (7) term
        if "pixel_l2" in self.loss_weights or "lpips" in self.loss_weights:
            losses.update(self.pixel_losses(z_t - sigma * velocity.float(), hr))  # Eq. (12): its Eq. (11) terms
        return losses

    # Training -----------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        lr = self.hparams.lr if self.stage is None else self.stage.lr
        kwargs = {"weight_decay": self.hparams.weight_decay}
        if self.stage is not None:
            kwargs.update(self.stage.optimizer_kwargs)
        fusion = {id(p) for p in self.net.draft.fusion.parameters()}
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in fusion]},
            # Decoupled weight decay would pull the fusion layers away from [I | 0], the pruned model.
            {"params": [p for p in trainable if id(p) in fusion], "weight_decay": 0.0},
            {"params": [p for p in self.vsd_fake.parameters() if p.requires_grad], "lr": self.hparams.fake_lr},
            {"params": [p for p in self.discriminator.parameters() if p.requires_grad],
             "lr": self.hparams.discriminator_lr},
        ]
        return torch.optim.AdamW([group for group in groups if group["params"]], lr=lr, **kwargs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        lr, hr = batch["lr"], batch["hr"]
        if lr.shape[1] != hr.shape[1] or tuple(hr.shape[-2:]) != tuple(s * 4 for s in lr.shape[-2:]):
            raise ValueError(f"batches must pair LR (B, T, 3, h, w) with x4 HR clips, got {tuple(lr.shape)} and "
                             f"{tuple(hr.shape)}")
        with torch.no_grad():
            z_L, z_H = self.net.encode(lr), self.net.encode_frames(hr)
        if self.generator == "draft":
            losses, auxiliary = self.draft_losses(z_L, z_H, hr), {}
        else:
            losses, auxiliary = self.base_losses(z_L, z_H, hr)
        total = weighted_total(losses, self.loss_weights)  # Eq. (10), (11) or (12), PS-SR
        self.log_dict({f"train/{name}": value.detach() for name, value in {**losses, **auxiliary}.items()},
                      on_step=True)
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True)
        return total + sum(auxiliary.values())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """PSNR of the base alone (T = 1) and, once the draft exists, of the speculative sampler."""
        lr, hr = batch["lr"], batch["hr"]
        frames = lr.shape[1]
        usable = (frames - 1) // 4 * 4 + 1  # the longest 4n+1 prefix of the clip
        padded, padding = pad_to_multiple(lr[:, :usable].flatten(0, 1), self.net.size_multiple)
        padded = padded.unflatten(0, (lr.shape[0], usable))
        target = hr[:, :usable].float()
        steps = {"psnr_base": 1, **({"psnr": self.hparams.val_num_steps} if self.draft_initialised else {})}
        for name, num_steps in steps.items():
            output = padding.crop(self.net(padded, num_steps=num_steps), self.net.config.scale)
            mse = F.mse_loss(output, target).clamp_min(1e-10)
            self.log(f"val/{name}", -10 * torch.log10(mse), batch_size=lr.shape[0], sync_dist=True)
