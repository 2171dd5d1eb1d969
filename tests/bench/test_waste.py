"""Work a pipeline must not repeat: each test fails on the wasteful version it replaced."""

from __future__ import annotations

import torch

from zoo.stream_diffvsr.pipeline import StreamDiffVSRUpscaler


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
        warped = None if session.prev_hr is None else up.warp_previous(session.prev_hr, lr, session.prev_lr)
        latents = noise
        for t in up.net.timesteps:  # the ControlNet embeds `warped` itself at every step
            latents, _ = up.net.step(up.net.denoise(latents, lr, t, warped), t, latents)
        features = None if warped is None else up.net.vae.temporal_features(warped)
        hr = up.net.vae.decode(latents, features)
        session.prev_lr, session.prev_hr = lr, hr
        reference.append((hr[0] / 2 + 0.5).clamp(0, 1))
    assert torch.equal(out, torch.stack(reference))


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
