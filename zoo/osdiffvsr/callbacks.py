"""OS-DiffVSR training: the paper's single joint run, and the Table 3 ablations as alternatives.

The paper trains in ONE run (P:74-76, Sec. 4.1): LoRA on the VAE encoder and the UNet, the
multi-frame fusion module and the DINOv2-S discriminator in full, the VAE decoder frozen, with
the whole Eq. (17). That is `OSDiffVSRStages()` (setting `"paper"`), and also what
`OSDiffVSRModule` does with no stage callback at all.

Table 3 (P:262-266) compares separate trainings, each a single run as well:

- `"afat"`: Table 3 "Baseline" (= Table 2's last row, "AFAT (patch token) + FMSE"): no fusion, no
  warp loss; MFF does not train.
- `"mff"`: Table 3 "MFF": fusion on, no warp loss.
- `"paper"`: Table 3 "MFF+Warp Loss", the paper's model (its UDM10 row equals Table 1's "Ours").

RAFT, LPIPS, the base SD weights and, when the generator starts from OSEDiff, its frozen `osediff`
adapter never train.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo.components.train.stages import Stage, StageSchedule

# The trained adapter is `default`; the frozen `osediff` adapter (network.OSEDIFF_ADAPTER) stays out.
GENERATOR_LORA = ["net.vae.*.lora_[AB].default.*", "net.unet.*.lora_[AB].default.*"]
FUSION = ["net.fusion.*"]
DISCRIMINATOR = ["discriminator.*"]
# P:74-76: "the VAE encoder and UNet are fine-tuned with LoRA, while the multi-frame fusion module and
# the discriminator (i.e., DINOv2) are trained under full-parameter tuning setting".
PAPER_TRAINABLE = GENERATOR_LORA + FUSION + DISCRIMINATOR
# Eq. (17), OS-DiffVSR: omega_1..omega_4 = 1, 1, 2, 2 for L_G, L_fmse, L_lpips, L_warp (P:184).
PAPER_LOSS_WEIGHTS = {"adversarial": 1.0, "fmse": 1.0, "lpips": 2.0, "warp": 2.0}
WITHOUT_WARP = {name: weight for name, weight in PAPER_LOSS_WEIGHTS.items() if name != "warp"}

# setting -> (trainable patterns, Eq. (17) weights, fusion on)
SETTINGS: dict[str, tuple[list[str], dict[str, float], bool]] = {
    "paper": (PAPER_TRAINABLE, PAPER_LOSS_WEIGHTS, True),
    "mff": (PAPER_TRAINABLE, WITHOUT_WARP, True),
    "afat": (GENERATOR_LORA + DISCRIMINATOR, WITHOUT_WARP, False),
}


@dataclass
class OSDiffVSRStage(Stage):
    """A `Stage` that also says whether the generator applies multi-frame fusion.

    Args:
        fuse: run MFF before the UNet during this stage.
    """

    fuse: bool = True


class OSDiffVSRStages(StageSchedule):
    """One stage that runs until training ends: the paper's joint training or a Table 3 ablation.

    Args:
        setting: `"paper"` (default), `"mff"` or `"afat"` (see the module docstring).
        lr: generator learning rate (AdamW, 1e-5 in Sec. 4.1).
        weight_decay: generator AdamW weight decay (1e-8 in Sec. 4.1).
        loss_weights: Eq. (17)'s omega per loss; the setting's (the paper's 1, 1, 2, 2, without
            `warp` in the ablations) when None.
    """

    def __init__(self, setting: str = "paper", lr: float = 1e-5, weight_decay: float = 1e-8,
                 loss_weights: dict[str, float] | None = None) -> None:
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
        trainable, setting_weights, fuse = SETTINGS[setting]
        weights = dict(setting_weights if loss_weights is None else loss_weights)
        super().__init__([OSDiffVSRStage(setting, -1, list(trainable), weights, lr, {"weight_decay": weight_decay},
                                         fuse=fuse)])
