"""Built-in sample clips: photographs filmed by a moving virtual camera, with exact optical flow.

`sample_clips()` renders short RGB clips from scikit-image's bundled photographs through a moving
virtual camera, with the exact optical flow between consecutive frames. They need no download:
every recipe trains and validates on them when no dataset root is given, the quickstart upscales
one, and tests use their flow as ground truth.

Conventions
    Pixel (x, y) is the pixel in column x and row y, its centre at the continuous coordinate (x, y),
    so an image of width W spans [-0.5, W - 0.5]. `grid_sample(..., align_corners=False)` addresses
    that point as 2 * (x + 0.5) / W - 1. Flow is in pixels, channel 0 along x (width), channel 1 along
    y: `flow[t][:, y, x] = (dx, dy)` means the content of pixel (x, y) in frame t is at
    (x + dx, y + dy) in frame t + 1, so sampling frame t + 1 at p + flow[t](p) reproduces frame t.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class CameraPath:
    """A virtual camera moving over a photo at constant speed from its first pose to its last.

    View pixel p = (x, y) of frame t shows photo point A_t p with
    A_t = Translate(c + shift_t) · Rotate(angle_t) · Scale(scale_t) · Translate(-v), where v is the
    view centre ((W - 1) / 2, (H - 1) / 2) and c the photo centre. shift and angle move linearly in t,
    scale geometrically (a constant zoom rate).

    Args:
        shift: offset of the view centre from the photo centre at the first and the last frame, in
            photo pixels ((x0, y0), (x1, y1)). Content moves opposite to the camera.
        scale: photo pixels per view pixel at the first and the last frame; decreasing zooms in.
        angle: camera roll in degrees at the first and the last frame.
    """

    shift: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    scale: tuple[float, float] = (1.0, 1.0)
    angle: tuple[float, float] = (0.0, 0.0)


@dataclass
class SampleClip:
    """One built-in clip.

    Args:
        name: `<photo>_<motion>`, e.g. "astronaut_pan".
        frames: (T, 3, H, W) float32 in [0, 1].
        flow: (T - 1, 2, H, W) float32 ground-truth flow from frame t to frame t + 1 (module docstring).
    """

    name: str
    frames: Tensor
    flow: Tensor


def camera_matrices(path: CameraPath, num_frames: int, size: tuple[int, int]) -> Tensor:
    """The (T, 3, 3) float64 matrices A_t mapping homogeneous view pixels to photo coordinates.

    Photo coordinates are relative to the photo centre, so the same matrices serve any photo size.

    Args:
        path: the camera motion.
        num_frames: T.
        size: (H, W) of the view.
    """
    height, width = size
    u = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64)  # [0.] for one frame
    (x0, y0), (x1, y1) = path.shift
    shift_x, shift_y = x0 + (x1 - x0) * u, y0 + (y1 - y0) * u
    scale = path.scale[0] * (path.scale[1] / path.scale[0]) ** u
    angle = torch.deg2rad(path.angle[0] + (path.angle[1] - path.angle[0]) * u)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    matrices = torch.zeros(num_frames, 3, 3, dtype=torch.float64)
    matrices[:, 0, 0], matrices[:, 0, 1] = cos, -sin
    matrices[:, 1, 0], matrices[:, 1, 1] = sin, cos
    matrices[:, 0, 2] = shift_x - cos * centre_x + sin * centre_y
    matrices[:, 1, 2] = shift_y - sin * centre_x - cos * centre_y
    matrices[:, 2, 2] = 1.0
    return matrices


def _pixel_grid(size: tuple[int, int]) -> Tensor:
    """(3, H, W) float64 homogeneous pixel coordinates (x, y, 1)."""
    ys, xs = torch.meshgrid(
        torch.arange(size[0], dtype=torch.float64), torch.arange(size[1], dtype=torch.float64), indexing="ij"
    )
    return torch.stack([xs, ys, torch.ones_like(xs)])


def camera_flow(matrices: Tensor, size: tuple[int, int]) -> Tensor:
    """Exact (T - 1, 2, H, W) float32 flow between consecutive frames of a camera path.

    Pixel p of frame t shows photo point A_t p, which frame t + 1 shows at A_{t+1}^{-1} A_t p, so
    flow[t](p) = A_{t+1}^{-1} A_t p - p.

    Args:
        matrices: (T, 3, 3) A_t from `camera_matrices`.
        size: (H, W) of the view.
    """
    grid = _pixel_grid(size)
    frame_to_next = torch.linalg.solve(matrices[1:], matrices[:-1])
    moved = torch.einsum("tij,jhw->tihw", frame_to_next, grid)
    return (moved[:, :2] - grid[:2]).float()


def render_camera_path(
    photo: Tensor, path: CameraPath, num_frames: int, size: tuple[int, int], name: str = "clip"
) -> SampleClip:
    """Film `photo` with a moving camera: frames plus their exact flow.

    The photo is first resized (antialiased) to the smallest size that keeps every view corner of
    every frame inside it (upsampled when the path needs more pixels than the photo has), so no
    frame shows a border and no bilinear tap falls outside.

    Args:
        photo: (3, h, w) float in [0, 1].
        path: the camera motion.
        num_frames: T.
        size: (H, W) of the frames.
        name: name of the returned clip.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    height, width = size
    matrices = camera_matrices(path, num_frames, size)
    corners = torch.tensor(
        [[0.0, 0.0, 1.0], [width - 1, 0.0, 1.0], [0.0, height - 1, 1.0], [width - 1, height - 1, 1.0]],
        dtype=torch.float64,
    )
    reach = torch.einsum("tij,cj->tci", matrices, corners)[..., :2].abs().amax(dim=(0, 1))
    # Sampling at photo coordinate q touches pixels floor(q) and floor(q) + 1: keep q in [0, w - 1]
    # with one pixel to spare for rounding.
    needed_w, needed_h = (2 * reach + 3).tolist()
    factor = max(needed_w / photo.shape[-1], needed_h / photo.shape[-2])
    src_h, src_w = math.ceil(photo.shape[-2] * factor), math.ceil(photo.shape[-1] * factor)
    source = F.interpolate(photo[None].float(), size=(src_h, src_w), mode="bilinear", antialias=True)

    grid = _pixel_grid(size)
    points = torch.einsum("tij,jhw->thwi", matrices, grid)[..., :2]
    points[..., 0] += (src_w - 1) / 2
    points[..., 1] += (src_h - 1) / 2
    normalised = (2 * points + 1) / torch.tensor([src_w, src_h], dtype=torch.float64) - 1
    frames = F.grid_sample(
        source.expand(num_frames, -1, -1, -1), normalised.float(), mode="bilinear", align_corners=False
    )
    # The antialiasing filter can overshoot 1 by float rounding.
    return SampleClip(name=name, frames=frames.clamp(0, 1), flow=camera_flow(matrices, size))


def _photo(name: str) -> Tensor:
    # Imported on first render only: scikit-image takes a while to import and datasets never need it.
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


# name -> (photo, path as fractions of the view (W, H) for shifts). One motion per clip.
_SAMPLE_CLIPS: dict[str, tuple[str, CameraPath]] = {
    "astronaut_pan": ("astronaut", CameraPath(shift=((-0.2, 0.0), (0.2, 0.0)))),
    "coffee_zoom": ("coffee", CameraPath(scale=(1.0, 0.7))),
    "chelsea_roll": ("chelsea", CameraPath(scale=(0.9, 0.9), angle=(-5.0, 5.0))),
    "rocket_tilt": ("rocket", CameraPath(shift=((0.0, 0.15), (0.0, -0.15)), scale=(0.8, 1.0))),
    "motorcycle_dolly": (
        "motorcycle",
        CameraPath(shift=((-0.1, 0.05), (0.1, -0.05)), scale=(1.0, 0.8), angle=(0.0, 4.0)),
    ),
}
SAMPLE_CLIP_NAMES = tuple(_SAMPLE_CLIPS)


@functools.lru_cache(maxsize=8)
def _render_sample_clips(num_frames: int, size: tuple[int, int], names: tuple[str, ...]) -> list[SampleClip]:
    height, width = size
    clips = []
    for name in names:
        photo, relative = _SAMPLE_CLIPS[name]
        path = CameraPath(
            shift=tuple((x * width, y * height) for x, y in relative.shift),
            scale=relative.scale,
            angle=relative.angle,
        )
        clips.append(render_camera_path(_photo(photo), path, num_frames, size, name))
    return clips


def sample_clips(
    num_frames: int = 8, size: tuple[int, int] = (96, 128), names: Sequence[str] | None = None
) -> list[SampleClip]:
    """The built-in clips: scikit-image photographs filmed by a moving camera, with exact flow.

    One motion per clip (`SAMPLE_CLIP_NAMES`): a pan, a zoom, a roll, a tilt with zoom-out and a
    combined dolly. The camera covers the same path whatever `num_frames`, so longer clips move more
    slowly. Rendered once per argument set (cached); each call returns fresh tensors.

    Args:
        num_frames: frames per clip, >= 2.
        size: (H, W) of the frames.
        names: which clips, in order; all when None.
    """
    names = SAMPLE_CLIP_NAMES if names is None else tuple(names)
    unknown = sorted(set(names) - set(SAMPLE_CLIP_NAMES))
    if unknown:
        raise ValueError(f"unknown sample clips {unknown}; available: {list(SAMPLE_CLIP_NAMES)}")
    clips = _render_sample_clips(num_frames, (int(size[0]), int(size[1])), names)
    return [SampleClip(clip.name, clip.frames.clone(), clip.flow.clone()) for clip in clips]
