"""Stream-DiffVSR pipeline: streaming, causality, odd sizes, official-layout folders, torch.hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

import zoo.hub
import zoo.stream_diffvsr.pipeline as pipeline_module
from zoo.components.flow import FlowEstimator
from zoo.stream_diffvsr.network import StreamDiffVSRConfig
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
    held = {name: value for name, value in vars(session).items() if isinstance(value, torch.Tensor)}
    assert set(held) == {"prev_lr", "prev_hr"}
    assert held["prev_lr"].shape == (1, 3, 16, 24) and held["prev_hr"].shape == (1, 3, 64, 96)


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
def no_raft_download(monkeypatch):
    # torchvision's RAFT weights cannot be downloaded here; official folders ask for them.
    monkeypatch.setattr(pipeline_module, "FlowEstimator",
                        lambda variant, pretrained, num_flow_updates: FlowEstimator("small", False, 2))


def test_official_layout_loads_strictly_and_runs(tmp_path, no_raft_download, official_vae_keys):
    config = StreamDiffVSRConfig.tiny()
    states = write_official_folder(tmp_path / "official", config, official_vae_keys)
    up = StreamDiffVSRUpscaler.from_pretrained(tmp_path / "official").eval()
    for name in ("unet", "controlnet", "vae"):
        ours = getattr(up.net, name).state_dict()
        assert set(ours) == set(states[name])
        assert all(torch.equal(ours[k], states[name][k]) for k in ours)
    assert up.config.scheduler["timestep_spacing"] == "trailing"
    assert up.config.scheduler["clip_sample"] is False and up.config.scheduler["steps_offset"] == 1
    # the empty-prompt embedding was computed with the folder's text encoder: (1, 6 tokens, 16)
    assert up.net.prompt_embeds.shape == (1, 6, 16) and up.net.prompt_embeds.abs().sum() > 0
    out = up(torch.rand(3, 3, 16, 24))
    assert out.shape == (3, 3, 64, 96) and torch.isfinite(out).all()

    hub = torch.hub.load(str(REPO_ROOT), "stream_diffvsr", source="local", weights=str(tmp_path / "official"))
    assert all(torch.equal(a, b) for a, b in zip(hub.net.state_dict().values(), up.net.state_dict().values()))


def test_official_folder_without_prompt_source_fails_clearly(tmp_path, no_raft_download, official_vae_keys):
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


def test_pretrained_raft_missing_raises_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from urllib.error import URLError

    from torchvision.models.optical_flow import Raft_Small_Weights

    def offline(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(type(Raft_Small_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded"):
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
