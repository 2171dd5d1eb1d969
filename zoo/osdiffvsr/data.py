"""OS-DiffVSR data (Sec. 4.1): REDS 3-frame clips, 512 x 512 HR crops, Real-ESRGAN LR on the fly.

Training clips are `(I_{i-1}, I_i, I_{i+1})` in time order: Eqs. (3), (5), (7) and (15) need the
real PREVIOUS frame, so clips are never reversed in time (a reversed clip would hand them
`I_{i+1}`). Spatial flips stay. Validation LR uses the RealBasicVSR degradation, as the paper's
synthetic test sets do (P:219).

Per-frame text conditions (P:90) come as precomputed CLIP embeddings, one file per sequence,
`<prompt_embeds_root>/<sequence key>.safetensors` holding `prompt_embeds` `(num_frames, L, D)`
(e.g. `network.encode_prompt` of tags of each ground-truth frame, as OSEDiff trains); items then
carry "prompt_embeds" `(clip_length, L, D)`. Without a root the generator keeps its stored (empty)
prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch.utils.data import Dataset

from zoo.components.train.data import PairedVideoDataset, VideoClipDataset, VSRDataModule, build_degradation
from zoo.osdiffvsr.network import OSDiffVSRConfig

# REDS4, one of the paper's test sets (P:219), lives inside REDS train_sharp: "266 videos" (P:219) is
# REDS's 240 training + 30 validation clips without these four.
REDS4 = ("000", "011", "015", "020")


class PromptEmbeddingClips(Dataset):
    """Adds each clip's per-frame prompt embeddings, "prompt_embeds" `(clip_length, L, D)`, to `clips`.

    Args:
        clips: a `VideoClipDataset` (its items carry "key" and "frame_index").
        root: folder of `<sequence key>.safetensors` files with `prompt_embeds` `(num_frames, L, D)`.
    """

    def __init__(self, clips: VideoClipDataset, root: str | Path) -> None:
        self.clips, self.root = clips, Path(root)
        missing = [s.key for s in clips.sequences if not (self.root / f"{s.key}.safetensors").is_file()]
        if missing:
            raise ValueError(f"prompt_embeds_root {self.root} lacks {len(missing)} sequence file(s), e.g. "
                             f"{missing[0]}.safetensors")

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        # The sampler's epoch reaches the clips' augmentation seeds through this wrapper.
        self.clips.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.clips[index]
        sequence = item["key"].rpartition("/")[0]
        frames = item["frame_index"]
        low, high = int(frames.min()), int(frames.max())
        with safe_open(self.root / f"{sequence}.safetensors", "pt") as f:
            # Only the clip's rows are read from the file.
            rows = f.get_slice("prompt_embeds")[low : high + 1]
        if rows.shape[0] != high - low + 1:
            raise ValueError(f"{self.root / sequence}.safetensors holds fewer prompt embeddings than frame {high}")
        item["prompt_embeds"] = rows[frames - low]
        return item


class OSDiffVSRDataModule(VSRDataModule):
    """Training clips of 3 consecutive frames (the generator's window), 512 x 512 HR crops, batch 8.

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
        crop_size: HR crop size (512, Sec. 4.1).
        batch_size: training batch size per device (the paper's batch is 8 in all, Sec. 4.1).
        num_workers: DataLoader workers.
        degradation: training degradation name.
        val_degradation: validation degradation name.
        layout: layout of the training/validation roots.
        scale: the upscaling factor; the generator's (`OSDiffVSRConfig.scale`) unless changed there.
        exclude_sequences: training sequence keys left out; REDS4 by default, since it is a test set.
            Keys absent from `train_roots` are an error, so pass `[]` for datasets without them.
        prompt_embeds_root: folder of per-sequence prompt embeddings for the training clips (see the
            module docstring); None keeps the generator's stored prompt.
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
        batch_size: int = 8,
        num_workers: int = 4,
        degradation: str = "realesrgan",
        val_degradation: str = "realbasicvsr",
        layout: str = "auto",
        scale: int = OSDiffVSRConfig.scale,
        exclude_sequences: Sequence[str] = REDS4,
        prompt_embeds_root: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(train_roots=train_roots, val_roots=val_roots, clip_length=clip_length,
                         crop_size=crop_size, batch_size=batch_size, num_workers=num_workers, scale=scale,
                         degradation=degradation, layout=layout, seed=seed)
        if (val_lr_root is None) != (val_gt_root is None):
            raise ValueError("val_lr_root and val_gt_root must be given together")
        if clip_length < 3:
            raise ValueError(f"clip_length must be at least 3 (a frame and its two neighbours), got {clip_length}")
        if prompt_embeds_root is not None and train_roots is None:
            raise ValueError("prompt_embeds_root needs train_roots: the sample clips have no per-frame prompts")
        self.val_lr_root, self.val_gt_root, self.val_layout = val_lr_root, val_gt_root, val_layout
        self.exclude_sequences = tuple(exclude_sequences)
        self.prompt_embeds_root = prompt_embeds_root
        self.train_degradation = self.degradation
        self.val_degradation = build_degradation(val_degradation, scale)

    def train_dataset(self) -> Dataset:
        """Time-ordered random crops of `train_roots` without `exclude_sequences`, or the sample clips."""
        if self.train_roots is None:
            return self._sample_clip_dataset()
        clips = VideoClipDataset(self.train_roots, clip_length=self.clip_length, stride=self.stride,
                                 crop_size=self.crop_size, temporal_reverse=False, layout=self.layout,
                                 seed=self.seed, exclude=self.exclude_sequences)
        return clips if self.prompt_embeds_root is None else PromptEmbeddingClips(clips, self.prompt_embeds_root)

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
