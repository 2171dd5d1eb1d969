from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from zoo.components.tiling import ChunkPlan, TilePlan, pad_frames, pad_to_multiple, stream_chunks, valid_length


def upscale2(x: torch.Tensor) -> torch.Tensor:
    """A per-pixel function at scale 2: nearest upsampling, then a pointwise nonlinearity."""
    return torch.sin(3 * F.interpolate(x, scale_factor=2, mode="nearest")) * 2 + 0.1


# TilePlan --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(37, 53, 16, 5), (37, 53, (12, 20), (3, 7)), (8, 8, 32, 4), (20, 41, 20, 19), (9, 30, 7, 0)],
)
def test_tile_plan_identity_is_exact(height: int, width: int, tile, overlap) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, height, width)
    assert torch.equal(TilePlan(height, width, tile, overlap).apply(lambda t: t, x), x)


@pytest.mark.parametrize(("tile", "overlap"), [(16, 5), (10, 9), (64, 0)])
def test_tile_plan_scale2_per_pixel_function_equals_untiled(tile: int, overlap: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 29, 35)
    plan = TilePlan(29, 35, tile, overlap, scale=2)
    assert torch.equal(plan.apply(upscale2, x), upscale2(x))


def test_tile_plan_neighbourhood_function_differs_only_inside_overlaps() -> None:
    # Bilinear upsampling reads one neighbour past a tile edge, so tiles disagree with the
    # untiled result at their edges; those edges lie in overlaps, where the blend damps them.
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 40)
    plan = TilePlan(8, 40, (8, 16), (0, 6), scale=2)
    bilinear = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear")  # noqa: E731
    diff = (plan.apply(bilinear, x) - bilinear(x)).abs().amax(dim=(0, 1, 2))
    in_overlap = torch.zeros(80, dtype=torch.bool)
    for (_, stop), (start, _) in zip(plan.out_cols, plan.out_cols[1:]):
        in_overlap[start:stop] = True
    assert diff[~in_overlap].max() == 0
    assert 0 < diff[in_overlap].max() < 0.5


@pytest.mark.parametrize(("tile", "overlap"), [(16, 4), ((8, 12), (0, 3)), (9, 0)])
def test_tile_plan_with_context_makes_bicubic_tiles_agree_exactly(tile, overlap) -> None:
    # Bicubic x4 reads 2 input pixels past an output pixel's position: with context 2 every tile
    # sees the neighbourhood the whole frame has, and the result is the untiled one to float error.
    torch.manual_seed(0)
    x = torch.rand(1, 3, 29, 37)
    bicubic = lambda t: F.interpolate(t, scale_factor=4, mode="bicubic", align_corners=False)  # noqa: E731
    exact = TilePlan(29, 37, tile, overlap, scale=4, context=2).apply(bicubic, x)
    assert (exact - bicubic(x)).abs().max() < 1e-6
    # Without it, tile edges differ (the test can fail): the blend only damps them.
    assert (TilePlan(29, 37, tile, overlap, scale=4).apply(bicubic, x) - bicubic(x)).abs().max() > 1e-3


def test_tile_plan_context_is_cropped_at_the_frame_edge() -> None:
    # A function that adds each tile's input width shows which input it saw: the middle tile of
    # width 4 reads 1 pixel each side (6 wide), the edge tiles only inward (5 wide).
    plan = TilePlan(1, 12, (1, 4), 0, context=1)
    out = plan.apply(lambda t: torch.full_like(t, float(t.shape[-1])), torch.zeros(1, 1, 1, 12))
    assert out[0, 0, 0].tolist() == [5.0] * 4 + [6.0] * 4 + [5.0] * 4
    with pytest.raises(ValueError, match="context must be >= 0"):
        TilePlan(4, 4, 2, context=-1)


def test_tile_plan_changes_channels_and_keeps_leading_dims() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 24, 30)  # (N, C, T, H, W) latents
    fn = lambda t: torch.cat([t, t.square()], dim=1).repeat_interleave(4, -1).repeat_interleave(4, -2)  # noqa: E731
    out = TilePlan(24, 30, 10, 4, scale=4).apply(fn, x)
    assert torch.equal(out, fn(x))


def test_tile_plan_fractional_scale_for_block_functions() -> None:
    # A 2x2 average pool (a VAE encoder's shape) is exact when every tile edge is even.
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 48)
    plan = TilePlan(32, 48, 16, 4, scale=Fraction(1, 2))
    assert torch.equal(plan.apply(lambda t: F.avg_pool2d(t, 2), x), F.avg_pool2d(x, 2))
    with pytest.raises(ValueError, match="whole output pixel"):
        TilePlan(33, 48, 16, 4, scale=Fraction(1, 2))


def test_tile_plan_blend_weights_by_hand() -> None:
    plan = TilePlan(1, 10, tile=(1, 6), overlap=(0, 2))
    tiles = list(plan)
    assert [(t.left, t.right) for t in tiles] == [(0, 6), (4, 10)]
    # Raised cosine over a 2-pixel overlap: 0.5 - 0.5 cos(pi k / 3), k = 1, 2 -> 0.25, 0.75.
    expected = torch.tensor([[1.0, 1, 1, 1, 0.75, 0.25]], dtype=torch.float64)
    assert torch.allclose(plan.weight(tiles[0]), expected)
    assert torch.allclose(plan.weight(tiles[1]), expected.flip(1))
    # Tile 0 outputs 0, tile 1 outputs 1: the overlap cross-fades.
    calls = iter([0.0, 1.0])
    out = plan.apply(lambda t: torch.full_like(t, next(calls)), torch.zeros(1, 1, 1, 10))
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0, 0, 0, 0.25, 0.75, 1, 1, 1, 1]))


def test_tile_plan_grid_covers_the_input_with_full_tiles() -> None:
    plan = TilePlan(50, 21, 16, 4)
    assert plan.rows == [(0, 16), (12, 28), (24, 40), (34, 50)]
    assert plan.cols == [(0, 16), (5, 21)]
    assert len(plan) == 8


def test_tile_plan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="overlap in"):
        TilePlan(32, 32, 8, 8)
    with pytest.raises(ValueError, match="scale"):
        TilePlan(32, 32, 8, 2, scale=0)
    with pytest.raises(ValueError, match="must end in"):
        TilePlan(32, 32, 8, 2).apply(lambda t: t, torch.zeros(1, 3, 32, 31))
    with pytest.raises(ValueError, match="fn must map"):
        TilePlan(32, 32, 8, 2, scale=2).apply(lambda t: t, torch.zeros(1, 3, 32, 32))


# ChunkPlan -------------------------------------------------------------------------------


def test_valid_length_and_padding_by_hand() -> None:
    assert [valid_length(n, "8n+1") for n in (1, 2, 9, 10, 17)] == [1, 9, 9, 17, 17]
    assert [valid_length(n, "4n+1") for n in (1, 4, 5, 6)] == [1, 5, 5, 9]
    frames = torch.arange(4.0)
    assert torch.equal(pad_frames(frames, 7), torch.tensor([0.0, 1, 2, 3, 3, 3, 3]))
    assert torch.equal(pad_frames(frames, 7, "reflect"), torch.tensor([0.0, 1, 2, 3, 2, 1, 0]))
    assert torch.equal(pad_frames(frames, 4, "reflect"), frames)
    with pytest.raises(ValueError, match="at most T - 1"):
        pad_frames(frames, 8, "reflect")


def test_chunk_plan_8n_plus_1_chunks_by_hand() -> None:
    plan = ChunkPlan(20, 9, 2, align="8n+1")
    assert [(c.start, c.stop) for c in plan] == [(0, 9), (7, 16), (11, 20)]
    assert ChunkPlan(5, 9, 2, align="8n+1").chunks[0].stop == 5
    with pytest.raises(ValueError, match="8n\\+1 frames"):
        ChunkPlan(20, 8, 2, align="8n+1")


@pytest.mark.parametrize(
    ("num_frames", "chunk", "overlap", "align"),
    [
        (20, 9, 2, "8n+1"),
        (20, 9, 4, None),
        (7, 5, 0, "4n+1"),
        (5, 9, 3, "8n+1"),
        (1, 5, 1, "4n+1"),
        (33, 17, 8, "8n+1"),
    ],
)
def test_chunk_plan_identity_is_exact(num_frames: int, chunk: int, overlap: int, align: str | None) -> None:
    torch.manual_seed(0)
    frames = torch.randn(num_frames, 3, 4, 5)
    lengths = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        lengths.append(len(x))
        return x

    assert torch.equal(ChunkPlan(num_frames, chunk, overlap, align=align).apply(identity, frames), frames)
    if align is not None:
        assert all(valid_length(n, align) == n for n in lengths)


def test_chunk_plan_per_frame_function_equals_unchunked() -> None:
    torch.manual_seed(0)
    frames = torch.randn(23, 3, 6, 7)
    plan = ChunkPlan(23, 9, 3, align="8n+1")
    assert torch.equal(plan.apply(upscale2, frames), upscale2(frames))


def interpolate2(x: torch.Tensor) -> torch.Tensor:
    """Space-time stand-in: doubles the frame rate with midpoints, (L, ...) -> (2L - 1, ...)."""
    out = torch.empty(2 * len(x) - 1, *x.shape[1:])
    out[0::2] = x
    out[1::2] = (x[:-1] + x[1:]) / 2
    return out


def test_chunk_plan_temporal_scale_maps_chunks_onto_output_times() -> None:
    torch.manual_seed(0)
    frames = torch.randn(12, 2, 3)
    plan = ChunkPlan(12, 5, 2, align="4n+1", temporal_scale=2)
    assert [(c.out_start, c.out_stop) for c in plan] == [(0, 9), (6, 15), (12, 21), (14, 23)]
    assert plan.out_frames == 23
    assert torch.equal(plan.apply(interpolate2, frames), interpolate2(frames))
    with pytest.raises(ValueError, match="overlap must be at least 1"):
        ChunkPlan(12, 5, 0, temporal_scale=2)


def test_chunk_plan_cross_fade_by_hand() -> None:
    plan = ChunkPlan(6, 4, 2)
    assert torch.allclose(plan.weight(0), torch.tensor([1.0, 1, 0.75, 0.25], dtype=torch.float64))
    calls = iter([0.0, 1.0])
    out = plan.apply(lambda x: torch.full_like(x, next(calls)), torch.zeros(6, 1))
    assert torch.allclose(out[:, 0], torch.tensor([0.0, 0, 0.25, 0.75, 1, 1]))


def test_chunk_plan_stream_holds_one_chunk() -> None:
    frames = torch.randn(30, 2)
    consumed = []

    def source():
        for i, frame in enumerate(frames):
            consumed.append(i)
            yield frame

    plan = ChunkPlan(30, 9, 2, align="8n+1")
    out = plan.stream(lambda x: x, source())
    first = next(out)
    assert torch.equal(first, frames[0])
    assert len(consumed) == 9  # only the first chunk was read
    rest = list(out)
    assert torch.equal(torch.stack([first, *rest]), frames)


def test_chunk_plan_stream_checks_the_number_of_frames() -> None:
    plan = ChunkPlan(10, 5, 1)
    with pytest.raises(ValueError, match="ended after 8 of 10"):
        list(plan.stream(lambda x: x, iter(torch.zeros(8, 1))))
    with pytest.raises(ValueError, match="more than the plan's 10"):
        list(plan.stream(lambda x: x, iter(torch.zeros(11, 1))))
    with pytest.raises(ValueError, match="fn must map 5 frames to 5"):
        plan.apply(lambda x: x[:-1], torch.zeros(10, 1))


@pytest.mark.parametrize(
    ("chunk", "overlap", "align", "temporal_scale"),
    [(5, 1, "4n+1", 1), (9, 2, "8n+1", 1), (4, 0, None, 1), (5, 3, None, 1), (5, 1, "4n+1", 2), (5, 3, None, 2)],
)
def test_stream_chunks_equals_the_chunk_plan_without_knowing_the_length(
        chunk: int, overlap: int, align: str | None, temporal_scale: int) -> None:
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        # Depends on the chunk it sees (its mean), so every chunk boundary and weight shows in the output.
        calls.append(len(x))
        out = interpolate2(x) if temporal_scale == 2 else x
        return out * 2 + x.mean()

    for num_frames in range(1, 3 * chunk + 4):
        torch.manual_seed(num_frames)
        frames = torch.randn(num_frames, 2, 3)
        plan = ChunkPlan(num_frames, chunk, overlap, align=align, temporal_scale=temporal_scale)
        expected = plan.apply(fn, frames)
        planned_calls, calls[:] = list(calls), []
        got = torch.stack(list(stream_chunks(fn, iter(frames), chunk, overlap, align=align,
                                             temporal_scale=temporal_scale)))
        assert calls == planned_calls, num_frames
        assert torch.equal(got, expected), num_frames
        calls.clear()


def test_stream_chunks_reads_ahead_only_to_the_next_chunk_start() -> None:
    frames = torch.randn(40, 2)
    consumed = []

    def source():
        for i, frame in enumerate(frames):
            consumed.append(i)
            yield frame

    out = stream_chunks(lambda x: x, source(), 9, 2, align="8n+1")
    first = next(out)
    # The first chunk is [0, 9); the next one starts at 7 unless the clip ends before 16 (then at T - 9):
    # frames 0..16 tell which.
    assert len(consumed) == 17 and torch.equal(first, frames[0])
    assert torch.equal(torch.stack([first, *out]), frames)
    assert list(stream_chunks(lambda x: x, iter([]), 9, 2)) == []
    with pytest.raises(ValueError, match="chunk must have 8n\\+1 frames"):
        next(stream_chunks(lambda x: x, iter(frames), 8, 2, align="8n+1"))


def test_reflect_padding_needs_each_side_shorter_than_the_frame() -> None:
    frame = torch.rand(3, 6, 6)
    padded, padding = pad_to_multiple(frame, 16, "reflect", centred=True)  # 5 on each side of 6 pixels
    assert padded.shape == (3, 16, 16) and torch.equal(padding.crop(padded), frame)
    with pytest.raises(ValueError, match="reflect padding of 6x6"):
        pad_to_multiple(frame, 16, "reflect")  # all 10 on one side
    with pytest.raises(ValueError, match="reflect padding of 5x5"):
        pad_to_multiple(torch.rand(3, 5, 5), 16, "reflect", centred=True)  # 6 below 5 pixels
