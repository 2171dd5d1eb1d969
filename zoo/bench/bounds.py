"""Lower bounds of each pipeline's FLOPs per output frame of a clip: its networks, each run as often as the
method needs, at the exact frame size (no padding, no repeated work), counted with `torch.utils.flop_counter`.
A distilled sampler's step-only values (time embeddings, the stored prompt's keys and values) count once per
clip and step, as `StepMemo` computes them.

`zoo bench` divides a pipeline's FLOPs per output frame of the same clip by this; a ratio near 1 means no
wasted compute. A bound runs the pipeline's own submodules on inputs of the right shape on the pipeline's
device (a `fake_upscaler` counts without computing). Each bound is the networks' own FLOPs: what the method
cannot avoid, not what a pipeline's choices (padding, overlaps, tiles) add.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.components.flow import FlowFeatures
from zoo.components.memo import StepMemo, memoise_denoiser
from zoo.components.tiling import valid_length
from zoo.components.upscaler import VideoUpscaler


def _count(run: Callable[[], object]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _clip_mean(counts: list[int], frames: int) -> int:
    """Mean FLOPs per frame of a clip whose frames cost `counts[0]`, `counts[1]`, ... and the last of `counts`
    from there on."""
    return sum(counts[min(i, len(counts) - 1)] for i in range(frames)) // frames


def _osdiffvsr(up: VideoUpscaler, height: int, width: int, frames: int) -> int:
    """Every frame alike: three VAE encodes of x4 frames (the frame and its two warped neighbours, Eq. 9), one
    UNet step (Eq. 2), one decode, RAFT's encoders on the frame once and its refinements for the two neighbour
    pairs at LR size (the clip's ends use a mirrored neighbour, the same work); the UNet's step-only values at
    the first frame only."""
    net = up.net
    device, dtype = up.device, up.dtype
    hr = torch.zeros(1, 3, height * up.scale, width * up.scale, device=device, dtype=dtype)
    lr = torch.zeros(1, 3, height, width, device=device, dtype=dtype)
    memo = StepMemo()
    memoise_denoiser(memo, net.unet)

    def run() -> None:
        z = net.vae.encode(hr.expand(3, -1, -1, -1)).latent_dist.mode()
        with memo.installed(), memo.step(net.config.timestep):
            z_hat = net.denoise(z[:1])
        net.vae.decode(z_hat)
        pairs = FlowFeatures.cat([net.flow.features(lr)] * 2)
        net.flow(pairs, pairs)

    return _clip_mean([_count(run), _count(run)], frames)


def _stream_diffvsr(up: VideoUpscaler, height: int, width: int, frames: int) -> int:
    """The clip's mean: the first frame runs the denoising steps of the UNet alone, the decoder, and RAFT's
    feature encoder (the next frame's flow ends at it); every later frame the steps of UNet + ControlNet at LR
    size (the ControlNet's conditioning embedding of the warped previous output once: it does not change
    between steps), the temporal encoder on that output, the decoder, RAFT's two encoders on the frame at the
    flow resolution, and RAFT's refinements from it to the previous frame. Each network's step-only values
    count at its first frame (the UNet's at the first, the ControlNet's at the second)."""
    net = up.net
    device, dtype = up.device, up.dtype
    channels = net.vae.config.latent_channels
    latents = torch.zeros(1, channels, height, width, device=device, dtype=dtype)
    lr = torch.zeros(1, 3, height, width, device=device, dtype=dtype)
    hr = torch.zeros(1, 3, height * up.scale, width * up.scale, device=device, dtype=dtype)
    memo = StepMemo()
    memoise_denoiser(memo, net.unet)
    memoise_denoiser(memo, net.controlnet)

    def denoise(condition: torch.Tensor | None) -> None:
        with memo.installed():
            for t in net.timesteps:
                with memo.step(t):
                    net.denoise(latents, lr, t, condition)

    flow_image = hr if up.flow_resolution == "hr" else lr

    def first() -> None:
        denoise(None)
        net.vae.decode(latents, None)
        up.flow.features(flow_image, source=False)

    def steady() -> None:
        with net.embedded_condition(hr, dtype) as condition:
            denoise(condition)
        net.vae.decode(latents, net.vae.temporal_features(hr))
        current = up.flow.features(flow_image)
        up.flow(current, current.destination())

    return _clip_mean([_count(first), _count(steady), _count(steady)], frames)


def _osdenhancer(up: VideoUpscaler, height: int, width: int, frames: int) -> int | None:
    """One output frame's share of a chunk of `chunk` (8n + 1) output frames (a shorter clip: its frames
    padded to the 8n + 1 the network needs, shared by the clip's frames), each passing once through the VAE
    encoder twice (the blended video I†_in and the residual I^Δ, Eqs. 2-3), the transformer's tokens and the
    decoder, at the output size rounded up to the 16 pixels the network needs (8x VAE, 2x2 patches).

    The chunk, not the clip, is the unit: the transformer attends over a whole chunk, so its per-frame cost
    grows with the chunk's length and one chunk is the cheapest way the method sees `chunk` frames. What the
    pipeline adds on top is its own choice, measured by the ratio: frames shared by overlapping chunks and
    the VAE's overlapping spatial tiles (disabled here). None with `chunk=None` (one chunk per clip).
    """
    if up.chunk is None:
        return None
    net = up.net
    frames_out = (frames - 1) * up.temporal_scale + 1
    length = min(up.chunk, valid_length(frames_out, "8n+1"))
    out_height, out_width = (16 * math.ceil(math.floor(up.scale * side) / 16) for side in (height, width))
    video = torch.zeros(1, 3, length, out_height, out_width, device=up.device, dtype=net.vae.dtype)

    def run() -> None:
        latents = net.encode(video, sample=False)
        residual_latents = net.encode(video, sample=False)
        net.decode(net.denoise(latents, residual_latents))

    tiling = net.vae.use_tiling
    net.vae.use_tiling = False
    try:
        return _count(run) // min(length, frames_out)
    finally:
        net.vae.use_tiling = tiling


def _pssr(up: VideoUpscaler, height: int, width: int, frames: int) -> int:
    """One LR frame's share of the speculative sampler on a chunk of `chunk` (4n + 1) frames (a shorter clip:
    its frames padded to the 4n + 1 the network needs, shared by the clip's frames) at the LR size rounded up
    to the network's size multiple: the VAE encoder on the bicubic x4 frames, one base DiT step, T - 1 draft
    steps and the T decodes the frequency-domain update reads (Eqs. 5, 6, 13, 14; T = `num_steps`).

    As for OSDEnhancer the chunk is the unit (the DiTs attend over it); the pipeline's chunk overlap and
    spatial tiles are measured by the ratio.
    """
    multiple = up.net.size_multiple
    length = min(up.chunk, valid_length(frames, "4n+1"))
    lr = torch.zeros(length, 3, multiple * math.ceil(height / multiple), multiple * math.ceil(width / multiple),
                     device=up.device)
    return _count(lambda: up.sample(lr)) // min(length, frames)


BOUNDS: dict[str, Callable[[VideoUpscaler, int, int, int], int | None]] = {
    "osdiffvsr": _osdiffvsr,
    "stream_diffvsr": _stream_diffvsr,
    "osdenhancer": _osdenhancer,
    "pssr": _pssr,
}


def flop_bound(upscaler: VideoUpscaler, height: int, width: int, frames: int) -> int | None:
    """FLOPs per output frame that `upscaler` cannot go below on a clip of `frames` LR frames of `height` x
    `width`; None when unstated."""
    bound = BOUNDS.get(upscaler.hub_name)
    return None if bound is None else bound(upscaler, height, width, frames)
