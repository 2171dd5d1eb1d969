"""Upscaling many videos on many devices and nodes with Lightning.

```
lightning predict -c recipes/predict.yaml --data.inputs DIR --data.output OUT --model.model stream_diffvsr
zoo upscale DIR OUT --model stream_diffvsr --devices 4          # the same pieces, from the zoo command
```

- `VideoListDataModule`: one item per video (`zoo.upscale.find_jobs`: files, frame folders, folders
  of videos, globs; outputs mirror the input tree), less the outputs already complete.
- `UpscaleModule`: a hub model; `predict_step` returns the job's `UpscaledVideo`, a lazy stream of
  output frames (a video may be longer than memory holds).
- `VideoWriter`: a `BasePredictionWriter` that drains that stream into the job's output, on the
  rank that made it.

Each video is upscaled exactly once: Lightning shards predict data with its unrepeated distributed
sampler, which splits the items between ranks without padding any rank with another's items.
Outputs are written beside their target and renamed into place (`video_io`), so an output exists
exactly when it is complete, and a restarted job (`skip_existing`, the default) does the rest.
It runs on any Lightning strategy and cluster environment (DDP across GPUs and nodes, SLURM).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from zoo.upscale import (
    UpscaledVideo,
    VideoJob,
    check_factors,
    check_jobs,
    check_target,
    existing_outputs,
    find_jobs,
    load_model,
    parse_time,
    probe_source,
    resolve_dtype,
    resolve_options,
    start_job,
)

log = logging.getLogger("zoo.upscale")


def _one(items: list[VideoJob]) -> VideoJob:
    """Batches of one video, handed over as the job itself."""
    return items[0]


class VideoListDataModule(LightningDataModule):
    """The videos to upscale, one per item.

    Args:
        inputs: video files, frame folders, folders of videos or globs (`zoo upscale`'s INPUTs).
        output: the output folder (or, for a single video, the output file).
        start: seconds or `[HH:]MM:SS[.fff]` of each video to skip.
        duration: how much of each video to upscale from `start`; to the end when None.
        skip_existing: leave out outputs that exist (complete, since writes are atomic); else
            replace them.
    """

    def __init__(self, inputs: list[str] | str, output: str, start: str | None = None, duration: str | None = None,
                 skip_existing: bool = True) -> None:
        super().__init__()
        self.inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        self.output = output
        self.start, self.duration = parse_time(start, "start") or 0, parse_time(duration, "duration")
        self.skip_existing = skip_existing
        self.jobs: list[VideoJob] = []

    def setup(self, stage: str) -> None:
        # Every rank lists the same jobs: setup ends in a barrier before any rank writes.
        jobs, batch = find_jobs(self.inputs, self.output, start=self.start, duration=self.duration)
        check_jobs(jobs, self.inputs, self.output, batch=batch)
        self.jobs = existing_outputs(jobs, "skip" if self.skip_existing else "overwrite")
        if len(self.jobs) < len(jobs):
            log.info("skipping %d of %d outputs that exist", len(jobs) - len(self.jobs), len(jobs))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.jobs, batch_size=1, collate_fn=_one, num_workers=0)


class UpscaleModule(LightningModule):
    """A hub model that upscales one video per `predict_step`.

    Args:
        model: hub name (optional with `checkpoint`).
        weights: exported weights folder or Hub repo id; the registry's when None.
        checkpoint: a `lightning fit` checkpoint instead.
        pretrained: load published weights (else random weights of size `variant`).
        variant: `"full"` or `"tiny"` for random weights.
        dtype: `"fp32"`, `"bf16"` or `"fp16"`.
        options: the model's runtime options (`tile`, `chunk`, `color_fix`, ...); tiles or chunks
            that fit the free memory are chosen per video where not given.
    """

    def __init__(self, model: str | None = None, weights: str | None = None, checkpoint: str | None = None,
                 pretrained: bool = True, variant: str = "full", dtype: str = "fp32",
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.upscaler = load_model(model, weights=weights, checkpoint=checkpoint, pretrained=pretrained,
                                   variant=variant, device="cpu", dtype=resolve_dtype(dtype))
        self.user_options, fixed = resolve_options(type(self.upscaler), dict(options or {}))
        check_factors(self.upscaler, fixed)

    def predict_step(self, job: VideoJob, batch_idx: int) -> UpscaledVideo:
        return start_job(self.upscaler, job, self.user_options)


class VideoWriter(BasePredictionWriter):
    """Writes each upscaled video to its output on the rank that upscaled it (atomically).

    Args:
        codec: video encoder; by the output's extension when None.
        crf: quality for x264/x265/vpx (lower is better).
        audio: copy each source's audio track.
    """

    def __init__(self, codec: str | None = None, crf: int = 18, audio: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.codec, self.crf, self.audio = codec, crf, audio

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Refuse what writing would refuse before the first video runs, not at the end of it.
        upscaler = pl_module.upscaler
        for job in trainer.datamodule.jobs:
            check_target(job, probe_source(job), upscaler.scale, audio=self.audio, codec=self.codec, crf=self.crf)

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: UpscaledVideo,
                           batch_indices: Any, batch: VideoJob, batch_idx: int, dataloader_idx: int = 0) -> None:
        report = prediction.write(codec=self.codec, crf=self.crf, audio=self.audio)
        log.info("rank %d: %s -> %s, %d frames in %.1f s", trainer.global_rank, batch.source, batch.target,
                 report.frames_out, report.seconds)


def run_predict(inputs: list[str], output: str, *, model: str | None, weights: str | None, checkpoint: str | None,
                pretrained: bool, variant: str, dtype: str, options: dict[str, Any], devices: int, accelerator: str,
                start: str | None, duration: str | None, skip_existing: bool, codec: str | None, crf: int,
                audio: bool, progress: bool) -> None:
    """`zoo upscale --devices N`: `Trainer.predict` over the inputs with DDP across `devices`."""
    module = UpscaleModule(model, weights, checkpoint, pretrained, variant, dtype, options)
    data = VideoListDataModule(inputs, output, start, duration, skip_existing)
    trainer = Trainer(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                      logger=False, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=progress, callbacks=[VideoWriter(codec, crf, audio)])
    trainer.predict(module, datamodule=data, return_predictions=False)
