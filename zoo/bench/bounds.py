"""Lower bounds of each pipeline's FLOPs per output frame: its networks, each run as often as the method
needs, at the exact frame size (no padding, no repeated work), counted with `torch.utils.flop_counter`.

`zoo bench` divides a pipeline's measured FLOPs by this; a ratio near 1 means no wasted compute.
A bound runs the pipeline's own submodules on inputs of the right shape on the pipeline's device (the
`meta` device counts without computing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.components.upscaler import VideoUpscaler


def _count(run: Callable[[], object]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _osdiffvsr(up: VideoUpscaler, height: int, width: int) -> int:
    """One frame: three VAE encodes of x4 frames (the frame and its two warped neighbours), one UNet step,
    one decode, and RAFT on the two neighbour pairs at LR size."""
    net = up.net
    device, dtype = up.device, up.dtype
    hr = torch.zeros(1, 3, height * up.scale, width * up.scale, device=device, dtype=dtype)
    lr = torch.zeros(2, 3, height, width, device=device, dtype=dtype)

    def run() -> None:
        z = net.vae.encode(hr.expand(3, -1, -1, -1)).latent_dist.mode()
        net.vae.decode(net.denoise(z[:1]))
        net.flow(lr, lr)

    return _count(run)


def _stream_diffvsr(up: VideoUpscaler, height: int, width: int) -> int:
    """One steady-state frame: the denoising steps of UNet + ControlNet at LR size, the temporal encoder
    on the warped previous output, the decoder, and RAFT once at the flow resolution."""
    net = up.net
    device, dtype = up.device, up.dtype
    channels = net.vae.config.latent_channels
    latents = torch.zeros(1, channels, height, width, device=device, dtype=dtype)
    lr = torch.zeros(1, 3, height, width, device=device, dtype=dtype)
    hr = torch.zeros(1, 3, height * up.scale, width * up.scale, device=device, dtype=dtype)

    def run() -> None:
        for t in net.timesteps:
            net.denoise(latents, lr, t, hr)
        features = net.vae.temporal_features(hr)
        net.vae.decode(latents, features)
        up.flow(hr, hr) if getattr(up, "flow_resolution", "hr") == "hr" else up.flow(lr, lr)

    return _count(run)


BOUNDS: dict[str, Callable[[VideoUpscaler, int, int], int]] = {
    "osdiffvsr": _osdiffvsr,
    "stream_diffvsr": _stream_diffvsr,
}


def flop_bound(upscaler: VideoUpscaler, height: int, width: int) -> int | None:
    """FLOPs per output frame that `upscaler` cannot go below at LR size `height` x `width`; None when unstated."""
    bound = BOUNDS.get(upscaler.hub_name)
    return None if bound is None else bound(upscaler, height, width)
