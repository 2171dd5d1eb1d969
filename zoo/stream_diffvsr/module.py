"""Stream-DiffVSR training: rollout distillation, TPM decoder training, ARTG ControlNet training.

The three stages come from `zoo.stream_diffvsr.callbacks.StreamDiffVSRStages` (a `StageSchedule`):
the active stage's name selects the loss computed in `training_step`, its `loss_weights` weight the
terms, and its `trainable` patterns decide which parameters learn.

1. "distill": the student UNet rolls out its own 4-step DDIM trajectory from noise. At each student
   step (timestep t_i, latent z_i) its clean-latent estimate x̂₀(z_i) is supervised by
   - "teacher": the frozen teacher (the original x4-upscaler UNet) run with `teacher_steps` DDIM steps
     from z_i at t_i down to 0 (the teacher's timesteps at or below t_i), and
   - "gt": the HR target latent E(y) of the tiny encoder.
   The next student latent is the DDIM step from z_i, detached (no backpropagation through the
   rollout). `teacher_steps` is 50 in the paper's recipe; the tiny recipe uses a few.
2. "tpm": the decoder's TPM parameters (`alpha`, `temporal_processor`) learn to decode the HR target
   latent of frame t with the TPM features of the previous *ground-truth* HR frame warped onto t;
   the encoder is fixed. Terms: "rec" (L1), "lpips", "temporal" (warped temporal residual).
3. "artg": the ControlNet learns with UNet and decoder frozen. Clips run auto-regressively: frame 0
   without ARTG, each next frame guided by the previous *output* warped onto it. Term "latent": MSE
   between every step's x̂₀ and the HR target latent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.components.flow import FlowEstimator, resize_flow, warp
from zoo.components.train.losses import PerceptualLoss
from zoo.components.train.module import ZooModule
from zoo.stream_diffvsr.network import StreamDiffVSRConfig, StreamDiffVSRNet, ddim_step, ddim_timesteps, predict_x0_eps
from zoo.stream_diffvsr.pipeline import StreamDiffVSRUpscaler, empty_prompt_embeds


def warped_temporal_loss(output: Tensor, prev_output: Tensor, target: Tensor, prev_target: Tensor,
                         flow: Tensor) -> Tensor:
    """Temporal consistency: mean |(ŷ_t - W(ŷ_{t-1})) - (y_t - W(y_{t-1}))| (L1 over all entries).

    The frame-to-frame change of the output, after motion compensation W (backward warp with the
    flow from frame t to frame t-1), must match that of the ground truth (Stream-DiffVSR, TPM
    training: temporal consistency term).

    Args:
        output: ŷ_t `(N, C, H, W)`.
        prev_output: ŷ_{t-1}.
        target: y_t.
        prev_target: y_{t-1}.
        flow: `(N, 2, H, W)` from frame t to frame t-1.
    """
    # Temporal consistency term of the TPM training (Stream-DiffVSR, temporal-aware decoder).
    return ((output - warp(prev_output, flow)) - (target - warp(prev_target, flow))).abs().mean()


class StreamDiffVSRModule(ZooModule):
    """LightningModule of Stream-DiffVSR's three training stages.

    Args:
        variant: network size, `"tiny"` or `"full"` (the paper's).
        teacher_steps: DDIM steps of the frozen teacher UNet (50 in the paper).
        base_model: folder or Hub id of the SD x4 upscaler (`unet/`, `text_encoder/`, `tokenizer/`):
            initialises student and teacher UNets and the empty-prompt embedding; None keeps the
            random initialisation (tiny recipe, tests).
        init_from: an official-layout Stream-DiffVSR folder to start every network from (e.g. to
            fine-tune the published checkpoint); applied after `base_model`.
        flow_pretrained: RAFT with torchvision's weights; None takes the variant's default.
        lpips_pretrained: LPIPS with its published weights (False for offline tests).
        lpips_net: LPIPS backbone.
    """

    hub_name = "stream_diffvsr"

    def __init__(
        self,
        variant: str = "tiny",
        teacher_steps: int = 50,
        base_model: str | None = None,
        init_from: str | None = None,
        flow_pretrained: bool | None = None,
        lpips_pretrained: bool = True,
        lpips_net: str = "vgg",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if variant not in ("tiny", "full"):
            raise ValueError(f"variant must be 'tiny' or 'full', got {variant!r}")
        config = getattr(StreamDiffVSRConfig, variant)()
        if flow_pretrained is not None:
            config = dataclasses.replace(config, flow_pretrained=flow_pretrained)
        if init_from is not None:
            loaded = StreamDiffVSRUpscaler.from_pretrained(_local(init_from))
            config = dataclasses.replace(loaded.config, flow_variant=config.flow_variant,
                                         flow_pretrained=config.flow_pretrained, flow_updates=config.flow_updates)
        self.config = config
        self.net = StreamDiffVSRNet(config)
        self.flow = FlowEstimator(config.flow_variant, pretrained=config.flow_pretrained,
                                  num_flow_updates=config.flow_updates)
        # The teacher is the x4 upscaler's UNet, with its noise-level class embedding.
        from diffusers import UNet2DConditionModel

        teacher_config = {**config.unet, "num_class_embeds": 1000}
        self.teacher = UNet2DConditionModel(**teacher_config)
        if base_model is not None:
            self._load_base_model(_local(base_model))
        else:
            student = {k: v for k, v in self.teacher.state_dict().items() if not k.startswith("class_embedding.")}
            self.net.unet.load_state_dict(student, strict=True)
        if init_from is not None:
            self.net.load_state_dict(loaded.net.state_dict(), strict=True)
        self.teacher.requires_grad_(False).eval()
        self.teacher_steps = teacher_steps
        self.perceptual = PerceptualLoss("lpips", net=lpips_net, pretrained=lpips_pretrained)
        self.stage = None
        self.loss_weights: dict[str, float] = {}

    def _load_base_model(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
        self.teacher.load_state_dict(state, strict=True)
        student = {k: v for k, v in state.items() if not k.startswith("class_embedding.")}
        self.net.unet.load_state_dict(student, strict=True)
        self.net.prompt_embeds.copy_(empty_prompt_embeds(folder / "text_encoder", folder / "tokenizer"))

    def train(self, mode: bool = True) -> StreamDiffVSRModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def to_upscaler(self) -> StreamDiffVSRUpscaler:
        """The streaming upscaler carrying this module's current network and flow weights."""
        upscaler = StreamDiffVSRUpscaler(self.config)
        upscaler.net.load_state_dict(self.net.state_dict(), strict=True)
        upscaler.flow.load_state_dict(self.flow.state_dict(), strict=True)
        return upscaler.eval()

    # Shared pieces -----------------------------------------------------------------------

    def warp_onto(self, image: Tensor, lr: Tensor, prev_lr: Tensor) -> Tensor:
        """Warp `image` (HR, at frame t-1) onto frame t with RAFT flow on LR, as at inference."""
        flow = resize_flow(self.flow(lr, prev_lr), image.shape[-2:])
        return warp(image, flow.to(image.dtype), padding_mode="zeros")

    def hr_flow(self, lr: Tensor, prev_lr: Tensor, size: tuple[int, int]) -> Tensor:
        return resize_flow(self.flow(lr, prev_lr), size)

    def teacher_x0(self, latents: Tensor, lr: Tensor, t: int) -> Tensor:
        """The teacher's clean latent: `teacher_steps`-step DDIM from `latents` at `t` down to 0."""
        scheduler = self.config.scheduler
        # The teacher starts where the student is (t), then continues on its own finer grid.
        grid = [t, *(s for s in ddim_timesteps(scheduler, self.teacher_steps) if s < t)]
        prompt = self.net.prompt_embeds.expand(latents.shape[0], -1, -1).to(latents.dtype)
        labels = torch.full((latents.shape[0],), self.config.noise_level, dtype=torch.long, device=latents.device)
        z = latents
        for i, s in enumerate(grid):
            prev = grid[i + 1] if i + 1 < len(grid) else -1
            timestep = torch.full((latents.shape[0],), s, dtype=torch.long, device=latents.device)
            out = self.teacher(torch.cat([z, lr], 1), timestep, encoder_hidden_states=prompt, class_labels=labels,
                               return_dict=False)[0]
            z, x0 = ddim_step(z, out, self.net.alpha_bar(s), self.net.alpha_bar(prev), scheduler.prediction_type,
                              scheduler.clip_sample_range if scheduler.clip_sample else None)
        return x0

    # Stage losses ------------------------------------------------------------------------

    def distillation_losses(self, lr: Tensor, hr: Tensor,
                            generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Rollout distillation terms on frames `lr (N, 3, h, w)`, `hr (N, 3, 4h, 4w)` in `[0, 1]`."""
        net = self.net
        lr_n = lr * 2 - 1
        with torch.no_grad():
            target = net.vae.encode(hr * 2 - 1)
        latents = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        teacher_terms, gt_terms = [], []
        for t in net.timesteps:
            output = net.denoise(latents, lr_n, t, None)
            x0, _ = predict_x0_eps(latents, output, net.alpha_bar(t), self.config.scheduler.prediction_type)
            with torch.no_grad():
                teacher = self.teacher_x0(latents, lr_n, t)
            # Rollout distillation (Stream-DiffVSR, "U-Net Rollout Distillation"): latent L2 terms.
            teacher_terms.append(F.mse_loss(x0, teacher))
            gt_terms.append(F.mse_loss(x0, target))
            latents, _ = net.step(latents, output.detach(), t)
        return {"teacher": torch.stack(teacher_terms).mean(), "gt": torch.stack(gt_terms).mean()}

    def tpm_losses(self, lr: Tensor, hr: Tensor) -> dict[str, Tensor]:
        """TPM terms on clips `lr (B, T, 3, h, w)`, `hr (B, T, 3, 4h, 4w)` in `[0, 1]`."""
        vae = self.net.vae
        hr_n = hr * 2 - 1
        with torch.no_grad():
            latents = vae.encode(hr_n.flatten(0, 1)).unflatten(0, hr.shape[:2])
        rec, lpips, temporal = [], [], []
        prev_output = vae.decode(latents[:, 0])
        for t in range(1, hr.shape[1]):
            flow = self.hr_flow(lr[:, t], lr[:, t - 1], hr.shape[-2:])
            warped_gt = warp(hr_n[:, t - 1], flow, padding_mode="zeros")
            output = vae.decode(latents[:, t], vae.temporal_features(warped_gt))
            rec.append(F.l1_loss(output, hr_n[:, t]))
            lpips.append(self.perceptual((output / 2 + 0.5).clamp(0, 1), hr[:, t]))
            temporal.append(warped_temporal_loss(output, prev_output, hr_n[:, t], hr_n[:, t - 1], flow))
            prev_output = output
        return {"rec": torch.stack(rec).mean(), "lpips": torch.stack(lpips).mean(),
                "temporal": torch.stack(temporal).mean()}

    def artg_losses(self, lr: Tensor, hr: Tensor) -> dict[str, Tensor]:
        """ARTG term on clips run auto-regressively: each frame is guided by the previous output."""
        net = self.net
        lr_n, hr_n = lr * 2 - 1, hr * 2 - 1
        with torch.no_grad():
            targets = net.vae.encode(hr_n.flatten(0, 1)).unflatten(0, hr.shape[:2])
            shape = targets[:, 0].shape
            prev = net.upscale_frame(lr_n[:, 0], torch.randn(shape, device=hr.device, dtype=hr.dtype), None)
        terms = []
        for t in range(1, hr.shape[1]):
            with torch.no_grad():
                warped_prev = self.warp_onto(prev, lr[:, t], lr[:, t - 1])
            latents = torch.randn(shape, device=hr.device, dtype=hr.dtype)
            for step in net.timesteps:
                output = net.denoise(latents, lr_n[:, t], step, warped_prev)
                x0, _ = predict_x0_eps(latents, output, net.alpha_bar(step), self.config.scheduler.prediction_type)
                terms.append(F.mse_loss(x0, targets[:, t]))
                latents, _ = net.step(latents, output.detach(), step)
            with torch.no_grad():
                prev = net.vae.decode(latents, net.vae.temporal_features(warped_prev))
        return {"latent": torch.stack(terms).mean()}

    # Lightning ---------------------------------------------------------------------------

    def stage_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The active stage's loss terms for a batch with "lr" `(B, T, 3, h, w)` and "hr"."""
        lr, hr = batch["lr"], batch["hr"]
        if self.stage is None:
            raise RuntimeError("StreamDiffVSRModule trains under a StageSchedule (StreamDiffVSRStages)")
        if self.stage.name == "distill":
            return self.distillation_losses(lr.flatten(0, 1), hr.flatten(0, 1))
        if self.stage.name == "tpm":
            return self.tpm_losses(lr, hr)
        if self.stage.name == "artg":
            return self.artg_losses(lr, hr)
        raise ValueError(f"unknown stage {self.stage.name!r}; Stream-DiffVSR stages are distill, tpm, artg")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms = self.stage_losses(batch)
        loss = sum(self.loss_weights.get(name, 0.0) * value for name, value in terms.items())
        for name, value in terms.items():
            self.log(f"train/{self.stage.name}/{name}", value.detach())
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.stage.lr, **self.stage.optimizer_kwargs)


def _local(weights: str) -> Path:
    from zoo.hub import resolve_weights

    return resolve_weights(weights)
