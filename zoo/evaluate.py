"""`zoo evaluate`: the papers' quality tables, reproduced on the user's data, for one or more models.

```
zoo evaluate --model osdiffvsr stream_diffvsr --dataset data/REDS --layout reds4 --out report/
```

Each model runs through Lightning's test loop (`UpscalerEvaluation` over an `EvaluationDataModule`),
scored by `VideoMetrics`; the report folder gets `metrics.json` (per clip and overall), `metrics.csv`,
`report.md` (one table, one column per model) and PNG figures. Needs the train extra (Lightning);
the no-reference metrics need the eval extra and their weight files.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_METRICS = ("psnr", "ssim", "lpips", "dists", "ewarp", "tlp")


def evaluate(models: Sequence[str], dataset: str | os.PathLike, *, layout: str = "pairs",
             weights: Sequence[str | None] | None = None, checkpoints: Sequence[str | None] | None = None,
             random_weights: bool = False, variant: str = "full", degradation: str = "none",
             metrics: Sequence[str] = DEFAULT_METRICS, crop_border: int = 0, y_channel: bool = True,
             lr: str | None = None, max_frames: int | None = None, clip_length: int | None = None, seed: int = 0,
             device: str = "auto", out: str | os.PathLike = "evaluation", progress: bool = True) -> dict[str, Any]:
    """Evaluate `models` on one benchmark and write the report.

    Args:
        models: hub names, one column each (a name may repeat with other weights).
        dataset: the benchmark's root folder.
        layout: `zoo.components.train.evaluation.EVAL_LAYOUTS` name.
        weights: per model, an exported folder or Hub repo id (None: the registry's weights).
        checkpoints: per model, a `lightning fit` checkpoint (instead of weights).
        random_weights: random initialisation at `variant` size (smoke runs).
        variant: network size with `random_weights`.
        degradation: `none` reads the layout's LR; else the degradation that makes LR from the ground truth.
        metrics: `VideoMetrics` names.
        crop_border: pixels left out on each side for PSNR and SSIM.
        y_channel: PSNR and SSIM on BT.601 luma (the papers' protocol) instead of RGB.
        lr: the LR root, when not where the layout puts it.
        max_frames: the first `max_frames` frames of each sequence only.
        clip_length: windows of this many frames instead of whole sequences.
        seed: the degradation's seed; two runs with one seed see the same LR.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        out: the report folder.
        progress: show a progress bar over clips.

    Returns:
        `{"report": folder, "models": {label: {"overall", "per_clip", "unavailable"}}}`.
    """
    import torch
    from lightning.pytorch import Trainer

    from zoo.components.train.evaluation import EvaluationDataModule, ModelResult, UpscalerEvaluation, write_report
    from zoo.hub import load, upscaler_from_checkpoint

    weights = _per_model(weights, models, "weights")
    checkpoints = _per_model(checkpoints, models, "checkpoints")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    accelerator, index = ("cpu", None) if device == "cpu" else ("gpu", torch.device(device).index or 0)
    results, labels = [], _labels(models, weights, checkpoints)
    for name, weight, checkpoint, label in zip(models, weights, checkpoints, labels):
        if checkpoint is not None:
            upscaler = upscaler_from_checkpoint(checkpoint)
        else:
            upscaler = load(name, pretrained=not random_weights, variant=variant, weights=weight)
        data = EvaluationDataModule(str(dataset), layout=layout, degradation=degradation, lr=lr, scale=upscaler.scale,
                                    temporal_skip=upscaler.temporal_scale - 1 if upscaler.temporal_scale > 1 else None,
                                    clip_length=clip_length, max_frames=max_frames, seed=seed)
        if not data.has_ground_truth and any(m in ("psnr", "ssim", "lpips", "dists", "tlp", "tof", "flolpips")
                                             for m in metrics):
            raise ValueError(f"layout {layout!r} has no ground truth; choose no-reference metrics (musiq, clipiqa, "
                             f"maniqa, niqe, ewarp)")
        module = UpscalerEvaluation(upscaler, metrics, crop_border=crop_border, y_channel=y_channel)
        trainer = Trainer(accelerator=accelerator, devices=[index] if index is not None else 1, logger=False,
                          enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress)
        trainer.test(module, datamodule=data, verbose=False)
        results.append(ModelResult.from_evaluator(label, module.evaluator))
    description = {"dataset": str(dataset), "layout": layout, "degradation": degradation, "seed": seed,
                   "PSNR/SSIM": f"{'Y (BT.601)' if y_channel else 'RGB'}, border crop {crop_border}"}
    folder = write_report(out, results, list(metrics), description)
    return {"report": str(folder), "models": {r.label: {"overall": r.overall, "per_clip": r.per_clip,
                                                         "unavailable": r.unavailable} for r in results}}


def _per_model(values: Sequence[str | None] | None, models: Sequence[str], what: str) -> list[str | None]:
    if values is None:
        return [None] * len(models)
    if len(values) != len(models):
        raise ValueError(f"give one --{what} per --model: {len(values)} for {len(models)} models")
    return list(values)


def _labels(models: Sequence[str], weights: Sequence[str | None], checkpoints: Sequence[str | None]) -> list[str]:
    """Column names: the hub name, with the weights' name where a hub name repeats."""
    labels = []
    for name, weight, checkpoint in zip(models, weights, checkpoints):
        source = checkpoint or weight
        labels.append(f"{name} ({Path(source).name})" if models.count(name) > 1 and source else name)
    if len(set(labels)) != len(labels):
        raise ValueError(f"two columns would share a name ({', '.join(labels)}): give a repeated model other weights")
    return labels


def add_parser(commands: argparse._SubParsersAction, names: Sequence[str]) -> None:
    """Register `zoo evaluate` on the `zoo` command's subparsers."""
    from zoo.components.benchmarks import EVAL_LAYOUTS

    p = commands.add_parser("evaluate", help="score models on a benchmark: the papers' tables on your data",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, choices=names, metavar="NAME", help="hub names (columns)")
    p.add_argument("--weights", nargs="+", help="per model: exported folder or Hub repo id")
    p.add_argument("--checkpoint", nargs="+", help="per model: a `lightning fit` checkpoint")
    p.add_argument("--random-weights", action="store_true", help="random init (smoke runs)")
    p.add_argument("--variant", default="full", choices=("full", "tiny"), help="network size with --random-weights")
    p.add_argument("--dataset", required=True, help="the benchmark's root folder")
    p.add_argument("--layout", default="pairs", choices=list(EVAL_LAYOUTS),
                   help="; ".join(f"{k}: {v.about}" for k, v in EVAL_LAYOUTS.items()))
    p.add_argument("--lr", help="LR root, when not where the layout puts it")
    p.add_argument("--degradation", default="none", choices=("none", "realbasicvsr", "realesrgan", "bi", "bd"),
                   help="make LR from the ground truth (bi: bicubic, bd: blur + downsample)")
    p.add_argument("--seed", type=int, default=0, help="degradation seed (same seed, same LR)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated VideoMetrics names")
    p.add_argument("--crop-border", type=int, default=0, help="pixels left out on each side for PSNR/SSIM")
    p.add_argument("--rgb", action="store_true", help="PSNR/SSIM on RGB instead of the Y channel")
    p.add_argument("--max-frames", type=int, help="first N frames of each sequence only")
    p.add_argument("--clip-length", type=int, help="windows of N frames instead of whole sequences")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run)


DEGRADATION_NAMES = {"bi": "bicubic", "bd": "blurdown"}


def _run(ns: argparse.Namespace) -> None:
    from zoo.components.train.metrics import METRIC_NAMES

    metrics = [m.strip() for m in ns.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)}")
    result = evaluate(ns.model, ns.dataset, layout=ns.layout, weights=ns.weights, checkpoints=ns.checkpoint,
                      random_weights=ns.random_weights, variant=ns.variant,
                      degradation=DEGRADATION_NAMES.get(ns.degradation, ns.degradation), metrics=metrics,
                      crop_border=ns.crop_border, y_channel=not ns.rgb, lr=ns.lr, max_frames=ns.max_frames,
                      clip_length=ns.clip_length, seed=ns.seed, device=ns.device, out=ns.out, progress=not ns.quiet)
    print(Path(result["report"]) / "report.md")
