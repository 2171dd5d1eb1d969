"""Colour spaces, frequency filters and colour fixes on `(..., C, H, W)` tensors.

YUV here is the full-range analog YUV of kornia's `rgb_to_yuv` (RGB in `[0, 1]`, Y in `[0, 1]`,
U in `[-0.436, 0.436]`, V in `[-0.615, 0.615]`):

    Y = Kr R + (1 - Kr - Kb) G + Kb B,   U = 0.436 (B - Y) / (1 - Kb),   V = 0.615 (R - Y) / (1 - Kr)

with `Kr, Kb = 0.299, 0.114` for BT.601 and `0.2126, 0.0722` for BT.709. The inverse matrix is
computed exactly (float64) rather than rounded, so RGB -> YUV -> RGB round-trips to float error;
kornia's BT.601 matrix is this one rounded to three decimals.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
U_MAX, V_MAX = 0.436, 0.615


def _rgb_to_yuv_matrix(standard: str) -> Tensor:
    if standard not in _LUMA:
        raise ValueError(f"standard must be 'bt601' or 'bt709', got {standard!r}")
    kr, kb = _LUMA[standard]
    luma = torch.tensor([kr, 1 - kr - kb, kb], dtype=torch.float64)
    blue, red = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    return torch.stack([luma, U_MAX * (blue - luma) / (1 - kb), V_MAX * (red - luma) / (1 - kr)])


def _apply_matrix(x: Tensor, matrix: Tensor, name: str) -> Tensor:
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"{name} must be (..., 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floats, got dtype {x.dtype}")
    return torch.einsum("ij,...jhw->...ihw", matrix.to(x.device, x.dtype), x)


def rgb_to_yuv(rgb: Tensor, standard: str = "bt601") -> Tensor:
    """RGB `(..., 3, H, W)` in `[0, 1]` to full-range analog YUV (see the module docstring).

    Args:
        rgb: RGB images.
        standard: `"bt601"` or `"bt709"` luma coefficients.
    """
    return _apply_matrix(rgb, _rgb_to_yuv_matrix(standard), "rgb")


def yuv_to_rgb(yuv: Tensor, standard: str = "bt601") -> Tensor:
    """Inverse of `rgb_to_yuv` for the same `standard`."""
    return _apply_matrix(yuv, torch.linalg.inv(_rgb_to_yuv_matrix(standard)), "yuv")


def _filter_each_channel(x: Tensor, kernel: Tensor, dilation: int = 1) -> Tensor:
    """Convolve every channel of `x (..., H, W)` with one 2D `kernel`, replicate padding ('same' size)."""
    if x.ndim < 2:
        raise ValueError(f"x must be (..., H, W), got {tuple(x.shape)}")
    pad_h = dilation * (kernel.shape[0] // 2)
    pad_w = dilation * (kernel.shape[1] // 2)
    flat = x.reshape(-1, 1, *x.shape[-2:])
    # Replicate padding works for any image size and keeps flat regions flat at the border.
    flat = F.pad(flat, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    out = F.conv2d(flat, kernel.to(x.device, x.dtype)[None, None], dilation=dilation)
    return out.reshape(x.shape)


def gaussian_low_pass(x: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Gaussian blur of each channel of `x (..., H, W)`.

    Args:
        x: images.
        sigma: standard deviation in pixels.
        kernel_size: odd kernel width; `2 * ceil(3 * sigma) + 1` by default.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    kernel_size = 2 * math.ceil(3 * sigma) + 1 if kernel_size is None else kernel_size
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    return _filter_each_channel(x, taps[:, None] * taps[None, :])


def box_low_pass(x: Tensor, kernel_size: int) -> Tensor:
    """Mean over a `kernel_size x kernel_size` window (odd) around each pixel of `x (..., H, W)`."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    return _filter_each_channel(x, torch.full((kernel_size, kernel_size), 1 / kernel_size**2, dtype=torch.float64))


def _radial_frequency(height: int, width: int, device: torch.device) -> Tensor:
    """|f| in cycles per pixel on the `rfft2` grid `(H, W // 2 + 1)`."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    return torch.sqrt(fy**2 + fx**2)


def _fft_mask(x: Tensor, keep: Callable[[Tensor], Tensor]) -> Tensor:
    if x.ndim < 2:
        raise ValueError(f"x must be (..., H, W), got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    # torch.fft has no half-precision kernels on every device; filter in float32.
    spectrum = torch.fft.rfft2(x.float())
    mask = keep(_radial_frequency(height, width, x.device))
    return torch.fft.irfft2(spectrum * mask, s=(height, width)).to(x.dtype)


def fft_low_pass(x: Tensor, cutoff: float) -> Tensor:
    """Ideal low-pass of each channel of `x (..., H, W)`: keeps frequencies with `|f| <= cutoff`.

    Args:
        x: images.
        cutoff: radial frequency in cycles per pixel, `|f| = sqrt(fx^2 + fy^2)`; 0.5 is Nyquist
            along an axis, so `cutoff >= 0.5 * sqrt(2)` keeps everything and 0 keeps the mean.
    """
    return _fft_mask(x, lambda radius: (radius <= cutoff).float())


def fft_high_pass(x: Tensor, cutoff: float) -> Tensor:
    """Ideal high-pass, the complement of `fft_low_pass`: keeps frequencies with `|f| > cutoff`."""
    return _fft_mask(x, lambda radius: (radius > cutoff).float())


_LOW_PASS = {"gaussian": gaussian_low_pass, "box": box_low_pass, "fft": fft_low_pass}


def low_pass(x: Tensor, kind: str = "gaussian", **params: float) -> Tensor:
    """Low-pass filter `kind` (`"gaussian"`: `sigma`, `"box"`: `kernel_size`, `"fft"`: `cutoff`)."""
    if kind not in _LOW_PASS:
        raise ValueError(f"kind must be one of {sorted(_LOW_PASS)}, got {kind!r}")
    return _LOW_PASS[kind](x, **params)


def high_pass(x: Tensor, kind: str = "gaussian", **params: float) -> Tensor:
    """`x - low_pass(x, kind, **params)`, so `high_pass + low_pass == x`."""
    return x - low_pass(x, kind, **params)


# StableSR's wavelet colour fix: an a-trous decomposition with a 3x3 binomial kernel whose
# dilation doubles every level.
_WAVELET_KERNEL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64) / 16


def wavelet_decomposition(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """Split `x (..., H, W)` into `(high, low)` with `high + low == x`.

    Level `i` blurs the previous low band with the binomial kernel dilated by `2**i`; `high` sums
    the detail removed at every level and `low` is the last low band.

    Args:
        x: images.
        levels: number of blur levels.
    """
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    low = x
    for level in range(levels):
        low = _filter_each_channel(low, _WAVELET_KERNEL, dilation=2**level)
    return x - low, low


def wavelet_color_fix(target: Tensor, source: Tensor, levels: int = 5) -> Tensor:
    """High frequencies of `target` on the low frequencies (colours) of `source`.

    Args:
        target: the images whose details are kept, e.g. the network output `(..., C, H, W)`.
        source: the images whose colours are kept, e.g. the upsampled input, same shape.
        levels: levels of `wavelet_decomposition`.
    """
    if target.shape != source.shape:
        raise ValueError(f"target and source must have one shape, got {tuple(target.shape)} and {tuple(source.shape)}")
    target_high, _ = wavelet_decomposition(target, levels)
    _, source_low = wavelet_decomposition(source, levels)
    return target_high + source_low


def adain_color_fix(target: Tensor, source: Tensor, eps: float = 1e-6) -> Tensor:
    """Give each channel of `target (..., C, H, W)` the spatial mean and std of `source`'s.

    `out = (target - mean_t) / std_t * std_s + mean_s` with population std over `H, W`; a flat
    target channel (`std_t < eps`) becomes flat at `mean_s`.

    Args:
        target: the images to recolour.
        source: the images whose statistics are copied; same leading dims and channels.
        eps: smallest `std_t` divided by.
    """
    if target.ndim < 3 or target.shape[:-2] != source.shape[:-2]:
        raise ValueError(
            f"target and source must be (..., C, H, W) with equal (..., C), "
            f"got {tuple(target.shape)} and {tuple(source.shape)}"
        )
    t_std, t_mean = torch.std_mean(target, dim=(-2, -1), keepdim=True, correction=0)
    s_std, s_mean = torch.std_mean(source, dim=(-2, -1), keepdim=True, correction=0)
    return (target - t_mean) / t_std.clamp_min(eps) * s_std + s_mean
