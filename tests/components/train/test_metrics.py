"""Metrics: PSNR/SSIM by hand, temporal metrics on a synthetic pan with injected flicker,
aggregation over clips, and unavailable learned metrics."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.components.flow import GroundTruthFlow
from zoo.components.train.losses import LPIPS
from zoo.components.train.metrics import (
    VideoMetrics,
    dover_overall,
    flolpips,
    psnr,
    rgb_to_y,
    ssim,
    tlp,
    tof,
    warping_error,
)

FLICKER = (0.0, 0.02, 0.05)


def mean_abs_distance(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A deterministic stand-in for LPIPS: mean |x - y|, optionally spatially weighted."""
    error = (x - y).abs().mean(1, keepdim=True)
    if weight is None:
        return error.mean((1, 2, 3))
    return (error * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3))


def mse_distance(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return (x - y).square().mean((1, 2, 3))


def normal_flow(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """A small content-dependent FlowFn: the normal flow -I_t grad(I) / (|grad(I)|^2 + 0.01)."""
    gray_src, gray_dst = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    gray = F.pad((gray_src + gray_dst) / 2, (1, 1, 1, 1), mode="replicate")
    grad_x = (gray[..., 1:-1, 2:] - gray[..., 1:-1, :-2]) / 2
    grad_y = (gray[..., 2:, 1:-1] - gray[..., :-2, 1:-1]) / 2
    change = gray_dst - gray_src
    scale = -change / (grad_x.square() + grad_y.square() + 0.01)
    return torch.cat([scale * grad_x, scale * grad_y], 1)


def pan_clip(frames: int = 4, shift: int = 2, size: tuple[int, int] = (16, 24)) -> tuple[torch.Tensor, ...]:
    """A camera panning right by `shift` pixels a frame over a texture in [0.2, 0.8].

    Content moves left: pixel x of frame t is at x - shift in frame t + 1, so the forward flow is
    (-shift, 0) and warp(frame[t + 1], flow) == frame[t] wherever x - shift >= 0.
    """
    generator = torch.Generator().manual_seed(0)
    height, width = size
    texture = 0.2 + 0.6 * torch.rand(3, height, width + shift * frames, generator=generator)
    clip = torch.stack([texture[..., t * shift : t * shift + width] for t in range(frames)])
    flow_fw = torch.zeros(frames - 1, 2, height, width)
    flow_fw[:, 0] = -shift
    return clip, flow_fw, -flow_fw


def flicker(clip: torch.Tensor, amplitude: float, pattern: torch.Tensor | None = None) -> torch.Tensor:
    """Add `(-1)^t amplitude · pattern` to frame t (a global offset when `pattern` is None)."""
    signs = torch.tensor([(-1.0) ** t for t in range(len(clip))]).view(-1, 1, 1, 1)
    return clip + amplitude * signs * (1.0 if pattern is None else pattern)


# PSNR / SSIM -------------------------------------------------------------------------------------


def test_rgb_to_y_bt601_range() -> None:
    frames = torch.stack([torch.zeros(3, 1, 1), torch.ones(3, 1, 1)])
    torch.testing.assert_close(rgb_to_y(frames).flatten(), torch.tensor([16 / 255, 235 / 255]))


def test_psnr_hand_computed() -> None:
    gt = torch.full((2, 3, 16, 16), 0.6)
    pred = torch.full((2, 3, 16, 16), 0.5)
    # RGB: MSE = 0.01 -> 20 dB. Y: |dY| = 0.1 (65.481 + 128.553 + 24.966) / 255 = 21.9 / 255.
    assert psnr(pred, gt).tolist() == pytest.approx([20.0, 20.0], rel=1e-6)
    assert psnr(pred, gt, y_channel=True).tolist() == pytest.approx([20 * math.log10(255 / 21.9)] * 2, rel=1e-6)
    # A border of error 0.3 is left out by crop_border=2.
    pred_border = pred.clone()
    pred_border[..., :2, :] = 0.3
    assert psnr(pred_border, gt).mean() < 19
    assert psnr(pred_border, gt, crop_border=2).tolist() == pytest.approx([20.0, 20.0], rel=1e-6)


def test_ssim_hand_computed_on_constant_images() -> None:
    gt = torch.full((1, 3, 16, 16), 0.6)
    pred = torch.full((1, 3, 16, 16), 0.5)
    # Constant images: zero variances, SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = 0.01^2.
    c1 = 1e-4
    expected = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert ssim(pred, gt).item() == pytest.approx(expected, rel=1e-5)
    y_pred, y_gt = (16 + 219 * 0.5) / 255, (16 + 219 * 0.6) / 255
    expected_y = (2 * y_pred * y_gt + c1) / (y_pred**2 + y_gt**2 + c1)
    assert ssim(pred, gt, y_channel=True).item() == pytest.approx(expected_y, rel=1e-5)
    assert ssim(gt, gt).item() == pytest.approx(1.0)


# Temporal metrics --------------------------------------------------------------------------------


def test_warping_error_zero_for_pure_warp_and_4a2_with_flicker() -> None:
    clip, flow_fw, flow_bw = pan_clip()
    assert warping_error(clip, flow_fw, flow_bw).item() < 1e-10
    errors = [warping_error(flicker(clip, a), flow_fw, flow_bw).item() for a in FLICKER]
    # Alternating offsets +-a make consecutive frames differ by 2a on every visible pixel: (2a)^2.
    for amplitude, error in zip(FLICKER, errors):
        assert error == pytest.approx(4 * amplitude**2, rel=1e-5, abs=1e-10)
    assert errors[0] < errors[1] < errors[2]


def test_warping_error_on_sample_pan_with_ground_truth_flow() -> None:
    from zoo.components.samples import sample_clips

    clip = sample_clips(num_frames=4, size=(48, 64), names=["astronaut_pan"])[0]
    # A pure pan: the backward flow is the negated forward flow. Sub-pixel motion leaves a small
    # interpolation error, far below what flicker adds.
    errors = [warping_error(flicker(clip.frames, a), clip.flow, -clip.flow).item() for a in FLICKER]
    assert errors[0] < 1e-3
    assert errors[0] < errors[1] < errors[2]


def test_warping_error_ignores_occluded_border() -> None:
    clip, flow_fw, flow_bw = pan_clip(frames=2, shift=2)
    # Pixels x < 2 of frame 0 leave the view in frame 1: garbage there must not count...
    spoiled = clip.clone()
    spoiled[0, :, :, :2] = 1.0
    assert warping_error(spoiled, flow_fw, flow_bw).item() < 1e-10
    # ...while the same garbage on visible pixels does.
    spoiled[0, :, :, 2:4] = 1.0
    assert warping_error(spoiled, flow_fw, flow_bw).item() > 1e-3


def test_tlp_hand_computed() -> None:
    gt = torch.tensor([0.0, 0.1, 0.3]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    pred = torch.tensor([0.0, 0.2, 0.2]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    # d(gt) = [0.1, 0.2], d(pred) = [0.2, 0.0] -> mean(|0.1|, |-0.2|) = 0.15.
    assert tlp(pred, gt, mean_abs_distance).item() == pytest.approx(0.15)


def test_tlp_monotone_in_flicker() -> None:
    clip, _, _ = pan_clip()
    pattern = torch.rand(3, *clip.shape[-2:], generator=torch.Generator().manual_seed(1)) * 2 - 1
    scores = [tlp(flicker(clip, a, pattern), clip, mse_distance).item() for a in FLICKER]
    assert scores[0] == 0.0
    assert scores[0] < scores[1] < scores[2]


def test_tlp_monotone_with_random_lpips() -> None:
    torch.manual_seed(0)
    clip, _, _ = pan_clip(size=(32, 32))
    pattern = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lpips = LPIPS("alex", pretrained=False)
    scores = [tlp(flicker(clip, a, pattern), clip, lpips).item() for a in (0.0, 0.05, 0.15)]
    assert scores[0] == 0.0
    assert scores[0] < scores[1] < scores[2]


def test_tof_hand_computed() -> None:
    def channel_difference(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        return (dst - src)[:, :2]

    gt = torch.zeros(2, 3, 2, 2)
    pred = torch.zeros(2, 3, 2, 2)
    pred[1, 0] = 0.3
    pred[1, 1] = 0.4
    # Flow of pred = (0.3, 0.4) everywhere, of gt = 0: end-point difference 0.5.
    assert tof(pred, gt, channel_difference).item() == pytest.approx(0.5)


def test_tof_monotone_in_spatially_varying_flicker() -> None:
    clip, _, _ = pan_clip()
    pattern = torch.rand(3, *clip.shape[-2:], generator=torch.Generator().manual_seed(2)) * 2 - 1
    scores = [tof(flicker(clip, a, pattern), clip, normal_flow).item() for a in FLICKER]
    assert scores[0] == 0.0
    assert scores[0] < scores[1] < scores[2]


def test_flolpips_hand_computed() -> None:
    def x_difference(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        flow = torch.zeros(src.shape[0], 2, *src.shape[-2:])
        flow[:, 0] = (dst - src)[:, 0]
        return flow

    # One row of two pixels; frame 1 of pred changes only pixel 1 (flow error 0.4 there, 0 at pixel 0).
    gt = torch.zeros(2, 3, 1, 2)
    pred = torch.zeros(2, 3, 1, 2)
    pred[0, :, 0, 0] = 0.2
    pred[0, :, 0, 1] = 0.1
    pred[1, 0, 0, 1] = 0.5
    # flow(pred) x at pixel 0: 0 - 0.2 = -0.2; at pixel 1: 0.5 - 0.1 = 0.4; flow(gt) = 0.
    # Weights |.| = [0.2, 0.4]; distortion of frame 0 = [0.2, 0.1] -> (0.2·0.2 + 0.4·0.1) / 0.6.
    expected = (0.2 * 0.2 + 0.4 * 0.1) / 0.6
    assert flolpips(pred, gt, x_difference, mean_abs_distance).item() == pytest.approx(expected, rel=1e-5)
    # Identical motion: uniform weights, the plain distance mean(0.2, 0.1).
    same_motion = pred.clone()
    same_motion[1] = same_motion[0]
    gt_same = torch.zeros_like(gt)
    assert flolpips(same_motion, gt_same, x_difference, mean_abs_distance).item() == pytest.approx(0.15)


# Collection -------------------------------------------------------------------------------------


def test_video_metrics_per_clip_and_dataset_means() -> None:
    clip, flow_fw, flow_bw = pan_clip()
    flow_fn = GroundTruthFlow(clip, flow_fw, flow_bw)
    metrics = VideoMetrics(
        names=("psnr", "ssim", "lpips", "ewarp", "tlp"),
        y_channel=False,
        flow_fn=flow_fn,
        distance=mean_abs_distance,
    )
    first = metrics.update(flicker(clip, 0.1), clip, key="offset")
    second = metrics.update(flicker(clip, 0.01), clip)
    # Every frame is off by 0.1 (0.01): PSNR 20 (40) dB, mean |error| 0.1 (0.01), E_warp (2a)^2.
    assert first["psnr"] == pytest.approx(20.0, rel=1e-5) and second["psnr"] == pytest.approx(40.0, rel=1e-5)
    assert first["lpips"] == pytest.approx(0.1, rel=1e-5)
    assert first["ewarp"] == pytest.approx(0.04, rel=1e-4) and second["ewarp"] == pytest.approx(4e-4, rel=1e-3)
    assert metrics.per_clip[0]["key"] == "offset" and "key" not in metrics.per_clip[1]
    results = metrics.compute()
    assert set(results) == {"psnr", "ssim", "lpips", "ewarp", "tlp"}
    assert results["psnr"] == pytest.approx(30.0, rel=1e-5)
    assert results["ewarp"] == pytest.approx((0.04 + 4e-4) / 2, rel=1e-4)
    assert metrics.unavailable == {}
    metrics.reset()
    assert metrics.compute() == {} and metrics.per_clip == []


def test_video_metrics_without_gt_scores_ewarp_on_own_flow() -> None:
    clip, flow_fw, flow_bw = pan_clip()
    metrics = VideoMetrics(names=("ewarp",), flow_fn=GroundTruthFlow(clip, flow_fw, flow_bw))
    assert metrics.update(clip)["ewarp"] < 1e-10
    with pytest.raises(ValueError, match=r"\['psnr'\] need gt_clip"):
        VideoMetrics(names=("psnr",)).update(clip)


def test_unavailable_metrics_are_reported_with_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    clip, _, _ = pan_clip()
    names = ("psnr", "lpips", "dists", "tlp", "musiq", "clipiqa", "maniqa", "niqe", "brisque", "nrqm")
    metrics = VideoMetrics(names=names, flow_fn=lambda src, dst: torch.zeros(src.shape[0], 2, *src.shape[-2:]))
    scores = metrics.update(clip, clip)
    assert set(scores) == {"psnr"} and set(metrics.compute()) == {"psnr"}
    assert set(metrics.unavailable) == set(names) - {"psnr"}
    hub = str(tmp_path / "hub")
    assert "LPIPS_v0.1_alex-df73285e.pth" in metrics.unavailable["lpips"] and hub in metrics.unavailable["lpips"]
    assert metrics.unavailable["tlp"] == metrics.unavailable["lpips"]
    assert "DISTS_weights-f5e65c96.pth" in metrics.unavailable["dists"]
    for name, filename in [
        ("musiq", "musiq_koniq_ckpt-e95806b9.pth"),
        ("clipiqa", "RN50.pt"),
        ("maniqa", "ckpt_koniq10k.pt"),
        ("niqe", "niqe_modelparameters.mat"),
        ("brisque", "brisque_svm_weights.pth"),
        ("nrqm", "NRQM_model.mat"),
    ]:
        assert filename in metrics.unavailable[name] and hub in metrics.unavailable[name]


def test_video_metrics_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        VideoMetrics(names=("psnr", "vmaf"))


# DOVER --------------------------------------------------------------------------------------------


def test_dover_overall_fuses_the_published_statistics_by_hand() -> None:
    # x = (t - 0.1107) / 0.07355 * 0.6104 + (a + 0.08285) / 0.03774 * 0.3896, score = sigmoid(x).
    assert dover_overall(0.1107, -0.08285).item() == 0.5
    assert dover_overall(0.1107 + 0.07355, -0.08285).item() == pytest.approx(0.6480320, abs=1e-7)  # sigmoid(0.6104)
    assert dover_overall(0.1107, -0.08285 + 0.03774).item() == pytest.approx(0.5961864, abs=1e-7)  # sigmoid(0.3896)


def test_dover_is_unavailable_without_its_weights_or_its_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    clip, _, _ = pan_clip()
    metrics = VideoMetrics(names=("dover",))
    assert metrics.update(clip) == {}
    reason = metrics.unavailable["dover"]
    assert str(tmp_path / "hub" / "dover" / "DOVER.pth") in reason and "releases/download/v0.1.0/DOVER.pth" in reason
    weights = tmp_path / "DOVER.pth"
    torch.save({}, weights)
    monkeypatch.setitem(sys.modules, "dover", None)  # not installed
    metrics = VideoMetrics(names=("dover",), dover_weights=weights)
    assert metrics.update(clip) == {}
    assert "VQAssessment/DOVER" in metrics.unavailable["dover"] and "unrelated" in metrics.unavailable["dover"]


def _stand_in_dover(calls: dict) -> types.ModuleType:
    """A `dover` package with DOVER's API whose model scores a view by its mean."""

    class UnifiedFrameSampler:
        def __init__(self, fsize_t, fragments_t, frame_interval=1, num_clips=1, drop_rate=0.0):
            calls.setdefault("samplers", []).append((fsize_t, fragments_t, frame_interval, num_clips))
            self.count = fsize_t * fragments_t * num_clips

        def __call__(self, total_frames, train=False, start_index=0):
            offset = np.random.randint(0, 1000)  # DOVER draws its windows at random
            calls.setdefault("offsets", []).append(offset)
            return (np.arange(self.count) + offset) % total_frames

    def get_single_view(video, sample_type, **options):
        calls.setdefault("views", []).append((sample_type, video.dtype, tuple(video.shape)))
        return video

    class DOVER(nn.Module):
        def __init__(self, **args):
            super().__init__()
            calls["model"] = args

        def load_state_dict(self, state, strict=True):
            calls["state"] = state

        def forward(self, views):
            calls["shapes"] = {name: tuple(view.shape) for name, view in views.items()}
            return [views["technical"].mean(), views["aesthetic"].mean()]

    package = types.ModuleType("dover")
    package.datasets = types.SimpleNamespace(UnifiedFrameSampler=UnifiedFrameSampler, get_single_view=get_single_view)
    package.models = types.SimpleNamespace(DOVER=DOVER)
    return package


def test_dover_runs_the_official_views_and_fuses_their_scores(tmp_path, monkeypatch) -> None:
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "dover", _stand_in_dover(calls))
    monkeypatch.setitem(sys.modules, "dover.datasets", sys.modules["dover"].datasets)
    weights = tmp_path / "DOVER.pth"
    torch.save({"head.weight": torch.ones(2)}, weights)
    metrics = VideoMetrics(names=("dover",), dover_weights=weights)
    state = np.random.get_state()
    score = metrics.update(torch.full((5, 3, 8, 8), 0.5))["dover"]
    # 0.5 is 8-bit 128; normalised per channel: (128 - 123.675) / 58.395 = 0.0740646,
    # (128 - 116.28) / 57.12 = 0.2051821, (128 - 103.53) / 57.375 = 0.4264924; mean 0.2352463 in both views.
    assert score == pytest.approx(dover_overall(0.2352463, 0.2352463).item(), abs=1e-6)
    # DOVER's own sampler settings: the technical view takes 3 windows of 32 frames 2 apart, the aesthetic
    # one 32 windows of 1 frame; the clip is 8-bit as DOVER reads it from a video file.
    assert calls["samplers"] == [(32, 3, 2, 1), (1, 32, 2, 1)]
    assert calls["views"] == [("technical", torch.uint8, (3, 96, 8, 8)), ("aesthetic", torch.uint8, (3, 32, 8, 8))]
    assert calls["shapes"] == {"technical": (3, 3, 32, 8, 8), "aesthetic": (1, 3, 32, 8, 8)}
    assert calls["model"]["backbone"]["technical"]["type"] == "swin_tiny_grpb" and torch.equal(
        calls["state"]["head.weight"], torch.ones(2))
    # The random windows are seeded (the same score every time) and the global generators are left alone.
    assert metrics.update(torch.full((5, 3, 8, 8), 0.5))["dover"] == score
    assert calls["offsets"][:2] == calls["offsets"][2:]
    assert all(np.array_equal(a, b) for a, b in zip(state[1:3], np.random.get_state()[1:3]))
