"""Work a pipeline must not repeat: each test fails on the wasteful version it replaced."""

from __future__ import annotations

import pytest
import torch

from zoo.stream_diffvsr.network import stream_warp
from zoo.stream_diffvsr.pipeline import StreamDiffVSRUpscaler, flow_to_previous


def test_stream_diffvsr_embeds_the_controlnet_condition_once_per_frame() -> None:
    torch.manual_seed(0)
    up = StreamDiffVSRUpscaler.from_variant("tiny").eval()
    assert len(up.net.timesteps) > 1
    calls = []
    up.net.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *args: calls.append(1))
    frames = torch.rand(3, 3, 8, 12)
    out = up(frames)
    assert len(calls) == 2  # frames 1 and 2 (frame 0 runs without ARTG), not once per DDIM step

    # The embedding shared by the steps is the one each step would compute: the frames are unchanged.
    session, reference = up.session(), []
    for frame in frames:
        lr = frame[None] * 2 - 1
        noise = torch.randn((1, 4, 8, 12), generator=session.generator)
        flow_input = up.flow_input(lr, source=session.prev_hr is not None)
        warped = None if session.prev_hr is None else up.warp_previous(session.prev_hr, flow_input, session.prev_flow)
        latents = noise
        for t in up.net.timesteps:  # the ControlNet embeds `warped` itself at every step
            latents, _ = up.net.step(up.net.denoise(latents, lr, t, warped), t, latents)
        features = None if warped is None else up.net.vae.temporal_features(warped)
        hr = up.net.vae.decode(latents, features)
        session.prev_flow, session.prev_hr = flow_input, hr
        reference.append((hr[0] / 2 + 0.5).clamp(0, 1))
    assert torch.equal(out, torch.stack(reference))


@pytest.mark.parametrize("resolution", ["hr", "lr"])
def test_stream_diffvsr_encodes_each_frame_once_for_raft(resolution: str) -> None:
    torch.manual_seed(0)
    up = StreamDiffVSRUpscaler.from_variant("tiny").eval().configure(flow_resolution=resolution)
    raft = up.flow.raft
    encoded, contexts = [], []
    raft.feature_encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    raft.context_encoder.register_forward_hook(lambda module, args, out: contexts.append(args[0].shape[0]))
    frames = torch.rand(4, 3, 8, 12)
    out = up(frames)
    # Each frame's image once, one image at a time; the context of frames 1-3, the sources of the flows.
    assert encoded == [1] * 4 and contexts == [1] * 3

    # The outputs are those of RAFT on each pair of images (`flow_to_previous`, both frames encoded per flow).
    session, reference, prev_lr = up.session(), [], None
    for frame in frames:
        lr = frame[None] * 2 - 1
        noise = torch.randn((1, 4, 8, 12), generator=session.generator)
        warped = None if prev_lr is None else stream_warp(
            reference[-1][1], flow_to_previous(up.flow, lr, prev_lr, up.scale, resolution))
        hr = up.net.upscale_frame(lr, noise, warped)
        reference.append(((hr[0] / 2 + 0.5).clamp(0, 1), hr))
        prev_lr = lr
    # RAFT-small's convolutions round a batch of one image differently from a batch of two: measured 3e-8
    # apart; with the flow's direction swapped in the reference, 1.3e-3 (hr) and 2.6e-3 (lr).
    torch.testing.assert_close(out, torch.stack([hr for hr, _ in reference]), atol=1e-5, rtol=0)


def test_osdenhancer_runs_the_official_vae_tiles_unless_asked_not_to() -> None:
    from zoo.bench.bounds import flop_bound
    from zoo.bench.pipeline import DispatchCounter, count_stream, fake_upscaler

    up, mode = fake_upscaler("osdenhancer", "tiny")
    vae = up.net.vae
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width) == (240, 360)
    frames = [torch.rand(3, 64, 96) for _ in range(2)]  # 256x384 output: 2x2 tiles
    with torch.no_grad(), mode, DispatchCounter():
        bound = flop_bound(up.configure(chunk=9), 64, 96, len(frames))
    tiled = count_stream(up, mode, frames)  # the default, as the official pipeline runs
    untiled = count_stream(up.configure(vae_tiling=False), mode, frames)
    assert untiled.flops["total"] / untiled.frames_out <= 1.0001 * bound  # the bare networks' FLOPs
    assert tiled.flops["total"] / tiled.frames_out > 1.2 * bound  # the official tiles: overlapping work


def test_stream_diffvsr_computes_step_only_values_once_per_clip_and_step(monkeypatch) -> None:
    from diffusers.models.embeddings import TimestepEmbedding

    computed = []
    forward = TimestepEmbedding.forward

    def counted(self, *args):
        computed.append(self)
        return forward(self, *args)

    monkeypatch.setattr(TimestepEmbedding, "forward", counted)
    torch.manual_seed(0)
    up = StreamDiffVSRUpscaler.from_variant("tiny").eval()
    steps = len(up.net.timesteps)
    up(torch.rand(4, 3, 8, 12))
    # 4 frames x 4 steps of the UNet and 3 x 4 of the ControlNet; each time MLP runs once per step of the clip
    assert sum(m is up.net.unet.time_embedding for m in computed) == steps
    assert sum(m is up.net.controlnet.time_embedding for m in computed) == steps


def test_a_bound_counts_each_frame_kind_of_a_clip() -> None:
    from zoo.bench.bounds import _clip_mean

    # frames cost 10 (first), 20 (second), then 30: (10 + 20 + 30 + 30 + 30) // 5
    assert _clip_mean([10, 20, 30], 5) == 24
    assert _clip_mean([10, 20, 30], 1) == 10 and _clip_mean([7, 3], 2) == 5
