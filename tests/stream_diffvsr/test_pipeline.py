"""Stream-DiffVSR pipeline: streaming, causality, odd sizes, official-layout folders, torch.hub."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

import zoo.hub
import zoo.stream_diffvsr.network as network_module
from zoo.components.flow import FlowEstimator, FlowFeatures, published_raft_weights
from zoo.stream_diffvsr.network import StreamDiffVSRConfig, controlnet_config_from_unet, ddim_step, stream_warp
from zoo.stream_diffvsr.pipeline import StreamDiffVSRUpscaler

REPO_ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def upscaler() -> StreamDiffVSRUpscaler:
    torch.manual_seed(0)
    return StreamDiffVSRUpscaler.from_variant("tiny").eval()


def test_hub_tiny_runs_on_a_video():
    up = zoo.hub.load("stream_diffvsr", pretrained=False, variant="tiny")
    video = torch.rand(5, 3, 32, 48)
    out = up(video)
    assert out.shape == (5, 3, 128, 192)
    assert out.min() >= 0 and out.max() <= 1


def test_causality_future_frames_never_change_past_outputs(upscaler):
    torch.manual_seed(1)
    video = torch.rand(4, 3, 16, 24)
    changed = video.clone()
    changed[2:] = torch.rand(2, 3, 16, 24)
    a, b = upscaler(video), upscaler(changed)
    assert torch.equal(a[:2], b[:2])
    assert not torch.equal(a[2:], b[2:])


def test_previous_frame_guides_the_next(upscaler):
    torch.manual_seed(2)
    video = torch.rand(3, 3, 16, 24)
    changed = video.clone()
    changed[0] = torch.rand(3, 16, 24)
    a, b = upscaler(video), upscaler(changed)
    # frame 1 differs only through the warped previous output (ARTG + TPM)
    assert not torch.equal(a[1], b[1])


def test_session_holds_one_previous_frame_only(upscaler):
    session = upscaler.session()
    for _ in range(3):
        out = session.push(torch.rand(3, 16, 24))
    assert out.shape == (3, 64, 96)
    held = {name: value for name, value in vars(session).items() if isinstance(value, (torch.Tensor, FlowFeatures))}
    assert set(held) == {"prev_flow", "prev_hr"}
    # multiples of 4 run as they are; RAFT's encodings of the last frame's bicubic x4 image, for the next flow
    assert held["prev_hr"].shape == (1, 3, 64, 96)
    assert held["prev_flow"].fmap.shape[0] == 1 and held["prev_flow"].size == (64, 96)
    assert not held["prev_flow"].is_source  # the feature map only: the next flow ends at this frame


def test_odd_sizes_are_padded_and_cropped(upscaler):
    out = upscaler(torch.rand(2, 3, 19, 27))
    assert out.shape == (2, 3, 76, 108)


def test_stream_rejects_size_change_and_bad_frames(upscaler):
    session = upscaler.session()
    session.push(torch.rand(3, 16, 24))
    with pytest.raises(ValueError, match="one size"):
        session.push(torch.rand(3, 24, 24))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        upscaler.session().push(torch.rand(1, 3, 16, 24))


def _tiny_clip_text(folder: Path, hidden: int) -> None:
    """A tiny CLIP tokenizer + text encoder, as in the official repository's text_encoder/ and tokenizer/."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    (folder / "tokenizer").mkdir(parents=True)
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "a</w>": 3}
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                              pad_token="!", model_max_length=6)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(3)
    CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=6, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(folder / "text_encoder")


def write_official_folder(folder: Path, config: StreamDiffVSRConfig,
                          official_vae_keys) -> dict[str, dict[str, torch.Tensor]]:
    """An official-layout folder written without our classes: diffusers models for unet/controlnet,
    the official config.json fields and parameter names for vae/, diffusers' scheduler_config.json."""
    torch.manual_seed(4)
    states = {}
    for name, cls in (("unet", UNet2DConditionModel), ("controlnet", ControlNetModel)):
        model = cls(**getattr(config, name))
        model.save_pretrained(folder / name)
        states[name] = model.state_dict()
    vae = config.vae
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "TemporalAutoencoderTiny", "_diffusers_version": "0.27.2", "act_fn": "relu",
        "block_out_channels": list(vae["decoder_block_out_channels"]),
        "decoder_block_out_channels": list(vae["decoder_block_out_channels"]),
        "encoder_block_out_channels": list(vae["encoder_block_out_channels"]), "force_upcast": False,
        "in_channels": 3, "latent_channels": 4, "latent_magnitude": 3, "latent_shift": 0.5,
        "num_decoder_blocks": list(vae["num_decoder_blocks"]), "num_encoder_blocks": list(vae["num_encoder_blocks"]),
        "out_channels": 3, "scaling_factor": 1.0, "shift_factor": 0.0, "upsample_fn": "nearest",
        "upsampling_scaling_factor": 2,
    }))
    vae_state = {}
    for key in sorted(official_vae_keys(vae)):
        if key.endswith("alpha"):
            vae_state[key] = torch.tensor(0.5)
        else:
            vae_state[key] = torch.randn(_vae_shape(key, vae)) * 0.1
    save_file(vae_state, folder / "vae" / "diffusion_pytorch_model.safetensors")
    states["vae"] = vae_state
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear", "beta_start": 0.0001,
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "timestep_spacing": "trailing",
    }))
    _tiny_clip_text(folder, config.unet["cross_attention_dim"])
    return states


def _vae_shape(key: str, vae) -> tuple[int, ...]:
    c = vae["encoder_block_out_channels"][0]
    if ".temporal_processor." in key:
        return (c, c, 3) if key.endswith("weight") else (c,)
    if ".conv." in key:
        return (c, c, 3, 3) if key.endswith("weight") else (c,)
    part, index = key.split(".")[0], int(key.split(".")[2])
    last_encoder = len(vae["num_encoder_blocks"]) + sum(vae["num_encoder_blocks"])
    last_decoder = 2 * len(vae["num_decoder_blocks"]) + sum(vae["num_decoder_blocks"])
    if part == "encoder" and index == 0:
        return (c, 3, 3, 3) if key.endswith("weight") else (c,)
    if part == "encoder" and index == last_encoder:
        return (4, c, 3, 3) if key.endswith("weight") else (4,)
    if part == "decoder" and index == 0:
        return (c, 4, 3, 3) if key.endswith("weight") else (c,)
    if part == "decoder" and index == last_decoder:
        return (3, c, 3, 3) if key.endswith("weight") else (3,)
    return (c, c, 3, 3)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache: torchvision finds no RAFT weights there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


@pytest.fixture
def cached_raft(torch_home) -> dict[str, torch.Tensor]:
    """Random RAFT-large weights where torchvision keeps its downloaded ones (none can be downloaded here)."""
    torch.manual_seed(5)
    state = FlowEstimator("large", pretrained=False).raft.state_dict()
    _, path = published_raft_weights("large")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_untouched_official_folder_loads_with_the_official_settings(tmp_path, cached_raft, official_vae_keys):
    config = StreamDiffVSRConfig.tiny()
    states = write_official_folder(tmp_path / "official", config, official_vae_keys)
    assert not (tmp_path / "official" / "config.json").exists()
    up = zoo.hub.load("stream_diffvsr", weights=tmp_path / "official")
    assert up.projections_fused  # zoo.load fuses attention projections; the originals stay as loaded
    for name in ("unet", "controlnet", "vae"):
        ours = {k: v for k, v in getattr(up.net, name).state_dict().items()
                if ".to_qkv." not in k and ".to_kv." not in k}
        assert set(ours) == set(states[name])
        assert all(torch.equal(ours[k], states[name][k]) for k in ours)
    assert up.config.scheduler["timestep_spacing"] == "trailing"
    assert up.config.scheduler["clip_sample"] is False and up.config.scheduler["steps_offset"] == 1
    # the empty-prompt embedding was computed with the folder's text encoder: (1, 6 tokens, 16)
    assert up.net.prompt_embeds.shape == (1, 6, 16) and up.net.prompt_embeds.abs().sum() > 0
    # official inference.py: RAFT-large with torchvision's weights, 12 updates, at HR; noise seed 42
    assert (up.config.flow_variant, up.config.flow_updates, up.config.seed) == ("large", 12, 42)
    assert up.flow_resolution == "hr" and up.flow.signed_inputs and up.flow.num_flow_updates == 12
    assert all(torch.equal(v, cached_raft[k]) for k, v in up.flow.raft.state_dict().items())
    out = up(torch.rand(2, 3, 16, 24))
    assert out.shape == (2, 3, 64, 96) and torch.isfinite(out).all()

    hub = torch.hub.load(str(REPO_ROOT), "stream_diffvsr", source="local", weights=str(tmp_path / "official"))
    assert all(torch.equal(a, b) for a, b in zip(hub.net.state_dict().values(), up.net.state_dict().values()))


def test_official_folder_offline_without_raft_names_the_file(tmp_path, torch_home, official_vae_keys):
    write_official_folder(tmp_path / "official", StreamDiffVSRConfig.tiny(), official_vae_keys)
    with pytest.raises(FileNotFoundError) as error:
        zoo.hub.load("stream_diffvsr", weights=tmp_path / "official")
    message = str(error.value)
    assert str(torch_home / "hub" / "checkpoints" / "raft_large_C_T_SKHT_V2-ff5fadd5.pth") in message
    assert "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth" in message
    assert "HF_HUB_OFFLINE=1" in message and "flow/model.safetensors" in message and "\n" not in message


def test_exported_official_folder_carries_raft_and_needs_no_download(tmp_path, cached_raft, official_vae_keys):
    write_official_folder(tmp_path / "official", StreamDiffVSRConfig.tiny(), official_vae_keys)
    up = zoo.hub.load("stream_diffvsr", weights=tmp_path / "official", merge_lora=False)
    folder = zoo.hub.export(up, tmp_path / "exported")
    assert (folder / "flow" / "model.safetensors").is_file()
    published_raft_weights("large")[1].unlink()  # as on a machine that never downloaded torchvision's RAFT
    loaded = zoo.hub.load("stream_diffvsr", weights=folder)
    assert all(torch.equal(v, cached_raft[k]) for k, v in loaded.flow.raft.state_dict().items())
    video = torch.rand(2, 3, 16, 24)
    assert torch.equal(loaded(video), up(video))


def test_official_folder_without_prompt_source_fails_clearly(tmp_path, cached_raft, official_vae_keys):
    write_official_folder(tmp_path / "official", StreamDiffVSRConfig.tiny(), official_vae_keys)
    import shutil

    shutil.rmtree(tmp_path / "official" / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder/ \\+ tokenizer/"):
        StreamDiffVSRUpscaler.from_pretrained(tmp_path / "official")


def test_saved_folder_has_official_layout_readable_by_diffusers(tmp_path, upscaler):
    folder = upscaler.save_pretrained(tmp_path / "saved")
    for name in ("unet", "controlnet", "vae"):
        assert (folder / name / "config.json").is_file()
        assert (folder / name / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert (folder / "flow" / "model.safetensors").is_file()
    # the official code loads unet/ and controlnet/ with diffusers' from_pretrained
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in upscaler.net.unet.state_dict().items())
    controlnet = ControlNetModel.from_pretrained(folder / "controlnet")
    assert set(controlnet.state_dict()) == set(upscaler.net.controlnet.state_dict())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "TemporalAutoencoderTiny" and vae["num_encoder_blocks"] == [1, 1, 1]
    # and our loader reads it back to identical outputs
    video = torch.rand(2, 3, 16, 24)
    assert torch.equal(StreamDiffVSRUpscaler.from_pretrained(folder).eval()(video), upscaler(video))


def test_scheduler_keys_missing_from_the_file_take_diffusers_defaults(tmp_path, upscaler):
    folder = upscaler.save_pretrained(tmp_path / "saved")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}))
    scheduler = StreamDiffVSRUpscaler.from_pretrained(folder).config.scheduler
    # diffusers' DDIMScheduler defaults: leading spacing, no offset, clip_sample on, ᾱ_final = 1.
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"], scheduler["clip_sample"],
            scheduler["set_alpha_to_one"]) == ("leading", 0, True, True)


def test_missing_component_names_the_file(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"unet/config\.json is missing"):
        StreamDiffVSRUpscaler.from_pretrained(tmp_path)


def test_pretrained_raft_download_failure_names_the_file(monkeypatch, torch_home):
    from urllib.error import URLError

    from torchvision.models.optical_flow import Raft_Small_Weights

    def offline(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(type(Raft_Small_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(FileNotFoundError, match=r"raft_small_C_T_V2-01064c6d\.pth .*could not be downloaded"):
        FlowEstimator("small", pretrained=True)


def test_zoo_upscale_streams_a_file_and_a_y4m_pipe(tmp_path, monkeypatch):
    import io
    import types
    from fractions import Fraction

    from zoo import cli
    from zoo.components.video_io import iter_y4m, probe_video, write_video, write_y4m

    frames = torch.rand(4, 3, 19, 27)
    src = write_video(tmp_path / "in.mkv", frames, fps=Fraction(24000, 1001))
    out = tmp_path / "out.mp4"
    args = ["--model", "stream_diffvsr", "--random-weights", "--variant", "tiny"]
    cli.zoo_main(["upscale", str(src), str(out), *args])
    info = probe_video(out)
    assert (info.width, info.height, info.num_frames, info.fps) == (108, 76, 4, Fraction(24000, 1001))

    source, sink = io.BytesIO(), io.BytesIO()
    write_y4m(source, frames.unbind(0), 25)
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(source.getvalue())))
    monkeypatch.setattr("sys.stdout", types.SimpleNamespace(buffer=sink))
    cli.zoo_main(["upscale", "-", "-", *args])
    piped = iter_y4m(io.BytesIO(sink.getvalue()))
    assert (piped.width, piped.height, piped.fps) == (108, 76, 25) and len(list(piped)) == 4


# The official pipeline's behaviour, pinned on hand-computed tensors --------------------------------------------------

def spy_frames(up: StreamDiffVSRUpscaler, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Record `(lr, noise, warped_prev)` of every frame the networks run."""
    seen = []
    upscale_frame = up.net.upscale_frame

    def spy(lr, noise, warped_prev, memo=None):
        seen.append((lr, noise, warped_prev))
        return upscale_frame(lr, noise, warped_prev, memo)

    monkeypatch.setattr(up.net, "upscale_frame", spy)
    return seen


class RecordingFlow(torch.nn.Module):
    """A flow estimator returning one constant flow `(dx, dy)` and recording the frames it is given."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__()
        self.dx, self.dy = dx, dy
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, current, previous):
        self.calls.append((current, previous))
        flow = torch.empty(current.shape[0], 2, *current.shape[-2:])
        flow[:, 0], flow[:, 1] = self.dx, self.dy
        return flow


def edge_clip() -> torch.Tensor:
    """Two 4x4 frames: a flat grey one, then one whose left half is black and right half white."""
    current = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(3, 4, 4)
    return torch.stack([torch.full((3, 4, 4), 0.5), current])


@pytest.fixture
def fresh() -> StreamDiffVSRUpscaler:
    """A tiny upscaler of this test's own, free to get another flow estimator."""
    torch.manual_seed(0)
    return StreamDiffVSRUpscaler.from_variant("tiny").eval()


def test_hr_flow_runs_on_bicubic_x4_frames_in_minus_one_one_unclamped_current_first(fresh, monkeypatch):
    flow = fresh.flow = RecordingFlow(2.0, 0.0)
    seen = spy_frames(fresh, monkeypatch)
    session = fresh.session()
    session.push(edge_clip()[0])
    prev_hr = session.prev_hr
    session.push(edge_clip()[1])
    (current, previous), = flow.calls
    assert current.shape == previous.shape == (1, 3, 16, 16)
    # channels-last, as the official frames (views of HWC arrays): RAFT's kernels depend on it
    assert current.is_contiguous(memory_format=torch.channels_last)
    # Grey 0.5 is 0 in [-1, 1], and bicubic keeps it 0. The edge row [-1, -1, 1, 1] upsampled x4
    # (align_corners=False, Keys kernel a = -0.75, borders replicated): HR column x reads LR position
    # (x + 0.5) / 4 - 0.5. Column 11: 2.375, taps LR 1..4 (4 -> 3) at distances 1.375, 0.375, 0.625,
    # 1.625 with weights -0.10986328, 0.74951172, 0.42626953, -0.06591797:
    # -1 * -0.10986328 + 0.74951172 + 0.42626953 - 0.06591797 = 1.21972656 (overshoot kept).
    # Column 12: 2.625, taps 1..4 at 1.625, 0.625, 0.375, 1.375: 0.06591797 + 0.42626953 + 0.74951172
    # - 0.10986328 = 1.13183594. Column 8: 1.625, taps 0..3: -(-0.06591797 + 0.42626953) + 0.74951172
    # - 0.10986328 = 0.27929688.
    assert torch.equal(previous, torch.zeros(1, 3, 16, 16))
    row = current[0, 0, 0]
    assert row[[8, 11, 12]].tolist() == pytest.approx([0.27929688, 1.21972656, 1.13183594], abs=1e-6)
    assert torch.equal(current[0, :, 5], current[0, :, 0]) and current.max() > 1
    # The returned flow warps the previous raw output.
    assert torch.equal(seen[1][2], stream_warp(prev_hr, flow(current, previous)))


def test_lr_flow_option_runs_raft_on_lr_frames_and_scales_the_flow_x4(fresh, monkeypatch):
    flow = fresh.flow = RecordingFlow(1.0, -0.5)
    fresh.configure(flow_resolution="lr")
    seen = spy_frames(fresh, monkeypatch)
    session = fresh.session()
    session.push(edge_clip()[0])
    prev_hr = session.prev_hr
    session.push(edge_clip()[1])
    (current, previous), = flow.calls
    assert torch.equal(current[0, 0, 0], torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert torch.equal(previous, torch.zeros(1, 3, 4, 4))
    # (1, -0.5) LR pixels are (4, -2) HR pixels.
    hr_flow = torch.stack([torch.full((16, 16), 4.0), torch.full((16, 16), -2.0)])[None]
    assert torch.equal(seen[1][2], stream_warp(prev_hr, hr_flow))
    with pytest.raises(ValueError, match="flow_resolution must be one of hr, lr, got 'LR'"):
        fresh.configure(flow_resolution="LR")


def four_level_config() -> StreamDiffVSRConfig:
    """The tiny config with a 4-level UNet (downsampling by 8), like the SD x4 upscaler's."""
    config = StreamDiffVSRConfig.tiny()
    unet = {**config.unet, "block_out_channels": [8, 8, 8, 16],
            "down_block_types": ["DownBlock2D"] * 3 + ["CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * 3,
            "only_cross_attention": [False, False, False, True]}
    return dataclasses.replace(config, unet=unet, controlnet=controlnet_config_from_unet(unet, (8, 8, 16)))


def test_lr_sizes_pad_only_to_the_autoencoder_factor_four(monkeypatch):
    torch.manual_seed(0)
    up = StreamDiffVSRUpscaler(four_level_config()).eval()
    assert up.size_multiple == 4
    seen = spy_frames(up, monkeypatch)
    # 20 x 28 is a multiple of 4 but not of the UNet's 8: it runs as it is (the official pipeline's size).
    frames = torch.rand(2, 3, 20, 28)
    assert up(frames).shape == (2, 3, 80, 112)
    assert [tuple(lr.shape) for lr, _, _ in seen] == [(1, 3, 20, 28)] * 2
    assert [tuple(noise.shape) for _, noise, _ in seen] == [(1, 4, 20, 28)] * 2
    assert torch.equal(seen[0][0][0], frames[0] * 2 - 1)
    # 18 x 22 is padded to 20 x 24 by repeating the last row and column; the output is cropped to 72 x 88.
    seen.clear()
    session = up.session()
    out = session.push(frames[0, :, :18, :22])
    lr = seen[0][0][0]
    assert lr.shape == (3, 20, 24)
    assert torch.equal(lr[:, 18:, :22], lr[:, 17:18, :22].expand(3, 2, 22))
    assert torch.equal(lr[:, :, 22:], lr[:, :, 21:22].expand(3, 20, 2))
    assert torch.equal(out, (session.prev_hr[0].float() / 2 + 0.5).clamp(0, 1)[:, :72, :88])


def test_noise_is_drawn_per_frame_from_a_stream_generator_seeded_by_config_seed(upscaler, monkeypatch):
    seen = spy_frames(upscaler, monkeypatch)
    frames = torch.rand(3, 3, 8, 12)
    list(upscaler.stream(frames))
    # The official inference.py on CPU: set_seed(42), then one (1, 4, h, w) draw per frame, in order.
    assert upscaler.config.seed == 42
    torch.manual_seed(42)
    official = [torch.randn(1, 4, 8, 12) for _ in range(3)]
    assert all(torch.equal(noise, expected) for (_, noise, _), expected in zip(seen, official))
    # Every stream starts again from the seed; another seed gives other noise.
    seen.clear()
    list(upscaler.stream(frames[:1]))
    assert torch.equal(seen[0][1], official[0])
    monkeypatch.setattr(upscaler.config, "seed", 7)
    seen.clear()
    list(upscaler.stream(frames[:1]))
    assert torch.equal(seen[0][1], torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(7)))


def test_bfloat16_stays_within_its_stated_tolerance_of_float32(upscaler) -> None:
    half = copy.deepcopy(upscaler).to(torch.bfloat16)
    assert half.net.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.flow.parameters())  # RAFT: a float32 island
    frames = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = half(frames)
    assert out.dtype == torch.float32
    # Tolerance 0.01 max, 0.001 mean on outputs in [0, 1]; measured on this tiny random model with seeds 0-2:
    # max 0.0021-0.0025, mean 0.00034-0.00041.
    difference = (out - upscaler(frames)).abs()
    assert difference.max() < 0.01 and difference.mean() < 0.001


def test_ddim_constants_and_latents_stay_float32_under_bfloat16(upscaler, monkeypatch) -> None:
    net = copy.deepcopy(upscaler.net).to(torch.bfloat16)
    # The last step (t = 249) goes to alpha_bar_0 = 1 - beta_0 = 1 - 0.0001 = 0.9999, which bfloat16 rounds to 1.0.
    assert net.scheduler.alphas_cumprod.dtype == torch.float32
    assert net.scheduler.final_alpha_cumprod.item() == pytest.approx(0.9999, abs=1e-7)
    assert torch.tensor(0.9999).bfloat16().item() == 1.0
    assert all(isinstance(x, float) for constants in net.ddim_constants.values() for x in constants)
    seen = []

    def step(constants, latents, output):
        seen.append((output.dtype, latents.dtype))
        return ddim_step(constants, latents, output)

    monkeypatch.setattr(network_module, "ddim_step", step)
    lr = torch.rand(1, 3, 8, 8) * 2 - 1
    latents = net.sample(torch.randn(1, net.vae.config.latent_channels, 8, 8), lr.bfloat16(), None)
    assert latents.dtype == torch.float32
    assert seen == [(torch.float32, torch.float32)] * len(net.timesteps)
