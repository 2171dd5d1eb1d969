"""OSDEnhancer's training data: a different source, clip and crop per stage (L161, L437).

| stage | sources | clip | HR crop | temporal skips | LR |
|---|---|---|---|---|---|
| `decoder` | HQ-VSR videos | 33 | 256 x 256 | 0 | none (the VAE reconstructs HR) |
| `adaptation` | HQ-VSR videos | 33 | 320 x 640 | 0 (spatial degradation only) | RealBasicVSR x4 |
| `temporal` | Adobe240 (high frame rate) | 33 | 320 x 640 | 0, 1, 3, 7 or 15 | RealBasicVSR x4 of key frames |
| `spatial` | HQ-VSR videos + DIV2K stills, 1:1 | 9 | 320 x 320 | 0 or 1 | RealBasicVSR x4 of key frames |

A batch draws one temporal skip (all its clips share it, so they stack): the LR clip holds the HR clip's
frames 0, skip + 1, 2 (skip + 1), ... and the model interpolates `temporal_scale = skip + 1` in time. Every
clip of 33 (9) frames divides by the skips, so the last HR frame is always a key frame.

Layouts: HQ-VSR (DOVE's training set) as frame folders and/or video files (`youhq` layout), Adobe240 as
frame folders extracted from its videos (`adobe240`), DIV2K as a folder of images (`DIV2K_train_HR/*.png`).
With no roots, the built-in sample clips stand in for all three (their first frames as the still images),
so every recipe runs offline.

Stages switch data at their step milestones: an epoch of the training loader covers exactly the current
stage (a run resumed mid-stage continues it where its checkpoint was written), and the recipe reloads loaders
every epoch (`reload_dataloaders_every_n_epochs: 1`), so each stage starts on a loader of its own data. A batch of
another stage's data is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from zoo.components.train.data import SampleClipDataset, VideoClipDataset, VSRDataModule, temporal_subsample
from zoo.components.train.stages import StageSchedule
from zoo.components.video_io import list_frame_files

SOURCES = ("hq_video", "hfr_video", "image")


@dataclass
class StageData:
    """What one training stage reads.

    Args:
        sources: from `SOURCES`; several are mixed 1:1 (the paper gives no ratio).
        clip_length: HR (output) frames per clip, `8n + 1`.
        crop: HR crop `(height, width)`, multiples of 16.
        temporal_skips: frames skipped between LR key frames; each batch draws one uniformly.
        degrade: make LR clips; decoder pre-training reads HR clips only.
    """

    sources: tuple[str, ...]
    clip_length: int
    crop: tuple[int, int]
    temporal_skips: tuple[int, ...] = (0,)
    degrade: bool = True

    def __post_init__(self) -> None:
        self.sources, self.crop, self.temporal_skips = tuple(self.sources), tuple(self.crop), tuple(self.temporal_skips)
        unknown = sorted(set(self.sources) - set(SOURCES))
        if not self.sources or unknown:
            raise ValueError(f"sources must be some of {', '.join(SOURCES)}, got {list(self.sources)}")
        if (self.clip_length - 1) % 8 or any(size % 16 for size in self.crop):
            raise ValueError(f"clip_length must be 8n + 1 and crop multiples of 16, got {self.clip_length} and "
                             f"{list(self.crop)}")
        for skip in self.temporal_skips:
            temporal_subsample(self.clip_length, skip)


STAGE_DATA: dict[str, StageData] = {
    "decoder": StageData(("hq_video",), 33, (256, 256), degrade=False),
    "adaptation": StageData(("hq_video",), 33, (320, 640)),
    "temporal": StageData(("hfr_video",), 33, (320, 640), (0, 1, 3, 7, 15)),
    "spatial": StageData(("hq_video", "image"), 9, (320, 320), (0, 1)),
}


def _seed(*parts: Any) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StillImageDataset(Dataset):
    """Images as still clips (an image repeated `clip_length` times), randomly cropped and flipped.

    Args:
        roots: folders of images (DIV2K_train_HR: `0001.png`, ...).
        clip_length: frames per clip.
        crop: `(height, width)`.
        seed: base seed of the crop and flips (per item and epoch, as `VideoClipDataset`).
    """

    def __init__(self, roots: str | Path | Sequence[str | Path], clip_length: int, crop: tuple[int, int],
                 seed: int = 0) -> None:
        roots = [roots] if isinstance(roots, str | Path) else list(roots)
        self.files = [file for root in roots for file in list_frame_files(root)]
        if not self.files:
            raise ValueError(f"no images (png/jpg) found in {[str(r) for r in roots]}")
        self.clip_length, self.crop, self.seed, self.epoch = clip_length, tuple(crop), seed, 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(_seed(self.seed, index, self.epoch))
        with Image.open(self.files[index]) as image:
            frame = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        (crop_h, crop_w), (height, width) = self.crop, frame.shape[-2:]
        if height < crop_h or width < crop_w:
            raise ValueError(f"{self.files[index]} is {height}x{width}, smaller than the crop {crop_h}x{crop_w}")
        top = int(torch.randint(height - crop_h + 1, (), generator=generator))
        left = int(torch.randint(width - crop_w + 1, (), generator=generator))
        frame = frame[:, top : top + crop_h, left : left + crop_w]
        flips = torch.rand(2, generator=generator) < 0.5
        if flips[0]:
            frame = frame.flip(-1)
        if flips[1]:
            frame = frame.flip(-2)
        clip = (frame.float() / 255).expand(self.clip_length, -1, -1, -1).contiguous()
        return {"hr": clip, "key": f"{self.files[index].stem}"}


class StageDataset(Dataset):
    """One stage's clips: its sources mixed 1:1, every item tagged with the stage's name.

    Item `i` comes from source `i % k`, item `(i // k) % len(source)`, so each source weighs the same
    whatever its size.
    """

    def __init__(self, stage: str, sources: list[Dataset]) -> None:
        self.stage, self.sources = stage, sources

    def __len__(self) -> int:
        return len(self.sources) * max(len(source) for source in self.sources)

    def set_epoch(self, epoch: int) -> None:
        for source in self.sources:
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.sources[index % len(self.sources)]
        item = source[(index // len(self.sources)) % len(source)]
        return {"hr": item["hr"], "key": item["key"], "stage": self.stage}


class OSDEnhancerDataModule(VSRDataModule):
    """HR clips per stage, LR made on the batch's device with RealBasicVSR's degradation (L161).

    Args:
        hq_video_roots: HQ-VSR roots (`hq_layout`); None uses the sample clips.
        hfr_video_roots: Adobe240 roots (`hfr_layout`); None uses the sample clips.
        image_roots: DIV2K folders of images; None uses the sample clips' first frames.
        val_roots: validation video roots (whole frames); None uses the sample clips.
        stages: stage name -> `StageData`; `STAGE_DATA` (the paper's) when None.
        val_clip_length: frames of a validation clip.
        val_size: size of the sample clips validating when `val_roots` is None.
        val_temporal_skip: frames skipped between the LR key frames of validation clips.
        batch_size: training batch size (4, L163).
        num_workers: DataLoader workers.
        degradation: degradation name (`zoo.components.train.data.DEGRADATIONS`).
        hq_layout: layout of `hq_video_roots`.
        hfr_layout: layout of `hfr_video_roots`.
        seed: seed of shuffling, crops, skips and degradation.
    """

    def __init__(
        self,
        hq_video_roots: list[str] | None = None,
        hfr_video_roots: list[str] | None = None,
        image_roots: list[str] | None = None,
        val_roots: list[str] | None = None,
        stages: dict[str, StageData] | None = None,
        val_clip_length: int = 9,
        val_size: int = 64,
        val_temporal_skip: int = 1,
        batch_size: int = 4,
        num_workers: int = 4,
        degradation: str = "realbasicvsr",
        hq_layout: str = "youhq",
        hfr_layout: str = "adobe240",
        seed: int = 0,
    ) -> None:
        super().__init__(train_roots=None, val_roots=val_roots, clip_length=val_clip_length, crop_size=val_size,
                         batch_size=batch_size, num_workers=num_workers, scale=4, degradation=degradation,
                         layout=hq_layout, temporal_skip=val_temporal_skip, seed=seed)
        self.roots = {"hq_video": hq_video_roots, "hfr_video": hfr_video_roots, "image": image_roots}
        self.layouts = {"hq_video": hq_layout, "hfr_video": hfr_layout}
        self.stages = dict(STAGE_DATA if stages is None else stages)
        for name, data in self.stages.items():
            if not isinstance(data, StageData):
                self.stages[name] = StageData(**data)

    def setup(self, stage: str) -> None:
        # Training loaders are built per stage (`train_dataloader`); only validation is fixed.
        if stage in ("fit", "validate"):
            self._datasets["val"] = self.val_dataset()

    # Stages --------------------------------------------------------------------------------------

    def schedule(self) -> StageSchedule:
        """The trainer's `StageSchedule`, whose current stage decides the data."""
        schedules = [c for c in getattr(self.trainer, "callbacks", []) if isinstance(c, StageSchedule)]
        if len(schedules) != 1:
            raise RuntimeError("OSDEnhancerDataModule reads the data of the current training stage: the trainer "
                               "needs one StageSchedule callback (zoo.osdenhancer.callbacks.OSDEnhancerStages)")
        return schedules[0]

    def stage_data(self, name: str) -> StageData:
        if name not in self.stages:
            raise ValueError(f"no data for stage {name!r}; the datamodule's stages are {', '.join(self.stages)}")
        return self.stages[name]

    def source(self, name: str, data: StageData) -> Dataset:
        """The clips of one source at a stage's clip length and crop."""
        roots = self.roots[name]
        if roots is None:
            clips = SampleClipDataset(clip_length=data.clip_length, size=data.crop,
                                      num_frames=max(8, data.clip_length))
            if name != "image":
                return clips
            return [{"hr": clips[i]["hr"][:1].expand(data.clip_length, -1, -1, -1).contiguous(),
                     "key": f"still/{i}"} for i in range(0, len(clips), clips.windows_per_clip)]
        if name == "image":
            return StillImageDataset(roots, data.clip_length, data.crop, seed=self.seed)
        return VideoClipDataset(roots, clip_length=data.clip_length, crop_size=data.crop, layout=self.layouts[name],
                                seed=self.seed)

    def stage_dataset(self, name: str) -> StageDataset:
        data = self.stage_data(name)
        return StageDataset(name, [self.source(source, data) for source in data.sources])

    def train_dataloader(self) -> DataLoader:
        schedule = self.schedule()
        index = schedule.stage_index_at(self.trainer.global_step)
        stage = schedule.stages[index]
        dataset = self.stage_dataset(stage.name)
        start, end = schedule.ends[index - 1] if index else 0, schedule.ends[index]
        # One epoch = the whole stage, over every process (the sampler splits it): a stage starts with an epoch,
        # and a run resumed mid-stage skips the steps done (`ResumableDataLoader`). An endless last stage
        # has epochs of its dataset's size.
        num_samples = len(dataset) if math.isinf(end) else int(end - start) * self.batch_size * self.trainer.world_size
        return self.training_loader(dataset, num_samples, drop_last=True)

    # LR ------------------------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        training = self.trainer is not None and self.trainer.training
        if not training:
            batch = super().on_after_batch_transfer(batch, dataloader_idx)
            keys = batch.get("key_frames")
            batch["temporal_scale"] = 1 if keys is None or len(keys[0]) < 2 else int(keys[0][1] - keys[0][0])
            return batch
        schedule = self.schedule()
        # The schedule switches stages when the batch starts, after this hook: ask it by step.
        stage = schedule.stages[schedule.stage_index_at(self.trainer.global_step)].name
        if batch["stage"][0] != stage:
            raise RuntimeError(f"a batch of stage {batch['stage'][0]!r} arrived in stage {stage!r}: set the trainer's "
                               f"reload_dataloaders_every_n_epochs to 1 so each stage gets its own loader")
        data = self.stage_data(stage)
        generator = torch.Generator().manual_seed(self.degradation_seed(batch["key"]))
        skip = data.temporal_skips[int(torch.randint(len(data.temporal_skips), (), generator=generator))]
        batch["temporal_scale"] = skip + 1
        if data.degrade:
            key_frames, _ = temporal_subsample(batch["hr"].shape[1], skip)
            batch["lr"] = self.degradation(batch["hr"][:, key_frames], generator)
        return batch
