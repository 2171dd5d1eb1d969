"""Stream-DiffVSR data: REDS / Vimeo-90K style clips with the RealBasicVSR degradation."""

from __future__ import annotations

from zoo.components.train.data import VSRDataModule


class StreamDiffVSRDataModule(VSRDataModule):
    """HR clips (REDS frame folders, Vimeo-90K septuplets, videos) degraded on the fly.

    The paper trains on REDS with RealBasicVSR-style degradations; clips are sequences because the
    TPM and ARTG stages need consecutive frames. With no roots the built-in sample clips are used,
    so the recipes run offline.

    Args:
        train_roots: training dataset roots (REDS `train_sharp`, Vimeo-90K `sequences`, ...); None
            uses the sample clips.
        val_roots: validation roots; None uses the sample clips.
        clip_length: frames per training clip (the stages unroll this many frames).
        crop_size: square HR crop, a multiple of 4 * 8 so LR latents fit the UNet.
        batch_size: clips per batch.
        num_workers: DataLoader workers.
        degradation: degradation name (see `zoo.components.train.degradation`).
        layout: dataset layout of the roots ("auto", "reds", "vimeo90k", ...).
        seed: seed of shuffling, augmentation and degradation.
    """

    def __init__(
        self,
        train_roots: list[str] | None = None,
        val_roots: list[str] | None = None,
        clip_length: int = 5,
        crop_size: int = 256,
        batch_size: int = 2,
        num_workers: int = 4,
        degradation: str = "realbasicvsr",
        layout: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(
            train_roots=train_roots, val_roots=val_roots, clip_length=clip_length, crop_size=crop_size,
            batch_size=batch_size, num_workers=num_workers, scale=4, degradation=degradation, layout=layout,
            seed=seed,
        )
