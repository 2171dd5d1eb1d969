"""`OSDEnhancerModule`: decoder pre-training and the three TR-SE stages, with the losses of Eqs. (4), (6),
(8) and (10)-(12).

What a step computes comes from the active `OSDEnhancerStage` (`zoo.osdenhancer.callbacks`):

- `decoder` task (L155): HR clips through the frozen encoder (posterior sample) and the decoder, whose
  deformable blocks train; `reconstruction` (L1) + `perceptual` (LPIPS-VGG) + `pixel_residual` (Eq. 11).
  The paper says only "the reconstruction and perception loss of the original VAE" plus Eq. (11): the zoo
  takes L1 and LPIPS at weight 1 each, and no KL (the encoder is frozen) or adversarial term.
- `latent` task (Stages 1-2): the one step on the encoded LR inputs; `latent_mse` (Eq. 4) and
  `latent_residual` (Eq. 10) against the encoded HR clip (posterior mean).
- `pixel` task (Stage 3): the one step and the decoder; `l1`, `dists`, `warp` (Eq. 12) and `nqa` (MUSIQ),
  combined as Eq. (8) with the quality term SUBTRACTED.

The inputs follow inference: Eq. (2) pre-interpolation and bilinear x`scale` upsampling of the LR key
frames, Eq. (3) residuals, both encoded with posterior samples; the VAE encoder is never trained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.components.color import high_pass
from zoo.components.flow import FlowEstimator, FlowFn, valid_mask, warp
from zoo.components.lora import load_base_weights
from zoo.components.tiling import pad_frames, pad_to_multiple, valid_length
from zoo.components.train.losses import PerceptualLoss, temporal_residual_loss
from zoo.components.train.metrics import PYIQA_FILES
from zoo.components.train.module import ZooModule
from zoo.components.upscaler import VideoUpscaler, check_variant, read_safetensors
from zoo.osdenhancer.callbacks import OSDEnhancerStage
from zoo.osdenhancer.network import (
    SE_ADAPTER,
    OSDEnhancerConfig,
    OSDEnhancerNet,
    pre_interpolate,
    temporal_residuals,
    upsample,
)

LOSS_NAMES = ("reconstruction", "perceptual", "pixel_residual", "latent_mse", "latent_residual", "l1", "dists",
              "warp", "nqa")
SUBTRACTED = ("nqa",)
"""Losses that Eq. (8) subtracts: the quality score is maximised."""


def residual_loss(x: Tensor, y: Tensor) -> Tensor:
    """Eqs. (10)-(11), L445-447: `1/(L-1) Σ_j ‖(x_{j+1} - x_j) - (y_{j+1} - y_j)‖` over clips `(B, L, C, H, W)`.

    The paper leaves the norm open; the zoo takes the mean absolute value over channels and positions (and
    the batch), i.e. `zoo.components.train.losses.temporal_residual_loss`, in latent space (Eq. 10) and pixel
    space (Eq. 11) alike.
    """
    return temporal_residual_loss(x, y)  # Eqs. (10)-(11), OSDEnhancer


def warp_loss(frames: Tensor, flow_fn: FlowFn, high_pass_fn: Callable[[Tensor], Tensor], xi: float) -> Tensor:
    """Eq. (12), L453-455: the self-supervised warping loss on the high frequencies of an output clip.

    For each pair (j, j+1) of `frames` `(B, L, 3, H, W)` in [0, 1]:
    `‖M_j ⊙ (O_{j→j+1}(H_j) - H_{j+1})‖₁ / (C ‖M_j‖₁ + ξ)`, averaged over pairs and clips, where
    `H = high_pass_fn(I)`, `O_{j→j+1}` brings frame j onto frame j+1 (backward warping with the flow from
    `I_{j+1}` to `I_j`, pixel-centre convention of `zoo.components.flow`), and `M_j` keeps the pixels of frame
    j+1 that the forward-backward check finds visible in frame j and whose target lies inside it
    (`valid_mask`, Sundaram et al., as ref. [48]). Flows are computed on the detached outputs (L455), in
    float32. The
    channel count in the denominator makes each pair's value a mean absolute error over visible pixels.

    Args:
        frames: the output clip.
        flow_fn: flow estimator, `flow_fn(src, dst)` from `src` to `dst`.
        high_pass_fn: the high-pass filter H.
        xi: ξ of Eq. (12).
    """
    b, length, c = frames.shape[:3]
    current, previous = frames[:, 1:].flatten(0, 1), frames[:, :-1].flatten(0, 1)
    with torch.no_grad(), torch.autocast(frames.device.type, enabled=False):  # flows in float32
        target, source = current.detach().float().clamp(0, 1), previous.detach().float().clamp(0, 1)
        flow_back = flow_fn(target, source)  # from I_{j+1} to I_j
        mask = valid_mask(flow_back, flow_fn(source, target))
    high = high_pass_fn(frames.flatten(0, 1)).unflatten(0, (b, length))
    warped = warp(high[:, :-1].flatten(0, 1), flow_back.to(high.dtype))  # O_{j→j+1}(H_j)
    error = (mask * (warped - high[:, 1:].flatten(0, 1)).abs()).sum((1, 2, 3))
    return (error / (c * mask.sum((1, 2, 3)) + xi)).mean()  # Eq. (12), OSDEnhancer


@torch.no_grad()
def encode_empty_prompt(model: str, max_length: int) -> Tensor:
    """The T5 embedding `(L, D)` of the empty prompt, as CogVideoX's pipelines encode prompts.

    The tokenizer pads `""` to `max_length` tokens (226 for CogVideoX) and the encoder's last hidden state is
    the condition (L163: "empty text embeddings as conditions", following DOVE).

    Args:
        model: a folder or Hub id with `text_encoder/` (T5) and `tokenizer/`, e.g. CogVideoX1.5-5B.
        max_length: tokens L.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    encoder = T5EncoderModel.from_pretrained(model, subfolder="text_encoder").eval()
    ids = tokenizer([""], padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0][0].float()


def build_musiq(weights: str | Path | None, device: torch.device) -> nn.Module:
    """pyiqa's MUSIQ (KonIQ-10k) as a differentiable score, the no-reference quality L_nqa of Eq. (8) (ref. [23]).

    Args:
        weights: its checkpoint; None looks in pyiqa's cache (`torch.hub.get_dir()/pyiqa`).
        device: where it runs.

    Raises:
        FileNotFoundError: the checkpoint is not there (pyiqa cannot download it offline).
    """
    path = Path(weights) if weights is not None else Path(torch.hub.get_dir()) / PYIQA_FILES["musiq"]
    if not path.is_file():
        raise FileNotFoundError(
            f"this stage weights 'nqa' (MUSIQ, Eq. 8) but its weights {path} are missing: download pyiqa's "
            f"musiq_koniq checkpoint there or pass model.musiq_weights=PATH (or give 'nqa' no weight)")
    import pyiqa

    return pyiqa.create_metric("musiq", as_loss=True, device=device, pretrained_model_path=str(path))


class OSDEnhancerModule(ZooModule):
    """OSDEnhancer training: the bidirectional deformable decoder, then Stages 1-3 of the TR-SE MoE.

    Args:
        variant: network size, `"full"` (CogVideoX1.5-5B, rank-128 experts) or `"tiny"` (CPU tests).
        base_model: folder or Hub id of CogVideoX1.5-5B (diffusers layout) whose `transformer/` and `vae/`
            weights fill the networks; the experts and the deformable blocks start fresh (B = 0,
            `project_out` = 0). None keeps the random initialisation.
        prompt_embedding: safetensors file holding `prompt_embedding` `(L, D)`, the T5 embedding of the empty
            prompt (e.g. `prompt_embeddings/empty.safetensors` of the official checkpoint); with `base_model` and
            no file, it is computed with `base_model`'s `text_encoder/` and `tokenizer/`.
        scale: spatial factor of the training pairs (x4, L161).
        perceptual_pretrained: load the published LPIPS and DISTS weights.
        flow_pretrained: load torchvision's RAFT weights (the flow of Eq. 12).
        flow_variant: RAFT `"large"` or `"small"`.
        flow_updates: RAFT refinement iterations.
        musiq_weights: pyiqa's MUSIQ checkpoint (Eq. 8's L_nqa); None looks in pyiqa's cache. Only a stage that
            weights `nqa` needs it, and refuses to start without it.
        nqa_scale: MUSIQ's score is a mean opinion score of about 0-100; it is divided by this, so that
            `λ_nqa = 0.05` weighs it like the other terms (unscaled, 0.05 x a MUSIQ of 65, Table 1, would add 3.25
            to an objective whose L1 and DISTS terms stay below 1).
        high_pass_sigma: the high-pass filter of Eq. (12) is `I - GaussianBlur_σ(I)`; the paper names no
            filter (Tab. 7 only says "high-frequency components").
        warp_xi: ξ of Eq. (12).
        gradient_checkpointing: recompute the transformer blocks and the decoder in the backward pass.
    """

    hub_name = "osdenhancer"
    loss_names = LOSS_NAMES

    def __init__(
        self,
        variant: str = "full",
        base_model: str | None = None,
        prompt_embedding: str | None = None,
        scale: int = 4,
        perceptual_pretrained: bool = True,
        flow_pretrained: bool = True,
        flow_variant: str = "large",
        flow_updates: int = 12,
        musiq_weights: str | None = None,
        nqa_scale: float = 100.0,
        high_pass_sigma: float = 1.5,
        warp_xi: float = 1e-6,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_variant(variant)
        self.save_hyperparameters()
        self.net = OSDEnhancerNet(getattr(OSDEnhancerConfig, variant)())
        if base_model is not None:
            self.load_base(base_model, prompt_embedding)
        if gradient_checkpointing:
            self.net.transformer.enable_gradient_checkpointing()
            self.net.vae.enable_gradient_checkpointing()
        self.stage: OSDEnhancerStage | None = None
        self.loss_weights: dict[str, float] = {}
        # The frozen networks some losses run (LPIPS, DISTS, RAFT, MUSIQ) are tools with published weights, not
        # what training changes: built when a stage first needs them, kept out of checkpoints and optimizers.
        self._tools: dict[str, Callable[[Tensor], Tensor]] = {}

    # Weights -------------------------------------------------------------------------------------

    def load_base(self, base_model: str, prompt_embedding: str | None = None) -> None:
        """Fill the transformer and the VAE with CogVideoX1.5-5B's weights and set the prompt embedding.

        Every weight of the published models must find its place and every weight of ours must come from them,
        except the TR and SE experts, the residual patch embedding and the deformable decoder blocks.

        Args:
            base_model: folder or Hub id in the diffusers layout.
            prompt_embedding: safetensors file with `prompt_embedding`; None encodes the empty prompt with
                `base_model`'s T5 (`encode_empty_prompt`).
        """
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

        def is_new(key: str) -> bool:
            return ("_TC_lora" in key or f".{SE_ADAPTER}." in key or key.startswith("res_patch.")
                    or "up_deformable_blocks" in key)

        for name, cls in (("transformer", CogVideoXTransformer3DModel), ("vae", AutoencoderKLCogVideoX)):
            load_base_weights(getattr(self.net, name), cls.from_pretrained(base_model, subfolder=name).state_dict(),
                              skip=is_new, what=f"{base_model} {name} does not fit OSDEnhancer")
        if prompt_embedding is None:
            prompt = encode_empty_prompt(base_model, self.net.config.prompt_length)
        else:
            prompt = read_safetensors(Path(prompt_embedding))["prompt_embedding"]
        if prompt.shape != self.net.prompt_embedding.shape[1:]:
            raise ValueError(f"the prompt embedding is {tuple(prompt.shape)}, the transformer takes "
                             f"{tuple(self.net.prompt_embedding.shape[1:])}")
        with torch.no_grad():
            self.net.prompt_embedding.copy_(prompt[None])

    def to_upscaler(self) -> VideoUpscaler:
        from zoo.osdenhancer.pipeline import OSDEnhancerUpscaler

        return OSDEnhancerUpscaler.from_net(self.net)

    def set_quality_model(self, model: Callable[[Tensor], Tensor]) -> None:
        """Use `model` (frames `(N, 3, H, W)` in [0, 1] -> scores `(N,)` on MUSIQ's 0-100 scale) as L_nqa."""
        self._tools["nqa"] = model

    def tool(self, loss: str) -> Callable[..., Tensor]:
        """The frozen network behind `loss` (`perceptual`, `dists`, `warp`, `nqa`), built on first use."""
        if loss not in self._tools:
            hparams = self.hparams
            if loss == "perceptual":
                tool = PerceptualLoss("lpips", net="vgg", pretrained=hparams.perceptual_pretrained)
            elif loss == "dists":
                tool = PerceptualLoss("dists", pretrained=hparams.perceptual_pretrained)
            elif loss == "warp":
                tool = FlowEstimator(hparams.flow_variant, pretrained=hparams.flow_pretrained,
                                     num_flow_updates=hparams.flow_updates)
            else:
                tool = build_musiq(hparams.musiq_weights, self.device)
            self._tools[loss] = tool
        tool = self._tools[loss]
        return tool.to(self.device) if isinstance(tool, nn.Module) else tool

    # Forward -------------------------------------------------------------------------------------

    def model_inputs(self, lr: Tensor, temporal_scale: int) -> tuple[Tensor, Tensor]:
        """`(I†_in, I^Δ)` `(B, 3, T, H, W)` of LR clips `(B, N, 3, h, w)`: Eqs. (2)-(3), video in [-1, 1]."""
        scale = self.hparams.scale
        video = upsample(pre_interpolate(lr, temporal_scale), scale) * 2 - 1
        residual = temporal_residuals(upsample(lr, scale), temporal_scale)
        return video.transpose(1, 2), residual.transpose(1, 2)

    def one_step(self, lr: Tensor, temporal_scale: int) -> Tensor:
        """`z_out` `(B, F, C, h, w)` of LR clips whose upsampled frames fit the network (T = 8n + 1, sizes / 16)."""
        video, residual = self.model_inputs(lr, temporal_scale)
        with torch.no_grad():
            latents, residual_latents = self.net.encode(video), self.net.encode(residual)
        return self.net.denoise(latents, residual_latents)

    def decode_frames(self, latents: Tensor) -> Tensor:
        """Frames `(B, T, 3, H, W)` in about [0, 1] (unclamped) of latents."""
        return (self.net.decode(latents) * 0.5 + 0.5).transpose(1, 2)

    def target_latents(self, hr: Tensor) -> Tensor:
        """`z_gt`: the posterior mean of HR clips `(B, T, 3, H, W)` in [0, 1]."""
        with torch.no_grad():
            return self.net.encode((hr * 2 - 1).transpose(1, 2), sample=False)

    @torch.no_grad()
    def forward(self, lr: Tensor, temporal_scale: int) -> Tensor:
        """Upscaled clips `(B, T, 3, sH, sW)` in [0, 1] of LR clips of any size and length, as one chunk."""
        video, residual = self.model_inputs(lr, temporal_scale)
        b, c, t, height, width = video.shape
        padded_length = valid_length(t, "8n+1")
        clips = []
        for clip in (video, residual):
            clip = pad_frames(clip.transpose(0, 2), padded_length).transpose(0, 2)
            clip, padding = pad_to_multiple(clip.reshape(b, c * padded_length, height, width), 16, "reflect",
                                            centred=True)
            clips.append(clip.reshape(b, c, padded_length, *clip.shape[-2:]))
        out = self.net.upscale_clip(*clips)[:, :, :t]
        return padding.crop((out * 0.5 + 0.5).clamp(0, 1)).transpose(1, 2)

    # Losses --------------------------------------------------------------------------------------

    def decoder_losses(self, hr: Tensor) -> dict[str, Tensor]:
        """Decoder pre-training: reconstruct HR clips `(B, T, 3, H, W)` through the frozen encoder."""
        with torch.no_grad():
            latents = self.net.encode((hr * 2 - 1).transpose(1, 2))
        out = self.decode_frames(latents)
        weights, losses = self.loss_weights, {}
        if "reconstruction" in weights:
            losses["reconstruction"] = F.l1_loss(out, hr)
        if "perceptual" in weights:
            losses["perceptual"] = self.tool("perceptual")(out.clamp(0, 1).flatten(0, 1), hr.flatten(0, 1))
        if "pixel_residual" in weights:
            losses["pixel_residual"] = residual_loss(out, hr)  # Eq. (11), OSDEnhancer
        return losses

    def latent_losses(self, lr: Tensor, hr: Tensor, temporal_scale: int) -> dict[str, Tensor]:
        """Stages 1-2: Eq. (4) and Eq. (10) between `z_out` and `z_gt`."""
        z_out, z_gt = self.one_step(lr, temporal_scale), self.target_latents(hr)
        weights, losses = self.loss_weights, {}
        if "latent_mse" in weights:
            losses["latent_mse"] = F.mse_loss(z_out, z_gt)  # Eq. (4), OSDEnhancer
        if "latent_residual" in weights:
            losses["latent_residual"] = residual_loss(z_out, z_gt)  # Eq. (10), OSDEnhancer
        return losses

    def pixel_losses(self, lr: Tensor, hr: Tensor, temporal_scale: int) -> dict[str, Tensor]:
        """Stage 3: the terms of Eq. (8) on the decoded output clip."""
        out = self.decode_frames(self.one_step(lr, temporal_scale))
        weights, losses = self.loss_weights, {}
        frames, targets = out.clamp(0, 1).flatten(0, 1), hr.flatten(0, 1)
        if "l1" in weights:
            losses["l1"] = F.l1_loss(out, hr)
        if "dists" in weights:
            losses["dists"] = self.tool("dists")(frames, targets)
        if "warp" in weights:
            sigma = self.hparams.high_pass_sigma
            losses["warp"] = warp_loss(out, self.tool("warp"), lambda x: high_pass(x, "gaussian", sigma=sigma),
                                       self.hparams.warp_xi)
        if "nqa" in weights:
            losses["nqa"] = self.tool("nqa")(frames).mean() / self.hparams.nqa_scale
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """The stage's objective: the weighted sum of its losses, the quality score subtracted (Eq. 8)."""
        return sum((-1 if name in SUBTRACTED else 1) * self.loss_weights[name] * value
                   for name, value in losses.items())  # Eqs. (4), (6), (8), OSDEnhancer

    # Training ------------------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.stage is None:
            raise RuntimeError("OSDEnhancerModule trains in stages: add zoo.osdenhancer.callbacks.OSDEnhancerStages "
                               "to the trainer's callbacks")
        for loss in ("perceptual", "dists", "warp", "nqa"):
            if loss in self.loss_weights:
                self.tool(loss)  # a stage whose tools cannot be built refuses to start
        parameters = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.stage.lr, **self.stage.optimizer_kwargs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hr, task = batch["hr"], self.stage.task
        if task == "decoder":
            losses = self.decoder_losses(hr)
        elif task == "latent":
            losses = self.latent_losses(batch["lr"], hr, batch["temporal_scale"])
        else:
            losses = self.pixel_losses(batch["lr"], hr, batch["temporal_scale"])
        total = self.total_loss(losses)
        batch_size = hr.shape[0]
        self.log_dict({f"train/{name}": value.detach() for name, value in losses.items()}, on_step=True,
                      batch_size=batch_size)
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True, batch_size=batch_size)
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch["lr"], batch["temporal_scale"])
        mse = F.mse_loss(out, batch["hr"]).clamp_min(1e-10)
        self.log("val/psnr", -10 * torch.log10(mse), batch_size=out.shape[0], sync_dist=True)
