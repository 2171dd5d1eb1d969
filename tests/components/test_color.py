from __future__ import annotations

import math

import pytest
import torch

from zoo.components.color import (
    adain_color_fix,
    box_low_pass,
    fft_high_pass,
    fft_low_pass,
    gaussian_low_pass,
    high_pass,
    low_pass,
    rgb_to_yuv,
    wavelet_color_fix,
    wavelet_decomposition,
    yuv_to_rgb,
)


def solid(r: float, g: float, b: float) -> torch.Tensor:
    return torch.tensor([r, g, b], dtype=torch.float32).reshape(3, 1, 1).expand(3, 2, 2)


# YUV -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("standard", "kr", "kb"), [("bt601", 0.299, 0.114), ("bt709", 0.2126, 0.0722)])
def test_yuv_of_pure_colours_by_hand(standard: str, kr: float, kb: float) -> None:
    red = rgb_to_yuv(solid(1, 0, 0), standard)[:, 0, 0]
    # Y = Kr, U = 0.436 (0 - Kr) / (1 - Kb), V = 0.615 (1 - Kr) / (1 - Kr) = 0.615.
    assert torch.allclose(red, torch.tensor([kr, -0.436 * kr / (1 - kb), 0.615]), atol=1e-6)
    blue = rgb_to_yuv(solid(0, 0, 1), standard)[:, 0, 0]
    assert torch.allclose(blue, torch.tensor([kb, 0.436, -0.615 * kb / (1 - kr)]), atol=1e-6)
    white = rgb_to_yuv(solid(1, 1, 1), standard)[:, 0, 0]
    assert torch.allclose(white, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_bt709_matches_the_published_coefficients() -> None:
    # U = -0.09991 R - 0.33609 G + 0.436 B, V = 0.615 R - 0.55861 G - 0.05639 B.
    eye = torch.eye(3).reshape(3, 3, 1, 1)  # rows: pure R, G, B
    yuv = rgb_to_yuv(eye, "bt709")[..., 0, 0].T
    expected = torch.tensor([[0.2126, 0.7152, 0.0722], [-0.09991, -0.33609, 0.436], [0.615, -0.55861, -0.05639]])
    assert torch.allclose(yuv, expected, atol=1e-5)


@pytest.mark.parametrize("standard", ["bt601", "bt709"])
def test_yuv_round_trip(standard: str) -> None:
    torch.manual_seed(0)
    rgb = torch.rand(2, 4, 3, 5, 6)
    assert torch.allclose(yuv_to_rgb(rgb_to_yuv(rgb, standard), standard), rgb, atol=1e-6, rtol=0)


def test_bt601_agrees_with_kornia() -> None:
    kornia = pytest.importorskip("kornia")
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 5, 6)
    # kornia rounds the matrix to three decimals.
    assert torch.allclose(rgb_to_yuv(rgb), kornia.color.rgb_to_yuv(rgb), atol=2e-3)


def test_yuv_rejects_wrong_shapes_and_standards() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        rgb_to_yuv(torch.zeros(4, 5, 6))
    with pytest.raises(ValueError, match="standard"):
        rgb_to_yuv(torch.zeros(3, 5, 6), "bt2020")
    with pytest.raises(ValueError, match="floats"):
        rgb_to_yuv(torch.zeros(3, 5, 6, dtype=torch.uint8))


# filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"), [("gaussian", {"sigma": 1.5}), ("box", {"kernel_size": 5}), ("fft", {"cutoff": 0.1})]
)
def test_high_plus_low_is_the_identity(kind: str, params: dict) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 17, 23)
    assert torch.allclose(high_pass(x, kind, **params) + low_pass(x, kind, **params), x, atol=1e-6)
    assert low_pass(x, kind, **params).shape == x.shape


@pytest.mark.parametrize(
    ("kind", "params"), [("gaussian", {"sigma": 2.0}), ("box", {"kernel_size": 3}), ("fft", {"cutoff": 0.0})]
)
def test_low_pass_keeps_flat_images(kind: str, params: dict) -> None:
    x = torch.full((1, 3, 9, 10), 0.7)
    assert torch.allclose(low_pass(x, kind, **params), x, atol=1e-6)
    assert high_pass(x, kind, **params).abs().max() < 1e-6


def test_box_low_pass_by_hand() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 9.0
    out = box_low_pass(x, 3)
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 1.0
    assert torch.allclose(out[0, 0], expected)


def test_gaussian_low_pass_by_hand() -> None:
    x = torch.zeros(1, 1, 1, 7)
    x[..., 3] = 1.0
    out = gaussian_low_pass(x, sigma=1.0, kernel_size=3)
    # Separable taps exp(-1/2), 1, exp(-1/2) normalised; the single row sees the centre row tap
    # of the vertical kernel three times through replicate padding, which sums to 1.
    side = math.exp(-0.5) / (1 + 2 * math.exp(-0.5))
    assert torch.allclose(out[0, 0, 0, 2:5], torch.tensor([side, 1 - 2 * side, side]))


def test_fft_filters_split_a_sinusoid_by_its_frequency() -> None:
    # cos(2 pi 0.25 x) sits exactly on a frequency bin of a 16-pixel axis, at |f| = 0.25.
    x = torch.cos(2 * math.pi * 0.25 * torch.arange(16.0)).expand(1, 1, 8, 16) + 0.5
    assert torch.allclose(fft_low_pass(x, cutoff=0.2), torch.full_like(x, 0.5), atol=1e-6)
    assert torch.allclose(fft_high_pass(x, cutoff=0.2), x - 0.5, atol=1e-6)
    assert torch.allclose(fft_low_pass(x, cutoff=0.3), x, atol=1e-6)
    assert fft_high_pass(x, cutoff=0.3).abs().max() < 1e-6


def test_low_pass_rejects_unknown_kinds_and_bad_kernels() -> None:
    with pytest.raises(ValueError, match="kind"):
        low_pass(torch.zeros(1, 3, 4, 4), "median")
    with pytest.raises(ValueError, match="odd"):
        box_low_pass(torch.zeros(1, 3, 4, 4), 4)


# colour fixes ----------------------------------------------------------------------------


def test_wavelet_decomposition_sums_to_the_input() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 20, 24)
    high, low = wavelet_decomposition(x, levels=4)
    assert torch.allclose(high + low, x, atol=1e-6)
    assert torch.allclose(wavelet_color_fix(x, x), x, atol=1e-6)


def test_wavelet_color_fix_takes_details_from_target_and_colour_from_source() -> None:
    # A checkerboard is the finest detail: the first binomial blur removes it away from the
    # border, so in the interior (31 px from the edge for 5 levels) the output is exactly the
    # source's flat colour plus the target's checkerboard.
    size = 72
    checker = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 0.2 - 0.1
    target = torch.tensor([0.2, 0.5, 0.8]).reshape(1, 3, 1, 1) + checker
    source = torch.tensor([0.6, 0.3, 0.1]).reshape(1, 3, 1, 1).expand(1, 3, size, size)
    out = wavelet_color_fix(target, source, levels=5)
    interior = (..., slice(31, size - 31), slice(31, size - 31))
    assert torch.allclose(out[interior], (source + checker)[interior], atol=1e-6)


def test_wavelet_color_fix_low_frequencies_follow_the_source() -> None:
    torch.manual_seed(0)
    source = gaussian_low_pass(torch.rand(1, 3, 40, 40), sigma=4.0)
    target = source * 0.5 + 0.3 + 0.05 * torch.randn(1, 3, 40, 40)
    out = wavelet_color_fix(target, source, levels=5)
    blur = lambda x: gaussian_low_pass(x, sigma=6.0)  # noqa: E731
    assert (blur(out) - blur(source)).abs().mean() < 0.2 * (blur(target) - blur(source)).abs().mean()
    # What the fix keeps of the target is its detail band.
    assert torch.allclose(out - wavelet_decomposition(source)[1], wavelet_decomposition(target)[0], atol=1e-6)


def test_adain_color_fix_by_hand() -> None:
    target = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)  # mean 1, std 1
    source = torch.tensor([10.0, 14.0]).reshape(1, 1, 2, 1)  # mean 12, std 2
    assert torch.allclose(adain_color_fix(target, source), torch.tensor([[[[10.0, 14.0]]]]))


def test_adain_color_fix_copies_channel_statistics() -> None:
    torch.manual_seed(0)
    target, source = torch.rand(2, 3, 16, 20), torch.rand(2, 3, 12, 10) * 0.3 + 0.4
    out = adain_color_fix(target, source)
    std, mean = torch.std_mean(out, dim=(-2, -1), correction=0)
    s_std, s_mean = torch.std_mean(source, dim=(-2, -1), correction=0)
    assert torch.allclose(mean, s_mean, atol=1e-5)
    assert torch.allclose(std, s_std, atol=1e-5)
    flat = adain_color_fix(torch.full((1, 3, 4, 4), 0.3), source[:1])
    assert torch.allclose(flat, s_mean[:1, :, None, None].expand(1, 3, 4, 4), atol=1e-5)
