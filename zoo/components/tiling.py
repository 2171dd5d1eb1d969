"""Spatial tiles and temporal chunks with blended overlaps.

A plan cuts an axis into overlapping segments `[start, stop)`: consecutive segments start
`size - overlap` apart and the last one is shifted back to end at the axis end, so every segment
but the ones on an axis shorter than `size` has the full size. Each segment's output is blended
into the result with weights that ramp up (raised cosine) over the overlap with the previous
segment and down over the overlap with the next one.

Blending keeps a running weighted mean, `out <- lerp(out, y, w / (w_sum + w))`: it equals the
normalised weighted sum `sum(w_i y_i) / sum(w_i)`, and where all segments agree it returns their
value bit for bit, so an identity function through any plan reproduces its input exactly.

`ChunkPlan` needs the clip's length up front; `stream_chunks` runs the same plan over frames whose
number is known only when they end (a decoder, a camera), reading ahead to the next chunk's start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

ALIGNS = {"4n+1": 4, "8n+1": 8}
"""Chunk lengths of the causal video VAEs: the Wan2.1 and CogVideoX VAEs take `4n+1` frames (one
latent frame for the first frame, one per 4 after it); CogVideoX1.5 runs on `8n+1` (e.g. 81)."""


def _segments(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Overlapping `[start, stop)` segments of `size` covering `range(length)`; one if `length <= size`."""
    if length <= size:
        return [(0, length)]
    stride = size - overlap
    starts = [*range(0, length - size, stride), length - size]
    return [(start, start + size) for start in starts]


def _ramp(n: int) -> Tensor:
    """`n` raised-cosine weights rising in (0, 1); a ramp and its mirror image sum to 1."""
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(math.pi * k / (n + 1))


def _blend_weights(outputs: list[tuple[int, int]], index: int) -> Tensor:
    """Weights over the output range of segment `index`: ramps across its overlaps with its neighbours."""
    start, stop = outputs[index]
    weight = torch.ones(stop - start, dtype=torch.float64)
    if index > 0:
        n = min(outputs[index - 1][1], stop) - start
        if n > 0:
            weight[:n] *= _ramp(n)
    if index + 1 < len(outputs):
        n = stop - max(outputs[index + 1][0], start)
        if n > 0:
            weight[stop - start - n :] *= _ramp(n).flip(0)
    return weight


class _RunningMean:
    """Running weighted mean of segment outputs written into one canvas."""

    def __init__(self, canvas: Tensor, weight_sum: Tensor) -> None:
        self.canvas = canvas
        self.weight_sum = weight_sum

    def add(self, index: tuple[slice, ...], value: Tensor, weight: Tensor) -> None:
        total = self.weight_sum[index] + weight
        fraction = (weight / total).to(value.dtype)
        self.canvas[index] = torch.lerp(self.canvas[index], value, fraction)
        self.weight_sum[index] = total


def _as_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
    return pair


@dataclass(frozen=True)
class Tile:
    """One spatial tile: input rows/columns `[top, bottom) x [left, right)` and the output ones."""

    top: int
    bottom: int
    left: int
    right: int
    out_top: int
    out_bottom: int
    out_left: int
    out_right: int

    @property
    def input_index(self) -> tuple[slice, slice]:
        """Index of the tile in the last two dims of the input, `x[..., *tile.input_index]`."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    @property
    def output_index(self) -> tuple[slice, slice]:
        """Index of the tile's output in the last two dims of the output."""
        return slice(self.out_top, self.out_bottom), slice(self.out_left, self.out_right)


class TilePlan:
    """Overlapping spatial tiles of an `height x width` input and their blend weights.

    The plan works in any space (pixels, latents): `scale` is the ratio of output to input size,
    an integer for upscaling (4 for a x4 network, 8 for a VAE decoder) or a fraction such as
    `Fraction(1, 8)` for a VAE encoder, in which case every tile edge must land on a whole output
    pixel.

    Args:
        height: input height.
        width: input width.
        tile: tile size in input pixels, an int or `(tile_h, tile_w)`; an axis shorter than its tile
            is one tile.
        overlap: overlap between neighbouring tiles in input pixels, int or pair, `< tile`.
        scale: output size / input size.
        context: input pixels read around each tile (as far as the input reaches) and cropped
            from its output by `apply`: a function whose output pixels depend on inputs up to
            `context` pixels away (bicubic upsampling: 2) then sees the same neighbourhood as on
            the whole input, and tiles agree exactly; the overlaps blend the rest.
    """

    def __init__(
        self,
        height: int,
        width: int,
        tile: int | tuple[int, int],
        overlap: int | tuple[int, int] = 0,
        scale: int | Fraction = 1,
        context: int = 0,
    ) -> None:
        tile_hw, overlap_hw = _as_pair(tile, "tile"), _as_pair(overlap, "overlap")
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be positive, got {height} x {width}")
        for size, ov in zip(tile_hw, overlap_hw):
            if size < 1 or not 0 <= ov < size:
                raise ValueError(
                    f"tile must be positive and overlap in [0, tile), got tile {tile} and overlap {overlap}"
                )
        scale = Fraction(scale)
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.height, self.width, self.scale = height, width, scale
        self.context = context
        self._scaled(context)  # the crop must be whole output pixels
        self.out_height, self.out_width = self._scaled(height), self._scaled(width)
        self.rows = _segments(height, tile_hw[0], overlap_hw[0])
        self.cols = _segments(width, tile_hw[1], overlap_hw[1])
        self.out_rows = [(self._scaled(a), self._scaled(b)) for a, b in self.rows]
        self.out_cols = [(self._scaled(a), self._scaled(b)) for a, b in self.cols]

    def _scaled(self, position: int) -> int:
        scaled = position * self.scale
        if scaled.denominator != 1:
            raise ValueError(f"tile edge {position} times scale {self.scale} is not a whole output pixel")
        return int(scaled)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def __iter__(self) -> Iterator[Tile]:
        for (top, bottom), (out_top, out_bottom) in zip(self.rows, self.out_rows):
            for (left, right), (out_left, out_right) in zip(self.cols, self.out_cols):
                yield Tile(top, bottom, left, right, out_top, out_bottom, out_left, out_right)

    def weight(self, tile: Tile) -> Tensor:
        """Blend weight `(out_h, out_w)` (float64, positive) of `tile` over its output region."""
        i = self.out_rows.index((tile.out_top, tile.out_bottom))
        j = self.out_cols.index((tile.out_left, tile.out_right))
        return _blend_weights(self.out_rows, i)[:, None] * _blend_weights(self.out_cols, j)[None, :]

    def _run(self, fn: Callable[[Tensor], Tensor], x: Tensor, tile: Tile) -> Tensor:
        """`fn` on `tile` read with its context, cropped back to the tile's output region."""
        c = self.context
        top, bottom = max(tile.top - c, 0), min(tile.bottom + c, self.height)
        left, right = max(tile.left - c, 0), min(tile.right + c, self.width)
        y = fn(x[..., top:bottom, left:right])
        expected = (self._scaled(bottom - top), self._scaled(right - left))
        if tuple(y.shape[-2:]) != expected:
            raise ValueError(f"fn must map a tile to size {expected}, got {tuple(y.shape)}")
        if c == 0:
            return y
        out_top, out_left = self._scaled(tile.top - top), self._scaled(tile.left - left)
        height, width = tile.out_bottom - tile.out_top, tile.out_right - tile.out_left
        return y[..., out_top : out_top + height, out_left : out_left + width]

    def apply(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Run `fn` tile by tile over the last two dims of `x` and blend the outputs.

        Args:
            fn: maps a tile `(..., h, w)` to `(..., scale * h, scale * w)`; its leading dims may
                differ from the input's (channels in, channels out) but must be the same for all tiles.
            x: `(..., height, width)`, e.g. `(N, C, H, W)` or `(N, C, T, H, W)`.

        Returns:
            `(..., scale * height, scale * width)`.
        """
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"x must end in ({self.height}, {self.width}) for this plan, got {tuple(x.shape)}")
        blend = None
        for tile in self:
            y = self._run(fn, x, tile)
            if blend is None:
                canvas = y.new_zeros((*y.shape[:-2], self.out_height, self.out_width))
                weight_sum = torch.zeros(self.out_height, self.out_width, device=y.device)
                blend = _RunningMean(canvas, weight_sum)
            blend.add((..., *tile.output_index), y, self.weight(tile).to(y.device, torch.float32))
        return blend.canvas


def valid_length(num_frames: int, align: str) -> int:
    """The smallest chunk length `>= num_frames` of the form `align` (`"4n+1"` or `"8n+1"`)."""
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {sorted(ALIGNS)}, got {align!r}")
    step = ALIGNS[align]
    return math.ceil((num_frames - 1) / step) * step + 1


def pad_frames(frames: Tensor, length: int, mode: str = "repeat") -> Tensor:
    """Pad a clip `(T, ...)` to `length` frames at its end.

    Args:
        frames: `(T, ...)`.
        length: frames wanted, `>= T`.
        mode: `"repeat"` repeats the last frame; `"reflect"` mirrors the clip around its last frame
            (`..., T-2, T-1, T-2, T-3, ...`) and needs `length - T < T`.
    """
    pad = length - frames.shape[0]
    if pad < 0:
        raise ValueError(f"length {length} is shorter than the clip's {frames.shape[0]} frames")
    if mode not in ("repeat", "reflect"):
        raise ValueError(f"mode must be 'repeat' or 'reflect', got {mode!r}")
    if pad == 0:
        return frames
    if mode == "repeat":
        tail = frames[-1:].expand(pad, *frames.shape[1:])
    else:
        if pad >= frames.shape[0]:
            raise ValueError(f"reflect padding adds at most T - 1 = {frames.shape[0] - 1} frames, asked for {pad}")
        tail = frames[-pad - 1 : -1].flip(0)
    return torch.cat([frames, tail])


@dataclass(frozen=True)
class Padding:
    """Pixels added on each side of a frame: `(left, right, top, bottom)`."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def crop(self, x: Tensor, scale: int = 1) -> Tensor:
        """Remove this padding, times `scale` (the output's pixels per input pixel), from `(..., H, W)`."""
        height, width = x.shape[-2:]
        return x[..., self.top * scale : height - self.bottom * scale, self.left * scale : width - self.right * scale]


def pad_to_multiple(x: Tensor, multiple: int, mode: str = "replicate", centred: bool = False) -> tuple[Tensor, Padding]:
    """Pad the last two dimensions of `x` up to multiples of `multiple`.

    Args:
        x: `(..., H, W)`; 3-D and 4-D tensors (`F.pad`'s spatial modes).
        multiple: the size both dimensions must divide by.
        mode: `"replicate"`, `"reflect"` or `"constant"` (zeros).
        centred: split the padding between both sides (the larger half after); else all of it goes
            right and bottom.

    Returns:
        The padded tensor and the `Padding` that `Padding.crop` undoes.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if centred:
        padding = Padding(pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    else:
        padding = Padding(0, pad_w, 0, pad_h)
    if not (pad_h or pad_w):
        return x, padding
    # Reflection mirrors pixels inside the frame: each side's padding must be shorter than the frame.
    if mode == "reflect" and (max(padding.top, padding.bottom) >= height or max(padding.left, padding.right) >= width):
        raise ValueError(f"reflect padding of {height}x{width} to a multiple of {multiple} needs more pixels than "
                         f"the frame has")
    padded = torch.nn.functional.pad(x, (padding.left, padding.right, padding.top, padding.bottom), mode=mode)
    return padded, padding


@dataclass(frozen=True)
class Chunk:
    """One temporal chunk: input frames `[start, stop)` and output frames `[out_start, out_stop)`."""

    start: int
    stop: int
    out_start: int
    out_stop: int


def _check_chunking(chunk: int, overlap: int, align: str | None, temporal_scale: int, pad_mode: str, *,
                    several_chunks: bool) -> None:
    """The argument checks shared by `ChunkPlan` and `stream_chunks`."""
    if chunk < 1 or not 0 <= overlap < chunk:
        raise ValueError(f"chunk must be positive and overlap in [0, chunk), got chunk {chunk} and overlap {overlap}")
    if align is not None and valid_length(chunk, align) != chunk:
        raise ValueError(f"chunk must have {align} frames for align={align!r}, got {chunk}")
    if temporal_scale < 1:
        raise ValueError(f"temporal_scale must be a positive int, got {temporal_scale}")
    if temporal_scale > 1 and overlap < 1 and several_chunks:
        raise ValueError("overlap must be at least 1 frame when temporal_scale > 1")
    if pad_mode not in ("repeat", "reflect"):
        raise ValueError(f"pad_mode must be 'repeat' or 'reflect', got {pad_mode!r}")


def _run_chunk(fn: Callable[[Tensor], Tensor], frames: Tensor, align: str | None, temporal_scale: int,
               pad_mode: str) -> Tensor:
    """`fn` on one chunk `(L, ...)`, padded to a valid `align` length first and cropped back after."""
    inputs = frames if align is None else pad_frames(frames, valid_length(len(frames), align), pad_mode)
    y = fn(inputs)
    expected = (len(inputs) - 1) * temporal_scale + 1
    if y.shape[0] != expected:
        raise ValueError(f"fn must map {len(inputs)} frames to {expected}, got {y.shape[0]}")
    return y[: (len(frames) - 1) * temporal_scale + 1]


class _OverlapBuffer:
    """Output frames of consecutive chunks, blended while a later chunk can still overlap them."""

    def __init__(self) -> None:
        self.blend: _RunningMean | None = None
        self.first = 0  # output index of blend.canvas[0]

    def add(self, out_start: int, y: Tensor, weight: Tensor) -> None:
        """Blend chunk outputs `y` `(L, ...)`, first output frame `out_start`, with per-frame `weight` `(L,)`."""
        weight = weight.to(y.device, torch.float32).reshape(-1, *[1] * (y.ndim - 1))
        if self.blend is None:
            self.blend = _RunningMean(torch.zeros_like(y), torch.zeros_like(weight))
            self.first = out_start
        blend = self.blend
        grow = out_start + len(y) - self.first - blend.canvas.shape[0]
        if grow > 0:
            blend.canvas = torch.cat([blend.canvas, y.new_zeros((grow, *y.shape[1:]))])
            blend.weight_sum = torch.cat([blend.weight_sum, weight.new_zeros((grow, *weight.shape[1:]))])
        offset = out_start - self.first
        blend.add((slice(offset, offset + len(y)),), y, weight)

    def release(self, stop: int) -> list[Tensor]:
        """The finished output frames before output index `stop`, removed from the buffer."""
        count = stop - self.first
        frames = list(self.blend.canvas[:count].unbind(0))
        self.blend.canvas = self.blend.canvas[count:]
        self.blend.weight_sum = self.blend.weight_sum[count:]
        self.first = stop
        return frames


class ChunkPlan:
    """Overlapping temporal chunks of a clip with cross-faded overlaps.

    With `temporal_scale = s`, output frame `o` shows input time `o / s`: the clip's `T` frames
    give `(T - 1) * s + 1` output frames and chunk `[a, b)` gives output frames
    `[a * s, (b - 1) * s + 1)` (the last input frame is not followed by interpolated frames).
    `s = 1` is plain one-frame-in, one-frame-out.

    Args:
        num_frames: frames `T` of the clip.
        chunk: input frames per chunk; a clip shorter than `chunk` is one chunk.
        overlap: input frames shared by neighbouring chunks, `< chunk` (and `>= 1` when `s > 1`,
            so that the interpolated frames between chunks have a chunk that makes them).
        align: `"4n+1"` / `"8n+1"` makes `chunk` a valid causal-VAE length (checked) and pads a
            shorter clip up to the next valid length before `fn` (outputs cropped back); `None`
            leaves lengths free.
        temporal_scale: output frames per input frame interval `s`.
        pad_mode: how `apply`/`stream` pad a short clip for `align`: `"repeat"` or `"reflect"`.
    """

    def __init__(
        self,
        num_frames: int,
        chunk: int,
        overlap: int = 0,
        *,
        align: str | None = None,
        temporal_scale: int = 1,
        pad_mode: str = "repeat",
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        _check_chunking(chunk, overlap, align, temporal_scale, pad_mode, several_chunks=num_frames > chunk)
        self.num_frames, self.align, self.temporal_scale, self.pad_mode = num_frames, align, temporal_scale, pad_mode
        s = temporal_scale
        self.out_frames = (num_frames - 1) * s + 1
        self.chunks = [Chunk(a, b, a * s, (b - 1) * s + 1) for a, b in _segments(num_frames, chunk, overlap)]
        self._outputs = [(c.out_start, c.out_stop) for c in self.chunks]

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def weight(self, index: int) -> Tensor:
        """Cross-fade weight (float64, positive) over the output frames of chunk `index`."""
        return _blend_weights(self._outputs, index)

    def stream(self, fn: Callable[[Tensor], Tensor], frames: Iterable[Tensor]) -> Iterator[Tensor]:
        """Run `fn` chunk by chunk over frames arriving one at a time; yield finished output frames.

        Holds at most one chunk of input frames and the output frames still inside an overlap.

        Args:
            fn: maps a chunk `(L, ...)` to `((L - 1) * temporal_scale + 1, ...)`.
            frames: `num_frames` frames, each `(...)`.

        Yields:
            Output frames `(...)` in order, `(num_frames - 1) * temporal_scale + 1` of them.
        """
        source = iter(frames)
        inputs: list[Tensor] = []
        first_input = 0  # index of inputs[0] in the clip
        pending = _OverlapBuffer()
        for i, chunk in enumerate(self.chunks):
            while first_input + len(inputs) < chunk.stop:
                frame = next(source, None)
                if frame is None:
                    raise ValueError(f"frames ended after {first_input + len(inputs)} of {self.num_frames} frames")
                inputs.append(frame)
            inputs = inputs[chunk.start - first_input :]
            first_input = chunk.start
            y = _run_chunk(fn, torch.stack(inputs[: chunk.stop - chunk.start]), self.align, self.temporal_scale,
                           self.pad_mode)
            pending.add(chunk.out_start, y, self.weight(i))
            done = self.chunks[i + 1].out_start if i + 1 < len(self.chunks) else chunk.out_stop
            yield from pending.release(done)
        if next(source, None) is not None:
            raise ValueError(f"frames hold more than the plan's {self.num_frames} frames")

    def apply(self, fn: Callable[[Tensor], Tensor], frames: Tensor) -> Tensor:
        """Run `fn` chunk by chunk over a whole clip `(T, ...)`; returns `((T - 1) * s + 1, ...)`."""
        if frames.shape[0] != self.num_frames:
            raise ValueError(f"frames must hold the plan's {self.num_frames} frames, got {frames.shape[0]}")
        return torch.stack(list(self.stream(fn, frames.unbind(0))))


def stream_chunks(
    fn: Callable[[Tensor], Tensor],
    frames: Iterable[Tensor],
    chunk: int,
    overlap: int = 0,
    *,
    align: str | None = None,
    temporal_scale: int = 1,
    pad_mode: str = "repeat",
) -> Iterator[Tensor]:
    """`ChunkPlan(T, chunk, overlap, ...).stream(fn, frames)` for a clip whose length `T` is known only at its end.

    A decoder or a camera yields frames without saying how many will come, while `ChunkPlan` places its
    last chunk to end at the clip's end and cross-fades every chunk with its neighbours. Both are fixed
    here as soon as they can be: before running a chunk, frames are read until the next chunk's start
    is known (at most `chunk - overlap + 1` frames past the chunk's end), so the chunks, their outputs
    and their weights are exactly `ChunkPlan`'s for the `T` frames that arrive. Holds at most
    `2 * chunk - overlap + 1` input frames and the output frames still inside an overlap.

    Args:
        fn: maps a chunk `(L, ...)` to `((L - 1) * temporal_scale + 1, ...)`.
        frames: the clip's frames, each `(...)`.
        chunk: input frames per chunk.
        overlap: input frames shared by neighbouring chunks, `< chunk`.
        align: `"4n+1"` / `"8n+1"` or None, as for `ChunkPlan`.
        temporal_scale: output frames per input frame interval.
        pad_mode: how a chunk shorter than a valid `align` length is padded.

    Yields:
        Output frames `(...)` in order, `(T - 1) * temporal_scale + 1` of them.
    """
    _check_chunking(chunk, overlap, align, temporal_scale, pad_mode, several_chunks=True)
    source = iter(frames)
    held: list[Tensor] = []
    first = 0  # clip index of held[0]
    ended = False

    def read_until(count: int) -> int | None:
        """Hold frames up to clip index `count - 1`; the clip's length once it is known to be shorter."""
        nonlocal ended
        while not ended and first + len(held) < count:
            frame = next(source, None)
            if frame is None:
                ended = True
            else:
                held.append(frame)
        return first + len(held) if ended else None

    s, stride = temporal_scale, chunk - overlap
    pending = _OverlapBuffer()
    previous_stop: int | None = None  # output stop of the previous chunk
    start = 0  # a chunk starting at `start` is a regular one iff start + chunk < T
    while True:
        length = read_until(start + chunk + 1)
        if length is not None and length <= start + chunk:
            if length == 0:
                return  # no frames, no output
            start, stop, next_start = max(0, length - chunk), length, None  # the last chunk ends the clip
        else:
            stop = start + chunk
            length = read_until(stop + stride + 1)
            next_start = stop - overlap if length is None or length > stop + stride else length - chunk
        y = _run_chunk(fn, torch.stack(held[start - first : stop - first]), align, s, pad_mode)
        outputs = [(start * s, (stop - 1) * s + 1)]
        if previous_stop is not None:
            outputs.insert(0, (0, previous_stop))
        if next_start is not None:
            outputs.append((next_start * s, next_start * s + 1))
        pending.add(start * s, y, _blend_weights(outputs, 0 if previous_stop is None else 1))
        yield from pending.release((stop - 1) * s + 1 if next_start is None else next_start * s)
        if next_start is None:
            return
        held = held[next_start - first :]
        first, previous_stop, start = next_start, (stop - 1) * s + 1, next_start
