"""Degradations: hand-computed kernels, seeded reproducibility, per-clip parameters, codecs, BI/BD."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from zoo.components.train.degradation import (
    BicubicDegradation,
    BlurDownDegradation,
    RealBasicVSRDegradation,
    RealESRGANDegradation,
    RealESRGANParams,
    _add_noise,
    anisotropic_gaussian_kernel,
    compress_video,
    generalized_gaussian_kernel,
    isotropic_gaussian_kernel,
    plateau_kernel,
    sinc_kernel,
)

# Noise off in both orders (Gaussian always, sigma 0), so only deterministic steps remain.
NOISE_FREE = RealESRGANParams(
    gaussian_noise_prob=1.0, noise_range=(0.0, 0.0), gaussian_noise_prob2=1.0, noise_range2=(0.0, 0.0)
)


def _grid3(center: float, edge_x: float, edge_y: float, corner: float) -> torch.Tensor:
    """A 3x3 kernel from its raw values (rows are y, columns x), normalised to sum 1."""
    raw = torch.tensor(
        [[corner, edge_y, corner], [edge_x, center, edge_x], [corner, edge_y, corner]], dtype=torch.float64
    )
    return (raw / raw.sum()).float()


def _smooth_clips(b: int, t: int, h: int, w: int) -> torch.Tensor:
    """Smooth, 8-bit clips: gradients that move a little from frame to frame."""
    ys = torch.linspace(0, 1, h).view(h, 1)
    xs = torch.linspace(0, 1, w).view(1, w)
    clips = torch.empty(b, t, 3, h, w)
    for i in range(b):
        for j in range(t):
            clips[i, j, 0] = 0.2 + 0.6 * xs * ys.new_ones(h, 1)
            clips[i, j, 1] = 0.5 + 0.3 * torch.sin(6 * xs + 4 * ys + 0.3 * j + i)
            clips[i, j, 2] = 0.8 - 0.5 * ys * xs.new_ones(1, w)
    return (clips.clamp(0, 1) * 255).round() / 255


# Kernels ---------------------------------------------------------------------------------------


def test_isotropic_gaussian_3x3_sigma1_matches_hand_values():
    # exp(-d²/2): d² = 0 (centre), 1 (edges), 2 (corners); sum 4.8976404.
    expected = _grid3(1.0, 0.6065306597, 0.6065306597, 0.3678794412)
    kernel = isotropic_gaussian_kernel(3, 1.0)
    torch.testing.assert_close(kernel, expected)
    assert kernel[1, 1].item() == pytest.approx(0.2041800, abs=1e-6)
    assert kernel[0, 0].item() == pytest.approx(0.0751136, abs=1e-6)


def test_anisotropic_gaussian_axes_and_rotation():
    # sigma_x = 1 along columns, sigma_y = 2 along rows: exp(-(x² + y²/4) / 2).
    expected = _grid3(1.0, math.exp(-0.5), math.exp(-0.125), math.exp(-0.625))
    torch.testing.assert_close(anisotropic_gaussian_kernel(3, 1.0, 2.0, 0.0), expected)
    # A quarter turn swaps the two axes.
    torch.testing.assert_close(anisotropic_gaussian_kernel(3, 1.0, 2.0, math.pi / 2), expected.T)


def test_generalized_gaussian_hand_values():
    # beta = 2, sigma = 1: exp(-(d²)² / 2) -> edges exp(-0.5), corners exp(-2).
    expected = _grid3(1.0, 0.6065306597, 0.6065306597, 0.1353352832)
    torch.testing.assert_close(generalized_gaussian_kernel(3, 1.0, 1.0, 0.0, 2.0), expected)
    # beta = 1 is the Gaussian.
    torch.testing.assert_close(
        generalized_gaussian_kernel(5, 1.3, 0.7, 0.4, 1.0), anisotropic_gaussian_kernel(5, 1.3, 0.7, 0.4)
    )


@pytest.mark.parametrize(("beta", "edge", "corner"), [(1.0, 1 / 2, 1 / 3), (2.0, 1 / 2, 1 / 5)])
def test_plateau_kernel_hand_values(beta, edge, corner):
    # 1 / (1 + (d²)^beta) with d² = 1 at edges and 2 at corners.
    torch.testing.assert_close(plateau_kernel(3, 1.0, 1.0, 0.0, beta), _grid3(1.0, edge, edge, corner))


def test_sinc_kernel_hand_values():
    # omega_c = pi: centre pi²/(4 pi) = pi/4; edges pi J1(pi) / (2 pi) with J1(pi) = 0.2846153432;
    # corners J1(pi sqrt 2) / (2 sqrt 2) with J1(4.4428829) = -0.2152347740.
    expected = _grid3(math.pi / 4, 0.2846153432 / 2, 0.2846153432 / 2, -0.2152347740 / (2 * math.sqrt(2)))
    torch.testing.assert_close(sinc_kernel(3, math.pi), expected)


@pytest.mark.parametrize(
    "kernel",
    [
        isotropic_gaussian_kernel(21, 3.0),
        anisotropic_gaussian_kernel(7, 0.2, 2.9, -2.0),
        generalized_gaussian_kernel(13, 1.0, 2.5, 1.0, 0.5),
        plateau_kernel(21, 2.0, 0.4, 3.0, 1.7),
        sinc_kernel(21, math.pi / 5),
        sinc_kernel(7, math.pi / 3),
    ],
)
def test_kernels_sum_to_one(kernel):
    assert kernel.dtype == torch.float32
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_kernel_size_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        sinc_kernel(8, 1.0)


# Real-ESRGAN -----------------------------------------------------------------------------------


def test_default_params_are_the_published_ones():
    # Values of Real-ESRGAN's options/train_realesrnet_x4plus.yml.
    p = RealESRGANParams()
    assert p.kernel_list == ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
    assert p.kernel_prob == p.kernel_prob2 == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert p.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert (p.blur_sigma, p.blur_sigma2) == ((0.2, 3.0), (0.2, 1.5))
    assert p.betag_range == p.betag_range2 == (0.5, 4.0)
    assert p.betap_range == p.betap_range2 == (1.0, 2.0)
    assert p.sinc_prob == p.sinc_prob2 == 0.1 and p.final_sinc_prob == 0.8
    assert (p.resize_prob, p.resize_prob2) == ((0.2, 0.7, 0.1), (0.3, 0.4, 0.3))
    assert (p.resize_range, p.resize_range2) == ((0.15, 1.5), (0.3, 1.2))
    assert p.gaussian_noise_prob == p.gaussian_noise_prob2 == 0.5
    assert (p.noise_range, p.noise_range2) == ((1.0, 30.0), (1.0, 25.0))
    assert (p.poisson_scale_range, p.poisson_scale_range2) == ((0.05, 3.0), (0.05, 2.5))
    assert p.gray_noise_prob == p.gray_noise_prob2 == 0.4
    assert p.jpeg_range == p.jpeg_range2 == (30.0, 95.0)
    assert p.second_blur_prob == 0.8


def test_sampled_params_stay_in_their_ranges():
    degradation = RealESRGANDegradation()
    p = degradation.params
    params = degradation.sample_params(60, torch.Generator().manual_seed(1))
    assert len({c.noise_seed for c in params}) == 60
    for clip in params:
        for order, resize_range, jpeg_range in (
            (clip.first, p.resize_range, p.jpeg_range),
            (clip.second, p.resize_range2, p.jpeg_range2),
        ):
            if order.kernel is not None:
                assert order.kernel.shape[0] in p.kernel_sizes
                assert order.kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
            assert resize_range[0] <= order.resize_scale <= resize_range[1]
            assert jpeg_range[0] <= order.jpeg_quality <= jpeg_range[1]
            assert order.resize_mode in ("area", "bilinear", "bicubic")
        assert clip.first.kernel is not None
    # Over 60 clips every optional step is both taken and skipped at least once.
    assert {c.second.kernel is None for c in params} == {True, False}
    assert {c.final_kernel is None for c in params} == {True, False}
    assert {c.jpeg_last for c in params} == {True, False}
    assert {c.first.noise for c in params} == {"gaussian", "poisson"}


def test_realesrgan_is_deterministic_for_a_seed_and_differs_across_seeds():
    clips = _smooth_clips(2, 2, 32, 32)
    degradation = RealESRGANDegradation()
    first = degradation(clips, torch.Generator().manual_seed(7))
    again = degradation(clips, torch.Generator().manual_seed(7))
    other = degradation(clips, torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    torch.manual_seed(3)
    global_first = degradation(clips)
    torch.manual_seed(3)
    torch.testing.assert_close(degradation(clips), global_first, rtol=0, atol=0)


def test_realesrgan_shares_parameters_across_frames_of_a_clip():
    # Three identical frames per clip: without noise, every frame must come out the same; the two
    # clips (same content) get different parameters and so different outputs.
    frame = _smooth_clips(1, 1, 32, 40)[0, 0]
    clips = frame.expand(2, 3, 3, 32, 40).clone()
    out = RealESRGANDegradation(NOISE_FREE)(clips, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 3, 8, 10)
    for clip in out:
        torch.testing.assert_close(clip[1:], clip[:1].expand_as(clip[1:]), rtol=0, atol=0)
    assert not torch.equal(out[0], out[1])


def test_realesrgan_clip_parameters_follow_the_clip():
    degradation = RealESRGANDegradation()
    clips = _smooth_clips(2, 2, 32, 32)
    params = degradation.sample_params(2, torch.Generator().manual_seed(4))
    batched = degradation.apply(clips, params)
    alone = degradation.apply(clips[1:], params[1:])
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=0)
    swapped = degradation.apply(clips[[1, 0]], params[::-1])
    torch.testing.assert_close(swapped, batched[[1, 0]], rtol=0, atol=0)


def test_realesrgan_output_is_quantised_in_range_for_odd_sizes():
    clips = _smooth_clips(1, 2, 72, 100)
    out = RealESRGANDegradation()(clips, torch.Generator().manual_seed(2))
    assert out.shape == (1, 2, 3, 18, 25)
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out * 255, (out * 255).round())
    frames = RealESRGANDegradation()(clips[:, 0], torch.Generator().manual_seed(2))
    assert frames.shape == (1, 3, 18, 25)


def test_gaussian_noise_strength_and_gray_noise():
    frames = torch.full((1, 3, 64, 64), 0.5)
    order = RealESRGANDegradation().sample_params(1, torch.Generator().manual_seed(0))[0].first
    colour = dataclasses.replace(order, noise="gaussian", noise_level=10.0, gray_noise=False)
    gray = dataclasses.replace(colour, gray_noise=True)
    noisy = _add_noise(frames, colour, torch.Generator().manual_seed(0)) - 0.5
    assert noisy.std().item() == pytest.approx(10 / 255, rel=0.1)
    assert not torch.equal(noisy[:, 0], noisy[:, 1])
    gray_noisy = _add_noise(frames, gray, torch.Generator().manual_seed(0)) - 0.5
    torch.testing.assert_close(gray_noisy[:, 0], gray_noisy[:, 2], rtol=0, atol=0)


def test_shape_errors():
    degradation = RealESRGANDegradation()
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        degradation(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 4x4"):
        degradation(torch.rand(1, 3, 3, 16))
    with pytest.raises(ValueError, match="one parameter set per clip"):
        degradation.apply(torch.rand(2, 1, 3, 16, 16), degradation.sample_params(1))


# RealBasicVSR ----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["libx264", "mpeg4", "libvpx"])
def test_codec_changes_pixels_keeps_odd_size_and_frames(codec):
    frames = _smooth_clips(1, 3, 13, 19)[0]
    out = compress_video(frames, codec, 20_000)
    assert out.shape == frames.shape
    assert not torch.equal(out, frames)
    # Lossy, not broken: smooth content survives within a few grey levels on average.
    assert (out - frames).abs().mean().item() < 0.05
    torch.testing.assert_close(compress_video(frames, codec, 20_000), out, rtol=0, atol=0)


def test_realbasicvsr_params_and_codec_as_last_step():
    degradation = RealBasicVSRDegradation(NOISE_FREE)
    params = degradation.sample_params(12, torch.Generator().manual_seed(0))
    assert {p.codec for p in params} == {"libx264", "mpeg4", "libvpx"}
    assert all(10_000 <= p.bitrate <= 100_000 for p in params)
    clips = _smooth_clips(2, 2, 32, 32)
    out = degradation.apply(clips, params[:2])
    image_only = degradation.image_degradation.apply(clips, [p.image for p in params[:2]])
    for clip, lr, p in zip(out, image_only, params[:2]):
        torch.testing.assert_close(clip, compress_video(lr, p.codec, p.bitrate), rtol=0, atol=0)
        assert not torch.equal(clip, lr)


def test_realbasicvsr_is_deterministic_for_a_seed_and_differs_across_seeds():
    clips = _smooth_clips(2, 2, 32, 36)
    degradation = RealBasicVSRDegradation()
    first = degradation(clips, torch.Generator().manual_seed(5))
    assert first.shape == (2, 2, 3, 8, 9)
    torch.testing.assert_close(degradation(clips, torch.Generator().manual_seed(5)), first, rtol=0, atol=0)
    assert not torch.equal(degradation(clips, torch.Generator().manual_seed(6)), first)


def test_realbasicvsr_rejects_unknown_codec():
    with pytest.raises(ValueError, match="codecs"):
        RealBasicVSRDegradation(codecs=("no-such-codec",))


# BI / BD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "degradation",
    [RealESRGANDegradation(), RealBasicVSRDegradation(), BicubicDegradation(), BlurDownDegradation()],
    ids=["realesrgan", "realbasicvsr", "bi", "bd"],
)
def test_odd_size_shapes(degradation):
    clips = _smooth_clips(1, 1, 72, 100)
    assert degradation(clips, torch.Generator().manual_seed(0)).shape == (1, 1, 3, 18, 25)
    assert degradation(clips[:, 0], torch.Generator().manual_seed(0)).shape == (1, 3, 18, 25)
    assert degradation.scale == 4


@pytest.mark.parametrize("degradation", [BicubicDegradation(), BlurDownDegradation()], ids=["bi", "bd"])
def test_classic_degradations_keep_a_constant_image_constant(degradation):
    level = 102 / 255
    clips = torch.full((1, 2, 3, 33, 42), level)
    out = degradation(clips)
    assert out.shape == (1, 2, 3, 8, 10)
    torch.testing.assert_close(out, torch.full_like(out, level), rtol=0, atol=0)


def test_bd_impulse_hand_check():
    # A unit impulse at HR (4, 8) lands on LR (1, 2) as the kernel centre 1 / sum exp(-d²/5.12)
    # = 1 / 16.084 = 0.06217 -> 16/255; neighbours 4 HR pixels away get 0.06217 * exp(-16/5.12)
    # = 0.00273 -> 1/255; diagonal neighbours 0.00012 -> 0.
    hr = torch.zeros(1, 1, 3, 16, 16)
    hr[..., 4, 8] = 1.0
    expected = torch.zeros(4, 4)
    expected[1, 2] = 16
    expected[0, 2] = expected[2, 2] = expected[1, 1] = expected[1, 3] = 1
    out = BlurDownDegradation()(hr, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[0, 0] * 255, expected.expand(3, 4, 4))


def test_bi_matches_antialiased_bicubic_and_ignores_the_generator():
    clips = _smooth_clips(1, 2, 32, 32)
    out = BicubicDegradation()(clips, torch.Generator().manual_seed(0))
    torch.testing.assert_close(BicubicDegradation()(clips, torch.Generator().manual_seed(1)), out, rtol=0, atol=0)
    # Block means of the smooth gradient are close to the antialiased bicubic result.
    block_mean = clips.flatten(0, 1).unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))
    assert (out.flatten(0, 1) - block_mean).abs().max().item() < 0.02


@pytest.mark.gpu
def test_realesrgan_on_cuda_is_reproducible():
    clips = _smooth_clips(2, 2, 32, 32).cuda()
    degradation = RealBasicVSRDegradation()
    first = degradation(clips, torch.Generator().manual_seed(9))
    assert first.device.type == "cuda"
    torch.testing.assert_close(degradation(clips, torch.Generator().manual_seed(9)), first, rtol=0, atol=0)
