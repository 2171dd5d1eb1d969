"""Clip datasets and the base `VSRDataModule` (training and evaluation only).

Datasets
    `VideoClipDataset` (HR training clips from frame folders or video files), `PairedVideoDataset`
    (benchmarks with given LR/GT folders), `LRVideoDataset` (real-world LR sets without GT) and
    `SampleClipDataset` (the built-in clips of `zoo.components.samples`). Items are dicts: "hr" / "lr"
    (T, 3, H, W) float in [0, 1], "key" (a string naming sequence and first frame) and, with
    `temporal_skip`, the index tensors "key_frames" and "interp_frames" of space-time VSR
    (`temporal_subsample`).

Pixel and flow conventions are those of `zoo.components.samples` and `zoo.components.flow`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zoo.components.samples import SAMPLE_CLIP_NAMES, sample_clips
from zoo.components.train.degradation import (
    BicubicDegradation,
    BlurDownDegradation,
    Degradation,
    RealBasicVSRDegradation,
    RealESRGANDegradation,
)
from zoo.components.video_io import iter_frames, list_frame_files, list_video_files, natural_key, probe_video

# ------------------------------------------------------------------------------------------------
# Temporal subsampling (space-time VSR)
# ------------------------------------------------------------------------------------------------


def temporal_subsample(num_frames: int, skip: int) -> tuple[Tensor, Tensor]:
    """Split frame indices into key frames (the LR input) and frames to interpolate.

    Key frames are every (skip + 1)-th frame, first and last included: 9 frames with skip 3 give keys
    [0, 4, 8] and interpolated frames [1, 2, 3, 5, 6, 7]. Skip 0 is plain VSR (every frame a key).

    Args:
        num_frames: output frames; num_frames - 1 must be a multiple of skip + 1.
        skip: frames dropped between consecutive key frames (0, 1, 3, 7, 15 in the papers).
    """
    if skip < 0 or num_frames < 1 or (num_frames - 1) % (skip + 1):
        raise ValueError(f"num_frames - 1 must be a multiple of skip + 1, got num_frames={num_frames}, skip={skip}")
    frames = torch.arange(num_frames)
    is_key = frames % (skip + 1) == 0
    return frames[is_key], frames[~is_key]


def _aligned_length(num_frames: int, skip: int) -> int:
    """The longest prefix that starts and ends on a key frame."""
    return (num_frames - 1) // (skip + 1) * (skip + 1) + 1


def _add_key_frames(item: dict[str, Any], skip: int | None, num_frames: int) -> dict[str, Any]:
    if skip is not None:
        item["key_frames"], item["interp_frames"] = temporal_subsample(num_frames, skip)
        if "lr" in item:
            item["lr"] = item["lr"][item["key_frames"]]
    return item


# ------------------------------------------------------------------------------------------------
# Sequences on disk
# ------------------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list[int | str]:
    return natural_key(path.name)


def _to_unit_float(frames: Tensor) -> Tensor:
    return frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


@dataclass(frozen=True)
class VideoSource:
    """One video: a folder of frame images or a video file.

    Args:
        key: name of the sequence in its dataset ("000", "00001/0001", a file stem).
        num_frames: frame count.
        frames: the frame images in order (folders).
        video: the video file (videos).
    """

    key: str
    num_frames: int
    frames: tuple[Path, ...] = ()
    video: Path | None = None

    @classmethod
    def from_folder(cls, folder: Path, key: str) -> VideoSource:
        frames = tuple(list_frame_files(folder))
        return cls(key=key, num_frames=len(frames), frames=frames)

    @classmethod
    def from_video(cls, path: Path, key: str) -> VideoSource:
        return cls(key=key, num_frames=probe_video(path).num_frames, video=path)

    def read(self, start: int, count: int, step: int = 1) -> Tensor:
        """Frames start, start + step, ... (count of them): (count, 3, H, W), uint8 from images."""
        if self.video is not None:
            frames = iter_frames(self.video, start=start, max_frames=(count - 1) * step + 1)
            return torch.stack(list(itertools.islice(frames, 0, None, step)))
        paths = self.frames[start : start + (count - 1) * step + 1 : step]
        images = [torch.from_numpy(_read_rgb(p)).permute(2, 0, 1) for p in paths]
        sizes = {tuple(image.shape[-2:]) for image in images}
        if len(sizes) > 1:
            raise ValueError(f"{paths[0].parent}: frames differ in size {sorted(sizes)}")
        return torch.stack(images)


# layout -> what a root of that layout holds (quoted by the errors).
LAYOUTS = {
    "auto": "a video file, root/sequences/<a>/<b>/im*.png (Vimeo-90K), or root/<seq>/<frame>.png folders "
    "and/or video files in root",
    "reds": "root/<seq>/<frame>.png (e.g. REDS train_sharp/000/00000000.png)",
    "vimeo90k": "root/sequences/<a>/<b>/im1.png ... im7.png",
    "youhq": "root/<seq>/<frame>.png folders and/or video files (mp4, mkv, ...) in root",
    "adobe240": "root/<seq>/<frame>.png (frames extracted from each Adobe240 video)",
    "videos": "a video file, or video files (mp4, mkv, ...) in root",
}


def _frame_folders(root: Path) -> list[VideoSource]:
    folders = sorted((d for d in root.iterdir() if d.is_dir()), key=_natural_key)
    sequences = [VideoSource.from_folder(d, d.name) for d in folders]
    return [s for s in sequences if s.num_frames]


def _videos(root: Path) -> list[VideoSource]:
    paths = [root] if root.is_file() else list_video_files(root)
    return [VideoSource.from_video(p, p.stem) for p in paths]


def _vimeo90k(root: Path) -> list[VideoSource]:
    top = root / "sequences"
    if not top.is_dir():
        return []
    sequences = []
    for group in sorted((d for d in top.iterdir() if d.is_dir()), key=_natural_key):
        for clip in sorted((d for d in group.iterdir() if d.is_dir()), key=_natural_key):
            sequence = VideoSource.from_folder(clip, f"{group.name}/{clip.name}")
            if sequence.num_frames:
                sequences.append(sequence)
    return sequences


def discover_sequences(
    root: str | Path, layout: str = "auto", sequence_list: str | Path | None = None
) -> list[VideoSource]:
    """The sequences under a dataset root, sorted by key.

    Args:
        root: dataset root (see `LAYOUTS` for what each layout expects).
        layout: one of `LAYOUTS`; "auto" picks a video file, Vimeo-90K when root/sequences exists,
            else folders of frames and video files.
        sequence_list: text file of sequence keys to keep, one per line (e.g. Vimeo-90K's
            sep_trainlist.txt with lines "00001/0001", or REDS keys "000"); relative to root.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    root = Path(root)
    if not root.exists():
        raise ValueError(f"dataset root {root} does not exist; layout {layout!r} expects {LAYOUTS[layout]}")
    if layout == "auto":
        layout = "videos" if root.is_file() else "vimeo90k" if (root / "sequences").is_dir() else "youhq"
    if layout != "videos" and not root.is_dir():
        raise ValueError(f"dataset root {root} is not a folder; layout {layout!r} expects {LAYOUTS[layout]}")
    if layout == "vimeo90k":
        sequences = _vimeo90k(root)
    elif layout == "videos":
        sequences = _videos(root)
    elif layout == "youhq":
        sequences = _frame_folders(root) + _videos(root)
    else:
        sequences = _frame_folders(root)
    if sequence_list is not None:
        listed = [line.strip() for line in (root / sequence_list).read_text().splitlines() if line.strip()]
        by_key = {s.key: s for s in sequences}
        missing = [key for key in listed if key not in by_key]
        if missing:
            raise ValueError(f"{root}: sequences {missing[:3]} from {sequence_list} hold no frames")
        sequences = [by_key[key] for key in listed]
    if not sequences:
        raise ValueError(f"no frames found under {root}; layout {layout!r} expects {LAYOUTS[layout]}")
    return sequences


def _crop_size(crop_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if crop_size is None:
        return None
    return (crop_size, crop_size) if isinstance(crop_size, int) else (int(crop_size[0]), int(crop_size[1]))


def _item_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of ints collides on small values)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


class VideoClipDataset(Dataset):
    """HR training clips from frame folders or video files.

    One item per (sequence, first frame): every window of `clip_length` frames `stride` apart. Random
    crop, flips and temporal reversal draw from a generator seeded by (seed, index, epoch), so an item
    is the same in any worker and on any rerun; `set_epoch` (called by `EpochShuffleSampler`) changes
    the draw per epoch.

    Args:
        roots: one dataset root or several (their sequences are concatenated).
        clip_length: frames per clip.
        stride: temporal stride between the clip's frames.
        crop_size: HR crop (int for square, or (h, w)); None keeps whole frames.
        flip: random horizontal and vertical flips (each with probability 1/2).
        temporal_reverse: reverse the clip with probability 1/2.
        layout: one of `LAYOUTS`, for every root.
        sequence_list: optional list file per root (see `discover_sequences`).
        temporal_skip: space-time VSR: add "key_frames"/"interp_frames" (`temporal_subsample`).
        seed: base seed of the random augmentation.
        exclude: sequence keys left out (e.g. a test set kept inside the training roots); each must
            name a sequence of the roots.

    Items: "hr" `(clip_length, 3, H, W)`, "key" `"<sequence>/<first frame:08d>"` and "frame_index"
    `(clip_length,)`, the indices in the sequence of the clip's frames, in the item's order (so
    reversed with the clip).
    """

    def __init__(
        self,
        roots: str | Path | Sequence[str | Path],
        *,
        clip_length: int,
        stride: int = 1,
        crop_size: int | tuple[int, int] | None = None,
        flip: bool = True,
        temporal_reverse: bool = True,
        layout: str = "auto",
        sequence_list: str | None = None,
        temporal_skip: int | None = None,
        seed: int = 0,
        exclude: Sequence[str] = (),
    ) -> None:
        if clip_length < 1 or stride < 1:
            raise ValueError(f"clip_length and stride must be >= 1, got {clip_length} and {stride}")
        if temporal_skip is not None:
            temporal_subsample(clip_length, temporal_skip)
        roots = [roots] if isinstance(roots, str | Path) else list(roots)
        self.clip_length, self.stride, self.crop_size = clip_length, stride, _crop_size(crop_size)
        self.flip, self.temporal_reverse, self.temporal_skip = flip, temporal_reverse, temporal_skip
        self.seed, self.epoch = seed, 0
        span = (clip_length - 1) * stride + 1
        found = [s for root in roots for s in discover_sequences(root, layout, sequence_list)]
        unknown = sorted(set(exclude) - {s.key for s in found})
        if unknown:
            raise ValueError(f"exclude names sequences {unknown[:3]} that {[str(r) for r in roots]} do not hold")
        self.sequences = [s for s in found if s.num_frames >= span and s.key not in set(exclude)]
        if not self.sequences:
            raise ValueError(f"no sequence under {[str(r) for r in roots]} has the {span} frames a clip spans")
        # Cumulative window counts: index -> sequence by bisection, without a per-window list.
        self._ends = list(itertools.accumulate(s.num_frames - span + 1 for s in self.sequences))

    def __len__(self) -> int:
        return self._ends[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        which = bisect.bisect_right(self._ends, index)
        start = index - (self._ends[which - 1] if which else 0)
        sequence = self.sequences[which]
        generator = torch.Generator().manual_seed(_item_seed(self.seed, index, self.epoch))
        frames = sequence.read(start, self.clip_length, self.stride)
        if self.crop_size is not None:
            (crop_h, crop_w), (height, width) = self.crop_size, frames.shape[-2:]
            if height < crop_h or width < crop_w:
                raise ValueError(
                    f"{sequence.key}: frames are {height}x{width}, smaller than crop_size {crop_h}x{crop_w}"
                )
            top = int(torch.randint(height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(width - crop_w + 1, (), generator=generator))
            frames = frames[..., top : top + crop_h, left : left + crop_w]
        coins = torch.rand(3, generator=generator) < 0.5
        frame_index = start + self.stride * torch.arange(self.clip_length)
        if self.flip and coins[0]:
            frames = frames.flip(-1)
        if self.flip and coins[1]:
            frames = frames.flip(-2)
        if self.temporal_reverse and coins[2]:
            frames, frame_index = frames.flip(0), frame_index.flip(0)
        item = {"hr": _to_unit_float(frames).contiguous(), "key": f"{sequence.key}/{start:08d}",
                "frame_index": frame_index}
        return _add_key_frames(item, self.temporal_skip, self.clip_length)


@dataclass(frozen=True)
class PairedLayout:
    """Where a benchmark keeps its frames.

    Args:
        gt: frames of sequence <seq> are in gt_root/<seq>/<gt>.
        lr: frames of sequence <seq> are in lr_root/<seq>/<lr>.
        sequences: the benchmark's sequences when the root holds more (REDS4 inside REDS).
    """

    gt: str = ""
    lr: str = ""
    sequences: tuple[str, ...] | None = None


PAIRED_LAYOUTS = {
    # gt_root = REDS train_sharp, lr_root = train_sharp_bicubic/X4; REDS4 is clips 000, 011, 015, 020.
    "reds4": PairedLayout(sequences=("000", "011", "015", "020")),
    # gt_root = UDM10/GT, lr_root = UDM10/BDx4 (or BIx4).
    "udm10": PairedLayout(),
    # gt_root = lr_root = the SPMCS test folder: <seq>/truth/*.png and <seq>/input4/*.png.
    "spmcs": PairedLayout(gt="truth", lr="input4"),
    # gt_root = YouHQ40 gt folder, lr_root = its lq folder, both <seq>/*.png.
    "youhq40": PairedLayout(),
    # gt_root = Vid4/GT, lr_root = Vid4/BIx4 or BDx4: calendar, city, foliage, walk.
    "vid4": PairedLayout(sequences=("calendar", "city", "foliage", "walk")),
    # gt_root = GOPRO_Large/test (<seq>/sharp/*.png), lr_root = LR frames as <seq>/*.png.
    "gopro": PairedLayout(gt="sharp"),
    # gt_root = MVSR4x HR folder, lr_root = its LR folder, both <seq>/*.png.
    "mvsr4x": PairedLayout(),
    # Any other benchmark stored as gt_root/<seq>/*.png and lr_root/<seq>/*.png.
    "folders": PairedLayout(),
}


def _layout_help(layout: PairedLayout, side: str) -> str:
    sub = layout.gt if side == "gt" else layout.lr
    return f"{side}_root/<seq>/{sub + '/' if sub else ''}<frame>.png"


def _windows(num_frames: int, clip_length: int | None, skip: int | None) -> list[tuple[int, int]]:
    """(start, length) windows covering a whole sequence; the last one ends at the sequence end."""
    if clip_length is None:
        return [(0, num_frames if skip is None else _aligned_length(num_frames, skip))]
    if num_frames < clip_length:
        return []
    starts = list(range(0, num_frames - clip_length + 1, clip_length))
    if starts[-1] + clip_length < num_frames:
        starts.append(num_frames - clip_length)
    return [(start, clip_length) for start in starts]


class PairedVideoDataset(Dataset):
    """Benchmark sequences with given LR and GT frames (REDS4, UDM10, SPMCS, YouHQ40, Vid4, GoPro, MVSR4x).

    Layouts (`PAIRED_LAYOUTS`); <seq> folders must match between the two roots:

    - "reds4": gt_root = REDS train_sharp, lr_root = train_sharp_bicubic/X4, both <seq>/<frame>.png;
      only sequences 000, 011, 015, 020 are used.
    - "udm10": gt_root = UDM10/GT, lr_root = UDM10/BDx4, both <seq>/<frame>.png.
    - "spmcs": gt_root = lr_root = the SPMCS test folder, frames in <seq>/truth and <seq>/input4.
    - "youhq40": gt_root = the gt folder, lr_root = the lq folder, both <seq>/<frame>.png.
    - "vid4": gt_root = Vid4/GT, lr_root = Vid4/BIx4 (or BDx4); calendar, city, foliage, walk.
    - "gopro": gt_root = GOPRO_Large/test with <seq>/sharp/<frame>.png, lr_root = <seq>/<frame>.png.
    - "mvsr4x": gt_root = the HR folder, lr_root = the LR folder, both <seq>/<frame>.png.
    - "folders": any gt_root/<seq>/<frame>.png with lr_root/<seq>/<frame>.png.

    Args:
        lr_root: folder of LR sequences.
        gt_root: folder of GT sequences.
        layout: one of `PAIRED_LAYOUTS`.
        clip_length: None yields whole sequences (mind the memory for long 720p ones); else windows of
            this many frames that cover each sequence, the last one ending at its final frame.
        temporal_skip: space-time VSR: "lr" keeps only key frames, with "key_frames"/"interp_frames";
            whole sequences are cut to the longest prefix ending on a key frame.
        max_frames: use only the first `max_frames` frames of each sequence.
    """

    def __init__(
        self,
        lr_root: str | Path,
        gt_root: str | Path,
        *,
        layout: str = "folders",
        clip_length: int | None = None,
        temporal_skip: int | None = None,
        max_frames: int | None = None,
    ) -> None:
        if layout not in PAIRED_LAYOUTS:
            raise ValueError(f"unknown paired layout {layout!r}; expected one of {list(PAIRED_LAYOUTS)}")
        if clip_length is not None and temporal_skip is not None:
            temporal_subsample(clip_length, temporal_skip)
        spec = PAIRED_LAYOUTS[layout]
        lr_root, gt_root = Path(lr_root), Path(gt_root)
        for root, side in ((gt_root, "gt"), (lr_root, "lr")):
            if not root.is_dir():
                raise ValueError(
                    f"dataset root {root} does not exist; layout {layout!r} expects {_layout_help(spec, side)}"
                )
        names = spec.sequences or sorted(d.name for d in gt_root.iterdir() if d.is_dir())
        self.pairs: list[tuple[VideoSource, VideoSource]] = []
        for name in names:
            gt_dir, lr_dir = gt_root / name / spec.gt, lr_root / name / spec.lr
            gt = VideoSource.from_folder(gt_dir, name) if gt_dir.is_dir() else None
            if gt is None or not gt.num_frames:
                if spec.sequences is None:
                    continue  # a stray folder without frames in a generic root
                raise ValueError(f"no frames found in {gt_dir}; layout {layout!r} expects {_layout_help(spec, 'gt')}")
            lr = VideoSource.from_folder(lr_dir, name) if lr_dir.is_dir() else None
            if lr is None or lr.num_frames != gt.num_frames:
                found = 0 if lr is None else lr.num_frames
                raise ValueError(
                    f"{lr_dir} holds {found} frames, {gt_dir} holds {gt.num_frames}; layout "
                    f"{layout!r} expects {_layout_help(spec, 'lr')} for every GT sequence"
                )
            self.pairs.append((lr, gt))
        if not self.pairs:
            raise ValueError(f"no frames found under {gt_root}; layout {layout!r} expects {_layout_help(spec, 'gt')}")
        self.temporal_skip = temporal_skip
        self.items = [
            (i, start, length)
            for i, (_, gt) in enumerate(self.pairs)
            for start, length in _windows(min(gt.num_frames, max_frames or gt.num_frames), clip_length, temporal_skip)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, start, length = self.items[index]
        lr, gt = self.pairs[which]
        item = {
            "lr": _to_unit_float(lr.read(start, length)),
            "hr": _to_unit_float(gt.read(start, length)),
            "key": f"{gt.key}/{start:08d}",
        }
        return _add_key_frames(item, self.temporal_skip, length)


class SequenceDataset(Dataset):
    """Whole sequences (or windows of them) of one side: GT clips to degrade, or LR clips without GT.

    Frame folders `root/<seq>/<frame>.png` and video files in `root` (or `root` itself as one video).

    Args:
        root: dataset root.
        field: the item key of the frames: `"hr"` (ground truth, LR made by a degradation) or `"lr"`
            (real-world LR such as VideoLQ, no ground truth).
        clip_length: None yields whole sequences; else windows covering each sequence (as in
            `PairedVideoDataset`).
        max_frames: use only the first `max_frames` frames of each sequence.
        temporal_skip: space-time VSR with `field="hr"`: add "key_frames"/"interp_frames"; whole
            sequences are cut to the longest prefix ending on a key frame.
    """

    def __init__(self, root: str | Path, *, field: str = "hr", clip_length: int | None = None,
                 max_frames: int | None = None, temporal_skip: int | None = None) -> None:
        if field not in ("hr", "lr"):
            raise ValueError(f"field must be 'hr' or 'lr', got {field!r}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.field, self.temporal_skip = field, temporal_skip
        self.sequences = discover_sequences(root, "videos" if Path(root).is_file() else "youhq")
        self.items = [
            (i, start, length)
            for i, sequence in enumerate(self.sequences)
            for start, length in _windows(min(sequence.num_frames, max_frames or sequence.num_frames), clip_length,
                                          temporal_skip)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, start, length = self.items[index]
        sequence = self.sequences[which]
        item = {self.field: _to_unit_float(sequence.read(start, length)), "key": f"{sequence.key}/{start:08d}"}
        return _add_key_frames(item, self.temporal_skip, length)


class LRVideoDataset(SequenceDataset):
    """Real-world LR sequences without GT (VideoLQ: root/<seq>/<frame>.png; video files in root too).

    Args:
        root: dataset root.
        clip_length: None yields whole sequences; else windows covering each sequence.
    """

    def __init__(self, root: str | Path, *, clip_length: int | None = None) -> None:
        super().__init__(root, field="lr", clip_length=clip_length)


class SampleClipDataset(Dataset):
    """The built-in sample clips as a dataset of every window of `clip_length` frames.

    Items: "hr" (clip_length, 3, H, W), "flow" (clip_length - 1, 2, H, W) ground truth, "key".

    Args:
        num_clips: how many sample clips (the first ones of `SAMPLE_CLIP_NAMES`); all when None.
        clip_length: frames per item.
        size: (H, W) the clips are rendered at.
        num_frames: frames per rendered clip.
        temporal_skip: space-time VSR: add "key_frames"/"interp_frames" (`temporal_subsample`).
    """

    def __init__(
        self,
        num_clips: int | None = None,
        clip_length: int = 3,
        size: tuple[int, int] = (96, 128),
        num_frames: int = 8,
        temporal_skip: int | None = None,
    ) -> None:
        if not 1 <= clip_length <= num_frames:
            raise ValueError(f"clip_length must be in [1, num_frames={num_frames}], got {clip_length}")
        if temporal_skip is not None:
            temporal_subsample(clip_length, temporal_skip)
        self.clips = sample_clips(num_frames, size, SAMPLE_CLIP_NAMES[:num_clips])
        self.clip_length, self.temporal_skip = clip_length, temporal_skip
        self.windows_per_clip = num_frames - clip_length + 1

    def __len__(self) -> int:
        return len(self.clips) * self.windows_per_clip

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip, start = self.clips[index // self.windows_per_clip], index % self.windows_per_clip
        stop = start + self.clip_length
        item = {
            "hr": clip.frames[start:stop],
            "flow": clip.flow[start : stop - 1],
            "key": f"{clip.name}/{start:08d}",
        }
        return _add_key_frames(item, self.temporal_skip, self.clip_length)


class EpochShuffleSampler(DistributedSampler):
    """Seeded shuffling keyed by (seed, epoch), split between processes, resumable in the middle of an epoch.

    An epoch's order is a stream of permutations of the dataset drawn from a generator seeded by
    (seed, epoch), one after the other as `num_samples` needs them, cut to a multiple of the process
    count (the stream's next indices pad it, so every process gets as many). Process `rank` of
    `num_replicas` takes positions rank, rank + num_replicas, ... of it. Lightning calls `set_epoch`
    before each training epoch and the sampler passes the epoch on to the dataset, so per-item
    augmentation seeds follow it in every worker.

    It subclasses `DistributedSampler` so that Lightning uses it as it is under DDP and FSDP: Lightning
    wraps any other sampler in a `DistributedSampler` of its own, which would shuffle the order again.
    `ResumableDataLoader` saves how far an epoch got and hands it back through `resume`.

    Args:
        dataset: any sized dataset; its `set_epoch` is called when it has one.
        seed: base seed of the permutations.
        num_samples: positions per epoch over all processes; `len(dataset)` when None.
        num_replicas: number of processes sharing the epoch.
        rank: this process's index among them.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_samples: int | None = None, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        epoch_size = len(dataset) if num_samples is None else num_samples
        if epoch_size < 1:
            raise ValueError(f"an epoch needs at least one sample, got num_samples={epoch_size}")
        # DistributedSampler's names: num_samples per process, total_size over all of them.
        self.num_samples = math.ceil(epoch_size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a resume position belongs to the epoch it was saved in
        self.epoch = epoch
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if set_dataset_epoch is not None:
            set_dataset_epoch(epoch)

    def resume(self, epoch: int, consumed: int) -> None:
        """Start the next iteration in epoch `epoch` after its first `consumed` positions (over all processes)."""
        if not 0 <= consumed < self.total_size:
            raise ValueError(f"consumed must be in [0, {self.total_size}), got {consumed}")
        self.set_epoch(epoch)
        self.start = consumed

    def order(self) -> Tensor:
        """The epoch's positions over all processes: (total_size,) dataset indices."""
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch))
        size = len(self.dataset)
        rounds = math.ceil(self.total_size / size)
        return torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0  # a resume position serves one iteration
        return iter(self.order()[start + self.rank :: self.num_replicas].tolist())


class ResumableDataLoader(DataLoader):
    """A training `DataLoader` over an `EpochShuffleSampler` whose place in the epoch goes into checkpoints.

    Lightning saves the `state_dict` of a training loader that has one and hands it back to the new loader
    when a run resumes (`--ckpt_path`), before iterating it: the resumed epoch then continues after the
    batches already trained on, where a plain loader would restart it. Lightning takes one batch at a time
    from a loader whose length it knows (it prefetches only from unsized ones), so the batches yielded
    when a checkpoint is written are the batches trained on; workers read ahead, but the main process
    yields in order.

    Args:
        dataset: the training dataset.
        sampler: its `EpochShuffleSampler`.
        **kwargs: the other `DataLoader` arguments (batch_size, num_workers, drop_last, ...).
    """

    def __init__(self, dataset: Dataset, sampler: EpochShuffleSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, EpochShuffleSampler):
            raise ValueError(f"sampler must be an EpochShuffleSampler, got {type(sampler).__name__}")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._start, self._batches = 0, 0

    def __iter__(self) -> Iterator[Any]:
        self._start, self._batches = self.sampler.start, 0
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        consumed = min(self._start + self._batches * self.batch_size * sampler.num_replicas, sampler.total_size)
        return {"epoch": sampler.epoch, "consumed": consumed, "total": sampler.total_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, consumed = state_dict["epoch"], state_dict["consumed"]
        sampler = self.sampler
        if consumed + (self.batch_size * sampler.num_replicas if self.drop_last else 1) > state_dict["total"]:
            # The saved epoch is over (only a partial batch, dropped, was left): the next one starts afresh.
            sampler.resume(epoch + 1, 0)
        else:
            sampler.resume(epoch, consumed)


# ------------------------------------------------------------------------------------------------
# DataModule
# ------------------------------------------------------------------------------------------------

DEGRADATIONS: dict[str, Callable[..., Degradation]] = {
    "realesrgan": RealESRGANDegradation,
    "realbasicvsr": RealBasicVSRDegradation,
    "bicubic": BicubicDegradation,
    "blurdown": BlurDownDegradation,
}


def build_degradation(name: str, scale: int) -> Degradation:
    """The degradation of `zoo.components.train.degradation` called `name` (see `DEGRADATIONS`).

    Args:
        name: one of `DEGRADATIONS`.
        scale: spatial downscaling factor.
    """
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; expected one of {list(DEGRADATIONS)}")
    return DEGRADATIONS[name](scale=scale)


class VSRDataModule(LightningDataModule):
    """Base DataModule of the papers: HR clips in, LR made on the batch's device.

    With no roots, trains and validates on the built-in sample clips (rendered at crop_size), so every
    recipe runs offline. LR is made in `on_after_batch_transfer` by the degradation, batched on the
    device and seeded per step (training) or per clip (evaluation); batches that already hold "lr"
    (paired benchmarks) pass through. Subclasses override `train_dataset` / `val_dataset` /
    `test_dataset`.

    Args:
        train_roots: training dataset roots; None uses the sample clips.
        val_roots: validation dataset roots (whole frames, no augmentation); None uses the sample clips.
        clip_length: frames per training clip.
        crop_size: square HR crop of training clips; a multiple of scale.
        batch_size: training batch size (evaluation uses 1: whole frames differ in size).
        num_workers: DataLoader workers.
        scale: spatial upscaling factor.
        degradation: name in `DEGRADATIONS` ("realesrgan", "realbasicvsr", "bicubic", "blurdown") or a
            `Degradation`: `(clips (B, T, 3, H, W), generator) -> (B, T, 3, H / scale, W / scale)`.
        layout: dataset layout of the roots (see `LAYOUTS`).
        stride: temporal stride between the frames of a training clip.
        temporal_skip: space-time VSR: LR only at key frames, skipping this many frames between them.
        seed: seed of shuffling, augmentation and degradation.
    """

    def __init__(
        self,
        train_roots: list[str] | None = None,
        val_roots: list[str] | None = None,
        clip_length: int = 3,
        crop_size: int = 64,
        batch_size: int = 2,
        num_workers: int = 0,
        scale: int = 4,
        degradation: str | Degradation = "realesrgan",
        layout: str = "auto",
        stride: int = 1,
        temporal_skip: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if crop_size % scale:
            raise ValueError(f"crop_size must be a multiple of scale={scale}, got {crop_size}")
        # Checked here, before any network is built, so a mistyped root costs nothing.
        for root in [*(train_roots or []), *(val_roots or [])]:
            if not Path(root).exists():
                raise ValueError(f"dataset root {root} does not exist")
        self.save_hyperparameters(ignore=[] if isinstance(degradation, str) else ["degradation"])
        self.train_roots, self.val_roots = train_roots, val_roots
        self.clip_length, self.crop_size, self.stride = clip_length, crop_size, stride
        self.batch_size, self.num_workers, self.scale = batch_size, num_workers, scale
        self.layout, self.temporal_skip, self.seed = layout, temporal_skip, seed
        self.degradation = build_degradation(degradation, scale) if isinstance(degradation, str) else degradation
        self._datasets: dict[str, Dataset] = {}

    def _sample_clip_dataset(self) -> SampleClipDataset:
        return SampleClipDataset(
            clip_length=self.clip_length,
            size=(self.crop_size, self.crop_size),
            num_frames=max(8, self.clip_length),
            temporal_skip=self.temporal_skip,
        )

    def train_dataset(self) -> Dataset:
        """Training clips: random crops of `train_roots`, or the sample clips."""
        if self.train_roots is None:
            return self._sample_clip_dataset()
        return VideoClipDataset(
            self.train_roots,
            clip_length=self.clip_length,
            stride=self.stride,
            crop_size=self.crop_size,
            layout=self.layout,
            temporal_skip=self.temporal_skip,
            seed=self.seed,
        )

    def val_dataset(self) -> Dataset:
        """Validation clips: whole frames of `val_roots` without augmentation, or the sample clips."""
        if self.val_roots is None:
            return self._sample_clip_dataset()
        return VideoClipDataset(
            self.val_roots,
            clip_length=self.clip_length,
            stride=self.stride,
            flip=False,
            temporal_reverse=False,
            layout=self.layout,
            temporal_skip=self.temporal_skip,
        )

    def test_dataset(self) -> Dataset:
        """Test clips; the validation clips unless overridden."""
        return self.val_dataset()

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._datasets["train"] = self.train_dataset()
        if stage in ("fit", "validate"):
            self._datasets["val"] = self.val_dataset()
        if stage == "test":
            self._datasets["test"] = self.test_dataset()

    def _dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            raise RuntimeError(f"no {split} dataset: call setup() with the matching stage first")
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self.training_loader(self._dataset("train"))

    def training_loader(self, dataset: Dataset, num_samples: int | None = None,
                        drop_last: bool = False) -> ResumableDataLoader:
        """A resumable, seeded loader over `dataset`, split between the trainer's processes.

        Worker processes need no seeding of their own for a resumed run to read the same data: every random
        choice of the datasets comes from a generator seeded by (seed, item, epoch), and the degradation is
        seeded per step (`degradation_seed`), so an item is the same in any worker, whatever the worker
        count, and in a run resumed mid-epoch; nothing reads a worker's global random state.

        Args:
            dataset: the training dataset.
            num_samples: samples per epoch over all processes (`EpochShuffleSampler`); `len(dataset)` when None.
            drop_last: drop a last, incomplete batch.
        """
        trainer = self.trainer  # None outside a Trainer: one process
        world_size, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        sampler = EpochShuffleSampler(dataset, self.seed, num_samples, num_replicas=world_size, rank=rank)
        return ResumableDataLoader(dataset, sampler, batch_size=self.batch_size, num_workers=self.num_workers,
                                   drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=1, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test"), batch_size=1, num_workers=self.num_workers)

    def degradation_seed(self, keys: Sequence[str]) -> int:
        """Seed of one batch's degradation: from (seed, global step, clip keys) in training, so every
        step draws anew and a rerun draws the same; from (seed, clip keys) otherwise, so evaluation
        sees the same LR every time.

        Args:
            keys: the batch's "key" strings.
        """
        training = self.trainer is not None and self.trainer.training
        step = self.trainer.global_step if training else -1
        digest = hashlib.blake2b("\n".join([str(self.seed), str(step), *keys]).encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") >> 1

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "lr" in batch or "hr" not in batch:
            return batch
        hr = batch["hr"]
        if "key_frames" in batch:
            # Every clip of a batch has the same length, hence the same key frames.
            hr = hr[:, batch["key_frames"][0]]
        # A CPU generator: degradations draw clip parameters on the CPU and seed on-device noise from them.
        generator = torch.Generator().manual_seed(self.degradation_seed(batch["key"]))
        batch["lr"] = self.degradation(hr, generator)
        return batch
