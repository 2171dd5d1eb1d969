"""PS-SR data: YouHQ-style HR clips of 4n+1 frames, Real-ESRGAN LR made on the fly."""

from __future__ import annotations

from zoo.components.train.data import VSRDataModule


class PSSRDataModule(VSRDataModule):
    """HR training clips (YouHQ: about 37K clips, L162) degraded to x4 LR by the Real-ESRGAN pipeline (L162).

    Clips hold 4n+1 frames, the Wan VAE's chunks (33 by default: nine latent frames; the paper states
    no clip length), with HR crops a multiple of 16 (the VAE's factor 8 times the DiT's patch 2).
    Real-ESRGAN draws one parameter set per clip, shared by its frames. With no roots the built-in
    sample clips serve training and validation, so the recipes run offline.

    Args:
        train_roots: HR training roots (YouHQ-Train videos or frame folders); None uses the sample clips.
        val_roots: HR validation roots (e.g. YouHQ40), degraded the same way; None uses the sample clips.
        clip_length: frames per clip, 4n+1.
        crop_size: square HR crop, a multiple of 16.
        batch_size: clips per batch and device (8 devices x 1 is the paper's total of 8, L164).
        num_workers: DataLoader workers.
        degradation: degradation name (`zoo.components.train.data.DEGRADATIONS`).
        layout: layout of the roots.
        stride: temporal stride between a clip's frames.
        seed: seed of shuffling, augmentation and degradation.
    """

    def __init__(
        self,
        train_roots: list[str] | None = None,
        val_roots: list[str] | None = None,
        clip_length: int = 33,
        crop_size: int = 480,
        batch_size: int = 1,
        num_workers: int = 4,
        degradation: str = "realesrgan",
        layout: str = "auto",
        stride: int = 1,
        seed: int = 0,
    ) -> None:
        if clip_length < 1 or (clip_length - 1) % 4:
            raise ValueError(f"clip_length must be 4n + 1 frames (the Wan VAE's chunks), got {clip_length}")
        if crop_size % 16:
            raise ValueError(f"crop_size must be a multiple of 16 (VAE factor 8 x DiT patch 2), got {crop_size}")
        super().__init__(train_roots=train_roots, val_roots=val_roots, clip_length=clip_length, crop_size=crop_size,
                         batch_size=batch_size, num_workers=num_workers, scale=4, degradation=degradation,
                         layout=layout, stride=stride, seed=seed)
