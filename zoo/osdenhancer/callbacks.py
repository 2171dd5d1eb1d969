"""OSDEnhancer's progressive training as one `StageSchedule` (Sec. 3.3-3.4 and Suppl. A, L155 and L437).

| stage | trains | loss | iters | lr |
|---|---|---|---|---|
| `decoder` | the deformable recurrent blocks of the VAE decoder | L1 + LPIPS + Eq. (11) | 5k | 1e-4 |
| `adaptation` (Stage 1) | the DiT (base weights) | Eq. (4) latent MSE | 15k | 2e-5 |
| `temporal` (Stage 2) | TR expert A_TR, B_TR + residual patch embedding | Eq. (6) = MSE + 1 Eq. (10) | 10k | 1e-4 |
| `spatial` (Stage 3) | SE expert A_SE, B_SE | Eq. (8): L1 + DISTS + 0.05 Eq. (12) - 0.05 MUSIQ | 5k | 5e-5 |

All stages use AdamW with betas (0.9, 0.95) (L437). What each stage reads (clips, crops, temporal skips,
sources) is `zoo.osdenhancer.data.STAGE_DATA`, keyed by the same stage names.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo.components.train.stages import Stage, StageSchedule

TASKS = ("decoder", "latent", "pixel")

# Parameter patterns (LightningModule names). The SE adapter wraps the adapted layers with peft, so their
# base weights are `<layer>.base_layer.*`.
DECODER_BLOCKS = ["net.vae.decoder.up_deformable_blocks.*"]
DIT = [
    "net.transformer.patch_embed.*",
    "net.transformer.time_embedding.*",
    "net.transformer.transformer_blocks.*.norm1.*",
    "net.transformer.transformer_blocks.*.norm2.*",
    "net.transformer.transformer_blocks.*.attn1.norm_q.*",
    "net.transformer.transformer_blocks.*.attn1.norm_k.*",
    "net.transformer.transformer_blocks.*.base_layer.*",
    "net.transformer.norm_final.*",
    "net.transformer.norm_out.*",
    "net.transformer.proj_out.base_layer.*",
]
TR_EXPERT = ["net.transformer.*_TC_lora.*", "net.transformer.res_patch.*"]
SE_EXPERT = ["net.transformer.*.TE_lora.*"]


@dataclass
class OSDEnhancerStage(Stage):
    """A `Stage` that also says what a training step computes.

    Args:
        task: `"decoder"` (reconstruct HR clips through the VAE), `"latent"` (the one step, losses on latents)
            or `"pixel"` (the one step and the decoder, losses on frames).
    """

    task: str = "pixel"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"stage {self.name!r}: task must be one of {', '.join(TASKS)}, got {self.task!r}")


class OSDEnhancerStages(StageSchedule):
    """Decoder pre-training, then Stages 1-3 of the TR-SE MoE.

    Steps count optimizer steps (`trainer.global_step`, one per batch). The paper gives no weight decay;
    AdamW's default 0.01 is used.

    Args:
        decoder_steps: length of decoder pre-training (5,000, L437).
        adaptation_steps: length of Stage 1 (15,000).
        temporal_steps: length of Stage 2 (10,000).
        spatial_steps: length of Stage 3 (5,000); -1 runs it until training ends.
        decoder_lr: learning rate of decoder pre-training (1e-4).
        adaptation_lr: of Stage 1 (2e-5).
        temporal_lr: of Stage 2 (1e-4).
        spatial_lr: of Stage 3 (5e-5).
        betas: AdamW betas of every stage ((0.9, 0.95), L437).
        weight_decay: AdamW weight decay of every stage.
        decoder_loss_weights: `reconstruction`, `perceptual`, `pixel_residual` (Eq. 11).
        adaptation_loss_weights: `latent_mse` (Eq. 4).
        temporal_loss_weights: `latent_mse`, `latent_residual` (Eq. 6 with λ_res = 1).
        spatial_loss_weights: `l1`, `dists`, `warp`, `nqa` (Eq. 8 with λ_dists = 1, λ_warp = λ_nqa = 0.05).
    """

    def __init__(
        self,
        decoder_steps: int = 5_000,
        adaptation_steps: int = 15_000,
        temporal_steps: int = 10_000,
        spatial_steps: int = 5_000,
        decoder_lr: float = 1e-4,
        adaptation_lr: float = 2e-5,
        temporal_lr: float = 1e-4,
        spatial_lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        decoder_loss_weights: dict[str, float] | None = None,
        adaptation_loss_weights: dict[str, float] | None = None,
        temporal_loss_weights: dict[str, float] | None = None,
        spatial_loss_weights: dict[str, float] | None = None,
    ) -> None:
        optimizer = {"betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__([
            OSDEnhancerStage("decoder", decoder_steps, DECODER_BLOCKS,
                             decoder_loss_weights or {"reconstruction": 1.0, "perceptual": 1.0, "pixel_residual": 1.0},
                             decoder_lr, optimizer, task="decoder"),
            OSDEnhancerStage("adaptation", adaptation_steps, DIT, adaptation_loss_weights or {"latent_mse": 1.0},
                             adaptation_lr, optimizer, task="latent"),
            OSDEnhancerStage("temporal", temporal_steps, TR_EXPERT,
                             temporal_loss_weights or {"latent_mse": 1.0, "latent_residual": 1.0}, temporal_lr,
                             optimizer, task="latent"),
            OSDEnhancerStage("spatial", spatial_steps, SE_EXPERT,
                             spatial_loss_weights or {"l1": 1.0, "dists": 1.0, "warp": 0.05, "nqa": 0.05},
                             spatial_lr, optimizer, task="pixel"),
        ])
