"""OSDEnhancer training: Eqs. (8), (10)-(12) on hand-computed tensors, the trainable set of every stage, the
MUSIQ term's honest failure and its stand-in, the forward used in validation, and the CogVideoX1.5 base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zoo.components.color import high_pass
from zoo.osdenhancer.callbacks import OSDEnhancerStage, OSDEnhancerStages
from zoo.osdenhancer.module import OSDEnhancerModule, residual_loss, warp_loss


@pytest.fixture(scope="module")
def module() -> OSDEnhancerModule:
    torch.manual_seed(0)
    return OSDEnhancerModule(variant="tiny", perceptual_pretrained=False, flow_pretrained=False, flow_variant="small",
                             flow_updates=2)


def _use_stage(module: OSDEnhancerModule, stage: OSDEnhancerStage) -> None:
    module.stage, module.loss_weights = stage, dict(stage.loss_weights)


# Eqs. (10)-(11) -------------------------------------------------------------------------------

def test_eq10_11_residual_loss_on_known_sequences() -> None:
    # x = 0, 1, 3 and y = 0, 2, 2: Δx = (1, 2), Δy = (2, 0); mean |Δx - Δy| = (1 + 2) / 2 = 1.5.
    x = torch.tensor([0.0, 1.0, 3.0]).view(1, 3, 1, 1, 1)
    y = torch.tensor([0.0, 2.0, 2.0]).view(1, 3, 1, 1, 1)
    assert residual_loss(x, y).item() == 1.5
    # Sequences differing by a constant have the same frame-to-frame changes: zero loss.
    clip = torch.randn(2, 5, 4, 3, 3)
    assert residual_loss(clip + 0.7, clip).item() == pytest.approx(0.0, abs=1e-6)
    assert residual_loss(clip * 2, clip).item() > 0.1


# Eq. (12) ---------------------------------------------------------------------------------------

def _shift_flow(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Ground truth of the clip below: frame j+1 is frame j moved one pixel left, so the flow from a later frame
    to an earlier one is +1 in x, and -1 the other way."""
    later = bool(src.sum() > dst.sum())
    flow = torch.zeros(src.shape[0], 2, *src.shape[-2:])
    flow[:, 0] = 1.0 if later else -1.0
    return flow


def test_eq12_warps_the_earlier_frame_onto_the_later_and_masks_what_leaves_the_frame() -> None:
    # One row of 4 pixels, frame j = (0, 1, 2, 3) / 10, frame j+1 = (1, 2, 3, 9) / 10 (content moved one pixel
    # left, a new value entering at x = 3). O_{j→j+1}(I_j) samples I_j at x + 1: (1, 2, 3, 3) / 10 (border);
    # pixel x = 3 of frame j+1 maps outside frame j, so M = (1, 1, 1, 0) and the loss is 0. Without the
    # mask it would be |3 - 9| / 10 / 4 = 0.15 per channel.
    row = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 9.0]]) / 10 + 0.05
    frames = row.view(1, 2, 1, 1, 4).expand(1, 2, 3, 1, 4)
    identity = lambda x: x  # noqa: E731
    assert warp_loss(frames, _shift_flow, identity, xi=1e-6).item() == pytest.approx(0.0, abs=1e-6)
    # Warping with the flow of the other direction (the wrong frame as source) does not align them.
    swapped = lambda src, dst: _shift_flow(dst, src)  # noqa: E731
    assert warp_loss(frames, swapped, identity, xi=1e-6).item() > 0.05


def test_eq12_is_a_masked_mean_of_the_high_frequency_difference() -> None:
    # Zero flow, all pixels visible: the mean |H_0 - H_1| with an identity "filter": |0.2 - 0.5| = 0.3.
    frames = torch.tensor([0.2, 0.5]).view(1, 2, 1, 1, 1).expand(1, 2, 3, 4, 4)
    zero_flow = lambda src, dst: torch.zeros(src.shape[0], 2, *src.shape[-2:])  # noqa: E731
    assert warp_loss(frames, zero_flow, lambda x: x, xi=1e-6).item() == pytest.approx(0.3, rel=1e-5)
    # On high frequencies only (Tab. 7, "HF-only"): a brightness change between frames costs nothing.
    gaussian = lambda x: high_pass(x, "gaussian", sigma=1.5)  # noqa: E731
    assert warp_loss(frames, zero_flow, gaussian, xi=1e-6).item() == pytest.approx(0.0, abs=1e-6)
    textured = torch.rand(1, 1, 3, 8, 8).expand(1, 2, 3, 8, 8) + torch.tensor([0.0, 0.3]).view(1, 2, 1, 1, 1)
    assert warp_loss(textured, zero_flow, gaussian, xi=1e-6).item() == pytest.approx(0.0, abs=1e-5)


# Eq. (8) and the quality term ---------------------------------------------------------------------

def test_eq8_subtracts_the_weighted_quality_score(module) -> None:
    _use_stage(module, OSDEnhancerStages().stages[3])
    losses = {name: torch.tensor(value) for name, value in {"l1": 0.3, "dists": 0.2, "warp": 0.1, "nqa": 0.6}.items()}
    # 0.3 + 1 x 0.2 + 0.05 x 0.1 - 0.05 x 0.6 = 0.475
    assert module.total_loss(losses).item() == pytest.approx(0.475)


def test_a_stage_weighting_musiq_refuses_to_start_without_its_weights(tmp_path: Path) -> None:
    module = OSDEnhancerModule(variant="tiny", perceptual_pretrained=False, flow_pretrained=False,
                               flow_variant="small", musiq_weights=str(tmp_path / "musiq.pth"))
    _use_stage(module, OSDEnhancerStages().stages[3])
    with pytest.raises(FileNotFoundError, match=r"weights 'nqa' \(MUSIQ, Eq. 8\) but its weights .*musiq.pth"):
        module.configure_optimizers()


def test_an_explicit_stand_in_quality_model_is_scaled_to_0_1(module) -> None:
    _use_stage(module, OSDEnhancerStage("spatial", 1, ["net.transformer.*.TE_lora.*"], {"nqa": 0.05}, task="pixel"))
    module.set_quality_model(lambda frames: torch.full((frames.shape[0],), 65.0))
    torch.manual_seed(0)
    losses = module.pixel_losses(torch.rand(1, 5, 3, 4, 4), torch.rand(1, 9, 3, 16, 16), 2)
    assert losses["nqa"].item() == pytest.approx(0.65)  # MUSIQ's 0-100 divided by nqa_scale = 100
    module.configure_optimizers()  # the injected model is used, nothing is loaded


# Stages ---------------------------------------------------------------------------------------------

def _trainable(module: OSDEnhancerModule, stage: OSDEnhancerStage) -> set[str]:
    return {name for name, _ in module.named_parameters() if stage.trains(name)}


def test_every_stage_trains_exactly_its_parameters(module) -> None:
    names = {name for name, _ in module.named_parameters()}
    transformer = {n for n in names if n.startswith("net.transformer.")}
    tr = {n for n in transformer if "_TC_lora." in n or n.startswith("net.transformer.res_patch.")}
    se = {n for n in transformer if ".TE_lora." in n}
    decoder, adaptation, temporal, spatial = (_trainable(module, stage) for stage in OSDEnhancerStages().stages)
    assert decoder == {n for n in names if n.startswith("net.vae.decoder.up_deformable_blocks.")}
    assert adaptation == transformer - tr - se  # "fine-tune DiT": its own weights, not the experts
    assert temporal == tr and len(tr) == 2 * 6 * 2 + 4  # A_TR, B_TR of 6 layers x 2 blocks; res_proj, res_ff0_proj
    assert spatial == se and len(se) == 2 * (2 * 6 + 1)  # A_SE, B_SE of 6 layers x 2 blocks and proj_out
    # The encoder and the stock decoder never train.
    never = names - decoder - adaptation - temporal - spatial
    assert never == {n for n in names if n.startswith(("net.vae.encoder.", "net.vae.decoder."))} - decoder


def test_stage_table_follows_the_paper() -> None:
    decoder, adaptation, temporal, spatial = OSDEnhancerStages().stages
    assert [(s.name, s.steps, s.lr, s.task) for s in (decoder, adaptation, temporal, spatial)] == [
        ("decoder", 5000, 1e-4, "decoder"), ("adaptation", 15000, 2e-5, "latent"), ("temporal", 10000, 1e-4, "latent"),
        ("spatial", 5000, 5e-5, "pixel")]
    assert all(s.optimizer_kwargs["betas"] == (0.9, 0.95) for s in (decoder, adaptation, temporal, spatial))
    assert temporal.loss_weights == {"latent_mse": 1.0, "latent_residual": 1.0}  # Eq. (6), λ_res = 1
    assert spatial.loss_weights == {"l1": 1.0, "dists": 1.0, "warp": 0.05, "nqa": 0.05}  # Eq. (8)


def test_stage_losses_reach_the_objective_with_their_weights(module) -> None:
    hr = torch.rand(1, 9, 3, 16, 16)
    lr = hr[:, ::2, :, ::4, ::4]
    _use_stage(module, OSDEnhancerStage("temporal", 1, ["x"], {"latent_mse": 1.0, "latent_residual": 2.0},
                                        task="latent"))
    torch.manual_seed(0)
    losses = module.latent_losses(lr, hr, 2)
    assert module.total_loss(losses).item() == pytest.approx(
        losses["latent_mse"].item() + 2 * losses["latent_residual"].item())
    _use_stage(module, OSDEnhancerStage("decoder", 1, ["x"], {"pixel_residual": 1.0}, task="decoder"))
    assert set(module.decoder_losses(hr)) == {"pixel_residual"}


def test_the_latent_target_is_the_encoded_hr_clip_and_the_input_the_lr_one(module) -> None:
    hr = torch.rand(1, 9, 3, 16, 16)
    z_gt = module.target_latents(hr)
    assert z_gt.shape == (1, 3, 4, 2, 2)
    video, residual = module.model_inputs(hr[:, ::2, :, ::4, ::4], 2)
    assert video.shape == residual.shape == (1, 3, 9, 16, 16)
    assert torch.equal(residual[:, :, ::2], torch.zeros_like(residual[:, :, ::2]))  # key frames


def test_forward_pads_any_size_and_length_and_crops_back(module) -> None:
    out = module(torch.rand(1, 2, 3, 5, 7), 2)
    assert out.shape == (1, 3, 3, 20, 28) and out.min() >= 0 and out.max() <= 1


def test_loss_networks_are_built_by_the_stages_that_need_them_and_not_saved(module) -> None:
    module._tools.pop("dists", None)
    _use_stage(module, OSDEnhancerStage("spatial", 1, ["net.transformer.*.TE_lora.*"], {"l1": 1.0, "dists": 1.0},
                                        task="pixel"))
    module.configure_optimizers()
    assert "dists" in module._tools and "perceptual" not in module._tools
    assert all(key.startswith("net.") for key in module.state_dict())


def test_training_without_stages_is_refused(module) -> None:
    module.stage = None
    with pytest.raises(RuntimeError, match="trains in stages"):
        module.configure_optimizers()


# Base model -------------------------------------------------------------------------------------------

def _write_base(folder: Path, config) -> None:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(1)
    CogVideoXTransformer3DModel(**config.transformer).save_pretrained(folder / "transformer")
    AutoencoderKLCogVideoX(**config.vae).save_pretrained(folder / "vae")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=3, d_model=config.transformer["text_embed_dim"], d_kv=8, d_ff=16,
                            num_layers=1, num_heads=2)).save_pretrained(folder / "text_encoder")


def test_base_model_fills_everything_but_the_new_parts(tmp_path: Path) -> None:
    from diffusers import CogVideoXTransformer3DModel

    from zoo.osdenhancer.network import OSDEnhancerConfig

    _write_base(tmp_path, OSDEnhancerConfig.tiny())
    module = OSDEnhancerModule(variant="tiny", base_model=str(tmp_path), perceptual_pretrained=False,
                               flow_pretrained=False, flow_variant="small")
    stock = CogVideoXTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer").state_dict()
    ours = module.net.transformer.state_dict()
    assert torch.equal(ours["transformer_blocks.1.attn1.to_q.base_layer.weight"],
                       stock["transformer_blocks.1.attn1.to_q.weight"])
    assert torch.equal(ours["proj_out.base_layer.bias"], stock["proj_out.bias"])
    assert not ours["transformer_blocks.0.attn1.to_q_TC_lora.lora_B.weight"].any()  # new experts add nothing
    assert not ours["proj_out.lora_B.TE_lora.weight"].any()
    assert not module.net.vae.decoder.up_deformable_blocks[0].attn.project_out.weight.any()
    # The empty prompt, encoded by the base model's T5 and padded to 8 tokens.
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(tmp_path, subfolder="text_encoder")
    with torch.no_grad():
        expected = encoder(torch.zeros(1, 8, dtype=torch.long))[0]
    assert torch.allclose(module.net.prompt_embedding, expected)
    # A given embedding file wins.
    save_file({"prompt_embedding": torch.ones(8, 32)}, tmp_path / "empty.safetensors")
    module.load_base(str(tmp_path), str(tmp_path / "empty.safetensors"))
    assert torch.equal(module.net.prompt_embedding, torch.ones(1, 8, 32))


def test_a_base_model_of_another_shape_is_refused(tmp_path: Path) -> None:
    from zoo.osdenhancer.network import OSDEnhancerConfig

    config = OSDEnhancerConfig.tiny()
    config.transformer = {**config.transformer, "num_layers": 1}
    _write_base(tmp_path, config)
    module = OSDEnhancerModule(variant="tiny", perceptual_pretrained=False, flow_pretrained=False, flow_variant="small")
    with pytest.raises(ValueError, match="transformer does not fit OSDEnhancer: 24 missing"):
        module.load_base(str(tmp_path))


def test_a_checkpoint_records_the_hub_name(module) -> None:
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["zoo"]["hub_name"] == "osdenhancer"
