"""Synthetic degradations that turn HR clips into LR clips, for training and for benchmarks.

- `RealESRGANDegradation`: the second-order blur / resize / noise / JPEG pipeline of Real-ESRGAN
  (Wang et al., ICCVW 2021) with its published default ranges (`RealESRGANParams`).
- `RealBasicVSRDegradation`: the video version of RealBasicVSR (Chan et al., CVPR 2022): one set
  of random parameters per clip, shared by all its frames, then a lossy video codec.
- `BicubicDegradation` (BI) and `BlurDownDegradation` (BD): the classic benchmark degradations.

Every degradation maps HR clips `(B, T, 3, H, W)` in `[0, 1]` to LR clips
`(B, T, 3, H // scale, W // scale)` in `[0, 1]`, quantised to 1/255 like the 8-bit LR images the
papers train and test on. A 4-D batch `(B, 3, H, W)` is read as clips of one frame and returns 4-D.
The random ones draw every parameter of a clip from a CPU `torch.Generator` (`None`: the global
RNG) once per clip; `sample_params` + `apply` expose those parameters. Pixel noise is drawn on the
clip's device from a seed that is itself one of the clip's parameters, so a seeded run is
reproducible on a given device.
"""

from __future__ import annotations

import io
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import av
import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
# RealBasicVSR muxes at one frame per second, so its bit rates read as bits per frame.
CODEC_FRAME_RATE = 1


class Degradation(ABC):
    """Base of every degradation: the factor and the HR -> LR map.

    A base class rather than a Protocol, so recipes can name any subclass by `class_path`.
    """

    scale: int

    @abstractmethod
    def __call__(self, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """HR clips `(B, T, 3, H, W)` in `[0, 1]` -> LR clips `(B, T, 3, H // scale, W // scale)`."""


# Kernels ---------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Offsets `(x, y)` from the centre of a `size` x `size` kernel (x along columns)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    t = size // 2
    offsets = torch.arange(-t, t + 1, dtype=torch.float64)
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    return x, y


def _mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """`C^T Σ^{-1} C` on the kernel grid, `C = [x, y]^T`.

    Eq. (3), Real-ESRGAN: `Σ = R(θ) diag(σ_x², σ_y²) R(θ)^T` with the rotation `R(θ)`; the σ are
    standard deviations along the kernel's own axes before rotating it by θ.
    """
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be positive, got ({sigma_x}, {sigma_y})")
    cos, sin = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    covariance = (  # Eq. (3), Real-ESRGAN
        rotation @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rotation.T
    )
    inverse = torch.linalg.inv(covariance)
    x, y = _grid(size)
    return inverse[0, 0] * x * x + (inverse[0, 1] + inverse[1, 0]) * x * y + inverse[1, 1] * y * y


def _normalised(kernel: Tensor) -> Tensor:
    return (kernel / kernel.sum()).to(torch.float32)


def anisotropic_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """Gaussian blur kernel `k(i, j) = exp(-½ C^T Σ^{-1} C) / N`, Eq. (2) of Real-ESRGAN.

    Args:
        size: odd side length `2t + 1`; `C = [i, j]^T` runs over `[-t, t]²`.
        sigma_x: standard deviation along the kernel's first axis (columns when `theta` is 0).
        sigma_y: standard deviation along its second axis (rows when `theta` is 0).
        theta: rotation of the axes in radians.

    Returns:
        `(size, size)` float32 kernel summing to 1 (`N` normalises it).
    """
    return _normalised(torch.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, theta)))  # Eq. (2), Real-ESRGAN


def isotropic_gaussian_kernel(size: int, sigma: float) -> Tensor:
    """Isotropic Gaussian kernel: `anisotropic_gaussian_kernel` with `σ_x = σ_y = sigma`, `θ = 0`."""
    return anisotropic_gaussian_kernel(size, sigma, sigma, 0.0)


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> Tensor:
    """Generalized Gaussian kernel `k = exp(-½ (C^T Σ^{-1} C)^β) / N` (Sec. 3.1, Real-ESRGAN).

    Args:
        size: odd side length.
        sigma_x: standard deviation along the kernel's first axis.
        sigma_y: standard deviation along its second axis.
        theta: rotation of the axes in radians.
        beta: shape `β`; 1 gives the Gaussian, larger values a flatter top and sharper fall-off.
    """
    return _normalised(torch.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> Tensor:
    """Plateau-shaped kernel `k = 1 / (1 + (C^T Σ^{-1} C)^β) / N` (Sec. 3.1, Real-ESRGAN).

    Args:
        size: odd side length.
        sigma_x: scale along the kernel's first axis.
        sigma_y: scale along its second axis.
        theta: rotation of the axes in radians.
        beta: shape `β` of the plateau.
    """
    return _normalised(1.0 / (_mahalanobis(size, sigma_x, sigma_y, theta) ** beta + 1.0))


def sinc_kernel(size: int, omega_c: float) -> Tensor:
    """Circular low-pass (2-D sinc) kernel, Eq. (5) of Real-ESRGAN.

    `k(i, j) = ω_c J₁(ω_c r) / (2π r) / N` with `r = sqrt(i² + j²)` and the first-order Bessel
    function `J₁`; its limit `ω_c² / (4π)` at `r = 0`. Produces ringing and overshoot.

    Args:
        size: odd side length.
        omega_c: cutoff frequency `ω_c` in radians per sample, in `(0, π]`.
    """
    x, y = _grid(size)
    radius = torch.sqrt(x * x + y * y)
    safe_radius = torch.where(radius == 0, torch.ones_like(radius), radius)
    ring = omega_c * torch.special.bessel_j1(omega_c * safe_radius) / (2 * math.pi * safe_radius)
    kernel = torch.where(radius == 0, torch.full_like(radius, omega_c**2 / (4 * math.pi)), ring)  # Eq. (5)
    return _normalised(kernel)


# Random sampling (CPU generator, per clip) -----------------------------------------------------


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _chance(probability: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator, dtype=torch.float64).item() < probability


def _choice(options: Sequence, probabilities: Sequence[float] | None, generator: torch.Generator | None):
    weights = (
        torch.ones(len(options), dtype=torch.float64)
        if probabilities is None
        else torch.tensor(probabilities, dtype=torch.float64)
    )
    return options[int(torch.multinomial(weights, 1, generator=generator).item())]


def _shape_beta(beta_range: tuple[float, float], generator: torch.Generator | None) -> float:
    # Real-ESRGAN draws β below or above 1 with equal chance, so both shapes stay common.
    if _chance(0.5, generator):
        return _uniform(beta_range[0], 1.0, generator)
    return _uniform(1.0, beta_range[1], generator)


def _random_blur_kernel(
    kinds: Sequence[str],
    kind_probabilities: Sequence[float],
    sizes: Sequence[int],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    sinc_probability: float,
    generator: torch.Generator | None,
) -> Tensor:
    size = _choice(sizes, None, generator)
    if _chance(sinc_probability, generator):
        # Small kernels cannot hold a very low cutoff without truncating its main lobe.
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sinc_kernel(size, _uniform(low, math.pi, generator))
    kind = _choice(kinds, kind_probabilities, generator)
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {kind!r}")
    sigma_x = _uniform(*sigma_range, generator)
    if kind.endswith("aniso"):
        sigma_y = _uniform(*sigma_range, generator)
        theta = _uniform(-math.pi, math.pi, generator)
    else:
        sigma_y, theta = sigma_x, 0.0
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, _shape_beta(betag_range, generator))
    if kind.startswith("plateau"):
        return plateau_kernel(size, sigma_x, sigma_y, theta, _shape_beta(betap_range, generator))
    return anisotropic_gaussian_kernel(size, sigma_x, sigma_y, theta)


# Real-ESRGAN -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealESRGANParams:
    """Ranges of the Real-ESRGAN degradation; defaults are the published ones.

    Names follow Real-ESRGAN's `train_realesrnet_x4plus.yml`; a `2` suffix marks the second order.
    Noise sigmas are on the 0-255 scale; resize probabilities are `(up, down, keep)`.
    """

    kernel_list: tuple[str, ...] = KERNEL_KINDS
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    second_blur_prob: float = 0.8
    kernel_list2: tuple[str, ...] = KERNEL_KINDS
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    sinc_prob2: float = 0.1
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)

    final_sinc_prob: float = 0.8


@dataclass(frozen=True)
class OrderParams:
    """Drawn parameters of one degradation order: blur, resize, noise, JPEG.

    Args:
        kernel: `(k, k)` blur kernel on the CPU, or None when the order skips its blur.
        resize_scale: resize factor (first order: of the current size; second: of the LR size).
        resize_mode: `"area"`, `"bilinear"` or `"bicubic"`.
        noise: `"gaussian"` or `"poisson"`.
        noise_level: Gaussian sigma on the 0-255 scale, or the Poisson noise scale.
        gray_noise: one noise field shared by the three channels.
        jpeg_quality: JPEG quality in `[0, 100]`.
    """

    kernel: Tensor | None
    resize_scale: float
    resize_mode: str
    noise: str
    noise_level: float
    gray_noise: bool
    jpeg_quality: float


@dataclass(frozen=True)
class RealESRGANClipParams:
    """Every random choice for one clip; all its frames are degraded with these.

    Args:
        first: the first order.
        second: the second order (its JPEG is the last JPEG of the pipeline).
        final_kernel: the final sinc kernel, or None when the final sinc is skipped.
        final_resize_mode: interpolation of the resize to the LR size.
        jpeg_last: True: [resize to LR + sinc] then JPEG; False: JPEG then [resize + sinc].
        noise_seed: seed of the per-pixel noise, drawn on the clip's device.
    """

    first: OrderParams
    second: OrderParams
    final_kernel: Tensor | None
    final_resize_mode: str
    jpeg_last: bool
    noise_seed: int


def _clips_5d(clips: Tensor, scale: int) -> tuple[Tensor, bool]:
    """`clips` as `(B, T, 3, H, W)` and whether the input was a 4-D batch of frames."""
    if not isinstance(clips, Tensor) or clips.ndim not in (4, 5) or clips.shape[-3] != 3:
        got = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
        raise ValueError(f"clips must be (B, T, 3, H, W) or (B, 3, H, W) in [0, 1], got {got}")
    if not clips.is_floating_point():
        raise ValueError(f"clips must be floats in [0, 1], got dtype {clips.dtype}")
    if clips.shape[-2] < scale or clips.shape[-1] < scale:
        raise ValueError(f"clips must be at least {scale}x{scale} pixels, got {tuple(clips.shape[-2:])}")
    return (clips[:, None], True) if clips.ndim == 4 else (clips, False)


def _quantise(frames: Tensor) -> Tensor:
    """Clamp to `[0, 1]` and round to 8-bit levels, as an LR image saved to disk."""
    return (frames.clamp(0, 1) * 255).round() / 255


def _blur(frames: Tensor, kernel: Tensor) -> Tensor:
    # Replicate borders work at any size; the resized intermediates of small crops can be
    # narrower than a 21-tap kernel, which reflection cannot pad.
    return kornia.filters.filter2d(frames, kernel[None].to(frames.device, frames.dtype), border_type="replicate")


def _resize(frames: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(frames, size=size, mode="area")
    return F.interpolate(frames, size=size, mode=mode, align_corners=False)


def _add_noise(frames: Tensor, order: OrderParams, generator: torch.Generator) -> Tensor:
    """Gaussian or Poisson noise as in Real-ESRGAN; each frame gets its own noise field."""
    t, _, h, w = frames.shape
    channels = 1 if order.gray_noise else 3
    if order.noise == "gaussian":
        field = torch.randn((t, channels, h, w), generator=generator, device=frames.device, dtype=frames.dtype)
        noise = field * (order.noise_level / 255)
    elif order.noise == "poisson":
        image = kornia.color.rgb_to_grayscale(frames) if order.gray_noise else frames
        image = (image * 255).round().clamp(0, 255) / 255
        # Photon counts scale with the number of distinct levels in the frame (rounded up to a
        # power of two), so flat frames get coarse shot noise and detailed frames fine noise.
        levels = torch.tensor(
            [2.0 ** math.ceil(math.log2(len(torch.unique(frame)))) for frame in image],
            device=frames.device,
            dtype=frames.dtype,
        ).view(t, 1, 1, 1)
        noise = (torch.poisson(image * levels, generator=generator) / levels - image) * order.noise_level
    else:
        raise ValueError(f"noise must be 'gaussian' or 'poisson', got {order.noise!r}")
    return (frames + noise.expand(t, 3, h, w)).clamp(0, 1)


def _jpeg(frames: Tensor, quality: float) -> Tensor:
    # Kornia's differentiable JPEG runs batched on the frames' device, as Real-ESRGAN's own
    # GPU DiffJPEG does; a real encoder would mean a CPU round trip per frame.
    quality_tensor = torch.tensor([quality], device=frames.device, dtype=frames.dtype)
    return kornia.enhance.jpeg_codec_differentiable(frames.clamp(0, 1), quality_tensor)


class RealESRGANDegradation(Degradation):
    """Real-ESRGAN's second-order degradation, applied to whole clips.

    Eq. (4), Real-ESRGAN: `x = (D₂ ∘ D₁)(y)`, each order `D = [(y ⊛ k)↓_r + n]_JPEG` (Eq. (1)),
    followed by a resize to `H // scale` and a final sinc filter, the two orders of [resize + sinc]
    and [JPEG] at the end drawn at random. Every frame of a clip uses the clip's parameters.

    Args:
        params: ranges the per-clip parameters are drawn from.
        scale: downscaling factor of the whole pipeline.
    """

    def __init__(self, params: RealESRGANParams = RealESRGANParams(), scale: int = 4) -> None:
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.params = params
        self.scale = scale

    def _sample_order(self, second: bool, generator: torch.Generator | None) -> OrderParams:
        p = self.params
        suffix = "2" if second else ""
        kernel = None
        if not second or _chance(p.second_blur_prob, generator):
            kernel = _random_blur_kernel(
                getattr(p, "kernel_list" + suffix),
                getattr(p, "kernel_prob" + suffix),
                p.kernel_sizes,
                getattr(p, "blur_sigma" + suffix),
                getattr(p, "betag_range" + suffix),
                getattr(p, "betap_range" + suffix),
                getattr(p, "sinc_prob" + suffix),
                generator,
            )
        resize_range = getattr(p, "resize_range" + suffix)
        direction = _choice(("up", "down", "keep"), getattr(p, "resize_prob" + suffix), generator)
        if direction == "up":
            resize_scale = _uniform(1.0, resize_range[1], generator)
        elif direction == "down":
            resize_scale = _uniform(resize_range[0], 1.0, generator)
        else:
            resize_scale = 1.0
        resize_mode = _choice(RESIZE_MODES, None, generator)
        gray_noise = _chance(getattr(p, "gray_noise_prob" + suffix), generator)
        if _chance(getattr(p, "gaussian_noise_prob" + suffix), generator):
            noise, noise_level = "gaussian", _uniform(*getattr(p, "noise_range" + suffix), generator)
        else:
            noise, noise_level = "poisson", _uniform(*getattr(p, "poisson_scale_range" + suffix), generator)
        jpeg_quality = _uniform(*getattr(p, "jpeg_range" + suffix), generator)
        return OrderParams(kernel, resize_scale, resize_mode, noise, noise_level, gray_noise, jpeg_quality)

    def sample_params(self, batch: int, generator: torch.Generator | None = None) -> list[RealESRGANClipParams]:
        """Draw the parameters of `batch` clips from `generator` (a CPU generator; None: global RNG)."""
        clip_params = []
        for _ in range(batch):
            first = self._sample_order(False, generator)
            second = self._sample_order(True, generator)
            final_kernel = None
            if _chance(self.params.final_sinc_prob, generator):
                size = _choice(self.params.kernel_sizes, None, generator)
                final_kernel = sinc_kernel(size, _uniform(math.pi / 3, math.pi, generator))
            final_resize_mode = _choice(RESIZE_MODES, None, generator)
            jpeg_last = _chance(0.5, generator)
            noise_seed = int(torch.randint(0, 2**62, (), generator=generator).item())
            clip_params.append(
                RealESRGANClipParams(first, second, final_kernel, final_resize_mode, jpeg_last, noise_seed)
            )
        return clip_params

    def _degrade_clip(self, frames: Tensor, clip: RealESRGANClipParams) -> Tensor:
        """Degrade the frames `(T, 3, H, W)` of one clip with its parameters."""
        h, w = frames.shape[-2:]
        lr_size = (h // self.scale, w // self.scale)
        noise_generator = torch.Generator(device=frames.device).manual_seed(clip.noise_seed)
        x = frames
        # First order D₁ = [(y ⊛ k)↓_r + n]_JPEG, Eq. (1), Real-ESRGAN.
        x = _blur(x, clip.first.kernel)
        x = _resize(x, (int(h * clip.first.resize_scale), int(w * clip.first.resize_scale)), clip.first.resize_mode)
        x = _add_noise(x, clip.first, noise_generator)
        x = _jpeg(x, clip.first.jpeg_quality)
        # Second order D₂ (Eq. (4), Real-ESRGAN: x = (D₂ ∘ D₁)(y)); its resize is relative to the LR
        # size so the final resize stays moderate.
        second = clip.second
        if second.kernel is not None:
            x = _blur(x, second.kernel)
        x = _resize(
            x,
            (int(lr_size[0] * second.resize_scale), int(lr_size[1] * second.resize_scale)),
            second.resize_mode,
        )
        x = _add_noise(x, second, noise_generator)
        if clip.jpeg_last:
            x = self._to_lr_size(x, lr_size, clip)
            x = _jpeg(x, second.jpeg_quality)
        else:
            x = _jpeg(x, second.jpeg_quality)
            x = self._to_lr_size(x, lr_size, clip)
        return _quantise(x)

    @staticmethod
    def _to_lr_size(frames: Tensor, lr_size: tuple[int, int], clip: RealESRGANClipParams) -> Tensor:
        frames = _resize(frames, lr_size, clip.final_resize_mode)
        return frames if clip.final_kernel is None else _blur(frames, clip.final_kernel)

    def apply(self, clips: Tensor, params: Sequence[RealESRGANClipParams]) -> Tensor:
        """Degrade `clips` `(B, T, 3, H, W)` (or `(B, 3, H, W)`) with one parameter set per clip."""
        frames, single_frames = _clips_5d(clips, self.scale)
        if len(params) != frames.shape[0]:
            raise ValueError(f"need one parameter set per clip: {frames.shape[0]} clips, {len(params)} sets")
        out = torch.stack([self._degrade_clip(clip, p) for clip, p in zip(frames, params)])
        return out[:, 0] if single_frames else out

    def __call__(self, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Degrade HR `clips` to LR with fresh per-clip parameters drawn from `generator`."""
        return self.apply(clips, self.sample_params(clips.shape[0], generator))


# RealBasicVSR ----------------------------------------------------------------------------------


def compress_video(frames: Tensor, codec: str, bitrate: int) -> Tensor:
    """Encode a clip with a lossy video codec in memory and decode it back.

    Odd sizes are padded to even (yuv420p halves chroma resolution) and cropped back.

    Args:
        frames: `(T, 3, H, W)` in `[0, 1]`, on any device.
        codec: an FFmpeg encoder name, e.g. `"libx264"`, `"mpeg4"`, `"libvpx"`.
        bitrate: target bit rate in bits per second at `CODEC_FRAME_RATE` frames per second.

    Returns:
        The decoded clip, same shape, device and dtype, on 8-bit levels.
    """
    t, _, h, w = frames.shape
    padded = F.pad(frames.float(), (0, w % 2, 0, h % 2), mode="replicate")
    images = (padded.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    buffer = io.BytesIO()
    # Matroska holds all three codecs (mp4 refuses VP8).
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream(codec, rate=CODEC_FRAME_RATE)
        stream.width, stream.height = images.shape[2], images.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = int(bitrate)
        # One thread: same bytes on every run and no competition with dataloader workers.
        stream.codec_context.thread_count = 1
        for index, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer, mode="r") as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if len(decoded) != t:
        raise RuntimeError(f"{codec} returned {len(decoded)} frames for a clip of {t}")
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)[..., :h, :w]
    return (out.to(frames.device, frames.dtype) / 255).contiguous()


@dataclass(frozen=True)
class RealBasicVSRClipParams:
    """Every random choice for one clip of the RealBasicVSR degradation.

    Args:
        image: the Real-ESRGAN parameters, shared by all frames.
        codec: the video encoder of the last step.
        bitrate: its target bit rate (bits per second at `CODEC_FRAME_RATE`).
    """

    image: RealESRGANClipParams
    codec: str
    bitrate: int


class RealBasicVSRDegradation(Degradation):
    """RealBasicVSR's video degradation: Real-ESRGAN per clip, then a random video codec.

    Args:
        params: ranges of the Real-ESRGAN part.
        scale: downscaling factor.
        codecs: encoders drawn from with equal chance (RealBasicVSR: H.264 and MPEG-4; VP8 adds
            another family of block artefacts).
        bitrate_range: bit-rate range, RealBasicVSR's `[1e4, 1e5]` at one frame per second.
    """

    def __init__(
        self,
        params: RealESRGANParams = RealESRGANParams(),
        scale: int = 4,
        codecs: tuple[str, ...] = ("libx264", "mpeg4", "libvpx"),
        bitrate_range: tuple[int, int] = (10_000, 100_000),
    ) -> None:
        unknown = [codec for codec in codecs if codec not in av.codecs_available]
        if not codecs or unknown:
            raise ValueError(f"codecs must be encoders this PyAV build has, got {list(codecs)}")
        self.image_degradation = RealESRGANDegradation(params, scale)
        self.scale = scale
        self.codecs = tuple(codecs)
        self.bitrate_range = bitrate_range

    def sample_params(self, batch: int, generator: torch.Generator | None = None) -> list[RealBasicVSRClipParams]:
        """Draw the parameters of `batch` clips from `generator` (a CPU generator; None: global RNG)."""
        clip_params = []
        for _ in range(batch):
            image = self.image_degradation.sample_params(1, generator)[0]
            codec = _choice(self.codecs, None, generator)
            bitrate = round(_uniform(*self.bitrate_range, generator))
            clip_params.append(RealBasicVSRClipParams(image, codec, bitrate))
        return clip_params

    def apply(self, clips: Tensor, params: Sequence[RealBasicVSRClipParams]) -> Tensor:
        """Degrade `clips` `(B, T, 3, H, W)` (or `(B, 3, H, W)`) with one parameter set per clip."""
        frames, single_frames = _clips_5d(clips, self.scale)
        lr = self.image_degradation.apply(frames, [p.image for p in params])
        out = torch.stack([compress_video(clip, p.codec, p.bitrate) for clip, p in zip(lr, params)])
        return out[:, 0] if single_frames else out

    def __call__(self, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Degrade HR `clips` to LR with fresh per-clip parameters drawn from `generator`."""
        return self.apply(clips, self.sample_params(clips.shape[0], generator))


# Classic benchmark degradations ----------------------------------------------------------------


def _crop_to_multiple(frames: Tensor, scale: int) -> Tensor:
    """Crop bottom/right so H and W are multiples of `scale` and LR pixels tile HR blocks exactly."""
    h, w = frames.shape[-2:]
    return frames[..., : h - h % scale, : w - w % scale]


class BicubicDegradation(Degradation):
    """BI: antialiased bicubic downscaling, the classic benchmark LR.

    Torch's antialiased bicubic uses the same `a = -0.5` kernel as MATLAB's `imresize`, so it
    matches the usual benchmark files up to rounding. The HR is first cropped to a multiple of
    `scale`.

    Args:
        scale: downscaling factor.
    """

    def __init__(self, scale: int = 4) -> None:
        self.scale = scale

    def __call__(self, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Downscale `clips`; `generator` is ignored (the degradation is deterministic)."""
        frames, single_frames = _clips_5d(clips, self.scale)
        b, t = frames.shape[:2]
        hr = _crop_to_multiple(frames.flatten(0, 1), self.scale)
        lr_size = (hr.shape[-2] // self.scale, hr.shape[-1] // self.scale)
        lr = F.interpolate(hr, size=lr_size, mode="bicubic", align_corners=False, antialias=True)
        out = _quantise(lr).unflatten(0, (b, t))
        return out[:, 0] if single_frames else out


class BlurDownDegradation(Degradation):
    """BD: Gaussian blur then keep every `scale`-th pixel, the classic benchmark LR.

    A `13 x 13` isotropic Gaussian with `sigma` (1.6 for x4) and replicated borders, then the
    pixels at rows and columns `0, scale, 2 scale, ...` (MATLAB's `1:scale:end`).

    Args:
        scale: downscaling factor.
        sigma: standard deviation of the blur.
    """

    def __init__(self, scale: int = 4, sigma: float = 1.6) -> None:
        self.scale = scale
        self.sigma = sigma
        self.kernel = isotropic_gaussian_kernel(13, sigma)

    def __call__(self, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Blur and subsample `clips`; `generator` is ignored (the degradation is deterministic)."""
        frames, single_frames = _clips_5d(clips, self.scale)
        b, t = frames.shape[:2]
        hr = _crop_to_multiple(frames.flatten(0, 1), self.scale)
        lr = _blur(hr, self.kernel)[..., :: self.scale, :: self.scale]
        out = _quantise(lr).unflatten(0, (b, t))
        return out[:, 0] if single_frames else out
