"""Where each benchmark keeps its frames (`zoo evaluate --layout`); imports nothing heavy, for help texts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalLayout:
    """Where a benchmark keeps its frames, relative to the dataset root.

    Args:
        paired: the `PairedVideoDataset` layout, or None for a single side.
        gt: folder of the ground-truth sequences (None: no ground truth).
        lr: folder of the LR sequences (None: LR comes from a degradation).
        about: one line for help texts and errors.
    """

    paired: str | None
    gt: str | None
    lr: str | None
    about: str


EVAL_LAYOUTS: dict[str, EvalLayout] = {
    "reds4": EvalLayout("reds4", "train_sharp", "train_sharp_bicubic/X4",
                        "REDS root: train_sharp/<seq>/ and train_sharp_bicubic/X4/<seq>/ (clips 000, 011, 015, 020)"),
    "udm10": EvalLayout("udm10", "GT", "BDx4", "UDM10 root: GT/<seq>/ and BDx4/<seq>/"),
    "spmcs": EvalLayout("spmcs", ".", ".", "SPMCS test root: <seq>/truth/ and <seq>/input4/"),
    "youhq40": EvalLayout("youhq40", "gt", "lq", "YouHQ40 root: gt/<seq>/ and lq/<seq>/"),
    "vid4": EvalLayout("vid4", "GT", "BIx4", "Vid4 root: GT/<seq>/ and BIx4/<seq>/"),
    "gopro": EvalLayout("gopro", ".", "LR", "GoPro test root: <seq>/sharp/ and LR/<seq>/"),
    "mvsr4x": EvalLayout("mvsr4x", "HR", "LR", "MVSR4x root: HR/<seq>/ and LR/<seq>/"),
    "pairs": EvalLayout("folders", "gt", "lr", "gt/<seq>/ and lr/<seq>/ side by side"),
    "gt": EvalLayout(None, ".", None, "one frame folder or video per clip, used as ground truth"),
    "videolq": EvalLayout(None, None, ".", "real-world LR: one frame folder or video per clip, no ground truth"),
}
