"""Sample clips: frames in range, cached rendering, and flow that is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.components.samples import (
    SAMPLE_CLIP_NAMES,
    CameraPath,
    camera_flow,
    camera_matrices,
    render_camera_path,
    sample_clips,
)


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `image` at p + flow(p); also the mask of points that land inside the image."""
    _, _, height, width = image.shape
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)
    warped = F.grid_sample(image, grid, mode="bilinear", align_corners=False, padding_mode="border")
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return warped, inside




def test_sample_clips_shapes_range_and_cache():
    clips = sample_clips()
    assert [c.name for c in clips] == list(SAMPLE_CLIP_NAMES)
    assert len(clips) == 5
    for clip in clips:
        assert clip.frames.shape == (8, 3, 96, 128) and clip.frames.dtype == torch.float32
        assert clip.flow.shape == (7, 2, 96, 128) and clip.flow.dtype == torch.float32
        assert clip.frames.min() >= 0 and clip.frames.max() <= 1
        assert clip.frames.std() > 0.05  # a photograph, not a flat fill
    clips[0].frames.zero_()  # callers get their own tensors, the cache stays intact
    again = sample_clips(names=["astronaut_pan"])
    assert again[0].frames.std() > 0.05
    assert torch.equal(again[0].flow, sample_clips()[0].flow)


def test_each_sample_clip_has_a_different_motion():
    flows = [clip.flow for clip in sample_clips()]
    for i in range(len(flows)):
        for j in range(i + 1, len(flows)):
            assert (flows[i] - flows[j]).abs().mean() > 0.1


@pytest.mark.parametrize("name", SAMPLE_CLIP_NAMES)
def test_sample_clip_flow_warps_next_frame_onto_current(name):
    (clip,) = sample_clips(names=[name])
    warped, inside = backward_warp(clip.frames[1:], clip.flow)
    error = (warped - clip.frames[:-1]).abs().mean(dim=1)[inside].mean()
    unwarped = (clip.frames[1:] - clip.frames[:-1]).abs().mean(dim=1)[inside].mean()
    assert inside.float().mean() > 0.8
    assert error < 0.02
    assert error < unwarped / 2  # the flow explains the motion, not just small frame differences


def test_sample_clips_other_size_and_names():
    (clip,) = sample_clips(num_frames=4, size=(40, 56), names=["coffee_zoom"])
    assert clip.frames.shape == (4, 3, 40, 56) and clip.flow.shape == (3, 2, 40, 56)
    with pytest.raises(ValueError, match=r"unknown sample clips \['teapot'\]"):
        sample_clips(names=["teapot"])


def test_sample_pan_flow_is_constant_and_matches_the_path():
    (clip,) = sample_clips(num_frames=8, size=(96, 128), names=["astronaut_pan"])
    # The camera pans 0.4 * 128 px to the right over 7 steps: content moves left.
    assert torch.allclose(clip.flow[:, 0], torch.full_like(clip.flow[:, 0], -0.4 * 128 / 7), atol=1e-4)
    assert torch.allclose(clip.flow[:, 1], torch.zeros_like(clip.flow[:, 1]), atol=1e-4)


def test_camera_matrices_by_hand():
    # View 5 wide, 3 high: centre v = (2, 1). A p = shift + scale * R(angle) (p - v).
    path = CameraPath(shift=((10.0, 20.0), (10.0, 20.0)), scale=(2.0, 2.0), angle=(90.0, 90.0))
    (matrix,) = camera_matrices(path, 1, (3, 5))
    # p = (3, 1): p - v = (1, 0) -> rotated (0, 1) -> scaled (0, 2) -> (10, 22).
    assert torch.allclose(
        matrix @ torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64),
        torch.tensor([10.0, 22.0, 1.0], dtype=torch.float64),
        atol=1e-12,
    )
    # p = (2, 0): p - v = (0, -1) -> rotated (1, 0) -> scaled (2, 0) -> (12, 20).
    assert torch.allclose(
        matrix @ torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64),
        torch.tensor([12.0, 20.0, 1.0], dtype=torch.float64),
        atol=1e-12,
    )


def test_camera_matrices_interpolate_shift_linearly_and_scale_geometrically():
    path = CameraPath(shift=((0.0, 0.0), (4.0, -2.0)), scale=(1.0, 0.25))
    matrices = camera_matrices(path, 3, (1, 1))  # one pixel at v = (0, 0): A p = shift
    assert torch.allclose(matrices[:, :2, 2], torch.tensor([[0.0, 0.0], [2.0, -1.0], [4.0, -2.0]], dtype=torch.float64))
    assert torch.allclose(matrices[:, 0, 0], torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


def test_zoom_flow_by_hand():
    # Zooming in 2x about the view centre v: A_1^{-1} A_0 p = 2 (p - v) + v, so flow(p) = p - v.
    matrices = camera_matrices(CameraPath(scale=(1.0, 0.5)), 2, (3, 5))
    flow = camera_flow(matrices, (3, 5))[0]
    assert torch.allclose(flow[:, 0, 0], torch.tensor([-2.0, -1.0]), atol=1e-6)
    assert torch.allclose(flow[:, 2, 4], torch.tensor([2.0, 1.0]), atol=1e-6)
    assert torch.allclose(flow[:, 1, 2], torch.tensor([0.0, 0.0]), atol=1e-6)


def test_still_camera_gives_zero_flow_and_equal_frames():
    photo = torch.rand(3, 50, 60, generator=torch.Generator().manual_seed(0))
    clip = render_camera_path(photo, CameraPath(), 3, (16, 24))
    assert torch.equal(clip.flow, torch.zeros(2, 2, 16, 24))
    assert torch.equal(clip.frames[0], clip.frames[1]) and torch.equal(clip.frames[1], clip.frames[2])


def test_pure_pan_of_two_pixels_per_frame():
    photo = torch.rand(3, 50, 60, generator=torch.Generator().manual_seed(0))
    # The camera moves 2 px left per frame, so content moves 2 px right: flow == (2, 0).
    clip = render_camera_path(photo, CameraPath(shift=((0.0, 0.0), (-6.0, 0.0))), 4, (16, 24))
    assert torch.allclose(clip.flow[:, 0], torch.full((3, 16, 24), 2.0), atol=1e-6)
    assert torch.allclose(clip.flow[:, 1], torch.zeros(3, 16, 24), atol=1e-6)
    # Integer steps at scale 1 sample pixel centres exactly, so the frames are exact shifts.
    assert torch.allclose(clip.frames[1][..., 2:], clip.frames[0][..., :-2], atol=1e-6)


def test_render_needs_two_frames():
    with pytest.raises(ValueError, match="num_frames must be >= 2, got 1"):
        render_camera_path(torch.rand(3, 8, 8), CameraPath(), 1, (4, 4))
