"""Stream-DiffVSR training: rollout distillation, TPM decoder training, ARTG ControlNet training.

The three stages come from `zoo.stream_diffvsr.callbacks.StreamDiffVSRStages` (a `StageSchedule`):
the active stage's name selects the loss computed in `training_step`, its `loss_weights` weight the
terms, and its `trainable` patterns decide which parameters learn.

1. "distill": the student UNet rolls out its own 4-step DDIM trajectory from noise. At each student
   step (timestep t_i, latent z_i) its clean-latent estimate x̂₀(z_i) is supervised by
   - "teacher": the frozen teacher (the original x4-upscaler UNet) run with DDIM steps of the
     `teacher_steps`-step spacing (1000 / teacher_steps timesteps apart) from z_i at t_i down past 0, and
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

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import Tensor

from zoo.components.flow import warp
from zoo.components.prompts import encode_prompt
from zoo.components.train.losses import PerceptualLoss
from zoo.components.train.module import ZooModule
from zoo.components.upscaler import check_variant
from zoo.stream_diffvsr.network import StreamDiffVSRConfig, StreamDiffVSRNet, stream_warp
from zoo.stream_diffvsr.pipeline import StreamDiffVSRUpscaler, flow_estimator, flow_to_previous

# The losses each stage computes; a stage's `loss_weights` may name only these.
STAGE_LOSSES = {"distill": ("teacher", "gt"), "tpm": ("rec", "lpips", "temporal"), "artg": ("latent",)}


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
        base_model: folder or Hub id of the SD x4 upscaler (`unet/`, `text_encoder/`, `tokenizer/`),
            read by diffusers and transformers: initialises student and teacher UNets and the
            empty-prompt embedding; None keeps the random initialisation (tiny recipe, tests).
        init_from: a local official-layout Stream-DiffVSR folder to start every network from (e.g. to
            fine-tune the published checkpoint: `zoo hub download stream_diffvsr --local-dir DIR`);
            applied after `base_model`.
        flow_pretrained: RAFT with torchvision's weights; None takes the variant's default.
        lpips_pretrained: LPIPS with its published weights (False for offline tests).
        lpips_net: LPIPS backbone.
    """

    hub_name = "stream_diffvsr"
    loss_names = tuple(name for names in STAGE_LOSSES.values() for name in names)

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
        config = getattr(StreamDiffVSRConfig, check_variant(variant))()
        if flow_pretrained is not None:
            config = dataclasses.replace(config, flow_pretrained=flow_pretrained)
        if init_from is not None:
            if not Path(init_from).is_dir():
                raise ValueError(f"init_from must be a local folder, got {init_from!r}; fetch the published weights "
                                 f"with `zoo hub download stream_diffvsr --local-dir DIR`")
            loaded = StreamDiffVSRUpscaler.from_pretrained(init_from)
            config = dataclasses.replace(loaded.config, flow_variant=config.flow_variant,
                                         flow_pretrained=config.flow_pretrained, flow_updates=config.flow_updates)
        self.config = config
        self.net = StreamDiffVSRNet(config)
        self.flow = flow_estimator(config, pretrained=config.flow_pretrained)
        # The teacher is the x4 upscaler's UNet, with its noise-level class embedding, sampled on a
        # finer DDIM grid of the same schedule.
        teacher_config = {**config.unet, "num_class_embeds": 1000}
        self.teacher = UNet2DConditionModel(**teacher_config)
        self.teacher_scheduler = DDIMScheduler.from_config(config.scheduler)
        self.teacher_scheduler.set_timesteps(teacher_steps)
        if base_model is not None:
            self._load_base_model(base_model)
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

    def _load_base_model(self, base_model: str) -> None:
        teacher = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
        state = teacher.state_dict()
        self.teacher.load_state_dict(state, strict=True)
        student = {k: v for k, v in state.items() if not k.startswith("class_embedding.")}
        self.net.unet.load_state_dict(student, strict=True)
        self.net.prompt_embeds.copy_(encode_prompt(base_model, [""]))

    def train(self, mode: bool = True) -> StreamDiffVSRModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def to_upscaler(self) -> StreamDiffVSRUpscaler:
        """The streaming upscaler carrying a copy of this module's current network and flow weights."""
        return StreamDiffVSRUpscaler(self.config, net=copy.deepcopy(self.net), flow=copy.deepcopy(self.flow)).eval()

    # Shared pieces -----------------------------------------------------------------------

    def hr_flow(self, lr: Tensor, prev_lr: Tensor) -> Tensor:
        """Flow at HR from frame t to frame t-1 of LR frames in `[0, 1]`, as inference computes it by default."""
        return flow_to_previous(self.flow, lr * 2 - 1, prev_lr * 2 - 1, self.net.scale, "hr")

    def warp_onto(self, image: Tensor, lr: Tensor, prev_lr: Tensor) -> Tensor:
        """Warp `image` (HR, at frame t-1) onto frame t as inference warps the previous output."""
        return stream_warp(image, self.hr_flow(lr, prev_lr))

    def teacher_x0(self, latents: Tensor, lr: Tensor, t: int) -> Tensor:
        """The teacher's clean latent: DDIM from `latents` at `t`, steps of the teacher's spacing, past 0.

        diffusers' DDIM step goes from `t` to `t - 1000 / teacher_steps`; starting at the student's
        `t` keeps every teacher step on that stride (t = 749 runs 749, 729, ..., 9).
        """
        scheduler = self.teacher_scheduler
        stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        prompt = self.net.prompt_embeds.expand(latents.shape[0], -1, -1).to(latents.dtype)
        labels = torch.full((latents.shape[0],), self.config.noise_level, dtype=torch.long, device=latents.device)
        z, x0 = latents, latents
        for s in range(t, -1, -stride):
            timestep = torch.full((latents.shape[0],), s, dtype=torch.long, device=latents.device)
            out = self.teacher(torch.cat([z, lr], 1), timestep, encoder_hidden_states=prompt, class_labels=labels,
                               return_dict=False)[0]
            result = scheduler.step(out, s, z)
            z, x0 = result.prev_sample, result.pred_original_sample
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
            next_latents, x0 = net.step(output, t, latents)
            with torch.no_grad():
                teacher = self.teacher_x0(latents, lr_n, t)
            # Rollout distillation (Stream-DiffVSR, "U-Net Rollout Distillation"): latent L2 terms.
            teacher_terms.append(F.mse_loss(x0, teacher))
            gt_terms.append(F.mse_loss(x0, target))
            latents = next_latents.detach()  # no backpropagation through the rollout
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
            flow = self.hr_flow(lr[:, t], lr[:, t - 1])
            # The TPMs see at inference the previous output warped by `stream_warp`.
            warped_gt = stream_warp(hr_n[:, t - 1], flow)
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
                next_latents, x0 = net.step(output, step, latents)
                terms.append(F.mse_loss(x0, targets[:, t]))
                latents = next_latents.detach()
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
        extra = sorted(set(self.loss_weights) - set(terms))
        if extra:
            raise ValueError(f"stage {self.stage.name!r} weights loss(es) {', '.join(extra)}, which it does not "
                             f"compute; its losses are {', '.join(terms)}")
        # A loss the stage computes but does not weight is logged only.
        loss = sum(weight * terms[name] for name, weight in self.loss_weights.items())
        for name, value in terms.items():
            self.log(f"train/{self.stage.name}/{name}", value.detach())
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """PSNR of the causal streaming output (the inference pipeline on this module's networks)."""
        upscaler = StreamDiffVSRUpscaler(self.config, net=self.net, flow=self.flow)
        lr, hr = batch["lr"], batch["hr"]
        for clip_lr, clip_hr in zip(lr, hr):
            output = torch.stack(list(upscaler.stream(clip_lr.unbind(0))))
            mse = F.mse_loss(output, clip_hr).clamp_min(1e-10)
            self.log("val/psnr", -10 * torch.log10(mse), batch_size=lr.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.stage.lr, **self.stage.optimizer_kwargs)
