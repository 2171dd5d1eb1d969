"""PS-SR's three training phases as one `StageSchedule`.

1. `latent` (Sec. 3.3, L104-124): the base's LoRA on Eq. (10) = 1 * L2 (Eq. 7) + 1 * VSD (Eq. 8) +
   0.1 * adversarial (Eq. 9) (weights L164). The VSD fake score (a LoRA on a copy of the pretrained
   DiT) and the latent discriminator train alongside.
2. `pixel` (L126-130): VSD and the adversarial loss are removed; the base's LoRA trains on Eq. (11) =
   1 * pixel L2 + 2 * LPIPS on decoded 160 x 160 crops. The paper does not say whether Eq. (7) stays;
   Eq. (11) is pixel-only, so its weight `l2` is off unless a recipe sets it.
3. `draft` (Sec. 3.4, L136-142): the base is frozen; the draft, initialised from the base with its
   LoRA merged and pruned, is fully fine-tuned on Eq. (12) = 1 * L2 + 1 * Eq. (11), i.e. the weights
   `l2` = 1, `pixel_l2` = 1 * 1 and `lpips` = 1 * 2.

All three use AdamW at 5e-5 (L164). The VAE, the pretrained DiT weights and LPIPS stay frozen
throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo.components.train.stages import Stage, StageSchedule

BASE_LORA = ["net.base.*lora_*"]
VSD_FAKE_LORA = ["vsd_fake.*lora_*"]
DISCRIMINATOR = ["discriminator.*"]
DRAFT = ["net.draft.*"]
GENERATORS = ("base", "draft")


@dataclass
class PSSRStage(Stage):
    """A `Stage` that also says which model generates during it.

    Args:
        generator: `"base"` (one step from z_L, Eqs. 7-11) or `"draft"` (from the interpolant z_t of L138,
            guided by the frozen base's features, Eq. 12). Entering a `"draft"` stage initialises the
            draft from the base once (`PSSRModule.on_train_batch_start`).
    """

    generator: str = "base"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generator not in GENERATORS:
            raise ValueError(f"stage {self.name!r}: generator must be one of {', '.join(GENERATORS)}, "
                             f"got {self.generator!r}")


class PSSRStages(StageSchedule):
    """The `latent`, `pixel` and `draft` phases.

    Steps count batches: each phase takes one optimizer step per batch (the module's one AdamW holds
    every trainable group). The paper gives no phase lengths; the defaults are the zoo's.

    Args:
        latent_steps: length of the `latent` phase.
        pixel_steps: length of the `pixel` phase.
        draft_steps: length of the `draft` phase; -1 runs it until training ends.
        lr: AdamW learning rate of the base's LoRA and the draft (5e-5, L164).
        weight_decay: AdamW weight decay (the paper gives none; the draft's fusion layers never decay).
        latent_loss_weights: weights of `l2`, `vsd`, `adversarial` (Eq. 10).
        pixel_loss_weights: weights of `pixel_l2`, `lpips` (Eq. 11), optionally `l2`.
        draft_loss_weights: weights of `l2`, `pixel_l2`, `lpips` (Eq. 12 with Eq. 11 expanded).
    """

    def __init__(
        self,
        latent_steps: int = 20000,
        pixel_steps: int = 5000,
        draft_steps: int = 20000,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        latent_loss_weights: dict[str, float] | None = None,
        pixel_loss_weights: dict[str, float] | None = None,
        draft_loss_weights: dict[str, float] | None = None,
    ) -> None:
        optimizer_kwargs = {"weight_decay": weight_decay}
        latent = latent_loss_weights or {"l2": 1.0, "vsd": 1.0, "adversarial": 0.1}
        pixel = pixel_loss_weights or {"pixel_l2": 1.0, "lpips": 2.0}
        draft = draft_loss_weights or {"l2": 1.0, "pixel_l2": 1.0, "lpips": 2.0}
        super().__init__([
            PSSRStage("latent", latent_steps, BASE_LORA + VSD_FAKE_LORA + DISCRIMINATOR, latent, lr, optimizer_kwargs,
                      generator="base"),
            PSSRStage("pixel", pixel_steps, BASE_LORA, pixel, lr, optimizer_kwargs, generator="base"),
            PSSRStage("draft", draft_steps, DRAFT, draft, lr, optimizer_kwargs, generator="draft"),
        ])
