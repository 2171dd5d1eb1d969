"""LoRA helpers: target lists on real diffusers modules, adapter-only weights, merging, masked LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL, CogVideoXTransformer3DModel, UNet2DConditionModel, WanTransformer3DModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from zoo.components.lora import (
    LORA_TARGETS,
    MaskedLoRA,
    apply_masked_lora,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_config,
    lora_state_dict,
    masked_lora_mask,
    merge_lora,
    save_lora,
)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    )


def tiny_cogvideox() -> CogVideoXTransformer3DModel:
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        text_embed_dim=16,
        time_embed_dim=8,
    )


def tiny_wan() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )


BUILDERS = {
    "sd_unet": tiny_unet,
    "sd_vae_encoder": tiny_vae,
    "cogvideox_transformer": tiny_cogvideox,
    "wan_transformer": tiny_wan,
}


def lora_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 3, 16, generator=gen)
    with torch.no_grad():
        return unet(sample, 999, encoder_hidden_states=text).sample


def randomize_lora(model: nn.Module) -> None:
    """B is zero after injection; give every LoRA tensor values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("backbone", sorted(LORA_TARGETS))
def test_every_target_name_matches_a_diffusers_module(backbone: str) -> None:
    model = inject_lora(BUILDERS[backbone](), lora_config(backbone, rank=2))
    adapted = lora_layer_names(model)
    for target in LORA_TARGETS[backbone]:
        assert any(name == target or name.endswith("." + target) for name in adapted), target


def test_vae_encoder_targets_stay_in_the_encoder() -> None:
    vae = inject_lora(tiny_vae(), lora_config("sd_vae_encoder", rank=2))
    adapted = lora_layer_names(vae)
    assert "quant_conv" in adapted
    assert all(name.startswith("encoder.") for name in adapted if name != "quant_conv")
    assert "encoder.mid_block.attentions.0.to_out.0" in adapted
    assert not any(name.startswith("decoder.") or name == "post_quant_conv" for name in adapted)


def test_extra_targets() -> None:
    unet = inject_lora(tiny_unet(), lora_config("sd_unet", rank=2, extra_targets=("time_emb_proj",)))
    assert "down_blocks.0.resnets.0.time_emb_proj" in lora_layer_names(unet)
    assert "time_embedding.linear_1" not in lora_layer_names(unet)


def test_config_values() -> None:
    config = lora_config("wan_transformer", rank=8, alpha=4, dropout=0.1)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 4, 0.1)
    assert lora_config("sd_unet", rank=16).lora_alpha == 16
    with pytest.raises(ValueError, match="backbone must be one of"):
        lora_config("sdxl_unet")


def test_injection_freezes_base_and_starts_at_the_base_output() -> None:
    unet = tiny_unet()
    before = unet_output(unet)
    inject_lora(unet, lora_config("sd_unet", rank=4))
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in unet.named_parameters() if ".lora_" in name}
    assert len(trainable) == 2 * len(lora_layer_names(unet))
    assert torch.equal(unet_output(unet), before)


def test_two_adapters_are_both_active_and_trainable() -> None:
    unet = tiny_unet()
    inject_lora(unet, lora_config("sd_unet", rank=2), adapter_name="a")
    inject_lora(unet, lora_config("sd_unet", rank=3, extra_targets=("time_emb_proj",)), adapter_name="b")
    layer = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert sorted(layer.active_adapters) == ["a", "b"]
    assert all(p.requires_grad for n, p in unet.named_parameters() if ".lora_" in n)
    assert lora_state_dict(unet, "a")["down_blocks.0.resnets.0.conv1.lora_A.weight"].shape[0] == 2
    assert lora_state_dict(unet, "b")["down_blocks.0.resnets.0.conv1.lora_A.weight"].shape[0] == 3
    assert "down_blocks.0.resnets.0.time_emb_proj.lora_A.weight" not in lora_state_dict(unet, "a")
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'a'"):
        inject_lora(unet, lora_config("sd_unet", rank=2), adapter_name="a")


def test_adapter_only_save_load_round_trip_reproduces_outputs(tmp_path) -> None:
    base = tiny_unet()
    trained = inject_lora(copy.deepcopy(base), lora_config("sd_unet", rank=4), adapter_name="osd")
    randomize_lora(trained)
    expected = unet_output(trained)
    save_lora(tmp_path / "lora.safetensors", trained, adapter_name="osd")

    saved = load_file(str(tmp_path / "lora.safetensors"))
    assert saved.keys() == lora_state_dict(trained, "osd").keys()
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)

    # A fresh copy of the base, injected under another adapter name, reproduces the outputs exactly.
    fresh = inject_lora(copy.deepcopy(base), lora_config("sd_unet", rank=4))
    assert not torch.equal(unet_output(fresh), expected)
    load_lora(tmp_path / "lora.safetensors", fresh)
    assert torch.equal(unet_output(fresh), expected)


def test_loading_is_strict() -> None:
    unet = inject_lora(tiny_unet(), lora_config("sd_unet", rank=4))
    state = dict(lora_state_dict(unet))
    key = next(iter(state))
    with pytest.raises(ValueError, match="1 missing keys"):
        load_lora_state_dict(unet, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="1 unknown keys"):
        load_lora_state_dict(unet, {**state, "conv_in.lora_C.weight": torch.zeros(1)})
    other_rank = lora_state_dict(inject_lora(tiny_unet(), lora_config("sd_unet", rank=2)))
    with pytest.raises(ValueError, match="has shape"):
        load_lora_state_dict(unet, other_rank)
    with pytest.raises(ValueError, match="no LoRA adapter named 'missing'"):
        lora_state_dict(unet, "missing")


def test_merge_matches_unmerged_outputs() -> None:
    unet = inject_lora(tiny_unet(), lora_config("sd_unet", rank=4, alpha=8))
    randomize_lora(unet)
    unmerged = unet_output(unet)
    merge_lora(unet)
    assert lora_layer_names(unet) == []
    assert not hasattr(unet, "peft_config")
    assert not any("lora" in name for name, _ in unet.named_parameters())
    torch.testing.assert_close(unet_output(unet), unmerged, rtol=0, atol=1e-5)


def test_merge_vae_encoder_leaves_decoder_weights() -> None:
    vae = tiny_vae()
    decoder_before = copy.deepcopy(vae.decoder.state_dict())
    inject_lora(vae, lora_config("sd_vae_encoder", rank=2))
    randomize_lora(vae)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        unmerged = vae.encode(image).latent_dist.mean
        merge_lora(vae)
        torch.testing.assert_close(vae.encode(image).latent_dist.mean, unmerged, rtol=0, atol=1e-5)
    for key, value in vae.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key])


# MaskedLoRA ---------------------------------------------------------------------------------------


def masked_layer(alpha: float) -> MaskedLoRA:
    """Identity base (no bias), rank 1, A = [[1, 1]], B = [[1], [2]]."""
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = MaskedLoRA(base, rank=1, alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[1.0], [2.0]]))
    return layer


def test_masked_lora_hand_computed() -> None:
    layer = masked_layer(alpha=2.0)  # scale alpha / r = 2
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, N=2, 2)
    # A x = [3, 7]; B A x = [[3, 6], [7, 14]]; times scale 2 = [[6, 12], [14, 28]];
    # mask [1, 0.5] -> [[6, 12], [7, 14]]; plus base(x) = x.
    expected = torch.tensor([[[7.0, 14.0], [10.0, 18.0]]])
    layer.set_mask(torch.tensor([[1.0, 0.5]]))
    assert torch.equal(layer(x), expected)
    layer.set_mask(torch.tensor([[[1.0], [0.5]]]))  # (B, N, 1) form
    assert torch.equal(layer(x), expected)


def test_masked_lora_mask_zero_is_base_and_mask_one_is_peft_lora() -> None:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.proj = nn.Linear(6, 5)
    x = torch.randn(2, 4, 6)
    masked = apply_masked_lora(copy.deepcopy(base), ["proj"], rank=3, alpha=6)
    peft_model = inject_lora(copy.deepcopy(base), lora_config_for(["proj"], rank=3, alpha=6))
    with torch.no_grad():
        masked.proj.lora_A["default"].weight.normal_()
        masked.proj.lora_B["default"].weight.normal_()
        peft_model.proj.lora_A["default"].weight.copy_(masked.proj.lora_A["default"].weight)
        peft_model.proj.lora_B["default"].weight.copy_(masked.proj.lora_B["default"].weight)
    with masked_lora_mask(masked, torch.zeros(2, 4)):
        assert torch.equal(masked(x), base(x))
    with masked_lora_mask(masked, torch.ones(2, 4)):
        torch.testing.assert_close(masked(x), peft_model(x), rtol=0, atol=1e-6)
    assert not torch.allclose(peft_model(x), base(x))


def lora_config_for(targets: list[str], rank: int, alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)


def test_masked_lora_starts_at_base_and_needs_a_well_shaped_mask() -> None:
    base = nn.Linear(4, 3)
    layer = MaskedLoRA(base, rank=2)
    x = torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match="has no mask"):
        layer(x)
    layer.set_mask(torch.rand(2, 5))
    assert torch.equal(layer(x), base(x))
    layer.set_mask(torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\)"):
        layer(x)


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(4, 4)
        self.to_k = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_k(self.norm(self.to_q(x)))


def test_apply_masked_lora_targets_trainability_and_context() -> None:
    model = nn.Sequential(TinyBlock(), TinyBlock())
    apply_masked_lora(model, ["to_q"], rank=2, adapter_name="temporal")
    assert isinstance(model[0].to_q, MaskedLoRA) and isinstance(model[1].to_q, MaskedLoRA)
    assert isinstance(model[0].to_k, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "0.to_q.lora_A.temporal.weight" in trainable
    assert "0.to_q.base.weight" not in trainable
    assert "0.to_k.weight" in trainable  # layers outside the targets keep their requires_grad
    with masked_lora_mask(model, torch.ones(1, 3), adapter_name="temporal"):
        assert model[0].to_q.mask is not None
        model(torch.randn(1, 3, 4))
    assert model[0].to_q.mask is None
    with pytest.raises(ValueError, match="no linear layer"):
        apply_masked_lora(model, ["to_v"], rank=2)
    with (
        pytest.raises(ValueError, match="no MaskedLoRA layers for adapter 'spatial'"),
        masked_lora_mask(model, torch.ones(1, 3), adapter_name="spatial"),
    ):
        pass


def test_masked_lora_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(TinyBlock())
    trained = apply_masked_lora(copy.deepcopy(base), ["to_q", "to_k"], rank=2, adapter_name="temporal")
    randomize_lora(trained)
    x, mask = torch.randn(2, 3, 4), torch.rand(2, 3)
    with masked_lora_mask(trained, mask):
        expected = trained(x)
    save_lora(tmp_path / "temporal.safetensors", trained, adapter_name="temporal")
    assert sorted(load_file(str(tmp_path / "temporal.safetensors"))) == [
        "0.to_k.lora_A.weight",
        "0.to_k.lora_B.weight",
        "0.to_q.lora_A.weight",
        "0.to_q.lora_B.weight",
    ]
    fresh = apply_masked_lora(copy.deepcopy(base), ["to_q", "to_k"], rank=2, adapter_name="temporal")
    load_lora(tmp_path / "temporal.safetensors", fresh, adapter_name="temporal")
    with masked_lora_mask(fresh, mask):
        assert torch.equal(fresh(x), expected)


def test_masked_expert_stacked_on_peft_expert() -> None:
    """OSDEnhancer-style: a plain (spatial) and a masked (temporal) LoRA on the same layers."""
    torch.manual_seed(0)
    model = nn.Sequential(TinyBlock())
    inject_lora(model, lora_config_for(["to_q"], rank=2, alpha=2), adapter_name="spatial")
    randomize_lora(model)
    x = torch.randn(2, 3, 4)
    spatial_only = model(x)
    apply_masked_lora(model, ["to_q"], rank=2, adapter_name="temporal")
    with torch.no_grad():
        model[0].to_q.lora_B["temporal"].weight.normal_()
    with masked_lora_mask(model, torch.zeros(2, 3)):
        assert torch.equal(model(x), spatial_only)
    with masked_lora_mask(model, torch.ones(2, 3)):
        both = model(x)
    assert not torch.allclose(both, spatial_only)
    assert lora_state_dict(model, "spatial").keys() == {"0.to_q.base.lora_A.weight", "0.to_q.base.lora_B.weight"}
    assert lora_state_dict(model, "temporal").keys() == {"0.to_q.lora_A.weight", "0.to_q.lora_B.weight"}
    # merging folds the spatial expert and keeps the masked one
    with masked_lora_mask(model, torch.ones(2, 3)):
        merge_lora(model)
        assert isinstance(model[0].to_q, MaskedLoRA) and isinstance(model[0].to_q.base, nn.Linear)
        torch.testing.assert_close(model(x), both, rtol=0, atol=1e-5)


def test_load_base_weights_fills_base_layers_and_counts_what_does_not_fit() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    from zoo.components.lora import load_base_weights

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(3, 2)))
    published = {"0.weight": torch.arange(6.0).reshape(2, 3), "0.bias": torch.tensor([1.0, -1.0])}
    load_base_weights(model, published, skip=lambda key: "lora_" in key, what="base does not fit")
    assert torch.equal(model[0].base_layer.weight, published["0.weight"])
    assert torch.equal(model[0].base_layer.bias, published["0.bias"])
    with pytest.raises(ValueError, match=r"base does not fit: 1 missing and 1 unexpected weights, e\.g\. 0\.bias"):
        load_base_weights(model, {"0.weight": published["0.weight"], "1.bias": published["0.bias"]},
                          skip=lambda key: "lora_" in key, what="base does not fit")
    # Keys that `skip` does not exclude must be published: the adapters are not.
    with pytest.raises(ValueError, match=r"2 missing .* e\.g\. 0\.lora_A\.default\.weight"):
        load_base_weights(model, published, skip=lambda key: False, what="base does not fit")
