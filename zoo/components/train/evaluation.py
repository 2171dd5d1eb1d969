"""Evaluation: upscalers scored on a benchmark through Lightning's test loop, and the report.

- `EvaluationDataModule` serves a benchmark's clips in one of `EVAL_LAYOUTS`: paired LR/GT folders
  (REDS4, UDM10, SPMCS, YouHQ40, Vid4, GoPro, MVSR4x, any `gt/` + `lr/`), ground truth alone with
  LR made by a seeded degradation, or real-world LR without ground truth (VideoLQ).
- `ClipEvaluator` runs one `VideoUpscaler` on each clip and scores it with `VideoMetrics`, keeping
  what the report's figures show (temporal profiles, crops) for the first clips.
- `UpscalerEvaluation` is the LightningModule of `zoo evaluate`; `ZooModule.test_step` uses the same
  `ClipEvaluator`, so `lightning test -c recipes/<name>.yaml --data ...` runs the same loop.
- `write_report` writes `metrics.json`, `metrics.csv`, `report.md` and the PNG figures.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zoo.components.benchmarks import EVAL_LAYOUTS
from zoo.components.train.data import DEGRADATIONS, PairedVideoDataset, SequenceDataset, build_degradation
from zoo.components.train.metrics import METRIC_NAMES, VideoMetrics
from zoo.components.upscaler import VideoUpscaler

# Metrics where a lower value is better; the report marks the best value of each row.
LOWER_IS_BETTER = {"lpips", "dists", "niqe", "brisque", "ewarp", "tlp", "tof", "flolpips"}


def _clip_seed(seed: int, keys: Sequence[str]) -> int:
    digest = hashlib.blake2b("\n".join([str(seed), *keys]).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class EvaluationDataModule(LightningDataModule):
    """A benchmark's test clips, one per batch, with LR read from disk or made by a seeded degradation.

    Args:
        dataset: the benchmark's root folder (see `EVAL_LAYOUTS` for what each layout expects).
        layout: one of `EVAL_LAYOUTS`.
        degradation: `"none"` reads the layout's LR; a name of `DEGRADATIONS` (`realbasicvsr`,
            `realesrgan`, `bicubic` (BI), `blurdown` (BD)) makes LR from the ground truth instead,
            seeded per clip so every run sees the same LR.
        lr: LR root instead of the layout's default folder.
        scale: spatial factor between ground truth and LR.
        temporal_skip: space-time VSR: LR holds every `temporal_skip + 1`-th frame only.
        clip_length: None evaluates whole sequences; else windows of this many frames.
        max_frames: the first `max_frames` frames of each sequence only.
        seed: seed of the degradation.
        num_workers: DataLoader workers.
    """

    def __init__(self, dataset: str, layout: str = "pairs", degradation: str = "none", lr: str | None = None,
                 scale: int = 4, temporal_skip: int | None = None, clip_length: int | None = None,
                 max_frames: int | None = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if layout not in EVAL_LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(EVAL_LAYOUTS)}")
        if degradation != "none" and degradation not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {degradation!r}; choose none or one of {', '.join(DEGRADATIONS)}")
        spec = EVAL_LAYOUTS[layout]
        if degradation == "none" and spec.lr is None and lr is None:
            raise ValueError(f"layout {layout!r} holds ground truth only: name a degradation to make its LR")
        if degradation != "none" and spec.gt is None:
            raise ValueError(f"layout {layout!r} has no ground truth to degrade: use degradation none")
        root = Path(dataset)
        if not root.exists():
            raise ValueError(f"dataset {dataset} does not exist; layout {layout!r} expects {spec.about}")
        self.root, self.layout, self.spec, self.lr_root = root, layout, spec, lr
        self.scale, self.temporal_skip, self.seed = scale, temporal_skip, seed
        self.clip_length, self.max_frames, self.num_workers = clip_length, max_frames, num_workers
        self.degradation_name = degradation
        self.degradation = None if degradation == "none" else build_degradation(degradation, scale)
        self._dataset: Dataset | None = None

    @property
    def has_ground_truth(self) -> bool:
        return self.spec.gt is not None

    def test_dataset(self) -> Dataset:
        """The clips: paired sequences, ground truth to degrade, or LR alone."""
        spec, options = self.spec, {"clip_length": self.clip_length, "max_frames": self.max_frames}
        lr_root = Path(self.lr_root) if self.lr_root is not None else None
        if self.degradation is not None:
            return SequenceDataset(self.root / spec.gt, field="hr", temporal_skip=self.temporal_skip, **options)
        if spec.gt is None:
            return SequenceDataset(lr_root or self.root / spec.lr, field="lr", **options)
        return PairedVideoDataset(lr_root or self.root / spec.lr, self.root / spec.gt, layout=spec.paired,
                                  temporal_skip=self.temporal_skip, **options)

    def setup(self, stage: str) -> None:
        if stage != "test":
            raise ValueError(f"EvaluationDataModule serves the test stage only, not {stage!r}")
        self._dataset = self.test_dataset()

    def test_dataloader(self) -> DataLoader:
        if self._dataset is None:
            raise RuntimeError("call setup('test') first")
        return DataLoader(self._dataset, batch_size=1, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "lr" in batch:
            return batch
        hr = batch["hr"]
        if "key_frames" in batch:
            hr = hr[:, batch["key_frames"][0]]
        generator = torch.Generator().manual_seed(_clip_seed(self.seed, batch["key"]))
        batch["lr"] = self.degradation(hr, generator)
        return batch


@dataclass
class ClipVisuals:
    """What the report shows of one clip: one pixel row over time, and a crop of the middle frame.

    Attributes:
        key: the clip.
        row: the HR row of the profiles.
        profiles: name -> `(T, 3, W)` (that row of every frame); "lr" is bicubic-upsampled.
        crops: name -> `(3, h, w)` of the middle frame.
    """

    key: str
    row: int
    profiles: dict[str, Tensor] = field(default_factory=dict)
    crops: dict[str, Tensor] = field(default_factory=dict)


class ClipEvaluator:
    """Runs an upscaler on each clip and scores it; keeps the figures' material for the first clips.

    Args:
        upscaler: the pipeline to evaluate (any device).
        metrics: the metric collection.
        visual_clips: clips whose profiles and crops are kept.
        crop_size: side of the crops, in HR pixels.
    """

    def __init__(self, upscaler: VideoUpscaler, metrics: VideoMetrics, visual_clips: int = 2,
                 crop_size: int = 96) -> None:
        self.upscaler, self.metrics = upscaler, metrics
        self.visual_clips, self.crop_size = visual_clips, crop_size
        self.visuals: list[ClipVisuals] = []

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any]) -> dict[str, float]:
        """Score the one clip of `batch` ("lr" `(1, T, 3, h, w)`, optional "hr", "key")."""
        up = self.upscaler
        lr = batch["lr"][0]
        key = batch["key"][0]
        gt = batch["hr"][0].float() if "hr" in batch else None
        pred = up(lr.to(up.device, up.dtype)).float()
        if gt is not None:
            gt = gt.to(pred.device)
            if pred.shape != gt.shape:
                raise ValueError(f"clip {key}: the model outputs {tuple(pred.shape)} but the ground truth is "
                                 f"{tuple(gt.shape)}; the LR must be 1/{up.scale} of the ground truth in size")
        scores = self.metrics.update(pred, gt, key)
        if len(self.visuals) < self.visual_clips:
            self.visuals.append(self._visuals(key, lr.to(pred.device).float(), pred, gt))
        return scores

    def _visuals(self, key: str, lr: Tensor, pred: Tensor, gt: Tensor | None) -> ClipVisuals:
        height, width = pred.shape[-2:]
        upsampled = F.interpolate(lr, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
        row = height // 2
        visuals = ClipVisuals(key=key, row=row)
        size = min(self.crop_size, height, width)
        top, left = (height - size) // 2, (width - size) // 2
        for name, clip in (("lr", upsampled), ("output", pred), ("gt", gt)):
            if clip is None:
                continue
            visuals.profiles[name] = clip[:, :, row, :].cpu()
            visuals.crops[name] = clip[len(clip) // 2, :, top : top + size, left : left + size].cpu()
        return visuals


class UpscalerEvaluation(LightningModule):
    """Lightning's test loop over an `EvaluationDataModule` for one `VideoUpscaler`.

    Args:
        upscaler: the pipeline to evaluate.
        metrics: metric names (`METRIC_NAMES`).
        crop_border: pixels left out on each side for PSNR / SSIM.
        y_channel: PSNR / SSIM on BT.601 luma.
        visual_clips: clips kept for the report's figures.
    """

    def __init__(self, upscaler: VideoUpscaler, metrics: Sequence[str] = ("psnr", "ssim", "lpips", "ewarp"),
                 crop_border: int = 0, y_channel: bool = True, visual_clips: int = 2) -> None:
        super().__init__()
        self.upscaler = upscaler
        self.metrics = VideoMetrics(metrics, crop_border=crop_border, y_channel=y_channel)
        self.evaluator = ClipEvaluator(upscaler, self.metrics, visual_clips)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{name}": value for name, value in self.metrics.compute().items()}, batch_size=1)


@dataclass
class ModelResult:
    """One model's evaluation, as the report needs it.

    Attributes:
        label: the model's column name.
        overall: metric -> mean over clips.
        per_clip: one record per clip ("key" and the metric values).
        unavailable: metric -> why it could not run.
        visuals: the figures' material.
    """

    label: str
    overall: dict[str, float]
    per_clip: list[dict[str, float | str]]
    unavailable: dict[str, str]
    visuals: list[ClipVisuals]

    @classmethod
    def from_evaluator(cls, label: str, evaluator: ClipEvaluator) -> ModelResult:
        metrics = evaluator.metrics
        return cls(label, metrics.compute(), list(metrics.per_clip), dict(metrics.unavailable), evaluator.visuals)


def _format(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def write_report(folder: str | Path, results: Sequence[ModelResult], metrics: Sequence[str],
                 description: dict[str, Any]) -> Path:
    """Write `metrics.json`, `metrics.csv`, `report.md` and the PNG figures into `folder`.

    Args:
        folder: the report folder (created).
        results: one per model, in column order.
        metrics: the metric names asked for, in row order.
        description: what was evaluated (dataset, layout, degradation, seed, ...), recorded as is.

    Returns:
        `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "evaluation": description,
        "models": {
            r.label: {"overall": r.overall, "per_clip": r.per_clip, "unavailable": r.unavailable} for r in results
        },
    }
    (folder / "metrics.json").write_text(json.dumps(data, indent=2) + "\n")
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "clip", *metrics])
        for r in results:
            for record in r.per_clip:
                writer.writerow([r.label, record.get("key", ""), *(record.get(m, "") for m in metrics)])
            writer.writerow([r.label, "overall", *(r.overall.get(m, "") for m in metrics)])
    figures = _write_figures(folder, results, metrics)
    (folder / "report.md").write_text(_markdown(results, metrics, description, figures))
    return folder


def _markdown(results: Sequence[ModelResult], metrics: Sequence[str], description: dict[str, Any],
              figures: list[str]) -> str:
    lines = ["# Evaluation", ""]
    lines += [f"- **{key}**: {value}" for key, value in description.items()]
    lines += ["", "Mean over clips; best value of each row in bold (↑ higher is better, ↓ lower).", ""]
    lines.append("| metric | " + " | ".join(r.label for r in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for metric in metrics:
        values = [r.overall.get(metric) for r in results]
        known = [v for v in values if v is not None]
        best = (min(known) if metric in LOWER_IS_BETTER else max(known)) if len(known) > 1 else None
        cells = [f"**{_format(v)}**" if v is not None and v == best else _format(v) for v in values]
        arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
        lines.append(f"| {metric} {arrow} | " + " | ".join(cells) + " |")
    unavailable = [(r.label, m, why) for r in results for m, why in r.unavailable.items()]
    if unavailable:
        lines += ["", "## Unavailable metrics", ""]
        lines += [f"- {label}: `{metric}`: {why}" for label, metric, why in unavailable]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def _image(tensor: Tensor) -> Any:
    """`(3, H, W)` in [0, 1] as an `(H, W, 3)` array for matplotlib."""
    return tensor.clamp(0, 1).permute(1, 2, 0).numpy()


def _write_figures(folder: Path, results: Sequence[ModelResult], metrics: Sequence[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    written = []
    shown = [m for m in metrics if any(m in r.overall for r in results)]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(2.2 + 1.6 * len(shown) * max(1, len(results) / 2), 3),
                                 squeeze=False)
        for ax, metric in zip(axes[0], shown):
            values = [r.overall.get(metric, float("nan")) for r in results]
            ax.bar(range(len(results)), values, color=plt.cm.tab10.colors[: len(results)])
            ax.set_xticks(range(len(results)), [r.label for r in results], rotation=30, ha="right")
            ax.set_title(f"{metric} {'↓' if metric in LOWER_IS_BETTER else '↑'}")
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=100)
        plt.close(fig)
        written.append("metrics.png")
    for index, first in enumerate(results[0].visuals if results else []):
        columns = [("LR (bicubic)", "lr", results[0])]
        columns += [(r.label, "output", r) for r in results]
        if "gt" in first.profiles:
            columns.append(("GT", "gt", results[0]))
        for kind, attribute in (("profile", "profiles"), ("crops", "crops")):
            fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 2.8), squeeze=False)
            for ax, (title, name, result) in zip(axes[0], columns):
                visual = result.visuals[index]
                ax.imshow(_image(getattr(visual, attribute)[name] if kind == "crops"
                                 else getattr(visual, attribute)[name].permute(1, 0, 2)), aspect="auto")
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            what = f"row {first.row} over time" if kind == "profile" else "centre crop, middle frame"
            fig.suptitle(f"{first.key}: {what}", fontsize=9)
            fig.tight_layout()
            name = f"{kind}_{index}.png"
            fig.savefig(folder / name, dpi=100)
            plt.close(fig)
            written.append(name)
    return written


__all__ = ["EVAL_LAYOUTS", "METRIC_NAMES", "ClipEvaluator", "EvaluationDataModule", "ModelResult",
           "UpscalerEvaluation", "write_report"]
