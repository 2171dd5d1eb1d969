"""Stream-DiffVSR's three training stages as one `StageSchedule`."""

from __future__ import annotations

from zoo.components.train.stages import Stage, StageSchedule

# Parameter patterns (LightningModule names) trained by each stage.
DISTILL_PARAMETERS = ["net.unet.*"]
TPM_PARAMETERS = ["net.vae.decoder.*.alpha", "net.vae.decoder.*.temporal_processor.*"]
ARTG_PARAMETERS = ["net.controlnet.*"]


class StreamDiffVSRStages(StageSchedule):
    """Rollout distillation of the UNet, then the decoder's TPMs, then the ARTG ControlNet.

    Args:
        distill_steps: steps of stage 1 (UNet rollout distillation).
        tpm_steps: steps of stage 2 (TPM parameters of the decoder; encoder fixed).
        artg_steps: steps of stage 3 (ControlNet; UNet and decoder frozen).
        distill_lr: learning rate of stage 1.
        tpm_lr: learning rate of stage 2.
        artg_lr: learning rate of stage 3.
        distill_weights: loss weights of stage 1 ("teacher", "gt").
        tpm_weights: loss weights of stage 2 ("rec", "lpips", "temporal").
        artg_weights: loss weights of stage 3 ("latent").
    """

    def __init__(
        self,
        distill_steps: int = 100_000,
        tpm_steps: int = 100_000,
        artg_steps: int = 100_000,
        distill_lr: float = 5e-5,
        tpm_lr: float = 1e-4,
        artg_lr: float = 5e-5,
        distill_weights: dict[str, float] | None = None,
        tpm_weights: dict[str, float] | None = None,
        artg_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__([
            Stage("distill", distill_steps, DISTILL_PARAMETERS, distill_weights or {"teacher": 1.0, "gt": 1.0},
                  lr=distill_lr),
            Stage("tpm", tpm_steps, TPM_PARAMETERS, tpm_weights or {"rec": 1.0, "lpips": 1.0, "temporal": 1.0},
                  lr=tpm_lr),
            Stage("artg", artg_steps, ARTG_PARAMETERS, artg_weights or {"latent": 1.0}, lr=artg_lr),
        ])
