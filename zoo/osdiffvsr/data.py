"""OS-DiffVSR data: REDS-style 3-frame training clips, Real-ESRGAN LR on the fly, RealBasicVSR validation."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from zoo.components.train.data import PairedVideoDataset, VSRDataModule, build_degradation


class OSDiffVSRDataModule(VSRDataModule):
    """Training clips of 3 consecutive frames (the generator's window), 512 x 512 HR crops.

    Training LR comes from the Real-ESRGAN degradation, validation LR from the RealBasicVSR one
    (both made on the batch's device); a paired benchmark (`val_lr_root` + `val_gt_root`) is used
    as it is. With no roots, the built-in sample clips serve both, so the recipe runs offline.

    Args:
        train_roots: HR training roots (REDS train_sharp style); None uses the sample clips.
        val_roots: HR validation roots, degraded with `val_degradation`; None uses the sample clips.
        val_lr_root: LR folder of a paired benchmark (overrides `val_roots` with `val_gt_root`).
        val_gt_root: GT folder of that benchmark.
        val_layout: its layout (`zoo.components.train.data.PAIRED_LAYOUTS`).
        clip_length: frames per training clip (3: frame i and its two neighbours).
        crop_size: HR crop size.
        batch_size: training batch size.
        num_workers: DataLoader workers.
        degradation: training degradation name.
        val_degradation: validation degradation name.
        layout: layout of the training/validation roots.
        seed: seed of shuffling, augmentation and degradation.
    """

    def __init__(
        self,
        train_roots: list[str] | None = None,
        val_roots: list[str] | None = None,
        val_lr_root: str | None = None,
        val_gt_root: str | None = None,
        val_layout: str = "folders",
        clip_length: int = 3,
        crop_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 4,
        degradation: str = "realesrgan",
        val_degradation: str = "realbasicvsr",
        layout: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(train_roots=train_roots, val_roots=val_roots, clip_length=clip_length,
                         crop_size=crop_size, batch_size=batch_size, num_workers=num_workers, scale=4,
                         degradation=degradation, layout=layout, seed=seed)
        if (val_lr_root is None) != (val_gt_root is None):
            raise ValueError("val_lr_root and val_gt_root must be given together")
        if clip_length < 3:
            raise ValueError(f"clip_length must be at least 3 (a frame and its two neighbours), got {clip_length}")
        self.val_lr_root, self.val_gt_root, self.val_layout = val_lr_root, val_gt_root, val_layout
        self.train_degradation = self.degradation
        self.val_degradation = build_degradation(val_degradation, 4)

    def val_dataset(self) -> Dataset:
        """The paired benchmark when given, else HR validation clips (or the sample clips)."""
        if self.val_lr_root is not None:
            return PairedVideoDataset(self.val_lr_root, self.val_gt_root, layout=self.val_layout,
                                      clip_length=self.clip_length)
        return super().val_dataset()

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        training = self.trainer is not None and self.trainer.training
        self.degradation = self.train_degradation if training else self.val_degradation
        return super().on_after_batch_transfer(batch, dataloader_idx)
