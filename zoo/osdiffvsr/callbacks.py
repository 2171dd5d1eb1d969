"""OS-DiffVSR training stages, matching the paper's ablations.

1. `afat`: the one-step generator without multi-frame fusion; LoRA on the VAE encoder and UNet
   train with (focal) MSE + LPIPS + the adjacent-frame adversarial loss, the DINOv2 critic trains
   alongside.
2. `mff`: fusion switched on; its query/key projections train with the LoRA, and the warp loss
   joins (Eq. 17 weights 1, 1, 2, 2).

The VAE decoder, the base SD weights and RAFT stay frozen throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo.components.train.stages import Stage, StageSchedule

GENERATOR_LORA = ["net.vae.*lora_*", "net.unet.*lora_*"]
DISCRIMINATOR = ["discriminator.*"]
FUSION = ["net.fusion.*"]


@dataclass
class OSDiffVSRStage(Stage):
    """A `Stage` that also says whether the generator applies multi-frame fusion.

    Args:
        fuse: run MFF before the UNet during this stage.
    """

    fuse: bool = True


class OSDiffVSRStages(StageSchedule):
    """The `afat` then `mff` stages.

    Steps count optimizer steps (`trainer.global_step`): the generator and the discriminator each
    step once per batch, so a stage of `n` steps covers `n / 2` batches.

    Args:
        afat_steps: length of the `afat` stage.
        mff_steps: length of the `mff` stage; -1 runs it until training ends.
        lr: generator learning rate (AdamW).
        weight_decay: generator AdamW weight decay.
        afat_loss_weights: loss weights of the `afat` stage (`mse`, `fmse`, `lpips`, `adversarial`).
        mff_loss_weights: loss weights of the `mff` stage (those plus `warp`).
    """

    def __init__(
        self,
        afat_steps: int = 20000,
        mff_steps: int = -1,
        lr: float = 1e-5,
        weight_decay: float = 1e-8,
        afat_loss_weights: dict[str, float] | None = None,
        mff_loss_weights: dict[str, float] | None = None,
    ) -> None:
        afat_weights = afat_loss_weights or {"fmse": 1.0, "lpips": 1.0, "adversarial": 2.0}
        mff_weights = mff_loss_weights or {"fmse": 1.0, "lpips": 1.0, "adversarial": 2.0, "warp": 2.0}
        optimizer_kwargs = {"weight_decay": weight_decay}
        super().__init__([
            OSDiffVSRStage("afat", afat_steps, GENERATOR_LORA + DISCRIMINATOR, afat_weights, lr, optimizer_kwargs,
                           fuse=False),
            OSDiffVSRStage("mff", mff_steps, GENERATOR_LORA + FUSION + DISCRIMINATOR, mff_weights, lr,
                           optimizer_kwargs, fuse=True),
        ])
