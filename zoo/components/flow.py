"""Optical flow: RAFT estimator, backward warping, occlusion masks, flow resizing.

Flow convention (shared by every flow source in the zoo):

- A flow field is `(N, 2, H, W)` in pixels; channel 0 is the x (width) displacement, channel 1
  the y (height) displacement.
- Pixel `(i, j)` (row, column) has its centre at coordinate `(x, y) = (j, i)`; the image covers
  `[-0.5, W - 0.5] x [-0.5, H - 0.5]`. `warp` normalises coordinates for `grid_sample` with
  `align_corners=False`, which is exactly this convention.
- `flow_fn(src, dst)` returns the flow from `src` to `dst`: pixel `p` of `src` shows the same
  point as position `p + flow(p)` of `dst`. Hence `warp(dst, flow_fn(src, dst)) ≈ src`
  (backward warping): `warp(frames[t + 1], flow_fn(frames[t], frames[t + 1])) ≈ frames[t]`.

Every flow source (RAFT, precomputed ground truth) plugs in as a `FlowFn`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights, raft_large, raft_small
from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow
from torchvision.models.optical_flow.raft import ConvGRU

FlowFn = Callable[[Tensor, Tensor], Tensor]
"""`flow_fn(src (N, 3, H, W), dst (N, 3, H, W)) -> (N, 2, H, W)`, the flow from `src` to `dst`."""

_RAFT = {
    "large": (raft_large, Raft_Large_Weights.DEFAULT),
    "small": (raft_small, Raft_Small_Weights.DEFAULT),
}


def _check_pair(src: Tensor, dst: Tensor) -> None:
    if src.ndim != 4 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(
            f"src and dst must both be (N, 3, H, W) of one shape, got {tuple(src.shape)} and {tuple(dst.shape)}"
        )


def _check_flow(flow: Tensor, name: str = "flow") -> None:
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"{name} must be (N, 2, H, W), got {tuple(flow.shape)}")


def published_raft_weights(variant: str) -> tuple[str, Path]:
    """torchvision's published RAFT weights of `variant` (`"large"` / `"small"`): their URL, and the file
    in torch's hub cache (`<torch.hub.get_dir()>/checkpoints/`) where torchvision keeps and looks for them."""
    if variant not in _RAFT:
        raise ValueError(f"variant must be 'large' or 'small', got {variant!r}")
    url = _RAFT[variant][1].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


class FlowFeatures(NamedTuple):
    """RAFT's encodings of `N` images (`FlowEstimator.features`), for flows from or to them (`estimator(src, dst)`).

    Attributes:
        fmap: the feature encoder's output `(N, C, h, w)` (`h`, `w`: the padded size / 8), for either end.
        hidden, context: the context encoder's split, the GRU's initial state and its context input, for a source;
            None in the encodings of images that are only ever a destination (`features(..., source=False)`).
        height, width: the images' size, before RAFT's padding.
    """

    fmap: Tensor
    hidden: Tensor | None
    context: Tensor | None
    height: int
    width: int

    @property
    def is_source(self) -> bool:
        """Whether a flow can start from these images (their context encodings are here)."""
        return self.hidden is not None

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def destination(self) -> FlowFeatures:
        """These encodings without the context, which a flow's destination does not need (less to keep)."""
        # Built by the constructor, not `_replace`: dynamo (torch 2.11) cannot return a tuple that `_replace` made.
        return FlowFeatures(self.fmap, None, None, self.height, self.width)

    def describe(self) -> str:
        return f"{self.fmap.shape[0]} image(s) of {self.height}x{self.width}{'' if self.is_source else ' (no context)'}"

    @staticmethod
    def cat(parts: list[FlowFeatures]) -> FlowFeatures:
        """The features of the images of `parts`, in order, as one batch (all of one size)."""
        if len({part.size for part in parts}) != 1 or len({part.is_source for part in parts}) != 1:
            raise ValueError(f"features to join must be of one image size and all with or all without context, "
                             f"got {[part.describe() for part in parts]}")
        fields = (None if tensors[0] is None else torch.cat(tensors) for tensors in zip(*(part[:3] for part in parts)))
        return FlowFeatures(*fields, *parts[0].size)


class FlowEstimator(nn.Module):
    """Frozen torchvision RAFT as a `FlowFn`: `estimator(src, dst)` is the flow from `src` to `dst`.

    Inputs are `(N, 3, H, W)` in `[0, 1]` (or in RAFT's own `[-1, 1]` with `signed_inputs`) of any
    size; they are padded (edge replication) to a multiple of 8 and at least RAFT's minimum size (128
    for the 4-level correlation pyramid), and the flow is cropped back; sizes that need neither run
    as they are. The `N` pairs run as one batch, without gradients.

    Args:
        variant: `"large"` (`raft_large`) or `"small"` (`raft_small`).
        pretrained: load torchvision's published weights (`Raft_Large_Weights.DEFAULT` /
            `Raft_Small_Weights.DEFAULT`); `False` keeps the random initialisation.
        num_flow_updates: RAFT's recurrent refinement iterations (12 by default in RAFT); fewer is
            faster and coarser.
        autocast_dtype: run RAFT under `torch.autocast` with this dtype (`torch.bfloat16` or
            `torch.float16` on CUDA); `None` runs in the module's dtype, float32 also inside a model cast
            to a half dtype (`_apply`). The flow is returned in float32 either way.
        signed_inputs: images come in RAFT's input range `[-1, 1]` and are used as they are (e.g.
            bicubic-upsampled frames with their overshoot); else they are in `[0, 1]` and rescaled.
    """

    def __init__(
        self,
        variant: str = "large",
        pretrained: bool = True,
        num_flow_updates: int = 12,
        autocast_dtype: torch.dtype | None = None,
        signed_inputs: bool = False,
    ) -> None:
        super().__init__()
        if variant not in _RAFT:
            raise ValueError(f"variant must be 'large' or 'small', got {variant!r}")
        if num_flow_updates < 1:
            raise ValueError(f"num_flow_updates must be at least 1, got {num_flow_updates}")
        build, weights = _RAFT[variant]
        self.raft = build(weights=None)
        if pretrained:
            try:
                state = weights.get_state_dict(progress=False, check_hash=True)
            except URLError as err:
                url, path = published_raft_weights(variant)
                raise FileNotFoundError(
                    f"RAFT weights {path} ({weights}) are missing and could not be downloaded ({err.reason}); "
                    f"download {url} to that path, or pass pretrained=False"
                ) from None
            self.raft.load_state_dict(state)
        self.raft.requires_grad_(False)
        self.raft.eval()
        self.num_flow_updates = num_flow_updates
        self.autocast_dtype = autocast_dtype
        self.signed_inputs = signed_inputs
        # Images are downsampled 8x, then the correlation volume 2x per extra pyramid level, and
        # its coarsest level needs at least 2 entries per side.
        self.min_size = 8 * 2 * 2 ** (self.raft.corr_block.num_levels - 1)
        self._constants: dict[tuple, tuple[Tensor, tuple[Tensor, ...]]] = {}
        self._gates: dict[ConvGRU, tuple[tuple[Tensor, ...], tuple, Tensor, Tensor]] = {}

    def _apply(self, fn: Any, recurse: bool = True) -> FlowEstimator:
        # A float32 island: casting a model to a half dtype leaves RAFT in float32. Its correlation volumes
        # and recurrent updates accumulate flow in pixels, where bfloat16's 8-bit mantissa is off by whole
        # pixels on HD frames; `autocast_dtype` is the explicit way to run it in half precision.
        def keep_float32(tensor: Tensor) -> Tensor:
            out = fn(tensor)
            return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

        return super()._apply(keep_float32, recurse)

    def train(self, mode: bool = True) -> FlowEstimator:
        # RAFT is frozen: a parent module switching to train mode must not update its BatchNorm stats.
        super().train(mode)
        self.raft.eval()
        return self

    def compile_modules(self) -> list[nn.Module | tuple[nn.Module, str]]:
        """The RAFT modules `final_flow` calls, the correlation lookup (`correlation_features`) and the update
        (`update`), for compiling one by one: the lookup and the update are called `num_flow_updates` times with
        the same shapes and compile once each."""
        raft = self.raft
        modules = [raft.feature_encoder, raft.context_encoder, (self, "correlation_features"), (self, "update")]
        return modules if raft.mask_predictor is None else [*modules, raft.mask_predictor]

    def _padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """`F.pad`'s (left, right, top, bottom): edge replication to a multiple of 8 and at least `min_size`."""
        pad_h = max(math.ceil(height / 8) * 8, self.min_size) - height
        pad_w = max(math.ceil(width / 8) * 8, self.min_size) - width
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2

    def _prepare(self, images: Tensor) -> Tensor:
        """Images as RAFT takes them: on its device and dtype, in `[-1, 1]`, padded (`_padding`)."""
        param = next(self.raft.parameters())
        images = images.to(param.device, param.dtype)
        if not self.signed_inputs:
            images = images * 2 - 1  # RAFT expects images in [-1, 1]
        pad = self._padding(*images.shape[-2:])
        return F.pad(images, pad, mode="replicate") if any(pad) else images

    def _crop(self, flow: Tensor, height: int, width: int) -> Tensor:
        left, _, top, _ = self._padding(height, width)
        return flow[..., top : top + height, left : left + width].float()

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        # No autocast context without a dtype: `torch.autocast` refuses device types it has no default for (meta).
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def forward(self, src: Tensor | FlowFeatures, dst: Tensor | FlowFeatures) -> Tensor:
        """Flow `(N, 2, H, W)` from `src` to `dst`: both images `(N, 3, H, W)` in `[0, 1]` (`[-1, 1]` if
        `signed_inputs`), or both their `features`."""
        if isinstance(src, FlowFeatures) or isinstance(dst, FlowFeatures):
            return self._flow_between(src, dst)
        _check_pair(src, dst)
        image1, image2 = self._prepare(torch.cat([src, dst])).chunk(2)
        with self._autocast(image1.device):
            flow = self.final_flow(image1, image2)
        return self._crop(flow, *src.shape[-2:])

    @torch.no_grad()
    def features(self, images: Tensor, *, source: bool = True) -> FlowFeatures:
        """What RAFT computes from each of `images` `(N, 3, H, W)` alone: `self(src_features, dst_features)` is
        then `self(src_images, dst_images)`.

        A frame that takes part in several flows (OS-DiffVSR's frames are the source of one window's two flows
        and the destination of two other windows' flows; a Stream-DiffVSR frame is the source of its own flow
        and the destination of the next frame's) is encoded once this way, where `forward` encodes both images
        of every pair it is given.

        Args:
            images: in `[0, 1]` (`[-1, 1]` if `signed_inputs`).
            source: also run the context encoder, which only a flow's source needs; `False` for images that are
                only ever a destination (a stream's first frame), which then have no `hidden` and `context`.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        prepared = self._prepare(images)
        with self._autocast(prepared.device):
            hidden, context = self._context(prepared) if source else (None, None)
            return FlowFeatures(self.raft.feature_encoder(prepared), hidden, context, *images.shape[-2:])

    def _flow_between(self, src: FlowFeatures, dst: FlowFeatures) -> Tensor:
        if not (isinstance(src, FlowFeatures) and isinstance(dst, FlowFeatures)):
            raise ValueError(f"src and dst must both be images or both FlowFeatures, got {type(src).__name__} and "
                             f"{type(dst).__name__}")
        if src.fmap.shape != dst.fmap.shape or src.size != dst.size:
            raise ValueError(f"src and dst features must be of one batch and image size, got {src.describe()} and "
                             f"{dst.describe()}")
        if not src.is_source:
            raise ValueError("src features were made with source=False: a flow's source needs its context encodings")
        with self._autocast(src.fmap.device):
            flow = self._refine(src.fmap, dst.fmap, src.hidden, src.context)
        return self._crop(flow, *src.size)

    def final_flow(self, image1: Tensor, image2: Tensor) -> Tensor:
        """torchvision RAFT's last prediction, `self.raft(image1, image2, num_flow_updates)[-1]`, with fewer launches.

        Written here over torchvision's own RAFT modules and weights, because `RAFT.forward` upsamples the flow
        after every update (the mask predictor's two convolutions at 1/8 size and a convex combination at full
        size) and returns them all, while inference keeps the last: the other `num_flow_updates - 1` upsamplings
        are waste (11 of 12 by default; RAFT-large on a 720p pair, counted: 1559.6 -> 1419.5 GFLOP). Its
        coordinate grids and the lookup's constants are made once per size and device (`_lookup_constants`); the
        correlation lookup is `correlation_features` and the recurrent update `update`. RAFT-large's operator
        launches per refinement: 89 through torchvision's modules, 40 here; per 720p flow of 12 refinements,
        counted: 1331 in `RAFT.forward`, 600 here. The lookup gives torchvision's values to the bit; the update
        reorders the GRU's arithmetic, so the flow is torchvision's within float rounding (measured: 5e-6 px
        for RAFT-large, 3e-5 px for RAFT-small after 12 refinements; tests hold it to 1e-4 px).

        Args:
            image1, image2: `(N, 3, H, W)` in RAFT's `[-1, 1]`, `H` and `W` multiples of 8.
        """
        fmap1, fmap2 = self.raft.feature_encoder(torch.cat([image1, image2])).chunk(2)
        return self._refine(fmap1, fmap2, *self._context(image1))

    def _context(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The context encoder's split: the GRU's initial state (tanh) and the context features (ReLU)."""
        context = self.raft.context_encoder(images)
        hidden_size = self.raft.update_block.hidden_state_size
        hidden, context = context.split([hidden_size, context.shape[1] - hidden_size], dim=1)
        return torch.tanh(hidden), F.relu(context)

    def _refine(self, fmap1: Tensor, fmap2: Tensor, hidden: Tensor, context: Tensor) -> Tensor:
        """RAFT from the encodings: the correlation pyramid, `num_flow_updates` refinements, the upsampled flow."""
        raft = self.raft
        raft.corr_block.build_pyramid(fmap1, fmap2)
        pyramid = raft.corr_block.corr_pyramid
        coords0, lookup = self._lookup_constants(fmap1, pyramid)
        gates = self._merged_gates()
        coords1 = coords0
        for _ in range(self.num_flow_updates):
            corr = self.correlation_features(pyramid, coords1, *lookup)
            hidden, delta = self.update(hidden, context, corr, coords1 - coords0, gates)
            coords1 = coords1 + delta
        mask = None if raft.mask_predictor is None else raft.mask_predictor(hidden)
        return upsample_flow(coords1 - coords0, up_mask=mask)

    def update(self, hidden: Tensor, context: Tensor, corr: Tensor, flow: Tensor,
               gates: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """torchvision's `raft.update_block(hidden, context, corr, flow)`: the new hidden state and the flow's delta.

        The same modules and weights; written here for its launches (RAFT-large: 29 per call, torchvision's
        42; RAFT-small: 20 and 27). The motion features and the flow go into one `cat` with the context
        (torchvision: two), and each ConvGRU of RAFT's update operator runs as

            z, r = sigmoid(conv_zr([h, x])); q = tanh(conv_q([r * h, x])); h = (1 - z) h + z q

        with z's and r's convolutions as one (`_merged_gates`), `r * h` written over `h` in the concatenated
        input (no second `cat`), and the convex combination as one `lerp` (torchvision: 4 operations).

        Args:
            hidden, context: the recurrent state and the context features, `(N, C_h, h, w)` and `(N, C_c, h, w)`.
            corr: `correlation_features` at the current coordinates.
            flow: the current flow at 1/8 size `(N, 2, h, w)`.
            gates: `_merged_gates()`.
        """
        block = self.raft.update_block
        encoder = block.motion_encoder
        corr = encoder.convcorr2(encoder.convcorr1(corr))
        motion = encoder.conv(torch.cat([corr, encoder.convflow2(encoder.convflow1(flow))], dim=1))
        inputs = torch.cat([context, motion, flow], dim=1)
        for gru, (weight, bias) in zip(self._grus(), gates, strict=True):
            hx = torch.cat([hidden, inputs], dim=1)
            z, r = torch.sigmoid(gru.convz._conv_forward(hx, weight, bias)).chunk(2, dim=1)
            hx[:, : hidden.shape[1]].mul_(r)  # hx is now [r * h, x]
            hidden = torch.lerp(hidden, torch.tanh(gru.convq(hx)), z)
        return hidden, block.flow_head(hidden)

    def _grus(self) -> list[ConvGRU]:
        recurrent = self.raft.update_block.recurrent_block
        return [gru for gru in (recurrent.convgru1, recurrent.convgru2) if isinstance(gru, ConvGRU)]

    def _merged_gates(self) -> list[tuple[Tensor, Tensor]]:
        """Each ConvGRU's update and reset gate convolutions as one: `cat` of their weights and biases.

        Made once, and again when either convolution's weights change: a write in place bumps their version, a
        move or cast changes their device or dtype, and loading a checkpoint does one of these.
        """
        merged = []
        for gru in self._grus():
            params = (gru.convz.weight, gru.convz.bias, gru.convr.weight, gru.convr.bias)
            state = (*(p._version for p in params), params[0].device, params[0].dtype)
            cached = self._gates.get(gru)
            # The parameters themselves are compared (`is`), not their ids, which a replaced parameter can reuse.
            if cached is None or cached[1] != state or any(a is not b for a, b in zip(cached[0], params, strict=True)):
                cached = self._gates[gru] = (params, state, torch.cat(params[0::2]), torch.cat(params[1::2]))
            merged.append(cached[2:])
        return merged

    def _lookup_constants(self, fmap: Tensor, pyramid: list[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Per feature size and device, made once: RAFT's pixel grid `coords0` `(N, 2, h, w)` (torchvision's
        `make_coords_grid`), and `correlation_features`' constants: the window's offsets `(L, 1, r, r, 2)`, the
        level scales `2^-l` `(L, 1, 1, 1, 2)`, the level spans `(w_l - 1, h_l - 1)` `(L, 1, 1, 1, 2)` and -1."""
        batch, _, height, width = fmap.shape
        key = (batch, height, width, fmap.device)
        if key not in self._constants:
            radius = self.raft.corr_block.radius
            side = torch.linspace(-radius, radius, 2 * radius + 1, device=fmap.device)
            # torchvision's window: `stack(meshgrid(di, dj, indexing="ij"), -1)`, the same for every level.
            window = torch.stack(torch.meshgrid(side, side, indexing="ij"), dim=-1)
            levels = len(pyramid)
            scales = torch.tensor([0.5**level for level in range(levels)], device=fmap.device)
            spans = torch.tensor([(v.shape[-1] - 1, v.shape[-2] - 1) for v in pyramid], device=fmap.device,
                                 dtype=torch.float32)
            lookup = (window.expand(levels, 1, *window.shape).contiguous(),
                      scales.view(levels, 1, 1, 1, 1).expand(levels, 1, 1, 1, 2).contiguous(),
                      spans.view(levels, 1, 1, 1, 2), torch.full((1,), -1.0, device=fmap.device))
            self._constants[key] = (make_coords_grid(batch, height, width, device=fmap.device), lookup)
        return self._constants[key]

    @staticmethod
    def correlation_features(pyramid: list[Tensor], coords: Tensor, offsets: Tensor, scales: Tensor,
                             spans: Tensor, minus_one: Tensor) -> Tensor:
        """torchvision's `CorrBlock.index_pyramid(coords)`, the same values, in 9 operator launches instead of 45.

        Written here because torchvision builds the window's deltas on the host at every call (two `linspace`,
        a `stack`, a copy) and normalises each level's sampling points one coordinate at a time (a split, 3
        operations per coordinate, a `cat`): RAFT-large's 12 refinements spent 540 launches per flow on it.
        Here the 4 levels' sampling points come from one `addcmul` and are normalised by one `addcdiv`, with the
        same roundings (`c / 2^l` is exact, then `+ delta`; then `2 * p / (w_l - 1) - 1` as torchvision's
        `grid_sample` helper computes it, a true division: on CUDA torchvision divides by a scalar, which
        PyTorch turns into a multiplication by its reciprocal, so the two can differ there in the last bit).

        Args:
            pyramid: the correlation volumes, level `l` `(N * h * w, 1, h_l, w_l)`.
            coords: the centroids `(N, 2, h, w)` in pixels of level 0.
            offsets, scales, spans, minus_one: `_lookup_constants`.

        Returns:
            `(N, L * r * r, h, w)`, level-major, as torchvision's.
        """
        batch, _, height, width = coords.shape
        centroids = coords.permute(0, 2, 3, 1).reshape(1, batch * height * width, 1, 1, 2)
        points = torch.addcmul(offsets, centroids, scales)  # (L, N*h*w, r, r, 2): c / 2^l + delta, per level
        grids = torch.addcdiv(minus_one, points, spans, value=2)  # 2 * p / (size - 1) - 1
        sampled = [F.grid_sample(volume, grid, mode="bilinear", align_corners=True)
                   for volume, grid in zip(pyramid, grids)]
        return torch.cat(sampled, dim=1).view(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


class GroundTruthFlow:
    """A `FlowFn` that looks up precomputed flows of one clip (sample clips, tests).

    `flow_fn(src, dst)` finds each `src` / `dst` frame in `frames` by exact equality and returns
    `flow[t]` when they are frames `t, t + 1`, or `backward_flow[t]` when they are `t + 1, t`.

    Args:
        frames: the clip `(T, 3, H, W)`.
        flow: forward flows `(T - 1, 2, H, W)`: `flow[t]` goes from `frames[t]` to `frames[t + 1]`.
        backward_flow: optional backward flows `(T - 1, 2, H, W)` from `frames[t + 1]` to `frames[t]`.
    """

    def __init__(self, frames: Tensor, flow: Tensor, backward_flow: Tensor | None = None) -> None:
        expected = (frames.shape[0] - 1, 2, *frames.shape[-2:])
        for name, value in (("flow", flow), ("backward_flow", backward_flow)):
            if value is not None and tuple(value.shape) != expected:
                raise ValueError(
                    f"{name} must be {expected} for frames {tuple(frames.shape)}, got {tuple(value.shape)}"
                )
        self.frames = frames
        self.flow = flow
        self.backward_flow = backward_flow

    def _indices(self, image: Tensor) -> list[int]:
        frames = self.frames.to(image.device, image.dtype)
        return [t for t in range(len(frames)) if torch.equal(frames[t], image)]

    def __call__(self, src: Tensor, dst: Tensor) -> Tensor:
        _check_pair(src, dst)
        flows = []
        for src_frame, dst_frame in zip(src, dst):
            src_ids, dst_ids = self._indices(src_frame), self._indices(dst_frame)
            forward = [t for t in src_ids if t + 1 in dst_ids]
            backward = [t for t in dst_ids if t + 1 in src_ids]
            if forward:
                flows.append(self.flow[forward[0]])
            elif backward and self.backward_flow is not None:
                flows.append(self.backward_flow[backward[0]])
            else:
                raise ValueError("src and dst are not consecutive frames with a stored flow in this GroundTruthFlow")
        return torch.stack(flows).to(src.device, torch.float32)


def consecutive_flows(flow_fn: FlowFn, frames: Tensor, *, backward: bool = False, batch_size: int = 8) -> Tensor:
    """Flows between consecutive frames of a clip, `batch_size` pairs per `flow_fn` call.

    Args:
        flow_fn: any `FlowFn`.
        frames: the clip `(T, 3, H, W)`.
        backward: `False` gives `flow_fn(frames[t], frames[t + 1])`, `True` gives
            `flow_fn(frames[t + 1], frames[t])`.
        batch_size: frame pairs per call.

    Returns:
        `(T - 1, 2, H, W)`.
    """
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"frames must be (T, 3, H, W) with T >= 2, got {tuple(frames.shape)}")
    src, dst = frames[:-1], frames[1:]
    if backward:
        src, dst = dst, src
    return torch.cat(
        [flow_fn(src[i : i + batch_size], dst[i : i + batch_size]) for i in range(0, len(src), batch_size)]
    )


def _target_coords(flow: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates `x, y` (N, H, W) of the positions `p + flow(p)`."""
    height, width = flow.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, device=flow.device, dtype=flow.dtype),
        torch.arange(width, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    return xs + flow[:, 0], ys + flow[:, 1]


def warp(image: Tensor, flow: Tensor, padding_mode: str = "border") -> Tensor:
    """Backward warp: sample `image` at `p + flow(p)` with bilinear interpolation.

    Pixel centres sit at integer coordinates (see the module docstring), so an integer flow moves
    pixels exactly and a half-pixel flow averages two neighbours.

    Args:
        image: `(N, C, H, W)`.
        flow: `(N, 2, H, W)` in pixels, x then y.
        padding_mode: `"border"` repeats the edge pixels for positions outside the image,
            `"zeros"` fades to zero over the half pixel outside the border pixel centres.

    Returns:
        `(N, C, H, W)` in the dtype of `image`.
    """
    _check_flow(flow)
    if image.ndim != 4 or image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"image must be (N, C, H, W) matching flow {tuple(flow.shape)}, got {tuple(image.shape)}")
    if padding_mode not in ("border", "zeros"):
        raise ValueError(f"padding_mode must be 'border' or 'zeros', got {padding_mode!r}")
    # Half-precision sampling coordinates would be off by whole pixels on HD frames: sample in at
    # least float32 and return the image's dtype.
    dtype = torch.promote_types(image.dtype, torch.float32)
    x, y = _target_coords(flow.to(dtype))
    height, width = flow.shape[-2:]
    # align_corners=False puts pixel centre c at (2c + 1) / size - 1: -1 and 1 are the outer edges
    # of the border pixels, which is the module's pixel-centre convention.
    grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)
    warped = F.grid_sample(image.to(dtype), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return warped.to(image.dtype)


def occlusion_mask(flow_fw: Tensor, flow_bw: Tensor, alpha1: float = 0.01, alpha2: float = 0.5) -> Tensor:
    """Forward-backward consistency check: 1 where a pixel of the source frame is occluded, else 0.

    With `flow_fw` the flow from frame A to frame B and `flow_bw` from B to A, the backward flow
    seen from A is `f_bw^ = warp(flow_bw, flow_fw)`. A pixel of A is occluded in B where

        |f_fw + f_bw^|^2 > alpha1 (|f_fw|^2 + |f_bw^|^2) + alpha2

    (Sundaram et al., ECCV 2010, as used by UnFlow, Meister et al., AAAI 2018), or where its
    target `p + f_fw(p)` falls outside the pixel centres of B (`[0, W - 1] x [0, H - 1]`).
    Use `valid_mask` for the complement.

    Args:
        flow_fw: `(N, 2, H, W)` flow from A to B.
        flow_bw: `(N, 2, H, W)` flow from B to A.
        alpha1: tolerance relative to the flow magnitudes.
        alpha2: absolute tolerance in squared pixels.

    Returns:
        `(N, 1, H, W)` float mask, 1 = occluded.
    """
    _check_flow(flow_fw, "flow_fw")
    _check_flow(flow_bw, "flow_bw")
    if flow_fw.shape != flow_bw.shape:
        raise ValueError(
            f"flow_fw and flow_bw must have one shape, got {tuple(flow_fw.shape)} and {tuple(flow_bw.shape)}"
        )
    flow_fw, flow_bw = flow_fw.float(), flow_bw.float()
    flow_bw_at_target = warp(flow_bw, flow_fw)
    mismatch = (flow_fw + flow_bw_at_target).square().sum(1, keepdim=True)
    magnitude = flow_fw.square().sum(1, keepdim=True) + flow_bw_at_target.square().sum(1, keepdim=True)
    inconsistent = mismatch > alpha1 * magnitude + alpha2
    height, width = flow_fw.shape[-2:]
    x, y = _target_coords(flow_fw)
    outside = ((x < 0) | (x > width - 1) | (y < 0) | (y > height - 1))[:, None]
    return (inconsistent | outside).float()


def valid_mask(flow_fw: Tensor, flow_bw: Tensor, alpha1: float = 0.01, alpha2: float = 0.5) -> Tensor:
    """`1 - occlusion_mask(...)`: 1 where a pixel of the source frame is visible in the target frame."""
    return 1 - occlusion_mask(flow_fw, flow_bw, alpha1, alpha2)


def resize_flow(flow: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize a flow field to `size = (H', W')` and rescale its vectors to the new pixel units.

    The x component is multiplied by `W' / W` and the y component by `H' / H`.

    Args:
        flow: `(N, 2, H, W)`.
        size: target `(H', W')`.
        mode: `F.interpolate` mode (`"bilinear"`, `"nearest"`, `"bicubic"`, `"area"`).

    Returns:
        `(N, 2, H', W')`.
    """
    _check_flow(flow)
    height, width = flow.shape[-2:]
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(flow, size=tuple(size), mode=mode, **align)
    ratio = torch.tensor([size[1] / width, size[0] / height], device=flow.device, dtype=flow.dtype)
    return resized * ratio[:, None, None]


def warp_error_map(image: Tensor, warped: Tensor, alpha: float) -> Tensor:
    """Warping-error confidence `exp(-alpha * |I - W(J)|)`, averaged over channels.

    Args:
        image: the reference frame `I`, `(N, C, H, W)`.
        warped: the neighbouring frame `J` warped onto `I`, `W(J)`, `(N, C, H, W)`.
        alpha: sharpness `alpha` > 0: larger values decay faster with the error.

    Returns:
        `(N, 1, H, W)` in `(0, 1]`, 1 where the warp matches exactly.
    """
    if image.shape != warped.shape or image.ndim != 4:
        raise ValueError(
            f"image and warped must be (N, C, H, W) of one shape, got {tuple(image.shape)} and {tuple(warped.shape)}"
        )
    # Eq. (14), OS-DiffVSR
    return torch.exp(-alpha * (image - warped).abs().mean(1, keepdim=True))
