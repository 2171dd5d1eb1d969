"""OSDiffVSRUpscaler: hub entry, sliding window and look-ahead, odd sizes, tiling, weights folders."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open

import zoo.hub
from zoo.hub import WeightsUnavailableError
from zoo.osdiffvsr.network import OSDiffVSRConfig, one_step_denoise
from zoo.osdiffvsr.pipeline import FILES, OSDiffVSRUpscaler


@pytest.fixture(scope="module")
def upscaler() -> OSDiffVSRUpscaler:
    torch.manual_seed(0)
    return zoo.hub.load("osdiffvsr", pretrained=False, variant="tiny", merge_lora=False)  # exported below


def test_hub_tiny_runs_on_a_video(upscaler: OSDiffVSRUpscaler) -> None:
    out = upscaler(torch.rand(3, 3, 16, 24))
    assert out.shape == (3, 3, 64, 96)
    assert out.min() >= 0 and out.max() <= 1


def test_pretrained_error_names_the_recipe() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"lightning fit -c recipes/osdiffvsr\.yaml"):
        zoo.hub.load("osdiffvsr")


def test_stream_window_boundaries_and_one_frame_lookahead(upscaler: OSDiffVSRUpscaler,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    windows, pulled, encoded = [], [], []

    def record(prev, current, next_, prompt_embeds=None, flow_features=None):
        frames = tuple(int(x[0, 0, 0, 0] * 10) for x in (prev, current, next_))
        assert flow_features == ((frames[1], frames[1]), (frames[0], frames[2]))  # sources, destinations
        windows.append(frames)
        return torch.zeros(1, 3, 8, 8)

    def encode(frame):
        encoded.append(int(frame[0, 0, 0, 0] * 10))
        return encoded[-1]  # stands for the frame's RAFT encodings

    def frames(count: int):
        for t in range(count):
            pulled.append(t)
            yield torch.full((3, 2, 2), t / 10)

    monkeypatch.setattr(upscaler, "upscale_window", record)
    monkeypatch.setattr(upscaler, "flow_features", encode)
    monkeypatch.setattr(upscaler, "flow_pairs", lambda before, current, after: ((current, current), (before, after)))
    stream = upscaler.stream(frames(5))
    next(stream)
    assert pulled == [0, 1]  # frame 0 is out once frame 1 (its look-ahead) has arrived
    list(stream)
    assert windows == [(1, 0, 1), (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 3)]
    assert encoded == [0, 1, 2, 3, 4]  # RAFT encodes each frame once, not once per window
    windows.clear()
    list(upscaler.stream(frames(1)))
    assert windows == [(0, 0, 0)]


def test_each_frame_is_generated_with_its_own_prompt_embedding(upscaler: OSDiffVSRUpscaler) -> None:
    seen: list[float] = []

    def record(module, args, kwargs) -> None:
        seen.append(kwargs["encoder_hidden_states"][0, 0, 0].item())

    frames = torch.rand(3, 3, 8, 8)
    _, length, width = upscaler.net.prompt_embeds.shape
    per_frame = (1.0 + torch.arange(3.0)).view(3, 1, 1).expand(3, length, width)  # c_t = t + 1 everywhere
    handle = upscaler.net.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        together = upscaler(frames, prompt_embeds=per_frame)
        streamed = torch.stack(list(upscaler.stream(frames.unbind(0), iter(per_frame.unbind(0)))))
    finally:
        handle.remove()
    # Frame 0's window is (I_1, I_0, I_1) but its condition is c_0; the last frame's is c_2.
    assert seen == [1.0, 2.0, 3.0] * 2
    assert torch.equal(together, streamed)
    # None is the stored embedding, the same for every frame.
    stored = upscaler.net.prompt_embeds
    assert torch.equal(upscaler(frames), upscaler(frames, prompt_embeds=stored.expand(3, -1, -1)))
    with pytest.raises(ValueError, match="1 or T = 3 embeddings, got 2"):
        upscaler(frames, prompt_embeds=per_frame[:2])
    with pytest.raises(ValueError, match=rf"\(1 or T, {length}, {width}\) CLIP embeddings, got \(3, {length}\)"):
        upscaler(frames, prompt_embeds=per_frame[..., 0])
    with pytest.raises(ValueError, match="ran out before the frames"):
        list(upscaler.stream(frames.unbind(0), iter(per_frame[:1].unbind(0))))


def test_a_clip_prompt_is_memoised_and_per_frame_prompts_are_not(upscaler: OSDiffVSRUpscaler,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import zoo.osdiffvsr.pipeline as pipeline

    frames = torch.rand(3, 3, 8, 8)
    _, length, width = upscaler.net.prompt_embeds.shape
    per_frame = (1.0 + torch.arange(3.0)).view(3, 1, 1).expand(3, length, width)
    memos = []
    registered = pipeline.memoise_denoiser
    monkeypatch.setattr(pipeline, "memoise_denoiser", lambda memo, unet: (memos.append(memo), registered(memo, unet)))
    memoised = upscaler(frames)
    assert len(memos) == 1 and memos[0].hits > 0
    # Frame t with its own condition c_t equals frame t of a clip conditioned on c_t throughout: the memo of a
    # clip prompt is never applied to per-frame prompts.
    mixed = upscaler(frames, prompt_embeds=per_frame)
    assert len(memos) == 1
    for t in range(3):
        assert torch.equal(mixed[t], upscaler(frames, prompt_embeds=per_frame[t : t + 1])[t])
    monkeypatch.setattr(pipeline, "memoise_denoiser", lambda memo, unet: 0)  # registers nothing: all computed
    assert torch.equal(memoised, upscaler(frames))


@pytest.mark.parametrize("per_frame_prompts", [False, True])
def test_the_vae_does_not_divide_by_its_output_scales_of_one(upscaler: OSDiffVSRUpscaler,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             per_frame_prompts: bool) -> None:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    import zoo.osdiffvsr.pipeline as pipeline
    from zoo.bench.pipeline import DispatchCounter

    frames = torch.rand(3, 3, 8, 8)
    prompts = upscaler.net.prompt_embeds.expand(3, -1, -1) if per_frame_prompts else None
    blocks = [m for m in upscaler.net.vae.modules() if type(m) is ResnetBlock2D or isinstance(m, Attention)]
    calls = []
    hooks = [m.register_forward_hook(lambda *args: calls.append(1)) for m in blocks]

    def divisions() -> tuple[torch.Tensor, int]:
        divided = []

        class Divisions(DispatchCounter):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                divided.append(func == torch.ops.aten.div.Tensor)
                return super().__torch_dispatch__(func, types, args, kwargs)

        with Divisions():
            out = upscaler(frames, prompt_embeds=prompts)
        return out, sum(divided)

    try:
        unit, unit_divisions = divisions()
        block_calls = len(calls)
        monkeypatch.setattr(pipeline, "unit_output_scales", lambda memo, model: None)  # every scale divided by
        plain, plain_divisions = divisions()
    finally:
        for hook in hooks:
            hook.remove()
    assert block_calls > 0 and len(calls) == 2 * block_calls
    assert plain_divisions - unit_divisions == block_calls  # one division per VAE block call, and no other
    assert torch.equal(unit, plain)  # x / 1 is x


def test_odd_sizes_are_padded_and_cropped(upscaler: OSDiffVSRUpscaler) -> None:
    frames = torch.rand(2, 3, 45, 30)
    out = upscaler(frames)
    assert out.shape == (2, 3, 180, 120)
    # The network needs LR sizes that divide by 2 (x4 upsampling, then a VAE factor of 8).
    assert upscaler.net.size_multiple == 2
    padded = torch.nn.functional.pad(frames, (0, 0, 0, 1), mode="replicate")
    with torch.no_grad():
        reference = upscaler.net(padded[1:2], padded[0:1], padded[1:2])
    # The colour fix (AdaIN by default) applies to the cropped output, with the unpadded frame as source.
    assert torch.allclose(out[0], upscaler.fix_colors(reference[:, :, :180, :120], frames[0:1])[0], atol=1e-5)


def test_latent_tiling(upscaler: OSDiffVSRUpscaler) -> None:
    frames = torch.rand(2, 3, 32, 48)
    whole = upscaler(frames)
    try:
        upscaler.configure(tile=64)  # the latent is 16 x 24: one 32-pixel tile, same result
        assert torch.allclose(upscaler(frames), whole, atol=1e-6)
        upscaler.configure(tile=16, tile_overlap=8)  # 8-pixel latent tiles overlapping by 4
        tiled = upscaler(frames)
    finally:
        upscaler.configure(tile=None, tile_overlap=32)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert not torch.equal(tiled, whole)


def test_tiny_folder_round_trip_holds_everything(upscaler: OSDiffVSRUpscaler, tmp_path: Path) -> None:
    upscaler.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(FILES.values())
    loaded = OSDiffVSRUpscaler.from_pretrained(tmp_path)
    frames = torch.rand(3, 3, 16, 24)
    assert torch.equal(loaded(frames), upscaler(frames))


def test_folder_with_base_model_omits_published_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tmp_path / "sd21"
    source = OSDiffVSRUpscaler.from_variant("tiny")
    # A diffusers base folder: the tiny UNet/VAE without adapters.
    config = OSDiffVSRConfig.tiny()
    unet, vae = UNet2DConditionModel(**config.unet), AutoencoderKL(**config.vae)
    unet.save_pretrained(base / "unet")
    vae.save_pretrained(base / "vae")
    model = OSDiffVSRUpscaler(config.replace(base_model=str(base)))
    model.net.load_base(base, prompt=None)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "lora_B" in name or name.startswith("fusion."):
                p.normal_(std=0.01)
        model.net.prompt_embeds.normal_()
        model.net.flow.load_state_dict(source.net.flow.state_dict())
    folder = model.save_pretrained(tmp_path / "export")
    with safe_open(folder / FILES["base"], "pt") as f:
        names = list(f.keys())
    assert names and all(name.startswith("flow.") for name in names)  # RAFT is not pretrained here
    loaded = OSDiffVSRUpscaler.from_pretrained(folder)
    frames = torch.rand(3, 3, 16, 16)
    assert torch.equal(loaded(frames), model(frames))


def test_folder_mismatch_is_reported(upscaler: OSDiffVSRUpscaler, tmp_path: Path) -> None:
    upscaler.save_pretrained(tmp_path)
    (tmp_path / FILES["mff"]).unlink()
    with pytest.raises(ValueError, match="missing"):
        OSDiffVSRUpscaler.from_pretrained(tmp_path)


CLIPS = Path(__file__).parents[2] / ".." / "shared" / "clips"


@pytest.mark.skipif(not (CLIPS / "dove_002.mp4").is_file(), reason="shared clips are absent")
def test_streams_a_real_clip_of_odd_size(upscaler: OSDiffVSRUpscaler) -> None:
    from zoo.components.video_io import iter_frames

    # A 61 x 107 corner of the 318 x 180 clip keeps real content and an odd size, and runs fast.
    frames = (frame[:, :61, :107] for frame in iter_frames(CLIPS / "dove_002.mp4", max_frames=2))
    out = list(upscaler.stream(frames))
    assert len(out) == 2 and out[0].shape == (3, 244, 428)


def test_bfloat16_stays_within_its_stated_tolerance_of_float32(upscaler: OSDiffVSRUpscaler) -> None:
    half = copy.deepcopy(upscaler).to(torch.bfloat16)
    assert half.net.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.net.flow.parameters())  # RAFT: a float32 island
    frames = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = half(frames)
    assert out.dtype == torch.float32
    # Tolerance 0.1 max, 0.01 mean on outputs in [0, 1]. Measured on this tiny random model with seeds 0-2:
    # max 0.054-0.069, mean 0.0036-0.0056. Eq. (2) divides the bfloat16 UNet's eps error by alpha_T = 0.068
    # (x15), which float32 islands after the UNet cannot undo; everything after it runs in float32.
    difference = (out - upscaler(frames)).abs()
    assert difference.max() < 0.1 and difference.mean() < 0.01


def test_one_step_constants_and_update_stay_float32_under_bfloat16(upscaler: OSDiffVSRUpscaler) -> None:
    half = copy.deepcopy(upscaler.net).to(torch.bfloat16)
    abar = DDPMScheduler(**half.config.scheduler).alphas_cumprod[half.config.timestep].double().item()
    # Python floats from float64: sqrt(abar_999) = sqrt(0.00466) = 0.068265, not a bfloat16 rounding of it.
    assert (half.alpha_t, half.beta_t) == (math.sqrt(abar), math.sqrt(1 - abar))
    z = torch.tensor([[0.5]], dtype=torch.bfloat16)
    eps = torch.tensor([[0.5]], dtype=torch.bfloat16)
    # (0.5 - 0.99767 * 0.5) / 0.068265 = 0.01709 in float32; the same arithmetic in bfloat16 gives 0.0286.
    out = one_step_denoise(z, eps, half.alpha_t, half.beta_t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[(0.5 - half.beta_t * 0.5) / half.alpha_t]]))


def test_the_streams_once_per_frame_flow_encodings_equal_each_windows_own(upscaler: OSDiffVSRUpscaler) -> None:
    torch.manual_seed(0)
    frames = torch.rand(4, 3, 20, 28)  # 20 is no multiple of 8: the windows pad, and the encodings with them
    encoder = upscaler.net.flow.raft.feature_encoder
    encoded = []
    handle = encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    try:
        streamed = list(upscaler.stream(frames.unbind(0)))
    finally:
        handle.remove()
    assert encoded == [1, 1, 1, 1]  # one image per call, one call per frame (each window encoded 4 before)
    neighbours = [(1, 1), (0, 2), (1, 3), (2, 2)]  # the clip's ends mirror their one neighbour
    with torch.no_grad():
        reference = [upscaler.upscale_window(frames[before][None], frames[t][None], frames[after][None])[0]
                     for t, (before, after) in enumerate(neighbours)]
    # The window encodes its 4 images as one batch, the stream each frame alone: equal here (measured 0); a
    # convolution may round another batch size differently.
    for got, expected in zip(streamed, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
