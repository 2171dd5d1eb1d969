"""Video quality metrics: image metrics per frame, temporal metrics per clip, dataset aggregation.

Clips are `(T, 3, H, W)` in `[0, 1]`; `pred` is the restored clip, `gt` the ground truth.

Image metrics
    PSNR and SSIM (torchmetrics; RGB or the BT.601 luma used in the SR literature, with an
    optional crop border), LPIPS and DISTS (`zoo.components.train.losses`), and the no-reference MUSIQ,
    CLIP-IQA, MANIQA, NIQE, BRISQUE and NRQM through pyiqa. Each is computed per frame and averaged
    over the frames of a clip.

Temporal metrics (one value per clip)
    `warping_error` (E*_warp, Lai et al., ECCV 2018), `tlp` and `tof` (Chu et al., TecoGAN, ACM
    TOG 2020) and `flolpips` (Danier et al., PCS 2022). They take a `FlowFn` and a perceptual
    distance, so any flow source (RAFT, ground truth) and any distance plug in.

Video quality (one value per clip, no reference)
    `dover`: DOVER (Wu et al., ICCV 2023), the fused overall score in [0, 1] that video SR papers
    report. pyiqa has no DOVER; it runs through the official `dover` package of VQAssessment/DOVER
    and its published weights, which their S-Lab License limits to non-commercial use, so the zoo
    ships neither: the user installs them, else the metric is unavailable.

Flow convention (`zoo.components.flow`): `flow_fn(src, dst)` is the flow from `src` to `dst`, and
`warp(frames[t + 1], flow_fn(frames[t], frames[t + 1])) ≈ frames[t]`.

Weights of the learned metrics are never downloaded silently into a wrong state: a metric whose
weights are missing is left out of the results and listed in `VideoMetrics.unavailable` with the
reason.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from zoo.components.flow import FlowEstimator, FlowFn, consecutive_flows, valid_mask, warp
from zoo.components.train.losses import DISTS, LPIPS


class PerceptualDistance(Protocol):
    """`distance(x, y, weight=None) -> (N,)` between image batches `(N, 3, H, W)` in `[0, 1]`.

    `weight`, a non-negative `(N, 1, H, W)` map, turns the spatial mean into a weighted mean
    (`LPIPS` implements it; FloLPIPS needs it).
    """

    def __call__(self, x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor: ...


FULL_REFERENCE = ("psnr", "ssim", "lpips", "dists")
NO_REFERENCE = ("musiq", "clipiqa", "maniqa", "niqe", "brisque", "nrqm")
TEMPORAL = ("ewarp", "tlp", "tof", "flolpips")
VIDEO = ("dover",)
METRIC_NAMES = FULL_REFERENCE + NO_REFERENCE + TEMPORAL + VIDEO

# Files each pyiqa metric reads, relative to torch.hub.get_dir() (pyiqa 0.1.x names). MANIQA also
# needs timm's `vit_base_patch8_224` from the Hugging Face cache.
PYIQA_FILES = {
    "musiq": "pyiqa/musiq_koniq_ckpt-e95806b9.pth",
    "clipiqa": "clip/RN50.pt",
    "maniqa": "pyiqa/ckpt_koniq10k.pt",
    "niqe": "pyiqa/niqe_modelparameters.mat",
    "brisque": "pyiqa/brisque_svm_weights.pth",
    "nrqm": "pyiqa/NRQM_model.mat",
}


# The lazily built tools each metric needs; a missing tool makes the metric unavailable.
_REQUIREMENTS = {
    "lpips": ("distance",),
    "dists": ("dists",),
    "ewarp": ("flow",),
    "tlp": ("distance",),
    "tof": ("flow",),
    "flolpips": ("flow", "distance"),
    **{name: (name,) for name in NO_REFERENCE + VIDEO},
}


def _check_clip(clip: Tensor, name: str) -> None:
    if clip.ndim != 4 or clip.shape[1] != 3:
        raise ValueError(f"{name} must be (T, 3, H, W) in [0, 1], got {tuple(clip.shape)}")


def _check_pair(pred: Tensor, gt: Tensor) -> None:
    _check_clip(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"pred and gt must have one shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")


# Image metrics ----------------------------------------------------------------------------------


def rgb_to_y(frames: Tensor) -> Tensor:
    """BT.601 luma as in the SR literature (MATLAB `rgb2ycbcr`), rescaled to `[0, 1]`.

    `Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255` for `R, G, B` in `[0, 1]`, so `Y` spans
    `[16/255, 235/255]`: PSNR on it equals PSNR on 8-bit Y with peak 255.

    Args:
        frames: `(..., 3, H, W)`.

    Returns:
        `(..., 1, H, W)`.
    """
    coefficients = frames.new_tensor([65.481, 128.553, 24.966]).view(3, 1, 1)
    return (16 + (frames * coefficients).sum(-3, keepdim=True)) / 255


def _prepare(frames: Tensor, crop_border: int, y_channel: bool) -> Tensor:
    if crop_border:
        frames = frames[..., crop_border:-crop_border, crop_border:-crop_border]
    # float64: SSIM's variances are E[x^2] - mu^2, whose float32 cancellation moves SSIM by ~1e-4.
    frames = frames.double()
    return rgb_to_y(frames) if y_channel else frames


def psnr(pred: Tensor, gt: Tensor, crop_border: int = 0, y_channel: bool = False) -> Tensor:
    """PSNR per frame, `10 log10(1 / MSE)` with peak 1.

    Args:
        pred: `(T, 3, H, W)` in `[0, 1]`.
        gt: `(T, 3, H, W)` in `[0, 1]`.
        crop_border: pixels left out on each side (the SR scale, by convention).
        y_channel: on BT.601 luma (`rgb_to_y`) instead of RGB.

    Returns:
        `(T,)` float64; `inf` for identical frames.
    """
    _check_pair(pred, gt)
    pred, gt = _prepare(pred, crop_border, y_channel), _prepare(gt, crop_border, y_channel)
    return peak_signal_noise_ratio(pred, gt, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(pred: Tensor, gt: Tensor, crop_border: int = 0, y_channel: bool = False) -> Tensor:
    """SSIM per frame (Wang et al., 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.

    The SSIM map covers the positions where the window fits (torchmetrics crops the padded
    border), averaged over space and channels.

    Args:
        pred: `(T, 3, H, W)` in `[0, 1]`.
        gt: `(T, 3, H, W)` in `[0, 1]`.
        crop_border: pixels left out on each side.
        y_channel: on BT.601 luma (`rgb_to_y`) instead of RGB.

    Returns:
        `(T,)` float64.
    """
    _check_pair(pred, gt)
    pred, gt = _prepare(pred, crop_border, y_channel), _prepare(gt, crop_border, y_channel)
    return structural_similarity_index_measure(pred, gt, data_range=1.0, reduction="none")


# Temporal metrics -------------------------------------------------------------------------------


def warping_error(frames: Tensor, flow_fw: Tensor, flow_bw: Tensor) -> Tensor:
    """Flow warping error E*_warp of one clip (Lai et al., ECCV 2018, Eq. (8)).

        E_warp = 1 / (T - 1) · sum_t  sum_p M_t(p) ||O_t(p) - Ô_{t+1}(p)||² / (C · sum_p M_t(p))

    with `Ô_{t+1} = warp(O_{t+1}, f_t)` and `M_t` the non-occlusion mask of the forward-backward
    check (`flow.valid_mask`). As in Lai et al.'s evaluation code, the squared error is averaged
    over the channels of the visible pixels. Papers usually report it x 10^3.

    Args:
        frames: `O`, `(T, 3, H, W)` in `[0, 1]`.
        flow_fw: `f_t`, `(T - 1, 2, H, W)` from frame t to t + 1, usually of the ground truth.
        flow_bw: `(T - 1, 2, H, W)` from frame t + 1 to t (for the occlusion mask).

    Returns:
        Scalar; 0 for a clip whose frames are exact warps of each other under `flow_fw`.
    """
    _check_clip(frames, "frames")
    expected = (frames.shape[0] - 1, 2, *frames.shape[-2:])
    if tuple(flow_fw.shape) != expected or tuple(flow_bw.shape) != expected:
        raise ValueError(f"flows must be {expected} for frames {tuple(frames.shape)}, got {tuple(flow_fw.shape)}")
    mask = valid_mask(flow_fw, flow_bw)
    warped = warp(frames[1:], flow_fw.to(frames.dtype))
    # Eq. (8), Lai et al. 2018
    squared = (frames[:-1] - warped).square() * mask
    per_pair = squared.sum((1, 2, 3)) / (frames.shape[1] * mask.sum((1, 2, 3))).clamp_min(1e-8)
    return per_pair.mean()


def _pair_distances(distance: PerceptualDistance, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return torch.cat([distance(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def tlp(pred: Tensor, gt: Tensor, distance: PerceptualDistance, batch_size: int = 8) -> Tensor:
    """tLP (Chu et al., TecoGAN 2020): `mean_t |d(O_t, O_{t+1}) - d(G_t, G_{t+1})|`.

    Perceptual change between consecutive output frames against that of the ground truth, with
    `d` = LPIPS in the paper (reported x 100).

    Args:
        pred: `O`, `(T, 3, H, W)`.
        gt: `G`, `(T, 3, H, W)`.
        distance: `d`, a `PerceptualDistance`.
        batch_size: frame pairs per call of `distance`.
    """
    _check_pair(pred, gt)
    pred_change = _pair_distances(distance, pred[:-1], pred[1:], batch_size)
    gt_change = _pair_distances(distance, gt[:-1], gt[1:], batch_size)
    return (pred_change - gt_change).abs().mean()


def tof(pred: Tensor, gt: Tensor, flow_fn: FlowFn, batch_size: int = 8) -> Tensor:
    """tOF (Chu et al., TecoGAN 2020): `mean_{t,p} ||f^O_t(p) - f^G_t(p)||_2`.

    The end-point difference between the flow of consecutive output frames and that of the ground
    truth, `f_t = flow_fn(frame_t, frame_{t+1})`, averaged over pixels and frame pairs.

    Args:
        pred: `O`, `(T, 3, H, W)`.
        gt: `G`, `(T, 3, H, W)`.
        flow_fn: any `FlowFn`.
        batch_size: frame pairs per call of `flow_fn`.
    """
    _check_pair(pred, gt)
    pred_flow = consecutive_flows(flow_fn, pred, batch_size=batch_size)
    gt_flow = consecutive_flows(flow_fn, gt, batch_size=batch_size)
    return (pred_flow - gt_flow).norm(dim=1).mean()


def flolpips(pred: Tensor, gt: Tensor, flow_fn: FlowFn, distance: PerceptualDistance, batch_size: int = 8) -> Tensor:
    """FloLPIPS (Danier, Zhang & Bull, PCS 2022): LPIPS weighted by the flow error.

        FloLPIPS = mean_{t < T-1} d_{W_t}(O_t, G_t),   W_t(p) = ||f^O_t(p) - f^G_t(p)||_2

    where `f_t = flow_fn(frame_t, frame_{t+1})` and `d_W` is the perceptual distance whose spatial
    mean (per LPIPS layer) is replaced by the mean weighted by `W_t`: distortions count where the
    output's motion departs from the ground truth's. Where the flows agree everywhere (`W_t = 0`)
    the weights are taken uniform, i.e. the plain distance.

    Args:
        pred: `O`, `(T, 3, H, W)`.
        gt: `G`, `(T, 3, H, W)`.
        flow_fn: any `FlowFn`.
        distance: a `PerceptualDistance` accepting `weight` (e.g. `LPIPS`).
        batch_size: frame pairs per call of `flow_fn` / `distance`.
    """
    _check_pair(pred, gt)
    flow_error = (
        consecutive_flows(flow_fn, pred, batch_size=batch_size) - consecutive_flows(flow_fn, gt, batch_size=batch_size)
    ).norm(dim=1, keepdim=True)
    agree = flow_error.sum((1, 2, 3)) == 0
    weight = torch.where(agree[:, None, None, None], torch.ones_like(flow_error), flow_error)
    # Frame t is scored where its flow to t + 1 exists: t < T - 1.
    pred, gt = pred[:-1], gt[:-1]
    scores = [
        distance(pred[i : i + batch_size], gt[i : i + batch_size], weight=weight[i : i + batch_size])
        for i in range(0, len(weight), batch_size)
    ]
    return torch.cat(scores).mean()


# Video quality ----------------------------------------------------------------------------------

# DOVER's published evaluation settings (VQAssessment/DOVER: dover.yml, its "val-l1080p" sample types
# and "model" block, as evaluate_one_video.py uses them) and its weights file (release v0.1.0).
DOVER_FILE = "dover/DOVER.pth"
DOVER_URL = "https://github.com/QualityAssessment/DOVER/releases/download/v0.1.0/DOVER.pth"
DOVER_SAMPLE_TYPES = {
    "technical": {"fragments_h": 7, "fragments_w": 7, "fsize_h": 32, "fsize_w": 32, "aligned": 32,
                  "clip_len": 32, "frame_interval": 2, "num_clips": 3},
    "aesthetic": {"size_h": 224, "size_w": 224, "clip_len": 32, "frame_interval": 2, "t_frag": 32, "num_clips": 1},
}
DOVER_MODEL = {
    "backbone": {"technical": {"type": "swin_tiny_grpb", "checkpoint": True, "pretrained": None},
                 "aesthetic": {"type": "conv_tiny"}},
    "backbone_preserve_keys": "technical,aesthetic",
    "divide_head": True,
    "vqa_head": {"in_channels": 768, "hidden_channels": 64},
}
# DOVER normalises 8-bit frames with the ImageNet statistics on the 0-255 scale.
DOVER_MEAN = (123.675, 116.28, 103.53)
DOVER_STD = (58.395, 57.12, 57.375)


def dover_overall(technical: Tensor | float, aesthetic: Tensor | float) -> Tensor:
    """DOVER's overall score in [0, 1] from its technical and aesthetic raw scores.

    `sigmoid( (t - 0.1107) / 0.07355 * 0.6104 + (a + 0.08285) / 0.03774 * 0.3896 )`: each raw score
    standardised by DOVER's published statistics and the two fused with its published weights
    (`fuse_results` of DOVER's evaluate_one_video.py, the `-f` score that video SR papers report).

    Args:
        technical: `t`, the technical branch's mean score.
        aesthetic: `a`, the aesthetic branch's mean score.
    """
    t, a = torch.as_tensor(technical, dtype=torch.float64), torch.as_tensor(aesthetic, dtype=torch.float64)
    return torch.sigmoid((t - 0.1107) / 0.07355 * 0.6104 + (a + 0.08285) / 0.03774 * 0.3896)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators inside the block, restoring them after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class DOVERScore:
    """DOVER's overall score of a clip, through the official `dover` package and weights.

    The clip is quantised to 8 bits (what DOVER reads from a video file) and cut into DOVER's two
    views by DOVER's own samplers (`UnifiedFrameSampler`, `get_single_view`); their random frame
    offsets and fragment positions are drawn under `seed`, so a clip always gets the same score.
    Clips shorter than DOVER's 32-frame windows are looped by its sampler (indices modulo length).

    Args:
        weights: DOVER.pth.
        device: where DOVER runs.
        seed: seed of DOVER's random view sampling.

    Raises:
        ImportError: the `dover` package (VQAssessment/DOVER, installed from its repository; PyPI's
            `dover` is an unrelated project) is missing.
        OSError: DOVER's constructor could not fetch the ImageNet ConvNeXt-T weights it starts its
            aesthetic branch from (they are then overwritten by DOVER.pth); they must be in the torch
            hub cache offline.
    """

    def __init__(self, weights: Path, device: torch.device, seed: int = 0) -> None:
        try:
            import dover
            from dover.datasets import UnifiedFrameSampler, get_single_view
        except ImportError as err:
            raise ImportError(
                "DOVER needs the `dover` package of github.com/VQAssessment/DOVER (S-Lab License 1.0, "
                "non-commercial use only), installed from that repository with `pip install -e .`; the PyPI "
                f"package called `dover` is an unrelated project ({err})"
            ) from None
        self.sampler, self.view, self.seed, self.device = UnifiedFrameSampler, get_single_view, seed, device
        self.model = dover.models.DOVER(**DOVER_MODEL)
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval().to(device)

    def views(self, clip: Tensor) -> dict[str, Tensor]:
        """DOVER's normalised views `(num_clips, 3, frames, H, W)` of a clip `(T, 3, H, W)` in [0, 1]."""
        video = (clip.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 0, 2, 3).cpu()  # (3, T, H, W)
        mean = torch.tensor(DOVER_MEAN).view(3, 1, 1, 1)
        std = torch.tensor(DOVER_STD).view(3, 1, 1, 1)
        views = {}
        with _seeded(self.seed):
            for name, options in DOVER_SAMPLE_TYPES.items():
                if "t_frag" in options:  # the aesthetic view: t_frag windows of clip_len / t_frag frames
                    sampler = self.sampler(options["clip_len"] // options["t_frag"], options["t_frag"],
                                           options["frame_interval"], options["num_clips"])
                else:  # the technical view: num_clips windows of clip_len frames
                    sampler = self.sampler(options["clip_len"], options["num_clips"], options["frame_interval"])
                indices = torch.from_numpy(sampler(video.shape[1]).astype(np.int64))
                view = (self.view(video[:, indices], name, **options) - mean) / std
                views[name] = view.unflatten(1, (options["num_clips"], -1)).transpose(0, 1).to(self.device)
        return views

    @torch.no_grad()
    def __call__(self, clip: Tensor) -> Tensor:
        technical, aesthetic = (score.mean() for score in self.model(self.views(clip)))
        return dover_overall(technical, aesthetic)


# Collection -------------------------------------------------------------------------------------


class VideoMetrics(nn.Module):
    """Per-clip and dataset-level video metrics, with learned metrics created lazily.

    `update(pred, gt)` scores one clip: image metrics are averaged over its frames, temporal
    metrics give one value per clip; the record goes to `per_clip`. `compute()` returns the mean
    over clips of each metric (every clip weighs the same, whatever its length), aggregated with
    torchmetrics `MeanMetric`s so it syncs across processes.

    Learned metrics are built at the first `update`, on the clip's device. A metric whose weights
    are missing is left out of every result and `unavailable[name]` says why; it never scores 0.

    Args:
        names: metrics to compute, from `METRIC_NAMES`: `psnr`, `ssim`, `lpips`, `dists` (need
            `gt`), `musiq`, `clipiqa`, `maniqa`, `niqe`, `brisque`, `nrqm` (no reference),
            `ewarp` (on `pred`, flow of `gt` when given, else of `pred`), `tlp`, `tof`,
            `flolpips` (need `gt`), `dover` (no reference; see `DOVERScore`).
        crop_border: pixels left out on each side for PSNR / SSIM.
        y_channel: PSNR / SSIM on BT.601 luma (`rgb_to_y`) instead of RGB.
        lpips_net: backbone of the default LPIPS (`"alex"`, the metric's usual choice).
        flow_fn: flow source of the temporal metrics; `None` builds a pretrained RAFT-large.
        distance: perceptual distance of `lpips`, `tlp` and `flolpips`; `None` builds pretrained
            LPIPS (`lpips_net`).
        batch_size: frames per call of the learned networks.
        dover_weights: DOVER.pth; `torch.hub.get_dir()/dover/DOVER.pth` when None.
        dover_seed: seed of DOVER's random view sampling.
    """

    def __init__(
        self,
        names: Sequence[str] = ("psnr", "ssim", "lpips"),
        crop_border: int = 0,
        y_channel: bool = True,
        lpips_net: str = "alex",
        flow_fn: FlowFn | None = None,
        distance: PerceptualDistance | None = None,
        batch_size: int = 8,
        dover_weights: str | Path | None = None,
        dover_seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = sorted(set(names) - set(METRIC_NAMES))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; available: {list(METRIC_NAMES)}")
        if crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {crop_border}")
        self.names = tuple(dict.fromkeys(names))
        self.crop_border = crop_border
        self.y_channel = y_channel
        self.lpips_net = lpips_net
        self.batch_size = batch_size
        self.dover_weights = None if dover_weights is None else Path(dover_weights)
        self.dover_seed = dover_seed
        self.means = nn.ModuleDict({name: MeanMetric() for name in self.names})
        self.unavailable: dict[str, str] = {}
        self._tool_errors: dict[str, str] = {}
        self.per_clip: list[dict[str, float | str]] = []
        # Built lazily and kept out of the state dict: they are evaluation tools, not state.
        self._tools: dict[str, Callable | None] = {"flow": flow_fn, "distance": distance}

    # Lazy construction --------------------------------------------------------------------------

    def _tool(self, key: str, device: torch.device) -> Callable | None:
        """The flow estimator, the distance or a learned metric; `None` (with a reason) if its weights are missing."""
        if key in self._tools and self._tools[key] is not None:
            return self._tools[key]
        if key in self._tool_errors:
            return None
        try:
            tool = self._build(key, device)
        except (FileNotFoundError, RuntimeError, OSError, ImportError) as err:
            # Missing or undownloadable weights: FileNotFoundError from our loaders, RuntimeError
            # from FlowEstimator, OSError (URLError, Hub cache misses) from pyiqa / timm / CLIP;
            # ImportError: DOVER's package, which the user installs.
            self._tool_errors[key] = str(err)
            return None
        self._tools[key] = tool
        return tool

    def _build(self, key: str, device: torch.device) -> Callable:
        if key == "flow":
            return FlowEstimator().to(device)
        if key == "distance":
            return LPIPS(self.lpips_net).to(device)
        if key == "dists":
            return DISTS().to(device)
        hub_dir = Path(torch.hub.get_dir())
        if key == "dover":
            weights = self.dover_weights or hub_dir / DOVER_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"dover weights not found at {weights}; download {DOVER_URL} (S-Lab License "
                                        "1.0, non-commercial use only) there or pass dover_weights")
            return DOVERScore(weights, device, self.dover_seed)
        weights = hub_dir / PYIQA_FILES[key]
        if not weights.is_file():
            raise FileNotFoundError(
                f"{key} weights {weights.name} not found at {weights} (pyiqa's cache under torch.hub.get_dir(); "
                "copy the file there or set TORCH_HOME)"
            )
        # pyiqa takes seconds to import: only when a no-reference metric is actually built.
        import pyiqa

        options = {} if key == "clipiqa" else {"pretrained_model_path": str(weights)}
        return pyiqa.create_metric(key, device=device, **options)

    # Scoring ---------------------------------------------------------------------------------

    @torch.no_grad()
    def score_clip(self, pred: Tensor, gt: Tensor | None = None) -> dict[str, float]:
        """All available metrics of one clip, without recording it.

        Args:
            pred: `(T, 3, H, W)` in `[0, 1]`.
            gt: `(T, 3, H, W)` in `[0, 1]`; required by the full-reference and temporal metrics
                other than `ewarp`.
        """
        _check_clip(pred, "pred")
        needs_gt = [name for name in self.names if name in FULL_REFERENCE or name in ("tlp", "tof", "flolpips")]
        if gt is None and needs_gt:
            raise ValueError(f"metrics {needs_gt} need gt_clip")
        if gt is not None:
            _check_pair(pred, gt)
        if pred.shape[0] < 2 and any(name in TEMPORAL for name in self.names):
            raise ValueError(f"temporal metrics need at least 2 frames, got {pred.shape[0]}")
        scores: dict[str, float] = {}
        for name in self.names:
            required = _REQUIREMENTS.get(name, ())
            tools = [self._tool(key, pred.device) for key in required]
            missing = [key for key, tool in zip(required, tools) if tool is None]
            if missing:
                self.unavailable[name] = self._tool_errors[missing[0]]
                continue
            scores[name] = float(self._score(name, pred, gt, *tools))
        return scores

    def _score(self, name: str, pred: Tensor, gt: Tensor | None, *tools: Callable) -> Tensor:
        batch = self.batch_size
        if name == "psnr":
            return psnr(pred, gt, self.crop_border, self.y_channel).mean()
        if name == "ssim":
            return ssim(pred, gt, self.crop_border, self.y_channel).mean()
        if name in ("lpips", "dists"):
            return _pair_distances(tools[0], pred, gt, batch).mean()
        if name in VIDEO:
            return tools[0](pred)
        if name in NO_REFERENCE:
            return torch.cat([tools[0](pred[i : i + batch]).flatten() for i in range(0, len(pred), batch)]).mean()
        if name == "ewarp":
            reference = pred if gt is None else gt
            flow_fw = consecutive_flows(tools[0], reference, batch_size=batch)
            flow_bw = consecutive_flows(tools[0], reference, backward=True, batch_size=batch)
            return warping_error(pred, flow_fw, flow_bw)
        if name == "tlp":
            return tlp(pred, gt, tools[0], batch)
        if name == "tof":
            return tof(pred, gt, tools[0], batch)
        return flolpips(pred, gt, tools[0], tools[1], batch)

    def update(self, pred_clip: Tensor, gt_clip: Tensor | None = None, key: str | None = None) -> dict[str, float]:
        """Score one clip, record it in `per_clip` and add it to the dataset means.

        Args:
            pred_clip: `(T, 3, H, W)` in `[0, 1]`.
            gt_clip: `(T, 3, H, W)` in `[0, 1]`, or `None` for no-reference metrics only.
            key: a name stored with the record.

        Returns:
            The clip's scores.
        """
        scores = self.score_clip(pred_clip, gt_clip)
        for name, value in scores.items():
            self.means[name].update(torch.tensor(value, dtype=torch.float64))
        record: dict[str, float | str] = dict(scores)
        if key is not None:
            record["key"] = key
        self.per_clip.append(record)
        return scores

    def compute(self) -> dict[str, float]:
        """Mean over the clips seen so far of each available metric."""
        return {
            name: float(self.means[name].compute())
            for name in self.names
            if name not in self.unavailable and self.means[name].update_count > 0
        }

    def reset(self) -> None:
        """Forget the clips seen so far (learned metrics and `unavailable` are kept)."""
        for mean in self.means.values():
            mean.reset()
        self.per_clip = []
