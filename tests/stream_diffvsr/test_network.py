"""Stream-DiffVSR networks: the DDIM wiring, TPM block, configs and official parameter names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from zoo.components.flow import warp
from zoo.stream_diffvsr.network import (
    SDX4_DDIM,
    TINY_AUTOENCODER_X4,
    StreamDiffVSRConfig,
    StreamDiffVSRNet,
    TemporalAutoencoderTiny,
    TemporalTinyBlock,
    ddim_constants,
    ddim_step,
    stream_warp,
)

BASE_CONFIGS = Path(__file__).parents[2] / ".." / "shared" / "base_configs.json"


def test_paper_rollout_timesteps():
    assert StreamDiffVSRNet(StreamDiffVSRConfig.tiny()).timesteps == [999, 749, 499, 249]


def test_step_is_ddim_with_v_prediction_by_hand():
    net = StreamDiffVSRNet(StreamDiffVSRConfig.tiny())
    abar = net.scheduler.alphas_cumprod.double()
    z, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])
    for t, prev_t in [(999, 749), (749, 499), (249, -1)]:
        a_t = abar[t]
        # t < 0 is past the last step: ᾱ_0, since the x4 schedule has set_alpha_to_one = False.
        a_prev = abar[prev_t] if prev_t >= 0 else abar[0]
        x0 = a_t.sqrt() * z.double() - (1 - a_t).sqrt() * v.double()  # v = √ᾱ ε − √(1−ᾱ) x0
        eps = a_t.sqrt() * v.double() + (1 - a_t).sqrt() * z.double()
        expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # DDIM (eta = 0), Song et al. Eq. (12)
        prev, pred_x0 = net.step(v, t, z)
        torch.testing.assert_close(pred_x0.double(), x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(prev.double(), expected, rtol=1e-6, atol=1e-6)


def test_sampler_runs_the_scheduler_steps_in_order(monkeypatch):
    net = StreamDiffVSRNet(StreamDiffVSRConfig.tiny())
    seen = []
    monkeypatch.setattr(net, "denoise", lambda latents, lr, t, *args: seen.append(t) or torch.zeros_like(latents))
    net.sample(torch.ones(1, 4, 2, 2), torch.zeros(1, 3, 2, 2), None)
    assert seen == [999, 749, 499, 249]


def test_ddim_step_by_hand() -> None:
    # DDIM, v-parametrisation: x0 = s_t z - c_t v, eps = s_t v + c_t z, z_prev = s_p x0 + c_p eps.
    z, v = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    # x0 = (0.6 - 0.4, -1.2 - 0.8) = (0.2, -2.0); eps = (0.3 + 0.8, 0.6 - 1.6) = (1.1, -1.0)
    torch.testing.assert_close(ddim_step((0.6, 0.8, 1.0, 0.0), z, v), torch.tensor([0.2, -2.0]))
    torch.testing.assert_close(ddim_step((0.6, 0.8, 0.8, 0.6), z, v), torch.tensor([0.82, -2.2]))
    torch.testing.assert_close(ddim_step((0.6, 0.8, 0.6, 0.8), z, v), z)  # the same noise level: no move


def test_ddim_constants_give_the_schedulers_step_to_the_bit() -> None:
    scheduler = DDIMScheduler.from_config(SDX4_DDIM)
    scheduler.set_timesteps(4)
    constants = ddim_constants(scheduler)
    assert list(constants) == [999, 749, 499, 249]
    torch.manual_seed(0)
    latents, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in constants:
        assert torch.equal(ddim_step(constants[t], latents, output), scheduler.step(output, t, latents).prev_sample)
    # Each timestep's own scalars: the next step's would give another sample.
    assert not torch.equal(ddim_step(constants[749], latents, output), scheduler.step(output, 999, latents).prev_sample)
    assert constants[249][2] == pytest.approx(0.9999**0.5)  # alpha_bar_p past the last step: alphas_cumprod[0]


def test_other_prediction_types_run_the_schedulers_step(monkeypatch) -> None:
    config = StreamDiffVSRConfig.tiny()
    config.scheduler = {**config.scheduler, "prediction_type": "epsilon"}
    net = StreamDiffVSRNet(config)
    assert net.ddim_constants is None
    calls = []
    monkeypatch.setattr(net, "denoise", lambda latents, *args: torch.zeros_like(latents))
    monkeypatch.setattr(net, "step", lambda output, t, latents: calls.append(t) or (latents, latents))
    net.sample(torch.ones(1, 4, 2, 2), torch.zeros(1, 3, 2, 2), None)
    assert calls == [999, 749, 499, 249]


def _constant_block(bias: float) -> TemporalTinyBlock:
    """A 1-channel TPM block with conv(x) = bias and identity temporal convolutions."""
    block = TemporalTinyBlock(1, "relu")
    with torch.no_grad():
        for layer in block.conv:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.zero_()
                layer.bias.zero_()
        block.conv[4].bias.fill_(bias)
        for layer in (block.temporal_processor[0], block.temporal_processor[2]):
            layer.weight.copy_(torch.tensor([[[0.0, 1.0, 0.0]]]))
            layer.bias.zero_()
    return block


def test_tpm_fusion_by_hand():
    block = _constant_block(2.0)
    with torch.no_grad():
        block.alpha.fill_(0.25)
    current = torch.full((1, 1, 4, 4), 2.0)
    prev = torch.full((1, 1, 4, 4), 6.0)
    # pooled: P = 2, Q = 6; identity convs keep [2, 6]; f = 0.25 · 2 + 0.75 · 6 = 5.
    torch.testing.assert_close(block.temporal_residual(current, prev), torch.full((1, 1, 4, 4), 5.0))
    x = torch.ones(1, 1, 4, 4)
    # out = relu(conv(x) + 0.1 · f + x) = 2 + 0.5 + 1.
    torch.testing.assert_close(block(x, prev), torch.full((1, 1, 4, 4), 3.5))
    # without a temporal condition it is TAESD's block: relu(2 + 1).
    torch.testing.assert_close(block(x), torch.full((1, 1, 4, 4), 3.0))


def test_tpm_pools_4x4_and_upsamples_bilinearly():
    block = _constant_block(0.0)
    current = torch.zeros(1, 1, 4, 8)
    current[..., 4:] = 4.0  # pooled: [0, 4]
    prev = torch.zeros(1, 1, 4, 8)  # pooled: [0, 0]
    # α = 0.5: f = 0.5 · [0, 4] + 0.5 · [0, 0] = [0, 2] before upsampling; the identity conv
    # mixes neighbours only through the kernel centre, so the values stay per position.
    f = block.temporal_residual(current, prev)
    assert f.shape == (1, 1, 4, 8)
    assert f[0, 0, 0, 0].item() == pytest.approx(0.0) and f[0, 0, 0, -1].item() == pytest.approx(2.0)


@pytest.mark.parametrize("config", [TINY_AUTOENCODER_X4, StreamDiffVSRConfig.tiny().vae])
def test_vae_parameter_names_match_official(config, official_vae_keys):
    vae = TemporalAutoencoderTiny(**config)
    assert set(vae.state_dict()) == official_vae_keys(config)
    # The official `vae/` layout: 3 stages, x4, with encoder features pairing the decoder blocks.
    assert vae.downscale == 4


def test_encoder_features_pair_with_decoder_blocks():
    vae = TemporalAutoencoderTiny(encoder_block_out_channels=(4, 4, 4), decoder_block_out_channels=(4, 4, 4))
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    features = vae.temporal_features(image)
    assert [tuple(f.shape[-2:]) for f in features] == [(8, 12)] * 3 + [(16, 24)] * 3 + [(32, 48)]
    latents = vae.encode(image)
    assert latents.shape == (1, 4, 8, 12)
    assert vae.decode(latents, features).shape == (1, 3, 32, 48)


def test_encoder_rescales_to_unit_range_but_features_do_not():
    vae = TemporalAutoencoderTiny(encoder_block_out_channels=(4, 4, 4))
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    # forward: TAESD works on [0, 1]; block_features: the official pipeline feeds [-1, 1] as is.
    torch.testing.assert_close(vae.encoder(image), vae.encoder.layers(image.add(1).div(2)))
    torch.testing.assert_close(vae.encoder.block_features(image)[0], vae.encoder.layers[:2](image))


def test_decoder_soft_clamps_latents_and_outputs_minus_one_to_one():
    vae = TemporalAutoencoderTiny(decoder_block_out_channels=(4, 4, 4))
    for layer in vae.decoder.layers:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)
    # all-zero convs decode to 0 in [0, 1], i.e. -1 in diffusers' [-1, 1].
    assert torch.equal(vae.decode(torch.randn(1, 4, 2, 2)), torch.full((1, 3, 8, 8), -1.0))


def test_full_unet_config_matches_x4_upscaler():
    if not BASE_CONFIGS.is_file():
        pytest.skip("shared/base_configs.json is absent")
    reference = json.loads(BASE_CONFIGS.read_text())["sdx4_unet"]["config"]
    ours = StreamDiffVSRConfig.full().unet
    for key, value in reference.items():
        if key == "num_class_embeds":
            # the distilled UNet runs without the noise-level class input (see network.py)
            assert ours[key] is None
        else:
            assert ours[key] == value, key


def test_full_builds_on_meta_with_x4_sizes():
    with torch.device("meta"):
        net = StreamDiffVSRNet(StreamDiffVSRConfig.full())
    unet_params = sum(p.numel() for p in net.unet.parameters())
    # SD x4 upscaler UNet: 473M parameters (without its 1000 x 1024 noise-level embedding).
    assert math.isclose(unet_params, 473_000_000, rel_tol=0.01)
    assert net.scale == net.vae.downscale == net.controlnet_downscale == 4


def test_mismatched_controlnet_downscale_raises():
    config = StreamDiffVSRConfig.tiny()
    config.controlnet = {**config.controlnet, "conditioning_embedding_out_channels": [8, 8, 8, 16]}
    with pytest.raises(ValueError, match="downsamples by 8"):
        StreamDiffVSRNet(config)


# The warp of the previous output ------------------------------------------------------------

def test_stream_warp_by_hand_zero_flow_is_a_stretch_with_quarter_corners():
    # image[y, x] = 5y + x + 1 on 5 x 5. Pixel x reads u = x * 5/4 - 1/2 (and v likewise):
    # u = -0.5, 0.75, 2.0, 3.25, 4.5. Outside the image is zero.
    image = (torch.arange(25.0) + 1).view(1, 1, 5, 5)
    out = stream_warp(image, torch.zeros(1, 2, 5, 5))[0, 0]
    assert out[2, 2] == 13  # the centre reads itself: u = v = 2
    # corners read half a pixel outside on both axes: a quarter of the corner pixel
    assert out[0, 0] == 0.25 * 1 and out[0, 4] == 0.25 * 5 and out[4, 0] == 0.25 * 21 and out[4, 4] == 0.25 * 25
    # edges: half of the edge pixel (v = 2 exactly, u = -0.5)
    assert out[2, 0] == 0.5 * 11
    # (1, 1) reads (0.75, 0.75): 1 + 0.75 * 1 + 0.75 * 5 = 5.5
    assert out[1, 1] == pytest.approx(5.5, abs=1e-6)


def test_stream_warp_by_hand_follows_the_flow_to_the_previous_frame():
    image = (torch.arange(25.0) + 1).view(1, 1, 5, 5)
    flow = torch.zeros(1, 2, 5, 5)
    flow[0, 0, 2, 1], flow[0, 1, 2, 1] = 1.2, -0.8
    out = stream_warp(image, flow)[0, 0]
    # Pixel (x, y) = (1, 2) goes to (2.2, 1.2) and reads u = 2.2 * 5/4 - 1/2 = 2.25, v = 1.2 * 5/4 - 1/2 = 1:
    # row 1 is 6, 7, 8, ...: 6 + 2.25 = 8.25. The shared pixel-centre warp reads (2.2, 1.2): 5 * 1.2 + 2.2 + 1 = 9.2.
    assert out[2, 1] == pytest.approx(8.25, abs=1e-5)
    assert warp(image, flow, padding_mode="zeros")[0, 0, 2, 1] == pytest.approx(9.2, abs=1e-5)
    # x and y are not swapped: the transposed flow reads elsewhere
    assert stream_warp(image, flow.flip(1))[0, 0, 2, 1] != pytest.approx(8.25, abs=1e-3)


def test_stream_warp_samples_in_float32_and_keeps_the_dtype():
    image = torch.rand(1, 3, 6, 10)
    flow = torch.randn(1, 2, 6, 10)
    half = stream_warp(image.bfloat16(), flow)
    assert half.dtype == torch.bfloat16
    assert (half.float() - stream_warp(image, flow)).abs().max() < 1e-2
    with pytest.raises(ValueError, match="flow must be"):
        stream_warp(image, torch.zeros(1, 3, 6, 10))
    with pytest.raises(ValueError, match="image must be"):
        stream_warp(image, torch.zeros(1, 2, 6, 9))
